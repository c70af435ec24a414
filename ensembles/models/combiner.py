"""The combiner: every member scores the whole batch at once (async BLS), one answer.

One downstream request per member per execute, all in flight together; the
combination (weighted mean or logit stacking, :mod:`ensembles.members`) is
array arithmetic. A member's error fails the batch's requests with that error:
a partial ensemble is a different model, so it is never returned quietly.
``models`` names every member's ``model:version`` on every row.

Config parameters: ``members_file`` (required; absolute or relative to the
model folder), ``allow_nan`` (default false). The file is re-read when it
changes; a bad one keeps the previous one serving (logged and counted).
"""

from __future__ import annotations

import asyncio
from typing import Any

import triton_python_backend_utils as pb_utils

from ensembles import members
from ensembles.models import common
from ensembles.watch import Watched
from setsuna.errors import ConfigError
from setsuna.schema import OUTPUT_NAME


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        params = common.model_parameters(args)
        if not params.get("members_file"):
            raise ConfigError(f"{self.name}: config parameter 'members_file' is required")
        self.watch = Watched(common.config_path(args, params["members_file"]), members.load)
        self.allow_nan = params.get("allow_nan", "false").lower() == "true"
        self._failure_family = pb_utils.MetricFamily(
            name="setsuna_combiner_reload_failures_total",
            description="Member files refused at reload (the previous one kept serving)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._failures = self._failure_family.Metric(labels={"combiner": self.name})

    async def execute(self, requests: list[Any]) -> list[Any]:
        if not self.watch.poll() and self.watch.last_error:
            self._failures.increment(1)
            pb_utils.Logger.log_error(f"{self.name}: {self.watch.last_error}")
            self.watch.last_error = ""
        spec = self.watch.current
        responses, kept, xs, x = common.stack(self.name, requests, allow_nan=self.allow_nan)
        if x is None:
            return responses
        answers = await asyncio.gather(
            *(common.bls_request(t, x).async_exec() for t in spec.targets)
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
