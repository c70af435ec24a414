"""The ``onnx`` candidate of a tree source, and why ``onnx-int8`` is skipped.

onnxmltools (LightGBM, XGBoost) or skl2onnx (scikit-learn) convert the model;
the graph is then reshaped to the setsuna contract (one input ``features``
[N, n_features], one output ``score`` [N, 1]), LightGBM's thresholds are
rounded so that float32 decides exactly like LightGBM, and ONNX Runtime
optimises it offline. Quantisation has nothing to act on in a forest, so the
INT8 candidate is always reported as skipped, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.base import F32, Candidate, ContainerSpec, Skipped, Source
from build_engines.candidates.compile_cache import package_version
from build_engines.candidates.forests import is_tree_ensemble
from build_engines.sources.trees import ONNX_ML_OPSET, ONNX_OPSET, sklearn_onnx
from setsuna.errors import SourceError
from setsuna.runtime.onnx import ONNX_FILE
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnx


def outputs_param(source: Source) -> dict[str, int]:
    """``{"n_outputs": C}`` for a multiclass source (engines return [n, C]), else nothing.

    Binary and regression candidates keep the parameters they always had, so
    their manifests (and the native backend's checks of them) do not change.
    """
    return {"n_outputs": source.n_outputs} if source.classes else {}


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
    classifiers, the value reshaped to [N, 1] for regressors; for a
    multiclass classifier the probabilities themselves, [N, C] (an Identity). Nodes only the
    dropped outputs needed (labels, casts) are removed.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise SourceError(f"expected one input {INPUT_NAME!r}, got {[i.name for i in inputs]}")
    src = _score_tensor(model, source)
    width = source.n_outputs
    if source.classes:
        node = helper.make_node("Identity", [src], [OUTPUT_NAME])
    elif source.task == "classification":
        index = numpy_helper.from_array(np.array([1], dtype=np.int64), "setsuna_positive_class")
        graph.initializer.append(index)
        node = helper.make_node("Gather", [src, index.name], [OUTPUT_NAME], axis=1)
    else:
        shape = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "setsuna_score_shape")
        graph.initializer.append(shape)
        node = helper.make_node("Reshape", [src, shape.name], [OUTPUT_NAME])
    graph.node.append(node)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", width]))
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


def build_onnx(source: Source, folder: Path, calib: F32) -> Candidate:
    """Convert, reshape, fix thresholds, optimise; check the file loads as it will be served."""
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
    out = OnnxEngine(path, threads=1, optimized_offline=True, n_outputs=source.n_outputs).predict(
        probe
    )
    if out.shape != (len(probe), source.n_outputs):
        raise SourceError(
            f"optimised ONNX returned shape {out.shape}, expected [n, {source.n_outputs}]"
        )
    converter = "skl2onnx" if source.kind == "sklearn" else "onnxmltools"
    return Candidate(
        name="onnx",
        engine="onnxruntime",
        folder=folder,
        params={
            "file": ONNX_FILE,
            "threads": 1,
            "optimized_offline": True,
            **outputs_param(source),
        },
        local=True,
        container=ContainerSpec(default_model_filename=ONNX_FILE, platform="onnxruntime_onnx"),
        notes=(
            f"{converter} {package_version(converter)} (opset {ONNX_OPSET}, ai.onnx.ml <= "
            f"{ONNX_ML_OPSET}), ORT {package_version('onnxruntime')} ORT_ENABLE_EXTENDED offline; "
            "thresholds float32 (LightGBM's rounded down: same decisions), leaves float32"
        ),
    )


def skip_int8(source: Source) -> Skipped:
    """Always skipped: say why for this source (nothing to quantise in a forest)."""
    if source.kind == "sklearn" and not is_tree_ensemble(source.model):
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
