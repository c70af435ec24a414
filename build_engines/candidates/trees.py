"""Candidate engines for tree ensembles (LightGBM, XGBoost, scikit-learn).

For one source, every engine that applies is built into its own subfolder of
``workdir`` holding only that engine's files, or reported as
:class:`~build_engines.base.Skipped` with the reason. One module per engine:

``onnx``, ``onnx-int8`` (:mod:`.trees_onnx`)
    onnxmltools / skl2onnx, reshaped to the setsuna contract and optimised
    offline by ONNX Runtime; INT8 is always skipped (nothing to quantise).
``lleaves`` (:mod:`.trees_lleaves`, LightGBM)
    the forest compiled to machine code by LLVM, linked into a library.
``tl2cgen`` (:mod:`.trees_tl2cgen`, tree ensembles)
    treelite -> C -> a shared library (gcc), with a batch entry point written
    in C (``tl2cgen_batch.c``, ``tl2cgen_blocked.c``).
``fil`` (:mod:`.trees_fil`, tree ensembles, container target)
    the file Triton's FIL backend loads, judged here by treelite's GTIL.

Compiled libraries are cached (:mod:`.compile_cache`) in setsuna's cache
directory. This module only decides which engines apply and turns a failed
build into a Skipped; the NaN agreement probe of ``allow_nan`` sources is the
gate's (:func:`build_engines.gate.screen_nan`), for every source kind.

The public names other code imports from here (``to_features_score``,
``exact_lightgbm_thresholds``, the engine constants, ``default_cache_dir``)
are re-exported from the engine modules.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from build_engines.base import F32, Built, Candidate, Skipped, Source
from build_engines.candidates.compile_cache import CACHE_ENV, default_cache_dir
from build_engines.candidates.forests import TREE_KINDS, is_forest
from build_engines.candidates.trees_fil import FIL_FILES, build_fil
from build_engines.candidates.trees_lleaves import (
    LLEAVES_BLOCKSIZE,
    LLEAVES_LIB,
    LLEAVES_LINK,
    LLEAVES_MODEL,
    build_lleaves,
)
from build_engines.candidates.trees_onnx import (
    build_onnx,
    exact_lightgbm_thresholds,
    skip_int8,
    to_features_score,
)
from build_engines.candidates.trees_tl2cgen import (
    TL2CGEN_BLOCK_ROWS,
    TL2CGEN_OPTIONS,
    TL2CGEN_PARAMS,
    TL2CGEN_TREES_PER_FILE,
    build_tl2cgen,
)
from setsuna.errors import SetsunaError, SourceError

__all__ = [
    "CACHE_ENV",
    "FIL_FILES",
    "LLEAVES_BLOCKSIZE",
    "LLEAVES_LIB",
    "LLEAVES_LINK",
    "LLEAVES_MODEL",
    "TL2CGEN_BLOCK_ROWS",
    "TL2CGEN_OPTIONS",
    "TL2CGEN_PARAMS",
    "TL2CGEN_TREES_PER_FILE",
    "convert",
    "default_cache_dir",
    "exact_lightgbm_thresholds",
    "to_features_score",
]


def _fresh(folder: Path) -> Path:
    """An empty candidate folder: a rebuild must not publish a stale file."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _attempt(name: str, folder: Path, build: Callable[[Path], Candidate]) -> Built:
    """Build one candidate; a failure becomes a Skipped with the cause, not a crash."""
    try:
        return build(_fresh(folder))
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "" if isinstance(exc, SetsunaError) else f"{type(exc).__name__}: "
        return Skipped(name=name, reason=f"conversion failed: {kind}{detail}")


def convert(
    source: Source, workdir: Path, calib: F32, *, cache_dir: Path | None = None
) -> list[Built]:
    """Build every tree engine that applies to ``source`` under ``workdir``.

    ``calib`` rows are not needed to build tree engines; they feed the ONNX
    load check (and, in :func:`build_engines.build.evaluate`, the gate's NaN
    probe for ``allow_nan`` sources).
    """
    if source.kind not in TREE_KINDS:
        raise SourceError(
            f"candidates.trees converts {', '.join(TREE_KINDS)} sources, got {source.kind!r}"
        )
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    built: list[Built] = [
        _attempt("onnx", workdir / "onnx", lambda f: build_onnx(source, f, calib)),
        skip_int8(source),
    ]
    if source.kind == "lightgbm":
        built.append(
            _attempt("lleaves", workdir / "lleaves", lambda f: build_lleaves(source, f, cache))
        )
    if is_forest(source):
        built.append(
            _attempt("tl2cgen", workdir / "tl2cgen", lambda f: build_tl2cgen(source, f, cache))
        )
        built.append(_attempt("fil", workdir / "fil", lambda f: build_fil(source, f)))
    else:
        why = (
            f"{type(source.model).__name__} is not a tree ensemble treelite imports "
            "(RandomForest, ExtraTrees, GradientBoosting, HistGradientBoosting); "
            "the onnx candidate serves it"
        )
        built += [Skipped(name="tl2cgen", reason=why), Skipped(name="fil", reason=why)]
    return built
