"""The combiner: every member scores the whole batch at once, one answer.

With ``in_process`` (the example's layout) the members' engines are loaded
into this process from their verified version folders
(:mod:`ensembles.models.in_process`) and each scores the batch in one native
call: one hop from features to the combined answer. Without it, one
downstream request per member per execute (BLS), all in flight together, and
one bounded wait for them (:meth:`common.Downstream.call_all`). The
combination (weighted mean or logit stacking, :mod:`ensembles.members`) is
array arithmetic. A member's error fails the batch's requests with that error:
a partial ensemble is a different model, so it is never returned quietly.
``models`` names every member's ``model:version`` on every row (built only
for a request that asks for it, or for all outputs).

``execute`` is synchronous: an ``async`` one costs a hop from the stub's
thread to its event loop thread and back on every execute, and the calls
themselves block in threads either way (``async_exec`` too). With dynamic
batching (the example's serving) one execute serves every queued request
with one call per member (perf/combiner.py has the figures).

Config parameters: ``members_file`` (required; absolute or relative to the
model folder), ``in_process`` (default false), ``allow_nan`` (default false),
``bls_timeout_ms``,
``watch_interval_ms``, ``max_overdue_calls`` (:mod:`ensembles.limits`).
The file is watched like the router's (:mod:`ensembles.watch`); a bad one,
one naming a model that is not an engine (:mod:`ensembles.cycles`), or (in
process) one whose engines cannot load keeps the previous one serving
(logged and counted).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from ensembles import cycles, members
from ensembles.models import common
from ensembles.models.base import WatchedFileModel
from ensembles.models.in_process import InProcessEngines
from setsuna.contract import MODELS
from setsuna.schema import OUTPUT_NAME

MODELS_OUTPUT = MODELS


@functools.lru_cache(maxsize=16)
def _column(label: bytes, rows: int) -> npt.NDArray[np.object_]:
    """The ``models`` column: ``label`` on every row (read only, shared by responses)."""
    out = np.full((rows, 1), label, dtype=np.object_)
    out.flags.writeable = False
    return out


class TritonPythonModel(WatchedFileModel[members.Members]):
    KIND = "combiner"
    FILE_PARAMETER = "members_file"

    def initialize(self, args: dict[str, Any]) -> None:
        self.setup(args, self._loads)
        self.calls = common.Downstream(self.name, self.limits)
        self.start_watching()

    def before_watch(self) -> None:
        self.engines: InProcessEngines | None = (
            InProcessEngines(self.repo) if self.flag("in_process") else None
        )

    def _loads(self, data: bytes, origin: str) -> members.Members:
        spec = members.loads(data, origin)
        cycles.check(self.repo, self.name, (("member", t) for t in spec.targets), origin)
        if self.engines is not None:
            self.engines.prepare(spec.targets)  # all or nothing: a file that cannot load is bad
        return spec

    def execute(self, requests: list[Any]) -> list[Any]:
        self.poll()
        spec = self.watch.current
        responses, kept, xs, x = common.stack(self.name, requests, allow_nan=self.allow_nan)
        if x is None:
            return responses
        try:
            scores = self._scores(spec, requests, kept, x)
        except common.DownstreamError as exc:
            for i in kept:
                responses[i] = common.failure(f"{self.name}: member {exc}")
            return responses
        y = spec.combine(scores)
        label = spec.label.encode()
        models = {MODELS_OUTPUT: lambda n: _column(label, n)}
        for i, sl in zip(kept, common.split(len(x), [len(v) for v in xs]), strict=True):
            responses[i] = common.answer(requests[i], {OUTPUT_NAME: y}, sl, by_name=models)
        return responses

    def _scores(
        self, spec: members.Members, requests: list[Any], kept: list[int], x: Any
    ) -> list[Any]:
        """Every member's ``[n, 1]`` scores of the batch, or the first member's failure."""
        if self.engines is not None:
            scores = []
            for t in spec.targets:
                try:
                    y = np.asarray(self.engines.predict(t, x), dtype=np.float32).reshape(-1, 1)
                except Exception as exc:  # an engine failure fails the batch, visibly
                    raise common.DownstreamError(f"{t.label} failed: {exc}") from None
                if len(y) != len(x):
                    raise common.DownstreamError(f"{t.label} returned {len(y)} rows for {len(x)}")
                scores.append(y)
            return scores
        timeout = common.timeout_of([requests[i] for i in kept], self.limits)
        answers = self.calls.call_all(spec.targets, x, timeout)
        return [common.bls_score(a, t, len(x)) for a, t in zip(answers, spec.targets, strict=True)]

    def finalize(self) -> None:
        self.stop_watching()
        self.calls.close()
