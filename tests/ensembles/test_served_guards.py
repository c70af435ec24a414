"""The routers' bounds on the real local Triton: keys, loops, names, timeouts, one version.

Engines alpha and beta are small logistic models (numpy oracle); ``stuck`` is
a Python model that blocks in every execute until the test writes a byte to
its FIFO, so "the downstream model hangs" is an event, not a sleep. On top:

- ``router`` (1 instance, a 64 KiB key memo) over alpha and beta, the
  ``signal`` and the ``decision`` ensemble (router -> signal);
- ``waiting`` (calls time out after 300 ms, 2 overdue at most) over alpha
  and ``stuck``;
- ``decide`` (2 instances, arms in process) over alpha and beta.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ensembles import repository as rep
from ensembles import signal
from ensembles.limits import Limits
from reliability.stuck import Gate, stuck_model
from setsuna import seal
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, ExperimentVersion, Target
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models, metric_series, wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

N = 4
RNG = np.random.default_rng(5)
W = {name: RNG.normal(size=N).astype(np.float32) for name in ("alpha", "beta")}
CACHE_BYTES = 64 << 10
PATIENT_US = 60_000_000  # a request timeout no loaded machine reaches


@dataclass
class Served:
    server: LocalTriton
    repo: Path
    root: Path
    gate: Gate

    def client(self) -> Any:
        return grpcclient.InferenceServerClient(self.server.grpc_url)


def _experiment(*weights: dict[str, float], **arms: str) -> dict[str, Any]:
    """The document as the contract writes it (not validated: tests also write bad ones)."""
    return ExperimentDoc(
        "guards",
        "guards-2026",
        {arm: Target(model, 1) for arm, model in arms.items()},
        tuple(ExperimentVersion(i + 1, w) for i, w in enumerate(weights)),
    ).to_json()


AB = {"control": "alpha", "treatment": "beta"}
HALF = {"control": 0.5, "treatment": 0.5}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("guards")
    repo = build_logistic_models(root, W, RNG.normal(size=(400, N)).astype(np.float32))
    gate = stuck_model(repo, root, N)
    files = root / "files"
    files.mkdir()
    patient = Limits(bls_timeout_ms=60_000, max_key_cache_bytes=CACHE_BYTES, watch_interval_ms=50)
    one = rep.Serving(instances=1)
    (files / "ab.json").write_text(json.dumps(_experiment(HALF, **AB)))
    rep.write_router(repo, files / "ab.json", N, serving=one, limits=patient)
    rep.write_signal(repo, {1: signal.Thresholds()}, serving=one)
    rep.write_decision(repo, N)
    waiting = _experiment({"control": 1.0}, control="alpha", stuck="stuck")
    (files / "waiting.json").write_text(json.dumps(waiting))
    hasty = Limits(bls_timeout_ms=300, max_overdue_calls=2)
    rep.write_router(repo, files / "waiting.json", N, name="waiting", serving=one, limits=hasty)
    rep.write_router(
        repo,
        files / "ab.json",
        N,
        name="decide",
        in_process=True,
        thresholds=signal.Thresholds(),
        serving=rep.Serving(instances=2),
        limits=patient,
    )
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as server:
        yield Served(server, repo, root, gate)
    gate.close()


def _inputs(x: np.ndarray, keys: list[bytes] | None) -> list[Any]:
    inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if keys is not None:
        k = grpcclient.InferInput("key", [len(keys), 1], "BYTES")
        k.set_data_from_numpy(np.array([[k] for k in keys], dtype=np.object_))
        inputs.append(k)
    return inputs


def _infer(
    s: Served,
    model: str,
    x: np.ndarray,
    keys: list[bytes] | None = None,
    *,
    timeout_us: int | None = PATIENT_US,
    outputs: tuple[str, ...] = (),
    **params: Any,
) -> Any:
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    with s.client() as c:
        return c.infer(
            model,
            _inputs(x, keys),
            outputs=wanted,
            parameters=params or None,
            timeout=timeout_us,
            client_timeout=120,
        )


def _oracle(name: str, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ W[name].astype(np.float64))))


def _set(s: Served, model: str, doc: dict[str, Any] | str) -> None:
    """Replace the model's experiment file in one step, as an operator should (temp + rename)."""
    path = s.repo / model / EXPERIMENT_FILE
    tmp = path.with_name(".experiment.json.tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    st = tmp.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new stamp, always
    tmp.replace(path)


def _stub_rss_kib(s: Served, model: str) -> int:
    """Resident memory of the model's (first) Python stub process."""
    needle = f"{s.repo}/{model}/1/model.py".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        except OSError:
            continue
    raise AssertionError(f"no stub process for {model}")


# -- keys ----------------------------------------------------------------------------


def test_a_key_longer_than_max_key_bytes_fails_its_request_alone(served: Served) -> None:
    x = RNG.normal(size=(2, N)).astype(np.float32)
    with pytest.raises(InferenceServerException, match=r"row 1 is 257 bytes.*max_key_bytes=256"):
        _infer(served, "router", x, [b"ok", b"k" * 257])
    huge = b"k" * (256 << 10)  # the keys: 256 KiB each
    with pytest.raises(InferenceServerException, match=r"262144 bytes.*max_key_bytes=256") as err:
        _infer(served, "router", x[:1], [huge])
    assert "INVALID_ARGUMENT" in str(err.value.status())
    with pytest.raises(InferenceServerException, match=r"request parameter 'key'.*max_key_bytes"):
        _infer(served, "router", x[:1], key="p" * 300)
    out = _infer(served, "router", x, [b"ok", b"k" * 256])  # at the limit: served
    assert out.as_numpy("score").shape == (2, 1)


def test_the_key_memo_stays_under_its_byte_cap_through_a_flood(served: Served) -> None:
    before_kib = _stub_rss_kib(served, "router")
    rows = 500
    x = RNG.normal(size=(rows, N)).astype(np.float32)
    for batch in range(40):  # 20,000 distinct 256-byte keys: ~7 MB held by the memo uncapped
        keys = [b"%05d-%06d-" % (batch, i) + b"k" * 243 for i in range(rows)]
        _infer(served, "router", x, keys)
    after_kib = _stub_rss_kib(served, "router")

    def settled() -> tuple[float, float] | None:
        peak = metric_series(
            served.server.metrics_url,
            "setsuna_router_key_cache_bytes",
            router="router",
            stat="peak",
        )
        clears = metric_series(
            served.server.metrics_url, "setsuna_router_key_cache_clears_total", router="router"
        )
        assert all(p <= CACHE_BYTES for p in peak), peak  # never above the cap, at any sample
        return (peak[0], clears[0]) if peak and clears and clears[0] >= 50 else None

    peak, clears = wait_until("the memo was used up to its cap and dropped", settled)
    assert CACHE_BYTES // 2 < peak <= CACHE_BYTES, (peak, clears)
    print(f"router stub RSS {before_kib} KiB -> {after_kib} KiB over the flood")


# -- loops and names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("callee", "why"),
    [
        ("router", "router:1 is this model itself"),  # router -> router
        ("decision", "decision:1 is a Triton ensemble"),  # router -> decision -> router
        ("..", "not a Triton model name"),
    ],
)
def test_a_loop_or_a_bad_name_is_refused_like_any_bad_file(
    served: Served, callee: str, why: str
) -> None:
    failures = metric_series(
        served.server.metrics_url, "setsuna_router_reload_failures_total", router="router"
    )
    before = failures[0] if failures else 0.0
    _set(served, "router", _experiment(HALF, {**HALF, "loop": 0.0}, loop=callee, **AB))
    try:
        x = RNG.normal(size=(3, N)).astype(np.float32)
        out = _infer(served, "router", x, [b"a", b"b", b"c"])
        assert out.as_numpy("experiment_version").reshape(-1).tolist() == [1] * 3
        log = served.server.log_path
        assert log is not None
        wait_until(f"the log says {why!r}", lambda: why in log.read_text())
        after = metric_series(
            served.server.metrics_url, "setsuna_router_reload_failures_total", router="router"
        )
        assert after == [before + 1]
        # and the decision (router -> signal) keeps answering through the old experiment
        with served.client() as c:
            r = c.infer("decision", _inputs(x, [b"a", b"b", b"c"]))
        assert r.as_numpy("signal").shape == (3, 1)
    finally:
        _set(served, "router", _experiment(HALF, **AB))


