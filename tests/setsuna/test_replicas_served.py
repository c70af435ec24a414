"""Three real Triton replicas behind one client: balance, sticky A/B, hedging, kill -9, rejoin.

The repository is the example layout (``python -m ensembles`` over three
small logistic engines named lightgbm/xgboost/mlp, as
``tests/ensembles/test_examples.py`` builds it), copied once per replica so
that each server has its own folder, plus ``paced``: a hand-written Python
model that sleeps ``delay_ms`` once per batch (5 ms on two replicas, 200 ms
on the third) and answers the row sums. Each replica loads ``decide`` (the
A/B router with the engines in process), ``lightgbm`` (the pipeline's model)
and ``paced``.

Tests run in file order: the kill and the restart come last because they
change the cluster. Behaviour is asserted (counts, uniqueness, counters);
the only timing assertion is hedged p99 against unhedged p99 with a 200 ms
against 5 ms replica, a ratio with a wide margin. Figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from ensembles.__main__ import main as write_example_ensembles
from perf.replicas import PACED_FEATURES, write_paced
from setsuna.audit import AuditLog, AuditSettings
from setsuna.client import AsyncClient, Client, ClientSettings
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import ReplayFeed, datasets
from setsuna.pipeline import Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.replicas import ReplicaSettings, ReplicaStats
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

pytest.importorskip("pandas")
SPEC = default_spec()
N = len(SPEC)
RNG = np.random.default_rng(17)
ENGINES = {
    m: (RNG.normal(size=N) * 0.05).astype(np.float32) for m in ("lightgbm", "xgboost", "mlp")
}
FAST_MS, SLOW_MS = 5, 200
#: Generous: a failover always fits, so a lost decision can only be a bug.
PATIENT = ClientSettings(deadline_ms=5_000)


@dataclass
class Cluster:
    servers: list[LocalTriton]
    root: Path

    @property
    def urls(self) -> list[str]:
        return [s.grpc_url for s in self.servers]


@dataclass
class Shared:
    """What the kill test leaves for the restart test: the client that saw the kill."""

    client: Client | None = None
    killed: int = 1


SHARED = Shared()


def _paced(repo: Path, delay_ms: int) -> None:
    write_paced(repo, delay_ms, PACED_FEATURES)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    x = RNG.normal(size=(300, N)).astype(np.float32)
    built = build_logistic_models(root / "build", ENGINES, x)
    assert write_example_ensembles(["--model-repository", str(built)]) == 0
    servers: list[LocalTriton] = []
    try:
        for i, delay_ms in enumerate((FAST_MS, FAST_MS, SLOW_MS)):
            repo = root / f"replica{i}"
            shutil.copytree(built, repo)
            _paced(repo, delay_ms)
            server = LocalTriton.on_free_ports(
                repo,
                log_path=root / f"triton{i}.log",
                load_models=("decide", "lightgbm", "paced"),
            )
            servers.append(server.start())
        yield Cluster(servers, root)
    finally:
        if SHARED.client is not None:
            SHARED.client.close()
            # Dropped now: a closed client kept to interpreter exit has its stubs'
            # __del__ close them again after grpc's module teardown (noise on stderr).
            SHARED.client = None
        for server in servers:
            server.stop()


def test_a_sequential_caller_is_spread_evenly(cluster: Cluster) -> None:
    x = RNG.normal(size=(1, N)).astype(np.float32)
    with Client(cluster.urls, settings=PATIENT, models=["lightgbm"]) as client:
        for _ in range(300):
            client.infer("lightgbm", x)
        stats = client.replica_stats()
    assert sum(stats.calls.values()) == 300
    assert all(95 <= n <= 105 for n in stats.calls.values()), stats.calls
    assert stats.failovers == stats.retries == stats.ejections == stats.hedges_sent == 0


KEYS = [f"acct-{i}" for i in range(5_000)]
X_KEYS = RNG.normal(size=(len(KEYS), N)).astype(np.float32)


def _arms(client: Client) -> npt.NDArray[np.object_]:
    parts = [
        client.infer("decide", X_KEYS[i : i + 500], KEYS[i : i + 500]).served_by
        for i in range(0, len(KEYS), 500)
    ]
    return np.concatenate(parts)


def test_a_key_gets_the_same_arm_on_every_replica(cluster: Cluster) -> None:
    """The router assigns arms from the key alone: no replica state can move a key."""
    per_replica = []
    for url in cluster.urls[:2]:
        with Client(url, settings=PATIENT) as client:
            per_replica.append(_arms(client))
    np.testing.assert_array_equal(per_replica[0], per_replica[1])
    arms, counts = np.unique(per_replica[0], return_counts=True)
    assert set(arms) == {"lightgbm:1", "xgboost:1"}
    assert all(0.45 < c / len(KEYS) < 0.55 for c in counts), dict(zip(arms, counts, strict=True))
    # Through the balancing client too: its 10 calls land on all three replicas.
    with Client(cluster.urls, settings=PATIENT) as client:
        np.testing.assert_array_equal(_arms(client), per_replica[0])
        assert all(n >= 3 for n in client.replica_stats().calls.values())
    print(f"\n5,000 keys, 2 replicas + balanced over 3: same arm for every key; split {counts}")


def _latencies_ms(client: Client, calls: int) -> npt.NDArray[np.float64]:
    x = np.ones((1, PACED_FEATURES), np.float32)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        p = client.infer("paced", x)
        out.append((time.perf_counter() - t0) * 1e3)
        assert float(p["score"][0, 0]) == PACED_FEATURES
    return np.array(out)


def test_hedging_hides_a_slow_replica(cluster: Cluster) -> None:
    """Replica 3 takes 200 ms, the others 5 ms; a third of unhedged calls wait 200 ms.

    ``hedge_quantile=0.5``: the quantile must sit above the share of slow
    answers while the window still holds them (one replica in three); once
    hedges win, the cancelled slow copies never enter the window.
    """
    calls = 60
    with Client(cluster.urls, settings=PATIENT, models=["paced"]) as plain:
        unhedged = _latencies_ms(plain, calls)
    settings = ReplicaSettings(
        tuple(cluster.urls), hedge_quantile=0.5, hedge_min_samples=10, latency_window=30
    )
    with Client(settings, settings=PATIENT, models=["paced"]) as hedged_client:
        _latencies_ms(hedged_client, 30)  # the window fills (10 unhedged) and settles
        before = hedged_client.replica_stats()
        hedged = _latencies_ms(hedged_client, calls)
        stats = hedged_client.replica_stats()
    won = stats.hedges_won - before.hedges_won
    sent = stats.hedges_sent - before.hedges_sent
    p99_off, p99_on = np.percentile(unhedged, 99), np.percentile(hedged, 99)
    p50_off, p50_on = np.percentile(unhedged, 50), np.percentile(hedged, 50)
    print(
        f"\nhedging, 3 replicas (one {SLOW_MS} ms, two {FAST_MS} ms), {calls} sequential calls: "
        f"p50/p99 off {p50_off:.1f}/{p99_off:.1f} ms, on {p50_on:.1f}/{p99_on:.1f} ms "
        f"({p99_off / p99_on:.1f}x); hedges sent {sent}, won {won}; "
        f"delay {stats.hedge_delay_ms}"
    )
    assert p99_off >= SLOW_MS  # the slow replica shows unhedged
    assert p99_on < p99_off / 2, (p99_on, p99_off)
    # About a third of the calls start on the slow replica; their hedge wins.
    assert won >= calls // 6 and sent >= won


def test_the_async_twin_hedges_and_cancels_the_same_way(cluster: Cluster) -> None:
    """AsyncClient: the hedge is a second task; the slow copy's task is cancelled."""
    settings = ReplicaSettings(
        tuple(cluster.urls), hedge_quantile=0.5, hedge_min_samples=10, latency_window=30
    )
    x = np.ones((1, PACED_FEATURES), np.float32)

    async def go() -> tuple[list[float], ReplicaStats]:
        async with AsyncClient(settings, settings=PATIENT, models=["paced"]) as client:
            for _ in range(30):  # the window fills and settles
                await client.infer("paced", x)
            lat = []
            for _ in range(45):
                t0 = time.perf_counter()
                p = await client.infer("paced", x)
                lat.append((time.perf_counter() - t0) * 1e3)
                assert float(p["score"][0, 0]) == PACED_FEATURES
            await asyncio.sleep(0.05)  # cancelled tasks finish unwinding
            return lat, client.replica_stats()

    lat, stats = asyncio.run(go())
    assert stats.hedges_won >= 45 // 6 and stats.hedges_sent >= stats.hedges_won
    assert all(n == 0 for n in stats.outstanding.values())  # every cancelled copy ended
    print(
        f"\nasync hedging: p99 {np.percentile(lat, 99):.1f} ms, hedges sent "
        f"{stats.hedges_sent}, won {stats.hedges_won}"
    )


