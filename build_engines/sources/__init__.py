"""Turn whatever the user has into a :class:`~build_engines.base.Source`.

Objects in memory are dispatched by type; files by suffix. Pickle and joblib
files execute code when loaded, so they are refused unless the caller passes
``allow_pickle=True`` (``--allow-pickle``), and even then only the *source*
is unpickled: nothing written to the model repository is ever a pickle.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.base import Source
from setsuna.errors import PickleRefusedError, SourceError, UnknownModelTypeError

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth"})
_KNOWN = (
    "LightGBM .txt/.lgb, XGBoost .json/.ubj, CatBoost .cbm, ONNX .onnx "
    "(pickle/joblib with --allow-pickle)"
)


def from_object(
    model: Any,
    *,
    name: str,
    example_input: Any = None,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
) -> Source:
    """Dispatch an in-memory model by its library's type."""
    module = type(model).__module__.split(".")[0]
    if module == "lightgbm":
        from build_engines.sources.trees import from_lightgbm

        return from_lightgbm(model, name=name, feature_names=feature_names, allow_nan=allow_nan)
    if module == "xgboost":
        from build_engines.sources.trees import from_xgboost

        return from_xgboost(model, name=name, feature_names=feature_names, allow_nan=allow_nan)
    if module == "catboost":
        from build_engines.sources.catboost_model import from_catboost

        return from_catboost(model, name=name, feature_names=feature_names, allow_nan=allow_nan)
    if module == "sklearn":
        from build_engines.sources.trees import from_sklearn

        n = int(getattr(model, "n_features_in_", 0))
        if n <= 0:
            raise SourceError(f"{type(model).__name__} is not fitted: fit it before building")
        return from_sklearn(
            model, name=name, n_features=n, feature_names=feature_names, allow_nan=allow_nan
        )
    if module == "torch":
        if example_input is None:
            raise SourceError(
                "a PyTorch module needs an example input (a batch with the serving shape), "
                "e.g. torch.zeros(1, 48)"
            )
        from build_engines.sources.neural import from_torch

        return from_torch(
            model, example_input, name=name, feature_names=feature_names, allow_nan=allow_nan
        )
    raise UnknownModelTypeError(
        f"cannot build {type(model).__module__}.{type(model).__name__}: supported are "
        "LightGBM, XGBoost, CatBoost, scikit-learn estimators, PyTorch modules and ONNX files"
    )


def from_path(
    path: Path,
    *,
    name: str,
    allow_pickle: bool = False,
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
    example_input: Any = None,
) -> Source:
    """Load a model file by its suffix (and, for JSON, by its content)."""
    if not path.is_file():
        raise SourceError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise SourceError(
            f"{path} is empty (an interrupted save or copy?); save the model again in its "
            f"library's own format: {_KNOWN}"
        )
    suffix = path.suffix.lower()
    kw: dict[str, Any] = {"name": name, "feature_names": feature_names, "allow_nan": allow_nan}
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path} is a pickle/joblib file, which runs arbitrary code when loaded. "
                "Export the model in its library's own format (LightGBM text, XGBoost JSON, "
                "ONNX), or pass --allow-pickle if you trust this file"
            )
        warnings.warn(
            f"unpickling {path}: this executes code from the file. Only the source is "
            "unpickled; nothing in the model repository will be a pickle.",
            stacklevel=2,
        )
        obj = _unpickle(path)
        return from_object(obj, example_input=example_input, **kw)
    if suffix in (".txt", ".lgb", ".model") and _looks_like_lightgbm(path):
        from build_engines.sources.trees import from_lightgbm

        return from_lightgbm(path, **kw)
    if suffix in (".json", ".ubj"):
        from build_engines.sources.trees import from_xgboost

        return from_xgboost(path, **kw)
    if suffix == ".cbm":
        from build_engines.sources.catboost_model import from_catboost

        return from_catboost(path, **kw)
    if suffix == ".onnx":
        from build_engines.sources.neural import from_onnx

        return from_onnx(path, **kw)
    raise UnknownModelTypeError(f"unknown model file type {path.name!r}; supported: {_KNOWN}")


def _looks_like_lightgbm(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"tree")


def _unpickle(path: Path) -> Any:
    if path.suffix.lower() in (".pt", ".pth"):
        import torch

        return torch.load(path, weights_only=False)
    import joblib

    return joblib.load(path)


def load_rows(path: Path) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Held-out rows from a ``.npy`` file (never with pickles allowed)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"cannot read held-out rows from {path}: {exc}; save them with "
            "numpy.save as a float32 array"
        ) from exc
    return np.ascontiguousarray(arr, dtype=np.float32)
