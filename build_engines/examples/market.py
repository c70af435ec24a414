"""The real-data example: LightGBM on EURUSD hourly bars, features from the serving engine.

``eurusd_lgbm`` is trained on :func:`setsuna.dataset.build_dataset` rows of
the first :data:`TRAIN_SHARE` of ``backtesting``'s EURUSD hourly bars (label:
the sign of the return :data:`HORIZON_BARS` bars ahead). The last
``HORIZON_BARS`` training rows are purged, because their labels look into
the held-out part. The rest of the series is never trained on: its feature
rows are the gate's held-out rows, and the demo replays those bars (with the
tails of the other packaged series) through the pipeline. The manifest
records the feature schema (names in order), which the pipeline checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.examples.data import F32, Split
from build_engines.examples.trees import TRAIN_THREADS

if TYPE_CHECKING:
    import lightgbm
    import pandas as pd

    from setsuna.features import FeatureSpec

NAME = "eurusd_lgbm"
HORIZON_BARS = 5
TRAIN_SHARE = 0.7
#: Packaged series the demo replays as symbols (their tails); the model trains on the first.
SERIES = ("eurusd", "sp500", "nasdaq", "goog")


def spec() -> FeatureSpec:
    from setsuna.features import default_spec

    return default_spec(session="FX24")


def cut_index(n_bars: int) -> int:
    """First bar of a series that training never sees."""
    return int(n_bars * TRAIN_SHARE)


def split_bars(bars: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(history, unseen tail) of every symbol, each symbol cut at its own TRAIN_SHARE."""
    import pandas as pd

    heads, tails = [], []
    for _, rows in bars.groupby("symbol", sort=False):
        cut = cut_index(len(rows))
        heads.append(rows.iloc[:cut])
        tails.append(rows.iloc[cut:])
    return pd.concat(heads, ignore_index=True), pd.concat(tails, ignore_index=True)


def replay_bars() -> pd.DataFrame:
    """All packaged series of :data:`SERIES` as one bar frame (several symbols)."""
    import pandas as pd

    from setsuna.market import datasets

    return pd.concat([datasets.load(s) for s in SERIES], ignore_index=True)


def split() -> Split:
    """Training rows (before the cut, purged) and held-out rows (after), EURUSD only."""
    from setsuna.dataset import LABEL, build_dataset, feature_matrix
    from setsuna.market import datasets

    bars = datasets.eurusd()
    first_unseen = bars["timestamp"].iloc[cut_index(len(bars))]
    data = build_dataset(bars, horizon_bars=HORIZON_BARS, spec=spec())
    train = data[data["timestamp"] < first_unseen].iloc[:-HORIZON_BARS]
    valid = data[data["timestamp"] >= first_unseen]
    s = spec()
    return Split(
        feature_matrix(train, s),
        train[LABEL].to_numpy(np.int8),
        feature_matrix(valid, s),
        valid[LABEL].to_numpy(np.int8),
    )


def train_lightgbm(split: Split, *, small: bool = False, seed: int = 7) -> lightgbm.Booster:
    """A small binary LightGBM: returns are mostly noise, so few shallow trees."""
    import lightgbm as lgb

    params: dict[str, Any] = {
        "objective": "binary",
        "num_leaves": 7 if small else 15,
        "learning_rate": 0.03,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": TRAIN_THREADS,
        "verbose": -1,
    }
    train = lgb.Dataset(split.x_train, label=split.y_train.astype(np.float32))
    return lgb.train(params, train, num_boost_round=40 if small else 150)


def held_out(split: Split) -> F32:
    return split.x_valid
