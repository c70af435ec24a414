"""A config file that changes under a running model, and how its instances agree on it.

Experiment, member and selector files are edited while Triton serves, and a
model runs as several instances (processes) that each read the file. Each
instance polls it in a background thread (:class:`Poller`, one ``stat`` per
interval) and at every execute; when it changed it is read once, parsed and
validated as a whole, and only a valid file replaces the one in force. A bad
file keeps the previous one serving, and the reason is reported for the
model to log and count.

Polling alone cannot make instances agree: an instance that read v2 before
a bad file landed serves v2, one that polled only after it keeps v1. So the
instances of a model share a **last valid copy** beside the file
(:func:`shared_copy`): whichever validates a file first writes its bytes
there (temp file + rename, under a lock) with the file's modification time,
and a copy is never replaced by one from an older file. An instance serves
the file while it is valid and, while it is not, the copy whenever the copy
comes from a newer file than what it serves. After any sequence of writes
every instance serves the newest valid file any of them validated, within
one poll interval. If the copy cannot be written, the model logs it: its
instances may then disagree while the file is invalid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from setsuna.errors import ConfigError, SetsunaError

T = TypeVar("T")
Stamp = tuple[int, int, int]  # mtime_ns, size, inode


def decode_json(data: bytes, origin: str, what: str) -> Any:
    """The JSON document in ``data`` (read from ``origin``); ConfigError names the fault."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {origin} is not JSON: {exc}") from exc


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path``; ConfigError names the ``what`` file and the fault."""
    return decode_json(read_bytes(path), str(path), what)


def file_digest(data: bytes) -> int:
    """48 bits of the sha256 of a file's bytes: exact in a Prometheus gauge (a double).

    Each model publishes the digest of the file it serves
    (``setsuna_watched_file_digest``), so whoever wrote a file can see every
    instance take it (:mod:`ensembles.lifecycle` waits on it before it unloads
    what the old file named).
    """
    return int.from_bytes(hashlib.sha256(data).digest()[:6], "big")


def shared_copy(path: Path, model: str) -> Path:
    """Where the instances of ``model`` keep the last valid copy of ``path``.

    Per model, because validity is: a file naming model ``m`` is a loop for
    ``m`` itself and valid for any other model reading it.
    """
    return path.with_name(f"{path.name}.{model}.last-valid")


def _stat(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass(frozen=True)
class Change:
    """What one poll found. ``refused``: a file was invalid (count it); ``note``: log it."""

    took_effect: bool = False
    refused: str = ""
    note: str = ""


class Watched(Generic[T]):
    """``loads(bytes, origin)`` of ``path`` at start; its error propagates (no start on a bad file).

    ``shared``: the last valid copy shared with the model's other instances
    (:func:`shared_copy`); None: this instance alone. :meth:`poll` is safe
    to call from several threads.
    """

    def __init__(
        self, path: Path, loads: Callable[[bytes, str], T], *, shared: Path | None = None
    ) -> None:
        self.path, self.shared, self._loads = path, shared, loads
        self._lock = threading.Lock()
        self._stamp = _stat(path)
        data = read_bytes(path)
        self.current: T = loads(data, str(path))
        #: :func:`file_digest` of the bytes in force.
        self.digest = file_digest(data)
        self._from_ns = self._stamp[0] if self._stamp else 0  # mtime of what is in force
        self._file_ok = True
        self._shared_stamp: Stamp | None = None
        self.reloads = 0
        self.failures = 0
        self._queued: list[Change] = []
        note = self._publish(data, self._stamp)
        if note:
            self._queued.append(Change(note=note))

    def poll(self) -> list[Change]:
        """Take a changed file (or, while it is invalid, a newer shared copy); say what happened."""
        with self._lock:
            out, self._queued = self._queued, []
            stamp = _stat(self.path)
            if stamp != self._stamp:
                self._stamp = stamp
                out.append(self._reload(stamp))
            if not self._file_ok and self.shared is not None:
                adopted = self._adopt_shared()
                if adopted is not None:
                    out.append(adopted)
            return out

    def _reload(self, stamp: Stamp | None) -> Change:
        try:
            data = read_bytes(self.path)
            fresh = self._loads(data, str(self.path))
        except SetsunaError as exc:
            self.failures += 1
            self._file_ok = False
            self._shared_stamp = None  # look at the copy again: it may be newer than ours
            return Change(refused=f"{exc} (still serving the previous file)")
        self.current, self._file_ok, self.digest = fresh, True, file_digest(data)
        self._from_ns = stamp[0] if stamp else 0
        self.reloads += 1
        return Change(took_effect=True, note=self._publish(data, stamp))

    def _publish(self, data: bytes, stamp: Stamp | None) -> str:
        """Offer a validated file to the other instances; a note when it could not be written."""
        if self.shared is None or stamp is None:
            return ""
        folder = self.shared.parent
        tmp = folder / f".{self.shared.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            tmp.write_bytes(data)
            os.utime(tmp, ns=(stamp[0], stamp[0]))
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # compare and replace as one step
                held = _stat(self.shared)
                if held is None or held[0] <= stamp[0]:
                    tmp.replace(self.shared)
            finally:
                os.close(fd)  # releases the lock
        except OSError as exc:
            return (
                f"cannot write the last valid copy {self.shared}: {exc}; the model's instances "
                f"may disagree while {self.path} is invalid: make its folder writable"
            )
        finally:
            tmp.unlink(missing_ok=True)
        return ""

    def _adopt_shared(self) -> Change | None:
        assert self.shared is not None
        stamp = _stat(self.shared)
        if stamp is None or stamp == self._shared_stamp:
            return None
        self._shared_stamp = stamp
        if stamp[0] <= self._from_ns:
            return None  # what this instance serves is as new as the copy
        try:
            data = read_bytes(self.shared)
            fresh = self._loads(data, str(self.shared))
        except SetsunaError as exc:
            return Change(note=f"the last valid copy is not valid here: {exc}")
        self.current, self._from_ns, self.digest = fresh, stamp[0], file_digest(data)
        self.reloads += 1
        return Change(
            took_effect=True,
            note=f"{self.path} is invalid: serving the newer valid copy another instance took",
        )


class Poller:
    """Calls ``fn`` every ``interval_s`` from a daemon thread until :meth:`stop`.

    An exception from ``fn`` goes to ``on_error`` and the loop goes on: a
    watcher must not die of one bad poll.
    """

    def __init__(
        self,
        fn: Callable[[], None],
        interval_s: float,
        on_error: Callable[[BaseException], None],
        name: str = "watch",
    ) -> None:
        self._fn, self._interval_s, self._on_error = fn, interval_s, on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._fn()
            except Exception as exc:  # reported, never fatal to the loop
                self._on_error(exc)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
