"""The model pool against the real ``tritonserver`` 2.51: budget, LRU, TTL, pins, leases.

No mocks of Triton: models are real Python-backend models (their stubs real
processes, their memory real PSS), loads and unloads go through the
repository API with the admin token. Slow models block on gate files the test
creates (a load's ``initialize`` or a request's ``execute``), never on sleeps;
waits are conditions with a deadline, never a wall-time verdict. One server
serves the module; each test starts from nothing loaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from setsuna import models
from setsuna.client import Client, ClientSettings
from setsuna.errors import (
    ConfigError,
    ModelLoadingError,
    ModelNotReadyError,
    PoolFullError,
    ServerError,
)
from setsuna.pool import ModelPool, PoolSettings
from setsuna.server import (
    ADMIN_HEADER,
    GRPC_HEADER_PREFIX,
    LocalTriton,
    ServerSettings,
    find_tritonserver,
    free_ports,
)
from setsuna.server import main as server_main
from tests.helpers import build_logistic_models, metric_series, python_model, wait_until

try:
    find_tritonserver()
except ServerError as exc:  # pragma: no cover - CI without the serve extra
    pytest.skip(f"no tritonserver: {exc}", allow_module_level=True)

import tritonclient.grpc as grpcclient

W = np.random.default_rng(3).normal(size=4).astype(np.float32)
X = np.random.default_rng(4).normal(size=(300, 4)).astype(np.float32)
PLAIN = ("m1", "m2", "m3", "m4", "m5")

#: execute() waits for ``<gate>`` (a file the test creates) after touching ``<gate>.entered``.
GATED_EXECUTE = """\
import os, time
import triton_python_backend_utils as pb_utils

GATE = {gate!r}


class TritonPythonModel:
    def execute(self, requests):
        open(GATE + ".entered", "a").close()
        while not os.path.exists(GATE):
            time.sleep(0.002)  # the test opens the gate; this is the model waiting, not work
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", x.copy())]))
        return out
"""

#: initialize() waits for ``<gate>``: a load that takes as long as the test wants.
GATED_LOAD = """\
import os, time
import triton_python_backend_utils as pb_utils

GATE = {gate!r}


class TritonPythonModel:
    def initialize(self, args):
        open(GATE + ".entered", "a").close()
        while not os.path.exists(GATE):
            time.sleep(0.002)  # the test opens the gate; this is the load waiting, not work

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", x.copy())]))
        return out
