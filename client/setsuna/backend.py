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

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from setsuna import deadline, manifest, runtime, stub_guard
from setsuna.errors import ConfigError, EngineError, InputError
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
        self.shedder = deadline.Shedder(margin_us=_shed_margin_us(args))
        # Incremented on the shed path only: a custom-metric update is a stub ->
        # server round trip (~80 us), affordable when the request is not computed.
        self._shed_family = pb_utils.MetricFamily(  # must outlive its Metric
            name="setsuna_shed_total",
            description="Requests answered UNAVAILABLE without computing: the caller's "
            "deadline was nearer than a batch takes (setsuna.deadline)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._shed_metric = self._shed_family.Metric(labels={"model": self.manifest.model})
        # Triton 2.51 counts an error *response* as a success (nv_inference_request_success;
        # only a raising execute() is a failure): these are what alerts can see instead.
        self._failure_family = pb_utils.MetricFamily(
            name="setsuna_request_failures_total",
            description="Requests answered with an error by the engine wrapper, by reason: "
            "engine (it raised or answered non-finite scores) or refused (bad input)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._failures = {
            reason: self._failure_family.Metric(
                labels={"model": self.manifest.model, "reason": reason}
            )
            for reason in ("engine", "refused")
        }

    def execute(self, requests: list[Any]) -> list[Any]:
        # Requests whose caller's deadline this batch cannot meet are answered at
        # once and never computed (setsuna.deadline): overload drains fast.
        now = time.time_ns()
        due = [deadline.read(r.parameters()) for r in requests]
        late = [i for i, d in enumerate(due) if self.shedder.too_late(d, now)]
        if not late:
            return self._serve(requests)
        responses: list[Any] = [None] * len(requests)
        self._shed_metric.increment(len(late))
        for i in late:
            message = self.shedder.message(self.manifest.model, due[i] or now, now)
            responses[i] = pb_utils.InferenceResponse(
                error=pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
            )
        keep = [i for i in range(len(requests)) if responses[i] is None]
        if keep:
            for i, response in zip(keep, self._serve([requests[i] for i in keep]), strict=True):
                responses[i] = response
        return responses

    def _serve(self, requests: list[Any]) -> list[Any]:
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
        if bad:
            self._failures["refused"].increment(len(bad))
        keep = [i for i in range(len(requests)) if i not in bad]
        if not keep:
            return responses
        parts = [arrays[i] for i in keep]
        if bad:  # rare: restack without the refused requests
            x = np.ascontiguousarray(np.concatenate(parts))
        began = time.perf_counter_ns()
        try:
            y = self.engine.predict(x)
            self.shedder.observe(time.perf_counter_ns() - began)
            if not self.schema.allow_nan and not np.isfinite(y).all():
                # A broken engine, never an answer: setsuna_forest refuses the same way.
                row = int(np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))[0])
                raise EngineError(f"non-finite score {y.reshape(len(y), -1)[row]} at row {row}")
        except Exception as exc:  # an engine failure fails its requests, visibly
            err = pb_utils.TritonError(f"{self.manifest.model}: engine failed: {exc}")
            for i in keep:
                responses[i] = pb_utils.InferenceResponse(error=err)
            self._failures["engine"].increment(len(keep))
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


def _shed_margin_us(args: dict[str, Any]) -> float:
    """Config parameter ``shed_margin_us``: time kept for the answer's way back (default 200)."""
    params = json.loads(args.get("model_config", "{}")).get("parameters", {})
    raw = params.get("shed_margin_us", {}).get("string_value", "")
    if not raw:
        return deadline.DEFAULT_MARGIN_US
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60e6:
        raise ConfigError(f"config parameter shed_margin_us={raw!r}: give 0..60000000 microseconds")
    return value
