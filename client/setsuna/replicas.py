"""Several Triton replicas behind one client: balance, eject, rejoin, fail over, hedge.

:class:`setsuna.client.Client` sends each call through a :class:`ReplicaSet`.
This module holds the decisions that do not depend on a protocol or on
``asyncio``: which replica takes the next call, which replicas are out, when
an ejected one may come back, how long to wait before a hedge, and the
counters that show what happened. The clients own the stubs and the wire.

- **Balance**: the replica with the fewest calls this client has outstanding
  on it; ties go round-robin, so a sequential caller (always 0 outstanding)
  spreads its calls evenly instead of piling them on replica 0.
- **Eject**: a replica whose call failed for a reason that is the replica's,
  not the request's (it cannot be reached, its model is not ready or its
  backend died) stops taking calls. The call fails over to another replica
  inside the caller's deadline; only errors where the request did not run are
  sent again (:func:`fails_over`), never a refused input or a spent deadline.
- **Rejoin**: a background thread probes each ejected replica every
  ``reprobe_interval_ms`` with a fresh connection (readiness of the server and
  of every model this client has called); a restarted replica takes calls
  again without anyone touching the client. Its ``generation`` grows so the
  clients drop the stub whose channel may still sit in gRPC's reconnect
  backoff (up to 120 s by default) and open a new one.
- **Hedge** (``hedge_quantile`` > 0): when the first replica has not answered
  within that quantile of the model's recent answer times, the client sends a
  copy to another replica, takes the first answer and cancels the other. The
  window holds how long *answers* took from their own send; a copy that was
  cancelled never enters it, so a slow replica cannot drag the hedge delay up
  to its own speed once hedging wins.

One replica is the plain ``Client("host:port")``: the set always picks it,
never ejects it and starts no thread, so its errors and retries are exactly
those of a single-server client.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from setsuna.errors import (
    ConfigError,
    ModelLoadingError,
    ModelNotReadyError,
    ServingError,
    UnavailableError,
)

#: Ready-check of one endpoint with a fresh connection: (endpoint, models) -> ready.
Probe = Callable[[str, tuple[str, ...]], bool]


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is ``host:port`` without a scheme; ConfigError naming the fix."""
    if not endpoint or "://" in endpoint:
        raise ConfigError(f"url={endpoint!r}: give host:port without a scheme, e.g. 127.0.0.1:8001")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"url={endpoint!r}: give host:port with a port 1-65535")
    return endpoint


@dataclass(frozen=True)
class ReplicaSettings:
    """Where the replicas are and how the client spreads, ejects and hedges; checked once.

    ``reprobe_interval_ms``: how often an ejected replica is probed for
    readiness (``probe_timeout_ms`` bounds one probe). ``hedge_quantile``: 0
    turns hedging off; q in (0, 1) sends a second copy when the first has not
    answered within the q-quantile of the model's last ``latency_window``
    answer times, but never sooner than ``hedge_min_delay_ms`` and not before
    ``hedge_min_samples`` answers were seen. q must sit above the share of
    slow answers you want to hide (1 slow replica in 3: q <= 0.6). gRPC only:
    tritonclient's HTTP client cannot cancel a request it sent.
    """

    endpoints: tuple[str, ...]
    reprobe_interval_ms: float = 250.0
    probe_timeout_ms: float = 500.0
    hedge_quantile: float = 0.0
    hedge_min_delay_ms: float = 0.5
    hedge_min_samples: int = 20
    latency_window: int = 256

    def __post_init__(self) -> None:
        given: object = self.endpoints
        if isinstance(given, str):
            raise ConfigError("endpoints: give a sequence of host:port strings, not one string")
        object.__setattr__(self, "endpoints", tuple(check_endpoint(e) for e in self.endpoints))
        if not self.endpoints:
            raise ConfigError("endpoints=(): give at least one host:port")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ConfigError(f"endpoints={list(self.endpoints)}: each replica once")
        if not self.reprobe_interval_ms > 0:
            raise ConfigError(f"reprobe_interval_ms={self.reprobe_interval_ms}: give > 0")
        if not self.probe_timeout_ms > 0:
            raise ConfigError(f"probe_timeout_ms={self.probe_timeout_ms}: give > 0")
        if not 0 <= self.hedge_quantile < 1:
            raise ConfigError(
                f"hedge_quantile={self.hedge_quantile}: give 0 (no hedging) or a quantile "
                "in (0, 1), e.g. 0.95"
            )
        if not self.hedge_min_delay_ms >= 0:
            raise ConfigError(f"hedge_min_delay_ms={self.hedge_min_delay_ms}: give >= 0")
        if not 1 <= self.hedge_min_samples <= self.latency_window:
            raise ConfigError(
                f"hedge_min_samples={self.hedge_min_samples}: give 1..latency_window "
                f"({self.latency_window})"
            )
        if not 2 <= self.latency_window <= 1_000_000:
            raise ConfigError(f"latency_window={self.latency_window}: give 2..1,000,000")

    @property
    def hedging(self) -> bool:
        return self.hedge_quantile > 0 and len(self.endpoints) > 1


