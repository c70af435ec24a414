"""The serving targets, checked on the deployment ``make build-engines`` wrote.

    .venv/bin/python -m perf.targets [--model-repository model_repository/local]

Starts the local Triton with every example engine loaded (the tuned configs
of ``build_engines/tuning/tuned.json``), drives ``lightgbm`` with perf_analyzer on distinct
held-out rows (client on the same 2 cores), and prints each figure beside
its target with PASS/MISS: c=1 p99 over HTTP and gRPC, single-row infer/s and
p99 at c=32, rows/s with 1,024-row binary requests (c=1, 2, 4), the memory of
the server and its stub processes (PSS, so shared pages are counted once; the
plain RSS sum is printed too) with the engines alone and, for the target, with
every model of the repository loaded (examples and ensembles: a second server,
started after the runs), broken down per model and instance, and **stalls**: a
``--stall-seconds`` (60) run
at c=1 over gRPC whose every request is checked in perf_analyzer's profile
export; one slower than 450 ms (``perf_analyzer.STALL_LATENCY_US``, the
dynamic batcher's 500 ms sleep) or refused by a queue timeout is a stall, and
the target is none. Writes nothing but a JSON summary in
``.cache/perf/targets.json``.

Forests are published on ``setsuna_forest`` (the native backend): the
native targets (gRPC c=1 p99 <= 0.5 ms; c=32 >= 15,000 infer/s with p99 <= 5
ms) are judged beside the Python-backend ones, and the engines' memory is
measured again with every native forest republished on the Python wrapper
(a sealed copy in a temporary repository, ``--no-wrapper-memory`` skips it),
so the two figures come from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from build_engines.repository import WRAPPER
from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.inputs import input_rows
from setsuna import manifest, model_config, native_forest, seal
from setsuna.server import LocalTriton, ServerSettings

OUT = Path(".cache/perf")
MODEL = "lightgbm"
STALL_SECONDS = 60.0
#: Measurement window of the c=32 runs (see where they run).
C32_WINDOW_MS = 250
#: Windows of the stall run: 3 of a third each; stability 100 % so any three count
#: (perf_analyzer needs 3 "stable" windows and writes no export for an unstable run).
_STALL_WINDOWS = 3


@dataclass(frozen=True)
class Memory:
    """A server's memory: PSS and RSS summed over it and its stubs, and PSS per model."""

    pss_mib: float
    rss_mib: float
    #: ``tritonserver`` itself, then each model: (instances, PSS MiB of all of them).
    per_model: dict[str, tuple[int, float]]

    @property
    def pss_mb(self) -> float:
        return self.pss_mib * 1.048576

    def describe(self) -> str:
        parts = [
            f"{name} {n}x {mib * 1.048576 / n:.0f}" if n > 1 else f"{name} {mib * 1.048576:.0f}"
            for name, (n, mib) in sorted(self.per_model.items(), key=lambda kv: -kv[1][1])
        ]
        return "MB PSS: " + ", ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "pss_mib": self.pss_mib,
            "rss_sum_mib": self.rss_mib,
            "per_model": {
                k: {"instances": n, "pss_mib": v} for k, (n, v) in self.per_model.items()
            },
        }


def _stub_model(cmdline: list[str]) -> str:
    """The model a Python-backend stub serves, from its ``<repo>/<model>/<version>/model.py``."""
    script = Path(cmdline[1]) if len(cmdline) > 1 else Path()
    return script.parent.parent.name if script.name == "model.py" else "(other)"


def measure_memory(pid: int) -> Memory:
    root = psutil.Process(pid)
    per: dict[str, tuple[int, float]] = {}
    pss = rss = 0
    for p in [root, *root.children(recursive=True)]:
        info = p.memory_full_info()
        pss, rss = pss + info.pss, rss + info.rss
        name = "tritonserver" if p.pid == pid else _stub_model(p.cmdline())
        n, mib = per.get(name, (0, 0.0))
        per[name] = (n + 1, mib + info.pss / 2**20)
    return Memory(pss / 2**20, rss / 2**20, per)


