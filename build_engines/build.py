"""Source -> candidates -> gate -> model repository, for one model.

This is the whole pipeline in one function, :func:`build_model`. Converters
are chosen by the source's kind; each returns candidates (or says why an
engine was skipped). The held-out rows are split once: the first part
calibrates static INT8 quantisation (and, with NaN planted, probes the
missing-value handling of ``allow_nan`` sources), the rest judges every
candidate, so no candidate is graded on the rows it was calibrated on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engines import composite, gate
from build_engines.base import F32, Built, Candidate, Converter, Skipped, Source, Target
from build_engines.report import Report
from build_engines.repository import write_model
from build_engines.spec import ModelSpec
from setsuna import native_forest
from setsuna.errors import GateError, InputError

#: Share of the held-out rows used for INT8 calibration (the rest judge).
CALIBRATION_SHARE = 0.2
#: Survivors this much slower than the fastest still count as tied; among tied
#: ones the most faithful, then the best at batches, wins. The same engine's p50
#: moved 6-7 % between runs here (tl2cgen 18.9 vs 20.1 us), so 10 %.
SPEED_TIE_SHARE = 0.10


@dataclass(frozen=True)
class BuildResult:
    """The report and, per target, the version folder that was published."""

    report: Report
    published: dict[Target, Path]


def converter_for(source: Source) -> Converter:
    """The converter module for a source kind (imported lazily: each pulls a stack)."""
    if source.kind in ("lightgbm", "xgboost", "sklearn"):
        from build_engines.candidates import trees

        return trees.convert
    if source.kind == "catboost":
        from build_engines.candidates import catboost_engines

        return catboost_engines.convert
    from build_engines.candidates import neural

    return neural.convert


def split_holdout(x_valid: F32) -> tuple[F32, F32]:
    """(calibration rows, judging rows) from the held-out rows."""
    n_cal = max(1, int(len(x_valid) * CALIBRATION_SHARE))
    if len(x_valid) - n_cal < 100:
        raise InputError(
            f"{len(x_valid)} held-out rows are too few to judge candidates; give at least "
            f"{math.ceil(100 / (1 - CALIBRATION_SHARE))}"
        )
    return np.ascontiguousarray(x_valid[:n_cal]), np.ascontiguousarray(x_valid[n_cal:])


def choose(
    candidates: Sequence[Candidate],
    figures: dict[str, gate.Figures],
    target: Target,
    profile: str,
) -> Candidate | None:
    """The fastest passing candidate the target can serve, for the model's profile.

    ``container`` (CPUs only) prefers Triton's native tree backend (FIL), then
    the fastest ONNX file, and never a TensorRT plan (a GPU engine);
    ``container-gpu`` prefers a plan, then FIL, then ONNX. FIL and TensorRT
    cannot be timed on a host without their backends, so that order is a
    rule, not a measurement (the report says which figures were measured).
    """
    ok = [c for c in candidates if figures[c.name].passed]
    if target == "local":
        ok = [c for c in ok if c.local and c.engine]
    else:
        cpu_only = target == "container"
        ok = [c for c in ok if c.container is not None and not (cpu_only and c.container.gpu)]
        gpu = [c for c in ok if c.container is not None and c.container.gpu]
        fil = [c for c in ok if c.container is not None and c.container.backend == "fil"]
        ok = gpu or fil or ok
    if not ok:
        return None

    def cost(c: Candidate) -> float:  # lower is faster, for either profile
        f = figures[c.name]
        v = f.p50_us if profile == "latency" else 1.0 / max(f.rows_per_s_at_1024, 1e-300)
        return v if math.isfinite(v) else math.inf

    best = min(cost(c) for c in ok)
    # Within timing noise of the fastest, prefer fidelity: never trade decisions for noise.
    close = (
        [c for c in ok if cost(c) <= best * (1.0 + SPEED_TIE_SHARE)] if math.isfinite(best) else ok
    )
    return min(
        close,
        key=lambda c: (
            -figures[c.name].identical_decisions,
            _finite_or_inf(figures[c.name].max_abs_diff),
            # then the better batch throughput: a tie on one row is not a tie at 1,024
            -_finite_or_zero(figures[c.name].rows_per_s_at_1024),
            cost(c),
        ),
    )


def _finite_or_zero(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


@dataclass(frozen=True)
class Evaluation:
    """Every candidate of one model, judged, and the pick for each target."""

    report: Report
    chosen: dict[Target, Candidate | None]
    stage: Path


def evaluate(
    source: Source,
    x_valid: F32,
    spec: ModelSpec,
    targets: Sequence[Target],
    workdir: Path,
    *,
    converter: Converter | None = None,
) -> Evaluation:
    """Convert ``source`` into every candidate, judge each, pick per target."""
    x_valid = source.schema.check(x_valid)
    calib, judge_rows = split_holdout(x_valid)
    stage = workdir / spec.name
    stage.mkdir(parents=True, exist_ok=True)
    built: list[Built] = (converter or converter_for(source))(source, stage, calib)
    # Every converter's candidates, custom ones included, face the same NaN probe.
    built = gate.screen_nan(built, source, calib)
    candidates = [b for b in built if isinstance(b, Candidate)]
    skipped = [b for b in built if isinstance(b, Skipped)]
    expected = source.reference(judge_rows)
    figures = {c.name: gate.judge(c, source, judge_rows, expected, spec.gate) for c in candidates}
    combo = composite.pair(candidates, figures, stage, judge_rows)
    if combo is not None:
        candidates.append(combo)
        figures[combo.name] = gate.judge(combo, source, judge_rows, expected, spec.gate)
    chosen = {t: choose(candidates, figures, t, spec.profile) for t in targets}
    report = Report(
        model=spec.name,
        source_kind=source.kind,
        source_sha256=source.sha256,
        profile=spec.profile,
        min_identical_decisions=spec.gate.min_identical_decisions,
        source=gate.measure_source(source, judge_rows, spec.gate),
        candidates=list(figures.values()),
        skipped=skipped,
        published={t: c.name for t, c in chosen.items() if c is not None},
    )
    report.write(stage)
    return Evaluation(report, chosen, stage)


def build_model(
    source: Source,
    x_valid: F32,
    spec: ModelSpec,
    repo_root: Path,
    targets: Sequence[Target],
    workdir: Path,
    *,
    converter: Converter | None = None,
    echo: bool = True,
) -> BuildResult:
    """Build, judge and publish one model; raise GateError if a target gets nothing."""
    ev = evaluate(source, x_valid, spec, targets, workdir, converter=converter)
    if echo:
        print(ev.report.text_table(), flush=True)
    missing = [t for t, c in ev.chosen.items() if c is None]
    if missing:
        raise GateError(
            f"{spec.name}: no candidate passed the gate for target(s) {missing}; see "
            f"{ev.stage / 'gate_report.md'}. Lower min_identical_decisions only if those "
            "decision flips are acceptable, or fix the conversion"
        )
    published = {
        t: write_model(repo_root / t, spec, source, c, t, ev.report)
        for t, c in ev.chosen.items()
        if c is not None
    }
    local = ev.chosen.get("local")
    if echo and local is not None:
        native, why = native_forest.choose(local.engine or "", local.params)
        how = f"{native_forest.BACKEND} (native)" if native else f"the Python wrapper ({why})"
        print(f"{spec.name} (local): {local.name} served by {how}", flush=True)
    return BuildResult(report=ev.report, published=published)
