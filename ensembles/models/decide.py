"""``decide``: the router with its arms' engines and the signal in one process.

Same experiment, stickiness, counters and outputs as the router (plus the
signal when the version folder holds ``thresholds.json``), but the arms run
in this process from their verified version folders and ``execute`` is plain
synchronous code: one hop from features to a decision, no BLS round trip and
no event loop per request. A shadow model, if the experiment names one, is
still called through BLS (synchronously, after the arms, timed out like any
downstream call: its time is added to the answer's; the router proper
overlaps it instead).

With the answer cache on (``cache_max_bytes``, ``cache_ttl_ms``: see
:mod:`ensembles.cache`), the rows it holds skip the engines and only the
missed rows of each arm are predicted (one call per arm); the signal is
applied to every row, cached or not, with this version's thresholds.
"""

from __future__ import annotations

import time
from typing import Any

from ensembles.models import common
from ensembles.models.router import RouterBase
from setsuna.errors import ConfigError


class TritonPythonModel(RouterBase):
    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        if self.engines is None:
            self.finalize()
            raise ConfigError(f"{self.name}: decide runs its arms in process: set in_process")

    def execute(self, requests: list[Any]) -> list[Any]:
        b = self._gather(requests)
        if not b.kept:
            return b.responses
        began = time.perf_counter()
        self.score_in_process(b)
        b.primary_us = (time.perf_counter() - began) * 1e6
        shadow: Any = None
        if b.exp.shadow is not None:
            began = time.perf_counter()
            try:
                shadow = self.calls.call_sync(b.exp.shadow, b.x, b.timeout)
            except common.DownstreamError as exc:  # recorded as the shadow's error
                shadow = exc.with_traceback(None)  # kept in a local: no frame cycle
            b.shadow_us = (time.perf_counter() - began) * 1e6
        return self._finish(b, requests, shadow)
