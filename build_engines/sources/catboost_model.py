"""Source adapter for CatBoost: a ``.cbm`` file (CatBoost's own format) or a fitted model.

The model is canonicalised like the other tree sources: saved in CatBoost's
own binary format and read back, so the hash, every converter and the
reference all see the same trees. The reference is CatBoost's own predictor
(``predict(prediction_type="Probability")[:, 1]`` for a binary classifier,
``predict`` for a regressor).

Refused here, each with what to do: categorical features (CatBoost's ONNX and
C++ exports cannot evaluate them without CatBoost's own hashing; one-hot or
ordinal-encode them before training, so they are numbers the exports
compare), text or embedding features, multiclass and multi-target models,
ranking losses, and pickles.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.base import F32, Source, Task
from build_engines.sources.trees import _model_file, _schema
from setsuna.errors import SourceError, UnknownModelTypeError

#: Loss functions served as binary classifiers (score = P(class 1)).
CLASSIFICATION_LOSSES = frozenset({"Logloss", "CrossEntropy"})
#: Loss functions served as regressors (score = the prediction).
REGRESSION_LOSSES = frozenset(
    {"RMSE", "MAE", "Quantile", "Expectile", "Huber", "Poisson", "Tweedie", "LogLinQuantile",
     "Lq", "MAPE", "LogCosh", "Cox"}
)  # fmt: skip


def _loss(model: Any) -> str:
    params = model.get_all_params()
    return str(params.get("loss_function", "")).split(":")[0]


def catboost_task(model: Any) -> Task:
    """The task of a fitted CatBoost model, or SourceError saying what to do."""
    loss = _loss(model)
    if loss in CLASSIFICATION_LOSSES:
        return "classification"
    if loss in REGRESSION_LOSSES:
        return "regression"
    if loss.startswith("Multi"):
        raise SourceError(
            f"CatBoost loss {loss!r}: multiclass and multi-target CatBoost models are not "
            "served yet; train a binary classifier (Logloss) or a regressor (RMSE, MAE ...)"
        )
    raise SourceError(
        f"CatBoost loss {loss!r} is not served: train a binary classifier (Logloss, "
        f"CrossEntropy) or a regressor ({', '.join(sorted(REGRESSION_LOSSES))})"
    )


def _check_features(model: Any) -> None:
    cat = list(model.get_cat_feature_indices())
    text = list(getattr(model, "get_text_feature_indices", list)())
    emb = list(getattr(model, "get_embedding_feature_indices", list)())
    if cat:
        names = [model.feature_names_[i] for i in cat] if model.feature_names_ else cat
        raise SourceError(
            f"the CatBoost model has categorical features {names[:6]}: CatBoost's ONNX and "
            "C++ exports cannot evaluate them (they hash the raw categories with CatBoost's "
            "own code). One-hot or ordinal-encode them into numbers before training, and "
            "build that model"
        )
    if text or emb:
        raise SourceError(
            "the CatBoost model has text or embedding features; only numeric features are "
            "served: compute numeric features from them before training"
        )


def _canonical(model: Any) -> tuple[Any, bytes]:
    """The model re-read from its own ``.cbm`` bytes, and those bytes."""
    import catboost

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.cbm"
        model.save_model(str(path), format="cbm")
        data = path.read_bytes()
        fresh = catboost.CatBoost()
        fresh.load_model(str(path), format="cbm")
    return fresh, data


def from_catboost(
    model: Any,
    *,
    name: str,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
) -> Source:
    """A CatBoost model object, or the path of a ``.cbm`` file, as a build source."""
    import catboost

    if isinstance(model, str | os.PathLike):
        path = _model_file(model, "CatBoost", "model.save_model('model.cbm')")
        loaded = catboost.CatBoost()
        try:
            loaded.load_model(str(path), format="cbm")
        except catboost.CatBoostError as exc:
            raise SourceError(
                f"{path} is not a CatBoost model file CatBoost can read ({exc}); save it with "
                "model.save_model('model.cbm')"
            ) from None
        model = loaded
    if not isinstance(model, catboost.CatBoost):
        raise UnknownModelTypeError(
            f"from_catboost got {type(model).__name__}; pass a fitted CatBoost model or a .cbm file"
        )
    if not model.is_fitted():
        raise SourceError("the CatBoost model is not fitted; fit it first")
    _check_features(model)
    task = catboost_task(model)
    canonical, data = _canonical(model)
    n = len(canonical.feature_names_ or []) or int(canonical.get_feature_importance().size)
    stored = canonical.feature_names_
    generic = stored is not None and all(s == str(i) for i, s in enumerate(stored))
    schema = _schema(feature_names, None if generic else stored, n, allow_nan)

    def reference(x: F32) -> F32:
        rows = np.asarray(x, dtype=np.float32)
        if task == "classification":
            p = canonical.predict(rows, prediction_type="Probability")[:, 1]
        else:
            p = canonical.predict(rows)
        return np.ascontiguousarray(np.asarray(p, dtype=np.float32).reshape(len(rows), 1))

    label = (
        'predict(prediction_type="Probability")[:, 1]' if task == "classification" else "predict"
    )
    return Source(
        name=name,
        kind="catboost",
        model=canonical,
        schema=schema,
        task=task,
        sha256=hashlib.sha256(data).hexdigest(),
        reference=reference,
        reference_label=f"catboost.CatBoost.{label}",
    )
