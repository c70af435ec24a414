"""Training rows for serving parity: features from the serving engine, forward-return labels.

``build_dataset`` runs the same feature kernel the pipeline runs online
(:func:`setsuna.features.features_frame`), so a model trained on its rows
sees exactly what it will be served. The label of the bar at ``t`` is the
forward return ``close[t+h] / close[t] - 1`` of the **same symbol** ``h`` bars
later and its sign (``label`` = 1 when positive): features use bars up to
``t`` only (the engine is causal), the label bars after ``t`` only. Rows are
time-ordered (replay order); rows whose features are not ready, or that
have no bar ``t+h``, are dropped, so no row is padded or guessed.

``setsuna dataset --data FILE --horizon N --out FILE.parquet`` writes it,
with the feature spec beside it (``FILE.spec.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from setsuna.errors import ConfigError
from setsuna.features import FeatureSpec, default_spec, features_frame
from setsuna.market import OnBadRows, read_frame

if TYPE_CHECKING:
    import pandas as pd

LABEL = "label"
FORWARD_RETURN = "fwd_return"
CLOSE = "close"


def build_dataset(
    bars: pd.DataFrame,
    *,
    horizon_bars: int,
    spec: FeatureSpec | None = None,
    on_bad_rows: OnBadRows = "raise",
) -> pd.DataFrame:
    """Features, ``close``, ``fwd_return`` and ``label`` per bar (see the module docstring)."""
    if horizon_bars < 1:
        raise ConfigError(f"horizon_bars={horizon_bars}: give at least 1 bar ahead")
    spec = spec or default_spec()
    table, _ = features_frame(bars, spec, on_bad_rows=on_bad_rows)
    # features_frame keeps replay order; attach each row's close the same way.
    from setsuna.market import frame_to_records

    records, _, _ = frame_to_records(bars, on_bad_rows=on_bad_rows)
    close = records["close"].astype(np.float64)
    table[CLOSE] = close
    sym = table["symbol"].to_numpy()
    fwd = np.full(len(table), np.nan)
    for s in np.unique(sym):  # per symbol, not per row
        rows = np.flatnonzero(sym == s)  # this symbol's bars in time order
        c = close[rows]
        if len(c) > horizon_bars:
            fwd[rows[:-horizon_bars]] = c[horizon_bars:] / c[:-horizon_bars] - 1.0
    table[FORWARD_RETURN] = fwd
    keep = table["ready"].to_numpy() & np.isfinite(fwd)
    out = table[keep].drop(columns=["ready"]).reset_index(drop=True)
    out[LABEL] = (out[FORWARD_RETURN].to_numpy() > 0).astype(np.int8)
    return out


def feature_matrix(dataset: pd.DataFrame, spec: FeatureSpec) -> np.ndarray[Any, Any]:
    """The float32 ``[n, len(spec)]`` matrix of a dataset, columns in the spec's order."""
    return np.ascontiguousarray(dataset[list(spec.names)].to_numpy(np.float32))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="features + forward-return labels of a bar file, for training (Parquet)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--data", required=True, type=Path, help="bar file (.csv/.parquet)")
    parser.add_argument("--horizon", required=True, type=int, help="label horizon in bars")
    parser.add_argument("--out", required=True, type=Path, help="output .parquet file")
    parser.add_argument("--spec", type=Path, help="feature spec JSON (default: the default set)")
    parser.add_argument(
        "--on-bad-rows", choices=("raise", "drop"), default="raise", help="bad/out-of-order rows"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {args.out}: the output must be a .parquet file")
    spec = FeatureSpec.loads(args.spec.read_text()) if args.spec else default_spec()
    data = build_dataset(
        read_frame(args.data), horizon_bars=args.horizon, spec=spec, on_bad_rows=args.on_bad_rows
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(args.out, index=False)
    args.out.with_suffix(".spec.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    up = float(data[LABEL].mean()) if len(data) else float("nan")
    print(
        f"{len(data)} rows x {len(spec)} features, horizon {args.horizon} bars, "
        f"{up:.1%} labelled up -> {args.out}",
        file=sys.stderr,
    )
    return 0