def replica_settings(target: str | Sequence[str] | ReplicaSettings) -> ReplicaSettings:
    """What a client was given (one url, several, or settings) as :class:`ReplicaSettings`."""
    if isinstance(target, ReplicaSettings):
        return target
    if isinstance(target, str):
        return ReplicaSettings((target,))
    return ReplicaSettings(tuple(target))


def fails_over(err: ServingError, replicas: int) -> bool:
    """True when ``err`` says the request did not run and another replica may answer it.

    Retryable errors (unreachable, overloaded, a model being loaded) always;
    a model that is not ready (or whose backend died) only when there is
    another replica: on the same server it stays not ready.
    """
    if err.retryable:
        return True
    return replicas > 1 and isinstance(err, ModelNotReadyError)


def ejects(err: ServingError) -> bool:
    """True when ``err`` is the replica's fault (not load, not the request): take it out."""
    return isinstance(err, UnavailableError) or (
        isinstance(err, ModelNotReadyError) and not isinstance(err, ModelLoadingError)
    )


class LatencyWindow:
    """The last ``size`` answer times of one model, and a cached quantile of them.

    The quantile is recomputed every ``size // 16`` answers (at least 1), not per
    call: ``np.quantile`` over 256 floats costs ~20 us, a lookup nothing.
    """

    def __init__(self, size: int, quantile: float) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._q = quantile
        self._every = max(1, size // 16)
        self._since = 0
        self._cached: float | None = None

    def __len__(self) -> int:
        return len(self._values)

    def record(self, ms: float) -> None:
        self._values.append(ms)
        self._since += 1

    def quantile_ms(self) -> float:
        if self._cached is None or self._since >= self._every:
            self._cached = float(np.quantile(np.fromiter(self._values, float), self._q))
            self._since = 0
        return self._cached


@dataclass(frozen=True)
class ReplicaStats:
    """A snapshot of one client's replica counters (see :meth:`ReplicaSet.snapshot`).

    ``calls``: requests sent to each endpoint (hedge copies and failovers
    included). ``failovers``: sends moved to another replica after a failure;
    ``retries``: sends repeated after a backoff (every replica tried, or one
    replica); ``hedges_sent`` / ``hedges_won``: second copies, and how many
    of them answered first; ``ejections`` / ``rejoins``: replicas taken out
    and brought back by the prober.
    """

    calls: dict[str, int]
    healthy: dict[str, bool]
    outstanding: dict[str, int]
    failovers: int
    retries: int
    hedges_sent: int
    hedges_won: int
    ejections: int
    rejoins: int
    hedge_delay_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Replica:
    endpoint: str
    healthy: bool = True
    outstanding: int = 0
    calls: int = 0
    #: Grows at every rejoin: a client whose stub is older opens a fresh one.
    generation: int = 0


class ReplicaSet:
    """Balancing, health and hedge timing for one client's replicas (see the module)."""

    def __init__(self, settings: ReplicaSettings, probe: Probe) -> None:
        self.settings = settings
        self._probe = probe
        self._replicas = [_Replica(e) for e in settings.endpoints]
        self._lock = threading.Lock()
        self._cursor = itertools.count()
        self._windows: dict[str, LatencyWindow] = {}
        self._models: dict[str, None] = {}  # called models, in order: what a probe checks
        self.failovers = self.retries = self.hedges_sent = self.hedges_won = 0
        self.ejections = self.rejoins = 0
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.settings.endpoints

    def endpoint(self, i: int) -> str:
        return self._replicas[i].endpoint

    def generation(self, i: int) -> int:
        return self._replicas[i].generation

    # -- routing ----------------------------------------------------------------------

    def pick(self, exclude: Iterable[int] = (), *, healthy_only: bool = False) -> int | None:
        """The replica for the next send: fewest outstanding, ties round-robin.

        ``exclude``: replicas this call already tried. Falls back to a tried
        healthy replica, then to an ejected one (its error then tells the
        caller what is wrong) unless ``healthy_only`` (a hedge goes to a
        healthy, untried replica or nowhere).
        """
        reps = self._replicas
        if len(reps) == 1:
            return None if healthy_only else 0
        skip = set(exclude)
        with self._lock:
            turn = next(self._cursor)
            pools: list[list[int]] = [
                [i for i, r in enumerate(reps) if r.healthy and i not in skip]
            ]
            if not healthy_only:
                pools.append([i for i, r in enumerate(reps) if r.healthy])
                pools.append([i for i, r in enumerate(reps) if i not in skip])
                pools.append(list(range(len(reps))))
            for pool in pools:
                if pool:
                    least = min(reps[i].outstanding for i in pool)
                    tied = [i for i in pool if reps[i].outstanding == least]
                    return tied[turn % len(tied)]
        return None

    def begin(self, i: int, model: str) -> None:
        """A send to replica ``i`` starts: count it outstanding and called."""
        with self._lock:
            r = self._replicas[i]
            r.outstanding += 1
            r.calls += 1
            if model not in self._models:
                self._models[model] = None

    def end(self, i: int) -> None:
        with self._lock:
            self._replicas[i].outstanding -= 1

    def count(self, what: str) -> None:
        """Add one to ``failovers``, ``retries``, ``hedges_sent`` or ``hedges_won``."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    # -- health -----------------------------------------------------------------------

    def failed(self, i: int, err: ServingError) -> None:
        """Replica ``i`` answered ``err``: eject it when that is its fault (never the last one)."""
        if len(self._replicas) == 1 or not ejects(err):
            return
        with self._lock:
            r = self._replicas[i]
            if not r.healthy:
                return
            r.healthy = False
            self.ejections += 1
            start = self._prober is None and not self._stop.is_set()
            if start:
                self._prober = threading.Thread(
                    target=self._reprobe, name="setsuna-replica-prober", daemon=True
                )
        if start and self._prober is not None:
            self._prober.start()

    def _reprobe(self) -> None:
        """Probe ejected replicas every ``reprobe_interval_ms`` until the set is closed."""
        interval_s = self.settings.reprobe_interval_ms / 1e3
        while not self._stop.wait(interval_s):
            with self._lock:
                out = [i for i, r in enumerate(self._replicas) if not r.healthy]
                models = tuple(self._models)
            for i in out:
                if self._stop.is_set():
                    return
                try:
                    ok = self._probe(self._replicas[i].endpoint, models)
                except Exception:  # a probe that raises is a replica not ready
                    ok = False
                if ok:
                    with self._lock:
                        r = self._replicas[i]
                        r.healthy = True
                        r.generation += 1
                        self.rejoins += 1

    # -- hedging ----------------------------------------------------------------------

    def _window(self, model: str) -> LatencyWindow:
        w = self._windows.get(model)
        if w is None:
            s = self.settings
            w = self._windows.setdefault(
                model, LatencyWindow(s.latency_window, s.hedge_quantile or 0.5)
            )
        return w

    def answered(self, model: str, ms: float) -> None:
        """Record how long an answer took from its own send (hedging's evidence)."""
        if self.settings.hedging:
            with self._lock:
                self._window(model).record(ms)

    def hedge_delay_s(self, model: str, left_s: float) -> float | None:
        """Seconds to wait before sending a hedge copy, or None for no hedge on this call."""
        s = self.settings
        if not s.hedging:
            return None
        with self._lock:
            w = self._window(model)
            if len(w) < s.hedge_min_samples:
                return None
            delay_s = max(w.quantile_ms(), s.hedge_min_delay_ms) / 1e3
        return delay_s if delay_s < left_s else None

    # -- reporting and lifetime -------------------------------------------------------

    def snapshot(self) -> ReplicaStats:
        """Every counter, copied under the lock: a consistent view."""
        with self._lock:
            reps = self._replicas
            return ReplicaStats(
                calls={r.endpoint: r.calls for r in reps},
                healthy={r.endpoint: r.healthy for r in reps},
                outstanding={r.endpoint: r.outstanding for r in reps},
                failovers=self.failovers,
                retries=self.retries,
                hedges_sent=self.hedges_sent,
                hedges_won=self.hedges_won,
                ejections=self.ejections,
                rejoins=self.rejoins,
                hedge_delay_ms={
                    m: w.quantile_ms()
                    for m, w in self._windows.items()
                    if len(w) >= self.settings.hedge_min_samples
                },
            )

    def close(self) -> None:
        """Stop the prober (it exits within one probe)."""
        self._stop.set()
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=self.settings.probe_timeout_ms / 1e3 * len(self) + 1.0)
