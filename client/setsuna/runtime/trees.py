"""Compiled tree engines: lleaves, tl2cgen, and treelite's GTIL.

Each engine makes one native call per batch and never loops over rows in
Python. These loaders also run inside Triton Python-backend processes, so
they import their runtime lazily and never compile anything: a version folder
holds the compiled object next to the model, and a folder without it is
refused rather than rebuilt on the serving path (compiling a 500-tree forest
takes over a minute, and its output would be an unlisted file that fails
:func:`setsuna.manifest.verify`).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from setsuna import runtime
from setsuna.errors import EngineError, ShapeError
from setsuna.runtime import F32

#: Symbols of the batch entry point build_engines appends to tl2cgen's C code.
TL2CGEN_BATCH_SYMBOL = "setsuna_predict_batch"
TL2CGEN_NFEATURE_SYMBOL = "setsuna_num_feature"
#: Scores the batch entry point writes per row: 1, or C for a model of 3+ classes
#: (absent from libraries built before multiclass models: those write 1).
TL2CGEN_NOUTPUT_SYMBOL = "setsuna_num_output"
#: The compiled library's file name. Not ``model.so``: the Python backend imports
#: ``model`` from the version folder, and Python prefers an extension module
#: ``model.so`` to ``model.py`` ("dynamic module does not define module export
#: function (PyInit_model)"). The hyphen keeps it unimportable under any name.
TL2CGEN_LIB = "tl2cgen-forest.so"


def host_cpu() -> tuple[str, str]:
    """LLVM's name for this CPU and a short hash of its feature flags (build time only).

    Imports llvmlite, whose LLVM library costs ~30 MB per process: the serving
    path checks :func:`cpu_flags` instead.
    """
    import llvmlite.binding as llvm

    name = str(llvm.get_host_cpu_name())
    try:
        features = str(llvm.get_host_cpu_features().flatten())
    except RuntimeError:  # LLVM cannot detect features on some hosts
        features = ""
    return name, hashlib.sha256(features.encode()).hexdigest()[:16]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A short hash of this CPU's model name and instruction-set flags ("" if unknown).

    lleaves emits machine code for the CPU it compiled on; running it on a CPU
    without one of those instructions kills the process (SIGILL), Triton
    included. The build records this hash and the loader compares it, without
    loading LLVM into every serving process.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough: the flags are per machine
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = " ".join(sorted(fields.get("flags", "").split()))
    if not flags:
        return ""
    return hashlib.sha256(f"{fields.get('model name', '')}|{flags}".encode()).hexdigest()[:16]


def _as_batch(x: F32, n_features: int) -> F32:
    """``x`` as C-contiguous float32 ``[n, n_features]``; no copy when it already is."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ShapeError(
            f"expected a batch of shape [n, {n_features}], got {list(arr.shape)}; "
            "validate requests with the model's FeatureSchema.check first"
        )
    return arr


def _last_column(out: Any, n: int) -> F32:
    """The scores of a native output: the only column, class 1 of two, or all of 3+ classes."""
    arr = np.asarray(out).reshape(n, -1)
    if arr.shape[1] > 2:  # class probabilities of a multiclass model, in class order
        return np.ascontiguousarray(arr, dtype=np.float32)
    return np.ascontiguousarray(arr[:, -1:], dtype=np.float32)


