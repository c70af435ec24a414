"""The router (BLS): sticky A/B/n assignment, a shadow copy, per-arm counters.

Per execute: every request's rows are stacked once; each row gets an arm
(from its ``key`` input, else the request parameter ``key``, hashed by
:mod:`ensembles.experiment`; or the request parameter ``arm`` to force one);
then ONE downstream request per arm carries that arm's rows, and the shadow
model gets one copy of the whole batch. All of them run concurrently (async
BLS). The shadow's answer is written to the shadow log and counted, never
returned; an arm's error fails exactly the requests with rows on that arm.

Outputs per row: ``score``, ``arm``, ``model`` (``name:version`` that
produced the score) and ``experiment_version``; ``instance`` (the Triton
instance that answered) only when asked for by name. The experiment file is
watched by every instance (:mod:`ensembles.watch`: a background poll, a
last valid copy shared by the instances); a bad file keeps the previous one
serving, logged and counted (``setsuna_router_reload_failures_total``). A
file is bad when it does not validate, when it names a model that is not an
engine (:mod:`ensembles.cycles`), or (``decide``) when an arm cannot load.

Every downstream call is timed out (:mod:`ensembles.limits`); keys are
bounded in length and their memo in bytes (:mod:`ensembles.keys`).

Multiclass arms (engines answering class probabilities, ``score`` [C]) are
served by ``decide`` only: each row's ``score`` is then its C probabilities,
still one engine call per arm per batch, and the signal applies the direction
rule (:mod:`ensembles.signal`). An experiment file is refused, with the
reason, when its arms answer different classes, when its classes do not fit
this model's ``score`` width or thresholds, when the answer cache is on
(it holds one score per row), or, for the BLS router, when its arms are
multiclass at all.

With ``cache_max_bytes`` and ``cache_ttl_ms`` set, each instance remembers
the arms' scores per row (:mod:`ensembles.cache`, keyed by the experiment in
force, the arm's ``model:version`` and the row's bytes): cached rows are
filled in, and only the missed rows of an arm go to it (one call for all of
them). The shadow still gets the whole batch. Counted per instance:
``setsuna_router_cache_{hits,misses,clears}_total`` and the gauge
``setsuna_router_cache_bytes{stat="now"|"peak"}``.

Config parameters: ``experiment_file`` (required; absolute or relative to
the model folder), ``shadow_log`` (JSON lines, :mod:`ensembles.shadowlog`,
with each side's latency; default: no log, counts only),
``shadow_log_max_bytes`` (rotated past it; default 256 MiB), ``allow_nan``
(default false), ``in_process`` (default false), and the limits of :class:`ensembles.limits.Limits`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from ensembles import cycles, experiment, keys, shadowlog, signal
from ensembles.cache import ScoreCache, row_keys
from ensembles.models import common
from ensembles.models.base import WatchedFileModel
from ensembles.models.in_process import InProcessEngines
from setsuna.contract import (
    ARM,
    CONFIDENCE,
    DECIDED_BY,
    EXPERIMENT_VERSION,
    INSTANCE,
    KEY,
    MODEL,
    SIGNAL,
)
from setsuna.errors import ConfigError, InputError, SetsunaError
from setsuna.schema import OUTPUT_NAME

KEY_INPUT = KEY
INSTANCE_OUTPUT = INSTANCE
I16 = npt.NDArray[np.int16]


@dataclass
class Batch:
    """One execute's requests, stacked: rows, their arms, and what each arm answered."""

    exp: experiment.Experiment
    responses: list[Any]
    kept: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    x: Any = None
    arm: Any = None
    used: list[int] = field(default_factory=list)
    rows_of: dict[int, Any] = field(default_factory=dict)
    score: Any = None
    failed: dict[int, str] = field(default_factory=dict)
    timeout: common.Timeout = (1.0, "bls_timeout_ms")
    # The rows each arm must compute (all of its rows, less those the cache answered;
    # an arm the cache answered entirely is absent) and, with the cache on, their keys.
    todo: dict[int, Any] = field(default_factory=dict)
    todo_keys: dict[int, list[bytes]] = field(default_factory=dict)
    # Wall time of the arms (all of them) and of the shadow call, for the shadow log.
    primary_us: float = 0.0
    shadow_us: float = 0.0

    def part(self, a: int) -> Any:
        """The features of the rows arm ``a`` must compute."""
        rows = self.todo[a]
        return self.x if len(rows) == len(self.x) else self.x[rows]


