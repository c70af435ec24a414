"""The example tree models: a LightGBM and an XGBoost binary classifier.

Both are trained on :func:`build_engines.examples.data.tabular` with a fixed
seed and a fixed, small thread count, so that the same call gives the same
trees (and so the same sha256) on every run and every machine with the same
library versions. Sizes match what the desk serves (500 trees of 63 leaves /
depth 6): big enough that engine choice matters, small enough to train in a
few seconds on two cores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.examples.data import Split

if TYPE_CHECKING:
    import lightgbm
    import xgboost

#: Two threads: reproducible (LightGBM's ``deterministic`` and XGBoost's ``hist``
#: are deterministic for a fixed thread count) and quick on a 2-core CI host.
TRAIN_THREADS = 2


def train_lightgbm(
    split: Split, *, n_trees: int = 500, num_leaves: int = 63, seed: int = 7
) -> lightgbm.Booster:
    """A binary-logistic ``lightgbm.Booster`` of ``n_trees`` trees."""
    import lightgbm as lgb

    params: dict[str, Any] = {
        "objective": "binary",
        "num_leaves": num_leaves,
        "learning_rate": 0.05,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.9,
        "bagging_freq": 1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,  # fixes the histogram strategy, and with it the trees
        "num_threads": TRAIN_THREADS,
        "verbose": -1,
    }
    train = lgb.Dataset(split.x_train, label=split.y_train.astype(np.float32))
    return lgb.train(params, train, num_boost_round=n_trees)


def train_xgboost(
    split: Split, *, n_trees: int = 500, max_depth: int = 6, seed: int = 7
) -> xgboost.Booster:
    """A ``binary:logistic`` ``xgboost.Booster`` of ``n_trees`` trees."""
    import xgboost as xgb

    params: dict[str, Any] = {
        "objective": "binary:logistic",
        "max_depth": max_depth,
        "eta": 0.05,
        "subsample": 0.9,
        "colsample_bytree": 0.9,
        "tree_method": "hist",
        "seed": seed,
        "nthread": TRAIN_THREADS,
        "verbosity": 0,
    }
    train = xgb.DMatrix(split.x_train, label=split.y_train)
    return xgb.train(params, train, num_boost_round=n_trees)
