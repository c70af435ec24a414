"""The Python-backend model that every ``local``-target wrapper imports.

Triton hands :meth:`TritonPythonModel.execute` every request the dynamic
batcher gathered; they are checked one by one against the feature schema (a
bad request gets its own error and costs the others nothing), stacked into one
array, and run through the engine in ONE native call. No Python runs per row.

``initialize`` re-hashes every file of the version folder against
``manifest.json`` and refuses to load on a mismatch, so a tampered engine is
never served. An engine failure fails the requests it was running: there is
no default prediction to fall back on.

This module imports ``triton_python_backend_utils``, which exists only inside
Triton's Python backend stub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from setsuna import manifest, runtime
from setsuna.errors import InputError
from setsuna.schema import INPUT_NAME, OUTPUT_NAME


class TritonPythonModel:
    """Serve the engine described by this version folder's manifest."""

    def initialize(self, args: dict[str, Any]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        self.manifest = manifest.verify(folder)  # raises TamperedArtifactError: load fails
        self.schema = self.manifest.schema
        self.engine = runtime.load(self.manifest.engine, folder, self.manifest.engine_params)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batches: list[npt.NDArray[np.float32]] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            try:
                batches.append(self.schema.check(raw))
                owners.append(i)
            except InputError as exc:
                # INVALID_ARG: HTTP 400 / gRPC INVALID_ARGUMENT, the client's fault.
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"{self.manifest.model}: input '{INPUT_NAME}': {exc}",
                        pb_utils.TritonError.INVALID_ARG,
                    )
                )
        if batches:
            x = batches[0] if len(batches) == 1 else np.concatenate(batches)
            try:
                y = self.engine.predict(x)
            except Exception as exc:  # an engine failure fails its requests, visibly
                err = pb_utils.TritonError(f"{self.manifest.model}: engine failed: {exc}")
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            start = 0
            for i, b in zip(owners, batches, strict=True):
                part = y[start : start + len(b)]
                start += len(b)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)]
                )
        return responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