def test_decide_loads_no_engine_from_outside_the_repository(served: Served) -> None:
    elsewhere = served.root / "elsewhere" / "alpha"
    shutil.copytree(served.repo / "alpha", elsewhere, dirs_exist_ok=True)
    link = served.repo / "linked"
    link.symlink_to(elsewhere)
    try:
        _set(served, "decide", _experiment({"control": 1.0}, control="linked", treatment="beta"))
        x = RNG.normal(size=(4, N)).astype(np.float32)
        for _ in range(4):  # both instances see the file: each refuses it
            out = _infer(served, "decide", x, [b"a", b"b", b"c", b"d"])
            assert out.as_numpy("experiment_version").reshape(-1).tolist() == [1] * 4
        log = served.server.log_path
        assert log is not None
        wait_until(
            "the log names the escape", lambda: "outside the model repository" in log.read_text()
        )
    finally:
        _set(served, "decide", _experiment(HALF, **AB))
        link.unlink()


def test_decide_loads_no_engine_a_trusted_publisher_did_not_seal(served: Served) -> None:
    """decide runs arms' engines in its own process: it checks their seal as a stub would."""
    forged = served.repo / "forged"
    shutil.copytree(served.repo / "alpha", forged)
    config = forged / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "alpha"', 'name: "forged"'))
    seal.seal_model(forged, Ed25519PrivateKey.generate())  # signed, but by an outsider
    try:
        _set(served, "decide", _experiment({"control": 1.0}, control="forged", treatment="beta"))
        x = RNG.normal(size=(4, N)).astype(np.float32)
        for _ in range(4):  # both instances see the file: each refuses it
            out = _infer(served, "decide", x, [b"a", b"b", b"c", b"d"])
            assert out.as_numpy("experiment_version").reshape(-1).tolist() == [1] * 4
        log = served.server.log_path
        assert log is not None
        wait_until("the log names the untrusted seal", lambda: "not trusted" in log.read_text())
    finally:
        _set(served, "decide", _experiment(HALF, **AB))
        shutil.rmtree(forged)


