"""The routers' answer cache on the real local Triton (``ensembles.cache``).

Engines alpha and beta are small logistic models (numpy oracle); ``faulty``
answers every request with an error. On top, each with one instance (so one
cache sees every request) and the cache on:

- ``router`` (BLS) over alpha, beta and faulty (weight 0, reached by forcing
  the arm), 1 MiB, entries kept 10 minutes;
- ``decide`` (arms in process, the signal) over alpha and beta, the same;
- ``decide_small``: 64 KiB, entries kept 300 ms.

Hits and misses are read from the metrics the models push (every 50 ms
here); a hit that computed nothing is checked with the engines' own
inference counts.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensembles import repository as rep
from ensembles import signal
from ensembles.cache import ENTRY_OVERHEAD_BYTES
from ensembles.limits import Limits
from setsuna import seal
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, ExperimentVersion, Target
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models, metric_series, wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

N = 6
RNG = np.random.default_rng(23)
W = {name: RNG.normal(size=N).astype(np.float32) for name in ("alpha", "beta")}
THRESHOLDS = signal.Thresholds(buy_at=0.55, sell_at=0.45)
SMALL_BYTES = 64 << 10
SMALL_TTL_MS = 300.0
PATIENT_US = 60_000_000

FAULTY_CONFIG = f"""\
name: "faulty"
backend: "python"
max_batch_size: 1024
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {N} ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "leaf" value {{ string_value: "true" }} }}
"""
FAULTY_PY = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        err = pb_utils.TritonError("faulty engine: out of order")
        return [pb_utils.InferenceResponse(error=err) for _ in requests]
"""


def _experiment(
    *weights: dict[str, float], broken: bool = True, control: str = "alpha", **pins: int
) -> dict[str, Any]:
    """control -> alpha (or ``control``), treatment -> beta (versions from ``pins``),
    broken -> faulty."""
    arms = {
        "control": Target(control, pins.get(control, 1)),
        "treatment": Target("beta", pins.get("beta", 1)),
    }
    if broken:
        arms["broken"] = Target("faulty", 1)
    versions = tuple(ExperimentVersion(i + 1, w) for i, w in enumerate(weights))
    return ExperimentDoc("cached", "cached-2026", arms, versions).to_json()


HALF = {"control": 0.5, "treatment": 0.5}


@dataclass
class Served:
    server: LocalTriton
    repo: Path

    def client(self) -> Any:
        return grpcclient.InferenceServerClient(self.server.grpc_url)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("cache")
    repo = build_logistic_models(root, W, RNG.normal(size=(400, N)).astype(np.float32))
    (repo / "faulty" / "1").mkdir(parents=True)
    (repo / "faulty" / "config.pbtxt").write_text(FAULTY_CONFIG)
    (repo / "faulty" / "1" / "model.py").write_text(FAULTY_PY)
    seal.seal_model(repo / "faulty")  # the stub guard loads only sealed folders
    files = root / "files"
    files.mkdir()
    (files / "router.json").write_text(json.dumps(_experiment(HALF)))
    (files / "decide.json").write_text(json.dumps(_experiment(HALF, broken=False)))
    one = rep.Serving(instances=1)
    cached = Limits(
        bls_timeout_ms=60_000, watch_interval_ms=50, cache_max_bytes=1 << 20, cache_ttl_ms=600_000
    )
    rep.write_router(repo, files / "router.json", N, serving=one, limits=cached)
    for name, limits in (
        ("decide", cached),
        ("decide_small", Limits(**{**cached.__dict__, "cache_max_bytes": SMALL_BYTES,
                                   "cache_ttl_ms": SMALL_TTL_MS})),
    ):  # fmt: skip
        rep.write_router(
            repo, files / "decide.json", N, name=name, in_process=True, thresholds=THRESHOLDS,
            serving=one, limits=limits,
        )  # fmt: skip
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as server:
        yield Served(server, repo)


