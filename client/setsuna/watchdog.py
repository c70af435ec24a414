"""Notice a Python-backend model whose stub died, and reload it or report it not ready.

Each instance of a Python-backend model runs in its own
``triton_python_backend_stub`` process, a child of ``tritonserver`` whose
``argv[1]`` is ``<repository>/<model>/<version>/model.py`` and whose
``argv[8]`` names the instance (``<model>_<group>_<n>``). When a stub dies
(``kill -9``, the OOM killer, a segfault in an engine), Triton 2.51 does not
notice: the repository index and ``/v2/models/<m>/ready`` keep saying READY,
every request to the model fails after 1.00 s with "Stub process ... is not
healthy", and nothing restarts it (measured). The readiness API is therefore
no detector, and the stub processes are: :class:`ModelWatchdog` records the
stubs each READY model has when it is seen healthy, and a model is dead when
one of those stubs is gone (or a zombie) with no newer stub for its instance,
or when a READY Python model has no live stub at all.

A dead model is reloaded through the repository API (gRPC, admin metadata):
unload, then load, because 2.51 ignores a load of a READY model whose files
are unchanged (see :meth:`ModelWatchdog._reload`); Triton starts fresh stubs
and the model serves again. When the reload fails the watchdog makes sure the
model is unloaded: it is reported not ready instead of failing every request
(Triton keeps an old version READY when a *re*load fails), and
:attr:`ModelWatchdog.failures` says why. So does a model that died more
than ``max_reloads_per_window`` times within ``reload_window_s``: a model that
crash-loops is taken down, not reloaded forever.

A check costs one ``get_model_repository_index`` call and one small
``/proc/<pid>/stat`` read per recorded stub; the full ``/proc`` scan (one
``stat`` read per process on the host) runs only when a recorded stub changed
or a model has no record yet. ``probe_readiness=True`` adds one readiness call
per READY model; it catches a model Triton itself marks not ready while the
index says READY, and is off by default because it cannot see a dead stub.

Wiring: ``ModelWatchdog(server).start()`` after ``server.start()`` and
``.stop()`` before ``server.stop()``, or ``with ModelWatchdog(server):``, or
call :meth:`ModelWatchdog.check_once` from a supervisor loop every
:attr:`ModelWatchdog.interval_s`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self

from setsuna.errors import ConfigError

if TYPE_CHECKING:  # setsuna.server may import this module; avoid the cycle at run time
    from setsuna.server import LocalTriton

logger = logging.getLogger("setsuna.watchdog")

_STUB_NAME: Final = "triton_python_backend_stub"
_PROC: Final = "/proc"
_MAX_EVENTS: Final = 200
_JOIN_GRACE_S: Final = 5.0
#: Bound on the cheap calls (index, config, readiness); loads get ``reload_timeout_s``.
_CALL_TIMEOUT_S: Final = 5.0

Action = Literal["reloaded", "reload_failed", "gave_up", "unload_failed"]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class WatchdogSettings:
    """How often to look and how hard to try, validated once at construction.

    At most ``max_reloads_per_window`` reloads of one model happen within any
    ``reload_window_s``; the next death inside the window unloads the model.
    ``reload_timeout_s`` bounds one load call (a real engine can take a while).
    """

    interval_ms: int = 500
    max_reloads_per_window: int = 3
    reload_window_s: float = 600.0
    reload_timeout_s: float = 120.0
    probe_readiness: bool = False

    def __post_init__(self) -> None:
        if _not_int(self.interval_ms) or not 10 <= self.interval_ms <= 3_600_000:
            raise ConfigError(
                f"interval_ms={self.interval_ms!r}: give 10..3600000 milliseconds between "
                "checks (default 500)"
            )
        if _not_int(self.max_reloads_per_window) or not 1 <= self.max_reloads_per_window <= 1000:
            raise ConfigError(
                f"max_reloads_per_window={self.max_reloads_per_window!r}: give 1..1000 "
                "reloads of one model per window (default 3)"
            )
        for name in ("reload_window_s", "reload_timeout_s"):
            value = getattr(self, name)
            if _not_number(value) or not 0 < value <= 86_400:
                raise ConfigError(f"{name}={value!r}: give a number of seconds in (0, 86400]")
        if not isinstance(self.probe_readiness, bool):
            raise ConfigError(f"probe_readiness={self.probe_readiness!r}: give True or False")


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _not_number(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int | float) or value != value


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Stub:
    """One live stub process; ``start_ticks`` tells a reused pid from the original."""

    pid: int
    start_ticks: int
    model: str
    version: str
    instance: str


def _read_small(path: str) -> bytes | None:
    """A /proc file's content (os.open/os.read: this runs once per process per scan)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start_ticks)`` of a process, or None when it is gone."""
    raw = _read_small(f"{_PROC}/{pid}/stat")
    if raw is None:
        return None
    # comm (field 2) may hold spaces and ')': split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def _alive(stub: Stub, server_pid: int) -> bool:
    stat = _read_stat(stub.pid)
    if stat is None:
        return False
    state, ppid, start = stat
    return state not in ("Z", "X") and ppid == server_pid and start == stub.start_ticks


