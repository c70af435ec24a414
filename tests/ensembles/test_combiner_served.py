"""The combiner as it ships (dynamic batching, one synchronous execute) on the real Triton.

Engines alpha and beta are small logistic models (numpy oracle); ``stuck``
is a Python model that blocks in every execute until the test writes a byte
to its FIFO, so "a member hangs" and "the combiner's instance is busy" are
events, not sleeps. On top:

- ``combiner`` (alpha, beta; batching on, one instance, like the example);
- ``gated`` (alpha, stuck; a patient timeout): holds its only instance while
  the test queues requests behind it, so the next execute takes them all;
- ``waiting`` (alpha, stuck; calls time out after 300 ms, 2 overdue at most);
- ``local`` (alpha, beta run in its own process, like the example combiner).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ensembles import repository as rep
from ensembles.limits import Limits
from reliability.stuck import Gate, stuck_model
from setsuna import seal
from setsuna.errors import ConfigError, SetsunaError
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models, wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

N = 5
RNG = np.random.default_rng(23)
W = {name: RNG.normal(size=N).astype(np.float32) for name in ("alpha", "beta")}
PATIENT = Limits(bls_timeout_ms=60_000)
PATIENT_US = 60_000_000  # a request timeout no loaded machine reaches
BATCHED = rep.Serving(instances=1, dynamic_batching=True)  # no queue policy: see Measuring


@dataclass
class Served:
    server: LocalTriton
    gate: Gate
    repo: Path

    def client(self) -> Any:
        return grpcclient.InferenceServerClient(self.server.grpc_url)


def _members(*names: str) -> dict[str, Any]:
    weights = (3.0, 1.0)
    return {
        "format": 1,
        "method": "mean",
        "members": [
            {"model": n, "version": 1, "weight": w} for n, w in zip(names, weights, strict=True)
        ],
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("combiner")
    repo = build_logistic_models(root, W, RNG.normal(size=(400, N)).astype(np.float32))
    gate = stuck_model(repo, root, N)
    files = root / "files"
    files.mkdir()
    (files / "ab.json").write_text(json.dumps(_members("alpha", "beta")))
    (files / "stuck.json").write_text(json.dumps(_members("alpha", "stuck")))
    rep.write_combiner(repo, files / "ab.json", N, serving=BATCHED, limits=PATIENT)
    rep.write_combiner(repo, files / "stuck.json", N, name="gated", serving=BATCHED, limits=PATIENT)
    hasty = Limits(bls_timeout_ms=300, max_overdue_calls=2)
    rep.write_combiner(repo, files / "stuck.json", N, name="waiting", serving=BATCHED, limits=hasty)
    fast = Limits(watch_interval_ms=50)
    rep.write_combiner(
        repo, files / "ab.json", N, name="local", serving=BATCHED, limits=fast, in_process=True
    )
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as server:
        yield Served(server, gate, repo)
    gate.close()


def _infer(
    s: Served,
    model: str,
    x: np.ndarray,
    *,
    outputs: tuple[str, ...] = (),
    timeout_us: int | None = PATIENT_US,
) -> Any:
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    with s.client() as c:
        return c.infer(model, [inp], outputs=wanted, timeout=timeout_us, client_timeout=120)


def _oracle(name: str, x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) @ W[name].astype(np.float64)
    return (1.0 / (1.0 + np.exp(-z))).reshape(-1, 1)


def _pending(s: Served, model: str) -> float:
    """Requests of ``model`` waiting in Triton's queue (nv_inference_pending_request_count)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(s.server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _executions(s: Served, model: str) -> int:
    with s.client() as c:
        stats = c.get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("execution_count", 0))


