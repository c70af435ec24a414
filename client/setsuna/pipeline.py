"""The tick-to-signal pipeline: feed -> features -> Client -> policy -> audit -> sinks.

Events that arrive together (every symbol of one bar, a burst of ticks) go
to Triton as one request; a single event goes straight through. Per request
the pipeline makes one feature-engine call, one ``Client.infer`` call, one
policy call and one audit commit: no Python per row on the hot path.

Nothing is passed on unrecorded: :meth:`Pipeline.process` waits until the
request's audit record is committed (:meth:`AuditLog.commit`, bounded by
``commit_timeout_ms``; the writer groups whatever is queued into one
transaction) before it hands the decisions to the sinks or returns them. A
commit that fails means those decisions reach no sink: they are counted as
``audit_failed`` and the run stops.

It refuses to start on a model whose feature schema (names, in order) is
not the feature engine's (:class:`~setsuna.errors.SchemaMismatchError`), read
from the models' manifests in the model repository; the engine that answers
each row (routed models name it per row) is checked the same way the first
time it appears. Rows whose features are not ready yet (warm-up) are skipped
and counted. What happens on a failure:

===================================  =====================================================
failure                              what the pipeline does
===================================  =====================================================
bad or out-of-order event            the engine's policy: raise, or drop and count
deadline / overload after retries    skip that request, counted (a late signal is none)
server refused the tensors           skip that request, counted
``max_consecutive_failed_requests``  stop cleanly: a run that skips everything is no run
skipped requests in a row            (a dead model answers nothing but deadlines)
server gone, model not ready or      stop cleanly, with the reason
dead, any other serving error
audit locked, full or too slow       stop cleanly; the request's decisions reach no sink
===================================  =====================================================

Stage latencies (features, network+Triton, policy, audit commit) and
tick-to-signal (arrival of the events to the signal handed on, the audit
commit included) are kept per request in :class:`LatencyHistogram`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna import manifest as manifest_mod
from setsuna.audit import AuditLog, DecisionBatch
from setsuna.client import Client
from setsuna.contract import EXPERIMENT_FILE, MODEL, SIGNAL, ExperimentDoc, Signal
from setsuna.errors import (
    AuditError,
    ConfigError,
    DeadlineError,
    ModelNotReadyError,
    OverloadedError,
    RejectedInputError,
    SchemaMismatchError,
    ServingError,
    UnavailableError,
)
from setsuna.features import FeatureEngine
from setsuna.market import BarRecords
from setsuna.policy import TradingPolicy
from setsuna.schema import OUTPUT_NAME, FeatureSchema

STAGES = ("features", "infer", "policy", "audit", "tick_to_signal")


class LatencyHistogram:
    """Log-bucketed latencies (2 % wide buckets, 0.1 us to ~100 s); O(1) per record."""

    _GROWTH = 1.02
    _LOW_US = 0.1
    _N = 1400

    def __init__(self) -> None:
        self.counts = np.zeros(self._N, dtype=np.int64)
        self.n = 0
        self.total_us = 0.0
        self.max_us = 0.0
        self._log = math.log(self._GROWTH)

    def record(self, value_us: float) -> None:
        k = int(math.log(max(value_us, self._LOW_US) / self._LOW_US) / self._log)
        self.counts[min(k, self._N - 1)] += 1
        self.n += 1
        self.total_us += value_us
        self.max_us = max(self.max_us, value_us)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (upper edge of its bucket, so within 2 % above), NaN if empty."""
        if not self.n:
            return math.nan
        k = int(np.searchsorted(np.cumsum(self.counts), math.ceil(q * self.n)))
        return min(self._LOW_US * self._GROWTH ** (k + 1), self.max_us)

    @property
    def mean_us(self) -> float:
        return self.total_us / self.n if self.n else math.nan

    def edges_us(self) -> npt.NDArray[np.float64]:
        return self._LOW_US * self._GROWTH ** np.arange(self._N + 1, dtype=np.float64)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ServedModel:
    """One engine version as its manifest describes it."""

    label: str  # name:version
    schema: FeatureSchema
    artifact_sha256: str  # sha256 of manifest.json, which hashes every artifact
    #: A multiclass engine's class labels, in the order of its score columns; () otherwise.
    classes: tuple[str, ...] = ()


