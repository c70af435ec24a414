"""One ``setsuna.server`` per model repository, and a stop that ends exactly that one.

``make stop`` used to ``pkill -f "tritonserver.*<repo>/local"``, which also
ended anyone else's Triton serving a folder of that name (another user's,
another checkout's). Now ``python -m setsuna.server`` holds an exclusive
``flock`` on a PID file named after the repository's resolved path, in a
private directory (:func:`setsuna.paths.runtime_root`: ``$XDG_RUNTIME_DIR/setsuna``,
else ``run/`` in the cache root; 0700), for as long as it supervises:

- a second server on the same repository is refused, naming the first's PID;
- ``python -m setsuna.server --stop`` (``make stop``) reads the PID only while
  the lock is held: a lock nobody holds means nothing runs, whatever the file
  says (a supervisor killed with ``kill -9`` leaves the file, never the
  lock). It checks that the process is this user's ``setsuna.server``, sends
  it SIGTERM (it stops tritonserver and the stubs) and waits until the lock
  is released.

The file is never unlinked: removing a locked file lets the next server lock
a new inode while a reader still holds the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import time
from pathlib import Path

from setsuna import paths
from setsuna.errors import ServerError

#: What the command line of the process holding the lock must contain.
SERVER_MODULE = "setsuna.server"


def lock_path(repository: Path, root: Path | None = None) -> Path:
    """The PID file of ``repository`` (by its resolved path: two spellings, one lock)."""
    from setsuna.server import private_directory  # the cache's ownership checks

    key = hashlib.sha256(str(repository.resolve()).encode()).hexdigest()[:16]
    return private_directory(paths.runtime_root() if root is None else root) / f"serve-{key}.pid"


def _open(path: Path, create: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise ServerError(f"cannot open the server's PID file {path}: {exc}") from exc


def _holder(fd: int) -> int | None:
    """The PID written in the file (the first line), if it reads as one."""
    raw = os.pread(fd, 64, 0).split(b"\n", 1)[0]
    return int(raw) if raw.strip().isdigit() else None


class ServeLock:
    """Held by the supervising ``setsuna.server`` process while it serves ``repository``."""

    def __init__(self, repository: Path, root: Path | None = None) -> None:
        self.repository = repository
        self.path = lock_path(repository, root)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path, create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _holder(fd)
            os.close(fd)
            raise ServerError(
                f"a setsuna.server (pid {other}) already serves {self.repository}: stop it "
                f"first (make stop, or python -m setsuna.server --stop --model-repository "
                f"{self.repository})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.repository.resolve()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> ServeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_our_server(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}").stat()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return st.st_uid == os.geteuid() and any(SERVER_MODULE.encode() == a for a in cmdline)


def server_pid(repository: Path, root: Path | None = None) -> int | None:
    """The PID in ``repository``'s PID file when it is this user's ``setsuna.server``.

    Read-only: the lock is not probed (taking it, even briefly, could refuse a
    server starting at that moment). A file left by a killed supervisor names
    a dead PID, or one reused by another program: both read as None.
    """
    path = lock_path(repository, root)
    if not path.exists():
        return None
    fd = _open(path, create=False)
    try:
        pid = _holder(fd)
    finally:
        os.close(fd)
    return pid if pid is not None and _is_our_server(pid) else None


def stop(repository: Path, *, timeout_s: float = 30.0, root: Path | None = None) -> int | None:
    """SIGTERM the ``setsuna.server`` serving ``repository``; its PID, or None if none runs.

    Waits until it released the lock (it stops tritonserver first). Refuses,
    killing nothing, when the lock holder is not this user's ``setsuna.server``.
    """
    path = lock_path(repository, root)
    if not path.exists():
        return None
    fd = _open(path, create=False)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None  # nobody holds it: nothing serves this repository
        except BlockingIOError:
            pass
        pid = _holder(fd)
        if pid is None or not _is_our_server(pid):
            raise ServerError(
                f"the lock of {repository} ({path}) is held by pid {pid}, which is not your "
                f"{SERVER_MODULE}; nothing was stopped"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return pid
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{SERVER_MODULE} pid {pid} did not stop within {timeout_s:g} s"
                    ) from None
                time.sleep(0.05)  # polling a lock another process releases: no event to wait on
    finally:
        os.close(fd)
