"""In-process engines: one native call per batch, threads chosen on purpose.

The same loaders serve three callers, so an engine behaves identically in
each: the accuracy gate at build time, the Python-backend wrappers inside
Triton (``local`` target), and the in-process benchmarks in ``perf/``.

An engine takes a C-contiguous float32 batch ``[n, *row_shape]`` and returns
float32 ``[n, 1]``: the positive-class probability for binary classifiers,
the value for regressors; or ``[n, C]`` for a multiclass classifier (its
class probabilities; the engine parameter ``n_outputs`` is C). Loaders
import their runtime lazily, so the SDK itself does not depend on
onnxruntime, lleaves or tl2cgen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from setsuna.errors import EngineError

F32 = npt.NDArray[np.float32]


class Engine(Protocol):
    """A loaded engine: ``predict`` maps a float32 batch to float32 ``[n, 1]`` (or ``[n, C]``)."""

    def predict(self, x: F32) -> F32: ...


Loader = Callable[[Path, Mapping[str, Any]], Engine]

_LOADERS: dict[str, str] = {
    # engine kind -> "module:function"; imported on first use.
    "onnxruntime": "setsuna.runtime.onnx:load",
    "lleaves": "setsuna.runtime.trees:load_lleaves",
    "tl2cgen": "setsuna.runtime.trees:load_tl2cgen",
    # treelite's reference interpreter: judges FIL candidates, never served.
    "gtil": "setsuna.runtime.trees:load_gtil",
    "tensorrt": "setsuna.runtime.tensorrt:load",
    # two of the above, routed by batch size (build_engines/composite.py)
    "switch": "setsuna.runtime.switch:load",
}


def artifact(folder: Path, name: object) -> Path:
    """``folder/name`` if that names a file inside ``folder``, else :class:`EngineError`.

    Engine parameters come from the manifest, and an absolute path, a ``..``
    or a symlink there would load a file the manifest's hashes never covered:
    every artifact a loader opens goes through here.
    """
    text = str(name)
    rel = Path(text)
    if not text or rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
        raise EngineError(
            f"engine file {text!r} is not a plain file name inside the version folder; "
            "the manifest was edited or built by something else: rebuild the model"
        )
    path = folder / rel
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise EngineError(f"engine file {path} is a link or not a regular file: rebuild")
    return path  # a missing file is the loader's to report, in its own words


def engine_kinds() -> tuple[str, ...]:
    """Names of every engine kind this version can load."""
    return tuple(_LOADERS)


def load(kind: str, folder: Path, params: Mapping[str, Any]) -> Engine:
    """Load the engine of ``kind`` whose files are in ``folder``."""
    target = _LOADERS.get(kind)
    if target is None:
        raise EngineError(
            f"unknown engine kind {kind!r}; known kinds: {', '.join(_LOADERS)}. "
            "Rebuild the model with this version of setsuna"
        )
    module_name, func_name = target.split(":")
    import importlib

    try:
        loader: Loader = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:
        raise EngineError(
            f"engine {kind!r} needs a runtime that is not installed ({exc.name}); "
            "install setsuna[serve] (or setsuna[tensorrt] for TensorRT plans)"
        ) from exc
    try:
        return loader(folder, params)
    except EngineError:
        raise
    except Exception as exc:  # foreign runtime errors are translated here, once
        raise EngineError(f"loading {kind} engine from {folder} failed: {exc}") from exc
