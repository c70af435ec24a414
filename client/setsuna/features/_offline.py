"""The offline path: a whole history to a feature matrix, through the online kernel.

Training data must be what serving computes, so there is no second
implementation: a fresh :class:`FeatureEngine` takes every bar in one
``update`` call, writing straight into the output matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from setsuna.features._engine import FeatureEngine, FeatureRows
from setsuna.features._spec import FeatureSpec
from setsuna.market import BarRecords, DropCounts, OnBadRows, frame_to_records

if TYPE_CHECKING:
    import pandas as pd


def compute_features(
    records: BarRecords,
    symbols: tuple[str, ...],
    spec: FeatureSpec,
    *,
    on_bad_rows: OnBadRows = "raise",
    dtype: type[np.floating[Any]] = np.float32,
) -> tuple[FeatureRows, DropCounts]:
    """Features for every bar of ``records`` (replay order), with the drops counted.

    ``dtype=np.float64`` keeps the kernel's full precision (for reference
    checks); float32, the default, is exactly that rounded, as served.
    """
    engine = FeatureEngine(spec, symbols, on_bad_rows=on_bad_rows, max_batch=1)
    values = np.empty((len(records), len(spec)), dtype=dtype)
    ready = np.empty((len(records), len(spec)), dtype=np.bool_)
    engine.update(records, out=values, ready=ready)
    return FeatureRows(values, ready), engine.drops


def features_frame(
    frame: pd.DataFrame, spec: FeatureSpec, *, on_bad_rows: OnBadRows = "raise"
) -> tuple[pd.DataFrame, DropCounts]:
    """A bar frame (timestamp, symbol, OHLCV) to a frame of features.

    Columns: ``timestamp`` (UTC), ``symbol``, one float32 column per feature
    (NaN until ready) and ``ready`` (every feature of the row is ready). Rows
    follow the replay order: by timestamp, each symbol's rows in file order.
    """
    import pandas as pd

    records, symbols, drops = frame_to_records(frame, on_bad_rows=on_bad_rows)
    rows, engine_drops = compute_features(records, symbols, spec, on_bad_rows=on_bad_rows)
    out = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(records["timestamp_ns"], utc=True),
            "symbol": np.asarray(symbols, dtype=object)[records["symbol_id"]],
        }
    )
    for i, name in enumerate(spec.names):
        out[name] = rows.values[:, i]
    out["ready"] = rows.ready.all(axis=1)
    for reason, count in engine_drops.as_dict().items():
        setattr(drops, reason, getattr(drops, reason) + count)
    return out, drops
