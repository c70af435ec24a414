"""The accuracy gate: a candidate is published only if it decides like its source.

Every candidate runs on the same held-out rows as the source library. The
gate records how far its outputs drift (max |Δ|), the share of identical
decisions (class at the decision threshold for binary classifiers, the most
probable class (argmax) for multiclass ones, sign for regressors), single-row
p50/p99, the per-row cost of a batch of 32, rows/s at
a batch of 1,024, memory added by loading and size on disk. A candidate whose
identical-decision share is under the model's threshold (default 99.9 %) is
rejected, and keeps its figures in the report so the rejection can be read.
A multiclass candidate must also keep every class's probability within
``max_class_prob_diff_pp`` percentage points of the source's (max |Δ| per
class, recorded as ``class_max_abs_diff``), judged in one batch and row by
row like the decisions.

Before that, for a source built with ``allow_nan``, :func:`screen_nan` scores
every candidate on calibration rows with NaN planted in them, and skips the
ones that disagree with the source library there: held-out rows rarely hold
NaN, so the judgement alone could pass an engine whose missing-value handling
differs. It runs once, in :func:`build_engines.build.evaluate`, for every
converter (trees and neural alike).

Timing here is in-process and single-threaded by construction (engines are
loaded with their serving thread counts); end-to-end figures through Triton
belong to ``perf/``.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from build_engines.base import F32, Built, Candidate, Skipped, Source
from setsuna import runtime
from setsuna.errors import ConfigError, SetsunaError

#: Rows the NaN probe scores per candidate of an ``allow_nan`` source.
_NAN_PROBE_ROWS = 256
#: Share of the probe's values replaced by NaN (and its first row entirely).
_NAN_PROBE_SHARE = 0.2
_NAN_PROBE_TOL = 1e-4


@dataclass(frozen=True)
class GateSettings:
    """How strict and how long the gate is. Validated once, here."""

    #: Share of held-out rows whose decision must equal the source's.
    min_identical_decisions: float = 0.999
    #: Single-row calls timed for p50/p99.
    latency_calls: int = 400
    #: Wall time spent timing each batched figure.
    batch_budget_s: float = 0.25
    batch_rows: int = 1024
    small_batch_rows: int = 32
    #: Held-out rows also judged one at a time (decisions must not depend on batch-mates).
    row_by_row_rows: int = 2000
    #: Multiclass only: the largest |Δ| allowed in any class's probability, in
    #: percentage points (0.1 pp = 0.001). Float32 engines of a float64 library
    #: differ by ~1e-6; a flipped split moves a class by far more.
    max_class_prob_diff_pp: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.min_identical_decisions <= 1.0:
            raise ConfigError(
                f"min_identical_decisions={self.min_identical_decisions} must be in (0, 1]; "
                "use e.g. 0.999 for 99.9 %"
            )
        if self.latency_calls < 10:
            raise ConfigError(f"latency_calls={self.latency_calls}: time at least 10 calls")
        if not 0.0 <= self.max_class_prob_diff_pp <= 100.0:
            raise ConfigError(
                f"max_class_prob_diff_pp={self.max_class_prob_diff_pp}: give percentage "
                "points in [0, 100], e.g. 0.1 for 0.001 of probability"
            )
        if self.batch_budget_s <= 0 or self.batch_rows < 1 or self.small_batch_rows < 1:
            raise ConfigError("batch_budget_s, batch_rows and small_batch_rows must be positive")


@dataclass(frozen=True)
class Figures:
    """What the gate measured for one engine (the source included)."""

    name: str
    engine: str
    max_abs_diff: float
    identical_decisions: float
    p50_us: float
    p99_us: float
    per_row_us_at_32: float
    rows_per_s_at_1024: float
    load_mib: float
    size_bytes: int
    passed: bool
    reason: str = ""
    #: Multiclass: max |Δ| of each class's probability (batch and row by row), in class order.
    class_max_abs_diff: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decisions(scores: F32, source: Source) -> npt.NDArray[np.generic]:
    """Class at the threshold (binary), most probable class (multiclass), sign (regression)."""
    if source.classes:
        return np.asarray(np.argmax(scores.reshape(len(scores), -1), axis=1))
    flat = scores.reshape(-1)
    if source.task == "classification":
        return np.asarray(flat >= source.decision_threshold)
    return np.asarray(np.sign(flat))


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _timings(predict: Callable[[F32], F32], rows: F32, settings: GateSettings) -> dict[str, float]:
    """p50/p99 of one row, per-row cost at 32, rows/s at 1,024."""

    def batch_of(n: int) -> F32:
        reps = -(-n // len(rows))
        return np.ascontiguousarray(np.concatenate([rows] * reps)[:n]) if reps > 1 else rows[:n]

    singles = [np.ascontiguousarray(rows[i % len(rows)][np.newaxis]) for i in range(64)]
    for x in singles[:16]:  # warm caches, lazy allocations, JIT paths
        predict(x)
    lat_ns = np.empty(settings.latency_calls, dtype=np.int64)
    for i in range(settings.latency_calls):
        x = singles[i % len(singles)]
        t0 = time.perf_counter_ns()
        predict(x)
        lat_ns[i] = time.perf_counter_ns() - t0

    def rows_per_s(n: int) -> float:
        x = batch_of(n)
        predict(x)
        done, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < settings.batch_budget_s or done == 0:
            predict(x)
            done += n
        return done / elapsed

    small = rows_per_s(settings.small_batch_rows)
    return {
        "p50_us": float(np.percentile(lat_ns, 50)) / 1e3,
        "p99_us": float(np.percentile(lat_ns, 99)) / 1e3,
        "per_row_us_at_32": 1e6 / small,
        "rows_per_s_at_1024": rows_per_s(settings.batch_rows),
    }


def measure_source(source: Source, x_valid: F32, settings: GateSettings) -> Figures:
    """The source library's own figures: the row every ratio is taken against."""
    t = _timings(source.reference, x_valid, settings)
    return Figures(
        name="source",
        engine=source.reference_label,
        max_abs_diff=0.0,
        identical_decisions=1.0,
        load_mib=0.0,
        size_bytes=0,
        passed=True,
        reason="reference",
        p50_us=t["p50_us"],
        p99_us=t["p99_us"],
        per_row_us_at_32=t["per_row_us_at_32"],
        rows_per_s_at_1024=t["rows_per_s_at_1024"],
    )