def scan_stubs(server_pid: int) -> list[Stub]:
    """Every live (not zombie) Python backend stub whose parent is ``server_pid``."""
    stubs: list[Stub] = []
    try:
        with os.scandir(_PROC) as entries:
            names = [e.name for e in entries]
    except OSError:
        return stubs
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        stat = _read_stat(pid)
        if stat is None or stat[1] != server_pid or stat[0] in ("Z", "X"):
            continue
        cmdline = _read_small(f"{_PROC}/{name}/cmdline")
        if cmdline is None:
            continue
        argv = cmdline.split(b"\0")
        if len(argv) < 2 or not argv[0].endswith(_STUB_NAME.encode()):
            continue
        model_py = Path(os.fsdecode(argv[1]))
        instance = os.fsdecode(argv[8]) if len(argv) > 8 and argv[8] else f"pid-{pid}"
        stubs.append(
            Stub(pid, stat[2], model_py.parent.parent.name, model_py.parent.name, instance)
        )
    return stubs


def _newest_per_instance(stubs: Iterable[Stub]) -> dict[tuple[str, str], Stub]:
    """One stub per (version, instance): after a reload the old one lingers a few seconds."""
    out: dict[tuple[str, str], Stub] = {}
    for s in stubs:
        key = (s.version, s.instance)
        if key not in out or s.start_ticks > out[key].start_ticks:
            out[key] = s
    return out


# --------------------------------------------------------------------------- the watchdog


@dataclass(frozen=True)
class WatchdogEvent:
    """One thing the watchdog did to one model (the log line, as data)."""

    model: str
    action: Action
    dead_pids: tuple[int, ...]
    seconds: float
    detail: str
    at: float = field(default_factory=time.time)


