"""The rows a measurement sends: many distinct ones, from the examples' held-out sets.

perf_analyzer's default input is one tensor reused, which a response cache
answers from memory after the first request; distinct held-out rows are what a
desk's market features look like to the server. The tuner and the perf/
scripts that measure a served model send these.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from build_engines.base import F32
from setsuna.schema import FeatureSchema

#: Distinct input rows written per model (>= the sweep's 1,024-row batch;
#: perf_analyzer cycles through them).
INPUT_ROWS: Final = 4096


def input_rows(schema: FeatureSchema, n: int = INPUT_ROWS) -> tuple[F32, str]:
    """Distinct float32 rows of ``schema``'s shape, and where they come from."""
    from build_engines.examples import data

    shape = tuple(schema.row_shape)
    if shape == (data.N_TABULAR_FEATURES,):
        return data.tabular().x_valid[:n], "held-out rows of build_engines.examples.data.tabular()"
    if shape == (data.SEQ_STEPS, data.SEQ_FEATURES):
        return (
            data.sequences().x_valid[:n],
            "held-out sequences of build_engines.examples.data.sequences()",
        )
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, *shape)).astype(np.float32)
    return rows, "synthetic N(0, 1) rows (no example data set has this shape)"
