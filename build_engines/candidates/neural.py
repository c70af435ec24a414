"""Candidates for neural sources: ONNX Runtime fp32 and INT8, TensorRT FP16 and INT8.

Every candidate starts from one fp32 ONNX file with the served contract: one
input ``features`` float32 ``[N, *row_shape]`` (dynamic batch) and one output
``score`` float32 ``[N, 1]``. Torch modules get there through the TorchScript
exporter (``dynamo=False``, no longer torch's default): it writes an
``nn.LSTM`` as one ONNX ``LSTM`` op, which ONNX Runtime quantises as a whole
(``DynamicQuantizeLSTM``). User ONNX files get there by wrapping their input
and output in ``Identity`` (or a ``Reshape`` to ``[N, 1]``) nodes, which leaves
subgraphs and odd names intact.

INT8 recipes, measured on the example 48-256-256-1 MLP with ONNX Runtime 1.32,
one thread (10 000 validation rows, also the calibration rows; decisions at
p >= 0.5 compared with torch; fp32 ONNX: 100 %, 1.37M rows/s at batch 1024):

* dynamic (activations scaled per batch at run time): 99.72 % batched, 99.94 %
  row by row. Its scales depend on the whole batch, so a row's score changes
  with the rows it is batched with: judge it at the serving batch sizes.
* static QDQ, every MatMul/Gemm: 99.71 %, 3.3M rows/s. Re-quantising each
  layer's output as well (the quantiser's default) gave 99.30 %, so no recipe
  here quantises MatMul/Gemm outputs.
* static, last layer fp32 (``keep-last``): 99.70 %, and no faster than fp32.
* static, first layer fp32 (``keep-first``): 99.97 %, 2.8M rows/s; 99.94 %
  when calibrated on 2 000 rows and judged on the other 8 000, as the build
  splits them. The raw features are the tensor that suffers most on 256 levels
  (wide, heavy-tailed, each one matters); once they stay fp32 the ReLU
  activations quantise well.
  MinMax, Percentile and Entropy calibration flipped the same rows; per-tensor
  weights or signed (S8S8) activations flipped two to four times as many.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from build_engines.base import F32, Built, Candidate, ContainerSpec, Skipped, Source
from build_engines.sources.neural import single_io
from setsuna.errors import SourceError, UnknownModelTypeError
from setsuna.schema import INPUT_NAME, OUTPUT_NAME, FeatureSchema

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
OPSET = 17
BATCH_AXIS = "N"
#: TensorRT optimisation profile for the batch axis: min, opt, max rows.
TRT_BATCH = (1, 32, 1024)
_ORT_PARAMS = {"file": ONNX_FILE, "threads": 1, "optimized_offline": True}
_ORT_CONTAINER = ContainerSpec(default_model_filename=ONNX_FILE, platform="onnxruntime_onnx")
_TRT_CONTAINER = ContainerSpec(default_model_filename=PLAN_FILE, platform="tensorrt_plan", gpu=True)
#: Ops whose weights INT8 quantises; the first and last of them are what keep-* exclude.
_WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")
#: Recurrent ops have no static-INT8 kernel in ONNX Runtime.
_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
#: ONNX Runtime's layout ops tuned to this host's vector width (see _optimise).
_HOST_SPECIFIC_DOMAINS = frozenset({"com.microsoft.nchwc"})
_CALIB_BATCH = 256
_STATIC_NAMES = ("onnx-int8-static", "onnx-int8-static-keep-last", "onnx-int8-static-keep-first")
_TRT_NAMES = ("tensorrt-fp16", "tensorrt-int8")


def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
    """Build every neural candidate for ``source`` under ``workdir/<candidate name>/``.

    ``calib`` is float32 ``[n, *row_shape]`` (the validation rows): static INT8
    and TensorRT INT8 calibrate on it. Candidates that do not apply here come
    back as :class:`Skipped` with the reason.
    """
    if source.kind not in ("torch", "onnx"):
        raise UnknownModelTypeError(
            f"the neural converter takes torch or onnx sources, not {source.kind!r}; "
            "use the converter for that model kind"
        )
    if len(calib):
        calib = source.schema.check(calib)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="setsuna-neural-") as tmp:
        scratch = Path(tmp)
        base = scratch / "fp32.onnx"
        if source.kind == "torch":
            _export_torch(source.model, source.schema, base)
        else:
            onnx.save(normalised(source.model), base)
        built: list[Built] = [
            _ort_candidate("onnx", base, workdir, "fp32 ONNX"),
        ]
        prepared, prep_note = _prepare_for_quantisation(base, scratch)
        built.append(_dynamic(prepared, scratch, workdir, prep_note))
        built.extend(_static(prepared, scratch, workdir, calib, prep_note))
        built.extend(_tensorrt(base, workdir, calib, source.schema))
    return built


# --- the fp32 ONNX file -------------------------------------------------------------------


def _export_torch(module: Any, schema: FeatureSchema, path: Path) -> None:
    """TorchScript export at opset 17 with a dynamic batch axis and the served names."""
    import torch

    example = torch.zeros((2, *schema.row_shape), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            # The legacy exporter is chosen on purpose (one LSTM op, see module docstring).
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            # nn.LSTM's own input checks trip the tracer; its batch axis still exports dynamic.
            warnings.filterwarnings("ignore", module=r"torch\.nn\.modules\.rnn")
            warnings.filterwarnings(
                "ignore", message=r"Exporting a model to ONNX with a batch_size"
            )
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise SourceError(
            f"torch.onnx.export (TorchScript, opset {OPSET}) failed: {exc}; make forward "
            "traceable (no data-dependent Python control flow) or export the ONNX yourself "
            "and use from_onnx"
        ) from exc
    model = onnx.load(path)
    _name_nodes(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: quantisation excludes nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def _set_dims(info: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    shape = info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = d


def normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a user's model with input ``features`` and output ``score`` ``[N, 1]``.

    Renaming tensors in place would miss references from subgraphs (If, Loop);
    an Identity from the new input name, and an Identity or Reshape to the new
    output name, change nothing else. ONNX Runtime's optimiser removes them.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inp, outp = single_io(out, "the ONNX source")
    taken = _tensor_names(graph)
    before: list[onnx.NodeProto] = []
    after: list[onnx.NodeProto] = []
    if inp.name != INPUT_NAME:
        if INPUT_NAME in taken:
            raise SourceError(
                f"the ONNX graph already has an inner tensor named {INPUT_NAME!r}; rename it "
                "or name the graph input that"
            )
        before.append(onnx.helper.make_node("Identity", [INPUT_NAME], [inp.name], "setsuna_input"))
        inp.name = INPUT_NAME
    row_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    _set_dims(inp, [BATCH_AXIS, *row_dims])

    dims = outp.type.tensor_type.shape.dim
    served_shape = len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value == 1
    if outp.name != OUTPUT_NAME or not served_shape:
        raw = outp.name
        if raw == OUTPUT_NAME:  # right name, wrong shape: move the producer's output aside
            raw = "setsuna_raw_score"
            for node in graph.node:
                node.output[:] = [raw if o == OUTPUT_NAME else o for o in node.output]
                node.input[:] = [raw if i == OUTPUT_NAME else i for i in node.input]
        elif OUTPUT_NAME in taken:
            raise SourceError(
                f"the ONNX graph already has an inner tensor named {OUTPUT_NAME!r}; rename it "
                "or name the graph output that"
            )
        if served_shape:
            after.append(onnx.helper.make_node("Identity", [raw], [OUTPUT_NAME], "setsuna_output"))
        else:
            shape_name = "setsuna_score_shape"
            graph.initializer.append(
                onnx.numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), shape_name)
            )
            after.append(
                onnx.helper.make_node("Reshape", [raw, shape_name], [OUTPUT_NAME], "setsuna_output")
            )
        outp.name = OUTPUT_NAME
    _set_dims(outp, [BATCH_AXIS, 1])
    nodes = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    _name_nodes(out)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise SourceError(
            f"renaming the ONNX input/output to features/score failed: {exc}"
        ) from exc
    return out


# --- ONNX Runtime candidates --------------------------------------------------------------


def _fresh(folder: Path) -> Path:
    """An empty candidate folder: a rebuild must not publish a stale file."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _save_optimised(src: Path, dst: Path, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3  # the ALL-level warning is handled by _optimise
    ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    return onnx.load(dst)