# -- timeouts ------------------------------------------------------------------------


def test_a_downstream_model_that_never_answers_times_out_and_the_router_goes_on(
    served: Served,
) -> None:
    x = RNG.normal(size=(2, N)).astype(np.float32)
    g = served.gate
    # 1. No timeout on the request: the router's bls_timeout_ms (300 ms).
    with pytest.raises(
        InferenceServerException, match=r"stuck:1 did not answer within 300 ms \(bls_timeout_ms\)"
    ):
        _infer(served, "waiting", x, arm="stuck", timeout_us=None)
    g.wait_started()  # it really is stuck in there
    # 2. The request's own timeout wins (this one waits in Triton's queue behind the first).
    with pytest.raises(InferenceServerException, match=r"within 400 ms \(the request's timeout\)"):
        _infer(served, "waiting", x, arm="stuck", timeout_us=400_000)
    # 3. Two calls overdue (max_overdue_calls=2): the next fails at once, whatever its timeout.
    with pytest.raises(InferenceServerException, match="stuck:1 has 2 calls unanswered"):
        _infer(served, "waiting", x, arm="stuck")
    # The router still answers through its other arm, and the decision of a router too.
    out = _infer(served, "waiting", x, arm="control")
    np.testing.assert_allclose(out.as_numpy("score").reshape(-1), _oracle("alpha", x), atol=1e-5)
    # Once the stuck calls come back, the model is called again.
    g.open(3)  # the two overdue calls, and one more

    def answered() -> bool:
        try:
            return _infer(served, "waiting", x, arm="stuck").as_numpy("score") is not None
        except InferenceServerException as exc:
            assert "unanswered" in str(exc), exc  # only the fail-fast may happen meanwhile
            return False

    wait_until("the stuck model is called again once it answered", answered)


# -- every instance on one version ---------------------------------------------------


def _heard(s: Served, model: str) -> dict[str, set[int]]:
    """One round of 16 concurrent requests: the versions each instance answered with."""
    x = RNG.normal(size=(1, N)).astype(np.float32)

    def one(i: int) -> tuple[str, int]:
        r = _infer(s, model, x, [b"k%d" % i], outputs=("experiment_version", "instance"))
        return r.as_numpy("instance")[0, 0].decode(), int(r.as_numpy("experiment_version")[0, 0])

    out: dict[str, set[int]] = {}
    with ThreadPoolExecutor(8) as pool:
        for instance, version in pool.map(one, range(16)):
            out.setdefault(instance, set()).add(version)
    return out


def _all_on(s: Served, model: str, version: int, instances: int = 2) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}

    def agreed() -> bool:
        seen.clear()
        seen.update(_heard(s, model))
        return len(seen) == instances and all(v == {version} for v in seen.values())

    try:
        wait_until(f"every instance of {model} answers with v{version}", agreed)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; instances answered {seen}") from None
    return seen


def test_instances_agree_on_the_newest_valid_version_after_a_bad_file(served: Served) -> None:
    """The issue: v1, traffic, v2, a bad file at once; one instance stayed on v1 for good."""
    _all_on(served, "decide", 1)
    _set(served, "decide", _experiment(HALF, {"control": 0.9, "treatment": 0.1}, **AB))
    x = RNG.normal(size=(1, N)).astype(np.float32)
    first = _infer(served, "decide", x, [b"k"], outputs=("experiment_version",))
    assert first.as_numpy("experiment_version")[0, 0] == 2  # one instance has seen v2
    _set(served, "decide", "{not json")
    try:
        _all_on(served, "decide", 2)
    finally:
        _set(served, "decide", _experiment(HALF, **AB))
    _all_on(served, "decide", 1)