def test_requests_batched_into_one_execute_each_get_their_own_rows(served: Served) -> None:
    """One execute, one call per member for every queued request; answers split back right."""
    g = served.gate
    g.drain()
    sizes = [1, 3, 1, 2, 5, 1, 4, 2]
    xs = [RNG.normal(size=(n, N)).astype(np.float32) for n in sizes]
    first = RNG.normal(size=(2, N)).astype(np.float32)
    with ThreadPoolExecutor(len(sizes) + 1) as pool:
        head = pool.submit(_infer, served, "gated", first)
        g.wait_started()  # the only instance is now busy inside execute
        rest: list[Future[Any]] = [pool.submit(_infer, served, "gated", x) for x in xs]
        wait_until("every request queued", lambda: _pending(served, "gated") >= len(sizes))
        g.open()  # the first execute ends; the batcher hands the rest over at once
        g.wait_started()
        g.open()
        answers = [f.result(timeout=120) for f in (head, *rest)]
    assert g.drain() == 0, "stuck ran more than twice: the queued requests were not batched"
    for x, r in zip((first, *xs), answers, strict=True):
        want = 0.75 * _oracle("alpha", x) + 0.25 * 0.5
        np.testing.assert_allclose(r.as_numpy("score"), want, atol=1e-6)
        assert r.as_numpy("models").reshape(-1).tolist() == [b"alpha:1,stuck:1"] * len(x)


def test_concurrent_requests_get_the_weighted_average_of_their_own_rows(served: Served) -> None:
    xs = [RNG.normal(size=(1 + i % 4, N)).astype(np.float32) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda x: _infer(served, "combiner", x), xs))
    for x, r in zip(xs, answers, strict=True):
        want = 0.75 * _oracle("alpha", x) + 0.25 * _oracle("beta", x)
        np.testing.assert_allclose(r.as_numpy("score"), want, atol=1e-6)
        assert r.as_numpy("models").reshape(-1).tolist() == [b"alpha:1,beta:1"] * len(x)


def test_models_is_built_only_when_asked_for(served: Served) -> None:
    x = RNG.normal(size=(3, N)).astype(np.float32)
    only = _infer(served, "combiner", x, outputs=("score",))
    assert only.as_numpy("models") is None
    both = _infer(served, "combiner", x, outputs=("score", "models"))
    np.testing.assert_array_equal(both.as_numpy("score"), only.as_numpy("score"))
    assert both.as_numpy("models").reshape(-1).tolist() == [b"alpha:1,beta:1"] * 3


def test_a_member_that_never_answers_fails_the_batch_within_its_bound(served: Served) -> None:
    g = served.gate
    g.drain()
    x = RNG.normal(size=(2, N)).astype(np.float32)
    # 1. No timeout on the request: the combiner's bls_timeout_ms (300 ms).
    with pytest.raises(
        InferenceServerException,
        match=r"waiting: member stuck:1 did not answer within 300 ms \(bls_timeout_ms\)",
    ):
        _infer(served, "waiting", x, timeout_us=None)
    g.wait_started()  # it really is stuck in there
    # 2. The request's own timeout wins (this call waits in stuck's queue behind the first).
    with pytest.raises(InferenceServerException, match=r"within 400 ms \(the request's timeout\)"):
        _infer(served, "waiting", x, timeout_us=400_000)
    # 3. Two calls overdue (max_overdue_calls=2): the next fails at once, whatever its
    # timeout, and calls no member (alpha's answer would be thrown away).
    before = _executions(served, "alpha")
    with pytest.raises(
        InferenceServerException, match="member alpha:1 not called: stuck:1 has 2 calls unanswered"
    ):
        _infer(served, "waiting", x)
    assert _executions(served, "alpha") == before
    # The other combiner, on the same members but alpha, still answers.
    out = _infer(served, "combiner", x)
    want = 0.75 * _oracle("alpha", x) + 0.25 * _oracle("beta", x)
    np.testing.assert_allclose(out.as_numpy("score"), want, atol=1e-6)
    g.open(3)  # the two overdue calls, and one more

    def answered() -> bool:
        try:
            return _infer(served, "waiting", x).as_numpy("score") is not None
        except InferenceServerException as exc:
            assert "unanswered" in str(exc), exc  # only the fail-fast may happen meanwhile
            return False

    wait_until("the stuck member is called again once it answered", answered)
    g.drain()


def test_the_example_combiner_batches_without_a_queue_policy() -> None:
    """A queue policy turns off 2.51's prefetching and brings the ~500 ms stalls back."""
    from tritonclient.grpc import model_config_pb2 as mc

    from ensembles.__main__ import COMBINER_SERVING
    from setsuna.model_config import batching_hazards

    cfg = mc.ModelConfig(name="combiner", backend="python")
    COMBINER_SERVING.apply(cfg)
    assert cfg.HasField("dynamic_batching")
    assert batching_hazards(cfg) == []
    # allow_timeout_override alone turns prefetching off too (scheduler_utils.cc, r24.10)
    assert not cfg.dynamic_batching.default_queue_policy.allow_timeout_override
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0


