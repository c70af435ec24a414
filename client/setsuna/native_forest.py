"""``setsuna_forest``: the native Triton backend for compiled forests, built from source.

Every engine call on the ``local`` target used to cross the Python-backend
stub (~0.2 ms a request, a process per instance) for a forest that takes
4-25 us. ``native/forest/*.c`` is a Triton backend in C that serves the same
compiled forests in-process, with the same contract as the Python wrapper
(:mod:`setsuna.backend`): the seal and manifest verified at load, per-request
refusals, deadline shedding, no default prediction.

This module compiles it with the system C compiler, once per source hash
(under setsuna's cache root, in a directory only this user may write: the
server loads this code), and says which models it can serve. It needs
nothing but a C compiler: its Triton and OpenSSL declarations are its own
(``triton_api.h``, ``crypto.c``), checked against the server's API version at
load. Where it cannot be built or cannot serve an engine, the build falls
back to the Python wrapper and says why (:func:`choose`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from setsuna.errors import ServerError

#: The backend's name in ``config.pbtxt`` and its folder in the backend directory.
BACKEND: Final = "setsuna_forest"
#: Triton loads ``<backend-directory>/<name>/libtriton_<name>.so``.
LIBRARY: Final = f"libtriton_{BACKEND}.so"
#: Engines the backend runs: the build's compiled forests (and the build's switch of them).
ENGINES: Final = ("tl2cgen", "lleaves")
#: Set to ``0`` to publish every forest on the Python wrapper instead.
ENV: Final = "SETSUNA_NATIVE"
SOURCE_DIR: Final = Path(__file__).resolve().with_name("native") / "forest"
CFLAGS: Final = (
    "-std=c11",
    "-D_GNU_SOURCE",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
)
LIBS: Final = ("-ldl", "-lm")


def compiler() -> str | None:
    """``$CC``, else ``cc``, else ``gcc``: the first one on ``PATH``."""
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


def sources() -> list[Path]:
    """The backend's C sources and headers, sorted (what the cache key hashes)."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def source_key(cc: str) -> str:
    """sha256 over the compiler's identity, the flags and every source file."""
    h = hashlib.sha256()
    try:
        ident = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        ident = ""
    for part in (shutil.which(cc) or cc, ident, " ".join(CFLAGS + LIBS)):
        h.update(part.encode() + b"\0")
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build(cache_root: Path | None = None) -> Path:
    """The compiled backend folder (``.../setsuna_forest/``), compiled on first use.

    Raises :class:`ServerError` saying why when it cannot be built (no
    compiler, a compile error): callers fall back to the Python wrapper.
    """
    from setsuna.paths import cache_root as default_root
    from setsuna.server import private_directory

    cc = compiler()
    if cc is None:
        raise ServerError("no C compiler (cc, gcc or $CC) to build setsuna_forest")
    root = private_directory((default_root() if cache_root is None else cache_root) / "native")
    final = root / f"{BACKEND}-{source_key(cc)[:16]}"
    if (final / BACKEND / LIBRARY).is_file():
        return final / BACKEND
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        (work / BACKEND).mkdir()
        out = work / BACKEND / LIBRARY
        c_files = [str(p) for p in sources() if p.suffix == ".c"]
        done = subprocess.run(
            [cc, *CFLAGS, "-o", str(out), *c_files, *LIBS],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"compiling setsuna_forest failed:\n{done.stderr.strip()[-2000:]}")
        with contextlib.suppress(OSError):  # another process won the race: same build
            work.rename(final)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"could not build setsuna_forest: {exc}") from exc
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final / BACKEND


@functools.lru_cache(maxsize=1)
def _built() -> tuple[Path | None, str]:
    try:
        return build(), ""
    except ServerError as exc:
        return None, str(exc)


def available() -> tuple[Path | None, str]:
    """The built backend folder, or None and why not (built once per process)."""
    if os.environ.get(ENV, "1") == "0":
        return None, f"${ENV}=0"
    return _built()


def unsupported(engine: str, params: Mapping[str, Any]) -> str:
    """Why the backend cannot serve ``engine`` with ``params`` ("" when it can)."""
    if engine == "switch":
        parts = [params.get("small"), params.get("large")]
        if not all(isinstance(p, Mapping) for p in parts):
            return "a switch without small/large engines"
        whys = [unsupported(str(p.get("engine")), p.get("params", {})) for p in parts if p]
        return "; ".join(w for w in whys if w)
    if engine not in ENGINES:
        return f"engine {engine!r}: setsuna_forest serves {', '.join(ENGINES)} and their switch"
    if int(params.get("n_outputs", 1)) != 1:
        return (
            f"{engine} answering {params.get('n_outputs')} class probabilities per row "
            "(setsuna_forest serves one score per row, score FP32 [1])"
        )
    if int(params.get("threads", 1)) != 1:
        threads = params.get("threads")
        return f"{engine} with threads={threads} (setsuna_forest runs one thread per instance)"
    return ""


def choose(engine: str, params: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a ``local`` model of this engine is published on setsuna_forest, and if not why."""
    why = unsupported(engine, params)
    if why:
        return False, why
    folder, why = available()
    return folder is not None, why


def install(backend_dir: Path) -> bool:
    """Copy the built backend into a Triton backend directory; False (and nothing) if unbuilt."""
    folder, _ = available()
    if folder is None:
        return False
    dest = backend_dir / BACKEND
    dest.mkdir(exist_ok=True)
    shutil.copy2(folder / LIBRARY, dest / LIBRARY)
    return True


def library_digest() -> bytes:
    """sha256 of the built library ("" if unbuilt): part of the backend directory's key."""
    folder, _ = available()
    if folder is None:
        return b""
    with contextlib.suppress(OSError):
        return hashlib.sha256((folder / LIBRARY).read_bytes()).digest()
    return b""