class ModelWatchdog:
    """Reload a model whose stub died; unload it when that fails or keeps happening.

    ``check_once()`` does one check synchronously (tests, a supervisor loop);
    ``start()`` runs it every ``interval_ms`` on a daemon thread after one
    synchronous check that records the baseline. Read :attr:`restarts`
    (successful reloads per model), :attr:`failures` (models the watchdog
    took down, with the reason; cleared when the model is READY again) and
    :attr:`events` (the most recent actions).

    A model an operator unloads is forgotten, never reloaded; one an operator
    reloads is followed to its new stubs, not counted as a death; so is a
    version an operator unloads while others keep serving (the lifecycle's
    promote): only the stubs of READY versions are expected alive.
    """

    def __init__(
        self,
        server: LocalTriton,
        *,
        interval_ms: int = 500,
        max_reloads_per_window: int = 3,
        reload_window_s: float = 600.0,
        reload_timeout_s: float = 120.0,
        probe_readiness: bool = False,
    ) -> None:
        self.settings = WatchdogSettings(
            interval_ms=interval_ms,
            max_reloads_per_window=max_reloads_per_window,
            reload_window_s=reload_window_s,
            reload_timeout_s=reload_timeout_s,
            probe_readiness=probe_readiness,
        )
        self.server = server
        #: Reloads that brought a model back READY, per model.
        self.restarts: dict[str, int] = {}
        #: Models the watchdog unloaded (reload failed or too many deaths), with why.
        self.failures: dict[str, str] = {}
        #: The most recent actions, oldest first.
        self.events: deque[WatchdogEvent] = deque(maxlen=_MAX_EVENTS)
        #: Checks done, and the wall time the last one took.
        self.checks = 0
        self.last_check_s = 0.0
        self._records: dict[str, dict[tuple[str, str], Stub]] = {}
        self._python: dict[str, bool] = {}
        self._reloads: dict[str, deque[float]] = {}
        self._server_pid: int | None = None
        self._client: Any = None
        self._index_failing = False
        self._new_events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        return self.settings.interval_ms / 1000.0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Check once now (the baseline), then every ``interval_ms`` on a daemon thread."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="setsuna-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (waits for a reload in flight, bounded). Safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.settings.reload_timeout_s + _JOIN_GRACE_S)
        with self._lock:
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

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # the thread must outlive any one bad check
                logger.exception("watchdog check failed; trying again next interval")

    # -- one check ------------------------------------------------------------------------

    def check_once(self) -> list[WatchdogEvent]:
        """Look at every READY model once; reload (or unload) the ones whose stubs died.

        Returns what this check did (usually nothing); :attr:`events` keeps them too.
        """
        with self._lock:
            began = time.perf_counter()
            self._new_events = 0
            try:
                self._check()
            finally:
                self.checks += 1
                self.last_check_s = time.perf_counter() - began
            done = self._new_events
            return list(self.events)[-done:] if done else []

    def _check(self) -> None:
        pid = self.server.pid
        if pid is None or not self.server.running:
            return
        if pid != self._server_pid:  # a new server process: nothing recorded is valid
            self._records.clear()
            self._python.clear()
            self._server_pid = pid
        versions = self._ready_models()
        if versions is None:
            return
        ready = set(versions)
        for gone in set(self._records) - ready:  # unloaded by someone: stop watching
            del self._records[gone]
        for gone in set(self._python) - ready:  # its config may change before it returns
            del self._python[gone]
        for model in ready & set(self.failures):
            logger.info("model %s is READY again (loaded from outside); watching it", model)
            del self.failures[model]

        suspects = []
        for model in sorted(ready):
            if not self._is_python(model):
                continue
            record = self._records.get(model)
            if record is not None:  # a version an operator unloaded takes its stubs along
                kept = {k: s for k, s in record.items() if k[0] in versions[model]}
                record = self._records[model] = kept
            if not record or not all(_alive(s, pid) for s in record.values()):
                suspects.append(model)
        by_model: dict[str, list[Stub]] = {}
        if suspects:
            for stub in scan_stubs(pid):
                if stub.version in versions.get(stub.model, ()):
                    by_model.setdefault(stub.model, []).append(stub)
        for model in suspects:
            dead = self._classify(model, by_model.get(model, []))
            if dead is not None:
                self._recover(model, dead, "stub died" if dead else "no live stub")
        if self.settings.probe_readiness:
            for model in sorted(ready - set(suspects)):
                if not self._probe(model):
                    self._recover(model, (), "readiness API says not ready")

    def _ready_models(self) -> dict[str, set[str]] | None:
        """READY versions per model (a model is READY when one of its versions is)."""
        try:
            index = self._grpc().get_model_repository_index(
                headers=self.server.grpc_admin_headers,
                as_json=True,
                client_timeout=_CALL_TIMEOUT_S,
            )
        except Exception as exc:  # server busy or going away: say so once, retry next time
            if not self._index_failing:
                logger.warning("cannot read the model repository index: %s", exc)
            self._index_failing = True
            return None
        self._index_failing = False
        out: dict[str, set[str]] = {}
        for m in index.get("models", []):
            if m.get("state") == "READY":
                out.setdefault(str(m["name"]), set()).add(str(m.get("version", "")))
        return out

    def _is_python(self, model: str) -> bool:
        """Whether the model runs stubs (not an ensemble); asked once per loaded model."""
        known = self._python.get(model)
        if known is None:
            try:
                config = self._grpc().get_model_config(
                    model, as_json=True, client_timeout=_CALL_TIMEOUT_S
                )["config"]
            except Exception as exc:  # unloaded meanwhile: next check sees it
                logger.debug("no config for %s yet: %s", model, exc)
                return False
            known = config.get("backend") == "python"
            self._python[model] = known
        return known

    def _classify(self, model: str, live: list[Stub]) -> tuple[int, ...] | None:
        """Dead stub pids of ``model`` (maybe none), or None when it is healthy.

        A recorded stub that is gone is fine when a newer stub serves its
        instance (someone reloaded the model); otherwise the instance is dead.
        """
        newest = _newest_per_instance(live)
        record = self._records.get(model)
        if record is None:  # first sight (or back after an unload): record what runs
            if not newest:
                return ()
            self._records[model] = newest
            return None
        live_ids = {(s.pid, s.start_ticks) for s in live}
        updated: dict[tuple[str, str], Stub] = {}
        dead: list[int] = []
        for key, stub in record.items():
            if (stub.pid, stub.start_ticks) in live_ids:
                updated[key] = stub
            elif key in newest and newest[key].start_ticks >= stub.start_ticks:
                updated[key] = newest[key]
            else:
                dead.append(stub.pid)
        if dead or not newest:
            return tuple(dead)
        for key, stub in newest.items():  # an instance added by someone's reload
            updated.setdefault(key, stub)
        self._records[model] = updated
        return None

    def _probe(self, model: str) -> bool:
        try:
            return bool(self._grpc().is_model_ready(model, client_timeout=_CALL_TIMEOUT_S))
        except Exception as exc:
            logger.debug("readiness probe of %s failed: %s", model, exc)
            return True  # unreachable is the index's business, not a verdict on the model

    # -- recovery -------------------------------------------------------------------------

    def _recover(self, model: str, dead: tuple[int, ...], why: str) -> None:
        record = self._records.pop(model, None) or {}
        ready = self._ready_models()
        if ready is None or model not in ready:  # unloaded meanwhile (an operator): leave it
            return
        lost = {k[0] for k, s in record.items() if s.pid in dead}
        if dead and not lost & ready[model]:  # only versions an operator unloaded meanwhile
            return
        now = time.monotonic()
        recent = self._reloads.setdefault(model, deque())
        while recent and recent[0] <= now - self.settings.reload_window_s:
            recent.popleft()
        what = f"{why}, dead stub pid(s) {list(dead)}" if dead else why
        if len(recent) >= self.settings.max_reloads_per_window:
            reason = (
                f"{what}; {len(recent)} reload(s) in the last "
                f"{self.settings.reload_window_s:g} s already, not reloading again"
            )
            self._take_down(model, dead, "gave_up", reason, 0.0)
            return
        recent.append(now)
        began = time.monotonic()
        stubs, error = self._reload(model)
        took = time.monotonic() - began
        if error is not None:  # whatever Triton still holds must not read READY
            self._take_down(model, dead, "reload_failed", f"{what}; reload failed: {error}", took)
            return
        self._records[model] = _newest_per_instance(stubs)
        self.restarts[model] = self.restarts.get(model, 0) + 1
        self._event(
            model,
            "reloaded",
            dead,
            took,
            f"{what}; reloaded, READY in {took:.2f} s "
            f"(restart {self.restarts[model]}, new stub pid(s) {sorted(s.pid for s in stubs)})",
            logging.WARNING,
        )

    def _reload(self, model: str) -> tuple[list[Stub], str | None]:
        """Unload, then load ``model``; its new stubs, or why that failed.

        Not a bare load: 2.51 answers ``load`` of a READY model whose files and
        config are unchanged with success and does nothing (measured: the dead
        stub stays dead), and an identical ``config`` override is a no-op too.
        A load issued while the unload is still in progress loads a fresh copy
        (~1.4 s for a small model) without waiting the ~1 s per dead instance
        that the unload spends on the dead stub; the model reads not ready
        meanwhile instead of failing each request after 1 s.
        """
        pid = self._server_pid or 0
        before = {(s.pid, s.start_ticks) for s in scan_stubs(pid) if s.model == model}
        client = self._grpc()
        headers = self.server.grpc_admin_headers
        timeout = self.settings.reload_timeout_s
        try:
            client.unload_model(model, headers=headers, client_timeout=timeout)
            client.load_model(model, headers=headers, client_timeout=timeout)
        except Exception as exc:
            message = exc.message() if hasattr(exc, "message") else None
            return [], str(message or exc)
        stubs = [
            s for s in scan_stubs(pid) if s.model == model and (s.pid, s.start_ticks) not in before
        ]
        if not stubs and self._python.get(model):
            return [], "the load returned but started no stub process"
        return stubs, None

    def _take_down(
        self, model: str, dead: tuple[int, ...], action: Action, reason: str, took: float
    ) -> None:
        """Unload ``model`` so it reads not ready instead of failing every request."""
        try:
            self._grpc().unload_model(
                model,
                headers=self.server.grpc_admin_headers,
                client_timeout=self.settings.reload_timeout_s,
            )
        except Exception as exc:
            reason = f"{reason}; UNLOAD FAILED too ({exc}): the model may still read READY"
            action = "unload_failed"
        else:
            reason = f"{reason}; unloaded: reported not ready until someone loads it"
        self.failures[model] = reason
        self._event(model, action, dead, took, reason, logging.ERROR)

    def _event(
        self,
        model: str,
        action: Action,
        dead: tuple[int, ...],
        took: float,
        detail: str,
        level: int,
    ) -> None:
        self.events.append(WatchdogEvent(model, action, dead, took, detail))
        self._new_events += 1
        logger.log(level, "model %s: %s", model, detail)

    def _grpc(self) -> Any:
        if self._client is None:
            import tritonclient.grpc as grpcclient  # the serve extra; imported on first use

            self._client = grpcclient.InferenceServerClient(self.server.grpc_url)
        return self._client

    # -- reporting ------------------------------------------------------------------------

    def summary(self) -> Mapping[str, object]:
        """What a banner or a health endpoint prints: restarts, failures, last check."""
        return {
            "checks": self.checks,
            "last_check_ms": round(self.last_check_s * 1000, 3),
            "restarts": dict(self.restarts),
            "failures": dict(self.failures),
        }