def judge(
    candidate: Candidate,
    source: Source,
    x_valid: F32,
    expected: F32,
    settings: GateSettings,
) -> Figures:
    """Load ``candidate``, compare it with ``expected`` (the source on ``x_valid``), time it."""
    kind = candidate.engine or candidate.gate_engine
    params = candidate.params if candidate.engine else candidate.gate_params
    gc.collect()
    rss0 = _rss_bytes()
    try:
        engine = runtime.load(kind, candidate.folder, params)
        load_mib = max(0, _rss_bytes() - rss0) / 2**20
        got = engine.predict(x_valid)
        # Served batches are whatever the dynamic batcher forms, so a row must
        # decide the same alone as in a crowd (dynamic INT8 scales per batch).
        n_alone = min(len(x_valid), settings.row_by_row_rows)
        alone = np.concatenate([engine.predict(x_valid[i : i + 1]) for i in range(n_alone)])
    except Exception as exc:  # any runtime failure is a failed candidate, not a crash
        return _failed(candidate, kind, f"failed: {exc}", 0.0)
    if got.shape != expected.shape or alone.shape != expected[:n_alone].shape:
        return _failed(
            candidate, kind, f"output shape {got.shape} != source {expected.shape}", load_mib
        )
    with np.errstate(invalid="ignore"):
        diffs = np.concatenate([np.abs(got - expected), np.abs(alone - expected[:n_alone])])
    max_abs = float(np.nanmax(diffs)) if np.isfinite(diffs).any() else float("inf")
    want = decisions(expected, source)
    same = min(
        float(np.mean(decisions(got, source) == want)),
        float(np.mean(decisions(alone, source) == want[:n_alone])),
    )
    passed = same >= settings.min_identical_decisions
    reason = (
        ""
        if passed
        else f"{same:.4%} identical decisions < required {settings.min_identical_decisions:.2%}"
    )
    per_class: tuple[float, ...] = ()
    if source.classes:
        with np.errstate(invalid="ignore"):
            worst = np.max(diffs.reshape(len(diffs), -1), axis=0)
        per_class = tuple(float(v) if np.isfinite(v) else float("inf") for v in worst)
        limit = settings.max_class_prob_diff_pp / 100.0
        over = [
            f"{label} {d:.3g}"
            for label, d in zip(source.classes, per_class, strict=True)
            if not d <= limit
        ]
        if over:
            passed = False
            reason = "; ".join(
                r
                for r in (
                    reason,
                    f"class probabilities differ by more than {settings.max_class_prob_diff_pp} "
                    f"pp: {', '.join(over)}",
                )
                if r
            )
    # A judge-only engine (GTIL standing in for FIL) is not what serves: don't time it.
    t = (
        _timings(engine.predict, x_valid, settings)
        if candidate.engine
        else dict.fromkeys(_TIMING_KEYS, float("nan"))
    )
    return Figures(
        name=candidate.name,
        engine=kind
        if candidate.engine
        else f"{kind} (judge only; serves on {_served_by(candidate)})",
        max_abs_diff=max_abs,
        identical_decisions=same,
        load_mib=load_mib,
        size_bytes=_folder_bytes(candidate.folder),
        passed=passed,
        reason=reason,
        p50_us=t["p50_us"],
        p99_us=t["p99_us"],
        per_row_us_at_32=t["per_row_us_at_32"],
        rows_per_s_at_1024=t["rows_per_s_at_1024"],
        class_max_abs_diff=per_class,
    )


