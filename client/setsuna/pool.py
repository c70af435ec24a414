"""Many models in less memory than loading them all: a pool on Triton's explicit model control.

:class:`ModelPool` keeps the models a server holds within a memory budget
(``memory_budget_mb``, MiB as ``setsuna models list`` shows them): a model is
loaded on its first request (:meth:`ModelPool.lease`, which the SDK's
``Client(pool=...)`` calls around every request), and when the budget would be
exceeded the least recently used idle models are unloaded. Models idle longer
than ``idle_ttl_s`` are unloaded by a background thread; ``pinned`` models are
loaded at :meth:`ModelPool.start` and never leave; a model with a request in
flight is never evicted.

Everything goes through Triton's repository API over gRPC, a restricted API:
the pool needs the admin token (``$SETSUNA_ADMIN_TOKEN``,
``LocalTriton.grpc_admin_headers``) and refuses to exist without it.

**Memory is measured, not declared.** A Python-backend model runs one stub
process per instance (children of ``tritonserver``, found by
:func:`setsuna.watchdog.scan_stubs`): its memory is the sum of their PSS, read
again at every check (:func:`setsuna.models.stub_memory`). A model served inside
the server process (``setsuna_forest``, ``setsuna.native_forest``) has no
process of its own: its memory is the growth of ``tritonserver``'s PSS across
its load, recorded once. Loads are serialized (one loader thread) so that growth
belongs to one load; traffic to other models during the load (gRPC buffers,
allocator arenas) is noise of the order of 1 MiB and is clamped at zero. A
model someone else loaded has its stubs measured but no recorded growth (0 for
a native one, "unmeasured" in :meth:`ModelPool.status`). Unloading a native
model does not necessarily shrink ``tritonserver`` (the allocator keeps freed
pages); the accounting drops its recorded growth, the process may not.

**What "in flight" means.** The pool's own leases count the calls of this
process exactly (a counter per model, taken under the same lock that marks a
model as being evicted, so no lease can be in flight on an evicted model).
Other processes' traffic is visible only as far as Triton tells: the
``nv_inference_pending_request_count`` gauge counts requests *queued* for a
model (core ``infer_request.cc``: incremented when a request becomes PENDING,
decremented when it starts EXECUTING), so a model with a queue is not evicted;
a request already executing is invisible (core keeps ``InflightInferenceCount``
but logs it only at shutdown), and the statistics' ``last_inference`` (the end
of the last batch) orders the LRU. Triton's unload itself lets in-flight
requests finish: the repository drops its reference to the model and each
request holds its own until it is released (``model_lifecycle.cc``,
``ModelDeleter``), but a request arriving after the unload is answered
``NOT_FOUND ... has no available versions`` (measured, 2.51).

**Budget and settling.** Before a load the pool evicts LRU idle models until
what the READY models hold plus the new model's size (its last measurement,
else the median of the models measured so far) fits; after the load it
measures and evicts more if needed. If nothing more can be evicted the new
model is unloaded again and :class:`~setsuna.errors.PoolFullError` names the
budget, the size and what is pinned or in flight. An unload returns at once
and the model reads UNLOADING until its stubs have exited (~2.3 s for a
Python model here, longer than its load): the pool does not wait for that
before loading, so memory can briefly exceed the budget while an eviction
settles; once it settled the pool holds at most its budget.
:meth:`ModelPool.settle` waits for that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import re
import statistics
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

from setsuna.errors import (
    ConfigError,
    ModelLoadingError,
    ModelNotReadyError,
    PoolFullError,
    ServerError,
)

if TYPE_CHECKING:  # setsuna.server imports this module; avoid the cycle at run time
    from setsuna.server import LocalTriton

logger = logging.getLogger("setsuna.pool")

READY: Final = "READY"
UNLOADING: Final = "UNLOADING"
LOADING: Final = "LOADING"
_MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_PENDING_METRIC: Final = "nv_inference_pending_request_count"
#: Bound on the cheap calls (index, statistics, metrics, unload).
_CALL_TIMEOUT_S: Final = 10.0
_MAX_EVENTS: Final = 500
_TOKEN_HELP: Final = (
    "the model pool drives Triton's model-repository API, an admin API: set "
    "SETSUNA_ADMIN_TOKEN to the server's admin token"
)


class Pool(Protocol):
    """What the SDK needs of a pool: a lease around each call (:meth:`ModelPool.lease`),
    and a way to say a model it called was not there (:meth:`ModelPool.forget`)."""

    def lease(
        self, model: str, *, deadline_s: float | None = None
    ) -> contextlib.AbstractContextManager[None]: ...

    def forget(self, model: str) -> bool: ...


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PoolSettings:
    """How the pool behaves; validated once at construction.

    ``memory_budget_mb``: MiB (2**20 bytes) the pool's models may hold once
    evictions settled. ``idle_ttl_s``: unload a model unused for this long
    (0: never for idleness, only for the budget). ``load_timeout_s``: bound on
    one load (and a lease's wait when it gives no deadline). ``pinned``:
    models loaded at start and never evicted. ``check_interval_s``: how often
    the background thread applies the TTL and the budget to models loaded by
    anyone. ``settle_timeout_s``: how long :meth:`ModelPool.settle` waits.
    ``settle_before_load``: after evicting to make room, wait until those
    evictions settled (stubs exited, ~2.3 s for a Python model here) before
    loading, so memory stays within the budget at its peak too, at that cost
    to the first request of an evicted model.
    """

    memory_budget_mb: float
    idle_ttl_s: float = 0.0
    load_timeout_s: float = 120.0
    pinned: tuple[str, ...] = ()
    check_interval_s: float = 1.0
    settle_timeout_s: float = 60.0
    settle_before_load: bool = False

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if _not_number(budget) or not 0 < budget < 2**40:
            raise ConfigError(
                f"memory_budget_mb={budget!r}: give the MiB the pool's models may hold, a "
                "positive number (--memory-budget-mb 2048)"
            )
        if _not_number(self.idle_ttl_s) or not 0 <= self.idle_ttl_s <= 86_400 * 365:
            raise ConfigError(
                f"idle_ttl_s={self.idle_ttl_s!r}: give seconds >= 0 after which an idle model "
                "is unloaded (0: only the budget evicts)"
            )
        for name, low, high in (
            ("load_timeout_s", 0.0, 86_400.0),
            ("check_interval_s", 0.01, 3_600.0),
            ("settle_timeout_s", 0.0, 86_400.0),
        ):
            value = getattr(self, name)
            if _not_number(value) or not low < value <= high:
                raise ConfigError(
                    f"{name}={value!r}: give a number of seconds in ({low:g}, {high:g}]"
                )
        pinned: object = self.pinned
        if isinstance(pinned, str) or not isinstance(pinned, tuple | list):
            raise ConfigError(f"pinned={pinned!r}: give a tuple of model names")
        object.__setattr__(self, "pinned", tuple(pinned))
        for name in self.pinned:
            if not isinstance(name, str) or not _MODEL_NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"pinned model {name!r}: give a model name (letters, digits, '_', '.', '-')"
                )
        if len(set(self.pinned)) != len(self.pinned):
            raise ConfigError(f"pinned lists a model twice: {list(self.pinned)}")
        if not isinstance(self.settle_before_load, bool):
            raise ConfigError(f"settle_before_load={self.settle_before_load!r}: give True or False")


def _not_number(value: object) -> bool:
    return (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(float(value))
    )


# --------------------------------------------------------------------------- state


@dataclass
class _Entry:
    """The pool's view of one model (guarded by ``ModelPool._lock``)."""

    name: str
    state: str = ""
    in_flight: int = 0
    pending: int = 0
    #: Wall ms of the last use: the newer of our leases' end and Triton's last_inference.
    last_use_ms: int = 0
    #: tritonserver's PSS growth across our load of it (MiB); None: not measured.
    server_mb: float | None = None
    stub_mb: float = 0.0
    stubs: int = 0
    loading: concurrent.futures.Future[None] | None = None
    load_s: float | None = None

    @property
    def memory_mb(self) -> float:
        return self.stub_mb + (self.server_mb or 0.0)


@dataclass(frozen=True)
class PooledModel:
    """One model as :meth:`ModelPool.status` reports it."""

    name: str
    state: str
    #: stubs' PSS + recorded server growth (MiB); ``measured`` False: no growth recorded.
    memory_mb: float
    stub_mb: float
    server_mb: float | None
    stubs: int
    in_flight: int
    pending: int
    last_use_ms: int
    pinned: bool
    #: The last load's wall time through this pool (s), if any.
    load_s: float | None

    @property
    def measured(self) -> bool:
        return self.server_mb is not None or self.stubs > 0


@dataclass(frozen=True)
class PoolStatus:
    budget_mb: float
    #: What the READY and still-UNLOADING models hold now (MiB).
    held_mb: float
    #: What the READY models hold: the figure the budget is held against (MiB).
    ready_mb: float
    settling: tuple[str, ...]
    models: tuple[PooledModel, ...]
    loads: int
    evictions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_mb": self.budget_mb,
            "held_mb": round(self.held_mb, 2),
            "ready_mb": round(self.ready_mb, 2),
            "settling": list(self.settling),
            "loads": self.loads,
            "evictions": self.evictions,
            "models": [m.__dict__ for m in self.models],
        }


