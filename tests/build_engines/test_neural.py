"""Neural sources and candidates on small nets: fp32 copies match torch, INT8 copies run.

The nets are random-init with fixed seeds (12-32-32-1 MLP; 8 steps x 4 features
into an 8-unit LSTM) so the whole module builds in seconds. INT8 accuracy is
the gate's business; here INT8 candidates only have to exist and honour the
engine contract.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from build_engines.base import F32, Built, Candidate, Skipped, Source
from build_engines.candidates import neural as neural_candidates
from build_engines.candidates.neural import ONNX_FILE, PLAN_FILE, convert, tensorrt_missing
from build_engines.examples import data
from build_engines.examples.neural import MLP, SequenceLSTM, train_lstm, train_mlp
from build_engines.sources.neural import from_onnx, from_torch
from setsuna import runtime
from setsuna.errors import EngineError, SourceError
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

#: fp32 engines vs torch on probabilities: float32 rounding in a different op order.
FP32_ATOL = 1e-5
MLP_FEATURES = 12
STEPS, SEQ_FEATURES = 8, 4
FP32 = ("onnx",)
INT8 = (
    "onnx-int8-dynamic",
    "onnx-int8-static",
    "onnx-int8-static-keep-last",
    "onnx-int8-static-keep-first",
)
TRT = ("tensorrt-fp16", "tensorrt-int8")


def _mlp(seed: int = 3) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLP_FEATURES, hidden=32).eval()


def _lstm(seed: int = 5) -> SequenceLSTM:
    torch.manual_seed(seed)
    return SequenceLSTM(SEQ_FEATURES, hidden=8).eval()


def _rows(shape: tuple[int, ...], seed: int, n: int = 300) -> F32:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _by_name(built: list[Built]) -> dict[str, Built]:
    return {b.name: b for b in built}


def _predict(candidate: Built, x: F32) -> F32:
    assert isinstance(candidate, Candidate), candidate
    engine = runtime.load(candidate.engine, candidate.folder, candidate.params)
    return engine.predict(np.ascontiguousarray(x, dtype=np.float32))


@pytest.fixture(scope="module")
def mlp_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Source, dict[str, Built]]:
    calib = _rows((MLP_FEATURES,), seed=1)
    source = from_torch(_mlp(), calib[:4], name="mlp")
    return source, _by_name(convert(source, tmp_path_factory.mktemp("mlp"), calib))


@pytest.fixture(scope="module")
def lstm_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Source, dict[str, Built]]:
    calib = _rows((STEPS, SEQ_FEATURES), seed=2)
    source = from_torch(_lstm(), calib[:4], name="lstm")
    return source, _by_name(convert(source, tmp_path_factory.mktemp("lstm"), calib))


def _export(module: torch.nn.Module, path: Path, *, inputs: int = 1) -> None:
    """A user-style export: other tensor names and a flat [N] output."""

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner(x).reshape(-1)
            return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Flat().eval(),
            (torch.zeros(2, MLP_FEATURES),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["prob"],
            dynamic_axes={"x": {0: "batch"}, "prob": {0: "batch"}},
        )


@pytest.fixture(scope="module")
def onnx_build(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Source, dict[str, Built], MLP]:
    folder = tmp_path_factory.mktemp("user_onnx")
    module = _mlp(seed=9)
    _export(module, folder / "user.onnx")
    source = from_onnx(folder / "user.onnx", name="user")
    built = convert(source, folder / "work", _rows((MLP_FEATURES,), seed=4))
    return source, _by_name(built), module


def _torch(module: torch.nn.Module, x: F32) -> F32:
    with torch.inference_mode():
        out: F32 = module(torch.from_numpy(x)).numpy()
    return out


mlp_rows = st.integers(1, 64).flatmap(
    lambda n: arrays(np.float32, (n, MLP_FEATURES), elements=st.floats(-8, 8, width=32))
)
seq_rows = st.integers(1, 32).flatmap(
    lambda n: arrays(np.float32, (n, STEPS, SEQ_FEATURES), elements=st.floats(-8, 8, width=32))
)


@settings(max_examples=30, deadline=None)
@given(x=mlp_rows)
def test_mlp_fp32_candidates_match_torch(
    mlp_build: tuple[Source, dict[str, Built]], x: F32
) -> None:
    source, built = mlp_build
    for name in FP32:
        out = _predict(built[name], x)
        assert out.dtype == np.float32 and out.shape == (len(x), 1)
        np.testing.assert_allclose(out, source.reference(x), atol=FP32_ATOL, rtol=0)


@settings(max_examples=20, deadline=None)
@given(x=seq_rows)
def test_lstm_fp32_candidates_match_torch(
    lstm_build: tuple[Source, dict[str, Built]], x: F32
) -> None:
    source, built = lstm_build
    for name in FP32:
        out = _predict(built[name], x)
        assert out.dtype == np.float32 and out.shape == (len(x), 1)
        np.testing.assert_allclose(out, source.reference(x), atol=FP32_ATOL, rtol=0)


def test_reference_is_the_module(mlp_build: tuple[Source, dict[str, Built]]) -> None:
    source, _ = mlp_build
    x = _rows((MLP_FEATURES,), seed=7, n=20)
    np.testing.assert_array_equal(source.reference(x), _torch(source.model, x))
    assert source.reference_label == "torch.nn.Module.forward"
    assert source.schema.row_shape == (MLP_FEATURES,) and source.kind == "torch"


@pytest.mark.parametrize("name", INT8)
def test_mlp_int8_candidates_run(mlp_build: tuple[Source, dict[str, Built]], name: str) -> None:
    _, built = mlp_build
    x = _rows((MLP_FEATURES,), seed=8, n=33)
    out = _predict(built[name], x)
    assert out.dtype == np.float32 and out.shape == (33, 1)
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()


def test_every_candidate_folder_holds_only_its_model(
    mlp_build: tuple[Source, dict[str, Built]],
) -> None:
    _, built = mlp_build
    candidates = [b for b in built.values() if isinstance(b, Candidate)]
    assert {c.name for c in candidates} >= {*FP32, *INT8}
    for c in candidates:
        assert [p.name for p in c.folder.iterdir()] == [c.params["file"]]
        assert c.folder.parent == candidates[0].folder.parent
        assert c.container is not None and c.engine in runtime.engine_kinds()
    onnx_candidate = built["onnx"]
    assert isinstance(onnx_candidate, Candidate)
    assert onnx_candidate.params == {"file": ONNX_FILE, "threads": 1, "optimized_offline": True}
    assert onnx_candidate.container is not None
    assert onnx_candidate.container.platform == "onnxruntime_onnx"
    model = onnx.load(onnx_candidate.folder / ONNX_FILE)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]


def test_lstm_int8_dynamic_runs_and_static_is_skipped(
    lstm_build: tuple[Source, dict[str, Built]],
) -> None:
    _, built = lstm_build
    x = _rows((STEPS, SEQ_FEATURES), seed=9, n=17)
    dynamic = built["onnx-int8-dynamic"]
    assert isinstance(dynamic, Candidate)
    out = _predict(dynamic, x)
    assert out.dtype == np.float32 and out.shape == (17, 1)
    ops = {n.op_type for n in onnx.load(dynamic.folder / ONNX_FILE).graph.node}
    assert "DynamicQuantizeLSTM" in ops
    for name in ("onnx-int8-static", "onnx-int8-static-keep-last", "onnx-int8-static-keep-first"):
        skipped = built[name]
        assert isinstance(skipped, Skipped) and "LSTM" in skipped.reason


def test_tensorrt_skipped_with_reason_without_gpu(
    mlp_build: tuple[Source, dict[str, Built]],
) -> None:
    _, built = mlp_build
    missing = tensorrt_missing()
    if not missing:
        pytest.skip("TensorRT and a GPU are present: plans are built, not skipped")
    for name in TRT:
        skipped = built[name]
        assert isinstance(skipped, Skipped)
        assert skipped.reason == missing
        assert any(w in missing for w in ("tensorrt not installed", "TensorRT 10", "no CUDA GPU"))


def test_tensorrt_candidates_when_tensorrt_is_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The plumbing around a plan build (the build itself needs a GPU and TensorRT 10)."""

    def fake_plan(base: Path, schema: object, calib: F32 | None) -> bytes:
        if calib is not None:
            raise RuntimeError("calibration failed")
        assert onnx.load(base).graph.input[0].name == INPUT_NAME
        return b"plan"

    monkeypatch.setattr(neural_candidates, "tensorrt_missing", lambda: "")
    monkeypatch.setattr(neural_candidates, "plan_bytes", fake_plan)
    calib = _rows((MLP_FEATURES,), seed=14, n=64)
    built = _by_name(convert(from_torch(_mlp(), calib[:2], name="m"), tmp_path, calib))
    fp16 = built["tensorrt-fp16"]
    assert isinstance(fp16, Candidate) and fp16.engine == "tensorrt" and fp16.local
    assert [p.name for p in fp16.folder.iterdir()] == [PLAN_FILE]
    assert fp16.container is not None and fp16.container.platform == "tensorrt_plan"
    assert fp16.container.gpu and fp16.container.default_model_filename == PLAN_FILE
    int8 = built["tensorrt-int8"]
    assert isinstance(int8, Skipped) and "calibration failed" in int8.reason
    assert not (tmp_path / "tensorrt-int8").exists()