# -- helpers -------------------------------------------------------------------------


def _infer(
    s: Served, model: str, x: np.ndarray, keys: list[bytes] | None = None, **params: Any
) -> dict[str, np.ndarray]:
    inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if keys is not None:
        k = grpcclient.InferInput("key", [len(keys), 1], "BYTES")
        k.set_data_from_numpy(np.array([[k] for k in keys], dtype=np.object_))
        inputs.append(k)
    with s.client() as c:
        r = c.infer(
            model, inputs, parameters=params or None, timeout=PATIENT_US, client_timeout=120
        )
    names = ["score", "arm", "model", "experiment_version"]
    names += ["signal", "confidence", "decided_by"] if model != "router" else []
    return {n: r.as_numpy(n) for n in names}


def _oracle(name: str, x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) @ W[name].astype(np.float64)
    return (1.0 / (1.0 + np.exp(-z))).reshape(-1, 1)


def _counts(s: Served, model: str) -> tuple[float, float]:
    """The model's (one instance's) cache hits and misses, as last pushed."""
    hits = metric_series(s.server.metrics_url, "setsuna_router_cache_hits_total", router=model)
    misses = metric_series(s.server.metrics_url, "setsuna_router_cache_misses_total", router=model)
    assert len(hits) == 1 and len(misses) == 1, (hits, misses)
    return hits[0], misses[0]


def _counted(s: Served, model: str, hits: float, misses: float) -> None:
    """Wait until the pushed counters read ``(hits, misses)``; fail if they pass them."""

    def reached() -> bool:
        now = _counts(s, model)
        assert now[0] <= hits and now[1] <= misses, f"{model}: {now} past {(hits, misses)}"
        return now == (hits, misses)

    wait_until(f"{model} counted {hits:g} hits and {misses:g} misses", reached)


def _rows_computed(s: Served, *models: str) -> int:
    """Rows the engines have run so far (Triton's own inference counts)."""
    with s.client() as c:
        return sum(
            int(c.get_inference_statistics(m, "1").model_stats[0].inference_count) for m in models
        )


def _set(s: Served, model: str, doc: dict[str, Any]) -> None:
    """Replace the model's experiment file in one step (temp + rename), with a new stamp."""
    path = s.repo / model / EXPERIMENT_FILE
    tmp = path.with_name(".experiment.json.tmp")
    tmp.write_text(json.dumps(doc))
    st = tmp.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    tmp.replace(path)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _check_scores(out: dict[str, np.ndarray], x: np.ndarray) -> None:
    """Every row's score is its arm's engine on that row (alpha:1 or beta:1)."""
    models = [m.decode() for m in out["model"].reshape(-1)]
    for label, name in (("alpha:1", "alpha"), ("beta:1", "beta")):
        mine = np.array([m == label for m in models])
        if mine.any():
            np.testing.assert_allclose(out["score"][mine], _oracle(name, x[mine]), atol=1e-5)
    assert set(models) <= {"alpha:1", "beta:1"}, models


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["router", "decide"])
def test_a_repeated_row_is_answered_from_the_cache_and_only_misses_are_computed(
    served: Served, model: str
) -> None:
    x = RNG.normal(size=(6, N)).astype(np.float32)
    keys = [b"hit-%d" % i for i in range(6)]
    h, m = _counts(served, model)
    first = _infer(served, model, x, keys)
    _check_scores(first, x)
    assert {a.decode() for a in first["arm"].reshape(-1)} == {"control", "treatment"}
    _counted(served, model, h, m + 6)
    computed = _rows_computed(served, "alpha", "beta")

    again = _infer(served, model, x, keys)
    _counted(served, model, h + 6, m + 6)
    _same(again, first)  # the same answer, every output
    if model == "router":  # a BLS router: no arm was called for a batch the cache answered
        assert _rows_computed(served, "alpha", "beta") == computed

    fresh = RNG.normal(size=(2, N)).astype(np.float32)
    mixed = np.concatenate([fresh[:1], x[:3], fresh[1:]])
    mixed_keys = [b"new-0", *keys[:3], b"new-1"]
    third = _infer(served, model, mixed, mixed_keys)
    _counted(served, model, h + 9, m + 8)
    _check_scores(third, mixed)
    for name in first:
        np.testing.assert_array_equal(third[name][1:4], first[name][:3], err_msg=name)
    if model == "router":  # only the two missed rows went to the arms
        assert _rows_computed(served, "alpha", "beta") == computed + 2


