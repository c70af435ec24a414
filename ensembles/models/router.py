"""The router (BLS): sticky A/B/n assignment, a shadow copy, per-arm counters.

Per execute: every request's rows are stacked once; each row gets an arm
(from its ``key`` input, else the request parameter ``key``, hashed by
:mod:`ensembles.experiment`; or the request parameter ``arm`` to force one);
then ONE downstream request per arm carries that arm's rows, and the shadow
model gets one copy of the whole batch. All of them run concurrently (async
BLS). The shadow's answer is written to the shadow log and counted, never
returned; an arm's error fails exactly the requests with rows on that arm.

Outputs per row: ``score``, ``arm``, ``model`` (``name:version`` that
produced the score) and ``experiment_version``. The experiment file is
re-read when it changes; a bad file keeps the previous one serving, logged
and counted (``setsuna_router_reload_failures_total``).

Config parameters: ``experiment_file`` (required; absolute or relative to
the model folder), ``shadow_log`` (JSON lines; default: no log, counts
only), ``allow_nan`` (default false).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from ensembles import experiment
from ensembles.models import common
from ensembles.watch import Watched
from setsuna.errors import ConfigError, InputError, SetsunaError
from setsuna.schema import OUTPUT_NAME

KEY_INPUT = "key"
I16 = npt.NDArray[np.int16]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        params = common.model_parameters(args)
        if not params.get("experiment_file"):
            raise ConfigError(f"{self.name}: config parameter 'experiment_file' is required")
        self.watch = Watched(common.config_path(args, params["experiment_file"]), experiment.load)
        self.allow_nan = params.get("allow_nan", "false").lower() == "true"
        log = params.get("shadow_log", "")
        self.shadow_log: TextIO | None = None
        if log:
            path = common.config_path(args, log)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.shadow_log = path.open("a", buffering=1)  # one line per batch, flushed
        self.logger = pb_utils.Logger
        self._rows = pb_utils.MetricFamily(
            name="setsuna_router_rows_total",
            description="Rows routed, by router, arm and the model:version that answered",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._shadow = pb_utils.MetricFamily(
            name="setsuna_router_shadow_rows_total",
            description="Rows copied to the shadow model, by outcome (never returned)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._version = pb_utils.MetricFamily(
            name="setsuna_router_experiment_version",
            description="Experiment version in force",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        # Families must outlive their metrics (the stub deletes a family's metrics with it).
        self._failure_family = pb_utils.MetricFamily(
            name="setsuna_router_reload_failures_total",
            description="Experiment files refused at reload (the previous one kept serving)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._failures = self._failure_family.Metric(labels={"router": self.name})
        self._metrics: dict[tuple[str, ...], Any] = {}
        self._took_effect()

    def _metric(self, family: Any, **labels: str) -> Any:
        key = (str(id(family)), *(f"{k}={v}" for k, v in sorted(labels.items())))
        m = self._metrics.get(key)
        if m is None:
            m = self._metrics[key] = family.Metric(labels={"router": self.name, **labels})
        return m

    def _took_effect(self) -> None:
        exp = self.watch.current
        self._metric(self._version, experiment=exp.name).set(exp.version)
        self.logger.log_info(f"{self.name}: {exp.describe()}")

    def _poll(self) -> None:
        if self.watch.poll():
            self._took_effect()
        elif self.watch.last_error:
            self._failures.increment(1)
            self.logger.log_error(f"{self.name}: {self.watch.last_error}")
            self.watch.last_error = ""

    def _arms(self, exp: experiment.Experiment, request: Any, rows: int) -> I16:
        params = common.request_parameters(request)
        forced = params.get("arm")
        if forced is not None:
            return np.full(rows, exp.arm_index(str(forced)), dtype=np.int16)
        key_tensor = pb_utils.get_input_tensor_by_name(request, KEY_INPUT)
        if key_tensor is not None:
            keys = key_tensor.as_numpy().reshape(-1)
            if len(keys) != rows:
                raise InputError(f"input '{KEY_INPUT}' has {len(keys)} rows for {rows} features")
            return exp.assign(keys.tolist())
        if "key" in params:
            return np.full(rows, exp.assign([str(params["key"])])[0], dtype=np.int16)
        raise InputError(
            f"no sticky key: send input '{KEY_INPUT}' (one per row) or the request parameter "
            "'key' (a symbol or account), or force an arm with the request parameter 'arm'"
        )

    async def execute(self, requests: list[Any]) -> list[Any]:
        self._poll()
        exp = self.watch.current
        responses: list[Any] = [None] * len(requests)
        kept: list[int] = []
        xs, arms = [], []
        for i, r in enumerate(requests):
            try:
                x = common.features(r, allow_nan=self.allow_nan)
                assigned = self._arms(exp, r, len(x))
            except (SetsunaError, ValueError) as exc:
                err = exc if isinstance(exc, SetsunaError) else InputError(str(exc))
                responses[i] = common.refusal(self.name, err)
                continue
            kept.append(i)
            xs.append(x)
            arms.append(assigned)
        if not kept:
            return responses
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        arm = arms[0] if len(arms) == 1 else np.concatenate(arms)
        used = [int(a) for a in np.unique(arm)]
        rows_of = {a: np.flatnonzero(arm == a) for a in used}
        calls = [
            common.bls_request(exp.targets[a], x if len(used) == 1 else x[rows_of[a]]).async_exec()
            for a in used
        ]
        if exp.shadow is not None:
            calls.append(common.bls_request(exp.shadow, x).async_exec())
        answers = await asyncio.gather(*calls)
        score = np.empty((len(x), 1), dtype=np.float32)
        failed: dict[int, str] = {}
        for a, answer in zip(used, answers, strict=False):
            try:
                score[rows_of[a]] = common.bls_score(answer, exp.targets[a], len(rows_of[a]))
            except common.DownstreamError as exc:
                failed[a] = f"{self.name}: arm {exp.arms[a]!r}: {exc}"
        if exp.shadow is not None:
            self._record_shadow(exp, arm, score, answers[-1], requests, kept)
        for a in used:
            if a not in failed:
                target = exp.targets[a]
                self._metric(self._rows, arm=exp.arms[a], model=target.label).increment(
                    len(rows_of[a])
                )
        arm_labels = common.labels(exp.arms, arm)
        model_labels = common.labels([t.label for t in exp.targets], arm)
        version = np.full((len(x), 1), exp.version, dtype=np.int32)
        for i, sl in zip(kept, common.split(len(x), [len(v) for v in xs]), strict=True):
            bad = next((failed[a] for a in np.unique(arm[sl]).tolist() if a in failed), None)
            if bad is not None:
                responses[i] = common.failure(bad)
                continue
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(OUTPUT_NAME, score[sl]),
                    pb_utils.Tensor("arm", arm_labels[sl]),
                    pb_utils.Tensor("model", model_labels[sl]),
                    pb_utils.Tensor("experiment_version", version[sl]),
                ]
            )
        return responses

    def _record_shadow(
        self,
        exp: experiment.Experiment,
        arm: I16,
        score: npt.NDArray[np.float32],
        answer: Any,
        requests: list[Any],
        kept: list[int],
    ) -> None:
        assert exp.shadow is not None
        record: dict[str, Any] = {
            "t_ns": time.time_ns(),
            "router": self.name,
            "experiment": exp.name,
            "experiment_version": exp.version,
            "shadow": exp.shadow.label,
            "request_ids": [requests[i].request_id() for i in kept],
            "arms": [exp.arms[a] for a in arm.tolist()],
            "primary": score.reshape(-1).tolist(),
        }
        try:
            record["score"] = common.bls_score(answer, exp.shadow, len(arm)).reshape(-1).tolist()
            outcome = "ok"
        except common.DownstreamError as exc:
            record["error"] = str(exc)
            outcome = "error"
        self._metric(self._shadow, model=exp.shadow.label, outcome=outcome).increment(len(arm))
        if self.shadow_log is not None:
            self.shadow_log.write(json.dumps(record) + "\n")

    def finalize(self) -> None:
        if self.shadow_log is not None:
            self.shadow_log.close()


__all__ = ["TritonPythonModel"]