def _optimise(src: Path, dst: Path) -> str:
    """Save ``src`` optimised offline by ONNX Runtime into ``dst``; return the level used.

    Level ALL adds, on top of EXTENDED's hardware-independent fusions (FusedGemm,
    QGemm, MatMulIntegerToFloat ...), layout transforms into the
    ``com.microsoft.nchwc`` domain whose block size follows this host's SIMD
    width (8 floats on AVX2, 16 on AVX-512). ONNX Runtime itself warns that such
    a file only runs where it was made; the Triton container may run on another
    CPU, so a file with any such node is saved at EXTENDED instead. MLPs and
    LSTMs have no convolutions, so for them both levels give the same graph.

    The saved file also claims every opset domain ONNX Runtime knows (training,
    preview, ai.onnx.ml v5 ...). The container's older onnxruntime may not know
    some of those versions, so only the domains the nodes use are kept.
    """
    model = _save_optimised(src, dst, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    level = "all"
    if any(n.domain in _HOST_SPECIFIC_DOMAINS for n in model.graph.node):
        model = _save_optimised(src, dst, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        level = "extended"
    used = {n.domain for n in model.graph.node} | {""}
    kept = [op for op in model.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, dst)
    return level


def _ort_candidate(name: str, src: Path, workdir: Path, notes: str) -> Built:
    folder = _fresh(workdir / name)
    try:
        level = _optimise(src, folder / ONNX_FILE)
    except Exception as exc:  # onnxruntime errors are plain RuntimeErrors with the reason
        shutil.rmtree(folder)
        if name == "onnx":
            raise SourceError(f"onnxruntime cannot load the exported fp32 model: {exc}") from exc
        return Skipped(name, f"onnxruntime cannot optimise the {notes} model: {exc}")
    return Candidate(
        name=name,
        engine="onnxruntime",
        folder=folder,
        params=dict(_ORT_PARAMS),
        container=_ORT_CONTAINER,
        notes=f"{notes}; optimised offline at onnxruntime level {level}",
    )


def _prepare_for_quantisation(base: Path, scratch: Path) -> tuple[Path, str]:
    """onnxruntime's recommended pre-pass (shape inference, basic fusions), if it applies."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = scratch / "prepared.onnx"
    try:
        quant_pre_process(str(base), str(out))
    except Exception as exc:  # optional pass: quantise the plain export instead
        return base, f"quant_pre_process skipped ({exc})"
    return out, "quant_pre_process"


def _has_int8(path: Path) -> bool:
    return any(
        "Quantize" in n.op_type or "Integer" in n.op_type for n in onnx.load(path).graph.node
    )


def _dynamic(prepared: Path, scratch: Path, workdir: Path, prep_note: str) -> Built:
    """Weights INT8 per output channel; activations quantised per batch at run time."""
    name = "onnx-int8-dynamic"
    raw = scratch / f"{name}.onnx"
    try:
        quantize_dynamic(str(prepared), str(raw), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:
        return Skipped(name, f"onnxruntime dynamic quantisation failed: {exc}")
    if not _has_int8(raw):
        return Skipped(name, "onnxruntime found nothing to quantise dynamically in this graph")
    notes = (
        f"{prep_note}; quantize_dynamic, per-channel QInt8 weights, per-batch activations "
        "(a row's score depends on the rows batched with it)"
    )
    return _ort_candidate(name, raw, workdir, notes)


class _CalibrationRows(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration rows in equal batches (histogram calibrators reject ragged ones)."""

    def __init__(self, rows: F32) -> None:
        self._batch = min(_CALIB_BATCH, len(rows))
        usable = len(rows) - len(rows) % self._batch
        self._batches = [rows[i : i + self._batch] for i in range(0, usable, self._batch)]
        self._next = 0

    def get_next(self) -> dict[str, F32] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {INPUT_NAME: self._batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def _static(
    prepared: Path, scratch: Path, workdir: Path, calib: F32, prep_note: str
) -> list[Built]:
    """QDQ static INT8, whole and with the last or first weighted layer kept fp32."""
    nodes = onnx.load(prepared).graph.node
    recurrent = sorted({n.op_type for n in nodes if n.op_type in _RECURRENT_OPS})
    weighted = [n.name for n in nodes if n.op_type in _WEIGHTED_OPS]
    reason = ""
    if recurrent:
        reason = (
            f"onnxruntime has no static INT8 kernel for {', '.join(recurrent)}: QDQ would leave "
            "it fp32 and quantise only the small layers around it. onnx-int8-dynamic quantises "
            "LSTM (DynamicQuantizeLSTM)"
        )
    elif not weighted:
        reason = f"no {'/'.join(_WEIGHTED_OPS)} node to quantise"
    elif len(calib) == 0:
        reason = "no calibration rows were given; pass the validation rows as calib"
    if reason:
        return [Skipped(name, reason) for name in _STATIC_NAMES]
    variants: list[tuple[str, list[str], str]] = [
        (_STATIC_NAMES[0], [], "every weighted layer INT8"),
        (_STATIC_NAMES[1], weighted[-1:], f"last layer {weighted[-1]} fp32"),
        (_STATIC_NAMES[2], weighted[:1], f"first layer {weighted[0]} fp32 (features unquantised)"),
    ]
    built: list[Built] = []
    for name, exclude, what in variants:
        if len(exclude) >= len(weighted):
            built.append(Skipped(name, f"the graph has one weighted layer; {what} leaves no INT8"))
            continue
        raw = scratch / f"{name}.onnx"
        try:
            quantize_static(
                str(prepared),
                str(raw),
                _CalibrationRows(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(_WEIGHTED_OPS),
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                # A layer's fp32 output feeds the next layer's quantiser (or the sigmoid) directly:
                # re-quantising it too cost 0.3 % of decisions on the example MLP.
                extra_options={"OpTypesToExcludeOutputQuantization": list(_WEIGHTED_OPS)},
            )
        except Exception as exc:
            built.append(Skipped(name, f"onnxruntime static quantisation failed: {exc}"))
            continue
        notes = (
            f"{prep_note}; quantize_static QDQ, MinMax on {len(calib)} rows, per-channel "
            f"QInt8 weights, QUInt8 activations, {what}"
        )
        built.append(_ort_candidate(name, raw, workdir, notes))
    return built


# --- TensorRT -----------------------------------------------------------------------------


def tensorrt_missing() -> str:
    """Why TensorRT plans cannot be built here, or "" when they can.

    TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrators
    (it builds only strongly typed networks), so plans are built with 10.x.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError):
        return "tensorrt not installed (pip install setsuna[tensorrt])"
    version = str(getattr(trt, "__version__", "0"))
    if not version.startswith("10."):
        return (
            f"tensorrt {version} installed, but these plans need TensorRT 10.x (11 removed "
            "the FP16/INT8 builder flags and calibrators): pip install 'tensorrt>=10,<11'"
        )
    try:
        import torch
    except ImportError:
        return "no CUDA GPU visible (torch, which runs TensorRT plans here, is not installed)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return ""


def _tensorrt(base: Path, workdir: Path, calib: F32, schema: FeatureSchema) -> list[Built]:
    missing = tensorrt_missing()
    if missing:
        return [Skipped(name, missing) for name in _TRT_NAMES]
    built = [_plan("tensorrt-fp16", base, workdir, schema, None)]
    opt = TRT_BATCH[1]
    if len(calib) < opt:
        built.append(Skipped("tensorrt-int8", f"INT8 calibration needs at least {opt} rows"))
    else:
        built.append(_plan("tensorrt-int8", base, workdir, schema, calib))
    return built


def _plan(name: str, base: Path, workdir: Path, schema: FeatureSchema, calib: F32 | None) -> Built:
    """One TensorRT candidate, or Skipped with TensorRT's own reason when the build fails."""
    folder = _fresh(workdir / name)
    try:
        (folder / PLAN_FILE).write_bytes(plan_bytes(base, schema, calib))
    except Exception as exc:  # polygraphy raises PolygraphyException carrying TensorRT's log
        shutil.rmtree(folder)
        return Skipped(name, f"TensorRT build failed: {exc}")
    lo, opt, hi = TRT_BATCH
    return Candidate(
        name=name,
        engine="tensorrt",
        folder=folder,
        params={"file": PLAN_FILE},
        local=True,
        container=_TRT_CONTAINER,
        notes=f"polygraphy, batch profile {lo}/{opt}/{hi}, "
        + ("fp16 + int8 calibrated" if calib is not None else "fp16"),
    )


def plan_bytes(base: Path, schema: FeatureSchema, calib: F32 | None) -> Any:
    """Serialise a TensorRT 10 plan of the plain fp32 export (IHostMemory) with polygraphy.

    FP16 is enabled in both plans (the INT8 plan falls back to FP16, not FP32,
    where INT8 does not pay). TensorRT calibrates at the profile's opt shape
    only, so calibration rows go in batches of exactly ``TRT_BATCH[1]``
    (at most 64 of them); implicit INT8 with a calibrator is deprecated in
    TensorRT 10 and removed in 11, hence the version check in tensorrt_missing.
    """
    import torch
    from polygraphy.backend.trt import (
        Calibrator,
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )
    from polygraphy.logger import G_LOGGER

    lo, opt, hi = TRT_BATCH
    row = schema.row_shape
    profile = Profile().add(INPUT_NAME, min=(lo, *row), opt=(opt, *row), max=(hi, *row))
    calibrator = None
    if calib is not None:
        usable = min(len(calib) - len(calib) % opt, 64 * opt)
        # Device tensors: polygraphy passes their pointers on without its own CUDA wrapper.
        batches = [
            {INPUT_NAME: torch.from_numpy(calib[i : i + opt]).cuda()} for i in range(0, usable, opt)
        ]
        calibrator = Calibrator(batches)
    config = CreateConfig(
        fp16=True, int8=calib is not None, profiles=[profile], calibrator=calibrator
    )
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        return EngineBytesFromNetwork(NetworkFromOnnxPath(str(base)), config=config)()