class RouterBase(WatchedFileModel[experiment.Experiment]):
    """Everything but how the arms are called (BLS here, in-process in ``decide``)."""

    KIND = "router"
    FILE_PARAMETER = "experiment_file"

    def before_watch(self) -> None:
        self.keys = keys.KeyCache(self.limits.max_key_cache_bytes)
        # model:version -> (classes, (down, flat, up) columns or None), for every arm
        # a valid file named: the width of its rows and how the signal reads them.
        self.arm_classes: dict[str, tuple[tuple[str, ...], tuple[int, int, int] | None]] = {}
        # in_process: arms run in this process, loaded from their verified version
        # folders in the same repository: one hop instead of a BLS round trip each.
        self.engines: InProcessEngines | None = (
            InProcessEngines(self.repo) if self.flag("in_process") else None
        )

    def initialize(self, args: dict[str, Any]) -> None:
        # Thresholds and the score width first: the experiment file is checked against them.
        folder = Path(args["model_repository"]) / args["model_version"]
        thresholds = folder / signal.THRESHOLDS_FILE
        self.thresholds: signal.AnyThresholds | None = (
            signal.load_any_thresholds(thresholds) if thresholds.is_file() else None
        )
        self.score_width = _score_width(args)
        self.setup(args, self._loads)
        params = self.params
        self.label = f"{self.name}:{args['model_version']}"
        self.calls = common.Downstream(self.name, self.limits)
        log = params.get("shadow_log", "")
        self.shadow_log: shadowlog.ShadowLog | None = None
        if log:
            raw = params.get("shadow_log_max_bytes", str(shadowlog.MAX_BYTES))
            if not raw.isdigit() or int(raw) < 4096:
                raise ConfigError(
                    f"{self.name}: shadow_log_max_bytes={raw!r}: give a byte count >= 4096"
                )
            self.shadow_log = shadowlog.ShadowLog(common.config_path(args, log), int(raw))
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
            description="Experiment version in force, per instance",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        mine = {"router": self.name, "instance": self.instance}
        self._cache_family = pb_utils.MetricFamily(
            name="setsuna_router_key_cache_bytes",
            description="Bytes held by the key -> arm memo, per instance (never above "
            "max_key_cache_bytes): now and at most",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._clears_family = pb_utils.MetricFamily(
            name="setsuna_router_key_cache_clears_total",
            description="Times the key -> arm memo was full and dropped, per instance",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._cache_now = self._cache_family.Metric(labels={**mine, "stat": "now"})
        self._cache_peak = self._cache_family.Metric(labels={**mine, "stat": "peak"})
        self._clears = self._clears_family.Metric(labels=mine)
        self._published = (0, 0, 0)
        self.cache = ScoreCache(self.limits.cache_max_bytes, self.limits.cache_ttl_ms)
        self._cache_published = (0, 0, 0, 0, 0)
        if self.cache.on:
            self._cache_metrics(mine)
        self._metrics: dict[tuple[str, ...], Any] = {}
        self._row_counts = common.Counters(self._rows, {"router": self.name})
        self._shadow_counts = common.Counters(self._shadow, {"router": self.name})
        # which instance answered: only for a request that names the output
        self._by_name = {INSTANCE_OUTPUT: lambda n: common.constant(self.instance, n)}
        self.took_effect()
        self.start_watching()

    def _cache_metrics(self, mine: dict[str, str]) -> None:
        """The answer cache's series (families kept: the stub deletes metrics with them)."""
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._answer_families = [
            pb_utils.MetricFamily(
                name=f"setsuna_router_cache_{what}_total", description=text, kind=counter
            )
            for what, text in (
                ("hits", "Rows answered from the answer cache, per instance"),
                ("misses", "Rows looked up in the answer cache and computed, per instance"),
                ("clears", "Times the answer cache was full and dropped, per instance"),
            )
        ]
        self._answer_families.append(
            pb_utils.MetricFamily(
                name="setsuna_router_cache_bytes",
                description="Bytes held by the answer cache, per instance (never above "
                "cache_max_bytes): now and at most",
                kind=gauge,
            )
        )
        hits, misses, clears, size = self._answer_families
        self._answer_metrics = (
            hits.Metric(labels=mine),
            misses.Metric(labels=mine),
            clears.Metric(labels=mine),
            size.Metric(labels={**mine, "stat": "now"}),
            size.Metric(labels={**mine, "stat": "peak"}),
        )

    def _loads(self, data: bytes, origin: str) -> experiment.Experiment:
        """An experiment file that can take effect here: valid, calling engines only, loadable."""
        exp = experiment.loads(data, origin)
        cycles.check(self.repo, self.name, experiment.callees(exp), origin)
        classes = signal.arm_classes(self.repo, exp.arms, exp.targets, origin)
        task = signal.arm_task(self.repo, exp.targets, origin)
        columns = self._check_classes(classes, origin, task)
        if self.engines is not None:
            self.engines.prepare(exp.targets)
        for t in exp.targets:
            self.arm_classes[t.label] = (classes, columns)
        return exp

    def _check_classes(
        self, classes: tuple[str, ...], origin: str, task: str = "classification"
    ) -> tuple[int, int, int] | None:
        """Refuse arms this model cannot answer for; the signal's columns for direction arms."""
        width = len(classes) if classes else 1
        if width != self.score_width:
            raise ConfigError(
                f"{origin}: the arms answer {width} score(s) per row "
                f"({list(classes) or 'one probability'}) but {self.name} answers score "
                f"[{self.score_width}]: write a model for them (ensembles.repository.write_router)"
            )
        if not classes:
            if self.thresholds is not None:
                signal.check_pairing(self.thresholds, classes, origin, task)
            return None
        if self.engines is None:
            raise ConfigError(
                f"{origin}: the arms answer class probabilities {list(classes)}; the BLS "
                "router serves one score per row: route them through decide (in_process)"
            )
        if self.limits.cache_max_bytes > 0 and self.limits.cache_ttl_ms > 0:
            raise ConfigError(
                f"{origin}: the answer cache holds one score per row and the arms answer "
                f"{len(classes)}: set cache_max_bytes to 0 for {self.name}"
            )
        if self.thresholds is None:
            return None
        signal.check_pairing(self.thresholds, classes, origin)
        return signal.direction_columns(classes, origin)

    def _metric(self, family: Any, **labels: str) -> Any:
        key = (str(id(family)), *(f"{k}={v}" for k, v in sorted(labels.items())))
        m = self._metrics.get(key)
        if m is None:
            m = self._metrics[key] = family.Metric(labels={"router": self.name, **labels})
        return m

    def took_effect(self) -> None:
        exp = self.watch.current
        self._metric(self._version, experiment=exp.name, instance=self.instance).set(exp.version)
        self.logger.log_info(f"{self.name} ({self.instance}): {exp.describe()}")

    def tick(self) -> None:
        """The watcher thread: the file, then the memo's and cache's figures when they moved."""
        super().tick()
        k = self.keys
        now = (k.bytes, k.peak, k.clears)
        if now != self._published:
            self._cache_now.set(now[0])
            self._cache_peak.set(now[1])
            if now[2] > self._published[2]:
                self._clears.increment(now[2] - self._published[2])
            self._published = now
        if self.cache.on:
            self._push_cache()

    def _push_cache(self) -> None:
        c = self.cache
        now = (c.hits, c.misses, c.clears, c.bytes, c.peak)
        if now == self._cache_published:
            return
        hits, misses, clears, size, peak = self._answer_metrics
        counts = zip((hits, misses, clears), now[:3], self._cache_published[:3], strict=True)
        for metric, new, old in counts:
            if new > old:
                metric.increment(new - old)
        size.set(now[3])
        peak.set(now[4])
        self._cache_published = now

    def _assign(
        self, exp: experiment.Experiment, request: Any, tensors: dict[str, Any], rows: int
    ) -> I16:
        params = common.request_parameters(request)
        forced = params.get("arm")
        if forced is not None:
            return np.full(rows, exp.arm_index(str(forced)), dtype=np.int16)
        limit = self.limits.max_key_bytes
        key_tensor = tensors.get(KEY_INPUT)
        if key_tensor is not None:
            given = key_tensor.as_numpy().reshape(-1).tolist()
            if len(given) != rows:
                raise InputError(f"input '{KEY_INPUT}' has {len(given)} rows for {rows} features")
            keys.check_lengths(given, limit, f"input '{KEY_INPUT}'")
            return exp.assign(given, self.keys)
        if "key" in params:
            key = str(params["key"]).encode()
            keys.check_lengths([key], limit, "request parameter 'key'")
            return np.full(rows, exp.assign([key], self.keys)[0], dtype=np.int16)
        raise InputError(
            f"no sticky key: send input '{KEY_INPUT}' (one per row) or the request parameter "
            "'key' (a symbol or account), or force an arm with the request parameter 'arm'"
        )

    def _gather(self, requests: list[Any]) -> Batch:
        """Validate and stack the requests; assign every row its arm."""
        self.poll()
        exp = self.watch.current
        b = Batch(exp, [None] * len(requests))
        xs, assigned_arms = [], []
        for i, r in enumerate(requests):
            try:
                tensors = common.inputs(r)
                x = common.features(r, allow_nan=self.allow_nan, tensors=tensors)
                assigned = self._assign(exp, r, tensors, len(x))
            except (SetsunaError, ValueError) as exc:
                # No local may keep `exc`: its traceback holds this frame, and the cycle
                # would keep the refused request's tensors alive until a GC pass.
                b.responses[i] = common.refusal(
                    self.name, exc if isinstance(exc, SetsunaError) else InputError(str(exc))
                )
                continue
            b.kept.append(i)
            xs.append(x)
            assigned_arms.append(assigned)
        if not b.kept:
            return b
        b.sizes = [len(v) for v in xs]
        b.x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        b.arm = assigned_arms[0] if len(assigned_arms) == 1 else np.concatenate(assigned_arms)
        lo, hi = int(b.arm.min()), int(b.arm.max())
        b.used = [lo] if lo == hi else [int(a) for a in np.unique(b.arm)]
        b.rows_of = {a: np.flatnonzero(b.arm == a) for a in b.used}
        b.score = np.empty((len(b.x), self.score_width), dtype=np.float32)
        b.timeout = common.timeout_of([requests[i] for i in b.kept], self.limits)
        if self.cache.on:
            self._from_cache(b)
        else:
            b.todo = b.rows_of
        return b

    def _from_cache(self, b: Batch) -> None:
        """Fill in the rows the cache holds; leave the others (and their keys) to compute."""
        rows = row_keys(b.x)
        for a in b.used:
            where = b.rows_of[a]
            row_bytes = rows.tolist() if len(b.used) == 1 else rows[where].tolist()
            hit, scores = self.cache.lookup(b.exp, b.exp.targets[a].label, row_bytes)
            if not len(scores):
                b.todo[a], b.todo_keys[a] = where, row_bytes
                continue
            b.score[where[hit]] = scores.reshape(-1, 1)
            if len(scores) < len(row_bytes):
                miss = ~hit
                b.todo[a], b.todo_keys[a] = where[miss], list(compress(row_bytes, miss))

    def _to_cache(self, b: Batch) -> None:
        """Remember what the arms computed for this batch (an arm that failed: nothing)."""
        for a, row_bytes in b.todo_keys.items():
            if a not in b.failed:
                self.cache.store(b.exp, b.exp.targets[a].label, row_bytes, b.score[b.todo[a]])

    def score_in_process(self, b: Batch) -> None:
        """Run each arm's rows through its in-process engine."""
        assert self.engines is not None
        for a, rows in b.todo.items():
            try:
                b.score[rows] = self.engines.predict(b.exp.targets[a], b.part(a))
            except Exception as exc:  # an engine failure fails its rows, visibly
                label = b.exp.targets[a].label
                b.failed[a] = f"{self.name}: arm {b.exp.arms[a]!r}: {label}: {exc}"

    def _finish(self, b: Batch, requests: list[Any], shadow_answer: Any) -> list[Any]:
        """Count, record the shadow, apply the signal if any, and answer each request."""
        exp, x, arm = b.exp, b.x, b.arm
        if shadow_answer is not None:
            self._record_shadow(b, shadow_answer, requests)
        for a in b.used:
            if a not in b.failed:
                target = exp.targets[a]
                self._row_counts.add(len(b.rows_of[a]), arm=exp.arms[a], model=target.label)
        outputs: dict[str, Any] = {
            OUTPUT_NAME: b.score,
            ARM: common.labels(exp.arms, arm),
            MODEL: common.labels(tuple(t.label for t in exp.targets), arm),
            EXPERIMENT_VERSION: np.full((len(x), 1), exp.version, dtype=np.int32),
        }
        failed = np.zeros(len(x), dtype=bool)
        for a in b.failed:  # the rows an arm failed to compute: their requests fail
            failed[b.todo[a]] = True
        if self.thresholds is not None:
            ok = ~failed  # failed rows get no decision
            columns = self.arm_classes[exp.targets[b.used[0]].label][1]
            try:
                c, f = signal.apply(
                    b.score if not b.failed else b.score[ok], self.thresholds, columns
                )
            except SetsunaError as exc:  # an arm answered outside [0, 1]: fail, never trade
                return [r or common.failure(f"{self.name}: {exc}") for r in b.responses]
            if b.failed:
                code = np.zeros((len(x), 1), dtype=np.int8)
                conf = np.zeros((len(x), 1), dtype=np.float32)
                code[ok, 0], conf[ok, 0] = c, f
            else:
                code, conf = c.reshape(-1, 1), f.reshape(-1, 1)
            outputs.update(
                {SIGNAL: code, CONFIDENCE: conf, DECIDED_BY: common.constant(self.label, len(x))}
            )
        if b.todo_keys:  # answers only: after the arms and the signal accepted them
            self._to_cache(b)
        for i, sl in zip(b.kept, common.split(len(x), b.sizes), strict=True):
            if b.failed and failed[sl].any():
                first = int(np.flatnonzero(failed[sl])[0])
                b.responses[i] = common.failure(b.failed[int(arm[sl][first])])
                continue
            b.responses[i] = common.answer(requests[i], outputs, sl, by_name=self._by_name)
        return b.responses

    def _record_shadow(self, b: Batch, answer: Any, requests: list[Any]) -> None:
        exp, arm = b.exp, b.arm
        assert exp.shadow is not None
        record: dict[str, Any] = {
            "t_ns": time.time_ns(),
            "router": self.name,
            "experiment": exp.name,
            "experiment_version": exp.version,
            "shadow": exp.shadow.label,
            "request_ids": [requests[i].request_id() for i in b.kept],
            "arms": [exp.arms[a] for a in arm.tolist()],
            "models": {exp.arms[a]: exp.targets[a].label for a in b.used},
            "primary": b.score.reshape(-1).tolist(),
            "latency_us": {"primary": round(b.primary_us, 1), "shadow": round(b.shadow_us, 1)},
        }
        try:
            record["score"] = common.bls_score(answer, exp.shadow, len(arm)).reshape(-1).tolist()
            outcome = "ok"
        except common.DownstreamError as exc:
            record["error"] = str(exc)
            outcome = "error"
        self._shadow_counts.add(len(arm), model=exp.shadow.label, outcome=outcome)
        if self.shadow_log is not None:
            try:
                self.shadow_log.write(record)
            except OSError as exc:  # a full disk loses shadow lines, never answers
                self._shadow_counts.add(len(arm), model=exp.shadow.label, outcome="unlogged")
                self.logger.log_error(f"{self.name}: shadow log {self.shadow_log.path}: {exc}")

    def finalize(self) -> None:
        self.stop_watching()
        self.calls.close()
        self._row_counts.flush()
        self._shadow_counts.flush()
        if self.shadow_log is not None:
            self.shadow_log.close()


class TritonPythonModel(RouterBase):
    """The router: one async BLS request per arm, the shadow in flight beside them."""

    async def execute(self, requests: list[Any]) -> list[Any]:
        b = self._gather(requests)
        if not b.kept:
            return b.responses
        exp, x = b.exp, b.x
        shadow = None
        if exp.shadow is not None:  # in flight while the arms run
            shadow = asyncio.ensure_future(self._timed_shadow(b, exp.shadow, x))
        began = time.perf_counter()
        if self.engines is not None:
            self.score_in_process(b)
        elif b.todo:  # one call per arm for its rows the cache did not answer
            answers = await asyncio.gather(
                *(self.calls.call(exp.targets[a], b.part(a), b.timeout) for a in b.todo),
                return_exceptions=True,
            )
            for (a, rows), answer in zip(b.todo.items(), answers, strict=True):
                try:
                    b.score[rows] = common.bls_score(answer, exp.targets[a], len(rows))
                except common.DownstreamError as exc:
                    b.failed[a] = f"{self.name}: arm {exp.arms[a]!r}: {exc}"
        b.primary_us = (time.perf_counter() - began) * 1e6
        shadow_answer: Any = None
        if shadow is not None:
            (shadow_answer,) = await asyncio.gather(shadow, return_exceptions=True)
        return self._finish(b, requests, shadow_answer)

    async def _timed_shadow(self, b: Batch, target: Any, x: Any) -> Any:
        began = time.perf_counter()
        try:
            return await self.calls.call(target, x, b.timeout)
        finally:
            b.shadow_us = (time.perf_counter() - began) * 1e6


def _score_width(args: dict[str, Any]) -> int:
    """The ``score`` output's width in this model's config: 1, or C for multiclass arms."""
    import json

    cfg = json.loads(args.get("model_config", "{}"))
    for out in cfg.get("output", []):
        if out.get("name") == OUTPUT_NAME:
            dims = [int(d) for d in out.get("dims", [1])]
            return dims[-1] if dims else 1
    return 1


__all__ = ["RouterBase", "TritonPythonModel"]
