"""What the ensembles cost over calling the model directly, from one server and one run.

    .venv/bin/python -m perf.ensembles [--model-repository model_repository/local]

Builds a repository in ``.cache/perf/ensembles/`` from the built ``lightgbm``
(and ``xgboost``, the selector's second variant): ``router`` (one arm,
lightgbm:1, 100 %), ``selector`` (lightgbm:1 vs xgboost:1, a loose budget,
so it serves lightgbm), ``signal`` and the ``decision`` ensemble (router ->
signal) and ``decide`` (the router with its arm in process and the signal),
every Python model served as the examples are (``ensembles.repository.Serving``:
dynamically batched, one instance) and lightgbm with its tuned config. Then
perf_analyzer drives each at concurrency 1 and 32 on distinct held-out rows
(gRPC; a sticky key per row), in ``--rounds`` interleaved rounds (every
path at c=1, then every path at c=32, then the next round) so that each
ratio compares runs minutes apart, not a quiet minute with a loaded one.
The table prints each path's median beside the direct call's, as ratios
(median of the rounds' own ratios, and their range). perf_analyzer asks for
every output a model declares, so ``decide`` answers all eight (four of them
strings) where the direct call answers one.

Targets, each counted over the rounds: the ``decision`` ensemble <= 2x the
direct call's c=1 p50 and >= 60 % of its c=32 throughput (issue 4);
``decide`` <= 1.5x and >= 60 % in every round (issue 11). Writes
``.cache/perf/ensembles.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Final

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.inputs import input_rows
from ensembles import repository as rep
from ensembles import signal
from ensembles.__main__ import DECIDE_SERVING
from setsuna import manifest
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import SetsunaError
from setsuna.server import LocalTriton

OUT: Final = Path(".cache/perf/ensembles")
MODEL: Final = "lightgbm"
SECOND: Final = "xgboost"
ROWS: Final = 4096
#: Per path: (c=1 p50 at most this many times the direct call's, c=32 share at least).
TARGETS: Final = {"decision": (2.0, 0.60), "decide": (1.5, 0.60)}
PATHS: Final = (MODEL, "router", "selector", "decision", "decide")


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
    exp = ExperimentDoc.single("bench", {"control": Target(MODEL, 1)}, {"control": 1.0})
    (files / "experiment.json").write_text(exp.dumps())
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
        thresholds=signal.Thresholds(), serving=DECIDE_SERVING,
    )  # fmt: skip
    return repo, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ensembles", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (make perf: 5)")
    p.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)} (the direct call always runs)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)}; choose from {','.join(PATHS)}")
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
    data = {MODEL: plain, "router": plain, "selector": plain, "decision": keyed, "decide": keyed}
    params = {"router": {"key": "sym1"}}
    wanted = set(args.paths.split(",")) | {MODEL}
    plan = [m for m in PATHS if m in wanted]
    rounds: list[dict[str, dict[int, pa.RunResult]]] = []
    with LocalTriton.on_free_ports(repo, log_path=out / "triton.log") as server:
        for n in range(args.rounds):
            results: dict[str, dict[int, pa.RunResult]] = {}
            for c in (1, 32):
                for model in plan:
                    spec = pa.RunSpec(
                        model,
                        server.grpc_url,
                        protocol="grpc",
                        concurrency=c,
                        input_data=data[model],
                        window_ms=args.window_ms,
                        timeout_s=180,
                        parameters=params.get(model, {}),
                    )
                    r = pa.run(binary, spec, csv_path=out / f"{model}-c{c}.csv")
                    if not r.ok:  # one retry with longer windows, as the sweep does
                        r = pa.run(binary, spec.__class__(**{**spec.__dict__, "window_ms": 2000}))
                    results.setdefault(model, {})[c] = r
                    print(f"  round {n + 1} {model:9} c={c:<3} {pa.summarize([r])}", flush=True)
            rounds.append(results)
    report = _report([_figures(r) for r in rounds])
    print(report["table"])
    for line in report["checks"]:
        print(line)
    (out.parent / "ensembles.json").write_text(json.dumps(report, indent=2))
    return 0


Figures = dict[str, dict[str, float]]


def _figures(results: dict[str, dict[int, pa.RunResult]]) -> Figures:
    """One round's figures per path, with its ratios to that round's direct call."""

    def row(model: str, c: int) -> pa.LatencyRow | None:
        r = results.get(model, {}).get(c)
        return r.row if r is not None and r.ok else None

    base1, base32 = row(MODEL, 1), row(MODEL, 32)
    figures: Figures = {}
    for model in results:
        a, b = row(model, 1), row(model, 32)
        f: dict[str, float] = {}
        if a is not None:
            f.update(c1_p50_ms=a.p50_us / 1e3, c1_p99_ms=a.p99_us / 1e3)
            if base1 is not None:
                f.update(c1_p50_ratio=a.p50_us / base1.p50_us, c1_p99_ratio=a.p99_us / base1.p99_us)
        if b is not None:
            f.update(c32_infer_s=b.throughput_infer_s, c32_p99_ms=b.p99_us / 1e3)
            if base32 is not None:
                f["c32_share"] = b.throughput_infer_s / base32.throughput_infer_s
        figures[model] = f
    return figures


def _report(rounds: list[Figures]) -> dict[str, Any]:
    """Medians over the rounds (of the rounds' own ratios, with their range) and verdicts."""

    def series(model: str, key: str) -> list[float]:
        return [r[model][key] for r in rounds if key in r.get(model, {})]

    def cell(model: str, key: str, fmt: str, ratio: bool = False) -> str:
        v = series(model, key)
        if not v:
            return "failed"
        text = format(statistics.median(v), fmt) + ("x" if ratio else "")
        if len(v) > 1:
            text += f" ({format(min(v), fmt)}-{format(max(v), fmt)})"
        return text

    lines = [
        f"{len(rounds)} round(s); median (range over rounds)",
        "",
        "| path | c=1 p50 ms | p50 vs direct | p99 vs direct | c=32 infer/s | share of direct |",
        "|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(m for r in rounds for m in r))
    for model in models:
        label = "direct" if model == MODEL else model
        lines.append(
            f"| {label} | {cell(model, 'c1_p50_ms', '.2f')} "
            f"| {cell(model, 'c1_p50_ratio', '.2f', True)} "
            f"| {cell(model, 'c1_p99_ratio', '.2f', True)} "
            f"| {cell(model, 'c32_infer_s', ',.0f')} | {cell(model, 'c32_share', '.0%')} |"
        )
    checks = []
    for path, (ratio, share) in TARGETS.items():
        if path in models:
            checks += _checks(path, rounds, ratio, share)
    return {"rounds": rounds, "table": "\n".join(lines), "checks": checks}


def _checks(path: str, rounds: list[Figures], ratio: float, share: float) -> list[str]:
    """PASS when every round met the target (a round whose run failed counts as a miss)."""
    n = len(rounds)
    c1 = [r.get(path, {}).get("c1_p50_ratio") for r in rounds]
    c32 = [r.get(path, {}).get("c32_share") for r in rounds]
    met1 = sum(v is not None and v <= ratio for v in c1)
    met32 = sum(v is not None and v >= share for v in c32)

    def listed(values: list[float | None], fmt: str) -> str:
        return ", ".join("failed" if v is None else format(v, fmt) for v in values)

    return [
        f"{'PASS' if met1 == n else 'MISS'}  {path} c=1 p50 <= {ratio:g}x direct in "
        f"{met1}/{n} rounds: {listed(c1, '.2f')}",
        f"{'PASS' if met32 == n else 'MISS'}  {path} c=32 >= {share:.0%} of direct "
        f"throughput in {met32}/{n} rounds: {listed(c32, '.0%')}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
