"""The routers' answer cache beside Triton's response cache, from one server and one run.

    .venv/bin/python -m perf.cache [--model-repository model_repository/local] [--rounds 3]

Builds a repository in ``.cache/perf/cache/`` from the built ``lightgbm``:

* ``lightgbm``: the engine as built (Triton's response cache off);
* ``lightgbm_cached``: the same engine with ``response_cache`` on: the reference;
* ``decide``: lightgbm:1 in process and the signal, no answer cache;
* ``decide_cached``: the same with ``cache_max_bytes`` = 128 KiB (372 rows of
  48 features per instance) and ``cache_ttl_ms`` = 10 min.

Every model has 2 instances, batching off. perf_analyzer sends one row per
request over gRPC (a sticky key per row), from these inputs:

* ``one``: one row, repeated: after the first request every one is a hit;
* ``distinct``: 4,096 held-out rows: misses (an instance sees ~2,048 others
  before a row comes back, and holds 372);
* ``mix50`` / ``mix90``: 20,000 requests, 50 % / 90 % of them one of 16 hot
  rows, the others distinct rows that come back only on the next pass (after
  more than 372 others per instance, so they miss again). The hit share each
  run really had is printed beside it: the answer cache's counters for
  ``decide_cached``, Triton's cache statistics for ``lightgbm_cached`` (the
  server's cache is sized 64 KiB here so that it forgets them too).

Plus ``mix90`` with 32 rows per request at c=1 (``decide`` and
``decide_cached``): where a hit saves the engine more than its lookup costs.

Each round runs every path once (every other round in reverse order), so a
ratio compares two runs next to each other on the same server; the tables
give the median and the range over rounds.
Writes ``.cache/perf/cache.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.inputs import input_rows
from ensembles import repository as rep
from ensembles import signal
from ensembles.limits import Limits
from setsuna import manifest, seal
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import SetsunaError
from setsuna.model_config import CONFIG_NAME
from setsuna.server import LocalTriton

OUT: Final = Path(".cache/perf/cache")
MODEL: Final = "lightgbm"
TRITON_CACHED: Final = "lightgbm_cached"
CACHE_BYTES: Final = 128 << 10
CACHE_TTL_MS: Final = 600_000.0
DISTINCT: Final = 4096
MIX_REQUESTS: Final = 20_000
HOT_ROWS: Final = 16
BATCH: Final = 32
#: Triton's response cache, sized so that it too forgets the distinct rows before
#: they come back: its hit share matches the input's, like ours.
TRITON_CACHE_BYTES: Final = 64 << 10

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Leg:
    """One measured path: a model, an input, a concurrency."""

    model: str
    data: str
    concurrency: int
    batch: int = 1

    @property
    def name(self) -> str:
        return f"{self.model}/{self.data}/c{self.concurrency}/b{self.batch}"


PLAN: Final = (
    Leg(MODEL, "one", 1),
    Leg(TRITON_CACHED, "one", 1),
    Leg("decide", "one", 1),
    Leg("decide_cached", "one", 1),
    Leg("decide", "distinct", 1),
    Leg("decide_cached", "distinct", 1),
    *(
        Leg(m, d, 32)
        for d in ("distinct", "mix50", "mix90")
        for m in (MODEL, TRITON_CACHED, "decide", "decide_cached")
    ),
    Leg("decide", "mix90", 1, BATCH),
    Leg("decide_cached", "mix90", 1, BATCH),
)


def build(source: Path, out: Path) -> tuple[Path, int]:
    """The benchmark repository and the model's feature count."""
    repo = out / "repository"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(source / MODEL, repo / MODEL, ignore=ignore)
    shutil.copytree(source / MODEL, repo / TRITON_CACHED, ignore=ignore)
    cfg = mc.ModelConfig()
    text_format.Parse((repo / TRITON_CACHED / CONFIG_NAME).read_text(), cfg)
    cfg.name = TRITON_CACHED
    cfg.response_cache.enable = True
    (repo / TRITON_CACHED / CONFIG_NAME).write_text(text_format.MessageToString(cfg))
    seal.seal_model(repo / TRITON_CACHED)  # the config changed: sealed again, as a publisher
    n = manifest.read(repo / MODEL / "1").schema.row_shape[0]
    files = out / "files"
    files.mkdir(exist_ok=True)
    exp = ExperimentDoc.single("bench", {"control": Target(MODEL, 1)}, {"control": 1.0})
    (files / "experiment.json").write_text(exp.dumps())
    for name, limits in (
        ("decide", Limits()),
        ("decide_cached", Limits(cache_max_bytes=CACHE_BYTES, cache_ttl_ms=CACHE_TTL_MS)),
    ):
        rep.write_router(
            repo, files / "experiment.json", n, name=name, in_process=True,
            thresholds=signal.Thresholds(), limits=limits,
        )  # fmt: skip
    return repo, n


