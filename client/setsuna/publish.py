"""Publish a model folder aside, then swap it in: a serving folder is never half-written.

Rewriting a model folder in place means a build killed midway leaves the
server a folder that is neither the old model nor the new one. Instead,
:func:`publish` writes the whole new folder inside a hidden box in the same
repository directory (``<repo>/.publish.<model>.<token>/<model>/``: the box's
name starts with '.', which the server's model discovery skips, and the
folder inside already has its final name, so whatever records that name,
such as a signed seal, records the right one), syncs it to disk, lets the
caller verify it, and only then exchanges it with the live folder in one
atomic ``renameat2(RENAME_EXCHANGE)``: at every instant ``<repo>/<model>`` is
the complete old folder or the complete new one. The old folder, now in the
box, is deleted last, with the box.

One publisher per model at a time: an ``flock`` on ``<repo>/.publish.<model>.lock``
is held from the cleanup of leftovers to the deletion of the old folder. The
kernel drops it when its holder dies, so a killed publisher never blocks the
next one, and every box of that model found under the lock is a leftover of
a dead publisher, removed before the new one is written. The lock file
itself stays (deleting it would race with a publisher about to lock it).

Linux only (``fcntl``); ``RENAME_EXCHANGE`` needs glibc >= 2.28 and a file
system that supports it (ext4, xfs, btrfs, tmpfs ...). Elsewhere the swap
falls back to two renames, with a warning: the folder is then missing for
the instant between them, and still never half-written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from setsuna import seal
from setsuna.errors import ArtifactError

#: Prefix of every hidden name a publish creates in a repository.
PREFIX = ".publish."
#: How long a second publisher of the same model waits before giving up.
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.05
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TOKEN_RE = re.compile(r"[0-9a-f]{16}")


def publish(
    repo: Path,
    name: str,
    write: Callable[[Path], None],
    *,
    check: Callable[[Path], object] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Path:
    """Make ``repo/name`` exactly what ``write`` produces, atomically; return that path.

    ``write(folder)`` fills an empty folder named ``name`` (inside a hidden
    box) with the model's whole content (``config.pbtxt`` and its version
    folders); every version folder is then sealed with the publisher's key
    (:mod:`setsuna.seal`) and verified. ``check(folder)`` (a manifest
    verification, say) runs on it once it is on disk and before anything live
    is touched; if ``write`` or ``check`` raises, the box is removed and
    ``repo/name`` is as it was. ``on_wait`` is told once when another process
    holds the model's lock; after ``lock_timeout_s`` the publish fails with
    ArtifactError.
    """
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise ArtifactError(
            f"cannot publish model {name!r}: a model folder name is letters, digits, '_', "
            "'.' and '-', not starting with '.' or '-'"
        )
    repo.mkdir(parents=True, exist_ok=True)
    with model_lock(repo, name, timeout_s=lock_timeout_s, on_wait=on_wait):
        remove_leftovers(repo, name)
        box = repo / f"{PREFIX}{name}.{secrets.token_hex(8)}"
        staged = box / name
        staged.mkdir(parents=True)
        try:
            write(staged)
            # Signed before it goes live, verified as the server will verify it.
            for version in seal.seal_model(staged):
                seal.verify_version(version.parent)
            sync_tree(box)
            if check is not None:
                check(staged)
        except BaseException:
            shutil.rmtree(box, ignore_errors=True)
            raise
        target = repo / name
        swap_in(staged, target)
        fsync_dir(repo)
        fsync_dir(box)
        shutil.rmtree(box, ignore_errors=True)  # the old folder; a leftover if this dies
    return target


@contextmanager
def model_lock(
    repo: Path,
    name: str,
    *,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive publish lock of model ``name`` in ``repo``."""
    path = repo / f"{PREFIX}{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise ArtifactError(
                        f"model {name!r} in {repo} is being published by process {holder} "
                        f"(lock {path} held for over {timeout_s:.0f} s); wait for it to "
                        "finish, or stop it, then publish again"
                    ) from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for process {holder}, which is publishing {name!r}")
                    told = True
                time.sleep(_LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def leftovers(repo: Path, name: str) -> list[Path]:
    """Boxes a publish of model ``name`` left in ``repo`` (a new folder, or an old one).

    Only safe to delete while holding :func:`model_lock`: then no live
    process owns any of them.
    """
    head = f"{PREFIX}{name}."
    return sorted(
        p
        for p in repo.iterdir()
        if p.name.startswith(head)
        and _TOKEN_RE.fullmatch(p.name[len(head) :])
        and p.is_dir()
        and not p.is_symlink()
    )


def remove_leftovers(repo: Path, name: str) -> list[Path]:
    """Delete :func:`leftovers` (call under :func:`model_lock`); return what was removed."""
    found = leftovers(repo, name)
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def swap_in(staged: Path, target: Path) -> None:
    """Put ``staged`` at ``target`` atomically; the old ``target``, if any, ends at ``staged``."""
    try:
        exchange(staged, target)
        return
    except FileNotFoundError:
        if staged.exists():  # no target yet: nothing to exchange with
            staged.rename(target)
            return
        raise
    except ExchangeUnsupportedError as exc:
        warnings.warn(
            f"{exc}; swapping {target} in with two renames, so it is missing for an instant",
            RuntimeWarning,
            stacklevel=2,
        )
    if not os.path.lexists(target):
        staged.rename(target)
        return
    aside = staged.with_name(staged.name + ".old")
    target.rename(aside)
    try:
        staged.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    aside.rename(staged)


class ExchangeUnsupportedError(OSError):
    """This system cannot exchange two paths atomically."""


def exchange(a: Path, b: Path) -> None:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    FileNotFoundError when either is missing; ``ExchangeUnsupportedError`` when
    libc, the kernel or the file system cannot do it.
    """
    fn = _renameat2()
    if fn is None:
        raise ExchangeUnsupportedError("this C library has no renameat2 (glibc >= 2.28 has)")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise ExchangeUnsupportedError(
            f"renameat2(RENAME_EXCHANGE) on {b.parent}: {os.strerror(err)}"
        )
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, deepest first, ``folder`` last."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for entry in files + dirs:
            p = Path(root) / entry
            if not p.is_symlink():
                _fsync_path(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """fsync a directory, so the names created or renamed in it reach the disk."""
    _fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
