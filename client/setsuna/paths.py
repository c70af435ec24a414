"""Where setsuna keeps its per-user files (cache, PID files): one convention for every package.

The build caches compiled forests there and the local server caches its
backend directory and argv shim there. Both used to pick their own place
(``<repo>/.cache`` for the one, XDG for the other); one function now decides,
so one variable moves or isolates everything, and an installed setsuna (no
repository around it) still has somewhere to write.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Overrides the cache root outright (CI caching, a shared build host, tests).
CACHE_ENV = "SETSUNA_CACHE_DIR"


def cache_root() -> Path:
    """``$SETSUNA_CACHE_DIR``, else ``$XDG_CACHE_HOME/setsuna``, else ``~/.cache/setsuna``.

    An empty variable counts as unset, as the XDG specification asks. Nothing is
    created here: callers that run code from the cache (the server) check its
    ownership and mode themselves.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "setsuna"


def runtime_root() -> Path:
    """Where live processes keep their PID files: ``$XDG_RUNTIME_DIR/setsuna``, else ``run/``
    under :func:`cache_root` (per user, never shared)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "setsuna" if xdg else cache_root() / "run"
