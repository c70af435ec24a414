"""Candidate engines for tree ensembles (LightGBM, XGBoost, scikit-learn).

For one source, every engine that applies is built into its own subfolder of
``workdir`` holding only that engine's files, or reported as
:class:`~build_engines.base.Skipped` with the reason:

``onnx``
    onnxmltools / skl2onnx, reshaped to the setsuna contract (one input
    ``features`` [N, n_features], one output ``score`` [N, 1]) and optimised
    offline by ONNX Runtime.
``onnx-int8``
    always skipped: quantisation has nothing to act on in a forest.
``lleaves`` (LightGBM)
    the forest compiled to machine code by LLVM; the object is cached by the
    model's sha256 because compiling 500 trees takes over a minute.
``tl2cgen`` (tree ensembles)
    treelite -> C -> a shared library (gcc), with a C batch entry point added
    so that serving is one ctypes call per batch; cached like lleaves.
``fil`` (tree ensembles, container target)
    the file Triton's FIL backend loads. It cannot run here, so the gate
    judges it with treelite's GTIL reading the same file.

Compiled artefacts are cached under ``cache_dir`` (``$SETSUNA_CACHE_DIR`` or
``<repo>/.cache``) keyed by the source hash and everything else that changes
the output (library versions, CPU for lleaves, the C template), then copied
into the candidate folder; the copy is what the manifest hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.base import F32, Built, Candidate, ContainerSpec, Skipped, Source
from build_engines.sources.trees import ONNX_ML_OPSET, ONNX_OPSET, sklearn_onnx
from setsuna.errors import SetsunaError, SourceError
from setsuna.runtime.onnx import ONNX_FILE
from setsuna.runtime.trees import (
    TL2CGEN_BATCH_SYMBOL,
    TL2CGEN_LIB,
    TL2CGEN_NFEATURE_SYMBOL,
    cpu_flags,
    host_cpu,
)
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnx
    import treelite

CACHE_ENV = "SETSUNA_CACHE_DIR"
_REPO = Path(__file__).resolve().parents[2]
_TREE_KINDS = ("lightgbm", "xgboost", "sklearn")

LLEAVES_MODEL = "model.txt"
#: lleaves' object file linked into a shared library (hyphenated for the reason
#: given at :data:`setsuna.runtime.trees.TL2CGEN_LIB`).
LLEAVES_LIB = "lleaves-forest.so"
LLEAVES_LINK = "gcc -shared -Wl,-Bsymbolic"
#: Extra flags for every tl2cgen compile and link. ``-Bsymbolic`` binds the
#: library's calls to its own ``predict``: every tl2cgen library exports the same
#: symbol names, and two loaded into one process must not call each other's trees.
TL2CGEN_OPTIONS = ("-Wl,-Bsymbolic",)
#: Trees per generated C file: gcc's -O3 time grows faster than linearly with
#: function size, and separate files compile in parallel.
TL2CGEN_TREES_PER_FILE = 25
#: tl2cgen code-generation parameters. ``quantize`` maps each feature once per
#: row to its bin among the model's thresholds (binary search) and compares ints
#: in the trees: identical decisions, and on the 500x63 example it halves
#: latency (43 -> 22 us a row, 38 -> 18 ms per 1024 rows) and compile time.
#: Branch annotation from data (``annotate_in``) was measured too: no gain.
TL2CGEN_PARAMS: dict[str, Any] = {"quantize": 1}
#: Rows the batch entry point scores together, one tree unit (file) at a time:
#: the unit's code stays in cache across the block instead of the whole forest
#: streaming through it for every row. 500x63 example, threads=1, 1024 rows:
#: 60k -> 80k rows/s (block 64: 70k); single-row latency unchanged.
TL2CGEN_BLOCK_ROWS = 256
#: lleaves ``fblocksize``: trees run over the whole batch a block at a time.
#: 500x63 example, 1024 rows, threads=1: 8 -> 131k rows/s, 16 -> 123k, 34
#: (lleaves' default) -> 110k, 128 -> 92k, 1 -> 118k; single-row p50 the same
#: within noise (22-23 us). Compile time ~1 min either way.
LLEAVES_BLOCKSIZE = 8

#: Triton FIL: (file name, model_type) per source kind.
FIL_FILES = {
    "lightgbm": ("model.txt", "lightgbm"),
    "xgboost": ("xgboost.json", "xgboost_json"),
    "sklearn": ("checkpoint.tl", "treelite_checkpoint"),
}

#: Rows the NaN probe scores per candidate of an ``allow_nan`` source.
_NAN_PROBE_ROWS = 256
_NAN_PROBE_SHARE = 0.2
_NAN_PROBE_TOL = 1e-4

# Appended to tl2cgen's generated C. One call scores a C-contiguous float32
# batch: NaN becomes "missing" (tl2cgen's DMatrix convention), each row is
# scored by the generated predict() with the model's postprocessor, and the
# last output (the only one, or class 1 of two) is written as float32. A float
# widened to double has its low 29 mantissa bits zero, so a present value can
# never alias the union's missing marker (-1).
_BATCH_C = """\
#include "header.h"

