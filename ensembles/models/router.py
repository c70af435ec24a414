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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from ensembles import experiment, signal
from ensembles.models import common
from ensembles.watch import Watched
from setsuna import manifest, runtime
from setsuna.errors import ConfigError, InputError, SetsunaError
from setsuna.schema import OUTPUT_NAME

KEY_INPUT = "key"
I16 = npt.NDArray[np.int16]


class InProcessArms:
    """Engines of the arms, loaded in this process from ``repo/<model>/<version>/``.

    Each version folder is verified against its manifest first, exactly as the
    model's own Triton wrapper does, so a tampered engine is refused here too.
    """

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.engines: dict[str, runtime.Engine] = {}

    def prepare(self, targets: tuple[experiment.Target, ...]) -> None:
        """Load every target not loaded yet; all or nothing."""
        fresh = {}
        for t in targets:
            if t.label in self.engines or t.label in fresh:
                continue
            folder = self.repo / t.model / str(t.version)
            m = manifest.verify(folder)
            fresh[t.label] = runtime.load(m.engine, folder, m.engine_params)
        self.engines.update(fresh)

    def predict(self, target: experiment.Target, x: npt.NDArray[np.float32]) -> Any:
        return self.engines[target.label].predict(x)


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


class RouterBase:
    """Everything but how the arms are called (BLS here, in-process in ``decide``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        params = common.model_parameters(args)
        if not params.get("experiment_file"):
            raise ConfigError(f"{self.name}: config parameter 'experiment_file' is required")
        self.watch = Watched(common.config_path(args, params["experiment_file"]), experiment.load)
        self.allow_nan = params.get("allow_nan", "false").lower() == "true"
        folder = Path(args["model_repository"]) / args["model_version"]
        self.label = f"{self.name}:{args['model_version']}"
        thresholds = folder / signal.THRESHOLDS_FILE
        self.thresholds = signal.load_thresholds(thresholds) if thresholds.is_file() else None
        # in_process: arms run in this process, loaded from their verified version
        # folders in the same repository: one hop instead of a BLS round trip each.
        self.arms: InProcessArms | None = None
        if params.get("in_process", "false").lower() == "true":
            self.arms = InProcessArms(Path(args["model_repository"]).parent)
            self.arms.prepare(self.watch.current.targets)
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
        self._row_counts = common.Counters(self._rows, {"router": self.name})
        self._shadow_counts = common.Counters(self._shadow, {"router": self.name})
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
            if self.arms is not None:
                try:
                    self.arms.prepare(self.watch.current.targets)
                except SetsunaError as exc:  # an arm that cannot load: keep the old file
                    self.watch.rollback(f"{exc} (still serving the previous file)")
            if not self.watch.last_error:
                self._took_effect()
        if self.watch.last_error:
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

    def _gather(self, requests: list[Any]) -> Batch:
        """Validate and stack the requests; assign every row its arm."""
        self._poll()
        exp = self.watch.current
        b = Batch(exp, [None] * len(requests))
        xs, arms = [], []
        for i, r in enumerate(requests):
            try:
                x = common.features(r, allow_nan=self.allow_nan)
                assigned = self._arms(exp, r, len(x))
            except (SetsunaError, ValueError) as exc:
                err = exc if isinstance(exc, SetsunaError) else InputError(str(exc))
                b.responses[i] = common.refusal(self.name, err)
                continue
            b.kept.append(i)
            xs.append(x)
            arms.append(assigned)
        if not b.kept:
            return b
        b.sizes = [len(v) for v in xs]
        b.x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        b.arm = arms[0] if len(arms) == 1 else np.concatenate(arms)
        lo, hi = int(b.arm.min()), int(b.arm.max())
        b.used = [lo] if lo == hi else [int(a) for a in np.unique(b.arm)]
        b.rows_of = {a: np.flatnonzero(b.arm == a) for a in b.used}
        b.score = np.empty((len(b.x), 1), dtype=np.float32)
        return b

    def score_in_process(self, b: Batch) -> None:
        """Run each arm's rows through its in-process engine."""
        assert self.arms is not None
        for a in b.used:
            part = b.x if len(b.used) == 1 else b.x[b.rows_of[a]]
            try:
                b.score[b.rows_of[a]] = self.arms.predict(b.exp.targets[a], part)
            except Exception as exc:  # an engine failure fails its rows, visibly
                label = b.exp.targets[a].label
                b.failed[a] = f"{self.name}: arm {b.exp.arms[a]!r}: {label}: {exc}"

    def _finish(self, b: Batch, requests: list[Any], shadow_answer: Any) -> list[Any]:
        """Count, record the shadow, apply the signal if any, and answer each request."""
        exp, x, arm = b.exp, b.x, b.arm
        if shadow_answer is not None:
            self._record_shadow(exp, arm, b.score, shadow_answer, requests, b.kept)
        for a in b.used:
            if a not in b.failed:
                target = exp.targets[a]
                self._row_counts.add(len(b.rows_of[a]), arm=exp.arms[a], model=target.label)
        outputs: dict[str, Any] = {
            OUTPUT_NAME: b.score,
            "arm": common.labels(exp.arms, arm),
            "model": common.labels(tuple(t.label for t in exp.targets), arm),
            "experiment_version": np.full((len(x), 1), exp.version, dtype=np.int32),
        }
        if self.thresholds is not None:
            ok = np.ones(len(x), dtype=bool)
            for a in b.failed:  # failed rows get no decision (their requests fail)
                ok[b.rows_of[a]] = False
            try:
                c, f = signal.decide(b.score if not b.failed else b.score[ok], self.thresholds)
            except SetsunaError as exc:  # an arm answered outside [0, 1]: fail, never trade
                return [r or common.failure(f"{self.name}: {exc}") for r in b.responses]
            if b.failed:
                code = np.zeros((len(x), 1), dtype=np.int8)
                conf = np.zeros((len(x), 1), dtype=np.float32)
                code[ok, 0], conf[ok, 0] = c, f
            else:
                code, conf = c.reshape(-1, 1), f.reshape(-1, 1)
            outputs.update(signal=code, confidence=conf, policy=common.constant(self.label, len(x)))
        for i, sl in zip(b.kept, common.split(len(x), b.sizes), strict=True):
            bad = (
                next((b.failed[a] for a in np.unique(arm[sl]).tolist() if a in b.failed), None)
                if b.failed
                else None
            )
            if bad is not None:
                b.responses[i] = common.failure(bad)
                continue
            # Only what the caller asked for: each output tensor costs a shared-memory
            # allocation and copy in the Python backend (a string one, serialisation too).
            wanted = requests[i].requested_output_names() or outputs
            b.responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, outputs[k][sl]) for k in wanted if k in outputs]
            )
        return b.responses

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
        self._shadow_counts.add(len(arm), model=exp.shadow.label, outcome=outcome)
        if self.shadow_log is not None:
            self.shadow_log.write(json.dumps(record) + "\n")

    def finalize(self) -> None:
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
            shadow = asyncio.ensure_future(common.bls_request(exp.shadow, x).async_exec())
        if self.arms is not None:
            self.score_in_process(b)
        else:
            calls = [
                common.bls_request(exp.targets[a], x if len(b.used) == 1 else x[b.rows_of[a]])
                for a in b.used
            ]
            answers = await asyncio.gather(*(c.async_exec() for c in calls))
            for a, answer in zip(b.used, answers, strict=True):
                try:
                    b.score[b.rows_of[a]] = common.bls_score(
                        answer, exp.targets[a], len(b.rows_of[a])
                    )
                except common.DownstreamError as exc:
                    b.failed[a] = f"{self.name}: arm {exp.arms[a]!r}: {exc}"
        return self._finish(b, requests, None if shadow is None else await shadow)


__all__ = ["RouterBase", "TritonPythonModel"]