def _replay(cluster: Cluster, client: Client, audit_path: Path) -> tuple[int, dict[str, float]]:
    """Replay 800 EURUSD bars at one every 5 ms; kill -9 replica 2 after bar 300."""
    feed = ReplayFeed.from_frame(datasets.eurusd().iloc[:800])
    records = np.array(feed.records)
    engine = FeatureEngine(SPEC, feed.symbols)
    audit = AuditLog(
        audit_path, feature_names=engine.names, settings=AuditSettings(synchronous="NORMAL")
    )
    pipe = Pipeline(
        engine,
        client,
        ThresholdPolicy(len(feed.symbols)),
        PipelineSettings("lightgbm", deadline_ms=PATIENT.deadline_ms),
        audit=audit,
    )
    victim = cluster.servers[SHARED.killed]
    assert victim.pid is not None
    before: list[float] = []
    after: list[float] = []
    period_s = 0.005
    began = time.perf_counter()
    try:
        for k, group in enumerate(pipe.groups(records)):
            wait = began + k * period_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if k == 300:
                os.kill(victim.pid, signal.SIGKILL)
            t0 = time.perf_counter()
            pipe.process(group)
            (before if k < 300 else after).append((time.perf_counter() - t0) * 1e3)
    finally:
        audit.close()
    s = pipe.summary
    assert s.stopped is None, s.stopped
    assert set(s.skipped) <= {"warming_up"}, s.skipped  # nothing lost to the kill
    ready = len(records) - s.skipped.get("warming_up", 0)
    assert s.decisions == ready
    figures = {
        "p99_before_ms": float(np.percentile(before, 99)),
        "p99_after_ms": float(np.percentile(after, 99)),
        "max_after_ms": float(np.max(after)),
        "p50_before_ms": float(np.percentile(before, 50)),
        "p50_after_ms": float(np.percentile(after, 50)),
    }
    return ready, figures


