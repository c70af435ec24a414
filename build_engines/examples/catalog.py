"""The example models, trained on the spot with fixed seeds.

Four synthetic ones (48 features; other code and perf figures depend on them)
and two trained on real EURUSD bars through setsuna's features
(:mod:`.market`): ``eurusd_lgbm`` (up or not) and ``eurusd_direction``
(down / flat / up, a 3-class model).

``small=True`` shrinks the tree ensembles (compiling 500 trees with lleaves
takes over a minute here) for tests and quick demos; the neural nets keep
their sizes because they train in seconds anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from build_engines.base import F32, Source
from build_engines.examples import data

EXAMPLES = ("lightgbm", "xgboost", "mlp", "lstm", "eurusd_lgbm", "eurusd_direction")


@dataclass(frozen=True)
class Example:
    """A trained source and its held-out rows."""

    source: Source
    x_valid: F32


def _lightgbm(small: bool) -> Example:
    from build_engines.examples.trees import train_lightgbm
    from build_engines.sources.trees import from_lightgbm

    split = data.tabular()
    booster = train_lightgbm(split, n_trees=60 if small else 500, num_leaves=15 if small else 63)
    return Example(from_lightgbm(booster, name="lightgbm"), split.x_valid)


def _xgboost(small: bool) -> Example:
    from build_engines.examples.trees import train_xgboost
    from build_engines.sources.trees import from_xgboost

    split = data.tabular()
    booster = train_xgboost(split, n_trees=60 if small else 500, max_depth=4 if small else 6)
    return Example(from_xgboost(booster, name="xgboost"), split.x_valid)


def _mlp(small: bool) -> Example:
    import torch

    from build_engines.examples.neural import train_mlp
    from build_engines.sources.neural import from_torch

    split = data.tabular()
    net = train_mlp(split)
    return Example(
        from_torch(net, torch.zeros(1, data.N_TABULAR_FEATURES), name="mlp"), split.x_valid
    )


def _lstm(small: bool) -> Example:
    import torch

    from build_engines.examples.neural import train_lstm
    from build_engines.sources.neural import from_torch

    split = data.sequences()
    net = train_lstm(split)
    example = torch.zeros(1, data.SEQ_STEPS, data.SEQ_FEATURES)
    return Example(from_torch(net, example, name="lstm"), split.x_valid)


def _eurusd_lgbm(small: bool) -> Example:
    from build_engines.examples import market
    from build_engines.sources.trees import from_lightgbm

    split = market.split()
    booster = market.train_lightgbm(split, small=small)
    names = market.spec().names
    return Example(from_lightgbm(booster, name=market.NAME, feature_names=names), split.x_valid)


def _eurusd_direction(small: bool) -> Example:
    from build_engines.examples import market
    from build_engines.sources.trees import from_lightgbm

    split = market.split(direction=True)
    booster = market.train_direction(split, small=small)
    return Example(
        from_lightgbm(
            booster,
            name=market.DIRECTION_NAME,
            feature_names=market.spec().names,
            class_labels=market.DIRECTION_CLASSES,
        ),
        split.x_valid,
    )


_TRAINERS: dict[str, Callable[[bool], Example]] = {
    "lightgbm": _lightgbm,
    "xgboost": _xgboost,
    "mlp": _mlp,
    "lstm": _lstm,
    "eurusd_lgbm": _eurusd_lgbm,
    "eurusd_direction": _eurusd_direction,
}


def train(name: str, *, small: bool = False) -> Example:
    """Train example ``name`` (one of :data:`EXAMPLES`)."""
    return _TRAINERS[name](small)
