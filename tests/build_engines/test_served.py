"""Every published candidate, served by the real local Triton, agrees with its source.

Small models of each kind are built into a ``local`` repository with the real
pipeline (converters, gate, repository writer), served by the wheel's
``tritonserver``, and called with ``tritonclient`` on Hypothesis-drawn rows.
The oracle is the source library itself (LightGBM, XGBoost, PyTorch), not
the in-process engine. Float32 tolerance: 1e-5 absolute on probabilities.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from build_engines import gate
from build_engines.base import F32, Built, Converter, Source
from build_engines.build import build_model, converter_for
from build_engines.spec import ModelSpec
from setsuna import manifest, runtime, seal
from setsuna.server import LocalTriton, find_tritonserver
from tests.helpers import small_forests

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ATOL = 1e-5
N_FEATURES = 8
FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)


@dataclass(frozen=True)
class Served:
    source: Source
    version_dir: Path


Fixture = tuple[LocalTriton, dict[str, Served]]


def _only(keep: Callable[[str], bool]) -> Converter:
    """The real converter, keeping only the candidates whose name passes ``keep``.

    fp32 engines must match the source within float32 noise; INT8 engines
    cannot, so which kind gets published must not be left to a timing race.
    """

    def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
        return [b for b in converter_for(source)(source, workdir, calib) if keep(b.name)]

    return convert


FP32 = _only(lambda name: "int8" not in name)
INT8 = _only(lambda name: name == "onnx-int8-static-keep-first")


def _sources() -> dict[str, tuple[Source, F32]]:
    import torch

    from build_engines.sources.neural import from_torch
    from build_engines.sources.trees import from_lightgbm, from_xgboost

    f = small_forests()
    x, x_nan = f.x, f.x_nan
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 1),
        torch.nn.Sigmoid(),
    ).eval()

    class TinyLSTM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(seq)
            return torch.sigmoid(self.head(out[:, -1]))

    lstm = TinyLSTM().eval()
    seqs = np.random.default_rng(5).normal(size=(800, 6, 4)).astype(np.float32)
    return {
        "lgbm": (from_lightgbm(f.lgbm, name="lgbm"), x[2000:]),
        "lgbm_nan": (from_lightgbm(f.lgbm_nan, name="lgbm_nan", allow_nan=True), x_nan[2000:]),
        "xgb": (from_xgboost(f.xgbm, name="xgb"), x[2000:]),
        "mlp": (from_torch(mlp, torch.zeros(1, N_FEATURES), name="mlp"), x[2000:]),
        "lstm": (from_torch(lstm, torch.zeros(1, 6, 4), name="lstm"), seqs),
        "mlp_int8": (from_torch(mlp, torch.zeros(1, N_FEATURES), name="mlp_int8"), x[2000:]),
    }


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fixture]:
    find_tritonserver()
    root = tmp_path_factory.mktemp("served")
    out: dict[str, Served] = {}
    lax = gate.GateSettings(min_identical_decisions=0.5, latency_calls=20, batch_budget_s=0.01)
    for name, (source, x_valid) in _sources().items():
        int8 = name == "mlp_int8"
        spec = ModelSpec(name=name, gate=lax if int8 else FAST)
        result = build_model(
            source,
            x_valid,
            spec,
            root / "repo",
            ("local",),
            root / "work",
            echo=False,
            converter=INT8 if int8 else FP32,
        )
        out[name] = Served(source, result.published["local"])
    # A tampered copy, not loaded at start: loading it later must fail.
    shutil.copytree(root / "repo" / "local" / "lgbm", root / "repo" / "local" / "tampered")
    cfg = root / "repo" / "local" / "tampered" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "lgbm"', 'name: "tampered"'))
    seal.seal_model(cfg.parent)  # published under its new name; the test then tampers with it
    with LocalTriton.on_free_ports(
        root / "repo" / "local", load_models=tuple(out), log_path=root / "triton.log"
    ) as server:
        yield server, out


def _infer(server: LocalTriton, model: str, x: np.ndarray) -> np.ndarray:
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(server.grpc_url) as client:
        inp = grpc.InferInput("features", list(x.shape), grpc.np_to_triton_dtype(x.dtype))
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("score")  # type: ignore[no-any-return]


finite = st.floats(-6, 6, width=32, allow_nan=False, allow_infinity=False)
with_missing = st.one_of(
    finite, st.just(float("nan")), st.just(float("inf")), st.just(-float("inf"))
)
HYPO = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("model", ["lgbm", "xgb", "mlp"])
@HYPO
@given(data=st.data())
def test_tabular_models_agree_with_source(served: Fixture, model: str, data: st.DataObject) -> None:
    server, models = served
    x = data.draw(
        arrays(np.float32, st.tuples(st.integers(1, 16), st.just(N_FEATURES)), elements=finite)
    )
    expected = models[model].source.reference(x)
    np.testing.assert_allclose(_infer(server, model, x), expected, atol=ATOL, rtol=0)


@HYPO
@given(
    x=arrays(np.float32, st.tuples(st.integers(1, 16), st.just(N_FEATURES)), elements=with_missing)
)
def test_nan_allowed_model_matches_lightgbm_on_missing_values(
    served: Fixture, x: np.ndarray
) -> None:
    server, models = served
    expected = models["lgbm_nan"].source.reference(x)
    np.testing.assert_allclose(_infer(server, "lgbm_nan", x), expected, atol=ATOL, rtol=0)


@HYPO
@given(x=arrays(np.float32, st.tuples(st.integers(1, 8), st.just(6), st.just(4)), elements=finite))
def test_sequence_model_agrees_with_torch(served: Fixture, x: np.ndarray) -> None:
    server, models = served
    np.testing.assert_allclose(
        _infer(server, "lstm", x), models["lstm"].source.reference(x), atol=ATOL, rtol=0
    )


@HYPO
@given(x=arrays(np.float32, st.tuples(st.integers(1, 16), st.just(N_FEATURES)), elements=finite))
def test_int8_model_serves_exactly_what_the_gate_judged(served: Fixture, x: np.ndarray) -> None:
    """INT8 is judged on decisions by the gate; Triton must then serve that very engine."""
    server, models = served
    folder = models["mlp_int8"].version_dir
    m = manifest.verify(folder)
    assert m.candidate == "onnx-int8-static-keep-first"
    engine = runtime.load(m.engine, folder, m.engine_params)
    np.testing.assert_allclose(_infer(server, "mlp_int8", x), engine.predict(x), atol=1e-6, rtol=0)


def test_published_fp32_candidates_are_what_the_test_expects(served: Fixture) -> None:
    _, models = served
    published = {n: manifest.read(s.version_dir).candidate for n, s in models.items()}
    assert not any("int8" in c for n, c in published.items() if n != "mlp_int8"), published


def test_nan_to_a_model_that_forbids_it_is_refused_with_advice(served: Fixture) -> None:
    server, _ = served
    x = np.zeros((2, N_FEATURES), dtype=np.float32)
    x[1, 4] = np.nan
    with pytest.raises(InferenceServerException, match="allow_nan"):
        _infer(server, "lgbm", x)
    assert _infer(server, "lgbm", x[:1]).shape == (1, 1)  # the server still serves


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, N_FEATURES + 1), dtype=np.float32), "shape"),
        (np.zeros((2, N_FEATURES), dtype=np.float64), "FP64"),
    ],
)
def test_wrong_shape_or_dtype_is_refused_by_triton(
    served: Fixture, x: np.ndarray, match: str
) -> None:
    server, _ = served
    with pytest.raises(InferenceServerException, match=match):
        _infer(server, "xgb", x)


def test_unknown_model_is_refused(served: Fixture) -> None:
    server, _ = served
    with pytest.raises(InferenceServerException, match=r"unknown model|not found"):
        _infer(server, "no_such_model", np.zeros((1, N_FEATURES), dtype=np.float32))


def test_a_tampered_artifact_refuses_to_load(served: Fixture) -> None:
    server, _ = served
    folder = server.settings.model_repository / "tampered" / "1"
    victim = max(
        (p for p in folder.iterdir() if p.name not in ("model.py", "manifest.json", "seal.json")),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="sha256"):
            client.load_model("tampered", headers=server.grpc_admin_headers)
        assert not client.is_model_ready("tampered")
        assert client.is_model_ready("lgbm")  # the good models keep serving