#define SETSUNA_N_FEATURE {n_feature}
#define SETSUNA_N_OUT (N_TARGET * MAX_N_CLASS)

int32_t {nfeature_symbol}(void) {{ return SETSUNA_N_FEATURE; }}

void {batch_symbol}(const float* x, int64_t n_rows, float* out) {{
  union Entry row[SETSUNA_N_FEATURE];
  {leaf_type} result[SETSUNA_N_OUT];
  for (int64_t i = 0; i < n_rows; ++i) {{
    const float* r = x + i * SETSUNA_N_FEATURE;
    for (int j = 0; j < SETSUNA_N_FEATURE; ++j) {{
      if (isnan(r[j])) {{
        row[j].missing = -1;
      }} else {{
        row[j].fvalue = r[j];
      }}
    }}
    for (int k = 0; k < SETSUNA_N_OUT; ++k) {{
      result[k] = 0;
    }}
    predict(row, 0, result);
    out[i] = (float)result[SETSUNA_N_OUT - 1];
  }}
}}
"""
_C_TYPES = {"float32": "float", "float64": "double"}

# Appended to tl2cgen's main.c when its predict() is the usual prologue
# (quantisation), one call per tree unit, epilogue (base scores,
# postprocessor): the same steps, with each unit run over a block of rows
# before the next. Same inputs, same arithmetic per row, same output as
# _BATCH_C. The block buffers are on the heap (a serving thread's stack may be
# small); if that allocation fails, rows are scored one at a time on the stack.
_BLOCKED_C = """
#define SETSUNA_N_FEATURE {n_feature}
#define SETSUNA_N_OUT (N_TARGET * MAX_N_CLASS)
#define SETSUNA_BLOCK {block}

int32_t {nfeature_symbol}(void) {{ return SETSUNA_N_FEATURE; }}

static void setsuna_prologue(union Entry* data, int pred_margin, {leaf_type}* result) {{
{prologue}
}}

static void setsuna_epilogue(union Entry* data, int pred_margin, {leaf_type}* result) {{
{epilogue}
}}

static void setsuna_fill(const float* r, union Entry* row, {leaf_type}* result) {{
  for (int j = 0; j < SETSUNA_N_FEATURE; ++j) {{
    if (isnan(r[j])) {{
      row[j].missing = -1;
    }} else {{
      row[j].fvalue = r[j];
    }}
  }}
  for (int k = 0; k < SETSUNA_N_OUT; ++k) {{
    result[k] = 0;
  }}
  setsuna_prologue(row, 0, result);
}}

static void setsuna_block(union Entry (*rows)[SETSUNA_N_FEATURE],
                          {leaf_type} (*res)[SETSUNA_N_OUT], int m) {{
{unit_loops}
}}

