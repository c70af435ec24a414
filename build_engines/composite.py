"""Pair the single-row winner with the batch winner into one ``switch`` candidate.

When one passing engine is fastest on a single row and another on large
batches (LightGBM: tl2cgen vs lleaves), serving either alone gives up one of
the two. This builds a candidate holding both, routed at the batch size
where the batch engine starts to win (measured here, per model), and hands it
to the gate like any other candidate: it must pass on its own figures.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from build_engines.base import F32, Candidate
from build_engines.gate import Figures
from setsuna import runtime

#: Batch sizes tried, in order, for the crossover.
CROSSOVER_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
#: The batch engine must beat the single-row engine's rows/s by this much to bother.
MIN_GAIN = 1.15
_TIME_BUDGET_S = 0.05


def _per_row_s(engine: runtime.Engine, x: F32) -> float:
    engine.predict(x)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < _TIME_BUDGET_S or calls < 3:
        engine.predict(x)
        calls += 1
    return elapsed / (calls * len(x))


def crossover_rows(small: runtime.Engine, large: runtime.Engine, rows: F32) -> int | None:
    """The smallest batch size at which ``large`` costs less per row than ``small``."""
    for n in CROSSOVER_SIZES:
        x = np.ascontiguousarray(np.resize(rows, (n, *rows.shape[1:])))
        if _per_row_s(large, x) < _per_row_s(small, x):
            return n
    return None


def pair(
    candidates: Sequence[Candidate],
    figures: Mapping[str, Figures],
    stage: Path,
    rows: F32,
    *,
    threshold_rows: int | None = None,
) -> Candidate | None:
    """A switch candidate, or None when one engine already wins both ends.

    ``threshold_rows`` skips the crossover measurement (tests, or a user who
    knows their traffic).
    """
    local = [
        c
        for c in candidates
        if figures[c.name].passed and c.local and c.engine and c.engine != "switch"
    ]
    if len(local) < 2:
        return None
    small = min(local, key=lambda c: figures[c.name].p50_us)
    large = max(local, key=lambda c: figures[c.name].rows_per_s_at_1024)
    gain = figures[large.name].rows_per_s_at_1024 / figures[small.name].rows_per_s_at_1024
    if small is large or gain < MIN_GAIN:
        return None
    files = [p for c in (small, large) for p in sorted(c.folder.iterdir()) if p.is_file()]
    if len({p.name for p in files}) != len(files):
        return None  # the two engines' files would overwrite each other
    threshold = threshold_rows or crossover_rows(
        runtime.load(small.engine, small.folder, small.params),
        runtime.load(large.engine, large.folder, large.params),
        rows,
    )
    if threshold is None:
        return None
    folder = stage / "switch"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for p in files:
        shutil.copy2(p, folder / p.name)
    return Candidate(
        name=f"{small.name}+{large.name}",
        engine="switch",
        folder=folder,
        params={
            "threshold_rows": threshold,
            "small": {"engine": small.engine, "params": dict(small.params)},
            "large": {"engine": large.engine, "params": dict(large.params)},
            # a multiclass pair answers C scores per row, like each of its engines
            **({"n_outputs": small.params["n_outputs"]} if "n_outputs" in small.params else {}),
        },
        notes=f"{small.name} below {threshold} rows, {large.name} from {threshold} rows",
    )
