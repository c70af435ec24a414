"""The selector (BLS): the family's most accurate variant whose p99 fits the budget.

Each execute sends the whole batch to the serving variant (one BLS call) and
times it; a probe thread sends the last row seen to every other variant each
``probe_interval_ms`` and times that, so every variant's latency under the
current load stays known; the probe's answer is dropped and no caller waits
for it. Accuracy comes from the selector file's priors blended with the
outcomes the ``feedback`` model records (SQLite or PostgreSQL:
:mod:`ensembles.statedb`; re-read every ``refresh_s``; a read that fails
keeps the last figures, logged). :func:`ensembles.selection.choose` applies the
budget with hysteresis. A variant that errors fails its requests
(never a default) and is left at once.

Outputs per row: ``score`` and ``model`` (``name:version`` that produced it).
Config parameters: ``selector_file`` (required), ``outcomes_db`` (optional: path or
``postgresql://`` URL, as ``feedback``'s),
``refresh_s`` (default 1), ``allow_nan`` (default false), ``bls_timeout_ms``,
``watch_interval_ms``, ``max_overdue_calls`` (:mod:`ensembles.limits`; a
variant that times out has failed). The selector file is watched like the
router's (:mod:`ensembles.models.base`); a bad one, or one naming a model that
is not an engine (:mod:`ensembles.cycles`), keeps the previous one serving,
logged and counted (``setsuna_selector_reload_failures_total``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ensembles import cycles, selection, statedb
from ensembles import outcomes as outcome_store
from ensembles.models import common
from ensembles.models.base import WatchedFileModel
from setsuna.contract import MODEL
from setsuna.schema import OUTPUT_NAME


class TritonPythonModel(WatchedFileModel[selection.SelectorSpec]):
    KIND = "selector"
    FILE_PARAMETER = "selector_file"

    def initialize(self, args: dict[str, Any]) -> None:
        self.setup(args, self._loads)
        self.calls = common.Downstream(self.name, self.limits)
        db = self.params.get("outcomes_db", "")
        self.outcomes = (
            outcome_store.from_config(Path(args["model_repository"]), db, self.name) if db else None
        )
        self.refresh_s = float(self.params.get("refresh_s", "1"))
        self.latency: list[selection.Latency] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_batch: Any = None
        self._families: list[Any] = []
        self._serving = self._family(
            "setsuna_selector_variant", "1 for the variant serving, 0 for the others", "GAUGE"
        )
        self._switches = self._family(
            "setsuna_selector_switches_total", "Variant switches", "COUNTER"
        )
        self._p99 = self._family(
            "setsuna_selector_p99_ms",
            "p99 of the selector's own timing of each variant's calls (-1: not measured yet)",
            "GAUGE",
        )
        self._reset(self.watch.current)
        self.start_watching()
        self._prober = threading.Thread(target=self._probe_loop, name="probe", daemon=True)
        self._prober.start()

    def _loads(self, data: bytes, origin: str) -> selection.SelectorSpec:
        spec = selection.loads(data, origin)
        cycles.check(self.repo, self.name, (("variant", v.target) for v in spec.variants), origin)
        return spec

    def _family(self, name: str, description: str, kind: str) -> Any:
        family = pb_utils.MetricFamily(
            name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind)
        )
        self._families.append(family)  # families must outlive their metrics
        return family

    def _reset(self, spec: selection.SelectorSpec) -> None:
        """Take a new selector file: measurements of variants it keeps are kept."""
        previous = getattr(self, "spec", None)
        old = (
            {}
            if previous is None
            else {
                v.target.label: lat for v, lat in zip(previous.variants, self.latency, strict=True)
            }
        )
        self.spec = spec
        self.latency = [
            old.get(v.target.label) or selection.Latency(spec.window) for v in spec.variants
        ]
        for lat in self.latency:
            lat.resize(spec.window)
        self.current = selection.initial(spec)
        self.since_switch = 0
        self.executes = 0
        self.probe_next = 0
        self.accuracy = [v.prior_accuracy for v in spec.variants]
        self._refreshed = 0.0
        self._gauges = [
            self._serving.Metric(labels={"selector": self.name, "model": v.target.label})
            for v in spec.variants
        ]
        self._switch_count = self._switches.Metric(labels={"selector": self.name})
        self._p99_gauges = [
            self._p99.Metric(labels={"selector": self.name, "model": v.target.label})
            for v in spec.variants
        ]
        self._publish()

    def _publish(self) -> None:
        for i, g in enumerate(self._gauges):
            g.set(1 if i == self.current else 0)
        label = self.spec.variants[self.current].target.label
        pb_utils.Logger.log_info(f"{self.name}: serving {label}")

    def _refresh_accuracy(self) -> None:
        now = time.monotonic()
        if self.outcomes is None or now - self._refreshed < self.refresh_s:
            return
        self._refreshed = now
        try:
            totals = self.outcomes.totals()
        except statedb.StateError as exc:  # e.g. PostgreSQL restarting: keep the last figures
            pb_utils.Logger.log_warn(f"{self.name}: outcomes not refreshed: {exc}")
            return
        self.accuracy = [
            selection.accuracy(
                v.prior_accuracy, self.spec.prior_weight, *totals.get(v.target.label, (0, 0))
            )
            for v in self.spec.variants
        ]

    def _probe_loop(self) -> None:
        """Every ``probe_interval_ms``, time each variant not serving on the last batch.

        A thread of its own with synchronous BLS: measured in the middle of the
        execute (or as a task between executes) a probe waits for the serving
        call and reads several times slower than it is; from here no caller
        waits for it and its time is its own. The answers are dropped.
        """
        while not self._stop.wait(self.spec.probe_interval_ms / 1e3):
            with self._lock:
                x, serving, spec = self._last_batch, self.current, self.spec
            if x is None:
                continue
            timeout = (self.limits.bls_timeout_ms / 1e3, "bls_timeout_ms")
            for i, v in enumerate(spec.variants):
                if i == serving or self._stop.is_set():
                    continue
                t0 = time.perf_counter()
                try:
                    answer = self.calls.call_sync(v.target, x, timeout)
                except Exception:  # a probe must never take the model down
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                if not answer.has_error():
                    with self._lock:
                        if self.spec is spec:
                            self.latency[i].add(ms)

    async def _timed(self, i: int, x: Any, timeout: common.Timeout) -> tuple[Any, float]:
        """The answer (or the error it ended with) and its time in milliseconds."""
        t0 = time.perf_counter()
        try:
            answer = await self.calls.call(self.spec.variants[i].target, x, timeout)
        except common.DownstreamError as exc:
            answer = exc.with_traceback(None)  # kept in a local: no frame cycle
        return answer, (time.perf_counter() - t0) * 1e3

    async def execute(self, requests: list[Any]) -> list[Any]:
        self.poll()
        if self.watch.current is not self.spec:  # taken here or by the watcher thread
            with self._lock:
                self._reset(self.watch.current)
        self._refresh_accuracy()
        responses, kept, xs, x = common.stack(self.name, requests, allow_nan=self.allow_nan)
        if x is None:
            return responses
        serving = self.current
        answer, ms = await self._timed(
            serving, x, common.timeout_of([requests[i] for i in kept], self.limits)
        )
        target = self.spec.variants[serving].target
        failed = False
        try:
            y = common.bls_score(answer, target, len(x))
            with self._lock:
                self.latency[serving].add(ms)
        except common.DownstreamError as exc:
            failed = True
            for i in kept:
                responses[i] = common.failure(f"{self.name}: {exc}")
        self.since_switch += 1
        with self._lock:
            self._last_batch = x[:1]
            p99 = [lat.p99_ms() for lat in self.latency]
        for g, v in zip(self._p99_gauges, p99, strict=True):
            g.set(v if v != float("inf") else -1.0)
        nxt = selection.choose(
            self.spec, serving, p99, self.accuracy, self.since_switch, failed=failed
        )
        if nxt != serving:
            self.current, self.since_switch = nxt, 0
            self._switch_count.increment(1)
            self._publish()
        if failed:
            return responses
        columns = {OUTPUT_NAME: y, MODEL: common.constant(target.label, len(x))}
        for i, sl in zip(kept, common.split(len(x), [len(v) for v in xs]), strict=True):
            responses[i] = common.answer(requests[i], columns, sl)
        return responses

    def finalize(self) -> None:
        self._stop.set()
        self.stop_watching()
        self._prober.join(timeout=5)
        self.calls.close()
        if self.outcomes is not None:
            self.outcomes.close()
