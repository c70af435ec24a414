"""Neural-network sources: a live ``torch.nn.Module`` or a user's ONNX file.

Both become a :class:`~build_engines.base.Source` whose ``reference`` runs the
source library itself (PyTorch, or ONNX Runtime on the untouched file), so the
gate compares every exported, optimised or quantised copy with what the model's
author actually ran. Neither path ever pickles: a module is hashed from its
state-dict tensors and its ``repr``, a file from its bytes.

Both constructors run the model once on a small probe batch, so a module that
returns logits instead of probabilities, or a file with a fixed batch size,
fails here with a message saying what to change, not later inside a converter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.base import F32, Source, Task
from setsuna.errors import SourceError
from setsuna.schema import FeatureSchema, names_like

if TYPE_CHECKING:
    import onnx
    import torch

#: Threads the reference runs with: one, so the oracle is reproducible run to run.
REFERENCE_THREADS = 1
_PROBE_ROWS = 2


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads for a block (a process-wide setting), then restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_batch(out: Any, n: int, what: str) -> F32:
    """``out`` as float32 ``[n, 1]``, or a SourceError naming the shape it had."""
    arr = np.asarray(out)
    if arr.shape not in ((n, 1), (n,)):
        raise SourceError(
            f"{what} returned shape {list(arr.shape)} for {n} rows; it must return one "
            "value per row, shape [n, 1] (the positive-class probability or the regression value)"
        )
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(n, 1)


def _check_probe(out: F32, task: Task, what: str) -> None:
    if not np.isfinite(out).all():
        raise SourceError(f"{what} returned non-finite values on the probe batch; fix the model")
    if task == "classification" and ((out < 0.0) | (out > 1.0)).any():
        raise SourceError(
            f"{what} returned values outside [0, 1] for a classifier: it must return the "
            "positive-class probability, so end the model in a sigmoid (or pass task='regression')"
        )


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor (name, dtype, shape, bytes; keys sorted) plus ``repr``.

    The ``repr`` covers what the state dict does not (layer kinds, activations,
    hyper-parameters), so two architectures sharing weights do not collide.
    """
    import torch

    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise SourceError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; setsuna "
                "hashes tensors only (never pickles): move that state into a buffer or attribute"
            )
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}\0{t.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(repr(module).encode())
    return h.hexdigest()


def from_torch(
    module: torch.nn.Module,
    example_input: torch.Tensor | F32,
    *,
    name: str,
    task: Task = "classification",
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
) -> Source:
    """Wrap a trained CPU module whose ``forward`` maps float32 ``[n, *row_shape]`` to ``[n, 1]``.

    ``example_input`` is a float32 batch; its shape after the batch axis becomes
    the schema's ``row_shape`` (``(n_features,)`` or ``(steps, n_features)``).
    The module is put in eval mode.
    """
    import torch

    example = torch.as_tensor(example_input)
    if example.dtype != torch.float32 or example.ndim < 2 or len(example) == 0:
        raise SourceError(
            f"example_input must be a non-empty float32 batch [n, *row_shape], got "
            f"{example.dtype} of shape {list(example.shape)}"
        )
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise SourceError("the module has parameters off the CPU; call module.cpu() first")
    row_shape = tuple(int(d) for d in example.shape[1:])
    schema = FeatureSchema(names_like(feature_names, row_shape[-1]), row_shape, allow_nan)
    module.eval()

    def forward(x: F32) -> F32:
        module.eval()
        with torch_threads(REFERENCE_THREADS), torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return np.asarray(out.detach().numpy(), dtype=np.float32)

    def reference(x: F32) -> F32:
        return _as_batch(forward(x), len(x), "the module")

    probe = np.ascontiguousarray(example[:_PROBE_ROWS].detach().cpu().numpy())
    try:
        raw = forward(probe)
    except Exception as exc:  # whatever the module raises, say where it came from
        raise SourceError(f"running the module on example_input failed: {exc}") from exc
    if raw.shape != (len(probe), 1):
        raise SourceError(
            f"the module returned shape {list(raw.shape)} for {len(probe)} rows; forward must "
            "return [n, 1] (end it with .reshape(-1, 1)) so the exported graph has the served shape"
        )
    out = _as_batch(raw, len(probe), "the module")
    _check_probe(out, task, "the module")
    return Source(
        name=name,
        kind="torch",
        model=module,
        schema=schema,
        task=task,
        sha256=state_sha256(module),
        reference=reference,
        reference_label="torch.nn.Module.forward",
    )


def _value_info_dims(info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a tensor value: int when fixed, the symbol when named, None when unknown."""
    dims: list[int | str | None] = []
    for d in info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def single_io(
    model: onnx.ModelProto, where: str
) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """The model's one real input and one output, or a SourceError saying how to fix it."""
    initialisers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    outputs = list(model.graph.output)
    if len(inputs) != 1:
        raise SourceError(
            f"{where} has {len(inputs)} inputs {[i.name for i in inputs]}; setsuna serves "
            "single-input models: re-export it with one float32 input [N, *row_shape] "
            "(concatenate the features before the network)"
        )
    if len(outputs) != 1:
        raise SourceError(
            f"{where} has {len(outputs)} outputs {[o.name for o in outputs]}; re-export it "
            "with one float32 output [N, 1] (the positive-class probability or the value)"
        )
    return inputs[0], outputs[0]


def _onnx_row_shape(model: onnx.ModelProto, where: str) -> tuple[int, ...]:
    import onnx

    inp, out = single_io(model, where)
    for info, role in ((inp, "input"), (out, "output")):
        if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise SourceError(
                f"{where}: {role} {info.name!r} is not float32; re-export with float32 "
                f"{role}s (setsuna serves float32 features and scores)"
            )
    dims = _value_info_dims(inp)
    if len(dims) < 2:
        raise SourceError(
            f"{where}: input {inp.name!r} has dims {dims}; expected [N, *row_shape] "
            "with a batch axis"
        )
    if isinstance(dims[0], int):
        raise SourceError(
            f"{where}: input {inp.name!r} has a fixed batch size {dims[0]}; re-export with a "
            "dynamic batch axis (torch.onnx.export(..., dynamic_axes={name: {0: 'N'}}))"
        )
    row = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in row):
        raise SourceError(
            f"{where}: input {inp.name!r} has row dims {row}; every dim after the batch axis "
            "must be fixed (re-export with static feature and step counts)"
        )
    return tuple(int(d) for d in row if isinstance(d, int))


def from_onnx(
    path: Path | str,
    *,
    name: str,
    task: Task = "classification",
    feature_names: Sequence[str] | None = None,
    allow_nan: bool = False,
) -> Source:
    """Wrap a single-file ONNX model with one float32 input ``[N, *row_shape]`` and one output.

    The tensors may have any names (the converter renames them to
    ``features``/``score``); the output must hold one value per row. The
    reference runs ONNX Runtime on the file exactly as given, one thread.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read ONNX file {path}: {exc}") from exc
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError: both mean a bad file
        raise SourceError(
            f"{path} is not a valid ONNX model ({exc}); re-export it and check it with "
            "onnx.checker.check_model"
        ) from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise SourceError(
            f"{path} keeps weights in external data files; save it as one file "
            "(onnx.save(model, path, save_as_external_data=False))"
        )
    row_shape = _onnx_row_shape(model, str(path))
    inp, out = single_io(model, str(path))
    schema = FeatureSchema(names_like(feature_names, row_shape[-1]), row_shape, allow_nan)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = REFERENCE_THREADS
    opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SourceError(f"onnxruntime cannot load {path}: {exc}") from exc
    in_name, out_name = inp.name, out.name

    def reference(x: F32) -> F32:
        (y,) = session.run([out_name], {in_name: np.ascontiguousarray(x, dtype=np.float32)})
        return _as_batch(y, len(x), str(path))

    try:
        probe = reference(np.zeros((_PROBE_ROWS, *row_shape), dtype=np.float32))
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(
            f"onnxruntime failed to run {path} on a batch of {_PROBE_ROWS}: {exc}; "
            "check that the batch axis is dynamic all through the graph"
        ) from exc
    _check_probe(probe, task, str(path))
    return Source(
        name=name,
        kind="onnx",
        model=model,
        schema=schema,
        task=task,
        sha256=hashlib.sha256(data).hexdigest(),
        reference=reference,
        reference_label="onnxruntime (source file)",
    )
