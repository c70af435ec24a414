"""What the ensembles cost over calling the model directly, from one server and one run.

    .venv/bin/python -m perf.ensembles [--model-repository model_repository/local]

Builds a repository in ``.cache/perf/ensembles/`` from the built ``lightgbm``
(and ``xgboost``, the selector's second variant): ``router`` (one arm,
lightgbm:1, 100 %), ``selector`` (lightgbm:1 vs xgboost:1, a loose budget,
so it serves lightgbm), ``signal`` and the ``decision`` ensemble (router ->
signal), every Python model with batching off and 2 instances like the tuned
lightgbm. Then perf_analyzer drives each at concurrency 1 and 32 on distinct
held-out rows (gRPC; a sticky key per row) and the table prints each beside
the direct call, as ratios. Targets (issue 4): the full decision <= 2x the
direct call's latency at c=1 and >= 60 % of its throughput at c=32. Writes
``.cache/perf/ensembles.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Final

from ensembles import repository as rep
from ensembles import signal
from perf import perf_analyzer as pa
from perf.triton import input_rows
from setsuna import manifest
from setsuna.errors import SetsunaError
from setsuna.server import LocalTriton, ServerSettings, free_ports

OUT: Final = Path(".cache/perf/ensembles")
MODEL: Final = "lightgbm"
SECOND: Final = "xgboost"
ROWS: Final = 4096
TARGET_C1_RATIO: Final = 2.0
TARGET_C32_SHARE: Final = 0.60


def build(source: Path, out: Path) -> tuple[Path, int]:
    """The benchmark repository and the model's feature count."""
    repo = out / "repository"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for name in (MODEL, SECOND):
        shutil.copytree(source / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    n = manifest.read(repo / MODEL / "1").schema.row_shape[0]
    files = out / "files"
    files.mkdir(exist_ok=True)
    exp = {
        "format": 1,
        "name": "bench",
        "salt": "bench",
        "arms": {"control": {"model": MODEL, "version": 1}},
        "versions": [{"version": 1, "weights": {"control": 1.0}}],
    }
    (files / "experiment.json").write_text(json.dumps(exp))
    sel = {
        "format": 1,
        "family": MODEL,
        "budget_p99_ms": 1000.0,
        "variants": [
            {"model": MODEL, "version": 1, "prior_accuracy": 0.999},
            {"model": SECOND, "version": 1, "prior_accuracy": 0.99},
        ],
    }
    (files / "selector.json").write_text(json.dumps(sel))
    rep.write_router(repo, files / "experiment.json", n)
    rep.write_selector(repo, files / "selector.json", n)
    rep.write_signal(repo, {1: signal.Thresholds()})
    rep.write_decision(repo, n)
    rep.write_router(
        repo, files / "experiment.json", n, name="decide", in_process=True,
        thresholds=signal.Thresholds(),
    )  # fmt: skip
    return repo, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ensembles", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    try:
        return _main(args)
    except SetsunaError as exc:
        print(f"perf/ensembles.py: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    binary = pa.locate()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    repo, _ = build(args.model_repository, out)
    rows, _ = input_rows(manifest.read(repo / MODEL / "1").schema, ROWS)
    keys = [f"sym{i % 500}" for i in range(len(rows))]  # 500 symbols, sticky
    plain = pa.write_input_json(rows, out / "rows.json", input_name="features")
    keyed = pa.write_input_json(rows, out / "rows_keys.json", input_name="features",
                                strings={"key": keys})  # fmt: skip
    plan: list[tuple[str, Path, dict[str, str]]] = [
        (MODEL, plain, {}),
        ("router", plain, {"key": "sym1"}),
        ("selector", plain, {}),
        ("decision", keyed, {}),
        ("decide", keyed, {}),
    ]
    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
    results: dict[str, dict[int, pa.RunResult]] = {}
    with LocalTriton(settings, log_path=out / "triton.log") as server:
        for c in (1, 32):
            for model, data, params in plan:
                spec = pa.RunSpec(
                    model,
                    server.grpc_url,
                    protocol="grpc",
                    concurrency=c,
                    input_data=data,
                    window_ms=args.window_ms,
                    timeout_s=180,
                    parameters=params,
                )
                r = pa.run(binary, spec, csv_path=out / f"{model}-c{c}.csv")
                if not r.ok:  # one retry with longer windows, as the sweep does
                    r = pa.run(binary, spec.__class__(**{**spec.__dict__, "window_ms": 2000}))
                results.setdefault(model, {})[c] = r
                print(f"  {model:9} c={c:<3} {pa.summarize([r])}", flush=True)
    report = _report(results)
    print(report["table"])
    for line in report["checks"]:
        print(line)
    (out.parent / "ensembles.json").write_text(json.dumps(report, indent=2))
    return 0


def _report(results: dict[str, dict[int, pa.RunResult]]) -> dict[str, Any]:
    def row(model: str, c: int) -> pa.LatencyRow | None:
        r = results.get(model, {}).get(c)
        return r.row if r is not None and r.ok else None

    base1, base32 = row(MODEL, 1), row(MODEL, 32)
    lines = [
        "| path | c=1 p50 / p99 ms | vs direct (p50 / p99) | c=32 infer/s | share of direct |",
        "|---|---|---|---|---|",
    ]
    figures: dict[str, Any] = {}
    for model in results:
        a, b = row(model, 1), row(model, 32)
        f: dict[str, Any] = {}
        cell1 = cell2 = cell3 = cell4 = "failed"
        if a is not None:
            f.update(c1_p50_ms=a.p50_us / 1e3, c1_p99_ms=a.p99_us / 1e3)
            cell1 = f"{a.p50_us / 1e3:.2f} / {a.p99_us / 1e3:.2f}"
            if base1 is not None:
                f.update(c1_p50_ratio=a.p50_us / base1.p50_us, c1_p99_ratio=a.p99_us / base1.p99_us)
                cell2 = f"{f['c1_p50_ratio']:.2f}x / {f['c1_p99_ratio']:.2f}x"
        if b is not None:
            f.update(c32_infer_s=b.throughput_infer_s, c32_p99_ms=b.p99_us / 1e3)
            cell3 = f"{b.throughput_infer_s:,.0f} (p99 {b.p99_us / 1e3:.1f} ms)"
            if base32 is not None:
                f["c32_share"] = b.throughput_infer_s / base32.throughput_infer_s
                cell4 = f"{f['c32_share']:.0%}"
        figures[model] = f
        label = "direct" if model == MODEL else model
        lines.append(f"| {label} | {cell1} | {cell2} | {cell3} | {cell4} |")
    checks = []
    for path in ("decision", "decide"):
        checks += _checks(path, figures.get(path, {}))
    return {"figures": figures, "table": "\n".join(lines), "checks": checks}


def _checks(path: str, d: dict[str, Any]) -> list[str]:
    checks = []
    if "c1_p50_ratio" in d:
        ok = d["c1_p50_ratio"] <= TARGET_C1_RATIO
        checks.append(
            f"{'PASS' if ok else 'MISS'}  {path} c=1 p50 <= {TARGET_C1_RATIO:g}x direct: "
            f"{d['c1_p50_ratio']:.2f}x (p99 {d['c1_p99_ratio']:.2f}x)"
        )
    if "c32_share" in d:
        ok = d["c32_share"] >= TARGET_C32_SHARE
        checks.append(
            f"{'PASS' if ok else 'MISS'}  {path} c=32 >= {TARGET_C32_SHARE:.0%} of direct "
            f"throughput: {d['c32_share']:.0%}"
        )
    return checks


if __name__ == "__main__":
    raise SystemExit(main())