def test_tensorrt_runtime_refuses_without_tensorrt(tmp_path: Path) -> None:
    if tensorrt_missing() != "tensorrt not installed (pip install setsuna[tensorrt])":
        pytest.skip("tensorrt is installed here")
    (tmp_path / PLAN_FILE).write_bytes(b"plan")
    with pytest.raises(EngineError, match="tensorrt"):
        runtime.load("tensorrt", tmp_path, {"file": PLAN_FILE})


def test_from_onnx_round_trip(onnx_build: tuple[Source, dict[str, Built], MLP]) -> None:
    source, built, module = onnx_build
    x = _rows((MLP_FEATURES,), seed=10, n=50)
    expected = _torch(module, x)
    assert source.kind == "onnx" and source.reference_label == "onnxruntime (source file)"
    assert source.schema.row_shape == (MLP_FEATURES,)
    np.testing.assert_allclose(source.reference(x), expected, atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(_predict(built["onnx"], x), expected, atol=FP32_ATOL, rtol=0)
    assert _predict(built["onnx-int8-static"], x).shape == (50, 1)


def test_from_onnx_sha256_is_the_file_hash(
    onnx_build: tuple[Source, dict[str, Built], MLP], tmp_path: Path
) -> None:
    import hashlib

    _export(_mlp(seed=9), tmp_path / "again.onnx")
    again = from_onnx(tmp_path / "again.onnx", name="again")
    assert again.sha256 == hashlib.sha256((tmp_path / "again.onnx").read_bytes()).hexdigest()


def test_multi_input_onnx_is_refused(tmp_path: Path) -> None:
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Add", ["a", "b"], ["y"])],
        "two_inputs",
        [
            h.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["N", 3]),
            h.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 3]),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "two.onnx")
    with pytest.raises(SourceError, match="2 inputs"):
        from_onnx(tmp_path / "two.onnx", name="two")


