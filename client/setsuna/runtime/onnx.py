"""ONNX Runtime engine (fp32 and INT8 ONNX files)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from setsuna import runtime
from setsuna.errors import EngineError
from setsuna.runtime import F32
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

ONNX_FILE = "model.onnx"


class OnnxEngine:
    """One ``InferenceSession`` with explicit threads.

    ``intra_op_num_threads`` defaults to 1: on a shared 2-core host a pool
    spin-up costs more than small batches gain, and Triton scales by
    instances, not by threads inside one.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int = 1,
        optimized_offline: bool = True,
        n_outputs: int = 1,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # An offline-optimised file is already fused; re-optimising only slows loading.
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if optimized_offline
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        self._session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in self._session.get_outputs()]
        if OUTPUT_NAME not in names:
            raise EngineError(f"{path} has outputs {names}, expected {OUTPUT_NAME!r}; rebuild it")
        self._outputs = [OUTPUT_NAME]
        if n_outputs < 1:
            raise EngineError(f"n_outputs={n_outputs} must be >= 1; rebuild the model")
        self._width = n_outputs

    def predict(self, x: F32) -> F32:
        (out,) = self._session.run(self._outputs, {INPUT_NAME: x})
        return np.asarray(out, dtype=np.float32).reshape(len(x), self._width)


def load(folder: Path, params: Mapping[str, Any]) -> OnnxEngine:
    return OnnxEngine(
        runtime.artifact(folder, params.get("file", ONNX_FILE)),
        threads=int(params.get("threads", 1)),
        optimized_offline=bool(params.get("optimized_offline", True)),
        n_outputs=int(params.get("n_outputs", 1)),
    )
