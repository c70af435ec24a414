"""Source adapters for tree ensembles: LightGBM, XGBoost and scikit-learn.

Each adapter turns a trained model (an object, or a file in the library's own
format) into a :class:`~build_engines.base.Source`. The model is first
*canonicalised*: serialised in its library's own format and re-read, so that
the hash, every converter and the reference predictor all see exactly the
same trees (for instance only the best iteration of an early-stopped run, as
the library's own ``predict`` would use). Pickle is never read or written:
hashes come from the model text / JSON / ONNX bytes.

In scope: binary classifiers (score = positive-class probability),
multiclass classifiers whose library output is a probability per class that
sums to 1 (LightGBM ``multiclass``, XGBoost ``multi:softprob``, scikit-learn
classifiers with 3 or more classes: score = the class probabilities, in the
order of :attr:`~build_engines.base.Source.classes`) and single-output
regressors. Anything else (one-vs-all LightGBM, XGBoost ``multi:softmax``,
several targets) is refused here with what to do instead, before any engine
is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.base import F32, Source, Task
from build_engines.sources import vet
from setsuna.errors import (
    ConfigError,
    PickleRefusedError,
    SourceError,
    UnknownModelTypeError,
)
from setsuna.schema import INPUT_NAME, FeatureSchema, names_like

if TYPE_CHECKING:
    import lightgbm
    import onnx
    import xgboost

ModelPath = str | os.PathLike[str]

#: Default opsets of the ONNX converters; onnxmltools' tree converters stop at 15.
ONNX_OPSET = 15
ONNX_ML_OPSET = 3

_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".sav", ".dill", ".cloudpickle"})
_MULTICLASS_HINT = (
    "multiclass models are served as class probabilities that sum to 1: retrain with "
    "LightGBM objective='multiclass' or XGBoost objective='multi:softprob'"
)

_LGB_CLASSIFICATION = frozenset({"binary"})
_LGB_MULTICLASS = "multiclass"
_LGB_REGRESSION = frozenset(
    {
        "regression",
        "regression_l1",
        "huber",
        "fair",
        "poisson",
        "quantile",
        "mape",
        "gamma",
        "tweedie",
    }
)
_LGB_GENERIC_NAME = re.compile(r"Column_\d+")

_XGB_CLASSIFICATION = frozenset({"binary:logistic"})
_XGB_MULTICLASS = "multi:softprob"
_XGB_REGRESSION = frozenset(
    {
        "reg:squarederror",
        "reg:squaredlogerror",
        "reg:pseudohubererror",
        "reg:absoluteerror",
        "reg:quantileerror",
        "reg:logistic",
        "reg:gamma",
        "reg:tweedie",
        "count:poisson",
    }
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _column(values: Any, n: int) -> F32:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(n, 1))


def _columns(values: Any, n: int, width: int) -> F32:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(n, width))


def _class_labels(
    given: Sequence[object] | None, stored: Sequence[object] | None, n: int
) -> tuple[str, ...]:
    """The labels of a multiclass model's ``n`` classes, as strings, in column order.

    ``given`` (the caller's) wins, else the library's own (a classifier's
    ``classes_``), else ``"0" .. "n-1"``. Labels must be distinct and
    non-empty: a client tells the columns apart by them.
    """
    if (
        given is not None
        and stored is not None
        and [str(c) for c in given] != [str(c) for c in stored]
    ):
        raise ConfigError(
            f"class_labels {list(given)} differ from the classifier's classes_ {list(stored)}; "
            "pass them in the classifier's order, or omit class_labels"
        )
    raw = given if given is not None else stored
    labels = tuple(str(c) for c in raw) if raw is not None else tuple(str(i) for i in range(n))
    if len(labels) != n or len(set(labels)) != n or not all(labels):
        raise ConfigError(
            f"class_labels {list(labels)}: give {n} distinct, non-empty labels (one per class, "
            "in the model's class order)"
        )
    return labels


def _no_labels(given: Sequence[object] | None) -> tuple[str, ...]:
    if given is not None:
        raise ConfigError(
            "class_labels is for multiclass models (3 or more classes); omit it for a binary "
            "classifier or a regressor"
        )
    return ()


def _model_file(model: ModelPath, library: str, save_hint: str) -> Path:
    path = Path(model)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{path} is a pickle; setsuna never unpickles models (it can run arbitrary code). "
            f"Save the {library} model in its own format: {save_hint}"
        )
    if not path.is_file():
        raise SourceError(f"{path} does not exist or is not a file; check the model path")
    return path


def _schema(
    given: Sequence[str] | None, stored: Sequence[str] | None, n: int, allow_nan: bool
) -> FeatureSchema:
    """Feature names: ``given`` if passed, else the model's own, else ``f0..f{n-1}``.

    Names passed that differ from names stored in the model are refused: a
    different order is exactly the bug the schema exists to catch.
    """
    if given is not None and stored is not None and tuple(given) != tuple(stored):
        raise ConfigError(
            f"feature_names {list(given)[:4]}... differ from the names stored in the model "
            f"{list(stored)[:4]}...; pass them in the model's order, or omit feature_names"
        )
    names = names_like(given if given is not None else stored, n)
    return FeatureSchema(names, (n,), allow_nan)


def _unsupported(library: str, objective: str, supported: Collection[str]) -> SourceError:
    if "multi" in objective:
        return SourceError(f"{library} objective {objective!r}: {_MULTICLASS_HINT}")
    return UnknownModelTypeError(
        f"{library} objective {objective!r} is not supported; supported objectives are "
        f"{', '.join(sorted(supported))}. Retrain with one of them"
    )


# --- LightGBM -----------------------------------------------------------------------------


def _lightgbm_header(text: str) -> dict[str, str]:
    """``key=value`` lines of a LightGBM model text before its first tree."""
    header: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Tree="):
            break
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    return header


def _lightgbm_booster(model: Any) -> lightgbm.Booster:
    import lightgbm as lgb

    if isinstance(model, (str, os.PathLike)):
        path = _model_file(model, "LightGBM", "booster.save_model('model.txt')")
        text = vet.lightgbm_text(path)  # read in a child first: a bad file aborts LightGBM
        try:
            booster = lgb.Booster(model_str=text)
        except lgb.basic.LightGBMError as exc:
            raise SourceError(
                f"{path} is not a LightGBM text model ({exc}); save one with "
                "booster.save_model('model.txt')"
            ) from exc
        return booster
    if isinstance(model, lgb.Booster):
        return model
    if isinstance(model, lgb.LGBMModel):
        try:
            return model.booster_
        except Exception as exc:  # sklearn's NotFittedError, LightGBMError
            raise SourceError(f"{type(model).__name__} is not fitted: {exc}; fit it first") from exc
    raise UnknownModelTypeError(
        f"from_lightgbm got {type(model).__name__}; pass a lightgbm.Booster, an "
        "LGBMClassifier/LGBMRegressor, or the path of a LightGBM text model"
    )


def lightgbm_task(text: str) -> Task:
    """Task of a LightGBM model text, or a SourceError saying what is supported."""
    header = _lightgbm_header(text)
    objective = header.get("objective", "").split(" ")[0]
    if objective == _LGB_MULTICLASS and int(header.get("num_class", "1")) >= 3:
        return "classification"
    if objective == _LGB_MULTICLASS:
        raise SourceError(
            f"LightGBM objective 'multiclass' with num_class={header.get('num_class')}: "
            "train a binary classifier (objective='binary') for two classes"
        )
    if int(header.get("num_class", "1")) != 1 or objective.startswith("multiclass"):
        raise SourceError(
            f"LightGBM objective {objective!r}: its per-class outputs do not sum to 1 "
            f"(one-vs-all); {_MULTICLASS_HINT}"
        )
    if objective in _LGB_CLASSIFICATION:
        return "classification"
    if objective in _LGB_REGRESSION:
        return "regression"
    raise _unsupported("LightGBM", objective or "custom", _LGB_CLASSIFICATION | _LGB_REGRESSION)


def from_lightgbm(
    model: lightgbm.Booster | lightgbm.LGBMModel | ModelPath,
    *,
    name: str,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
    class_labels: Sequence[object] | None = None,
) -> Source:
    """A LightGBM Booster, LGBMClassifier/LGBMRegressor, or text model file.

    ``Source.model`` is a fresh ``lightgbm.Booster`` read back from the
    model text (the caller's object is never modified); ``sha256`` hashes
    that text. A ``multiclass`` model scores its class probabilities;
    ``class_labels`` names them (default: an LGBMClassifier's ``classes_``,
    else ``"0".."C-1"``).
    """
    import lightgbm as lgb

    text = _lightgbm_booster(model).model_to_string()
    task = lightgbm_task(text)
    n_class = int(_lightgbm_header(text).get("num_class", "1"))
    labels = (
        _class_labels(class_labels, getattr(model, "classes_", None), n_class)
        if n_class > 1
        else _no_labels(class_labels)
    )
    booster = lgb.Booster(model_str=text)
    text = booster.model_to_string()
    n = int(booster.num_feature())
    stored: list[str] | None = booster.feature_name()
    if all(_LGB_GENERIC_NAME.fullmatch(s) for s in stored or ()):
        stored = None  # LightGBM's placeholders, not real names

    width = max(1, len(labels))

    def reference(x: F32) -> F32:
        return _columns(booster.predict(x, num_threads=1), len(x), width)

    return Source(
        name=name,
        kind="lightgbm",
        model=booster,
        schema=_schema(feature_names, stored, n, allow_nan),
        task=task,
        sha256=_sha256(text.encode()),
        reference=reference,
        reference_label="lightgbm.Booster.predict",
        classes=labels,
    )


# --- XGBoost ------------------------------------------------------------------------------


def _xgboost_booster(model: Any) -> xgboost.Booster:
    import xgboost as xgb

    if isinstance(model, (str, os.PathLike)):
        path = _model_file(model, "XGBoost", "booster.save_model('model.json') or '.ubj'")
        if path.suffix.lower() not in (".json", ".ubj"):
            raise SourceError(
                f"{path}: only XGBoost JSON (.json) and UBJSON (.ubj) files are read; "
                "re-save the model with booster.save_model('model.json')"
            )
        data = vet.xgboost_bytes(path)  # read in a child first: bad trees crash XGBoost
        try:
            return xgb.Booster(model_file=bytearray(data))
        except xgb.core.XGBoostError as exc:
            raise SourceError(f"{path} is not a readable XGBoost model: {exc}") from exc
    if isinstance(model, xgb.Booster):
        return model
    if isinstance(model, xgb.XGBModel):
        try:
            return model.get_booster()
        except Exception as exc:  # sklearn's NotFittedError
            raise SourceError(f"{type(model).__name__} is not fitted: {exc}; fit it first") from exc
    raise UnknownModelTypeError(
        f"from_xgboost got {type(model).__name__}; pass an xgboost.Booster, an "
        "XGBClassifier/XGBRegressor, or the path of a .json / .ubj model"
    )


def xgboost_task(booster: xgboost.Booster) -> Task:
    """Task of an XGBoost booster, or a SourceError saying what is supported."""
    config = json.loads(booster.save_config())["learner"]
    objective = str(config["objective"]["name"])
    params = config["learner_model_param"]
    booster_kind = str(config["gradient_booster"]["name"])
    n_class = int(params.get("num_class", "0"))
    if objective == _XGB_MULTICLASS and n_class >= 3:
        return "classification"
    if objective == _XGB_MULTICLASS:
        raise SourceError(
            f"XGBoost objective 'multi:softprob' with num_class={n_class}: train a binary "
            "classifier (objective='binary:logistic') for two classes"
        )
    if n_class > 1 or objective.startswith("multi:"):
        raise SourceError(
            f"XGBoost objective {objective!r} predicts class indices, not probabilities; "
            f"{_MULTICLASS_HINT}"
        )
    if int(params.get("num_target", "1")) != 1:
        raise SourceError(
            f"XGBoost model has {params['num_target']} targets; only single-output models "
            "are supported: train one model per target"
        )
    if booster_kind not in ("gbtree", "dart"):
        raise UnknownModelTypeError(
            f"XGBoost booster {booster_kind!r} is not a tree ensemble; retrain with "
            "booster='gbtree'"
        )
    if objective in _XGB_CLASSIFICATION:
        return "classification"
    if objective in _XGB_REGRESSION:
        return "regression"
    raise _unsupported("XGBoost", objective, _XGB_CLASSIFICATION | _XGB_REGRESSION)


def from_xgboost(
    model: xgboost.Booster | xgboost.XGBModel | ModelPath,
    *,
    name: str,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
    class_labels: Sequence[object] | None = None,
) -> Source:
    """An XGBoost Booster, XGBClassifier/XGBRegressor, or .json / .ubj file.

    ``Source.model`` is a fresh ``xgboost.Booster`` read back from the
    model's JSON, cut to the best iteration when early stopping recorded one
    (as ``XGBClassifier.predict`` would); ``sha256`` hashes that JSON.
    """
    import xgboost as xgb

    booster = _xgboost_booster(model)
    best = booster.attr("best_iteration")
    if best is not None and int(best) + 1 < booster.num_boosted_rounds():
        booster = booster[: int(best) + 1]
    canonical = xgb.Booster()
    canonical.load_model(bytearray(booster.save_raw(raw_format="json")))
    canonical.set_attr(best_iteration=None, best_score=None)
    raw = bytes(canonical.save_raw(raw_format="json"))
    canonical.set_param({"nthread": 1})
    task = xgboost_task(canonical)
    if canonical.feature_types is not None and any(t == "c" for t in canonical.feature_types):
        raise SourceError(
            "the XGBoost model has categorical features; setsuna serves float32 features only: "
            "encode categories as numbers before training"
        )
    n = int(canonical.num_features())
    n_class = int(
        json.loads(canonical.save_config())["learner"]["learner_model_param"].get("num_class", "0")
    )
    labels = (
        _class_labels(class_labels, getattr(model, "classes_", None), n_class)
        if n_class > 1
        else _no_labels(class_labels)
    )
    width = max(1, len(labels))

    def reference(x: F32) -> F32:
        return _columns(canonical.inplace_predict(x), len(x), width)

    return Source(
        name=name,
        kind="xgboost",
        model=canonical,
        schema=_schema(feature_names, canonical.feature_names, n, allow_nan),
        task=task,
        sha256=_sha256(raw),
        reference=reference,
        reference_label="xgboost.Booster.inplace_predict",
        classes=labels,
    )


# --- scikit-learn -------------------------------------------------------------------------


def _final_estimator(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return estimator if steps is None else _final_estimator(steps[-1][1])


def sklearn_onnx(estimator: Any, n_features: int) -> onnx.ModelProto:
    """skl2onnx's ONNX of a fitted estimator: input ``features``, zipmap off.

    Producer fields and the graph name (a random UUID) are fixed so the bytes,
    and with them the source hash, depend only on the model.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    final = _final_estimator(estimator)
    options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    model: onnx.ModelProto = convert_sklearn(
        estimator,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
        options=options,
    )
    model.producer_name = "setsuna"
    model.producer_version = ""
    model.doc_string = ""
    model.graph.name = "setsuna"  # skl2onnx names the graph with a random UUID
    return model


def _sklearn_task(estimator: Any) -> Task:
    from sklearn.base import is_classifier, is_regressor

    if getattr(_final_estimator(estimator), "n_outputs_", 1) != 1:
        raise SourceError(
            f"{type(estimator).__name__} has several outputs; only single-output models are "
            "supported: train one model per target"
        )
    if is_classifier(estimator):
        classes = getattr(estimator, "classes_", None)
        if classes is None or len(classes) < 2:
            n = "?" if classes is None else len(classes)
            raise SourceError(
                f"{type(estimator).__name__} has {n} classes; fit it on at least two classes"
            )
        return "classification"
    if is_regressor(estimator):
        return "regression"
    raise UnknownModelTypeError(
        f"{type(estimator).__name__} is neither a classifier nor a regressor; pass a fitted "
        "scikit-learn classifier or regressor (or a Pipeline ending in one)"
    )


def from_sklearn(
    estimator: Any,
    *,
    name: str,
    n_features: int,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
    class_labels: Sequence[object] | None = None,
) -> Source:
    """A fitted scikit-learn estimator (or Pipeline) that skl2onnx converts.

    Tree ensembles (RandomForest, ExtraTrees, GradientBoosting,
    HistGradientBoosting) also get compiled and FIL engines; anything else
    skl2onnx converts (LogisticRegression, pipelines ...) gets the ONNX
    engine only. ``sha256`` hashes the ONNX bytes: scikit-learn has no
    serialised form of its own besides pickle.
    """
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if isinstance(estimator, (str, os.PathLike)):
        _model_file(estimator, "scikit-learn", "pass the fitted estimator object")
        raise UnknownModelTypeError(
            f"from_sklearn got the path {estimator}; scikit-learn models have no file format "
            "besides pickle: pass the fitted estimator object"
        )
    if not hasattr(estimator, "fit"):
        raise UnknownModelTypeError(
            f"from_sklearn got {type(estimator).__name__}; pass a fitted scikit-learn estimator"
        )
    try:
        check_is_fitted(estimator)
    except NotFittedError as exc:
        raise SourceError(f"{type(estimator).__name__} is not fitted; fit it first") from exc
    fitted_n = getattr(estimator, "n_features_in_", n_features)
    if fitted_n != n_features:
        raise ConfigError(
            f"n_features={n_features} but {type(estimator).__name__} was fitted on "
            f"{fitted_n} features; pass n_features={fitted_n}"
        )
    task = _sklearn_task(estimator)
    try:
        onnx_bytes = sklearn_onnx(estimator, n_features).SerializeToString()
    except Exception as exc:  # skl2onnx raises bare RuntimeError/NameError/TypeError
        raise UnknownModelTypeError(
            f"skl2onnx cannot convert {type(estimator).__name__} ({exc}); use an estimator "
            "skl2onnx supports, or export the model to ONNX yourself"
        ) from exc
    stored = getattr(estimator, "feature_names_in_", None)
    fitted = getattr(estimator, "classes_", None) if task == "classification" else None
    labels = (
        _class_labels(class_labels, list(fitted), len(fitted))
        if fitted is not None and len(fitted) > 2
        else _no_labels(class_labels)
    )
    width = max(1, len(labels))

    def reference(x: F32) -> F32:
        with warnings.catch_warnings():
            # Fitted on a DataFrame, scored on arrays in the same column order.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            if task == "classification" and labels:
                return _columns(estimator.predict_proba(x), len(x), width)
            if task == "classification":
                return _column(estimator.predict_proba(x)[:, 1], len(x))
            return _column(estimator.predict(x), len(x))

    if task == "classification":
        label = "predict_proba" if labels else "predict_proba[:, 1]"
    else:
        label = "predict"
    return Source(
        name=name,
        kind="sklearn",
        model=estimator,
        schema=_schema(
            feature_names, None if stored is None else list(stored), n_features, allow_nan
        ),
        task=task,
        sha256=_sha256(onnx_bytes),
        reference=reference,
        reference_label=f"sklearn.{type(estimator).__name__}.{label}",
        classes=labels,
    )
