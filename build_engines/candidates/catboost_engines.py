"""CatBoost's own exports as candidates: its ONNX graph and its C++ code, compiled.

- ``onnx``: ``save_model(format="onnx")`` (CatBoost's exporter: a
  ``TreeEnsembleClassifier``/``Regressor`` of ai.onnx.ml), its ZipMap dropped
  and rewritten to the setsuna contract (:func:`trees_onnx.to_features_score`);
  served by ONNX Runtime locally and natively in the container.
- ``catboost-cpp``: ``save_model(format="cpp")`` is standalone C++ (the
  borders, the oblivious trees, an evaluator over ``std::vector<float>``); a
  C entry point with the setsuna batch ABI (``setsuna_num_feature``,
  ``setsuna_predict_batch``: the one tl2cgen libraries export) is compiled
  beside it into one shared library, so the in-process ``tl2cgen`` runtime and
  the native ``setsuna_forest`` backend both serve it with no new code. The
  raw sum is turned into a probability with the logistic function for a
  classifier (what CatBoost's ``Probability`` does for Logloss). The library
  is cached by the model's sha256, the C++ exporter's version and this
  module's entry point, like the tl2cgen libraries.

The gate judges both against CatBoost's own predictor, as always.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from build_engines.base import F32, Built, Candidate, ContainerSpec, Source
from build_engines.candidates.compile_cache import (
    cache_key,
    default_cache_dir,
    package_version,
    publishing,
    run_tool,
)
from build_engines.candidates.trees import _attempt
from build_engines.candidates.trees_onnx import skip_int8, to_features_score
from setsuna.errors import SourceError
from setsuna.runtime.onnx import ONNX_FILE
from setsuna.runtime.trees import TL2CGEN_BATCH_SYMBOL, TL2CGEN_NFEATURE_SYMBOL
from setsuna.schema import INPUT_NAME

#: The compiled library's name in the version folder.
CPP_LIB: Final = "catboost-forest.so"
#: The setsuna batch ABI around CatBoost's evaluator (appended to its C++ file).
ENTRY_CPP: Final = """
#include <cmath>
#include <cstdint>
extern "C" __attribute__((visibility("default"))) int32_t @nfeature@(void) { return @n@; }
extern "C" __attribute__((visibility("default")))
void @batch@(const float* x, int64_t n, float* out) {
  std::vector<float> row(@n@);
  for (int64_t i = 0; i < n; ++i) {
    row.assign(x + i * @n@, x + (i + 1) * @n@);
    double z = ApplyCatboostModel(row);
    out[i] = (float)(@classifier@ ? 1.0 / (1.0 + std::exp(-z)) : z);
  }
}
"""
CXX_FLAGS: Final = ("-O2", "-std=c++17", "-shared", "-fPIC", "-Wl,-Bsymbolic")


def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
    """Every engine that applies to a CatBoost source."""
    if source.kind != "catboost":
        raise SourceError(
            f"candidates.catboost_engines converts catboost sources, got {source.kind!r}"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    return [
        _attempt("onnx", workdir / "onnx", lambda f: build_onnx(source, f)),
        skip_int8(source),
        _attempt("catboost-cpp", workdir / "catboost-cpp", lambda f: build_cpp(source, f)),
    ]


def build_onnx(source: Source, folder: Path) -> Candidate:
    import onnx
    from onnx import helper

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        source.model.save_model(str(path), format="onnx")
        model = onnx.load(str(path))
    graph = model.graph
    zipmaps = [n for n in graph.node if n.op_type == "ZipMap"]
    for node in zipmaps:  # keep the probability tensor the ZipMap read
        graph.node.remove(node)
    ensemble = next(n for n in graph.node if n.op_type.startswith("TreeEnsemble"))
    del graph.output[:]
    for name in ensemble.output:
        graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if source.task == "classification":
        label = ensemble.output[0]
        graph.output.remove(next(o for o in graph.output if o.name == label))
    old = graph.input[0].name
    for node in graph.node:
        node.input[:] = [INPUT_NAME if i == old else i for i in node.input]
    graph.input[0].name = INPUT_NAME
    if source.task == "classification" and "prob" not in ensemble.output[1]:
        raise SourceError(
            f"CatBoost's ONNX classifier outputs {list(ensemble.output)}: no probabilities"
        )
    model = to_features_score(model, source)
    # CatBoost writes IR version 3, where every initializer must also be a graph input;
    # the score's Gather index is an initializer only, as IR >= 4 allows.
    model.ir_version = max(model.ir_version, 7)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / ONNX_FILE))
    return Candidate(
        name="onnx",
        engine="onnxruntime",
        folder=folder,
        params={"file": ONNX_FILE, "threads": 1, "optimized_offline": False},
        container=ContainerSpec(default_model_filename=ONNX_FILE, platform="onnxruntime_onnx"),
        notes=f"CatBoost {package_version('catboost')} ONNX export, ZipMap dropped",
    )


def build_cpp(source: Source, folder: Path, cache_dir: Path | None = None) -> Candidate:
    n = source.schema.n_features
    entry = (
        ENTRY_CPP.replace("@nfeature@", TL2CGEN_NFEATURE_SYMBOL)
        .replace("@batch@", TL2CGEN_BATCH_SYMBOL)
        .replace("@n@", str(n))
        .replace("@classifier@", "true" if source.task == "classification" else "false")
    )
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SourceError("no C++ compiler (g++) on PATH: install one to build catboost-cpp")
    key = cache_key(source.sha256, package_version("catboost"), entry, " ".join(CXX_FLAGS))
    cached = (cache_dir or default_cache_dir()) / "catboost-cpp" / f"{key}.so"
    if not cached.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            cpp = Path(tmp) / "model.cpp"
            source.model.save_model(str(cpp), format="cpp")
            cpp.write_text(cpp.read_text() + entry)
            with publishing(cached) as out:
                run_tool([compiler, *CXX_FLAGS, str(cpp), "-o", str(out)], "compiling catboost-cpp")
    shutil.copy2(cached, folder / CPP_LIB)
    params: dict[str, Any] = {"lib": CPP_LIB, "threads": 1}
    return Candidate(
        name="catboost-cpp",
        engine="tl2cgen",
        folder=folder,
        params=params,
        notes=(
            f"CatBoost {package_version('catboost')} C++ export compiled by {Path(compiler).name} "
            f"{' '.join(CXX_FLAGS)} with the setsuna batch entry point"
        ),
    )
