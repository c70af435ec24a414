"""The model pool measured: cold loads per engine kind, evicted vs loaded first requests,
and memory held against the budget while 50 models take Zipf traffic.

``python -m perf.pool`` (``make perf-pool``; ~3-5 min on 2 cores; builds its own models
with the real pipeline into a temporary directory):

1. builds an MLP 48-256-256-1 (the size of the ``mlp`` example of
   ``make build-engines``: ``build_engines.examples.neural``, hidden 256),
   published as the build publishes it (Python wrapper, ONNX Runtime, one
   instance), and a LightGBM forest of 150 trees x 15 leaves (the size of the
   ``eurusd_lgbm`` example, ``build_engines.examples.market``) published twice
   on ``setsuna_forest``: lleaves and tl2cgen; then re-publishes the MLP under
   50 names (``pool_00`` .. ``pool_49``, re-sealed as a publisher would);
2. starts the wheel's ``tritonserver`` with nothing loaded and a
   :class:`setsuna.pool.ModelPool` on it;
3. **cold load per engine kind**: ``--rounds`` loads of each kind through the
   pool (load, measure, evict, wait until the eviction settled), the load's
   wall time and the memory the pool measured (stub PSS + server growth);
4. **first request**: an SDK call (``Client(pool=...)``, one row) to a
   loaded model (``--calls`` of them) and to the same model just evicted
   (``--rounds``, each after the eviction settled): p50 of each and the ratio;
5. **Zipf traffic**: ``--requests`` one-row calls over the 50 copies, model
   rank k drawn with probability ~ k**-s (``--zipf-s`` 1.1, fixed seed), from
   ``--threads`` client threads, every call with a ``--deadline-ms`` budget,
   the pool held to ``--memory-budget-mb``. A sampler reads, every 50 ms and
   independently of the pool's books, what the server holds: the PSS of every
   stub process plus tritonserver's PSS growth since the phase began; and the
   pool's own figure. Reported: peak and median while serving, and after the
   last eviction settled, against the budget; hits, loads, evictions; latency
   of calls that found their model loaded vs those that loaded it.

Prints one block of figures and writes ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna import manifest, seal
from setsuna.client import Client, ClientSettings
from setsuna.errors import ModelLoadingError, ServingError
from setsuna.models import process_pss_mib, stub_memory
from setsuna.pool import ModelPool, PoolSettings
from setsuna.server import LocalTriton, ServerSettings

N_FEATURES = 48
MLP = "mlp"
FORESTS = {"lgb_lleaves": "lleaves", "lgb_tl2cgen": "tl2cgen"}
COPIES = 50


# --------------------------------------------------------------------------- build


def build(root: Path) -> Path:
    """The three models through the real pipeline, and 50 re-published MLP copies."""
    import lightgbm as lgb

    from build_engines import gate
    from build_engines.base import F32, Built, Source
    from build_engines.build import build_model, converter_for
    from build_engines.sources.trees import from_lightgbm
    from build_engines.spec import ModelSpec, ServingSpec

    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    one = ServingSpec(cpu_instances=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3_000, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + np.tanh(x[:, 1] * x[:, 2]) + 0.5 * rng.normal(size=len(x)) > 0).astype(int)

    build_mlp(root, MLP, x)

    params = {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 1}
    booster = lgb.train(params, lgb.Dataset(x[:2000], y[:2000]), num_boost_round=150)
    for name, engine in FORESTS.items():

        def only(s: Source, workdir: Path, calib: F32, engine: str = engine) -> list[Built]:
            return [b for b in converter_for(s)(s, workdir, calib) if b.name == engine]

        build_model(
            from_lightgbm(booster, name=name),
            x[2000:],
            ModelSpec(name, gate=fast, serving=one),
            root,
            ("local",),
            root / "work",
            echo=False,
            converter=only,
        )
    repo = root / "local"
    for i in range(COPIES):
        copy_model(repo, MLP, f"pool_{i:02d}")
    return repo


def build_mlp(root: Path, name: str, x: npt.NDArray[np.float32]) -> Path:
    """A fixed random MLP 48-256-256-1 as ``name`` (ONNX candidate only, one instance),
    gated on ``x``, in ``root/local``: the small neural model the benchmarks serve."""
    import torch

    from build_engines import gate
    from build_engines.base import F32, Built, Source
    from build_engines.build import build_model, converter_for
    from build_engines.sources import from_object
    from build_engines.spec import ModelSpec, ServingSpec

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
        torch.nn.Sigmoid(),
    ).eval()
    source = from_object(net, name=name, example_input=torch.from_numpy(x[:8]))

    def onnx_only(s: Source, workdir: Path, calib: F32) -> list[Built]:
        return [b for b in converter_for(s)(s, workdir, calib) if b.name == "onnx"]

    spec = ModelSpec(
        name,
        gate=gate.GateSettings(latency_calls=20, batch_budget_s=0.01),
        serving=ServingSpec(cpu_instances=1),
    )
    build_model(source, x, spec, root, ("local",), root / "work", echo=False, converter=onnx_only)
    return root / "local"


def copy_model(repo: Path, src: str, dst: str) -> None:
    """``src`` published again under the name ``dst`` (re-sealed, as a publisher would)."""
    shutil.copytree(repo / src, repo / dst)
    cfg = repo / dst / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace(f'name: "{src}"', f'name: "{dst}"'))
    m = manifest.read(repo / dst / "1")
    manifest.write(repo / dst / "1", replace(m, model=dst))
    seal.seal_model(repo / dst)


def backend_of(repo: Path, model: str) -> str:
    text = (repo / model / "config.pbtxt").read_text()
    return "setsuna_forest" if "setsuna_forest" in text else "python"


# --------------------------------------------------------------------------- phases


def row() -> npt.NDArray[np.float32]:
    return np.random.default_rng(1).normal(size=(1, N_FEATURES)).astype(np.float32)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cold_loads(pool: ModelPool, models: list[str], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        seconds, memory = [], []
        for _ in range(rounds):
            pool.load(model)
            loaded = next(m for m in pool.status().models if m.name == model)
            assert loaded.load_s is not None
            seconds.append(loaded.load_s)
            memory.append(loaded.memory_mb)
            pool.evict(model)
            pool.settle()
        out[model] = {
            "load_s": seconds,
            "load_s_median": statistics.median(seconds),
            "memory_mb": memory,
            "memory_mb_median": statistics.median(memory),
        }
    return out


def first_requests(
    pool: ModelPool, client: Client, model: str, rounds: int, calls: int
) -> dict[str, Any]:
    x = row()
    pool.load(model)
    client.infer(model, x)  # metadata cached: both sides pay only the call (and the load)
    loaded = []
    for _ in range(calls):
        t = time.perf_counter()
        client.infer(model, x)
        loaded.append((time.perf_counter() - t) * 1e3)
    evicted = []
    for _ in range(rounds):
        pool.evict(model)
        pool.settle()
        t = time.perf_counter()
        client.infer(model, x, deadline_ms=120_000)
        evicted.append((time.perf_counter() - t) * 1e3)
    pool.evict(model)
    pool.settle()
    p50_loaded, p50_evicted = statistics.median(loaded), statistics.median(evicted)
    return {
        "loaded_ms_p50": p50_loaded,
        "loaded_ms_p99": pct(loaded, 99),
        "evicted_ms": evicted,
        "evicted_ms_p50": p50_evicted,
        "ratio": p50_evicted / p50_loaded,
    }


class Sampler:
    """What the server holds, every ``interval_s``, independently of the pool's books."""

    def __init__(self, server: LocalTriton, pool: ModelPool, interval_s: float = 0.05) -> None:
        self.server, self.pool, self.interval_s = server, pool, interval_s
        pid = server.pid
        assert pid is not None
        self.pid = pid
        self.base = process_pss_mib(pid) or 0.0
        self.measured: list[float] = []
        self.books: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def held_mb(self) -> float:
        stubs = sum(mib for mib, _ in stub_memory(self.pid).values())
        return stubs + max(0.0, (process_pss_mib(self.pid) or 0.0) - self.base)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.measured.append(self.held_mb())
            self.books.append(self.pool.snapshot().held_mb)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def zipf_traffic(server: LocalTriton, pool: ModelPool, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    weights = np.arange(1, COPIES + 1, dtype=np.float64) ** -args.zipf_s
    ranks = rng.choice(COPIES, size=args.requests, p=weights / weights.sum())
    todo = [f"pool_{k:02d}" for k in ranks]
    lock = threading.Lock()
    hit_ms: list[float] = []
    miss_ms: list[float] = []
    errors: dict[str, int] = {}
    x = row()

    def worker() -> None:
        settings = ClientSettings(deadline_ms=args.deadline_ms)
        with Client(server.grpc_url, settings=settings, pool=pool) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    model = todo.pop()
                was_ready = any(
                    m.name == model and m.state == "READY" for m in pool.snapshot().models
                )
                t = time.perf_counter()
                try:
                    client.infer(model, x)
                except (ModelLoadingError, ServingError) as exc:
                    with lock:
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    (hit_ms if was_ready else miss_ms).append(ms)

    loads0, evictions0 = pool.loads, pool.evictions
    began = time.perf_counter()
    with Sampler(server, pool) as sampler:
        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - began
    settled = pool.settle()
    after = Sampler(server, pool).held_mb()
    distinct = len(set(ranks.tolist()))
    return {
        "requests": args.requests,
        "distinct_models": distinct,
        "elapsed_s": elapsed,
        "loads": pool.loads - loads0,
        "evictions": pool.evictions - evictions0,
        "hits": len(hit_ms),
        "misses": len(miss_ms),
        "errors": errors,
        "hit_ms_p50": pct(hit_ms, 50),
        "hit_ms_p99": pct(hit_ms, 99),
        "miss_ms_p50": pct(miss_ms, 50),
        "miss_ms_p99": pct(miss_ms, 99),
        "measured_peak_mb": max(sampler.measured, default=float("nan")),
        "measured_p50_mb": pct(sampler.measured, 50),
        "books_peak_mb": max(sampler.books, default=float("nan")),
        "samples": len(sampler.measured),
        "over_budget_fraction": (
            sum(v > args.memory_budget_mb for v in sampler.measured) / len(sampler.measured)
            if sampler.measured
            else float("nan")
        ),
        "after_settle_books_mb": settled.held_mb,
        "after_settle_measured_mb": after,
        "resident_after": sum(m.state == "READY" for m in settled.models),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.pool", description=__doc__)
    p.add_argument("--memory-budget-mb", type=float, default=1200.0)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--deadline-ms", type=float, default=60_000.0)
    p.add_argument("--rounds", type=int, default=3, help="cold loads / evicted calls per kind")
    p.add_argument("--calls", type=int, default=200, help="calls to a loaded model")
    p.add_argument(
        "--settle-before-load",
        action="store_true",
        help="the Zipf pool waits for its evictions to settle before each load",
    )
    p.add_argument("--out", type=Path, default=Path(".cache/perf/pool"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        repo = build(Path(tmp))
        doc["build_s"] = time.perf_counter() - t
        kinds = [MLP, *FORESTS]
        doc["backends"] = {m: backend_of(repo, m) for m in kinds}
        settings = ServerSettings.on_free_ports(repo, load_models=(), cache_size_bytes=0)
        with LocalTriton(settings, log_path=args.out / "triton.log") as server:
            big = PoolSettings(memory_budget_mb=1e6)
            with ModelPool.for_server(server, big) as pool:
                doc["cold_load"] = cold_loads(pool, kinds, args.rounds)
                with Client(server.grpc_url, pool=pool) as client:
                    doc["first_request"] = {
                        m: first_requests(pool, client, m, args.rounds, args.calls)
                        for m in (MLP, "lgb_lleaves")
                    }
            budget = PoolSettings(
                memory_budget_mb=args.memory_budget_mb,
                settle_before_load=args.settle_before_load,
            )
            with ModelPool.for_server(server, budget) as pool:
                doc["zipf"] = zipf_traffic(server, pool, args)
    doc["total_s"] = time.perf_counter() - began
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc, args))
    return 0


def report(doc: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"built in {doc['build_s']:.0f} s; whole run {doc['total_s']:.0f} s", ""]
    lines.append("cold load through the pool (median of rounds; memory as the pool measured it)")
    for model, c in doc["cold_load"].items():
        secs = ", ".join(f"{s * 1e3:.0f}" for s in c["load_s"])
        mib = ", ".join(f"{m:.1f}" for m in c["memory_mb"])
        lines.append(
            f"  {model:<12} {doc['backends'][model]:<15} {c['load_s_median'] * 1e3:.0f} ms "
            f"({secs})  {c['memory_mb_median']:.1f} MiB ({mib})"
        )
    lines += ["", "first request, one row through Client(pool=...)"]
    for model, f in doc["first_request"].items():
        lines.append(
            f"  {model:<12} loaded p50 {f['loaded_ms_p50']:.2f} ms (p99 "
            f"{f['loaded_ms_p99']:.2f}); evicted p50 {f['evicted_ms_p50']:.0f} ms "
            f"({', '.join(f'{v:.0f}' for v in f['evicted_ms'])}); ratio {f['ratio']:.0f}x"
        )
    z = doc["zipf"]
    lines += [
        "",
        f"Zipf s={args.zipf_s} over {COPIES} MLP copies: {z['requests']} calls from "
        f"{args.threads} threads ({z['distinct_models']} distinct models drawn), budget "
        f"{args.memory_budget_mb:g} MiB{', settle before load' if args.settle_before_load else ''}"
        f", {z['elapsed_s']:.0f} s",
        f"  hits {z['hits']} (p50 {z['hit_ms_p50']:.2f} ms, p99 {z['hit_ms_p99']:.1f} ms); "
        f"calls that loaded {z['misses']} (p50 {z['miss_ms_p50']:.0f} ms, p99 "
        f"{z['miss_ms_p99']:.0f} ms); loads {z['loads']}, evictions {z['evictions']}; "
        f"errors {z['errors'] or 'none'}",
        f"  held while serving (stubs' PSS + server growth, sampled every 50 ms, "
        f"{z['samples']} samples): peak {z['measured_peak_mb']:.0f} MiB, p50 "
        f"{z['measured_p50_mb']:.0f} MiB; over the budget in "
        f"{z['over_budget_fraction'] * 100:.1f} % of samples; pool's books peak "
        f"{z['books_peak_mb']:.0f} MiB",
        f"  after the last eviction settled: measured {z['after_settle_measured_mb']:.0f} MiB, "
        f"pool's books {z['after_settle_books_mb']:.0f} MiB, {z['resident_after']} models "
        f"resident (budget {args.memory_budget_mb:g} MiB)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