def test_fixed_batch_onnx_is_refused(tmp_path: Path) -> None:
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Sigmoid", ["x"], ["y"])],
        "fixed",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "f.onnx")
    with pytest.raises(SourceError, match="fixed batch"):
        from_onnx(tmp_path / "f.onnx", name="fixed")


def test_torch_sha256_is_stable_and_tracks_weights() -> None:
    example = _rows((MLP_FEATURES,), seed=11, n=2)
    first = from_torch(_mlp(), example, name="a").sha256
    assert from_torch(_mlp(), example, name="b").sha256 == first
    changed = _mlp()
    with torch.no_grad():
        changed.state_dict()["body.2.weight"][0, 0] += 1e-3
    assert from_torch(changed, example, name="c").sha256 != first
    assert from_torch(_mlp(seed=4), example, name="d").sha256 != first


def test_logit_module_is_refused_for_classification() -> None:
    module = _mlp()
    example = _rows((MLP_FEATURES,), seed=12, n=64) * 50
    logits = torch.nn.Sequential(*module.body)  # no sigmoid: raw logits
    with pytest.raises(SourceError, match="outside"):
        from_torch(logits, example, name="logits")
    assert from_torch(logits, example, name="value", task="regression").task == "regression"


def test_flat_output_module_is_refused() -> None:
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x.sum(dim=1))

    with pytest.raises(SourceError, match=r"\[n, 1\]"):
        from_torch(Flat(), _rows((MLP_FEATURES,), seed=13, n=2), name="flat")


def test_trainers_are_deterministic_and_restore_threads() -> None:
    split = data.tabular(2_000, MLP_FEATURES, seed=3)
    threads = torch.get_num_threads()
    a = train_mlp(split, epochs=1, hidden=16)
    b = train_mlp(split, epochs=1, hidden=16)
    assert torch.get_num_threads() == threads and not a.training
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    seqs = data.sequences(300, STEPS, SEQ_FEATURES, seed=3)
    lstm = train_lstm(seqs, epochs=1, hidden=8)
    out = _torch(lstm, seqs.x_valid)
    assert out.shape == (len(seqs.x_valid), 1) and ((out > 0) & (out < 1)).all()


def test_allow_nan_sources_get_the_gates_nan_probe(tmp_path: Path) -> None:
    """The probe once ran for tree sources only; now every converter's candidates face it.

    fp32 ONNX propagates NaN exactly as torch does, so it is judged; INT8 turns
    NaN into numbers (quantised, or the whole batch's scale poisoned) where torch
    gives NaN, which the probe reports instead of letting it be published.
    """
    from build_engines import gate
    from build_engines.build import evaluate
    from build_engines.spec import ModelSpec

    x = _rows((MLP_FEATURES,), seed=14, n=400)
    source = from_torch(_mlp(), x[:4], name="mlp_nan", allow_nan=True)
    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    ev = evaluate(source, x, ModelSpec("mlp_nan", gate=fast), ("local",), tmp_path)
    judged = {f.name for f in ev.report.candidates}
    probed = {s.name: s.reason for s in ev.report.skipped if "rows with NaN" in s.reason}
    assert "onnx" in judged and "onnx" not in probed
    assert probed and set(probed) <= set(INT8), probed
    assert all("torch" in reason and "allow_nan=False" in reason for reason in probed.values())
    assert not any((ev.stage / name).exists() for name in probed)