@dataclass(frozen=True)
class PoolEvent:
    """One load or eviction (what the log line says, as data)."""

    model: str
    action: str  # "loaded", "evicted", "load_failed", "refused"
    reason: str
    memory_mb: float
    seconds: float
    at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- the pool


class ModelPool:
    """Load on first request, evict LRU idle models past the budget or the idle TTL.

    ``url``: the server's gRPC address; ``headers``: the admin metadata
    (``LocalTriton.grpc_admin_headers``); ``server_pid``: ``tritonserver``'s
    pid, to measure memory (without it nothing is measured and only the TTL
    evicts; a callable is asked each time); ``metrics_url``: Triton's
    Prometheus page, for other processes' queued requests (optional). Use :meth:`for_server` with a
    :class:`~setsuna.server.LocalTriton`, then ``with pool:`` or
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        settings: PoolSettings,
        *,
        server_pid: int | Callable[[], int | None] | None = None,
        metrics_url: str | None = None,
    ) -> None:
        from setsuna.server import ADMIN_HEADER, GRPC_HEADER_PREFIX

        if not isinstance(settings, PoolSettings):
            raise ConfigError(f"settings={settings!r}: give a PoolSettings")
        key = GRPC_HEADER_PREFIX + ADMIN_HEADER
        if not any(k.startswith(GRPC_HEADER_PREFIX) and v for k, v in dict(headers).items()):
            raise ServerError(f"no admin token given ({key} metadata): {_TOKEN_HELP}")
        self.url = url
        self.settings = settings
        self._server_pid = server_pid
        self.metrics_url = metrics_url
        self._headers = dict(headers)
        self._lock = threading.Lock()
        self._io_lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._pinned = frozenset(settings.pinned)
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="setsuna-pool")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        #: Loads and evictions done, and the most recent events.
        self.loads = 0
        self.evictions = 0
        #: Passes of :meth:`enforce` done (the background thread's included).
        self.checks = 0
        self.events: deque[PoolEvent] = deque(maxlen=_MAX_EVENTS)
        self._warned_full = False
        try:
            with self._io_lock:
                self._refresh()  # the first admin call: a wrong token is refused here
        except BaseException:
            self.stop()
            raise

    @classmethod
    def for_server(cls, server: LocalTriton, settings: PoolSettings) -> ModelPool:
        """A pool on a running :class:`~setsuna.server.LocalTriton` (its token, pid, metrics)."""
        return cls(
            server.grpc_url,
            server.grpc_admin_headers,
            settings,
            server_pid=lambda: server.pid,  # a supervisor's restart changes it
            metrics_url=server.metrics_url,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Load the pinned models (they must fit), then run the TTL/budget thread."""
        if self._thread is not None:
            return self
        try:
            for name in self.settings.pinned:
                self.load(name, deadline_s=self.settings.load_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="setsuna-pool-ttl", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and the loader; models stay as they are."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.settings.load_timeout_s + _CALL_TIMEOUT_S)
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._io_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the hot path ---------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, model: str, *, deadline_s: float | None = None) -> Iterator[None]:
        """Hold ``model`` loaded for the ``with`` block: it is not evicted meanwhile.

        Loaded: a dict lookup and a counter. Not loaded: one load starts (the
        concurrent callers for the same model wait for that one), evicting LRU
        idle models to make room; if it does not finish within ``deadline_s``
        (default ``load_timeout_s``) :class:`~setsuna.errors.ModelLoadingError`
        (retryable) says so and the load goes on. A model that cannot fit raises
        :class:`~setsuna.errors.PoolFullError`.
        """
        entry = self._entries.get(model)
        with self._lock:
            if entry is not None and entry.state == READY and entry.loading is None:
                entry.in_flight += 1
            else:
                entry = None
        if entry is None:
            entry = self._acquire(model, deadline_s)
        try:
            yield
        finally:
            with self._lock:
                entry.in_flight -= 1
                entry.last_use_ms = max(entry.last_use_ms, _now_ms())

    def forget(self, model: str) -> bool:
        """A call found ``model`` not loaded although the pool thought it READY (someone
        else unloaded it): the next lease checks with Triton and loads it again. True
        when the pool had it as READY (a retry can help)."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is None or entry.state != READY:
                return False
            entry.state = ""
            return True

    def load(self, model: str, *, deadline_s: float | None = None) -> None:
        """Make sure ``model`` is loaded (as a lease would), without holding it."""
        with self.lease(model, deadline_s=deadline_s):
            pass

    def _acquire(self, model: str, deadline_s: float | None) -> _Entry:
        if not isinstance(model, str) or not _MODEL_NAME_RE.fullmatch(model):
            raise ConfigError(f"model name {model!r}: use letters, digits, '_', '.', '-'")
        budget_s = self.settings.load_timeout_s if deadline_s is None else float(deadline_s)
        began = time.monotonic()
        deadline = began + budget_s
        while True:
            with self._lock:
                entry = self._entries.setdefault(model, _Entry(model))
                if entry.state == READY and entry.loading is None:
                    entry.in_flight += 1
                    return entry
                future = entry.loading
                if future is None:
                    try:
                        future = entry.loading = self._loader.submit(self._load, model)
                    except RuntimeError:  # shut down
                        raise ServerError(f"{model}: the model pool is stopped") from None
            left = deadline - time.monotonic()
            try:
                future.result(timeout=max(0.0, left))
            except concurrent.futures.TimeoutError:
                raise ModelLoadingError(self._loading_message(model, budget_s)) from None
            except concurrent.futures.CancelledError:
                raise ServerError(f"{model}: the model pool stopped while loading it") from None
            if time.monotonic() >= deadline and entry.state != READY:
                raise ModelLoadingError(self._loading_message(model, budget_s))

    def _loading_message(self, model: str, budget_s: float) -> str:
        typical = [e.load_s for e in self._entries.values() if e.load_s is not None]
        hint = f"; loads take ~{statistics.median(typical):.1f} s here" if typical else ""
        return (
            f"{model} is loading (it was not in memory: the model pool loads it on first "
            f"request){hint}; it did not finish within this call's {budget_s * 1e3:.0f} ms "
            "deadline: retry shortly, the load goes on"
        )

    # -- commands -------------------------------------------------------------------------

    def evict(self, model: str, *, reason: str = "asked") -> bool:
        """Unload ``model`` now unless it is pinned or in flight (then ModelNotReadyError
        says which); False when it was not loaded."""
        with self._io_lock:
            self._refresh()
            self._read_pending()
            entry = self._entries.get(model)
            if entry is None or entry.state != READY:
                return False
            if model in self._pinned:
                raise ModelNotReadyError(f"{model} is pinned: it never leaves the pool")
            if not self._evict(entry, reason):
                raise ModelNotReadyError(
                    f"{model} has {entry.in_flight} call(s) in flight here and "
                    f"{entry.pending} queued in Triton: not evicted, retry when they end"
                )
            return True

    def status(self) -> PoolStatus:
        """Every model the pool knows of, with memory, use and state (reads Triton now;
        waits while a load runs: :meth:`snapshot` never does)."""
        with self._io_lock:
            self._refresh()
            self._read_pending()
        return self._snapshot()

    def snapshot(self) -> PoolStatus:
        """The status as last read (no call to Triton, never waits for a load)."""
        return self._snapshot()

    def held_mb(self) -> float:
        """What the READY and UNLOADING models hold now, measured (MiB)."""
        return self.status().held_mb

    def settle(self, timeout_s: float | None = None) -> PoolStatus:
        """Apply the budget to fresh measurements (:meth:`enforce`) and wait until no
        eviction is still unloading (stubs exited); again until a pass evicts nothing.

        A stub grows after its load (its first requests touch pages the load did
        not), so a model admitted on its size at load can take the pool over the
        budget later; the background thread catches that at its next check, and
        this does it now. Returns the status then.
        """
        wait_s = self.settings.settle_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        evicted = self.enforce()
        while True:
            snap = self.status()
            if not snap.settling:
                if not evicted:
                    return snap
                evicted = self.enforce()
                continue
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"models {list(snap.settling)} were still unloading after {wait_s:g} s; "
                    "read the server log (a stub that does not exit?)"
                )
            self._stop.wait(0.02)  # Triton has no unload-complete event to wait on

    def enforce(self) -> list[str]:
        """One pass of what the background thread does: the idle TTL, then the budget.

        Applies to every model Triton holds, whoever loaded it. Returns the
        models evicted.
        """
        evicted: list[str] = []
        with self._io_lock:
            self.checks += 1
            self._refresh()
            self._read_pending()
            ttl_ms = self.settings.idle_ttl_s * 1e3
            if ttl_ms > 0:
                now = _now_ms()
                for entry in list(self._entries.values()):
                    idle = entry.state == READY and now - entry.last_use_ms > ttl_ms
                    if idle and entry.name not in self._pinned and self._evict(entry, "idle"):
                        evicted.append(entry.name)
            try:
                evicted += self._make_room(0.0, exclude="")
                self._warned_full = False
            except PoolFullError as exc:
                if not self._warned_full:
                    logger.warning("over the memory budget: %s", exc)
                self._warned_full = True
        return evicted

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.settings.check_interval_s):
            try:
                self.enforce()
                failing = False
            except ServerError as exc:  # the server restarting: say so once
                if not failing:
                    logger.warning("model pool: %s; trying again every interval", exc)
                failing = True
            except Exception:  # the thread must outlive one bad pass
                logger.exception("model pool check failed; trying again next interval")

    # -- loading and evicting (loader thread / under _io_lock) ----------------------------

    def _load(self, model: str) -> None:
        try:
            with self._io_lock:
                self._load_locked(model)
        finally:
            with self._lock:
                entry = self._entries[model]
                entry.loading = None

    def _load_locked(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        self._refresh()
        entry = self._entries.setdefault(model, _Entry(model))
        if entry.state == READY:
            return  # loaded by someone else meanwhile
        need = self._estimate(entry)
        self._read_pending()
        evicted = self._make_room(need, exclude=model, size_known=entry.server_mb is not None)
        if evicted and self.settings.settle_before_load:
            self._wait_settled(evicted)
        before = self._server_pss()
        began = time.perf_counter()
        with self._lock:
            entry.state = LOADING
        try:
            self._grpc().load_model(
                model, headers=self._headers, client_timeout=self.settings.load_timeout_s
            )
        except InferenceServerException as exc:
            with self._lock:
                entry.state = ""
            self._refresh()
            took = time.perf_counter() - began
            self._event(model, "load_failed", str(exc), 0.0, took, logging.ERROR)
            raise ModelNotReadyError(
                f"{model}: the model pool could not load it: {_message(exc)}"
            ) from None
        took = time.perf_counter() - began
        after = self._server_pss()
        growth = max(0.0, after - before) if before is not None and after is not None else None
        with self._lock:
            entry.state = READY
            entry.server_mb = growth
            entry.load_s = took
            entry.last_use_ms = max(entry.last_use_ms, _now_ms())
        self._measure_stubs()
        self.loads += 1
        self._event(model, "loaded", f"{took:.2f} s", entry.memory_mb, took, logging.INFO)
        try:  # what it really holds may be more than the estimate
            self._make_room(0.0, exclude=model)
        except PoolFullError as exc:
            with self._lock:
                entry.state = UNLOADING
            self._unload(model)
            self._event(model, "refused", str(exc), entry.memory_mb, took, logging.ERROR)
            raise

    def _wait_settled(self, names: list[str]) -> None:
        """Until every model in ``names`` finished unloading and its stubs exited."""
        deadline = time.monotonic() + self.settings.settle_timeout_s
        while True:
            self._refresh()
            with self._lock:
                busy = [
                    n
                    for n in names
                    if n in self._entries
                    and (self._entries[n].state == UNLOADING or self._entries[n].stubs)
                ]
            if not busy or time.monotonic() >= deadline:
                return  # past the timeout the load goes ahead; settle() reports it
            self._stop.wait(0.02)  # Triton has no unload-complete event to wait on

    def _estimate(self, entry: _Entry) -> float:
        """MiB a load of ``entry`` will take: its last measure, else the median measured."""
        if entry.server_mb is not None:
            return entry.memory_mb
        with self._lock:
            known = [
                e.memory_mb
                for e in self._entries.values()
                if e.server_mb is not None or (e.state == READY and e.stubs)
            ]
        return statistics.median(known) if known else 0.0

    def _make_room(self, need_mb: float, *, exclude: str, size_known: bool = True) -> list[str]:
        """Evict LRU idle models until the READY models plus ``need_mb`` fit the budget."""
        budget = self.settings.memory_budget_mb
        evicted: list[str] = []
        while self._ready_mb() + need_mb > budget:
            victim = self._lru_victim(exclude)
            if victim is None:
                raise PoolFullError(self._full_message(exclude, need_mb, size_known))
            if self._evict(victim, "budget"):
                evicted.append(victim.name)
        return evicted

    def _lru_victim(self, exclude: str) -> _Entry | None:
        with self._lock:
            idle = [
                e
                for e in self._entries.values()
                if e.state == READY
                and e.name != exclude
                and e.name not in self._pinned
                and e.in_flight == 0
                and e.pending == 0
            ]
        return min(idle, key=lambda e: e.last_use_ms, default=None)

    def _evict(self, entry: _Entry, reason: str) -> bool:
        """Unload ``entry`` if nothing holds it; False when a call is in flight or queued."""
        with self._lock:
            if entry.state != READY or entry.in_flight or entry.pending:
                return False
            entry.state = UNLOADING  # from here on a lease takes the slow path
        held = entry.memory_mb
        self._unload(entry.name)
        self.evictions += 1
        idle_s = (_now_ms() - entry.last_use_ms) / 1e3
        self._event(
            entry.name, "evicted", f"{reason}, idle {idle_s:.1f} s", held, 0.0, logging.INFO
        )
        return True

    def _unload(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._grpc().unload_model(model, headers=self._headers, client_timeout=_CALL_TIMEOUT_S)
        except InferenceServerException as exc:
            logger.error("unloading %s failed: %s", model, exc)

    def _full_message(self, model: str, need_mb: float, size_known: bool) -> str:
        with self._lock:
            ready = [e for e in self._entries.values() if e.state == READY and e.name != model]
        pinned = [e for e in ready if e.name in self._pinned]
        busy = [e for e in ready if e.name not in self._pinned and (e.in_flight or e.pending)]
        size = (
            f"{need_mb:.0f} MiB{'' if size_known else ' (estimated from the models measured)'}"
            if need_mb
            else f"{self._entries[model].memory_mb:.0f} MiB measured"
            if model in self._entries
            else "unknown size"
        )

        def names(entries: list[_Entry]) -> str:
            mib = sum(e.memory_mb for e in entries)
            return f"{[e.name for e in entries]} ({mib:.0f} MiB)" if entries else "none"

        what = f"{model} ({size})" if model else "the models loaded"
        return (
            f"{what} does not fit the pool's memory budget of "
            f"{self.settings.memory_budget_mb:g} MiB even after evicting every idle model: "
            f"pinned {names(pinned)}, in flight or queued {names(busy)}. Raise "
            "--memory-budget-mb, pin fewer models, or retry when the calls in flight end"
        )

    # -- reading Triton and /proc ---------------------------------------------------------

    @property
    def server_pid(self) -> int | None:
        """``tritonserver``'s pid now (None: memory is not measured)."""
        pid = self._server_pid
        return pid() if callable(pid) else pid

    def _refresh(self) -> None:
        """States (repository index), last uses (statistics) and stub memory, now."""
        from tritonclient.utils import InferenceServerException

        client = self._grpc()
        try:
            index = client.get_model_repository_index(
                headers=self._headers, as_json=True, client_timeout=_CALL_TIMEOUT_S
            )
        except InferenceServerException as exc:
            if "restricted" in str(exc).lower():
                raise ServerError(f"the server refused the admin token: {_TOKEN_HELP}") from None
            raise ServerError(f"cannot read the repository index at {self.url}: {exc}") from exc
        try:
            stats = client.get_inference_statistics(
                as_json=True, client_timeout=_CALL_TIMEOUT_S
            ).get("model_stats", [])
        except InferenceServerException as exc:
            raise ServerError(f"cannot read inference statistics at {self.url}: {exc}") from exc
        states: dict[str, str] = {}
        for m in index.get("models", []):
            state = str(m.get("state", ""))
            prev = states.get(m["name"], "")
            # A model is READY when one version is; else UNLOADING while one still unloads.
            if state == READY or (state == UNLOADING and prev != READY) or not prev:
                states[m["name"]] = state
        last: dict[str, int] = {}
        for s in stats:
            ms = int(s.get("last_inference", 0) or 0)
            last[s["name"]] = max(ms, last.get(s["name"], 0))
        now = _now_ms()
        with self._lock:
            for name, state in states.items():
                entry = self._entries.get(name)
                if entry is None:
                    if state not in (READY, UNLOADING):
                        continue
                    entry = self._entries[name] = _Entry(name)
                if entry.state == LOADING:
                    continue  # the loader owns it until load_model returns
                if state == READY and entry.state != READY:  # someone loaded it: new to us
                    entry.last_use_ms = max(entry.last_use_ms, last.get(name, 0) or now)
                entry.state = state
                entry.last_use_ms = max(entry.last_use_ms, last.get(name, 0))
            for name, entry in self._entries.items():
                if name not in states and entry.state != LOADING:
                    entry.state = ""
        self._measure_stubs()

    def _measure_stubs(self) -> None:
        pid = self.server_pid
        if pid is None:
            return
        from setsuna.models import stub_memory

        memory = stub_memory(pid)
        with self._lock:
            for name, entry in self._entries.items():
                entry.stub_mb, entry.stubs = memory.get(name, (0.0, 0))

    def _read_pending(self) -> None:
        """Requests queued in Triton per model (other processes' traffic), if metrics are on."""
        if not self.metrics_url:
            return
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.metrics_url, timeout=_CALL_TIMEOUT_S) as resp:
                text = resp.read().decode()
        except OSError as exc:
            logger.debug("no metrics from %s: %s", self.metrics_url, exc)
            return
        pending: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith(_PENDING_METRIC + "{"):
                head, value = line.rsplit(" ", 1)
                found = re.search(r'model="([^"]*)"', head)
                if found:
                    name = found.group(1)
                    pending[name] = pending.get(name, 0) + int(float(value))
        with self._lock:
            for name, entry in self._entries.items():
                entry.pending = pending.get(name, 0)

    def _server_pss(self) -> float | None:
        pid = self.server_pid
        if pid is None:
            return None
        from setsuna.models import process_pss_mib

        return process_pss_mib(pid)

    def _ready_mb(self) -> float:
        with self._lock:
            return sum(e.memory_mb for e in self._entries.values() if e.state in (READY, LOADING))

    def _snapshot(self) -> PoolStatus:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.name)
            models = tuple(
                PooledModel(
                    name=e.name,
                    state=e.state or "UNLOADED",
                    memory_mb=round(e.memory_mb, 2),
                    stub_mb=round(e.stub_mb, 2),
                    server_mb=None if e.server_mb is None else round(e.server_mb, 2),
                    stubs=e.stubs,
                    in_flight=e.in_flight,
                    pending=e.pending,
                    last_use_ms=e.last_use_ms,
                    pinned=e.name in self._pinned,
                    load_s=e.load_s,
                )
                for e in entries
            )
            # A model still unloading holds its stubs; a native one is freed with the model.
            held = sum(
                e.memory_mb if e.state in (READY, LOADING) else e.stub_mb
                for e in entries
                if e.state in (READY, LOADING, UNLOADING)
            )
            ready = sum(e.memory_mb for e in entries if e.state in (READY, LOADING))
            settling = tuple(e.name for e in entries if e.state == UNLOADING)
        return PoolStatus(
            budget_mb=self.settings.memory_budget_mb,
            held_mb=held,
            ready_mb=ready,
            settling=settling,
            models=models,
            loads=self.loads,
            evictions=self.evictions,
        )

    def _grpc(self) -> Any:
        if self._client is None:
            import tritonclient.grpc as grpcclient  # the serve extra; imported on first use

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    def _event(
        self, model: str, action: str, reason: str, mb: float, seconds: float, level: int
    ) -> None:
        self.events.append(PoolEvent(model, action, reason, mb, seconds))
        logger.log(level, "model %s %s (%s, %.0f MiB)", model, action, reason, mb)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _message(exc: Any) -> str:
    text = exc.message() if hasattr(exc, "message") else None
    return str(text or exc)
