"""One SDK client over 1, 2 and 3 local Triton replicas: overhead, failover, hedging.

``python -m perf.replicas`` (``make perf-replicas``; ~2 min on 2 cores; builds its
own models with the real pipeline into a temporary directory):

1. builds an MLP 48-256-256-1 (the size of ``make build-engines``' ``mlp``
   example) through the gate, published as the build publishes it (Python
   wrapper, ONNX Runtime, dynamic batching) with one instance, and copies the
   repository once per replica, adding ``paced``: a hand-written Python model
   that sleeps ``delay_ms`` per batch (``--fast-ms`` on replicas 1-2,
   ``--slow-ms`` on replica 3: an artificially slow replica, labelled so);
2. starts three ``tritonserver`` processes on 127.0.0.1. This host has 2
   cores and every row below runs on the same two (the servers, their stubs
   and this Python load generator all share them), so more replicas add no
   cores: the rows compare the SDK's balancing overhead, not a speed-up;
3. **overhead**: for 1, 2 and 3 endpoints, a sequential ``Client`` (one row a
   call, ``--calls``: p50/p99) and an ``AsyncClient`` closed loop
   (``--concurrency`` callers, ``--seconds``: decisions/s, p99), ratios to
   one endpoint;
4. **failover**: 3 replicas, one call every ``--period-ms`` for ``--seconds``
   x 2; ``kill -9`` of replica 2's tritonserver a third of the way in; calls
   lost (any error), failovers, p50/p99 before and after, the worst call;
   then the replica is restarted on the same ports and the time until the
   client's prober brings it back (``reprobe_interval_ms`` 100) is reported;
5. **hedging**: 3 replicas of ``paced`` (one slow), ``--hedge-calls``
   sequential calls unhedged and hedged (``hedge_quantile`` 0.5: above the
   share of slow answers, one in three), p50/p99, hedges sent and won.

Prints one table per part and writes ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from perf.pool import build_mlp
from setsuna import seal
from setsuna.client import AsyncClient, Client, ClientSettings
from setsuna.errors import ServingError
from setsuna.replicas import ReplicaSet, ReplicaSettings
from setsuna.server import LocalTriton

MODEL = "mlp"
PACED = "paced"
#: Features of the paced model (it sums them).
PACED_FEATURES = 4
N_FEATURES = 48
PATIENT = ClientSettings(deadline_ms=5_000)

PACED_CONFIG = """\
name: "paced"
backend: "python"
max_batch_size: 64
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {n} ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
dynamic_batching {{ }}
parameters {{ key: "delay_ms" value {{ string_value: "{delay_ms}" }} }}
"""
PACED_PY = """\
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.delay_s = float(params["delay_ms"]["string_value"]) / 1e3

    def execute(self, requests):
        time.sleep(self.delay_s)  # once per batch: a slow replica, never an unbounded queue
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
            score = x.sum(axis=1, keepdims=True).astype(np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", score)]))
        return out
"""


def build(root: Path) -> Path:
    """The MLP through the real pipeline (ONNX candidate only), one instance."""
    x = np.random.default_rng(0).normal(size=(2_000, N_FEATURES)).astype(np.float32)
    return build_mlp(root, MODEL, x)


def write_paced(repo: Path, delay_ms: float, n_features: int = PACED_FEATURES) -> Path:
    """``paced``: sums its features after sleeping ``delay_ms`` once per batch, sealed.

    An artificially slowed replica for the hedging figures (and the tests):
    a cancelled hedge copy still runs on the server (2.51's Python backend
    does not drop it), so a queue on the slow replica is batched, never
    unbounded.
    """
    folder = repo / PACED
    (folder / "1").mkdir(parents=True)
    config = PACED_CONFIG.format(n=n_features, delay_ms=delay_ms)
    (folder / "config.pbtxt").write_text(config)
    (folder / "1" / "model.py").write_text(PACED_PY)
    seal.seal_model(folder)  # the stub guard loads only sealed folders
    return folder


def replica_repo(built: Path, dest: Path, delay_ms: float) -> Path:
    shutil.copytree(built, dest)
    write_paced(dest, delay_ms)
    return dest


def rows(n: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(1).normal(size=(n, 1, N_FEATURES)).astype(np.float32)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


# --------------------------------------------------------------------------- overhead


def sequential(endpoints: list[str], calls: int) -> dict[str, Any]:
    x = rows(calls)
    lat: list[float] = []
    with Client(endpoints, settings=PATIENT, models=[MODEL]) as client:
        for i in range(50):  # connections and the engine warm
            client.infer(MODEL, x[i])
        for i in range(calls):
            t0 = time.perf_counter()
            client.infer(MODEL, x[i])
            lat.append((time.perf_counter() - t0) * 1e3)
        calls_per = client.replica_stats().calls
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "calls": calls_per}


async def closed_loop(endpoints: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    x = rows(1_000)
    lat: list[float] = []
    async with AsyncClient(endpoints, settings=PATIENT, models=[MODEL]) as client:
        stop = time.perf_counter() + seconds
        done = 0

        async def caller(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await client.infer(MODEL, x[i % len(x)])
                lat.append((time.perf_counter() - t0) * 1e3)
                done += 1
                i += concurrency

        stats0 = (await client.statistics(MODEL))[f"{MODEL}:1"]
        began = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        wall = time.perf_counter() - began
        stats1 = (await client.statistics(MODEL))[f"{MODEL}:1"]  # summed over the replicas
        calls = client.replica_stats().calls
    executions = stats1["executions"] - stats0["executions"]
    return {
        "decisions_per_s": round(done / wall),
        "p99_ms": pct(lat, 99),
        "rows_per_execution": round((stats1["inferences"] - stats0["inferences"]) / executions, 2),
        "calls": calls,
    }


def bookkeeping_us(endpoints: int, n: int = 100_000) -> float:
    """The balancer's own cost per call (pick + begin + end), no network: microseconds."""
    reps = ReplicaSet(
        ReplicaSettings(tuple(f"127.0.0.1:{9000 + i}" for i in range(endpoints))),
        lambda endpoint, models: False,
    )
    began = time.perf_counter()
    for _ in range(n):
        i = reps.pick()
        assert i is not None
        reps.begin(i, MODEL)
        reps.end(i)
    return round((time.perf_counter() - began) / n * 1e6, 2)


# --------------------------------------------------------------------------- failover


def failover(servers: list[LocalTriton], period_ms: float, seconds: float) -> dict[str, Any]:
    """Steady calls over 3 replicas; kill -9 replica 2 a third of the way in; restart it."""
    endpoints = [s.grpc_url for s in servers]
    victim = servers[1]
    settings = ReplicaSettings(tuple(endpoints), reprobe_interval_ms=100)
    x = rows(100_000)
    before: list[float] = []
    after: list[float] = []
    lost = 0
    n = int(seconds * 1e3 / period_ms)
    with Client(settings, settings=PATIENT, models=[MODEL]) as client:
        began = time.perf_counter()
        for k in range(n):
            wait = began + k * period_ms / 1e3 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if k == n // 3:
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
            t0 = time.perf_counter()
            try:
                client.infer(MODEL, x[k % len(x)])
            except ServingError:
                lost += 1
                continue
            (before if k < n // 3 else after).append((time.perf_counter() - t0) * 1e3)
        killed = client.replica_stats()
        victim.stop()
        t_start = time.perf_counter()
        victim.start()
        t_ready = time.perf_counter()
        rejoined_s = float("nan")
        while time.perf_counter() - t_ready < 30:
            client.infer(MODEL, x[0])
            if client.replica_stats().healthy[victim.grpc_url]:
                rejoined_s = time.perf_counter() - t_ready
                break
            time.sleep(0.01)
        final = client.replica_stats()
    return {
        "calls": n,
        "lost": lost,
        "failovers": killed.failovers,
        "ejections": killed.ejections,
        "p50_before_ms": pct(before, 50),
        "p99_before_ms": pct(before, 99),
        "p50_after_ms": pct(after, 50),
        "p99_after_ms": pct(after, 99),
        "worst_after_ms": round(max(after), 3),
        "restart_s": round(t_ready - t_start, 2),
        "rejoin_after_ready_s": round(rejoined_s, 3),
        "rejoins": final.rejoins,
        "calls_per_replica": final.calls,
    }


# --------------------------------------------------------------------------- hedging


def hedging(endpoints: list[str], calls: int) -> dict[str, Any]:
    x = np.ones((1, PACED_FEATURES), np.float32)

    def run(client: Client) -> list[float]:
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            client.infer(PACED, x)
            lat.append((time.perf_counter() - t0) * 1e3)
        return lat

    with Client(endpoints, settings=PATIENT, models=[PACED]) as plain:
        off = run(plain)
    hedged = ReplicaSettings(
        tuple(endpoints), hedge_quantile=0.5, hedge_min_samples=10, latency_window=50
    )
    with Client(hedged, settings=PATIENT, models=[PACED]) as client:
        for _ in range(40):  # the window fills and settles
            client.infer(PACED, x)
        warm = client.replica_stats()
        on = run(client)
        stats = client.replica_stats()
    return {
        "off_p50_ms": pct(off, 50),
        "off_p99_ms": pct(off, 99),
        "on_p50_ms": pct(on, 50),
        "on_p99_ms": pct(on, 99),
        "hedges_sent": stats.hedges_sent - warm.hedges_sent,
        "hedges_won": stats.hedges_won - warm.hedges_won,
        "hedge_delay_ms": round(stats.hedge_delay_ms.get(PACED, float("nan")), 2),
    }


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(doc: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [
        f"## overhead: the same 2 cores, MLP 48-256-256-1 (1 instance per replica), "
        f"sequential {args.calls} calls; closed loop c={args.concurrency} for {args.seconds:g} s",
        "",
        "| endpoints | balancer us/call | c=1 p50 ms | c=1 p99 ms | c=1 p99 vs 1 | "
        f"c={args.concurrency} decisions/s | vs 1 | c={args.concurrency} p99 ms | vs 1 | "
        "rows per batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = doc["overhead"]["1"]
    for k, row in doc["overhead"].items():
        s, c = row["sequential"], row["closed_loop"]
        b_s, b_c = base["sequential"], base["closed_loop"]
        lines.append(
            f"| {k} | {row['bookkeeping_us']} | {s['p50_ms']} | {s['p99_ms']} | "
            f"{ratio(s['p99_ms'], b_s['p99_ms'])} | "
            f"{c['decisions_per_s']:,} | {ratio(c['decisions_per_s'], b_c['decisions_per_s'])} | "
            f"{c['p99_ms']} | {ratio(c['p99_ms'], b_c['p99_ms'])} | {c['rows_per_execution']} |"
        )
    f = doc["failover"]
    lines += [
        "",
        f"## failover: 3 replicas, one call every {args.period_ms:g} ms, kill -9 of replica 2 "
        f"after call {f['calls'] // 3} of {f['calls']}",
        "",
        "| | p50 ms | p99 ms | worst ms | lost | failovers | ejections |",
        "|---|---|---|---|---|---|---|",
        f"| before the kill | {f['p50_before_ms']} | {f['p99_before_ms']} | - | - | - | - |",
        f"| after the kill | {f['p50_after_ms']} | {f['p99_after_ms']} | {f['worst_after_ms']} "
        f"| {f['lost']} | {f['failovers']} | {f['ejections']} |",
        f"| p99 after / before | | {ratio(f['p99_after_ms'], f['p99_before_ms'])} | | | | |",
        "",
        f"restart on the same ports: ready in {f['restart_s']} s; back in rotation "
        f"{f['rejoin_after_ready_s']} s after ready (rejoins {f['rejoins']}); calls "
        f"{f['calls_per_replica']}",
    ]
    h = doc["hedging"]
    lines += [
        "",
        f"## hedging: {args.hedge_calls} sequential calls, replicas of {args.fast_ms:g}, "
        f"{args.fast_ms:g} and {args.slow_ms:g} ms (artificially slowed: a sleep per batch)",
        "",
        "| | p50 ms | p99 ms | hedges sent | hedges won |",
        "|---|---|---|---|---|",
        f"| off | {h['off_p50_ms']} | {h['off_p99_ms']} | - | - |",
        f"| on (q=0.5, delay {h['hedge_delay_ms']} ms) | {h['on_p50_ms']} | {h['on_p99_ms']} "
        f"| {h['hedges_sent']} | {h['hedges_won']} |",
        f"| off / on | {ratio(h['off_p50_ms'], h['on_p50_ms'])} | "
        f"{ratio(h['off_p99_ms'], h['on_p99_ms'])} | | |",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.replicas", description=__doc__)
    p.add_argument("--calls", type=int, default=2_000, help="sequential calls per row")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="closed loop per row")
    p.add_argument("--period-ms", type=float, default=2.0, help="failover: one call every")
    p.add_argument("--hedge-calls", type=int, default=150)
    p.add_argument("--fast-ms", type=float, default=5.0)
    p.add_argument("--slow-ms", type=float, default=200.0)
    p.add_argument("--out", type=Path, default=Path(".cache/perf/replicas"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"cpus": os.cpu_count(), "overhead": {}}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        built = build(Path(tmp) / "build")
        servers = []
        for i, delay in enumerate((args.fast_ms, args.fast_ms, args.slow_ms)):
            repo = replica_repo(built, Path(tmp) / f"replica{i}", delay)
            server = LocalTriton.on_free_ports(
                repo, cache_size_bytes=0, log_path=args.out / f"triton{i}.log"
            )
            servers.append(stack.enter_context(server))
        endpoints = [s.grpc_url for s in servers]
        for k in (1, 2, 3):
            doc["overhead"][str(k)] = {
                "bookkeeping_us": bookkeeping_us(k),
                "sequential": sequential(endpoints[:k], args.calls),
                "closed_loop": asyncio.run(
                    closed_loop(endpoints[:k], args.concurrency, args.seconds)
                ),
            }
        doc["hedging"] = hedging(endpoints, args.hedge_calls)
        doc["failover"] = failover(servers, args.period_ms, 2 * args.seconds)
    lines = report(doc, args)
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["failover"]["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