def mixed(rows: F32, hot_share: float, n: int, seed: int) -> tuple[F32, list[str]]:
    """``n`` rows: ``hot_share`` of them one of the first HOT_ROWS rows, the rest distinct.

    A distinct row past the end of ``rows`` is an earlier one with its first
    feature moved by 1e-3 per pass: other bytes, a realistic value.
    """
    rng = np.random.default_rng(seed)
    hot = rng.random(n) < hot_share
    pool = rows[HOT_ROWS:]
    out = np.empty((n, *rows.shape[1:]), dtype=np.float32)
    keys: list[str] = []
    cold = 0
    for i in range(n):
        if hot[i]:
            h = int(rng.integers(HOT_ROWS))
            out[i] = rows[h]
            keys.append(f"hot{h}")
        else:
            out[i] = pool[cold % len(pool)]
            out[i].reshape(-1)[0] += np.float32(1e-3) * (cold // len(pool))
            keys.append(f"sym{cold % 500}")
            cold += 1
    return out, keys


def inputs(rows: F32, out: Path) -> dict[str, Path]:
    """The perf_analyzer input files, by name (see the module's docstring)."""
    files: dict[str, Path] = {}

    def write(name: str, x: F32, keys: Sequence[str]) -> None:
        files[name] = pa.write_input_json(
            x, out / f"{name}.json", input_name="features", strings={"key": keys}
        )

    write("one", rows[:1], ["hot0"])
    write(
        "distinct", rows[HOT_ROWS : HOT_ROWS + DISTINCT], [f"sym{i % 500}" for i in range(DISTINCT)]
    )
    for name, share in (("mix50", 0.5), ("mix90", 0.9)):
        write(name, *mixed(rows, share, MIX_REQUESTS, seed=int(share * 100)))
    return files


def _cache_counts(server: LocalTriton, model: str) -> tuple[float, float]:
    """The answer cache's hits and misses of ``model``, all instances (as last pushed)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    got = {"hits": 0.0, "misses": 0.0}
    for line in text.splitlines():
        for what in got:
            head = f"setsuna_router_cache_{what}_total{{"
            if line.startswith(head) and f'router="{model}"' in line:
                got[what] += float(line.rsplit(" ", 1)[1])
    return got["hits"], got["misses"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.cache", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    try:
        return _main(args)
    except SetsunaError as exc:
        print(f"perf/cache.py: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    binary = pa.locate()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    repo, _ = build(args.model_repository, out)
    rows, origin = input_rows(manifest.read(repo / MODEL / "1").schema, 10_000)
    data = inputs(rows, out)
    print(f"rows: {origin}", flush=True)
    runs: list[dict[str, Any]] = []
    with LocalTriton.on_free_ports(
        repo, cache_size_bytes=TRITON_CACHE_BYTES, log_path=out / "triton.log"
    ) as server:
        for round_ in range(1, args.rounds + 1):
            # Every other round backwards: neither side of a pair always runs first.
            for path in PLAN if round_ % 2 else PLAN[::-1]:
                spec = pa.RunSpec(
                    path.model,
                    server.grpc_url,
                    protocol="grpc",
                    concurrency=path.concurrency,
                    batch_size=path.batch,
                    input_data=data[path.data],
                    window_ms=args.window_ms,
                    timeout_s=180,
                )
                before = _cache_counts(server, path.model)
                r = pa.run(binary, spec)
                if not r.ok:  # one retry with longer windows, as the sweep does
                    r = pa.run(binary, spec.__class__(**{**spec.__dict__, "window_ms": 2000}))
                after = _cache_counts(server, path.model)
                looked = (after[0] - before[0]) + (after[1] - before[1])
                hit_share = (after[0] - before[0]) / looked if looked else r.server.hit_share
                runs.append(_record(round_, path, r, hit_share))
                share = "" if hit_share is None else f"  hits {hit_share:.0%}"
                print(f"  r{round_} {path.name:31} {pa.summarize([r])}{share}", flush=True)
    report = _report(runs, args.rounds)
    print(report["table"])
    (out.parent / "cache.json").write_text(json.dumps(report, indent=2))
    return 0


def _record(round_: int, path: Leg, r: pa.RunResult, hit_share: float | None) -> dict[str, Any]:
    row = r.row if r.ok else None
    return {
        "round": round_,
        "model": path.model,
        "data": path.data,
        "concurrency": path.concurrency,
        "batch": path.batch,
        "ok": r.ok,
        "message": r.message,
        "p50_ms": None if row is None else row.p50_us / 1e3,
        "p99_ms": None if row is None else row.p99_us / 1e3,
        "infer_s": None if row is None else row.throughput_infer_s,
        "hit_share": hit_share,
        "command": list(r.command),
    }


def _span(values: Sequence[float | None], fmt: str) -> str:
    """The median over rounds and, when they differ, the range: ``1.02 (0.86-1.21)``."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return "failed"
    mid, lo, hi = (format(v, fmt) for v in (statistics.median(got), got[0], got[-1]))
    return mid if lo == hi else f"{mid} ({lo}-{hi})"


def _report(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    def get(model: str, data: str, c: int, what: str, b: int = 1) -> list[float | None]:
        by_round: dict[int, float | None] = {r: None for r in range(1, rounds + 1)}
        for run in runs:
            if (run["model"], run["data"], run["concurrency"], run["batch"]) == (model, data, c, b):
                by_round[run["round"]] = run[what]
        return [by_round[r] for r in range(1, rounds + 1)]

    def ratio(a: list[float | None], b: list[float | None]) -> list[float | None]:
        return [x / y if x is not None and y else None for x, y in zip(a, b, strict=True)]

    ref = get(TRITON_CACHED, "one", 1, "p50_ms")
    lines = [
        f"Median (range) over {rounds} rounds; each ratio is taken within a round.",
        "",
        "c=1, one row repeated (ratio: p50 over Triton's cache hit)",
        "| path | p50 ms | p99 ms | p50 vs Triton's cache hit |",
        "|---|---|---|---|",
    ]
    for model, label in (
        (TRITON_CACHED, "Triton response cache hit (lightgbm_cached)"),
        ("decide_cached", "decide, answer cache hit"),
        ("decide", "decide, no cache"),
        (MODEL, "lightgbm direct, no cache"),
    ):
        p50, p99 = get(model, "one", 1, "p50_ms"), get(model, "one", 1, "p99_ms")
        lines.append(
            f"| {label} | {_span(p50, '.3f')} | {_span(p99, '.3f')} "
            f"| {_span(ratio(p50, ref), '.2f')}x |"
        )
    miss = ratio(
        get("decide_cached", "distinct", 1, "p50_ms"), get("decide", "distinct", 1, "p50_ms")
    )
    lines += [
        "",
        f"c=1, distinct rows (all misses): decide_cached p50 "
        f"{_span(get('decide_cached', 'distinct', 1, 'p50_ms'), '.3f')} ms vs decide "
        f"{_span(get('decide', 'distinct', 1, 'p50_ms'), '.3f')} ms: {_span(miss, '.2f')}x",
        "",
        "c=32 throughput (infer/s; hit share measured in the run)",
        "| input | decide, no cache | decide, answer cache (hits) | cache / no cache "
        "| lightgbm direct | lightgbm, Triton cache (hits) | decide cache / Triton cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for data in ("distinct", "mix50", "mix90"):
        plain, cached = (
            get("decide", data, 32, "infer_s"),
            get("decide_cached", data, 32, "infer_s"),
        )
        direct, triton = get(MODEL, data, 32, "infer_s"), get(TRITON_CACHED, data, 32, "infer_s")
        hits = get("decide_cached", data, 32, "hit_share")
        t_hits = get(TRITON_CACHED, data, 32, "hit_share")
        lines.append(
            f"| {data} | {_span(plain, ',.0f')} | {_span(cached, ',.0f')} ({_span(hits, '.0%')}) "
            f"| {_span(ratio(cached, plain), '.2f')}x | {_span(direct, ',.0f')} "
            f"| {_span(triton, ',.0f')} ({_span(t_hits, '.0%')}) "
            f"| {_span(ratio(cached, triton), '.2f')}x |"
        )
    plain = get("decide", "mix90", 1, "infer_s", BATCH)
    cached = get("decide_cached", "mix90", 1, "infer_s", BATCH)
    hits = get("decide_cached", "mix90", 1, "hit_share", BATCH)
    lines += [
        "",
        f"c=1, {BATCH} rows per request, mix90: decide_cached {_span(cached, ',.0f')} infer/s "
        f"({_span(hits, '.0%')} hits) vs decide {_span(plain, ',.0f')}: "
        f"{_span(ratio(cached, plain), '.2f')}x",
    ]
    return {"runs": runs, "table": "\n".join(lines)}


if __name__ == "__main__":
    raise SystemExit(main())