def test_in_process_members_answer_like_their_own_models(served: Served) -> None:
    """The example layout: one hop, the members' engines inside the combiner."""
    xs = [RNG.normal(size=(1 + i % 4, N)).astype(np.float32) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        local = list(pool.map(lambda x: _infer(served, "local", x), xs))
        via_bls = list(pool.map(lambda x: _infer(served, "combiner", x), xs))
    for x, a, b in zip(xs, local, via_bls, strict=True):
        want = 0.75 * _oracle("alpha", x) + 0.25 * _oracle("beta", x)
        np.testing.assert_allclose(a.as_numpy("score"), want, atol=1e-6)
        np.testing.assert_allclose(a.as_numpy("score"), b.as_numpy("score"), atol=1e-7)
        assert a.as_numpy("models").reshape(-1).tolist() == [b"alpha:1,beta:1"] * len(x)


def _set_members(s: Served, model: str, doc: dict[str, Any]) -> None:
    """Replace a combiner's member file in one step, as an operator should (temp + rename)."""
    path = s.repo / model / rep.MEMBERS_FILE
    tmp = path.with_name(".members.json.tmp")
    tmp.write_text(json.dumps(doc))
    st = tmp.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new stamp, always
    tmp.replace(path)


def test_in_process_members_load_no_engine_a_trusted_publisher_did_not_seal(
    served: Served,
) -> None:
    """Engines run in the combiner's process are checked as their own stubs would check them."""
    forged = served.repo / "forged"
    shutil.copytree(served.repo / "alpha", forged)
    config = forged / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "alpha"', 'name: "forged"'))
    seal.seal_model(forged, Ed25519PrivateKey.generate())  # signed, but by an outsider
    log = served.server.log_path
    assert log is not None
    try:
        _set_members(served, "local", _members("forged", "beta"))
        wait_until("the log names the untrusted seal", lambda: "not trusted" in log.read_text())
        x = RNG.normal(size=(3, N)).astype(np.float32)
        out = _infer(served, "local", x)  # the previous members keep serving
        assert out.as_numpy("models").reshape(-1).tolist() == [b"alpha:1,beta:1"] * 3
        want = 0.75 * _oracle("alpha", x) + 0.25 * _oracle("beta", x)
        np.testing.assert_allclose(out.as_numpy("score"), want, atol=1e-6)
    finally:
        _set_members(served, "local", _members("alpha", "beta"))
        shutil.rmtree(forged)


def test_an_in_process_combiner_needs_its_members_built(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps(_members("alpha", "beta")))
    (tmp_path / "repo").mkdir()
    with pytest.raises(ConfigError, match=r"member alpha:1 is not in the model repository"):
        rep.write_combiner(tmp_path / "repo", tmp_path / "m.json", N, in_process=True)


def test_a_boolean_parameter_that_is_not_true_or_false_refuses_to_load(
    served: Served, tmp_path: Path
) -> None:
    """`in_process: "yes"` used to read as false, silently serving through BLS."""
    repo = tmp_path / "repo"
    for name in ("alpha", "beta"):
        shutil.copytree(served.repo / name, repo / name)
    (tmp_path / "m.json").write_text(json.dumps(_members("alpha", "beta")))
    folder = rep.write_combiner(repo, tmp_path / "m.json", N, in_process=True)
    config = folder / "config.pbtxt"
    before = 'key: "in_process"\n  value {\n    string_value: "true"'
    text = config.read_text()
    assert before in text
    config.write_text(text.replace(before, before.replace('"true"', '"yes"')))
    seal.seal_model(folder)  # a publisher's mistake, not tampering: signed as usual
    server = LocalTriton.on_free_ports(
        repo, load_models=("combiner",), log_path=tmp_path / "triton.log"
    )
    with pytest.raises(SetsunaError, match="combiner"):
        server.start()
    server.stop()
    assert "in_process='yes': give true or false" in (tmp_path / "triton.log").read_text()