"""


class Gates:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def close(self, name: str) -> None:
        for p in (self.path(name), self.path(name + ".entered")):
            p.unlink(missing_ok=True)

    def open(self, name: str) -> None:
        self.path(name).touch()

    def entered(self, name: str) -> bool:
        return self.path(name + ".entered").exists()


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Gates:
    return Gates(tmp_path_factory.mktemp("gates"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gates: Gates) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("pool")
    repo = build_logistic_models(root, {"logit": W}, X)
    for name in (*PLAIN, "pinned"):
        python_model(repo, name)
    for name in ("gated", "gated2"):
        python_model(repo, name, GATED_EXECUTE.format(gate=str(gates.path(name))))
    for name in ("slowload", "slowload2"):
        python_model(repo, name, GATED_LOAD.format(gate=str(gates.path(name))))
    with LocalTriton(ServerSettings.on_free_ports(repo, load_models=())) as srv:
        yield srv


def _states(server: LocalTriton) -> dict[str, str]:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        index = c.get_model_repository_index(headers=server.grpc_admin_headers, as_json=True)
    return {m["name"]: m.get("state", "") for m in index.get("models", [])}


@pytest.fixture(autouse=True)
def nothing_loaded(server: LocalTriton, gates: Gates) -> Iterator[None]:
    """Each test starts with no model loaded and every gate open (settled: no stub left)."""
    for name in ("gated", "gated2", "slowload", "slowload2"):
        gates.open(name)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        for name, state in _states(server).items():
            if state in ("READY", "LOADING"):
                c.unload_model(name, headers=server.grpc_admin_headers)
    wait_until(
        "every model unloaded",
        lambda: (
            not any(s in ("READY", "UNLOADING") for s in _states(server).values())
            and not models.stub_memory(server.pid or 0)
        ),
    )
    yield


def _pool(server: LocalTriton, budget_mb: float = 100_000.0, **settings: object) -> ModelPool:
    return ModelPool.for_server(server, PoolSettings(memory_budget_mb=budget_mb, **settings))  # type: ignore[arg-type]


def _client(server: LocalTriton, pool: ModelPool) -> Client:
    return Client(server.grpc_url, settings=ClientSettings(deadline_ms=120_000), pool=pool)


def _ready(pool: ModelPool) -> set[str]:
    return {m.name for m in pool.status().models if m.state == "READY"}


def _one_model_mb(server: LocalTriton) -> float:
    """What one identity model holds when it is alone (its stub's PSS, measured)."""
    with _pool(server) as pool:
        pool.load("m5")
        size = pool.status().ready_mb
        pool.evict("m5")
        pool.settle()
    assert size > 5, size  # a stub is tens of MiB
    return size


# --------------------------------------------------------------------------- budget


def test_the_budget_holds_once_every_eviction_settled(server: LocalTriton) -> None:
    one = _one_model_mb(server)
    budget = 2.5 * one
    with _pool(server, budget) as pool, _client(server, pool) as client:
        for name in PLAIN:
            out = client.infer(name, X[:2, :4])
            np.testing.assert_array_equal(out["score"], X[:2, :4])
            settled = pool.settle()
            assert settled.held_mb <= budget, settled
            # Independently of the pool's books: every live stub of the server, by PSS.
            stubs = sum(mib for mib, _ in models.stub_memory(server.pid or 0).values())
            assert stubs <= budget, (stubs, budget)
        assert pool.loads == len(PLAIN)
        ready = _ready(pool)
        assert pool.evictions >= 1 and pool.evictions + len(ready) == len(PLAIN)
        assert "m5" in ready and "m1" not in ready  # the newest stays, the oldest went


def test_a_model_that_cannot_fit_is_refused_naming_budget_and_size(server: LocalTriton) -> None:
    with _pool(server, 1.0) as pool:
        with pytest.raises(PoolFullError, match=r"m1 \(\d+ MiB measured\).*budget of 1 MiB"):
            pool.load("m1")
        assert "m1" not in _ready(pool)
        assert not PoolFullError.retryable


def test_an_unknown_model_is_not_ready(server: LocalTriton) -> None:
    with _pool(server) as pool, pytest.raises(ModelNotReadyError, match="could not load"):
        pool.load("no_such_model")


# --------------------------------------------------------------------------- LRU, TTL, pins


def test_the_least_recently_used_model_goes_first(server: LocalTriton) -> None:
    with _pool(server) as loader, _client(server, loader) as client:
        for name in ("m1", "m2", "m3", "m1"):  # m2 is now the least recently used
            client.infer(name, X[:1, :4])
        held = loader.status().ready_mb
    one = held / 3
    # A new pool (another process, say) knows the order only from Triton's statistics.
    with _pool(server, held + 0.5 * one) as pool:
        pool.load("m4")
        evicted = [e.model for e in pool.events if e.action == "evicted"]
        assert evicted[0] == "m2", evicted
        assert evicted[:2] in (["m2"], ["m2", "m3"]), evicted
        assert {"m1", "m4"} <= _ready(pool)


def test_an_idle_model_leaves_after_its_ttl_and_a_pinned_one_never(server: LocalTriton) -> None:
    settings = {"idle_ttl_s": 0.5, "check_interval_s": 0.1, "pinned": ("pinned",)}
    with _pool(server, **settings) as pool, _client(server, pool) as client:
        assert "pinned" in _ready(pool)  # loaded at start
        client.infer("m1", X[:1, :4])
        wait_until("m1 evicted as idle", lambda: "m1" not in _ready(pool))
        assert any(e.model == "m1" and "idle" in e.reason for e in pool.events)
        assert "pinned" in _ready(pool)
        assert not any(e.model == "pinned" and e.action == "evicted" for e in pool.events)
        with pytest.raises(ModelNotReadyError, match="pinned"):
            pool.evict("pinned")


def test_a_pinned_model_is_not_evicted_for_the_budget(server: LocalTriton) -> None:
    one = _one_model_mb(server)
    with _pool(server, 1.3 * one, pinned=("pinned",)) as pool:
        with pytest.raises(PoolFullError, match=r"pinned \['pinned'\]"):
            pool.load("m1")
        assert _ready(pool) == {"pinned"}


# --------------------------------------------------------------------------- in flight


def test_a_model_with_a_request_in_flight_is_not_evicted(server: LocalTriton, gates: Gates) -> None:
    gates.close("gated")
    with (
        _pool(server, idle_ttl_s=0.2, check_interval_s=0.05) as pool,
        _client(server, pool) as client,
    ):
        got: dict[str, object] = {}
        call = threading.Thread(target=lambda: got.update(out=client.infer("gated", X[:1, :4])))
        call.start()
        try:
            wait_until("the request is executing", lambda: gates.entered("gated"))
            with pytest.raises(ModelNotReadyError, match=r"1 call\(s\) in flight"):
                pool.evict("gated")
            # The TTL thread has passed over it many times meanwhile.
            checks = pool.checks
            wait_until("three TTL passes", lambda: pool.checks >= checks + 3)
            assert "gated" in _ready(pool)
        finally:
            gates.open("gated")
            call.join()
        assert "out" in got  # the call finished
        wait_until("evicted once idle", lambda: "gated" not in _ready(pool))


def test_another_process_queued_request_holds_the_model(server: LocalTriton, gates: Gates) -> None:
    """A request from a plain tritonclient (no lease) is seen through Triton's pending gauge."""
    gates.close("gated2")
    with _pool(server) as pool:
        pool.load("gated2")

        def send() -> None:
            with grpcclient.InferenceServerClient(server.grpc_url) as c:
                inp = grpcclient.InferInput("features", [1, 4], "FP32")
                inp.set_data_from_numpy(X[:1, :4])
                c.infer("gated2", [inp])

        calls = [threading.Thread(target=send) for _ in range(2)]
        for t in calls:
            t.start()
        try:
            wait_until("one executing", lambda: gates.entered("gated2"))
            wait_until(
                "one queued",
                lambda: (
                    sum(
                        metric_series(
                            server.metrics_url, "nv_inference_pending_request_count", model="gated2"
                        )
                    )
                    >= 1
                ),
            )
            with pytest.raises(ModelNotReadyError, match="1 queued in Triton"):
                pool.evict("gated2")
        finally:
            gates.open("gated2")
            for t in calls:
                t.join()
        assert pool.evict("gated2")


# --------------------------------------------------------------------------- load on request


def test_an_evicted_model_is_loaded_by_its_first_request(server: LocalTriton) -> None:
    with _pool(server) as pool, _client(server, pool) as client:
        assert "m3" not in _ready(pool)
        out = client.infer("m3", X[:3, :4], deadline_ms=120_000)
        np.testing.assert_array_equal(out["score"], X[:3, :4])
        assert pool.loads == 1 and "m3" in _ready(pool)
        client.infer("m3", X[:1, :4])  # loaded: no second load
        assert pool.loads == 1
        # An ONNX Runtime model published by the real build, too.
        logit = client.infer("logit", X[:2, :4], deadline_ms=120_000)
        want = 1 / (1 + np.exp(-(X[:2, :4].astype(np.float64) @ W)))
        np.testing.assert_allclose(logit["score"].ravel(), want, rtol=1e-5)


def test_a_model_someone_else_unloaded_is_loaded_again_by_the_next_call(
    server: LocalTriton,
) -> None:
    pool = _pool(server)  # not started: no background pass to notice the unload first
    try:
        with _client(server, pool) as client:
            client.infer("m2", X[:1, :4])
            with grpcclient.InferenceServerClient(server.grpc_url) as other:
                other.unload_model("m2", headers=server.grpc_admin_headers)
            wait_until("m2 unloaded", lambda: _states(server)["m2"] == "UNAVAILABLE")
            out = client.infer("m2", X[:2, :4])  # the pool still had it READY: told, reloads
            np.testing.assert_array_equal(out["score"], X[:2, :4])
            assert pool.loads == 2
    finally:
        pool.stop()


def test_a_load_longer_than_the_deadline_is_a_retryable_loading_error(
    server: LocalTriton, gates: Gates
) -> None:
    gates.close("slowload")
    with _pool(server) as pool, _client(server, pool) as client:
        with pytest.raises(ModelLoadingError, match=r"slowload is loading.*retry") as err:
            client.infer("slowload", X[:1, :4], deadline_ms=200)
        assert err.value.retryable
        wait_until("the load runs on", lambda: gates.entered("slowload"))
        gates.open("slowload")  # the load goes on after the caller gave up
        out = client.infer("slowload", X[:1, :4], deadline_ms=120_000)
        np.testing.assert_array_equal(out["score"], X[:1, :4])
        assert [e.action for e in pool.events if e.model == "slowload"] == ["loaded"]


def test_concurrent_first_requests_cause_one_load(server: LocalTriton, gates: Gates) -> None:
    gates.close("slowload2")
    with _pool(server) as pool:
        errors: list[BaseException] = []

        def lease() -> None:
            try:
                pool.load("slowload2", deadline_s=120)
            except BaseException as exc:
                errors.append(exc)

        first = threading.Thread(target=lease)
        first.start()
        wait_until("the load started", lambda: gates.entered("slowload2"))
        others = [threading.Thread(target=lease) for _ in range(3)]
        for t in others:
            t.start()
        gates.open("slowload2")
        for t in (first, *others):
            t.join()
        assert not errors
        assert [e.action for e in pool.events if e.model == "slowload2"] == ["loaded"]
        assert pool.loads == 1


# --------------------------------------------------------------------------- the token, settings


def test_without_the_admin_token_every_command_is_refused(server: LocalTriton) -> None:
    settings = PoolSettings(memory_budget_mb=100)
    with pytest.raises(ServerError, match="SETSUNA_ADMIN_TOKEN"):
        ModelPool(server.grpc_url, {}, settings, server_pid=server.pid)
    wrong = {k: "not-the-token-0123456789" for k in server.grpc_admin_headers}
    with pytest.raises(ServerError, match=r"refused the admin token.*SETSUNA_ADMIN_TOKEN"):
        ModelPool(server.grpc_url, wrong, settings, server_pid=server.pid)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"memory_budget_mb": 0}, "memory_budget_mb=0: give the MiB"),
        ({"memory_budget_mb": -5}, "memory_budget_mb=-5"),
        ({"memory_budget_mb": float("nan")}, "memory_budget_mb=nan"),
        ({"memory_budget_mb": True}, "memory_budget_mb=True"),
        ({"memory_budget_mb": "512"}, "memory_budget_mb='512'"),
        ({"memory_budget_mb": 64, "idle_ttl_s": -1}, "idle_ttl_s=-1: give seconds >= 0"),
        ({"memory_budget_mb": 64, "load_timeout_s": 0}, "load_timeout_s=0: give a number"),
        ({"memory_budget_mb": 64, "check_interval_s": 0}, "check_interval_s=0"),
        ({"memory_budget_mb": 64, "pinned": "m1"}, "pinned='m1': give a tuple"),
        ({"memory_budget_mb": 64, "pinned": ("m1", "m1")}, "pinned lists a model twice"),
        ({"memory_budget_mb": 64, "pinned": ("a b",)}, "pinned model 'a b'"),
    ],
)
def test_bad_settings_are_refused_saying_what_to_give(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        PoolSettings(**settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------ python -m setsuna.server


def test_the_supervisor_runs_the_pool_on_models_loaded_by_anyone(tmp_path: Path) -> None:
    """``--memory-budget-mb --pin --idle-ttl-s``: pins loaded at start, the rest not; a model
    someone else loads is unloaded once idle; the pinned one stays."""
    repo = tmp_path / "repo"
    for name in ("keep", "idle"):
        python_model(repo, name)
    token = "pool-test-token-" + "x" * 12
    env = dict(os.environ, SETSUNA_ADMIN_TOKEN=token, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    http, grpc, metrics = free_ports(3)
    argv = [sys.executable, "-m", "setsuna.server", "--model-repository", str(repo)]
    argv += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    argv += ["--memory-budget-mb", "500", "--pin", "keep", "--idle-ttl-s", "0.5"]
    headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: token}
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # blocks until the pool's line (or the process exits)
            lines.append(line)
            if line.startswith("  pool"):
                break
        assert "budget 500 MiB, idle TTL 0.5 s, pinned ['keep']" in lines[-1], "".join(lines)
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as c:

                def states() -> dict[str, str]:
                    index = c.get_model_repository_index(headers=headers, as_json=True)
                    return {m["name"]: m.get("state", "") for m in index["models"]}

                assert states() == {"keep": "READY", "idle": ""}  # only the pin at start
                c.load_model("idle", headers=headers)  # loaded by someone else
                wait_until("idle unloaded by the TTL", lambda: states()["idle"] != "READY")
                assert states()["keep"] == "READY"
        finally:
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pin", "m1"], "--pin and --idle-ttl-s need --memory-budget-mb"),
        (["--idle-ttl-s", "5"], "need --memory-budget-mb"),
        (["--memory-budget-mb", "0"], "memory_budget_mb=0.0: give the MiB"),
        (["--memory-budget-mb", "64", "--pin", "m1", "--pin", "m1"], "pinned lists a model twice"),
    ],
)
def test_the_supervisor_refuses_bad_pool_flags(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    python_model(tmp_path / "repo", "m1")
    assert server_main(["--model-repository", str(tmp_path / "repo"), *flags]) == 2
    assert message in capsys.readouterr().err