class ModelCatalog:
    """Manifests of a model repository, read on first use: schemas and artifact hashes."""

    def __init__(self, repository: str | Path) -> None:
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise ConfigError(f"model repository {self.repository} is not a directory")
        self._seen: dict[str, ServedModel] = {}

    def get(self, label: str) -> ServedModel:
        """``name:version`` (or ``name``: its highest version) from its manifest."""
        if label in self._seen:
            return self._seen[label]
        name, _, version = label.partition(":")
        folder = self.repository / name
        if not version:
            versions = sorted(int(p.name) for p in folder.glob("[0-9]*") if p.is_dir())
            if not versions:
                raise ConfigError(f"{folder} has no version folder; is {name!r} built?")
            version = str(versions[-1])
        path = folder / version
        m = manifest_mod.read(path)
        digest = hashlib.sha256((path / manifest_mod.MANIFEST_NAME).read_bytes()).hexdigest()
        served = ServedModel(f"{name}:{version}", m.schema, digest, tuple(m.classes))
        self._seen[label] = self._seen[served.label] = served
        return served

    def behind(self, endpoint: str) -> list[ServedModel]:
        """The engines an endpoint can answer with: itself, or the arms of its experiment."""
        folder = self.repository / endpoint
        experiment = folder / EXPERIMENT_FILE
        if experiment.is_file():
            try:
                text = experiment.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{experiment}: unreadable experiment ({exc})") from exc
            doc = ExperimentDoc.loads(text, origin=str(experiment))
            return [self.get(t.label) for t in doc.arms.values()]
        return [self.get(endpoint)]


