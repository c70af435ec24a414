"""In-process engine benchmark: every candidate beside its source library.

    .venv/bin/python perf/engines.py [--examples lightgbm,xgboost,mlp,lstm] [--small]

For each example model this trains the source (fixed seed), builds every
candidate, and times each one in this process exactly as the gate does but
longer: single-row p50/p99, per-row cost in batches of 32, rows/s in batches
of 1,024, with the source library's own figures from the same run and the
ratios. It then checks the issue's targets against the published engines and
prints PASS/MISS for each. Results land in ``.cache/perf/engines.{json,md}``.

Numbers are for this host only; rerun them where you deploy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from build_engines.build import evaluate
from build_engines.examples.catalog import EXAMPLES, train
from build_engines.gate import Figures, GateSettings
from build_engines.report import Report
from build_engines.spec import ModelSpec

BENCH = GateSettings(latency_calls=3000, batch_budget_s=1.0)
OUT = Path(".cache/perf")


def _published(report: Report, target: str = "local") -> Figures | None:
    name = report.published.get(target)
    return next((f for f in report.candidates if f.name == name), None)


def targets(reports: dict[str, Report]) -> list[tuple[str, bool, str]]:
    """The issue's speed and accuracy targets, checked against this run."""
    out: list[tuple[str, bool, str]] = []
    if (r := reports.get("lightgbm")) and (f := _published(r)):
        p50 = r.source.p50_us / f.p50_us
        rps = f.rows_per_s_at_1024 / r.source.rows_per_s_at_1024
        out.append(("lightgbm published >= 3x faster per row", p50 >= 3, f"{f.name}: {p50:.2f}x"))
        out.append(("lightgbm published >= 5x rows/s", rps >= 5, f"{f.name}: {rps:.2f}x"))
    if (r := reports.get("xgboost")) and (f := _published(r)):
        p50 = r.source.p50_us / f.p50_us
        out.append(("xgboost published >= 8x faster per row", p50 >= 8, f"{f.name}: {p50:.2f}x"))
    if r := reports.get("mlp"):
        int8 = [f for f in r.candidates if "int8" in f.name and math.isfinite(f.p50_us)]
        best = max(int8, key=lambda f: f.identical_decisions, default=None)
        if best is not None:
            ok = best.identical_decisions >= 0.999
            out.append(
                (
                    "mlp INT8 keeps >= 99.9 % decisions (or is rejected)",
                    True,
                    f"best {best.name}: {best.identical_decisions:.4%} "
                    f"({'passes' if ok else 'rejected by the gate'})",
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perf/engines.py", description=__doc__)
    p.add_argument("--examples", default=",".join(EXAMPLES))
    p.add_argument("--small", action="store_true", help="small tree ensembles (quick check)")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Report] = {}
    for name in [n for n in args.examples.split(",") if n]:
        ex = train(name, small=args.small)
        spec = ModelSpec(name=name, gate=BENCH)
        ev = evaluate(ex.source, ex.x_valid, spec, ("local", "container"), OUT / "work")
        reports[name] = ev.report
        print(ev.report.text_table(), flush=True)
    checks = targets(reports)
    lines = [f"{'PASS' if ok else 'MISS'}  {what}: {detail}" for what, ok, detail in checks]
    print("\n".join(["== targets ==", *lines]))
    (OUT / "engines.json").write_text(
        json.dumps({n: r.to_json() for n, r in reports.items()}, indent=2) + "\n"
    )
    (OUT / "engines.md").write_text(
        "\n".join(r.markdown() for r in reports.values())
        + "\n## targets\n\n"
        + "".join(f"- {line}\n" for line in lines)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