class LleavesEngine:
    """A LightGBM forest compiled to machine code by lleaves, linked into a shared library.

    The build links lleaves' object file into ``lleaves-forest.so`` so that
    serving is one ctypes call of its ``forest_root(double*, double*, int,
    int)`` per batch: no lleaves, llvmlite or LLVM in the serving process
    (they cost ~33 MB per Triton stub) and no JIT link at load. The output is
    bit-identical to ``lleaves.Model.predict``. ``threads`` > 1 splits the rows
    over a thread pool (ctypes releases the GIL); 1, the default, suits a
    Triton instance, which is already one of several.
    """

    def __init__(
        self,
        lib: Path,
        n_features: int,
        *,
        threads: int = 1,
        cpu_flags_sha256: str | None = None,
        entry: str = "forest_root",
        n_outputs: int = 1,
    ) -> None:
        if not lib.is_file():
            raise EngineError(
                f"{lib} is missing; the loader never compiles at serve time. "
                "Rebuild the model with `make build-engines`"
            )
        here = cpu_flags()
        if cpu_flags_sha256 and here and here != cpu_flags_sha256:
            raise EngineError(
                f"{lib} was compiled for a CPU with flags hash {cpu_flags_sha256} but this "
                f"host's is {here}; running it could crash the process. Rebuild the model "
                "on this host (`make build-engines`), or serve its onnx/tl2cgen candidate"
            )
        if n_features < 1 or threads < 1 or n_outputs < 1:
            raise EngineError(
                f"n_features={n_features}, threads={threads} and n_outputs={n_outputs} must be >= 1"
            )
        self._width = n_outputs
        dll = ctypes.CDLL(str(lib.resolve()))
        try:
            fn = getattr(dll, entry)
        except AttributeError as exc:
            raise EngineError(f"{lib} has no symbol {entry!r}; rebuild the model") from exc
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
        self._dll, self._fn = dll, fn  # the library stays mapped while fn is used
        self._n_features, self._threads = n_features, threads

    def predict(self, x: F32) -> F32:
        batch = _as_batch(x, self._n_features)
        n = len(batch)
        if n >= 2**31 - 1:
            raise ShapeError(f"{n} rows overflow lleaves' int32 row index; split the batch")
        # LightGBM compares thresholds in double, and so does this code.
        wide = np.ascontiguousarray(batch, dtype=np.float64)
        out = np.empty(n * self._width, dtype=np.float64)  # lleaves writes row-major [n, C]
        if self._threads == 1 or n < 2 * self._threads:
            self._fn(wide.ctypes.data, out.ctypes.data, 0, n)
        else:
            from concurrent.futures import ThreadPoolExecutor

            step = -(-n // self._threads)
            with ThreadPoolExecutor(self._threads) as pool:
                done = [
                    pool.submit(self._fn, wide.ctypes.data, out.ctypes.data, i, min(i + step, n))
                    for i in range(0, n, step)
                ]
                for d in done:
                    d.result()
        return out.astype(np.float32).reshape(n, self._width)


class Tl2cgenEngine:
    """A forest compiled to a shared library by tl2cgen.

    With one thread the batch is scored by ``setsuna_predict_batch``, a C
    loop build_engines compiles into the same library: one ctypes call per
    batch (NaN -> missing, rows scored in C). On a single row that is 15 us
    less than tl2cgen's Python ``Predictor``, whose DMatrix set-up costs as
    much as the forest (20 vs 35 us p50, 500 trees x 63 leaves). Libraries
    without that symbol, or more than one thread, go through the Predictor.
    """

    def __init__(self, lib: Path, *, threads: int = 1) -> None:
        if not lib.is_file():
            raise EngineError(f"{lib} is missing; rebuild the model with `make build-engines`")
        self._threads = threads
        self._batch: Any = None
        self._predictor: Any = None
        self._n_features = -1
        self._width = 1
        dll = ctypes.CDLL(str(lib.resolve()))
        if threads == 1 and hasattr(dll, TL2CGEN_BATCH_SYMBOL):
            num_feature = getattr(dll, TL2CGEN_NFEATURE_SYMBOL)
            num_feature.restype = ctypes.c_int32
            num_feature.argtypes = []
            self._n_features = int(num_feature())
            if hasattr(dll, TL2CGEN_NOUTPUT_SYMBOL):
                num_output = getattr(dll, TL2CGEN_NOUTPUT_SYMBOL)
                num_output.restype = ctypes.c_int32
                num_output.argtypes = []
                self._width = int(num_output())
            batch = getattr(dll, TL2CGEN_BATCH_SYMBOL)
            batch.restype = None
            batch.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            self._dll = dll  # keeps the library mapped while the function is used
            self._batch = batch
        else:
            import tl2cgen

            self._predictor = tl2cgen.Predictor(str(lib), nthread=threads)
            self._n_features = int(self._predictor.num_feature)

    def predict(self, x: F32) -> F32:
        batch = _as_batch(x, self._n_features)
        n = len(batch)
        if self._batch is None:
            import tl2cgen

            return _last_column(self._predictor.predict(tl2cgen.DMatrix(batch)), n)
        out = np.empty((n, self._width), dtype=np.float32)
        self._batch(batch.ctypes.data, n, out.ctypes.data)
        return out


#: Treelite loaders by the FIL ``model_type`` of the file they read.
_GTIL_FORMATS = ("lightgbm", "xgboost_json", "xgboost_ubj", "treelite_checkpoint")


class GtilEngine:
    """Treelite's reference interpreter over the same file FIL loads.

    FIL cannot run here (it needs the Triton FIL backend), and FIL implements
    treelite's semantics, so the gate judges a FIL candidate by GTIL reading
    the very file FIL will read. GTIL evaluates in the model's own precision
    (float64 for LightGBM), FIL in float32: see the candidate's notes.
    """

    def __init__(self, path: Path, model_type: str, *, threads: int = 1) -> None:
        import treelite

        if model_type == "lightgbm":
            self._model = treelite.frontend.load_lightgbm_model(path)
        elif model_type == "xgboost_json":
            self._model = treelite.frontend.load_xgboost_model(path, format_choice="json")
        elif model_type == "xgboost_ubj":
            self._model = treelite.frontend.load_xgboost_model(path, format_choice="ubjson")
        elif model_type == "treelite_checkpoint":
            self._model = treelite.Model.deserialize(path)
        else:
            raise EngineError(
                f"unknown FIL model_type {model_type!r}; known: {', '.join(_GTIL_FORMATS)}. "
                "Rebuild the model with this version of setsuna"
            )
        self._n_features = int(self._model.num_feature)
        self._threads = threads

    def predict(self, x: F32) -> F32:
        import treelite

        batch = _as_batch(x, self._n_features)
        out = treelite.gtil.predict(self._model, batch, nthread=self._threads)
        return _last_column(out, len(batch))


def load_lleaves(folder: Path, params: Mapping[str, Any]) -> LleavesEngine:
    if "lib" not in params or "n_features" not in params:
        raise EngineError(
            f"lleaves params {dict(params)} need 'lib' and 'n_features' (models built before "
            "lleaves objects were linked into a library); rebuild with `make build-engines`"
        )
    flags = params.get("cpu_flags_sha256")
    return LleavesEngine(
        runtime.artifact(folder, params["lib"]),
        int(params["n_features"]),
        threads=int(params.get("threads", 1)),
        cpu_flags_sha256=None if flags is None else str(flags),
        n_outputs=int(params.get("n_outputs", 1)),
    )


def load_tl2cgen(folder: Path, params: Mapping[str, Any]) -> Tl2cgenEngine:
    return Tl2cgenEngine(
        runtime.artifact(folder, params.get("lib", TL2CGEN_LIB)),
        threads=int(params.get("threads", 1)),
    )


def load_gtil(folder: Path, params: Mapping[str, Any]) -> GtilEngine:
    if "file" not in params or "model_type" not in params:
        raise EngineError(
            f"gtil params {dict(params)} need 'file' and 'model_type'; rebuild the model"
        )
    return GtilEngine(
        runtime.artifact(folder, params["file"]),
        str(params["model_type"]),
        threads=int(params.get("threads", 1)),
    )
