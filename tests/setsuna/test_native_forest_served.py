"""setsuna_forest in the real server: the Python wrapper's contract, in C, in-process.

Small LightGBM and XGBoost forests are built by the real pipeline (converter,
gate, repository writer, seal) into a ``local`` repository, which publishes
them on the native backend, and served by the wheel's ``tritonserver``. The
oracle for every answer is the in-process engine on the same version folder
(bit-identical), which the gate compared with the source library.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from build_engines import composite, gate
from build_engines.base import F32, Built, Candidate, Converter, Source
from build_engines.build import build_model, converter_for
from build_engines.spec import ModelSpec, ServingSpec
from setsuna import deadline, manifest, model_config, native_forest, runtime, seal
from setsuna.server import LocalTriton, find_tritonserver
from tests.helpers import metric_series, small_forests, tabular, wait_until

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

N_FEATURES = 8
FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
#: The C file of a library that breaks its contract: NaN for rows whose first
#: feature is above 100, 0.25 otherwise. Served, it must fail those requests.
BROKEN_C = """
#include <math.h>
#include <stdint.h>
__attribute__((visibility("default"))) int32_t setsuna_num_feature(void) { return %d; }
__attribute__((visibility("default")))
void setsuna_predict_batch(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i * %d] > 100.0f ? NAN : 0.25f;
}
"""


@dataclass(frozen=True)
class Served:
    server: LocalTriton
    repo: Path
    held_out: F32


def _only(*names: str) -> Converter:
    def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
        return [b for b in converter_for(source)(source, workdir, calib) if b.name in names]

    return convert


def _switch(source: Source, workdir: Path, calib: F32) -> list[Built]:
    """tl2cgen below 8 rows, lleaves from 8: the switch, with a fixed crossover."""
    built = [b for b in converter_for(source)(source, workdir, calib) if isinstance(b, Candidate)]
    pair = [b for b in built if b.name in ("tl2cgen", "lleaves")]
    fig = {  # as measured on the example: tl2cgen wins one row, lleaves a batch
        "tl2cgen": gate.Figures("tl2cgen", "tl2cgen", 0, 1, 5, 5, 5, 1e5, 0, 1, True),
        "lleaves": gate.Figures("lleaves", "lleaves", 0, 1, 9, 9, 9, 3e5, 0, 1, True),
    }
    combo = composite.pair(pair, fig, workdir / "switch", calib, threshold_rows=8)
    assert combo is not None
    return [combo]


def _build(root: Path) -> Path:
    from build_engines.sources.trees import from_lightgbm, from_xgboost

    f = small_forests()
    x, x_nan, lgbm, lgbm_nan, xgbm = f.x, f.x_nan, f.lgbm, f.lgbm_nan, f.xgbm
    models = {
        "lgb_tl": (from_lightgbm(lgbm, name="lgb_tl"), x, _only("tl2cgen")),
        "lgb_ll": (from_lightgbm(lgbm, name="lgb_ll"), x, _only("lleaves")),
        "lgb_sw": (from_lightgbm(lgbm, name="lgb_sw"), x, _switch),
        "lgb_nan": (
            from_lightgbm(lgbm_nan, name="lgb_nan", allow_nan=True),
            x_nan,
            _only("tl2cgen"),
        ),
        "xgb_tl": (from_xgboost(xgbm, name="xgb_tl"), x, _only("tl2cgen")),
    }
    for name, (source, rows, convert) in models.items():
        big = 8192 if name == "lgb_tl" else 256  # lgb_tl takes bodies Triton splits (HTTP)
        spec = ModelSpec(
            name=name, gate=FAST, serving=ServingSpec(cpu_instances=2, max_batch_size=big)
        )
        build_model(
            source, rows[2000:], spec, root / "repo", ("local",), root / "work",
            echo=False, converter=convert,
        )  # fmt: skip
    return root / "repo" / "local"


def _copy_model(repo: Path, src: str, dst: str) -> Path:
    """``src`` published again under the name ``dst`` (re-sealed, as a publisher would)."""
    shutil.copytree(repo / src, repo / dst)
    cfg = repo / dst / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace(f'name: "{src}"', f'name: "{dst}"'))
    m = manifest.read(repo / dst / "1")
    manifest.write(repo / dst / "1", replace(m, model=dst))
    seal.seal_model(repo / dst)
    return repo / dst / "1"


def _broken(repo: Path, tmp: Path) -> None:
    """``lgb_tl`` with its library swapped for one that returns NaN, sealed by the publisher."""
    folder = _copy_model(repo, "lgb_tl", "broken")
    c_file = tmp / "broken.c"
    c_file.write_text(BROKEN_C % (N_FEATURES, N_FEATURES))
    lib = folder / "tl2cgen-forest.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(c_file), "-lm"], check=True
    )
    m = manifest.read(folder)
    manifest.write(folder, replace(m, files=manifest.hash_folder(folder)))
    seal.seal_model(folder.parent)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    find_tritonserver()
    folder, why = native_forest.available()
    if folder is None:
        pytest.skip(f"setsuna_forest cannot be built here: {why}")
    root = tmp_path_factory.mktemp("native")
    repo = _build(root)
    _broken(repo, root)
    for victim in ("t_byte", "t_planted", "t_missing", "t_symlink", "t_config"):
        _copy_model(repo, "lgb_tl", victim)  # loaded (and refused) by the tests
    x, _ = tabular(seed=11)
    loaded = ("lgb_tl", "lgb_ll", "lgb_sw", "lgb_nan", "xgb_tl", "broken")
    with LocalTriton.on_free_ports(
        repo, load_models=loaded, log_path=root / "triton.log", http=True
    ) as srv:
        yield Served(srv, repo, x[:600])


def _infer(
    served: Served, model: str, x: np.ndarray, parameters: dict[str, int] | None = None
) -> np.ndarray:
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(served.server.grpc_url) as client:
        inp = grpc.InferInput("features", list(x.shape), grpc.np_to_triton_dtype(x.dtype))
        inp.set_data_from_numpy(x)
        out = client.infer(model, [inp], parameters=parameters).as_numpy("score")
        return np.asarray(out)


def _infer_http(served: Served, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as http

    with http.InferenceServerClient(served.server.http_url.removeprefix("http://")) as client:
        inp = http.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = http.InferRequestedOutput("score", binary_data=True)
        return np.asarray(client.infer(model, [inp], outputs=[out]).as_numpy("score"))


def _engine(served: Served, model: str) -> runtime.Engine:
    folder = served.repo / model / "1"
    m = manifest.verify(folder)
    return runtime.load(m.engine, folder, m.engine_params)


@pytest.mark.parametrize("model", ["lgb_tl", "lgb_ll", "lgb_sw", "xgb_tl"])
def test_published_on_the_native_backend_without_a_wrapper(served: Served, model: str) -> None:
    cfg = model_config.load(served.repo / model / "config.pbtxt", name=model)
    assert cfg.backend == native_forest.BACKEND
    assert not (served.repo / model / "1" / "model.py").exists()


@pytest.mark.parametrize("model", ["lgb_tl", "lgb_ll", "lgb_sw", "xgb_tl", "lgb_nan"])
def test_served_scores_are_bit_identical_to_the_in_process_engine(
    served: Served, model: str
) -> None:
    x = served.held_out.copy()
    if model == "lgb_nan":
        x[::5, 3] = np.nan
    engine = _engine(served, model)
    for rows in (x[:1], x[:7], x[:8], x[:256]):  # both sides of the switch's crossover
        np.testing.assert_array_equal(_infer(served, model, rows), engine.predict(rows))


def test_large_http_bodies_are_scored_and_checked_across_triton_s_buffers(
    served: Served,
) -> None:
    # Triton's HTTP frontend appends a binary tensor as the body's chunks, which
    # may split a float; the backend gathers before it checks. 2.51 did not split
    # these bodies here (measured), so this pins large bodies with odd row counts
    # and a NaN in the very last value, over the HTTP path.
    rng = np.random.default_rng(7)
    engine = _engine(served, "lgb_tl")
    for n in (8192, 8191, 4099, 1031, 256):
        x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        np.testing.assert_array_equal(_infer_http(served, "lgb_tl", x), engine.predict(x))
        bad = x.copy()
        bad[n - 1, N_FEATURES - 1] = np.nan
        with pytest.raises(
            InferenceServerException, match=rf"row {n - 1}, column {N_FEATURES - 1}"
        ):
            _infer_http(served, "lgb_tl", bad)


FAILURES = "setsuna_request_failures_total"


def _failures(served: Served, model: str, reason: str) -> float:
    return sum(metric_series(served.server.metrics_url, FAILURES, model=model, reason=reason))


def test_nan_is_refused_naming_row_and_column_and_the_server_serves_on(served: Served) -> None:
    x = served.held_out[:3].copy()
    x[2, 5] = np.inf
    name = manifest.read(served.repo / "lgb_tl" / "1").schema.names[5]
    refused = rf"row 2, column 5 \({name}\).*allow_nan"
    before = _failures(served, "lgb_tl", "refused")
    with pytest.raises(InferenceServerException, match=refused) as e:
        _infer(served, "lgb_tl", x)
    assert "INVALID_ARG" in str(e.value.status())
    assert _infer(served, "lgb_tl", x[:2]).shape == (2, 1)
    # counted like the Python wrapper's refusals (the alerts and dashboard read this family)
    wait_until("the refusal counter", lambda: _failures(served, "lgb_tl", "refused") == before + 1)
    assert _failures(served, "lgb_tl", "engine") == 0


def test_a_nan_request_fails_alone_in_a_batch_of_concurrent_good_ones(served: Served) -> None:
    x = served.held_out
    engine = _engine(served, "lgb_tl")
    bad = x[:2].copy()
    bad[1, 0] = np.nan

    def call(i: int) -> np.ndarray | str:
        try:
            return _infer(served, "lgb_tl", bad if i == 17 else x[i : i + 2])
        except InferenceServerException as exc:
            return str(exc)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    for i, got in enumerate(results):
        if i == 17:
            assert isinstance(got, str) and "row 1, column 0" in got
        else:
            assert isinstance(got, np.ndarray), got
            np.testing.assert_array_equal(got, engine.predict(x[i : i + 2]))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, N_FEATURES + 1), dtype=np.float32), "shape"),
        (np.zeros((2, N_FEATURES), dtype=np.float64), "FP64"),
        (np.zeros((257, N_FEATURES), dtype=np.float32), "batch-size must be <= 256"),
    ],
)
def test_wrong_shape_dtype_or_oversized_batch_is_refused(
    served: Served, x: np.ndarray, match: str
) -> None:
    with pytest.raises(InferenceServerException, match=match):
        _infer(served, "xgb_tl", x)
    assert _infer(served, "xgb_tl", served.held_out[:1]).shape == (1, 1)


def test_an_engine_failure_fails_its_requests_visibly(served: Served) -> None:
    x = np.zeros((3, N_FEATURES), dtype=np.float32)
    np.testing.assert_array_equal(_infer(served, "broken", x), np.full((3, 1), 0.25, np.float32))
    before = _failures(served, "broken", "engine")
    x[1, 0] = 1000.0
    with pytest.raises(InferenceServerException, match=r"engine failed: .*non-finite score") as e:
        _infer(served, "broken", x)
    assert "INTERNAL" in str(e.value.status())
    assert _infer(served, "broken", x[:1]).shape == (1, 1)  # the instance serves on
    wait_until("the engine counter", lambda: _failures(served, "broken", "engine") == before + 1)
    assert _failures(served, "broken", "refused") == 0


def test_the_failure_family_is_the_python_wrappers_word_for_word() -> None:
    """One family, two backends: prometheus-cpp merges by name and keeps the first help text,
    so ``/metrics`` must read the same whichever backend registered it first."""
    import re

    c = next(p for p in native_forest.sources() if p.name == "backend.c").read_text()
    py = (Path(native_forest.__file__).parent / "backend.py").read_text()

    def c_string(macro: str) -> str:
        body = re.search(rf"#define {macro}\s+\\?\s*((?:\"[^\"]*\"\s*\\?\s*)+)", c)
        assert body, macro
        return "".join(re.findall(r'"([^"]*)"', body.group(1)))

    def py_description(family: str) -> str:
        block = re.search(rf'name="{family}",\s+description=((?:"[^"]*"\s*)+)', py)
        assert block, family
        return "".join(re.findall(r'"([^"]*)"', block.group(1)))

    assert c_string("FAILURE_DESCRIPTION") == py_description(FAILURES)
    assert c_string("SHED_DESCRIPTION") == py_description("setsuna_shed_total")


def test_a_request_past_its_deadline_is_shed_not_computed(served: Served) -> None:
    url = served.server.metrics_url
    before = sum(metric_series(url, "setsuna_shed_total", model="lgb_ll"))
    past = deadline.parameters(-0.001)
    with pytest.raises(InferenceServerException, match=deadline.SHED_MARK) as e:
        _infer(served, "lgb_ll", served.held_out[:1], parameters=past)
    assert "UNAVAILABLE" in str(e.value.status())
    wait_until(
        "the shed counter",
        lambda: sum(metric_series(url, "setsuna_shed_total", model="lgb_ll")) == before + 1,
    )
    later = deadline.parameters(5.0)
    assert _infer(served, "lgb_ll", served.held_out[:1], parameters=later).shape == (1, 1)


def test_instances_serve_concurrently_without_mixing_answers(served: Served) -> None:
    x = served.held_out
    engine = _engine(served, "lgb_sw")

    def call(i: int) -> bool:
        rows = x[i % 500 : i % 500 + 1 + i % 13]
        return bool(np.array_equal(_infer(served, "lgb_sw", rows), engine.predict(rows)))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(call, range(400)))


def _stubs_for(repo: Path) -> list[str]:
    """Command lines of Python-backend stubs serving a model of ``repo``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub"):
            out.append(b" ".join(argv).decode(errors="replace"))
    return [a for a in out if str(repo) in a]


