"""The Python-backend model that every ``local``-target wrapper imports.

Triton hands :meth:`TritonPythonModel.execute` every request the dynamic
batcher gathered; they are checked one by one against the feature schema (a
bad request gets its own error and costs the others nothing), stacked into one
array, and run through the engine in ONE native call. No Python runs per row.

``initialize`` re-checks the version folder's signed seal and re-hashes
every file against ``manifest.json``, refusing to load on a mismatch, so a
tampered engine is never served (the stub guard, :mod:`setsuna.stub_guard`,
already checked the seal before importing this wrapper's ``model.py``). An
engine failure fails the requests it was running: there is no default
prediction to fall back on.

This module imports ``triton_python_backend_utils``, which exists only inside
Triton's Python backend stub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from setsuna import manifest, runtime, stub_guard
from setsuna.errors import InputError
from setsuna.schema import INPUT_NAME, OUTPUT_NAME


class TritonPythonModel:
    """Serve the engine described by this version folder's manifest."""

    def initialize(self, args: dict[str, Any]) -> None:
        stub_guard.require()
        folder = Path(args["model_repository"]) / args["model_version"]
        # raises TamperedArtifactError: load fails
        self.manifest = manifest.verify_sealed(folder)
        self.schema = self.manifest.schema
        self.engine = runtime.load(self.manifest.engine, folder, self.manifest.engine_params)

    def execute(self, requests: list[Any]) -> list[Any]:
        # Triton has already enforced dtype and dims from config.pbtxt; what it
        # cannot know is the NaN policy. So: stack once, check finiteness once
        # over the whole batch, and only on a hit find which requests own the
        # bad rows. Per request there is a tensor fetch and a response, nothing more.
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        x = np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        responses: list[Any] = [None] * len(requests)
        bad = self._non_finite_requests(x, arrays)
        for i in bad:
            responses[i] = self._refusal(arrays[i])
        keep = [i for i in range(len(requests)) if i not in bad]
        if not keep:
            return responses
        parts = [arrays[i] for i in keep]
        if bad:  # rare: restack without the refused requests
            x = np.ascontiguousarray(np.concatenate(parts))
        try:
            y = self.engine.predict(x)
        except Exception as exc:  # an engine failure fails its requests, visibly
            err = pb_utils.TritonError(f"{self.manifest.model}: engine failed: {exc}")
            for i in keep:
                responses[i] = pb_utils.InferenceResponse(error=err)
            return responses
        start = 0
        for i, part in zip(keep, parts, strict=True):
            stop = start + len(part)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(OUTPUT_NAME, y[start:stop])]
            )
            start = stop
        return responses

    def _non_finite_requests(
        self, x: npt.NDArray[np.float32], arrays: list[npt.NDArray[np.float32]]
    ) -> set[int]:
        """Indices of requests holding a NaN/±inf row of the stacked ``x``, when forbidden."""
        if self.schema.allow_nan:
            return set()
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if finite.all():
            return set()
        ends = np.cumsum([len(a) for a in arrays])
        return {int(i) for i in np.searchsorted(ends, np.flatnonzero(~finite), side="right")}

    def _refusal(self, raw: npt.NDArray[np.float32]) -> Any:
        """INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) with the schema's own message."""
        message = "non-finite value"
        try:
            self.schema.check(raw)
        except InputError as exc:  # always, for a request the caller found non-finite
            message = str(exc)
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(
                f"{self.manifest.model}: input '{INPUT_NAME}': {message}",
                pb_utils.TritonError.INVALID_ARG,
            )
        )

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
