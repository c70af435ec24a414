"""``setsuna features``: a bar file to a Parquet feature matrix (the offline path)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from setsuna.errors import ConfigError
from setsuna.features._offline import features_frame
from setsuna.features._spec import FeatureSpec, default_spec
from setsuna.market import get_session, read_frame


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "features",
        help="compute the feature matrix of a bar file (CSV or Parquet) into Parquet",
        description=(
            "Input columns: timestamp, symbol, open, high, low, close, volume (optional: vwap, "
            "bid, ask, bid_size, ask_size). Output: timestamp, symbol, one float32 column per "
            "feature (NaN until ready) and 'ready'. The spec goes beside it as <out>.spec.json."
        ),
    )
    parser.add_argument("--data", required=True, type=Path, help="input bar file (.csv/.parquet)")
    parser.add_argument("--out", required=True, type=Path, help="output .parquet file")
    parser.add_argument("--spec", type=Path, help="feature spec JSON (default: the default set)")
    parser.add_argument("--session", default="FX24", help="session for time_in_session")
    parser.add_argument(
        "--on-bad-rows",
        choices=("raise", "drop"),
        default="raise",
        help="bad or out-of-order rows: refuse the file (default) or drop and count them",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {args.out}: the output must be a .parquet file")
    if args.spec is not None:
        spec = FeatureSpec.loads(args.spec.read_text())
    else:
        spec = default_spec(session=get_session(args.session).name)
    frame = read_frame(args.data)
    quotes = {"bid", "ask"} <= {str(c) for c in frame.columns}
    if args.spec is None and quotes:
        spec = default_spec(session=args.session, quotes=True)
    table, drops = features_frame(frame, spec, on_bad_rows=args.on_bad_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out, index=False)
    spec_path = args.out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    print(
        f"{len(table)} rows x {len(spec)} features -> {args.out} "
        f"({int(table['ready'].sum())} fully ready; dropped {drops.as_dict()}); "
        f"spec -> {spec_path}",
        file=sys.stderr,
    )
    return 0