_TIMING_KEYS = ("p50_us", "p99_us", "per_row_us_at_32", "rows_per_s_at_1024")


def _failed(candidate: Candidate, kind: str, reason: str, load_mib: float) -> Figures:
    nan = float("nan")
    size = _folder_bytes(candidate.folder)
    return Figures(
        candidate.name, kind, nan, 0.0, nan, nan, nan, 0.0, load_mib, size, False, reason
    )


def _served_by(candidate: Candidate) -> str:
    spec = candidate.container
    return (spec.backend or spec.platform) if spec else "nothing here"


def screen_nan(built: Sequence[Built], source: Source, calib: F32) -> list[Built]:
    """``built`` with every candidate that treats NaN unlike the source Skipped.

    A no-op unless the source's schema allows NaN. The probe is the first
    calibration rows with NaN planted at random (seeded) and one row all NaN;
    the expected scores are the source library's on the same rows.
    """
    if not source.schema.allow_nan:
        return list(built)
    rows = _nan_probe(calib)
    expected = source.reference(rows)
    return [_check_nan(b, source, rows, expected) for b in built]


def _nan_probe(calib: F32) -> F32:
    rng = np.random.default_rng(0)
    rows = np.array(calib[:_NAN_PROBE_ROWS], dtype=np.float32, copy=True)
    rows[rng.random(rows.shape) < _NAN_PROBE_SHARE] = np.nan
    rows[0] = np.nan
    return np.ascontiguousarray(rows)


def _check_nan(built: Built, source: Source, rows: F32, expected: F32) -> Built:
    """Skip a candidate that treats NaN differently from the source library.

    Calibration rows rarely hold NaN, so the gate alone could pass an engine
    whose missing-value handling differs (e.g. LightGBM's "NaN as zero" for
    features that had no NaN in training). A NaN score where the source's is
    NaN too agrees (a network that propagates NaN, served by an engine that
    does the same); a NaN against a number does not.
    """
    if not isinstance(built, Candidate):
        return built
    kind, params = (
        (built.engine, built.params) if built.engine else (built.gate_engine, built.gate_params)
    )
    try:
        got = runtime.load(kind, built.folder, params).predict(rows)
    except SetsunaError as exc:
        reason = f"cannot score rows with NaN: {exc}"
    else:
        if got.shape != expected.shape:
            reason = (
                f"cannot score rows with NaN: output shape {got.shape} != source {expected.shape}"
            )
        elif np.allclose(got, expected, rtol=_NAN_PROBE_TOL, atol=_NAN_PROBE_TOL, equal_nan=True):
            return built
        else:
            reason = (
                f"disagrees with {source.reference_label} on rows with NaN "
                f"({_nan_diff(got, expected)}): its missing-value handling differs. Serve "
                "another engine, or impute NaN and rebuild with allow_nan=False"
            )
    shutil.rmtree(built.folder, ignore_errors=True)
    return Skipped(name=built.name, reason=reason)


def _nan_diff(got: F32, expected: F32) -> str:
    """How far apart: the largest gap between numbers, and the scores NaN on one side only."""
    got_nan, want_nan = np.isnan(got), np.isnan(expected)
    numbers = ~(got_nan | want_nan)
    gaps = np.abs(got[numbers].astype(np.float64) - expected[numbers])
    one_sided = int(np.count_nonzero(got_nan ^ want_nan))
    parts = [f"max abs diff {float(gaps.max()):.3g}"] if gaps.size else []
    if one_sided:
        parts.append(f"{one_sided} of {got.size} scores NaN on one side only")
    return "; ".join(parts) or "max abs diff 0"
