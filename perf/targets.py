"""The serving targets, checked on the deployment ``make build-engines`` wrote.

    .venv/bin/python -m perf.targets [--model-repository model_repository/local]

Starts the local Triton with every example engine loaded (the tuned configs
of ``perf/tuned.json``), drives ``lightgbm`` with perf_analyzer on distinct
held-out rows (client on the same 2 cores), and prints each figure beside
its target with PASS/MISS: c=1 p99 over HTTP and gRPC, single-row infer/s and
p99 at c=32, rows/s with 1,024-row binary requests (c=1, 2, 4), and the
memory of the server and its stub processes (PSS, so shared pages are counted
once; the plain RSS sum is printed too). Writes nothing but a JSON summary in
``.cache/perf/targets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil

from perf import perf_analyzer as pa
from perf.triton import input_rows
from setsuna import manifest
from setsuna.server import LocalTriton, ServerSettings, free_ports

OUT = Path(".cache/perf")
MODEL = "lightgbm"


def _memory_mib(pid: int) -> tuple[float, float]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    pss = sum(p.memory_full_info().pss for p in procs) / 2**20
    rss = sum(p.memory_info().rss for p in procs) / 2**20
    return pss, rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.targets", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    args = p.parse_args(argv)
    binary = pa.locate()
    schema = manifest.read(args.model_repository / MODEL / "1").schema
    rows, _ = input_rows(schema)
    OUT.mkdir(parents=True, exist_ok=True)
    data = pa.write_input_json(rows, OUT / "targets_rows.json", input_name="features")
    http, grpc, metrics = free_ports(3)
    # The engines only: the memory target is about the example models, and the
    # ensembles (router, decide, ...) are measured by perf/ensembles.py.
    engines = tuple(
        sorted(
            p.name
            for p in args.model_repository.iterdir()
            if (p / "1" / manifest.MANIFEST_NAME).is_file()
        )
    )
    settings = ServerSettings(
        args.model_repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        http=True,  # this benchmark measures the HTTP frontend too (off by default)
        load_models=engines,
    )
    results: dict[str, pa.RunResult] = {}
    with LocalTriton(settings) as server:
        pss, rss = _memory_mib(server.pid or 0)

        def go(key: str, protocol: pa.Protocol, c: int, batch: int = 1) -> None:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            spec = pa.RunSpec(
                MODEL,
                url,
                protocol=protocol,
                concurrency=c,
                batch_size=batch,
                input_data=data,
                window_ms=1000,
                timeout_s=120,
            )
            results[key] = pa.run(binary, spec)
            print(f"  {key:24} {pa.summarize([results[key]])}", flush=True)

        go("grpc c=1", "grpc", 1)
        go("http c=1", "http", 1)
        go("grpc c=32", "grpc", 32)
        go("http c=32", "http", 32)
        for c in (1, 2, 4):
            go(f"grpc b=1024 c={c}", "grpc", c, 1024)
    checks: list[tuple[str, str, bool]] = []

    def row(key: str) -> pa.LatencyRow | None:
        r = results[key]
        return r.row if r.ok else None

    for key in ("grpc c=1", "http c=1"):
        r = row(key)
        ok = r is not None and r.p99_us <= 1000
        checks.append((f"{key} p99 <= 1.0 ms", f"{r.p99_us / 1e3:.2f} ms" if r else "failed", ok))
    for key in ("grpc c=32", "http c=32"):
        r = row(key)
        ok = r is not None and r.throughput_infer_s >= 10_000 and r.p99_us <= 10_000
        what = (
            f"{r.throughput_infer_s:,.0f} infer/s, p99 {r.p99_us / 1e3:.2f} ms" if r else "failed"
        )
        checks.append((f"{key} >= 10,000 infer/s with p99 <= 10 ms", what, ok))
    best = max(
        ((k, r.throughput_infer_s) for k in results if "1024" in k and (r := row(k))),
        key=lambda kv: kv[1],
        default=("none", 0.0),
    )
    checks.append(
        ("1,024-row requests >= 150,000 rows/s", f"{best[1]:,.0f} ({best[0]})", best[1] >= 150_000)
    )
    checks.append(
        (
            "server memory (all processes, PSS) <= 300 MB",
            f"{pss * 1.048576:.0f} MB PSS ({rss * 1.048576:.0f} MB RSS summed)",
            pss * 1.048576 <= 300,
        )
    )
    print("== targets (lightgbm, tuned, client on the same cores) ==")
    for what, got, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {what}: {got}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "targets.json").write_text(
        json.dumps(
            {
                "runs": {k: r.to_json() for k, r in results.items()},
                "memory_mib": {"pss": pss, "rss_sum": rss},
                "checks": [{"target": w, "measured": g, "pass": ok} for w, g, ok in checks],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
