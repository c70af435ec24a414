"""Replica balancing, ejection, rejoin and hedge timing (setsuna.replicas), without Triton.

The choices of :class:`ReplicaSet` are checked directly; what reaches the
network is checked against real sockets: a port nobody listens on (refused at
once) and a listener that accepts and never answers (a hung replica).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from setsuna.client import AsyncClient, Client, ClientSettings
from setsuna.errors import (
    ConfigError,
    DeadlineError,
    ModelLoadingError,
    ModelNotReadyError,
    OverloadedError,
    RejectedInputError,
    UnavailableError,
)
from setsuna.replicas import (
    LatencyWindow,
    ReplicaSet,
    ReplicaSettings,
    ejects,
    fails_over,
    replica_settings,
)
from setsuna.server import free_ports


def _never(endpoint: str, models: tuple[str, ...]) -> bool:
    return False


def test_settings_are_checked_once_and_name_the_fix() -> None:
    assert replica_settings("127.0.0.1:8001").endpoints == ("127.0.0.1:8001",)
    assert replica_settings(["a:1", "b:2"]).endpoints == ("a:1", "b:2")
    bad = [
        ({"endpoints": ()}, "at least one"),
        ({"endpoints": ("a:1", "a:1")}, "each replica once"),
        ({"endpoints": ("grpc://a:1",)}, "without a scheme"),
        ({"endpoints": ("a",)}, "port 1-65535"),
        ({"endpoints": ("a:70000",)}, "port 1-65535"),
        ({"endpoints": "a:1"}, "not one string"),
        ({"endpoints": ("a:1",), "hedge_quantile": 1.0}, "e.g. 0.95"),
        ({"endpoints": ("a:1",), "reprobe_interval_ms": 0}, "reprobe_interval_ms"),
        ({"endpoints": ("a:1",), "hedge_min_samples": 0}, "hedge_min_samples"),
        ({"endpoints": ("a:1",), "latency_window": 1, "hedge_min_samples": 1}, "latency_window"),
    ]
    for kwargs, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            ReplicaSettings(**kwargs)  # type: ignore[arg-type]
    hedged = ReplicaSettings(("a:1", "b:2"), hedge_quantile=0.95)
    with pytest.raises(ConfigError, match="only tritonclient's gRPC client"):
        Client(hedged, protocol="http")
    with pytest.raises(ConfigError, match="without a scheme"):
        Client("http://127.0.0.1:8001")  # the single-url message is unchanged


def test_the_fewest_outstanding_wins_and_ties_go_round_robin() -> None:
    reps = ReplicaSet(ReplicaSettings(("a:1", "b:1", "c:1")), _never)
    assert [reps.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    reps.begin(0, "m")
    reps.begin(1, "m")
    assert {reps.pick() for _ in range(5)} == {2}  # the only idle one
    reps.begin(2, "m")
    reps.begin(2, "m")
    assert {reps.pick() for _ in range(6)} == {0, 1}  # 1 outstanding beats 2
    for i in (0, 1, 2, 2):
        reps.end(i)
    assert reps.snapshot().calls == {"a:1": 1, "b:1": 1, "c:1": 2}
    assert reps.pick(exclude=[0, 1], healthy_only=True) == 2
    assert reps.pick(exclude=[0, 1, 2], healthy_only=True) is None
    assert reps.pick(exclude=[0, 1, 2]) in (0, 1, 2)  # tried ones are the fallback


def test_only_the_replicas_fault_ejects_and_only_unrun_requests_fail_over() -> None:
    assert ejects(UnavailableError("x")) and ejects(ModelNotReadyError("dead stub"))
    assert not ejects(OverloadedError("x"))  # load, not health
    assert not ejects(ModelLoadingError("x")) and not ejects(DeadlineError("x"))
    assert not ejects(RejectedInputError("x"))
    for err in (UnavailableError("x"), OverloadedError("x"), ModelLoadingError("x")):
        assert fails_over(err, 1) and fails_over(err, 3)
    assert fails_over(ModelNotReadyError("x"), 3) and not fails_over(ModelNotReadyError("x"), 1)
    assert not fails_over(DeadlineError("x"), 3)  # the budget is spent
    assert not fails_over(RejectedInputError("x"), 3)  # the same input fails anywhere


def test_an_ejected_replica_is_skipped_and_rejoins_when_its_probe_says_ready() -> None:
    ready = threading.Event()
    asked: list[tuple[str, tuple[str, ...]]] = []

    def probe(endpoint: str, models: tuple[str, ...]) -> bool:
        asked.append((endpoint, models))
        return ready.is_set()

    reps = ReplicaSet(ReplicaSettings(("a:1", "b:1"), reprobe_interval_ms=10), probe)
    reps.begin(1, "logit")
    reps.end(1)
    reps.failed(1, UnavailableError("gone"))
    reps.failed(1, UnavailableError("gone again"))  # already out: counted once
    assert {reps.pick() for _ in range(4)} == {0}
    assert reps.pick(exclude=[0], healthy_only=True) is None
    time.sleep(0.1)
    assert asked and asked[0] == ("b:1", ("logit",))  # server and every called model
    assert reps.snapshot().healthy == {"a:1": True, "b:1": False}
    generation = reps.generation(1)
    ready.set()
    until = time.monotonic() + 5
    while not reps.snapshot().healthy["b:1"] and time.monotonic() < until:
        time.sleep(0.01)
    stats = reps.snapshot()
    assert stats.healthy["b:1"] and stats.ejections == 1 and stats.rejoins == 1
    assert reps.generation(1) == generation + 1  # clients open a fresh stub
    assert {reps.pick() for _ in range(4)} == {0, 1}
    reps.close()


def test_one_replica_is_never_ejected_and_starts_no_thread() -> None:
    before = threading.active_count()
    reps = ReplicaSet(ReplicaSettings(("a:1",)), _never)
    reps.failed(0, UnavailableError("gone"))
    assert reps.snapshot().ejections == 0 and reps.pick() == 0
    assert threading.active_count() == before


def test_the_hedge_waits_for_evidence_then_for_the_quantile() -> None:
    s = ReplicaSettings(("a:1", "b:1"), hedge_quantile=0.5, hedge_min_samples=4, latency_window=8)
    reps = ReplicaSet(s, _never)
    assert reps.hedge_delay_s("m", 1.0) is None  # no evidence yet
    for ms in (4.0, 5.0, 6.0, 200.0):
        reps.answered("m", ms)
    assert reps.hedge_delay_s("m", 1.0) == pytest.approx(5.5e-3)
    assert reps.hedge_delay_s("m", 0.004) is None  # the budget ends first: no hedge
    assert reps.hedge_delay_s("other", 1.0) is None  # per model
    off = ReplicaSet(ReplicaSettings(("a:1", "b:1")), _never)
    off.answered("m", 1.0)
    assert off.hedge_delay_s("m", 1.0) is None


def test_the_latency_window_forgets_old_answers() -> None:
    w = LatencyWindow(16, 0.9)
    for _ in range(16):
        w.record(200.0)
    assert w.quantile_ms() == 200.0
    for _ in range(16):
        w.record(5.0)
    assert w.quantile_ms() == 5.0 and len(w) == 16


# ------------------------------------------------------------------ real sockets


@pytest.fixture
def hung() -> Iterator[str]:
    """A listener that accepts connections and never answers: a replica that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_refused_replicas_are_ejected_and_the_error_is_unavailable() -> None:
    dead = [f"127.0.0.1:{p}" for p in free_ports(2)]
    settings = ReplicaSettings(tuple(dead), reprobe_interval_ms=20)
    with Client(settings, settings=ClientSettings(deadline_ms=2_000)) as client:
        with pytest.raises(UnavailableError):
            client.infer("logit", np.zeros((1, 4), np.float32))
        stats = client.replica_stats()
        assert stats.ejections == 2 and not any(stats.healthy.values())
        assert not client.server_ready()
        # Both stay out while nothing listens: the prober keeps saying no.
        time.sleep(0.1)
        assert client.replica_stats().rejoins == 0
        assert client.url == ",".join(dead)


def test_a_probe_over_a_fresh_connection_says_no_for_refused_and_hung(hung: str) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    settings = ReplicaSettings((dead, hung), probe_timeout_ms=200)
    client = Client(settings)
    began = time.monotonic()
    assert not client._core.probe(dead, ())
    assert not client._core.probe(hung, ("logit",))
    assert time.monotonic() - began < 5  # bounded by probe_timeout_ms, not hung for good
    client.close()


def test_the_async_twin_ejects_the_same_way() -> None:
    dead = tuple(f"127.0.0.1:{p}" for p in free_ports(2))

    async def go() -> int:
        async with AsyncClient(dead, settings=ClientSettings(deadline_ms=2_000)) as client:
            with pytest.raises(UnavailableError):
                await client.infer("logit", np.zeros((1, 4), np.float32))
            return client.replica_stats().ejections

    assert asyncio.run(go()) == 2