def check_schema(names: Sequence[str], schema: FeatureSchema, label: str) -> None:
    """Raise SchemaMismatchError unless ``schema`` is exactly ``names``, in order."""
    if tuple(names) == tuple(schema.names) and schema.row_shape == (len(names),):
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(names, schema.names, strict=False)) if a != b),
        min(len(names), len(schema.names)),
    )
    raise SchemaMismatchError(
        f"{label} was trained on {len(schema.names)} features {list(schema.names[:4])}... "
        f"but the pipeline computes {len(names)} {list(names[:4])}...; they first differ at "
        f"position {first}. Serve a model built on this feature spec (setsuna dataset), "
        "or compute the model's features"
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Decisions:
    """What one request decided, handed to the sinks (arrays are the pipeline's copies)."""

    event_ns: npt.NDArray[np.int64]
    symbol_ids: npt.NDArray[np.int64]
    #: ``[n]``, or ``[n, C]`` for a multiclass model (its probabilities, in class order).
    score: npt.NDArray[np.float32] | None
    signal: npt.NDArray[np.int8]
    served_by: npt.NDArray[np.object_]
    request_id: str
    #: Each row's symbol stance after its signal (what following the signals holds).
    stance: npt.NDArray[np.int8]


Sink = Callable[[Decisions], None]


@dataclass
class RunSummary:
    """Counts, timings and why a run stopped (``stopped`` is None when it finished)."""

    events: int = 0
    requests: int = 0
    decisions: int = 0
    signals: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((s.name for s in reversed(Signal)), 0)
    )
    skipped: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None
    wall_s: float = 0.0
    latency: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {s: LatencyHistogram() for s in STAGES}
    )

    def skip(self, reason: str, n: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.wall_s if self.wall_s > 0 else math.nan

    def latency_table(self) -> dict[str, tuple[float, float]]:
        return {s: (h.quantile(0.5), h.quantile(0.99)) for s, h in self.latency.items()}


@dataclass(frozen=True)
class PipelineSettings:
    """How the pipeline calls the model; validated once.

    ``max_consecutive_failed_requests`` (default 50) stops the run after
    that many requests in a row were skipped for a deadline, an overload or
    a refused input: a model whose backend died can stay READY and answer
    every request with a timeout, and a run that skips everything must end
    loudly instead of reporting success. At the default 50 ms deadline, 50
    requests are ~2.5 s of nothing.
    """

    model: str
    deadline_ms: float = 50.0
    max_batch_rows: int = 1024
    #: Send each row's symbol as the sticky A/B key (only to models that take one).
    key_by_symbol: bool = True
    max_consecutive_failed_requests: int = 50

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("PipelineSettings.model: name the model to call")
        if not self.deadline_ms > 0:
            raise ConfigError(f"deadline_ms={self.deadline_ms}: give a positive budget")
        if self.max_batch_rows < 1:
            raise ConfigError(f"max_batch_rows={self.max_batch_rows}: give >= 1")
        if self.max_consecutive_failed_requests < 1:
            raise ConfigError(
                f"max_consecutive_failed_requests={self.max_consecutive_failed_requests}: "
                "give >= 1 requests (default 50)"
            )


class Stop(Exception):
    """Internal: end the run cleanly with a reason."""


class Pipeline:
    """Feature engine + client + policy + audit for one model endpoint (see the module)."""

    def __init__(
        self,
        engine: FeatureEngine,
        client: Client,
        policy: TradingPolicy,
        settings: PipelineSettings,
        *,
        audit: AuditLog | None = None,
        catalog: ModelCatalog | None = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.engine, self.client, self.policy, self.settings = engine, client, policy, settings
        self.audit, self.catalog, self.sinks = audit, catalog, tuple(sinks)
        self.summary = RunSummary()
        self._failed_in_a_row = 0
        info = client.model_info(settings.model)
        if info.feature_dims != (engine.n_features,):
            raise SchemaMismatchError(
                f"{settings.model} takes features of shape {list(info.feature_dims)}; the "
                f"pipeline computes {engine.n_features} ({', '.join(engine.names[:4])}, ...)"
            )
        missing = [o for o in policy.needs if o not in info.outputs]
        if missing:
            raise ConfigError(
                f"the policy needs output(s) {missing} that {settings.model} does not have "
                f"({list(info.outputs)}); use ThresholdPolicy for a plain model"
            )
        self._outputs = tuple(
            dict.fromkeys(
                (*policy.needs, *(o for o in (OUTPUT_NAME, SIGNAL, MODEL) if o in info.outputs))
            )
        )
        self._keyed = settings.key_by_symbol and info.has_key
        self._keys = np.array([s.encode() for s in engine.symbols], dtype=object)
        self._symbols = np.array(engine.symbols, dtype=object)
        self._artifacts: dict[str, str] = {}
        if catalog is not None:
            for served in catalog.behind(settings.model):
                check_schema(engine.names, served.schema, served.label)
                _check_classes(policy, served)
                self._artifacts[served.label] = served.artifact_sha256

    # -- one request ------------------------------------------------------------------

    def process(self, events: BarRecords, arrived_ns: int | None = None) -> Decisions | None:
        """Decide on events that arrived together; None when no row was ready to send."""
        t0 = time.perf_counter_ns() if arrived_ns is None else arrived_ns
        s = self.summary
        s.events += len(events)
        rows = self.engine.update(events)
        ready = rows.ready.all(axis=1)
        n_ready = int(np.count_nonzero(ready))
        if n_ready < len(events):
            s.skip("warming_up", len(events) - n_ready)
            if not n_ready:
                return None
            x = rows.values[ready]
            ids = events["symbol_id"][ready].astype(np.int64)
            ts = events["timestamp_ns"][ready].astype(np.int64)
        else:
            x = rows.values.copy()
            ids = events["symbol_id"].astype(np.int64)
            ts = events["timestamp_ns"].astype(np.int64)
        t1 = time.perf_counter_ns()
        try:
            pred = self.client.infer(
                self.settings.model,
                x,
                self._keys[ids] if self._keyed else None,
                deadline_ms=self.settings.deadline_ms,
                outputs=self._outputs,
            )
        except (DeadlineError, OverloadedError, RejectedInputError) as exc:
            self._failed(exc, len(x))
            return None
        except ServingError as exc:
            s.skip(_stop_reason(exc), len(x))
            raise Stop(f"{type(exc).__name__}: {exc}") from exc
        self._failed_in_a_row = 0
        t2 = time.perf_counter_ns()
        served_by = pred.served_by
        artifacts = self._artifacts_of(served_by)
        signals = self.policy.decide(pred.outputs, ids, ts)
        t3 = time.perf_counter_ns()
        score = pred.outputs.get(OUTPUT_NAME)
        # One score per row, or a multiclass model's [n, C] probabilities (kept whole).
        score_1d = None if score is None else _scores(score, len(x))
        served_signal = pred.outputs.get(SIGNAL)
        lat = [(t1 - t0) / 1e3, (t2 - t1) / 1e3, (t3 - t2) / 1e3]
        if self.audit is not None:
            # The row's audit and total stop at the record: it cannot hold its own commit.
            t_rec = time.perf_counter_ns()
            batch = DecisionBatch(
                request_id=pred.request_id,
                endpoint=self.settings.model,
                event_ns=ts,
                symbols=self._symbols[ids],
                served_by=served_by,
                artifacts=artifacts,
                features=x,
                score=score_1d,
                served_signal=None if served_signal is None else served_signal.reshape(-1),
                signal=signals,
                latencies_us=[*lat, (t_rec - t3) / 1e3, (t_rec - t0) / 1e3],
            )
            try:
                self.audit.commit(batch)  # durable before anything is passed on
            except AuditError as exc:
                s.skip("audit_failed", len(x))
                raise Stop(f"{type(exc).__name__}: {exc}") from exc
        t4 = time.perf_counter_ns()
        lat += [(t4 - t3) / 1e3, (t4 - t0) / 1e3]
        for name, value in zip(STAGES, lat, strict=True):
            s.latency[name].record(value)
        s.requests += 1
        s.decisions += len(x)
        counts = np.bincount(signals.astype(np.int64) - Signal.SELL, minlength=len(Signal))
        for code in Signal:
            s.signals[code.name] += int(counts[code - Signal.SELL])
        stance = self.policy.stance[ids]
        out = Decisions(ts, ids, score_1d, signals, served_by, pred.request_id, stance)
        for sink in self.sinks:
            sink(out)
        return out

    def _failed(self, exc: ServingError, rows: int) -> None:
        """Count a skipped request; stop once too many failed in a row."""
        reason = {DeadlineError: "deadline", OverloadedError: "overloaded"}.get(
            type(exc), "rejected"
        )
        self.summary.skip(reason, rows)
        self._failed_in_a_row += 1
        limit = self.settings.max_consecutive_failed_requests
        if self._failed_in_a_row >= limit:
            raise Stop(
                f"{limit} requests in a row failed (last: {type(exc).__name__}: {exc}); "
                f"{self.settings.model} answers nothing. Check that the model is alive (a "
                "killed backend stub stays READY), or raise deadline_ms / "
                "max_consecutive_failed_requests"
            ) from exc

    def _artifacts_of(self, served_by: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
        """Artifact hash per row; an engine seen for the first time is schema-checked."""
        first = served_by[0]
        if len(served_by) == 1 or (served_by == first).all():
            return np.full(len(served_by), self._artifact(str(first)), dtype=object)
        return np.array([self._artifact(str(v)) for v in served_by], dtype=object)

    def _artifact(self, label: str) -> str:
        known = self._artifacts.get(label)
        if known is not None:
            return known
        if self.catalog is None:
            self._artifacts[label] = ""
            return ""
        served = self.catalog.get(label)
        try:
            check_schema(self.engine.names, served.schema, label)
        except SchemaMismatchError as exc:
            raise Stop(f"SchemaMismatchError: {exc}") from exc
        try:
            _check_classes(self.policy, served)
        except ConfigError as exc:
            raise Stop(f"ConfigError: {exc}") from exc
        self._artifacts[label] = served.artifact_sha256
        return served.artifact_sha256

    # -- a whole feed -----------------------------------------------------------------

    def run(
        self,
        records: BarRecords,
        *,
        progress: Callable[[int, int], None] | None = None,
        progress_every: int = 200,
    ) -> RunSummary:
        """Replay ``records`` (replay order): rows sharing a timestamp form one request."""
        began = time.perf_counter()
        done = 0
        try:
            for k, group in enumerate(self.groups(records)):
                self.process(group)
                done += len(group)
                if progress is not None and k % progress_every == 0:
                    progress(done, len(records))
        except Stop as stop:
            self.summary.stopped = str(stop)
        finally:
            self.summary.wall_s = time.perf_counter() - began
            if progress is not None:
                progress(done, len(records))
        return self.summary

    def groups(self, records: BarRecords) -> Iterator[BarRecords]:
        """Consecutive rows with one timestamp, at most ``max_batch_rows`` each."""
        ts = records["timestamp_ns"]
        cuts = np.flatnonzero(ts[1:] != ts[:-1]) + 1
        bounds = np.r_[0, cuts, len(records)]
        cap = self.settings.max_batch_rows
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            for start in range(a, b, cap):
                yield records[start : min(b, start + cap)]


def _scores(score: npt.NDArray[Any], rows: int) -> npt.NDArray[np.float32]:
    """``[n]`` for one score per row, ``[n, C]`` for class probabilities."""
    s = np.asarray(score).astype(np.float32, copy=False).reshape(rows, -1)
    return s.reshape(-1) if s.shape[1] == 1 else s


def _check_classes(policy: TradingPolicy, served: ServedModel) -> None:
    """A policy that reads class columns must see the classes it was built for."""
    check = getattr(policy, "check_model", None)
    if check is not None:
        check(served.classes, served.label)


def _stop_reason(exc: ServingError) -> str:
    """The skip counter of a serving error that ends the run."""
    if isinstance(exc, UnavailableError):
        return "server_gone"
    if isinstance(exc, ModelNotReadyError):
        return "model_not_ready"
    return "serving_error"


def summary_json(summary: RunSummary) -> dict[str, Any]:
    """The summary as plain JSON (latencies in microseconds)."""
    return {
        "events": summary.events,
        "requests": summary.requests,
        "decisions": summary.decisions,
        "signals": summary.signals,
        "skipped": summary.skipped,
        "stopped": summary.stopped,
        "wall_s": summary.wall_s,
        "decisions_per_s": summary.decisions_per_s,
        "latency_us": {
            k: {"p50": p50, "p99": p99} for k, (p50, p99) in summary.latency_table().items()
        },
    }


def histogram_counts(h: LatencyHistogram) -> Mapping[str, Any]:
    """Non-empty buckets of a histogram: lower edges (us) and counts, for plots."""
    nz = np.flatnonzero(h.counts)
    return {"edges_us": h.edges_us()[nz].tolist(), "counts": h.counts[nz].tolist()}
