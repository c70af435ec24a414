"""The combiner: every member scores the whole batch at once (async BLS), one answer.

One downstream request per member per execute, all in flight together; the
combination (weighted mean or logit stacking, :mod:`ensembles.members`) is
array arithmetic. A member's error fails the batch's requests with that error:
a partial ensemble is a different model, so it is never returned quietly.
``models`` names every member's ``model:version`` on every row.

Config parameters: ``members_file`` (required; absolute or relative to the
model folder), ``allow_nan`` (default false), ``bls_timeout_ms``,
``watch_interval_ms``, ``max_overdue_calls`` (:mod:`ensembles.limits`).
The file is watched like the router's (:mod:`ensembles.watch`); a bad one,
or one naming a model that is not an engine (:mod:`ensembles.cycles`), keeps
the previous one serving (logged and counted).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ensembles import cycles, members
from ensembles.limits import Limits
from ensembles.models import common
from ensembles.watch import Poller, Watched, shared_copy
from setsuna.errors import ConfigError
from setsuna.schema import OUTPUT_NAME


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        params = common.model_parameters(args)
        if not params.get("members_file"):
            raise ConfigError(f"{self.name}: config parameter 'members_file' is required")
        self.limits = Limits.from_parameters(params, self.name)
        self.repo = Path(args["model_repository"]).parent
        path = common.config_path(args, params["members_file"])
        self.watch = Watched(path, self._loads, shared=shared_copy(path, self.name))
        self.calls = common.Downstream(self.name, self.limits)
        self.allow_nan = params.get("allow_nan", "false").lower() == "true"
        self._failure_family = pb_utils.MetricFamily(
            name="setsuna_combiner_reload_failures_total",
            description="Member files refused at reload, per instance (the previous one kept "
            "serving)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        instance = str(args.get("model_instance_name", self.name))
        self._failures = self._failure_family.Metric(
            labels={"combiner": self.name, "instance": instance}
        )
        self._poll()
        self._poller = Poller(
            self._poll,
            self.limits.watch_interval_ms / 1e3,
            lambda exc: pb_utils.Logger.log_error(f"{self.name}: watching failed: {exc}"),
            name=f"{self.name}-watch",
        )

    def _loads(self, data: bytes, origin: str) -> members.Members:
        spec = members.loads(data, origin)
        cycles.check(self.repo, self.name, (("member", t) for t in spec.targets), origin)
        return spec

    def _poll(self) -> None:
        for change in self.watch.poll():
            if change.refused:
                self._failures.increment(1)
                pb_utils.Logger.log_error(f"{self.name}: {change.refused}")
            if change.note:
                pb_utils.Logger.log_warn(f"{self.name}: {change.note}")

    async def execute(self, requests: list[Any]) -> list[Any]:
        self._poll()
        spec = self.watch.current
        responses, kept, xs, x = common.stack(self.name, requests, allow_nan=self.allow_nan)
        if x is None:
            return responses
        timeout = common.timeout_of([requests[i] for i in kept], self.limits)
        answers = await asyncio.gather(
            *(self.calls.call(t, x, timeout) for t in spec.targets), return_exceptions=True
        )
        try:
            scores = [
                common.bls_score(a, t, len(x)) for a, t in zip(answers, spec.targets, strict=True)
            ]
        except common.DownstreamError as exc:
            for i in kept:
                responses[i] = common.failure(f"{self.name}: member {exc}")
            return responses
        y = spec.combine(scores)
        names = common.constant(spec.label, len(x))
        for i, sl in zip(kept, common.split(len(x), [len(v) for v in xs]), strict=True):
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(OUTPUT_NAME, y[sl]),
                    pb_utils.Tensor("models", names[sl]),
                ]
            )
        return responses

    def finalize(self) -> None:
        self._poller.stop()
        self.calls.close()
