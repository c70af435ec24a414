"""TensorRT engine: a serialized plan run on the GPU with the TensorRT 10 API.

Device buffers are torch CUDA tensors: hosts that serve plans install torch
with CUDA anyway (the ``tensorrt`` extra), and its caching allocator and
streams save a second CUDA binding (cuda-python, pycuda). A plan is tied to
the TensorRT version and GPU model that built it, so loading says so when
deserialisation fails. Batches larger than the plan's optimisation profile
allows are run in chunks of the profile's maximum.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from setsuna import runtime
from setsuna.errors import EngineError
from setsuna.runtime import F32
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

PLAN_FILE = "model.plan"


class TensorRTEngine:
    """One deserialised engine, one execution context and one CUDA stream."""

    def __init__(self, path: Path) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise EngineError(
                f"{path} is a TensorRT plan and needs a CUDA GPU, but none is visible; "
                "serve it from a GPU host or deploy a CPU candidate (onnx, onnx-int8-*)"
            )
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"TensorRT could not deserialise {path}: a plan only loads with the TensorRT "
                f"version ({trt.__version__} here) and GPU model it was built with; rebuild it "
                "on this host with `make build-engines`"
            )
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if names != {INPUT_NAME, OUTPUT_NAME}:
            raise EngineError(
                f"{path} has tensors {sorted(names)}, expected {INPUT_NAME!r} and "
                f"{OUTPUT_NAME!r}; rebuild it with `make build-engines`"
            )
        for name in (INPUT_NAME, OUTPUT_NAME):
            if self._engine.get_tensor_dtype(name) != trt.float32:
                raise EngineError(f"{path}: tensor {name!r} is not float32; rebuild it")
        _, _, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self._max_batch = int(max_shape[0])
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    def predict(self, x: F32) -> F32:
        out = np.empty((len(x), 1), dtype=np.float32)
        for start in range(0, len(x), self._max_batch):
            stop = start + self._max_batch
            out[start:stop] = self._run(x[start:stop])
        return out

    def _run(self, chunk: F32) -> F32:
        import torch

        with torch.cuda.stream(self._stream):
            inp = torch.from_numpy(np.ascontiguousarray(chunk)).to("cuda")
            out = torch.empty((len(chunk), 1), dtype=torch.float32, device="cuda")
            ok = self._context.set_input_shape(INPUT_NAME, tuple(inp.shape))
            ok = ok and self._context.set_tensor_address(INPUT_NAME, inp.data_ptr())
            ok = ok and self._context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
            ok = ok and self._context.execute_async_v3(self._stream.cuda_stream)
            if not ok:
                raise EngineError(
                    f"TensorRT failed to run a batch of {list(chunk.shape)}; see the TensorRT "
                    "log above (the plan's profile allows 1 to "
                    f"{self._max_batch} rows)"
                )
            # .cpu() is queued on this stream after the engine and waits for it.
            result: F32 = out.cpu().numpy()
        return result


def load(folder: Path, params: Mapping[str, Any]) -> TensorRTEngine:
    return TensorRTEngine(runtime.artifact(folder, params.get("file", PLAN_FILE)))