void {batch_symbol}(const float* x, int64_t n_rows, float* out) {{
  int64_t cap = n_rows < SETSUNA_BLOCK ? n_rows : SETSUNA_BLOCK;
  union Entry (*rows)[SETSUNA_N_FEATURE] = malloc(sizeof(*rows) * (size_t)(cap > 0 ? cap : 1));
  {leaf_type} (*res)[SETSUNA_N_OUT] = malloc(sizeof(*res) * (size_t)(cap > 0 ? cap : 1));
  if (rows == NULL || res == NULL) {{
    free(rows);
    free(res);
    union Entry row[1][SETSUNA_N_FEATURE];
    {leaf_type} result[1][SETSUNA_N_OUT];
    for (int64_t i = 0; i < n_rows; ++i) {{
      setsuna_fill(x + i * SETSUNA_N_FEATURE, row[0], result[0]);
      setsuna_block(row, result, 1);
      setsuna_epilogue(row[0], 0, result[0]);
      out[i] = (float)result[0][SETSUNA_N_OUT - 1];
    }}
    return;
  }}
  for (int64_t s = 0; s < n_rows; s += cap) {{
    int m = (int)(n_rows - s < cap ? n_rows - s : cap);
    for (int i = 0; i < m; ++i) {{
      setsuna_fill(x + (s + i) * SETSUNA_N_FEATURE, rows[i], res[i]);
    }}
    setsuna_block(rows, res, m);
    for (int i = 0; i < m; ++i) {{
      setsuna_epilogue(rows[i], 0, res[i]);
      out[s + i] = (float)res[i][SETSUNA_N_OUT - 1];
    }}
  }}
  free(rows);
  free(res);
}}
"""
_UNIT_CALL = re.compile(r"^\s*predict_unit(\d+)\(data, result\);\s*$")
_PREDICT_DEF = "void predict(union Entry* data, int pred_margin,"


def default_cache_dir() -> Path:
    """``$SETSUNA_CACHE_DIR`` if set, else ``<repo>/.cache`` (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _REPO / ".cache"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def _publishing(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target``, atomically renamed to it on success.

    Concurrent builds of the same model then never see a half-written cache
    entry: each writes its own temporary file and the last rename wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()
    try:
        yield tmp_path
        tmp_path.replace(target)
    finally:
        tmp_path.unlink(missing_ok=True)


# --- onnx ---------------------------------------------------------------------------------


def _raw_onnx(source: Source) -> onnx.ModelProto:
    n = source.schema.n_features
    if source.kind == "sklearn":
        return sklearn_onnx(source.model, n)
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial = [(INPUT_NAME, FloatTensorType([None, n]))]
    if source.kind == "lightgbm":
        model = onnxmltools.convert_lightgbm(
            source.model, initial_types=initial, target_opset=ONNX_OPSET, zipmap=False
        )
    else:
        import xgboost as xgb

        # The converter reads split features as "f<index>": drop real names on a copy.
        booster = xgb.Booster()
        booster.load_model(bytearray(source.model.save_raw(raw_format="json")))
        booster.feature_names = None
        model = onnxmltools.convert_xgboost(booster, initial_types=initial, target_opset=ONNX_OPSET)
    return model  # type: ignore[no-any-return]


def _score_tensor(model: onnx.ModelProto, source: Source) -> str:
    """Name of the graph output carrying the score before surgery."""
    from onnx import TensorProto

    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    if source.task == "classification":
        probs = [o for o in floats if "prob" in o.name]
        if len(probs) != 1:
            raise SourceError(
                f"cannot find the probabilities output among {[o.name for o in floats]}; "
                "the ONNX converter changed its outputs: report this with the versions used"
            )
        return str(probs[0].name)
    if len(floats) != 1:
        raise SourceError(f"expected one float output for a regressor, got {floats}")
    return str(floats[0].name)


def to_features_score(model: onnx.ModelProto, source: Source) -> onnx.ModelProto:
    """Rewrite a converter's graph to the setsuna contract, in place.

    Input ``features`` float32 [N, n_features]; single output ``score``
    float32 [N, 1]: probabilities[:, 1:2] (a Gather of column 1) for binary
    classifiers, the value reshaped to [N, 1] for regressors. Nodes only the
    dropped outputs needed (labels, casts) are removed.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise SourceError(f"expected one input {INPUT_NAME!r}, got {[i.name for i in inputs]}")
    src = _score_tensor(model, source)
    if source.task == "classification":
        index = numpy_helper.from_array(np.array([1], dtype=np.int64), "setsuna_positive_class")
        graph.initializer.append(index)
        node = helper.make_node("Gather", [src, index.name], [OUTPUT_NAME], axis=1)
    else:
        shape = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "setsuna_score_shape")
        graph.initializer.append(shape)
        node = helper.make_node("Reshape", [src, shape.name], [OUTPUT_NAME])
    graph.node.append(node)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1]))
    dims = inputs[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "N"
    _prune(graph)
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", ONNX_OPSET))
    return model


def _floor32(t: float) -> float:
    """The largest float32 <= ``t``: for float32 x, ``x <= t`` iff ``x <= _floor32(t)``."""
    with np.errstate(over="ignore"):
        f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(min(f, np.finfo(np.float32).max))


def exact_lightgbm_thresholds(model: onnx.ModelProto, booster: Any) -> int:
    """Make ONNX's float32 split thresholds decide exactly like LightGBM.

    LightGBM compares the (float32) feature, widened to double, with a double
    threshold; onnxmltools stores the threshold rounded to the *nearest*
    float32, which sends a row the other way when its value is that rounded
    threshold (measured: max |diff| 1.4e-3 in probability on 10k rows of the
    500-tree example). Rounding *down* instead gives exactly LightGBM's
    decision for every float32 input. Nodes are matched by (tree, feature,
    nearest float32); the rare ambiguous match keeps the converter's value.
    Returns the number of thresholds changed.
    """
    floors: dict[tuple[int, int, float], set[float]] = {}
    for tree_id, tree in enumerate(booster.dump_model()["tree_info"]):
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node:
                continue
            stack += [node["left_child"], node["right_child"]]
            if node.get("decision_type") != "<=":
                continue
            t = float(node["threshold"])
            with np.errstate(over="ignore"):
                nearest = float(np.float32(t))
            floors.setdefault((tree_id, int(node["split_feature"]), nearest), set()).add(
                _floor32(t)
            )
    changed = 0
    for node in model.graph.node:
        if node.domain != "ai.onnx.ml" or not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        if "nodes_values" not in attrs:
            continue
        values = attrs["nodes_values"].floats
        trees = attrs["nodes_treeids"].ints
        features = attrs["nodes_featureids"].ints
        modes = attrs["nodes_modes"].strings
        for i, mode in enumerate(modes):
            if mode != b"BRANCH_LEQ":
                continue
            floor = floors.get((trees[i], features[i], values[i]), set())
            if len(floor) == 1 and (value := next(iter(floor))) != values[i]:
                values[i] = value
                changed += 1
    return changed


def _prune(graph: Any) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep: list[Any] = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def _optimise_offline(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` as optimised by ONNX Runtime at ORT_ENABLE_EXTENDED.

    Not ORT_ENABLE_ALL: at that level ORT warns that the saved file "may
    contain hardware specific optimizations" (its NCHWc layout pass), which
    would tie the file to the build host's CPU; a forest gains nothing from
    the layout passes anyway. ORT also stamps every domain it knows into
    ``opset_import`` (some twice); the saved file keeps one entry per domain
    its nodes use, so an older ONNX Runtime (Triton's) does not trip over them.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(path)
    opts.intra_op_num_threads = 1
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(path))
    used = {n.domain for n in optimised.graph.node} | {""}
    versions: dict[str, int] = {}
    for o in optimised.opset_import:  # ORT may also repeat a domain: keep one entry each
        if o.domain in used:
            versions[o.domain] = max(versions.get(o.domain, 0), int(o.version))
    del optimised.opset_import[:]
    optimised.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    optimised.ir_version = min(optimised.ir_version, model.ir_version)
    onnx.checker.check_model(optimised, full_check=True)
    onnx.save(optimised, str(path))


def _build_onnx(source: Source, folder: Path, calib: F32) -> Candidate:
    import onnx

    from setsuna.runtime.onnx import OnnxEngine

    model = to_features_score(_raw_onnx(source), source)
    if source.kind == "lightgbm":
        exact_lightgbm_thresholds(model, source.model)
    onnx.checker.check_model(model, full_check=True)
    path = folder / ONNX_FILE
    _optimise_offline(model, path)
    # The file must load as served: a fresh session with optimisations disabled.
    probe = np.ascontiguousarray(calib[:8], dtype=np.float32)
    out = OnnxEngine(path, threads=1, optimized_offline=True).predict(probe)
    if out.shape != (len(probe), 1):
        raise SourceError(f"optimised ONNX returned shape {out.shape}, expected [n, 1]")
    converter = "skl2onnx" if source.kind == "sklearn" else "onnxmltools"
    return Candidate(
        name="onnx",
        engine="onnxruntime",
        folder=folder,
        params={"file": ONNX_FILE, "threads": 1, "optimized_offline": True},
        local=True,
        container=ContainerSpec(default_model_filename=ONNX_FILE, platform="onnxruntime_onnx"),
        notes=(
            f"{converter} {_version(converter)} (opset {ONNX_OPSET}, ai.onnx.ml <= "
            f"{ONNX_ML_OPSET}), ORT {_version('onnxruntime')} ORT_ENABLE_EXTENDED offline; "
            "thresholds float32 (LightGBM's rounded down: same decisions), leaves float32"
        ),
    )


def _skip_int8(source: Source) -> Skipped:
    if source.kind == "sklearn" and not _is_tree_ensemble(source.model):
        reason = (
            f"{type(source.model).__name__} converts to ai.onnx.ml operators "
            "(LinearClassifier/...) that ONNX Runtime quantisation leaves in float"
        )
    else:
        reason = (
            "tree ensembles have no weights to quantise: ONNX Runtime quantisation leaves "
            "TreeEnsemble ops in float (quantize_dynamic returns the same graph)"
        )
    return Skipped(name="onnx-int8", reason=reason)


# --- lleaves ------------------------------------------------------------------------------


def _run(cmd: list[str], what: str) -> None:
    """Run a build tool; its stderr becomes the error a Skipped candidate reports."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetsunaError(f"{what} failed ({' '.join(cmd)}): {done.stderr.strip()[-500:]}")


def _build_lleaves(source: Source, folder: Path, cache_dir: Path) -> Candidate:
    import lleaves

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / LLEAVES_MODEL
        model_file.write_text(source.model.model_to_string())
        model = lleaves.Model(model_file=str(model_file))
        if model.num_model_per_iteration() != 1:
            raise SourceError(
                f"{source.name}: lleaves serves binary classifiers and regressors only "
                f"({model.num_model_per_iteration()} outputs per row)"
            )
        n_features = int(model.num_feature())
        cpu, features = host_cpu()
        key = _key(
            source.sha256,
            "lleaves",
            _version("lleaves"),
            _version("llvmlite"),
            cpu,
            features,
            f"fblocksize={LLEAVES_BLOCKSIZE}",
            LLEAVES_LINK,
        )
        cached = cache_dir / "lleaves" / f"{key}.so"
        if not cached.is_file():
            obj = Path(tmp) / "forest.o"
            model.compile(cache=str(obj), fblocksize=LLEAVES_BLOCKSIZE)
            with _publishing(cached) as out:
                # lleaves emits position-independent code (reloc "pic"); the only
                # outside symbol it calls is libm's exp (the sigmoid).
                _run([*LLEAVES_LINK.split(), "-o", str(out), str(obj), "-lm"], "link lleaves")
    shutil.copyfile(cached, folder / LLEAVES_LIB)
    return Candidate(
        name="lleaves",
        engine="lleaves",
        folder=folder,
        params={
            "lib": LLEAVES_LIB,
            "n_features": n_features,
            "threads": 1,
            "target_cpu": cpu,
            "cpu_flags_sha256": cpu_flags(),
        },
        local=True,
        container=None,
        notes=(
            f"lleaves {_version('lleaves')} / llvmlite {_version('llvmlite')}, float64, "
            f"fblocksize {LLEAVES_BLOCKSIZE}, linked into {LLEAVES_LIB} (no LLVM at serve "
            f"time); machine code for CPU {cpu!r}: the loader refuses other CPUs"
        ),
    )


# --- treelite: tl2cgen and FIL ------------------------------------------------------------


def _is_tree_ensemble(estimator: Any) -> bool:
    from sklearn import ensemble

    kinds = (
        ensemble.RandomForestClassifier,
        ensemble.RandomForestRegressor,
        ensemble.ExtraTreesClassifier,
        ensemble.ExtraTreesRegressor,
        ensemble.GradientBoostingClassifier,
        ensemble.GradientBoostingRegressor,
        ensemble.HistGradientBoostingClassifier,
        ensemble.HistGradientBoostingRegressor,
    )
    return isinstance(estimator, kinds)


def _treelite(source: Source) -> treelite.Model:
    import treelite

    if source.kind == "lightgbm":
        return treelite.frontend.from_lightgbm(source.model)
    if source.kind == "xgboost":
        return treelite.frontend.from_xgboost_json(bytes(source.model.save_raw(raw_format="json")))
    import treelite.sklearn

    return treelite.sklearn.import_model(source.model)


def _compile_tl2cgen(tmodel: treelite.Model, target: Path) -> None:
    import tl2cgen

    n_files = max(1, tmodel.num_tree // TL2CGEN_TREES_PER_FILE)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp)
        params = {**TL2CGEN_PARAMS, "parallel_comp": n_files}
        with contextlib.redirect_stdout(io.StringIO()):  # tl2cgen prints progress
            tl2cgen.generate_c_code(tmodel, src, params=params)
        main_c = src / "main.c"
        blocked = _blocked_source(tmodel, main_c.read_text())
        if blocked is not None:  # main.c's statics and units are in scope there
            main_c.write_text(main_c.read_text() + blocked)
        else:
            (src / "setsuna_batch.c").write_text(_batch_source(tmodel))
            recipe = json.loads((src / "recipe.json").read_text())
            recipe["sources"].append({"name": "setsuna_batch", "length": 1})
            (src / "recipe.json").write_text(json.dumps(recipe))
        lib = tl2cgen.create_shared(
            "gcc",
            src,
            nthread=os.cpu_count() or 1,
            options=list(TL2CGEN_OPTIONS),
            long_build_time_warning=False,
        )
        with _publishing(target) as out:
            shutil.move(lib, out)


def _batch_source(tmodel: treelite.Model) -> str:
    return _BATCH_C.format(
        n_feature=int(tmodel.num_feature),
        leaf_type=_C_TYPES[str(tmodel.output_type)],
        batch_symbol=TL2CGEN_BATCH_SYMBOL,
        nfeature_symbol=TL2CGEN_NFEATURE_SYMBOL,
    )


def _split_predict(main_c: str) -> tuple[str, list[int], str] | None:
    """tl2cgen's ``predict`` body as (prologue, unit numbers, epilogue), or None.

    None when the generated code is not the expected shape (no unit calls, or
    other statements between them): the caller then keeps the per-row loop.
    """
    start = main_c.find(_PREDICT_DEF)
    if start < 0:
        return None
    open_at = main_c.find("{", start)
    depth, i = 1, open_at + 1
    while depth and i < len(main_c):
        depth += {"{": 1, "}": -1}.get(main_c[i], 0)
        i += 1
    if depth:
        return None
    lines = main_c[open_at + 1 : i - 1].splitlines()
    at = [k for k, line in enumerate(lines) if _UNIT_CALL.match(line)]
    if not at or at != list(range(at[0], at[-1] + 1)):
        return None
    units = [int(m.group(1)) for k in at if (m := _UNIT_CALL.match(lines[k]))]
    return "\n".join(lines[: at[0]]), units, "\n".join(lines[at[-1] + 1 :])


def _blocked_source(tmodel: treelite.Model, main_c: str) -> str | None:
    """The cache-blocked batch entry point to append to ``main_c``, if it applies."""
    parts = _split_predict(main_c)
    if parts is None:
        return None
    prologue, units, epilogue = parts
    loops = "\n".join(
        f"  for (int i = 0; i < m; ++i) {{ predict_unit{u}(rows[i], res[i]); }}" for u in units
    )
    return _BLOCKED_C.format(
        n_feature=int(tmodel.num_feature),
        leaf_type=_C_TYPES[str(tmodel.output_type)],
        block=TL2CGEN_BLOCK_ROWS,
        prologue=prologue,
        epilogue=epilogue,
        unit_loops=loops,
        batch_symbol=TL2CGEN_BATCH_SYMBOL,
        nfeature_symbol=TL2CGEN_NFEATURE_SYMBOL,
    )


def _build_tl2cgen(source: Source, folder: Path, cache_dir: Path) -> Candidate:
    tmodel = _treelite(source)
    template = json.dumps(
        [
            _BATCH_C,
            _BLOCKED_C,
            TL2CGEN_BLOCK_ROWS,
            TL2CGEN_OPTIONS,
            TL2CGEN_TREES_PER_FILE,
            TL2CGEN_PARAMS,
        ]
    )
    key = _key(source.sha256, "tl2cgen", _version("tl2cgen"), _version("treelite"), template)
    cached = cache_dir / "tl2cgen" / f"{key}.so"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _compile_tl2cgen(tmodel, cached)
    shutil.copyfile(cached, folder / TL2CGEN_LIB)
    return Candidate(
        name="tl2cgen",
        engine="tl2cgen",
        folder=folder,
        params={"lib": TL2CGEN_LIB, "threads": 1},
        local=True,
        container=None,
        notes=(
            f"tl2cgen {_version('tl2cgen')} (quantized thresholds, {tmodel.input_type}) + "
            f"gcc -O3; one ctypes call per batch via {TL2CGEN_BATCH_SYMBOL}, tree units run "
            f"over blocks of up to {TL2CGEN_BLOCK_ROWS} rows"
        ),
    )


def _build_fil(source: Source, folder: Path) -> Candidate:
    filename, model_type = FIL_FILES[source.kind]
    path = folder / filename
    if source.kind == "lightgbm":
        path.write_text(source.model.model_to_string())
    elif source.kind == "xgboost":
        path.write_bytes(bytes(source.model.save_raw(raw_format="json")))
    else:
        _treelite(source).serialize(path)
    classifier = source.task == "classification"
    parameters = {
        "model_type": model_type,
        # FIL before 25.09 reads "output_class"; 25.09 renamed it "is_classifier"
        # (and still honours "output_class", with a warning). Both are set.
        "output_class": str(classifier).lower(),
        "is_classifier": str(classifier).lower(),
        "predict_proba": str(classifier).lower(),
        "threshold": str(source.decision_threshold),
    }
    score = (
        "FIL's predict_proba output holds per-class probabilities: the score is its last "
        "column (class 1)"
        if classifier
        else "FIL's output is the regression value"
    )
    return Candidate(
        name="fil",
        engine="",
        folder=folder,
        params={},
        local=False,
        container=ContainerSpec(
            default_model_filename=filename, backend="fil", parameters=parameters
        ),
        gate_engine="gtil",
        gate_params={"file": filename, "model_type": model_type, "threads": 1},
        notes=(
            f"{score}. Judged by treelite {_version('treelite')} GTIL on this file, in the "
            "model's precision; FIL evaluates in float32, so expect float32-rounding "
            "differences near split thresholds that the gate does not see. The FIL "
            "backend's own treelite must read this format (checkpoints and XGBoost JSON "
            "from newer versions may need a newer Triton)"
        ),
    )


# --- orchestration ------------------------------------------------------------------------


def _fresh(folder: Path) -> Path:
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


def _nan_probe(source: Source, calib: F32) -> F32:
    rng = np.random.default_rng(0)
    rows = np.array(calib[:_NAN_PROBE_ROWS], dtype=np.float32, copy=True)
    rows[rng.random(rows.shape) < _NAN_PROBE_SHARE] = np.nan
    rows[0] = np.nan
    return np.ascontiguousarray(rows)


def _check_nan(built: Built, source: Source, rows: F32, expected: F32) -> Built:
    """Skip a candidate that treats NaN differently from the source library.

    Calibration rows rarely hold NaN, so the gate alone could pass an engine
    whose missing-value handling differs (e.g. LightGBM's "NaN as zero" for
    features that had no NaN in training).
    """
    from setsuna.runtime import load

    if not isinstance(built, Candidate):
        return built
    kind, params = (
        (built.engine, built.params) if built.engine else (built.gate_engine, built.gate_params)
    )
    try:
        got = load(kind, built.folder, params).predict(rows)
    except SetsunaError as exc:
        reason = f"cannot score rows with NaN: {exc}"
    else:
        if np.allclose(got, expected, rtol=_NAN_PROBE_TOL, atol=_NAN_PROBE_TOL):
            return built
        worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
        reason = (
            f"disagrees with {source.reference_label} on rows with NaN (max abs diff "
            f"{worst:.3g}): its missing-value handling differs. Serve another engine, or "
            "impute NaN and rebuild with allow_nan=False"
        )
    shutil.rmtree(built.folder, ignore_errors=True)
    return Skipped(name=built.name, reason=reason)


def convert(
    source: Source, workdir: Path, calib: F32, *, cache_dir: Path | None = None
) -> list[Built]:
    """Build every tree engine that applies to ``source`` under ``workdir``.

    ``calib`` rows are not needed to build tree engines; they feed the ONNX
    load check and, for ``allow_nan`` sources, the NaN probe that skips any
    candidate whose missing-value handling differs from the source library.
    """
    if source.kind not in _TREE_KINDS:
        raise SourceError(
            f"candidates.trees converts {', '.join(_TREE_KINDS)} sources, got {source.kind!r}"
        )
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    trees = source.kind != "sklearn" or _is_tree_ensemble(source.model)
    built: list[Built] = [
        _attempt("onnx", workdir / "onnx", lambda f: _build_onnx(source, f, calib)),
        _skip_int8(source),
    ]
    if source.kind == "lightgbm":
        built.append(
            _attempt("lleaves", workdir / "lleaves", lambda f: _build_lleaves(source, f, cache))
        )
    if trees:
        built.append(
            _attempt("tl2cgen", workdir / "tl2cgen", lambda f: _build_tl2cgen(source, f, cache))
        )
        built.append(_attempt("fil", workdir / "fil", lambda f: _build_fil(source, f)))
    else:
        why = (
            f"{type(source.model).__name__} is not a tree ensemble treelite imports "
            "(RandomForest, ExtraTrees, GradientBoosting, HistGradientBoosting); "
            "the onnx candidate serves it"
        )
        built += [Skipped(name="tl2cgen", reason=why), Skipped(name="fil", reason=why)]
    if source.schema.allow_nan:
        rows = _nan_probe(source, calib)
        expected = source.reference(rows)
        built = [_check_nan(b, source, rows, expected) for b in built]
    return built
