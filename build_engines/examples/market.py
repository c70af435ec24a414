"""The real-data example: LightGBM on EURUSD hourly bars, features from the serving engine.

``eurusd_lgbm`` is trained on :func:`setsuna.dataset.build_dataset` rows of
the first :data:`TRAIN_SHARE` of ``backtesting``'s EURUSD hourly bars (label:
the sign of the return :data:`HORIZON_BARS` bars ahead). The last
``HORIZON_BARS`` training rows are purged, because their labels look into
the held-out part. The rest of the series is never trained on: its feature
rows are the gate's held-out rows, and the demo replays those bars (with the
tails of the other packaged series) through the pipeline. The manifest
records the feature schema (names in order), which the pipeline checks.

``eurusd_direction`` is the 3-class sibling: the same bars, features, cut
and purge, labelled ``down`` / ``flat`` / ``up`` by the return over the same
horizon with a flat band of :data:`FLAT_BAND_BPS` basis points (``r <= -band``
down, ``r >= band`` up, flat between; 7 bps splits this EURUSD series into
roughly equal thirds), a LightGBM ``multiclass`` model whose served score is
the three class probabilities.
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
#: The 3-class example: its name, its classes (in column order) and its flat band.
DIRECTION_NAME = "eurusd_direction"
DIRECTION_CLASSES = ("down", "flat", "up")
#: |return over HORIZON_BARS| below this many basis points is "flat" (7 bps: ~1/3 each).
FLAT_BAND_BPS = 7.0


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


def direction_labels(fwd_return: Any, band_bps: float = FLAT_BAND_BPS) -> Any:
    """0 (down), 1 (flat), 2 (up): the return against a flat band of ``band_bps``."""
    r = np.asarray(fwd_return, dtype=np.float64)
    band = band_bps / 1e4
    return (np.where(r >= band, 2, np.where(r <= -band, 0, 1))).astype(np.int8)


def split(*, direction: bool = False) -> Split:
    """Training rows (before the cut, purged) and held-out rows (after), EURUSD only.

    Labels: up or not (binary), or with ``direction`` down/flat/up
    (:func:`direction_labels`).
    """
    from setsuna.dataset import FORWARD_RETURN, LABEL, build_dataset, feature_matrix
    from setsuna.market import datasets

    bars = datasets.eurusd()
    first_unseen = bars["timestamp"].iloc[cut_index(len(bars))]
    data = build_dataset(bars, horizon_bars=HORIZON_BARS, spec=spec())
    train = data[data["timestamp"] < first_unseen].iloc[:-HORIZON_BARS]
    valid = data[data["timestamp"] >= first_unseen]
    s = spec()

    def labels(rows: pd.DataFrame) -> Any:
        if direction:
            return direction_labels(rows[FORWARD_RETURN].to_numpy())
        return rows[LABEL].to_numpy(np.int8)

    return Split(feature_matrix(train, s), labels(train), feature_matrix(valid, s), labels(valid))


def _params(objective: dict[str, Any], *, small: bool, seed: int) -> dict[str, Any]:
    """The examples' LightGBM settings: returns are mostly noise, so few shallow trees."""
    return {
        **objective,
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


def train_direction(split: Split, *, small: bool = False, seed: int = 7) -> lightgbm.Booster:
    """A small LightGBM ``multiclass`` (down/flat/up), tuned like :func:`train_lightgbm`."""
    import lightgbm as lgb

    objective = {"objective": "multiclass", "num_class": len(DIRECTION_CLASSES)}
    train = lgb.Dataset(split.x_train, label=split.y_train.astype(np.float32))
    params = _params(objective, small=small, seed=seed)
    return lgb.train(params, train, num_boost_round=40 if small else 100)


def train_lightgbm(split: Split, *, small: bool = False, seed: int = 7) -> lightgbm.Booster:
    """A small binary LightGBM: returns are mostly noise, so few shallow trees."""
    import lightgbm as lgb

    train = lgb.Dataset(split.x_train, label=split.y_train.astype(np.float32))
    params = _params({"objective": "binary"}, small=small, seed=seed)
    return lgb.train(params, train, num_boost_round=40 if small else 150)


def held_out(split: Split) -> F32:
    return split.x_valid
