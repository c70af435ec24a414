"""The cache of compiled forests that lleaves and tl2cgen share.

Compiling a 500-tree forest takes over a minute, and the result depends only
on the source and the tools, so each compiled library is kept under
``cache_dir/<engine>/<key>.so``: the key hashes the source's sha256 with
everything else that changes the output (library versions, the CPU for
lleaves, the C templates for tl2cgen). The cache root is setsuna's one cache
directory (:func:`setsuna.paths.cache_root`); candidates get a copy, which is
what the manifest hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from setsuna import paths
from setsuna.errors import SetsunaError

#: Re-exported: the variable that moves the cache (see :mod:`setsuna.paths`).
CACHE_ENV = paths.CACHE_ENV


def default_cache_dir() -> Path:
    """setsuna's cache root: ``$SETSUNA_CACHE_DIR``, else XDG (``~/.cache/setsuna``).

    Created 0700 when missing: the local server keeps code it runs under the
    same root and refuses one that others may write, so a build must not be the
    one that creates it with a loose umask.
    """
    root = paths.cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def package_version(package: str) -> str:
    """An installed package's version, for cache keys and candidate notes."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def cache_key(*parts: str) -> str:
    """sha256 over ``parts``, NUL-separated so that no two splits collide."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target``, atomically renamed to it on success.

    Concurrent builds of the same model then never see a half-written cache
    entry: each writes its own temporary file and the last rename wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()
    try:
        yield tmp_path
        tmp_path.replace(target)
    finally:
        tmp_path.unlink(missing_ok=True)


def run_tool(cmd: list[str], what: str) -> None:
    """Run a build tool; its stderr becomes the error a Skipped candidate reports."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetsunaError(f"{what} failed ({' '.join(cmd)}): {done.stderr.strip()[-500:]}")