def test_native_models_run_inside_the_server_process(served: Served) -> None:
    assert _stubs_for(served.repo) == []  # two instances of six models, no stub process


def _load_refused(served: Served, model: str, match: str) -> None:
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(served.server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match=match):
            client.load_model(model, headers=served.server.grpc_admin_headers)
        assert not client.is_model_ready(model)
        assert client.is_model_ready("lgb_tl")  # the good models keep serving


def test_a_modified_library_refuses_to_load(served: Served) -> None:
    lib = served.repo / "t_byte" / "1" / "tl2cgen-forest.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    _load_refused(served, "t_byte", r"sha256 of tl2cgen-forest\.so does not match")


def test_a_planted_file_refuses_to_load(served: Served) -> None:
    (served.repo / "t_planted" / "1" / "libextra.so").write_bytes(b"\x7fELF")
    _load_refused(served, "t_planted", r"libextra\.so is not in the seal")


def test_a_missing_file_refuses_to_load(served: Served) -> None:
    (served.repo / "t_missing" / "1" / "tl2cgen-forest.so").unlink()
    _load_refused(served, "t_missing", r"missing.*tl2cgen-forest\.so")


def test_a_symlinked_library_refuses_to_load(served: Served) -> None:
    lib = served.repo / "t_symlink" / "1" / "tl2cgen-forest.so"
    real = served.repo / "elsewhere.so"
    shutil.move(lib, real)
    lib.symlink_to(real)
    _load_refused(served, "t_symlink", r"tl2cgen-forest\.so")


def test_an_edited_config_refuses_to_load(served: Served) -> None:
    cfg = served.repo / "t_config" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("count: 2", "count: 3"))
    _load_refused(served, "t_config", r"config\.pbtxt")


def test_the_server_reports_statistics_for_native_models(served: Served) -> None:
    _infer(served, "xgb_tl", served.held_out[:4])
    grpc = tritonclient_grpc
    with grpc.InferenceServerClient(served.server.grpc_url) as client:
        stats = client.get_inference_statistics("xgb_tl", as_json=True)
    success = stats["model_stats"][0]["inference_stats"]["success"]
    assert int(success["count"]) >= 1