def test_kill_9_of_a_replica_mid_run_loses_and_duplicates_no_decision(
    cluster: Cluster, tmp_path: Path
) -> None:
    settings = ReplicaSettings(tuple(cluster.urls), reprobe_interval_ms=100)
    client = SHARED.client = Client(settings, settings=PATIENT, models=["lightgbm"])
    audit_path = tmp_path / "audit.db"
    ready, figures = _replay(cluster, client, audit_path)
    stats = client.replica_stats()
    with sqlite3.connect(audit_path) as db:
        rows = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        unique = db.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT symbol, event_ns FROM decisions)"
        ).fetchone()[0]
    assert rows == unique == ready  # every bar decided once: none lost, none twice
    dead = cluster.urls[SHARED.killed]
    assert stats.ejections >= 1 and not stats.healthy[dead]
    assert stats.failovers >= 1
    print(
        f"\nkill -9 of 1 of 3 replicas after bar 300 of 800 (one every 5 ms): {rows} decisions "
        f"audited, {unique} unique, {ready} expected; failovers {stats.failovers}, "
        f"ejections {stats.ejections}; per-bar p50/p99 before {figures['p50_before_ms']:.2f}/"
        f"{figures['p99_before_ms']:.2f} ms, after {figures['p50_after_ms']:.2f}/"
        f"{figures['p99_after_ms']:.2f} ms, worst after {figures['max_after_ms']:.2f} ms; "
        f"calls {stats.calls}"
    )


def test_the_restarted_replica_rejoins_without_anyone_touching_the_client(
    cluster: Cluster,
) -> None:
    client = SHARED.client
    assert client is not None, "runs after the kill test"
    victim = cluster.servers[SHARED.killed]
    dead = cluster.urls[SHARED.killed]
    victim.stop()  # reaps the killed server's orphaned stubs
    victim.start()  # the same ports: the same endpoint
    assert victim.grpc_url == dead
    calls_then = client.replica_stats().calls[dead]
    x = RNG.normal(size=(1, N)).astype(np.float32)
    until = time.monotonic() + 30
    while time.monotonic() < until:
        client.infer("lightgbm", x)
        stats = client.replica_stats()
        if stats.healthy[dead] and stats.calls[dead] >= calls_then + 20:
            break
        time.sleep(0.005)
    assert stats.rejoins == 1 and stats.healthy[dead]
    assert stats.calls[dead] >= calls_then + 20, stats.calls
    print(f"\nrestarted on {dead}: rejoined; calls {stats.calls}")