@pytest.mark.parametrize("model", ["router", "decide"])
def test_a_refused_row_is_never_cached_it_is_refused_again(served: Served, model: str) -> None:
    """Unlike Triton 2.51's response cache (an empty success: see test_served.py)."""
    h, m = _counts(served, model)
    bad = np.full((1, N), np.nan, dtype=np.float32)
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="NaN or inf") as err:
            _infer(served, model, bad, [b"nan"])
        assert "INVALID_ARGUMENT" in str(err.value.status())
    good = RNG.normal(size=(1, N)).astype(np.float32)
    _infer(served, model, good, [b"nan"])  # a row that is looked up, to read the counters by
    _counted(served, model, h, m + 1)  # the refused rows were never looked up nor stored


def test_an_arms_error_is_never_cached(served: Served) -> None:
    h, m = _counts(served, "router")
    x = RNG.normal(size=(2, N)).astype(np.float32)
    for i in range(3):
        with pytest.raises(InferenceServerException, match=r"arm 'broken'.*faulty engine"):
            _infer(served, "router", x, arm="broken")
        _counted(served, "router", h, m + 2 * (i + 1))  # looked up, missed, not stored
    out = _infer(served, "router", x, arm="control")  # the same rows on a working arm
    np.testing.assert_allclose(out["score"], _oracle("alpha", x), atol=1e-5)
    _counted(served, "router", h, m + 8)


def test_a_new_experiment_version_never_serves_an_older_answer(served: Served) -> None:
    x = RNG.normal(size=(1, N)).astype(np.float32)
    h, m = _counts(served, "router")
    v1 = _infer(served, "router", x, arm="control")
    v1_again = _infer(served, "router", x, arm="control")
    _counted(served, "router", h + 1, m + 1)
    _same(v1_again, v1)
    try:
        _set(served, "router", _experiment(HALF, {"control": 0.9, "treatment": 0.1}))
        v2 = _infer(served, "router", x, arm="control")
        assert v2["experiment_version"].tolist() == [[2]]
        _counted(served, "router", h + 1, m + 2)  # computed again under v2: a miss
        np.testing.assert_allclose(v2["score"], _oracle("alpha", x), atol=1e-5)
        # The same version number, the arm now on another model: its answer, never alpha's.
        moved = _experiment(HALF, {"control": 0.9, "treatment": 0.1}, control="beta")
        _set(served, "router", moved)
        other = _infer(served, "router", x, arm="control")
        assert other["model"].tolist() == [[b"beta:1"]]
        np.testing.assert_allclose(other["score"], _oracle("beta", x), atol=1e-5)
        _counted(served, "router", h + 1, m + 3)
    finally:
        _set(served, "router", _experiment(HALF))
    back = _infer(served, "router", x, arm="control")
    _same(back, v1)
    _counted(served, "router", h + 1, m + 4)  # v1 again: a new start, never v2's entries