STALL_KEY = "grpc c=1 stall run"


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of the server's process tree and of the whole host, and requests answered."""

    server_s: float
    host_busy_s: float
    answered: float


def _cpu_snapshot(pid: int, metrics_url: str) -> CpuSnapshot:
    import urllib.request

    root = psutil.Process(pid)
    server = 0.0
    for p in [root, *root.children(recursive=True)]:
        t = p.cpu_times()
        server += t.user + t.system
    host = psutil.cpu_times()
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    answered = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nv_inference_request_success{") and f'model="{MODEL}"' in line
    )
    return CpuSnapshot(server, host.user + host.system + host.nice, answered)


def _cpu_per_request(a: CpuSnapshot, b: CpuSnapshot) -> str:
    """Server and rest-of-host CPU per answered request over a run (the noise diagnosis:
    the same build costs more CPU per request on a busier host)."""
    n = b.answered - a.answered
    if n <= 0:
        return "no requests answered"
    server = (b.server_s - a.server_s) / n * 1e6
    rest = (b.host_busy_s - a.host_busy_s) / n * 1e6 - server
    return f"CPU per request: server {server:.0f} us, rest of host {rest:.0f} us"


def wrapper_copy(repo: Path, models: tuple[str, ...], dest: Path) -> tuple[str, ...]:
    """``models`` copied into ``dest`` with every native forest on the Python wrapper.

    The copy is what ``make build-engines`` writes with ``SETSUNA_NATIVE=0``:
    ``backend: "python"``, the wrapper's ``model.py`` listed in the manifest,
    and sealed again with the publisher's key. Returns the models that moved.
    """
    moved = []
    for name in models:
        shutil.copytree(repo / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        cfg_path = dest / name / model_config.CONFIG_NAME
        cfg = model_config.load(cfg_path, name=name)
        if cfg.backend != native_forest.BACKEND:
            continue
        version = dest / name / "1"
        m = manifest.read(version)
        text = cfg_path.read_text().replace(
            f'backend: "{native_forest.BACKEND}"', 'backend: "python"'
        )
        cfg_path.write_text(text)
        (version / "model.py").write_text(
            WRAPPER.format(model=name, engine=m.engine, candidate=m.candidate)
        )
        manifest.write(version, dataclasses.replace(m, files=manifest.hash_folder(version)))
        seal.seal_model(dest / name)
        moved.append(name)
    return tuple(moved)


def stall_check(
    run: pa.RunResult | None, seconds: float, others: dict[str, pa.RunResult]
) -> tuple[str, str, bool]:
    """The stall target: no request of the long c=1 run over the threshold, none refused.

    ``others`` (the other runs) are reported beside it, not judged: they are short.
    """
    what = f"0 stalls (> {pa.STALL_LATENCY_US / 1000:g} ms) in a {seconds:g} s c=1 gRPC run"
    rest = [r for k, r in others.items() if k != STALL_KEY]
    rest_stalls = sum(r.stalls for r in rest)
    rest_checked = sum(r.requests.requests for r in rest if r.requests is not None)
    aside = f"; the other runs: {rest_stalls} in {rest_checked:,} requests"
    if run is None:
        return what, "not run (--stall-seconds 0)" + aside, False
    q = run.requests
    if q is None:
        why = run.message or "no profile export"
        got = f"{run.stalls} stall(s); " if run.stalls else ""
        return what, f"{got}{run.status}: {why[:200]}" + aside, False
    top = "-" if q.max_latency_us is None else f"{q.max_latency_us / 1000:.2f} ms"
    got = f"{q.stalls} stall(s) in {q.requests:,} requests over {q.span_s:.1f} s, slowest {top}"
    if q.stalls:
        got += " (" + ", ".join(f"{x / 1000:.1f}" for x in q.stall_latencies_us) + " ms)"
    return what, got + aside, q.stalls == 0 and q.requests > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.targets", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=STALL_SECONDS,
        help="length of the c=1 gRPC stall run (0: skip it; the target then reads MISS)",
    )
    p.add_argument(
        "--no-wrapper-memory",
        action="store_true",
        help="skip measuring the engines' memory with the forests on the Python wrapper",
    )
    args = p.parse_args(argv)
    if not args.stall_seconds >= 0:
        p.error("--stall-seconds must be >= 0")
    binary = pa.locate()
    schema = manifest.read(args.model_repository / MODEL / "1").schema
    rows, _ = input_rows(schema)
    OUT.mkdir(parents=True, exist_ok=True)
    data = pa.write_input_json(rows, OUT / "targets_rows.json", input_name="features")
    # The engines only for the latency runs (the ensembles are perf/ensembles.py's);
    # the memory target is measured again below with every model loaded.
    engines = tuple(
        sorted(
            p.name
            for p in args.model_repository.iterdir()
            if (p / "1" / manifest.MANIFEST_NAME).is_file()
        )
    )
    settings = ServerSettings.on_free_ports(
        args.model_repository,
        http=True,  # this benchmark measures the HTTP frontend too (off by default)
        load_models=engines,
    )
    results: dict[str, pa.RunResult] = {}
    cost: dict[str, str] = {}
    with LocalTriton(settings) as server:
        engines_memory = measure_memory(server.pid or 0)

        def go(
            key: str,
            protocol: pa.Protocol,
            c: int,
            batch: int = 1,
            *,
            window_ms: int = 1000,
            stability_pct: float = 50.0,
            max_trials: int = 10,
            timeout_s: float = 120,
        ) -> None:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            spec = pa.RunSpec(
                MODEL,
                url,
                protocol=protocol,
                concurrency=c,
                batch_size=batch,
                input_data=data,
                window_ms=window_ms,
                stability_pct=stability_pct,
                max_trials=max_trials,
                timeout_s=timeout_s,
            )
            before = _cpu_snapshot(server.pid or 0, server.metrics_url)
            results[key] = pa.run(binary, spec)
            cost[key] = _cpu_per_request(before, _cpu_snapshot(server.pid or 0, server.metrics_url))
            print(f"  {key:24} {pa.summarize([results[key]])}; {cost[key]}", flush=True)

        go("grpc c=1", "grpc", 1)
        go("http c=1", "http", 1)
        # Short windows at c=32: perf_analyzer 2.47 erases each window's records from
        # a std::vector one index at a time (ValidLatencyMeasurement, quadratic), on a
        # main thread that 32 client threads starve here; at ~15k req/s a 1 s window
        # never finishes (docs/architecture.md, "Measuring").
        go("grpc c=32", "grpc", 32, window_ms=C32_WINDOW_MS)
        go("http c=32", "http", 32, window_ms=C32_WINDOW_MS)
        for c in (1, 2, 4):
            go(f"grpc b=1024 c={c}", "grpc", c, 1024)
        if args.stall_seconds > 0:
            window = max(50, round(args.stall_seconds * 1000 / _STALL_WINDOWS))
            go(
                STALL_KEY,
                "grpc",
                1,
                window_ms=window,
                stability_pct=100.0,
                max_trials=_STALL_WINDOWS,
                timeout_s=args.stall_seconds * 2 + 60,
            )
    # Every model of the repository, as `make serve` loads it: the memory target.
    with LocalTriton.on_free_ports(args.model_repository) as server:
        all_memory = measure_memory(server.pid or 0)
    wrapper_memory: Memory | None = None
    moved: tuple[str, ...] = ()
    if not args.no_wrapper_memory:
        with tempfile.TemporaryDirectory(prefix="setsuna-wrapper-") as tmp:
            moved = wrapper_copy(args.model_repository, engines, Path(tmp))
            if moved:
                with LocalTriton.on_free_ports(Path(tmp), load_models=engines) as server:
                    wrapper_memory = measure_memory(server.pid or 0)
    print(f"  memory, the engines alone: {engines_memory.describe()}")
    if wrapper_memory is not None:
        print(
            f"  the same, {len(moved)} forests on the Python wrapper: {wrapper_memory.describe()}"
        )
    print(f"  memory, every model:       {all_memory.describe()}")
    checks: list[tuple[str, str, bool]] = []

    def row(key: str) -> pa.LatencyRow | None:
        r = results[key]
        return r.row if r.ok else None

    for key in ("grpc c=1", "http c=1"):
        r = row(key)
        ok = r is not None and r.p99_us <= 1000
        checks.append((f"{key} p99 <= 1.0 ms", f"{r.p99_us / 1e3:.2f} ms" if r else "failed", ok))
    native = (
        model_config.load(
            args.model_repository / MODEL / model_config.CONFIG_NAME, name=MODEL
        ).backend
        == native_forest.BACKEND
    )
    r = row("grpc c=1")
    checks.append(
        (
            f"native backend ({'yes' if native else 'NO'}): grpc c=1 p99 <= 0.5 ms",
            f"{r.p99_us / 1e3:.3f} ms (p50 {r.p50_us / 1e3:.3f})" if r else "failed",
            native and r is not None and r.p99_us <= 500,
        )
    )
    r = row("grpc c=32")
    checks.append(
        (
            "native backend: grpc c=32 >= 15,000 infer/s with p99 <= 5 ms",
            f"{r.throughput_infer_s:,.0f} infer/s, p99 {r.p99_us / 1e3:.2f} ms" if r else "failed",
            native and r is not None and r.throughput_infer_s >= 15_000 and r.p99_us <= 5_000,
        )
    )
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
    n_models = sum(1 for p in args.model_repository.iterdir() if (p / "config.pbtxt").is_file())
    n_native = sum(
        1
        for p in args.model_repository.iterdir()
        if (p / "config.pbtxt").is_file()
        and f'backend: "{native_forest.BACKEND}"' in (p / "config.pbtxt").read_text()
    )
    checks.append(
        (
            "server memory, every example and ensemble loaded (all processes, PSS) <= 300 MB",
            f"{all_memory.pss_mb:.0f} MB PSS for {n_models} models ({n_native} of them "
            f"{native_forest.BACKEND} threads inside tritonserver) "
            f"({all_memory.rss_mib * 1.048576:.0f} MB RSS summed); the {len(engines)} engines "
            f"alone {engines_memory.pss_mb:.0f} MB",
            all_memory.pss_mb <= 300,
        )
    )
    if wrapper_memory is not None:
        checks.append(
            (
                "engines' memory on setsuna_forest below the Python wrapper's (same run, PSS)",
                f"{engines_memory.pss_mb:.0f} MB native vs {wrapper_memory.pss_mb:.0f} MB with "
                f"{len(moved)} forests ({', '.join(moved)}) on the wrapper "
                f"({engines_memory.pss_mb / wrapper_memory.pss_mb:.2f}x)",
                engines_memory.pss_mb < wrapper_memory.pss_mb,
            )
        )
    checks.append(stall_check(results.get(STALL_KEY), args.stall_seconds, results))
    print("== targets (lightgbm, tuned, client on the same cores) ==")
    for what, got, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {what}: {got}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "targets.json").write_text(
        json.dumps(
            {
                "runs": {k: r.to_json() for k, r in results.items()},
                "cpu_per_request": cost,
                "memory": {
                    "engines": engines_memory.to_json(),
                    "engines_forests_on_wrapper": (
                        None if wrapper_memory is None else wrapper_memory.to_json()
                    ),
                    "every_model": all_memory.to_json(),
                },
                "checks": [{"target": w, "measured": g, "pass": ok} for w, g, ok in checks],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
