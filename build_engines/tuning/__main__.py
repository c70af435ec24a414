"""``python -m build_engines.tuning``: sweep, choose, report, write ``tuned.json``.

Exit status: 0 when a variant was chosen for every model, 1 when some model
got none, 2 on bad input (no built repository, an unknown variant, a bad
budget) or a missing perf_analyzer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from build_engines import tuning
from build_engines.repository import VERSION
from build_engines.tuning import choice as choice_doc
from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning import sweep as sweep_doc
from build_engines.tuning import variants as variants_doc
from build_engines.tuning.choice import (
    DEFAULT_BUDGET_P99_MS,
    FALLBACK_BUDGET_P99_MS,
    choice_json,
    choose,
)
from build_engines.tuning.report import markdown, plot_models, public
from build_engines.tuning.served import ServedModel
from build_engines.tuning.sweep import CACHE_BYTES, CONCURRENCY, OUT, Settings, Sweep
from build_engines.tuning.tuned import TUNED_PATH, write_tuned
from build_engines.tuning.variants import QUICK_VARIANTS, Variant, make_variants
from setsuna import manifest
from setsuna.errors import ConfigError, SetsunaError
from setsuna.model_config import CONFIG_NAME

PROG = "python -m build_engines.tuning"
#: --help says what is swept and how the choice is made: what the options change.
_DESCRIPTION = "\n".join(str(m.__doc__) for m in (tuning, variants_doc, sweep_doc, choice_doc))


def _budgets(text: str) -> dict[str, float]:
    out = dict(DEFAULT_BUDGET_P99_MS)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or not name or not ms > 0:
            raise ConfigError(f"--budget-ms {item!r}: give name=milliseconds, e.g. lstm=3")
        out[name] = ms
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--models", default="", help="comma-separated (default: every model folder)")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    p.add_argument(
        "--budget-ms", default="", help="per-model p99 budgets, e.g. lightgbm=1.5,lstm=3"
    )
    p.add_argument("--protocol", choices=pa.PROTOCOLS, default="grpc")
    p.add_argument(
        "--concurrency", default=",".join(map(str, CONCURRENCY)), help="ascending levels"
    )
    p.add_argument("--window-ms", type=int, default=500)
    p.add_argument("--stability-pct", type=float, default=50.0)
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=40.0, help="start no run after this")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: variants {','.join(QUICK_VARIANTS)}, concurrency 1,32, 300 ms windows",
    )
    p.add_argument(
        "--stalled",
        default="",
        help="variants known to stall on this Triton build (from an earlier sweep): not eligible",
    )
    p.add_argument("--allow-response-cache", action="store_true")
    p.add_argument(
        "--allow-batching-off",
        action="store_true",
        help="let a batching-off variant be chosen (default: measured as the baseline only)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tuned", type=Path, default=TUNED_PATH, help="file the choice is merged into")
    p.add_argument("--no-write-tuned", action="store_true", help="report only")
    p.add_argument("--perf-analyzer-dir", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except SetsunaError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    binary = pa.locate(args.perf_analyzer_dir)
    version = binary.version()
    levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    window, wanted = args.window_ms, [v for v in args.variants.split(",") if v]
    if args.quick:
        levels, window = (1, 32), 300
        wanted = wanted or list(QUICK_VARIANTS)
    if not levels or list(levels) != sorted(set(levels)) or levels[0] < 1:
        raise ConfigError(f"--concurrency {args.concurrency!r}: give ascending levels >= 1")
    settings = Settings(
        protocol=args.protocol,
        concurrency=levels,
        window_ms=window,
        stability_pct=args.stability_pct,
        max_trials=args.max_trials,
        max_minutes=args.max_minutes,
        allow_cache=args.allow_response_cache,
        allow_batching_off=args.allow_batching_off,
    )
    models = _models(args.model_repository, [n for n in args.models.split(",") if n])
    variants = _variants(wanted)
    budgets = _budgets(args.budget_ms)

    lo, hi = settings.estimate_minutes(len(models), len(variants))
    print(
        f"{version}; {len(models)} model(s) x {len(variants)} variant(s), concurrency "
        f"{','.join(map(str, levels))}, {window} ms windows: about {lo:.1f}-{hi:.1f} min "
        f"(stops starting runs after {settings.max_minutes:g} min)",
        flush=True,
    )
    load_before = _load()
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_before:.2f} on {os.cpu_count()} CPUs: something "
            "else is running; figures will be noisy",
            flush=True,
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(binary, settings, out)
    sweep.stalled |= {v for v in args.stalled.split(",") if v}
    began = time.monotonic()
    reports = []
    for m in models:
        budget = budgets.get(m.name, FALLBACK_BUDGET_P99_MS)
        print(f"== {m.name}: p99 budget {budget:g} ms", flush=True)
        reports.append(sweep.run_model(m, variants, budget))
        ch = reports[-1]["choice"]
        print(f"== {m.name}: chose {ch['variant']} ({ch['why']})", flush=True)
    _choose_again(reports, settings, sweep.stalled)
    doc: dict[str, Any] = {
        "tool": PROG,
        "perf_analyzer": version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "elapsed_s": round(time.monotonic() - began, 1),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": round(load_before, 2),
            "load_after": round(_load(), 2),
        },
        "settings": dataclasses.asdict(settings) | {"cache_bytes": CACHE_BYTES},
        "models": reports,
        "runs_skipped_for_time": sweep.skipped,
        "_settings": settings,
    }
    plots, plot_note = plot_models(doc, out / "plots")
    (out / "report.md").write_text(markdown(doc, plots, plot_note))
    (out / "results.json").write_text(json.dumps(public(doc), indent=2, default=str) + "\n")
    print(f"report: {out / 'report.md'}; data: {out / 'results.json'}")
    if plot_note:
        print(plot_note)
    if sweep.skipped:
        print(f"warning: {sweep.skipped} run(s) skipped: --max-minutes ran out")
    if not args.no_write_tuned:
        _write_tuned(args.tuned, reports, doc, settings)
    return 0 if all(r["choice"]["serving"] is not None for r in reports) else 1


def _models(repo: Path, names: list[str]) -> list[ServedModel]:
    """The models to tune: ``names``, or every model folder the builder wrote."""
    if not repo.is_dir():
        raise ConfigError(f"{repo} does not exist: run `make build-engines` first")
    if not names:
        folders = sorted(p for p in repo.iterdir() if (p / CONFIG_NAME).is_file())
        built = [p for p in folders if (p / str(VERSION) / manifest.MANIFEST_NAME).is_file()]
        names = [p.name for p in built]
        others = [p.name for p in folders if p not in built]
        if others:
            print(f"skipping {', '.join(others)}: not built by build_engines (no manifest)")
    if not names:
        raise ConfigError(f"{repo} has no built models: run `make build-engines` first")
    return [ServedModel.load(repo, n) for n in names]


def _variants(wanted: list[str]) -> list[Variant]:
    """The variants asked for (all when none), ``default`` always first: the baseline."""
    variants = make_variants()
    if wanted:
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            known = ", ".join(v.name for v in variants)
            raise ConfigError(f"unknown variants {unknown}; known: {known}")
        variants = [v for v in variants if v.name in wanted]
    if variants[0].name != "default":
        variants = [v for v in make_variants() if v.name == "default"] + variants
    return variants


def _choose_again(reports: list[dict[str, Any]], settings: Settings, stalled: set[str]) -> None:
    """A variant chosen early may have stalled serving a later model: choose without it."""
    for r in reports:
        if r["_choice"].variant is not None and r["_choice"].variant.variant.name in stalled:
            r["_choice"] = choose(
                r["_results"],
                settings.protocol,
                r["budget_p99_ms"] * 1000,
                allow_cache=settings.allow_cache,
                allow_batching_off=settings.allow_batching_off,
                stalled_elsewhere=stalled,
                instances_are_threads=r["_instances_are_threads"],
            )
            r["choice"] = choice_json(r["_choice"], settings.protocol)
            print(f"== {r['model']}: re-chose {r['choice']['variant']} (a later model stalled it)")


def _write_tuned(
    path: Path, reports: list[dict[str, Any]], doc: dict[str, Any], settings: Settings
) -> None:
    """Merge each chosen variant's knobs, with the figures behind it, into ``path``."""
    entries = {
        r["model"]: {
            "serving": r["choice"]["serving"],
            "variant": r["choice"]["variant"],
            "budget_p99_ms": r["budget_p99_ms"],
            "budget_met": r["choice"]["budget_met"],
            "why": r["choice"]["why"],
            "at_budget": r["choice"]["point"],
            "c1": r["choice"]["c1"],
            "stall_check": r["choice"]["stall_check"],
        }
        for r in reports
        if r["choice"]["serving"] is not None
    }
    if entries:
        written = write_tuned(
            path,
            entries,
            generated_by=f"{PROG} (make perf)",
            date=doc["date"],
            host=doc["host"],
            protocol=settings.protocol,
        )
        print(f"tuned settings for {', '.join(entries)} -> {written}")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


if __name__ == "__main__":
    sys.exit(main())