def test_a_new_arm_version_never_serves_an_older_answer(served: Served) -> None:
    """decide loads alpha:2 from disk (here: beta's engine published as alpha version 2)."""
    v2_folder = served.repo / "alpha" / "2"
    shutil.copytree(served.repo / "beta" / "1", v2_folder)
    seal.seal_version(v2_folder)  # published as the build would
    x = RNG.normal(size=(1, N)).astype(np.float32)
    h, m = _counts(served, "decide")
    old = _infer(served, "decide", x, arm="control")
    assert old["model"].tolist() == [[b"alpha:1"]]
    _same(_infer(served, "decide", x, arm="control"), old)
    _counted(served, "decide", h + 1, m + 1)
    try:
        _set(served, "decide", _experiment(HALF, broken=False, alpha=2))
        new = _infer(served, "decide", x, arm="control")
        assert new["model"].tolist() == [[b"alpha:2"]]
        np.testing.assert_allclose(new["score"], _oracle("beta", x), atol=1e-5)
        want_signal, _ = signal.decide(_oracle("beta", x).astype(np.float32), THRESHOLDS)
        assert new["signal"].reshape(-1).tolist() == want_signal.tolist()
        _counted(served, "decide", h + 1, m + 2)
    finally:
        _set(served, "decide", _experiment(HALF, broken=False))
    _same(_infer(served, "decide", x, arm="control"), old)
    _counted(served, "decide", h + 1, m + 3)
    shutil.rmtree(v2_folder)


def test_the_byte_cap_holds_through_a_flood_of_distinct_rows(served: Served) -> None:
    size = N * 4 + ENTRY_OVERHEAD_BYTES  # what one entry is counted as
    rows, batches = 200, 30  # 6,000 distinct rows: ~1.1 MB uncapped, 17x the cap
    h, m = _counts(served, "decide_small")
    for _ in range(batches):
        x = RNG.normal(size=(rows, N)).astype(np.float32)
        _infer(served, "decide_small", x, [b"flood-%d" % i for i in range(rows)])
    want_clears = rows * batches * size // SMALL_BYTES - 1

    def settled() -> tuple[float, float, float] | None:
        now = metric_series(
            served.server.metrics_url,
            "setsuna_router_cache_bytes",
            router="decide_small",
            stat="now",
        )
        peak = metric_series(
            served.server.metrics_url,
            "setsuna_router_cache_bytes",
            router="decide_small",
            stat="peak",
        )
        clears = metric_series(
            served.server.metrics_url, "setsuna_router_cache_clears_total", router="decide_small"
        )
        assert all(v <= SMALL_BYTES for v in now + peak), (now, peak)  # at every sample
        if clears and clears[0] >= want_clears:
            return now[0], peak[0], clears[0]
        return None

    now, peak, clears = wait_until("the cache filled up to its cap and was dropped", settled)
    assert SMALL_BYTES - rows * size < peak <= SMALL_BYTES, (now, peak, clears)
    _counted(served, "decide_small", h, m + rows * batches)  # every row distinct: no hit


def test_an_answer_expires_after_its_ttl(served: Served) -> None:
    model = "decide_small"
    x = RNG.normal(size=(1, N)).astype(np.float32)
    h, m = _counts(served, model)
    sent = time.monotonic()
    first = _infer(served, model, x, [b"ttl"])
    again = _infer(served, model, x, [b"ttl"])
    answered = time.monotonic()
    _same(again, first)
    if answered - sent < SMALL_TTL_MS / 1e3:  # both within the TTL: the second was a hit
        _counted(served, model, h + 1, m + 1)
        hits = h + 1
    else:  # a slow machine: the entry may have expired in between
        wait_until(f"{model} counted 2 lookups", lambda: sum(_counts(served, model)) == h + m + 2)
        hits = _counts(served, model)[0]
    # Stored before `first` answered; wait out the TTL from there on the same clock.
    left = SMALL_TTL_MS / 1e3 - (time.monotonic() - answered)
    threading.Event().wait(max(0.0, left) + 0.01)
    expired = _infer(served, model, x, [b"ttl"])
    _same(expired, first)
    wait_until(
        f"{model} counted the expired lookup as a miss",
        lambda: sum(_counts(served, model)) == h + m + 3,
    )
    assert _counts(served, model)[0] == hits, "an expired answer was served"
    _check_scores(first, x)
