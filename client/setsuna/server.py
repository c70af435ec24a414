"""The one place that knows how to run Triton: flags, environment, lifecycle.

The ``nvidia-pytriton`` wheel ships a real ``tritonserver`` (2.51) with only
the Python backend and the local response cache. Running it outside pytriton
needs a few measured tricks, all kept here so nothing else has to know them:

* the loader needs the wheel's ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``,
  and the running interpreter's ``LIBDIR`` must come *first*, or the Python
  backend stub binds the system libpython and dies with
  ``'_thread.RLock' object has no attribute '_recursion_count'``;
* the stub ignores ``PYTHONPATH``; it finds the venv (and the editable
  ``setsuna``) only when the venv's ``bin/`` leads ``PATH`` and ``VIRTUAL_ENV``
  is set, exactly as if the venv were activated;
* the stub for this Python version must be *copied* next to
  ``libtriton_python.so`` in a private backend directory (its RPATH points
  into the wheel, so the libs directory above is what makes the copy load);
* a model with ``response_cache`` enabled runs uncached, silently, unless the
  server gets ``--cache-config``.

:class:`ServerSettings` is the single source of the server's flags:
:meth:`ServerSettings.flags` has no local paths, so a ``docker-compose.yml``
can be generated from it (or checked against it); :class:`LocalTriton` adds
the local-only paths and runs the binary. The server never runs unrestricted:
model load/unload, logging, trace and shared-memory APIs need the admin
header, over HTTP and gRPC alike.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import importlib.util
import ipaddress
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Self

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from setsuna import native_forest, seal, serve_lock, stub_guard
from setsuna.errors import ConfigError, ServerError, SetsunaError
from setsuna.pool import ModelPool, PoolSettings
from setsuna.watchdog import ModelWatchdog

MiB: Final = 1 << 20

#: Environment variable holding the admin token; unset means one is generated per process.
ADMIN_TOKEN_ENV: Final = "SETSUNA_ADMIN_TOKEN"
#: Header (HTTP) / metadata key (gRPC) that must carry the admin token.
ADMIN_HEADER: Final = "admin-key"
#: Prefix Triton's gRPC server puts before the restricted-protocol key it checks.
GRPC_HEADER_PREFIX: Final = "triton-grpc-protocol-"
#: APIs that change or expose server state; inference, health and metadata stay open.
RESTRICTED_APIS: Final = ("model-repository", "logging", "trace", "shared-memory")
#: Every name 2.51 accepts for ``--http-restricted-api`` / ``--grpc-restricted-protocol``.
KNOWN_APIS: Final = frozenset(
    {
        "health",
        "metadata",
        "inference",
        "shared-memory",
        "model-config",
        "model-repository",
        "statistics",
        "trace",
        "logging",
    }
)
#: Stands in for the admin key on tritonserver's command line (``native/argv_secret.c``).
TOKEN_PLACEHOLDER: Final = "@SETSUNA_ADMIN_TOKEN@"
#: The environment variable that carries the key to that shim; it unsets it before main().
_SECRET_ENV: Final = "SETSUNA_TRITON_ADMIN_KEY"
_SECRET_MARK_ENV: Final = "SETSUNA_ARGV_SECRET_SO"
#: Shared-memory regions the Python backend creates per model instance.
SHM_PREFIX: Final = "triton_python_backend_shm_region_"
#: Largest value Triton's int-typed size flags take.
_MAX_INT32: Final = 2**31 - 1
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_HEADER_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_LOG_TAIL_LINES: Final = 40
_POLL_INTERVAL_S: Final = 0.2
#: Extra wait after ``--exit-timeout-secs`` before SIGKILL: model unloading takes a moment.
_STOP_GRACE_S: Final = 15.0


# --------------------------------------------------------------------------- admin token

_generated_token: str | None = None
_token_lock = threading.Lock()


def admin_token() -> str:
    """The admin token: ``$SETSUNA_ADMIN_TOKEN``, else one random token per process.

    Generating rather than defaulting to "no auth" is deliberate: a local
    server that anyone on the host can reload models on is how a wrong model
    ends up trading. The generated token is stable for the life of the
    process, so every :class:`LocalTriton` in it (and its tests) agree.
    """
    global _generated_token
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env is not None:
        if not _TOKEN_RE.fullmatch(env):
            raise ConfigError(
                f"${ADMIN_TOKEN_ENV} must be 16-256 characters of A-Z a-z 0-9 . _ ~ -; "
                f"generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                f" (or unset it to get a random token for this process)"
            )
        return env
    with _token_lock:
        if _generated_token is None:
            _generated_token = secrets.token_urlsafe(32)
        return _generated_token


def admin_token_source() -> str:
    """Where :func:`admin_token` comes from, for humans (never the token itself)."""
    if ADMIN_TOKEN_ENV in os.environ:
        return f"${ADMIN_TOKEN_ENV}"
    return "generated for this process"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerSettings:
    """Everything that decides how Triton runs, validated once at construction.

    ``load_models=None`` means every model folder in ``model_repository``
    (resolved here, into :attr:`models`); an explicit tuple loads only those,
    and ``()`` starts a server with no models. Model control is always
    ``explicit``: ``poll`` would load whatever lands in the folder and ``none``
    cannot load/unload at all. ``bind_address`` must be loopback unless
    ``allow_remote_bind`` says exposing the server is intended (a container).
    ``cache_size_bytes=0`` turns the response cache off.

    ``http=False`` (the default) serves gRPC only: Triton 2.51's HTTP
    frontend is crashed by one unauthenticated request (a JSON shape of
    ``[1000000000, 48]`` aborts it with ``bad_alloc``; a body over ~68 MiB
    segfaults it) and has no body limit to set, while its gRPC frontend refuses
    both cleanly. Turn HTTP on only where every client that can reach the port
    is trusted (the container publishes it on the host's loopback).
    """

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    bind_address: str = "127.0.0.1"
    allow_remote_bind: bool = False
    http: bool = False
    load_models: tuple[str, ...] | None = None
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS
    admin_header: str = ADMIN_HEADER
    max_input_size_bytes: int = 64 * MiB
    cache_size_bytes: int = 256 * MiB
    log_verbose: int = 0
    exit_timeout_s: int = 5
    models: tuple[str, ...] = field(init=False)

    @classmethod
    def on_free_ports(cls, model_repository: Path, **settings: Any) -> ServerSettings:
        """Settings for ``model_repository`` on three ports free now (tests, benchmarks)."""
        http, grpc, metrics = free_ports(3)
        return cls(
            model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics, **settings
        )

    def __post_init__(self) -> None:
        repo = Path(self.model_repository).expanduser()
        if not repo.is_dir():
            raise ConfigError(
                f"model repository {repo} is not a directory: build it first "
                "(make build) or pass --model-repository"
            )
        object.__setattr__(self, "model_repository", repo.resolve())
        self._check_ports()
        self._check_bind()
        object.__setattr__(self, "models", self._resolve_models())
        self._check_restrictions()
        if not 1 <= self.max_input_size_bytes <= _MAX_INT32:
            raise ConfigError(
                f"max_input_size_bytes={self.max_input_size_bytes}: give 1..{_MAX_INT32} "
                f"bytes (default {64 * MiB}, 64 MiB)"
            )
        if not 0 <= self.cache_size_bytes <= 2**63 - 1:
            raise ConfigError(
                f"cache_size_bytes={self.cache_size_bytes}: give a size >= 0 "
                "(0 turns the response cache off)"
            )
        if not 0 <= self.log_verbose <= 3:
            raise ConfigError(f"log_verbose={self.log_verbose}: give 0 (quiet) to 3 (noisiest)")
        if not 0 <= self.exit_timeout_s <= 600:
            raise ConfigError(
                f"exit_timeout_s={self.exit_timeout_s}: give 0..600 seconds to drain "
                "in-flight requests on shutdown"
            )

    def _check_ports(self) -> None:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port}
        ports["metrics_port"] = self.metrics_port
        for name, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"{name}={port!r}: give a TCP port in 1..65535")
        if len(set(ports.values())) != len(ports):
            raise ConfigError(f"ports must differ, got {ports}: give each endpoint its own port")

    def _check_bind(self) -> None:
        try:
            addr = ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError(
                f"bind_address={self.bind_address!r} is not an IP address: Triton binds "
                "literal addresses; use 127.0.0.1 for local use"
            ) from None
        if not addr.is_loopback and not self.allow_remote_bind:
            raise ConfigError(
                f"bind_address={self.bind_address} exposes the server beyond this host; "
                "use 127.0.0.1, or set allow_remote_bind=True (--allow-remote-bind) "
                "if that is intended (e.g. inside a container)"
            )

    def _resolve_models(self) -> tuple[str, ...]:
        on_disk = sorted(
            p.name
            for p in self.model_repository.iterdir()
            if p.is_dir() and not p.name.startswith(".")
        )
        if self.load_models is None:
            if not on_disk:
                raise ConfigError(
                    f"model repository {self.model_repository} has no model folders: "
                    "build models into it first (make build)"
                )
            return tuple(on_disk)
        models = tuple(self.load_models)
        for name in models:
            if not isinstance(name, str) or not _MODEL_NAME_RE.fullmatch(name):
                raise ConfigError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
        missing = sorted(set(models) - set(on_disk))
        if missing:
            raise ConfigError(
                f"models {missing} are not folders in {self.model_repository}; it has {on_disk}"
            )
        if len(set(models)) != len(models):
            raise ConfigError(f"load_models lists a model twice: {list(models)}")
        return models

    def _check_restrictions(self) -> None:
        unknown = sorted(set(self.restricted_apis) - KNOWN_APIS)
        if unknown:
            raise ConfigError(
                f"unknown restricted APIs {unknown}: Triton 2.51 knows {sorted(KNOWN_APIS)}"
            )
        if "model-repository" not in self.restricted_apis:
            raise ConfigError(
                "restricted_apis must include 'model-repository': an unrestricted server "
                "lets anyone who can reach it load or unload models"
            )
        if not _HEADER_RE.fullmatch(self.admin_header):
            raise ConfigError(
                f"admin_header={self.admin_header!r}: use lowercase letters, digits and '-' "
                "(gRPC metadata keys must be lowercase)"
            )

    def flags(
        self,
        *,
        token: str | None = None,
        max_input_size_flag: bool = True,
        skip_models: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Server flags without the binary or any local path (see :meth:`local_flags`).

        ``token`` defaults to :func:`admin_token`; a compose file passes
        ``"${SETSUNA_ADMIN_TOKEN}"`` so the secret stays out of the file.
        ``skip_models`` are left out of ``--load-model`` (their config does not
        parse). ``max_input_size_flag=False`` leaves out ``--http-max-input-size``,
        which newer Triton releases take but the wheel's 2.51 rejects as unknown
        (:class:`LocalTriton` probes ``--help`` and sizes the stack instead).
        """
        value = admin_token() if token is None else token
        if not value or any(c in value for c in ",:= \t\r\n"):
            raise ConfigError(
                "the admin token must be non-empty without ',', ':', '=' or whitespace: "
                "Triton parses them as flag syntax"
            )
        restricted = f"{','.join(self.restricted_apis)}:{self.admin_header}={value}"
        http = (
            [
                f"--http-address={self.bind_address}",
                f"--http-port={self.http_port}",
                f"--http-restricted-api={restricted}",
            ]
            if self.http
            else ["--allow-http=false"]
        )
        out = [
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models if name not in skip_models),
            # One model failing to load must not take the others down: the server
            # stays up and ready, and each model's own readiness says which failed.
            "--strict-readiness=false",
            "--exit-on-error=false",
            # Every config setsuna writes is complete (built as Triton's ModelConfig and
            # parsed by its schema); auto-completion would start a whole Python stub per
            # Python-backend load just to ask for a config (LaunchAutoCompleteStubProcess):
            # ~1.3 s of a 1.45 s cold load (perf/pool.py, docs/architecture.md).
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *http,
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.bind_address}",
            f"--metrics-port={self.metrics_port}",
            # Latency quantiles (p50 ... p99.9 per model): 2.51's latency counters alone give
            # averages; the alert rules and the dashboard read these (deploy/prometheus).
            "--metrics-config=summary_latencies=true",
            f"--grpc-restricted-protocol={restricted}",
        ]
        if max_input_size_flag and self.http:
            out.append(f"--http-max-input-size={self.max_input_size_bytes}")
        if self.cache_size_bytes > 0:
            out.append(f"--cache-config=local,size={self.cache_size_bytes}")
        out.append(f"--log-verbose={self.log_verbose}")
        return out

    def local_flags(self, *, backend_directory: Path, cache_directory: Path) -> list[str]:
        """The flags that name paths on this host; a container mounts its own."""
        return [
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--cache-directory={cache_directory}",
        ]


# --------------------------------------------------------------------------- the wheel


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the ``nvidia-pytriton`` wheel that running the binary needs."""

    binary: Path
    python_backend: Path
    stubs: Path
    caches: Path
    libs: Path

    def stub(self) -> Path:
        """The Python backend stub built for the running interpreter's version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        path = self.stubs / version / "triton_python_backend_stub"
        if not path.is_file():
            have = sorted(p.name for p in self.stubs.iterdir()) if self.stubs.is_dir() else []
            raise ServerError(
                f"no Python backend stub for Python {version} in {self.stubs} (has {have}); "
                "run setsuna with one of those Python versions"
            )
        return path


def locate_install() -> TritonInstall:
    """Find the wheel's server files, or say how to install them."""
    spec = importlib.util.find_spec("pytriton")
    hint = "install the serving extra: pip install 'setsuna[serve]'"
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"tritonserver not found (no 'pytriton' package): {hint}")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stubs=root / "python_backend_stubs",
        caches=root / "caches",
        libs=pkg.parent / "nvidia_pytriton.libs",
    )
    if not os.access(install.binary, os.X_OK):
        raise ServerError(f"tritonserver not found or not executable at {install.binary}: {hint}")
    for needed in (install.python_backend / "libtriton_python.so", install.caches, install.libs):
        if not needed.exists():
            raise ServerError(f"the nvidia-pytriton install lacks {needed}: reinstall it ({hint})")
    return install


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel."""
    return locate_install().binary


def server_environment(
    install: TritonInstall, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the binary and its Python stubs need (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    libpython = Path(libdir) / f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not libpython.exists():
        raise ServerError(
            f"{libpython} does not exist: the Python backend stub needs a Python built with "
            "--enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )
    old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, str(install.libs), *old])
    env.pop("PYTHONHOME", None)  # would override the venv discovery below
    if sys.prefix != sys.base_prefix:  # a venv: make the stub see it as activated
        env["VIRTUAL_ENV"] = sys.prefix
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p]
        env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), *path])
    return env


@functools.lru_cache(maxsize=8)
def _binary_knows(binary: Path, flag: str, libs: Path) -> bool:
    """Whether ``binary --help`` lists ``flag``: old servers exit on unknown flags."""
    env = dict(os.environ)
    old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs), *old])  # an empty entry means cwd
    try:
        done = subprocess.run(
            [str(binary), "--help"], env=env, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"could not run {binary} --help: {exc}") from exc
    return f"{flag} " in done.stdout + done.stderr


def prepare_backend_directory(install: TritonInstall, cache_root: Path | None = None) -> Path:
    """A private backend directory: ``python/`` with this Python's stub, and ``setsuna_forest/``.

    The native forest backend (:mod:`setsuna.native_forest`) is included when
    it could be built here; without it, models published on it do not load
    (the build publishes them on the Python wrapper in that case).

    Keyed by the content hash of the files, so it is built once per
    wheel and Python version and shared safely between concurrent servers
    (built in a temporary sibling, then renamed into place).
    """
    stub = install.stub()
    files = [
        install.python_backend / "libtriton_python.so",
        install.python_backend / "triton_python_backend_utils.py",
        stub,
    ]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    digest.update(native_forest.library_digest())
    root = _cache_root() if cache_root is None else cache_root
    final = root / digest.hexdigest()[:16]
    if (final / "python" / stub.name).is_file():
        return final
    private_directory(root)
    try:
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        (work / "python").mkdir()
        for f in files:
            shutil.copy2(f, work / "python" / f.name)  # copy2 keeps the stub executable
        native_forest.install(work)  # setsuna_forest/, when a C compiler could build it
        try:
            work.rename(final)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        raise ServerError(f"could not prepare the backend directory in {root}: {exc}") from exc
    return final


def _cache_root() -> Path:
    return _setsuna_cache() / "triton-backends"


def _setsuna_cache() -> Path:
    from setsuna.paths import cache_root  # the one cache convention (build and server)

    return cache_root()


def private_directory(path: Path) -> Path:
    """``path`` created 0700, refused if another user owns it or others may write it.

    What the server executes (the stub copy, the argv shim) is cached here:
    a directory another local user can write to would let them swap in code
    that then runs as the server's user.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ServerError(f"cannot create {path}: {exc}") from exc
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ServerError(
            f"{path} is owned by uid {st.st_uid} or writable by others (mode "
            f"{st.st_mode & 0o777:o}): code the server runs is cached there; remove it, or "
            "set SETSUNA_CACHE_DIR (or XDG_CACHE_HOME) to a directory only you can write"
        )
    return path


def prepare_argv_secret(cache_root: Path | None = None) -> Path:
    """Compile ``native/argv_secret.c`` once (cached by source hash) and return the .so.

    The shim keeps the admin key off tritonserver's command line, which every
    local user can read; see the C file for how. It needs a C compiler (``cc``,
    ``gcc`` or ``$CC``) the first time, as the build's compiled forests do.
    """
    source = Path(__file__).with_name("native") / "argv_secret.c"
    try:
        code = source.read_bytes()
    except OSError as exc:
        raise ServerError(f"{source} is missing: reinstall setsuna ({exc})") from exc
    root = private_directory(_setsuna_cache() if cache_root is None else cache_root)
    final = root / f"argv_secret-{hashlib.sha256(code).hexdigest()[:16]}.so"
    if final.is_file():
        return final
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
    if compiler is None:
        raise ServerError(
            "no C compiler found (cc, gcc or $CC): the launcher compiles a 60-line shim "
            "that keeps the admin token off the command line; install one "
            "(apt-get install gcc)"
        )
    fd, tmp = tempfile.mkstemp(prefix=".argv_secret-", suffix=".so", dir=root)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", tmp, str(source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise ServerError(f"compiling {source} failed:\n{done.stderr}")
        Path(tmp).replace(final)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"could not compile {source}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
    return final


def install_stub_guard() -> Path:
    """Write the venv's ``.pth`` line that guards every Python stub (see :mod:`.stub_guard`).

    The stub embeds the venv the launcher runs in, so the line goes into this
    interpreter's ``purelib``; it is inert unless ``$SETSUNA_STUB_GUARD`` is
    set, which only the launcher sets, for tritonserver's children.
    """
    site = Path(sysconfig.get_path("purelib"))
    path = site / stub_guard.PTH_NAME
    try:
        # 0644: an unreadable .pth is skipped by site without a word (no guard at all).
        if (
            path.is_file()
            and path.stat().st_mode & 0o777 == 0o644
            and path.read_text() == stub_guard.PTH_LINE
        ):
            return path
        fd, tmp = tempfile.mkstemp(prefix=".setsuna-guard-", dir=site)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(stub_guard.PTH_LINE)
        Path(tmp).replace(path)
    except OSError as exc:
        raise ServerError(
            f"cannot write {path} ({exc}): the Python stubs load model code only through "
            "setsuna's guard; run the server from a venv you can write (make install)"
        ) from exc
    return path


def clean_stale_shm(*, min_age_s: float = 5.0, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Remove Python-backend shared-memory regions that a crashed server left behind.

    A ``kill -9`` of tritonserver leaves its stubs' regions in ``/dev/shm``
    (RAM the host never gets back). Removed: regions owned by this user, older
    than ``min_age_s`` (a live server creates and maps one in the same
    moment), that no process we can see has mapped. Returns the removed names.
    """
    try:
        candidates = [p for p in shm_dir.iterdir() if p.name.startswith(SHM_PREFIX)]
    except OSError:
        return []
    if not candidates:
        return []
    mapped = _mapped_shm(shm_dir)
    now = time.time()
    removed = []
    for path in candidates:
        try:
            st = path.lstat()
        except OSError:
            continue
        if st.st_uid != os.geteuid() or now - st.st_mtime < min_age_s or path.name in mapped:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


def _mapped_shm(shm_dir: Path) -> set[str]:
    """Names of files under ``shm_dir`` mapped by any process whose maps we can read."""
    prefix = f"{shm_dir}/"
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            at = line.find(prefix)
            if at >= 0:
                names.add(line[at + len(prefix) :].split(" ", 1)[0])
    return names


# --------------------------------------------------------------------------- ports


def free_ports(count: int, address: str = "127.0.0.1") -> tuple[int, ...]:
    """``count`` distinct ports the OS reports free now (racy by nature; for tests)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((address, 0))
        return tuple(int(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()


def free_port(address: str = "127.0.0.1") -> int:
    """One port the OS reports free now."""
    return free_ports(1, address)[0]


def _port_in_use(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as Triton does: a port in TIME_WAIT is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- the process


class LocalTriton:
    """The wheel's ``tritonserver`` as a child process, ready or an error.

    ``watchdog=True`` (the default) runs a :class:`~setsuna.watchdog.ModelWatchdog`
    beside it: a model whose stub process died is reloaded, or unloaded and
    reported, never left READY while every request fails.

    ``start()`` returns once gRPC readiness says yes and every model in
    :attr:`ServerSettings.models` has finished loading. A model that failed
    does not stop the server (``--exit-on-error=false``): it lands in
    :attr:`unavailable` with Triton's reason, the others serve, and
    ``require_all_models=True`` (the default) turns any failure into a
    :class:`ServerError` so programmatic users notice. If the process dies, or
    ``ready_timeout_s`` passes, ``start()`` raises :class:`ServerError` with
    the tail of the log. The server runs in its own process group so
    ``stop()`` also reaps the Python stub processes.
    """

    @classmethod
    def on_free_ports(
        cls,
        model_repository: Path,
        *,
        log_path: Path | None = None,
        watchdog: bool = True,
        ready_timeout_s: float = 120.0,
        **settings: Any,
    ) -> LocalTriton:
        """A server on ``model_repository`` listening on three ports free now.

        The one way tests, benchmarks and the demo start a private server:
        ``settings`` are :class:`ServerSettings` fields (``http=True``,
        ``load_models=...``); the ports are picked here (racy by nature, like
        :func:`free_ports`). Use it as a context manager.
        """
        config = ServerSettings.on_free_ports(model_repository, **settings)
        return cls(config, log_path=log_path, watchdog=watchdog, ready_timeout_s=ready_timeout_s)

    def __init__(
        self,
        settings: ServerSettings,
        *,
        ready_timeout_s: float = 120.0,
        log_path: Path | None = None,
        token: str | None = None,
        require_all_models: bool = True,
        watchdog: bool = True,
    ) -> None:
        if not ready_timeout_s > 0:
            raise ConfigError(f"ready_timeout_s={ready_timeout_s}: give a positive number")
        self.settings = settings
        self.ready_timeout_s = float(ready_timeout_s)
        self._token = admin_token() if token is None else token
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []
        self.startup_s: float | None = None
        self.require_all_models = require_all_models
        #: Models that failed to load at start, with Triton's reason.
        self.unavailable: dict[str, str] = {}
        #: Shared-memory regions of crashed servers removed at the last start.
        self.shm_removed: list[str] = []
        self._watchdog_enabled = watchdog
        #: Reloads models whose stub died (setsuna.watchdog); None when off or stopped.
        self.watchdog: ModelWatchdog | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def _host(self) -> str:
        addr = self.settings.bind_address
        return f"[{addr}]" if ":" in addr else addr

    @property
    def http_url(self) -> str:
        """``host:port`` as ``tritonclient.http.InferenceServerClient`` takes it."""
        return f"{self._host}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` as ``tritonclient.grpc.InferenceServerClient`` takes it."""
        return f"{self._host}:{self.settings.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Full Prometheus URL (``http://host:port/metrics``), as a scraper takes it."""
        return f"http://{self._host}:{self.settings.metrics_port}/metrics"

    @property
    def admin_token(self) -> str:
        return self._token

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the restricted APIs."""
        return {self.settings.admin_header: self._token}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """gRPC metadata that unlocks the restricted protocols.

        Triton 2.51 looks for ``triton-grpc-protocol-<key>`` over gRPC, not
        the bare key it checks over HTTP (measured; it says so when refusing).
        """
        return {GRPC_HEADER_PREFIX + self.settings.admin_header: self._token}

    @property
    def log_path(self) -> Path | None:
        """The server's combined stdout/stderr; set by ``start()`` when not given."""
        return self._log_path

    @property
    def command(self) -> list[str]:
        """The argv of the last start: the key never appears in it (see ``_environment``)."""
        return list(self._command)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it is ready (see the class docstring)."""
        if self._proc is not None:
            raise ServerError(f"this server is already started (pid {self._proc.pid})")
        s = self.settings
        # Checked first because readiness polling would happily find *another*
        # server already listening there and report ours as ready.
        for name, port in (
            *((("http", s.http_port),) if s.http else ()),
            ("grpc", s.grpc_port),
            ("metrics", s.metrics_port),
        ):
            if _port_in_use(s.bind_address, port):
                raise ServerError(
                    f"{name} port {port} on {s.bind_address} is in use (another Triton?): "
                    f"stop it or choose another --{name}-port"
                )
        broken = self._broken_configs()
        install = locate_install()
        backend_dir = prepare_backend_directory(install)
        env = self._environment(install)
        knows_max_input = _binary_knows(install.binary, "--http-max-input-size", install.libs)
        self._command = [
            str(install.binary),
            *s.local_flags(backend_directory=backend_dir, cache_directory=install.caches),
            # The key itself reaches the server through the argv shim (see _environment).
            *s.flags(
                token=TOKEN_PLACEHOLDER,
                max_input_size_flag=knows_max_input,
                skip_models=frozenset(broken),
            ),
        ]
        self.shm_removed = clean_stale_shm()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="setsuna-triton-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        # 2.51 has no body limit and copies an HTTP body onto a worker thread's
        # stack: a body over ~RLIMIT_STACK/2 (4 MiB by default) SIGSEGVs the server.
        # Size the stack so bodies up to max_input_size_bytes at least work.
        stack_bytes = (
            None if knows_max_input or not s.http else 2 * s.max_input_size_bytes + 8 * MiB
        )
        began = time.monotonic()
        try:
            with self._log_path.open("wb") as log, _child_stack_limit(stack_bytes):
                self._proc = subprocess.Popen(
                    self._command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() reaps the stubs too
                )
        except OSError as exc:
            raise ServerError(f"could not start {install.binary}: {exc}") from exc
        atexit.register(self.stop)
        try:
            self._wait_ready(began)
            self.unavailable = {**self._failed_models(), **broken}
            if self.unavailable and self.require_all_models:
                reasons = "; ".join(f"{m}: {r}" for m, r in self.unavailable.items())
                raise ServerError(
                    f"models failed to load: {reasons}. Fix or rebuild them "
                    f"(make build-engines), or start without them; log {self._log_path}, "
                    f"last lines:\n{self.log_tail()}"
                )
            if self._watchdog_enabled:
                self.watchdog = ModelWatchdog(self).start()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _broken_configs(self) -> dict[str, str]:
        """Models to load whose ``config.pbtxt`` does not parse, with a reason that says why.

        Triton's own message for a garbled config is one line of protobuf
        parser output without the file's name; these are named, with line and
        column, and never handed to Triton.
        """
        from setsuna.model_config import check_repository

        try:
            bad = check_repository(self.settings.model_repository)
        except ConfigError as exc:
            raise ServerError(str(exc)) from exc
        return {m: reason for m, reason in bad.items() if m in self.settings.models}

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        """The server's environment: the stub's needs, the key for the argv shim, nothing more.

        The key travels in ``_SECRET_ENV`` (``/proc/<pid>/environ`` is readable
        by this user only) and the shim in ``LD_PRELOAD`` puts it where the
        placeholder stands in argv, then erases it; the operator's own
        ``$SETSUNA_ADMIN_TOKEN`` is dropped so model code in the stubs never
        inherits it.
        """
        env = server_environment(install)
        env.pop(ADMIN_TOKEN_ENV, None)
        shim = str(prepare_argv_secret())
        if env.get("LD_PRELOAD"):
            raise ServerError(
                f"LD_PRELOAD={env['LD_PRELOAD']!r} is set: the launcher preloads its own "
                "shim into tritonserver and will not run foreign code beside it; unset it"
            )
        env.update({"LD_PRELOAD": shim, _SECRET_MARK_ENV: shim, _SECRET_ENV: self._token})
        install_stub_guard()
        keys = seal.trusted_keys_path()
        try:
            seal.trusted_keys(keys)  # readable, owned, not writable by others, non-empty
        except ConfigError as exc:
            raise ServerError(str(exc)) from exc
        env.update(
            {
                stub_guard.GUARD_ENV: "1",
                stub_guard.ROOT_ENV: str(self.settings.model_repository),
                seal.TRUSTED_KEYS_ENV: str(keys.resolve()),
            }
        )
        return env

    def _grpc(self) -> grpcclient.InferenceServerClient:
        # gRPC backs off reconnecting (1 s, then x1.6) to a port nobody listens on
        # yet; while polling a starting server, retry every 50-200 ms instead.
        return grpcclient.InferenceServerClient(self.grpc_url, channel_args=_FAST_RECONNECT)

    def _failed_models(self) -> dict[str, str]:
        """Models asked for at start that are not ready, with the reason Triton gives.

        Startup models are loaded before the endpoints open, so by the time the
        server is ready each of them is READY or UNAVAILABLE for good. Also
        checks that the key the shim substituted is the one in force: the
        placeholder must be refused, or anyone who read argv could load models.
        """
        client = self._grpc()
        try:
            try:
                client.get_model_repository_index(
                    headers={GRPC_HEADER_PREFIX + self.settings.admin_header: TOKEN_PLACEHOLDER},
                    client_timeout=10.0,
                )
            except InferenceServerException:
                pass  # refused: the placeholder is not the key
            else:
                raise ServerError(
                    "tritonserver accepted the argv placeholder as its admin key: the "
                    "argv shim did not run (LD_PRELOAD ignored?); refusing to serve"
                )
            try:
                index = client.get_model_repository_index(
                    headers=self.grpc_admin_headers, as_json=True, client_timeout=10.0
                )
            except InferenceServerException as exc:
                raise ServerError(f"cannot read the model repository index: {exc}") from exc
        finally:
            client.close()
        wanted = set(self.settings.models)
        return {
            str(entry["name"]): str(entry.get("reason") or entry.get("state") or "not ready")
            for entry in index.get("models", [])
            if entry.get("name") in wanted and entry.get("state") != "READY"
        }

    def _wait_ready(self, began: float) -> None:
        deadline = began + self.ready_timeout_s
        proc = self._proc
        assert proc is not None
        client = self._grpc()
        try:
            self._poll_ready(proc, client, deadline)
        finally:
            client.close()

    def _poll_ready(
        self,
        proc: subprocess.Popen[bytes],
        client: grpcclient.InferenceServerClient,
        deadline: float,
    ) -> None:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise ServerError(
                    f"tritonserver exited with status {rc} before it was ready "
                    f"(log {self._log_path}); last lines:\n{self.log_tail()}"
                )
            try:
                if client.is_server_ready(client_timeout=1.0):
                    return
            except InferenceServerException:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"tritonserver was not ready after {self.ready_timeout_s:.0f} s "
                    f"(a model still loading or stuck?); raise ready_timeout_s or read "
                    f"{self._log_path}; last lines:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL. Safe to call twice."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.exit_timeout_s + _STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Stub processes can outlive the server by a moment; the group id stays
        # theirs while any is alive, so this cannot hit an unrelated process.
        _signal_group(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' if there is none yet)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_FAST_RECONNECT: Final = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]

_rlimit_lock = threading.Lock()


@contextlib.contextmanager
def _child_stack_limit(nbytes: int | None) -> Iterator[None]:
    """Raise this process's soft RLIMIT_STACK to ``nbytes`` while a child is spawned.

    The child inherits it and glibc sizes every thread stack from it; our own
    threads are unaffected (glibc read the limit at our startup). Unlimited
    is replaced too: glibc then falls back to small 2 MiB thread stacks.
    """
    if nbytes is None:
        yield
        return
    with _rlimit_lock:
        soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
        want = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
        if soft != resource.RLIM_INFINITY and soft >= want:
            yield
            return
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = ServerSettings.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m setsuna.server",
        description="Run the local Triton server on a setsuna model repository until Ctrl-C.",
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--stop",
        action="store_true",
        help="stop the setsuna.server serving --model-repository (SIGTERM, then wait) and exit",
    )
    p.add_argument("--http-port", type=int, default=d["http_port"].default)
    p.add_argument("--grpc-port", type=int, default=d["grpc_port"].default)
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"].default)
    p.add_argument("--bind-address", default=d["bind_address"].default)
    p.add_argument(
        "--allow-remote-bind", action="store_true", help="allow a non-loopback bind address"
    )
    p.add_argument(
        "--load-model",
        action="append",
        dest="load_models",
        metavar="NAME",
        help="load only these models (repeatable; default: every model folder)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="also serve HTTP (off by default: Triton 2.51's HTTP frontend can be crashed "
        "by one request; enable only where every client is trusted)",
    )
    p.add_argument("--max-restarts", type=int, default=5, help="restarts per window (0: none)")
    p.add_argument("--restart-window-s", type=float, default=300.0)
    p.add_argument("--cache-size-bytes", type=int, default=d["cache_size_bytes"].default)
    p.add_argument("--max-input-size-bytes", type=int, default=d["max_input_size_bytes"].default)
    p.add_argument("--log-verbose", type=int, default=d["log_verbose"].default)
    p.add_argument("--exit-timeout-s", type=int, default=d["exit_timeout_s"].default)
    p.add_argument("--ready-timeout-s", type=float, default=120.0)
    p.add_argument("--log-file", type=Path, default=None, help="default: a new file in $TMPDIR")
    pool = p.add_argument_group(
        "model pool (setsuna.pool): load on first request, evict to a budget"
    )
    pool.add_argument(
        "--memory-budget-mb",
        type=float,
        default=None,
        help="MiB (PSS) the models may hold once evictions settled; runs the pool controller "
        "and loads only the pinned models (and --load-model ones) at start",
    )
    pool.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="MODEL",
        help="a model loaded at start and never evicted (repeatable; needs --memory-budget-mb)",
    )
    pool.add_argument(
        "--idle-ttl-s",
        type=float,
        default=0.0,
        help="unload a model idle this long (0: only the budget evicts; needs --memory-budget-mb)",
    )
    return p


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, print where it listens, supervise it until Ctrl-C or SIGTERM.

    A crash of tritonserver (``kill -9``, a segfault) is not the end of
    serving: it is logged with the exit status and the log's last lines, the
    stale shared memory is cleaned and the server restarted, at most
    ``--max-restarts`` times per ``--restart-window-s`` (a server that keeps
    dying needs a person, and then this exits 1).
    """
    args = _parser().parse_args(argv)
    if args.stop:
        return _stop(args.model_repository)
    lock = serve_lock.ServeLock(args.model_repository)
    try:
        lock.acquire()  # one server per repository; `--stop` finds it by this lock
    except ServerError as exc:
        print(f"setsuna.server: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(args)
    finally:
        lock.release()


def _stop(repository: Path) -> int:
    try:
        pid = serve_lock.stop(repository)
    except ServerError as exc:
        print(f"setsuna.server: {exc}", file=sys.stderr)
        return 1
    print(f"stopped setsuna.server pid {pid}" if pid else f"no setsuna.server serves {repository}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        pool = _pool_settings(args)
        if pool is not None and args.load_models is None:
            args.load_models = list(pool.pinned)  # the pool loads the others on request
        settings = ServerSettings(
            model_repository=args.model_repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            bind_address=args.bind_address,
            allow_remote_bind=args.allow_remote_bind,
            http=args.http,
            load_models=None if args.load_models is None else tuple(args.load_models),
            cache_size_bytes=args.cache_size_bytes,
            max_input_size_bytes=args.max_input_size_bytes,
            log_verbose=args.log_verbose,
            exit_timeout_s=args.exit_timeout_s,
        )
        policy = RestartPolicy(args.max_restarts, args.restart_window_s)
        server = LocalTriton(
            settings,
            ready_timeout_s=args.ready_timeout_s,
            log_path=args.log_file,
            require_all_models=False,  # serve what loaded; the banner names what did not
        )
    except ConfigError as exc:
        print(f"setsuna.server: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (docker stop, make's kill) must stop the server like Ctrl-C does:
    # it runs in its own session and would otherwise outlive us.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _supervise(server, policy, pool)
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    except SetsunaError as exc:
        print(f"setsuna.server: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


@dataclass
class RestartPolicy:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds."""

    max_restarts: int = 5
    window_s: float = 300.0
    _times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.max_restarts <= 1000:
            raise ConfigError(f"max_restarts={self.max_restarts}: give 0..1000 (0: never restart)")
        if not self.window_s > 0:
            raise ConfigError(f"restart_window_s={self.window_s}: give a positive number")

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the budget allows it."""
        self._times = [t for t in self._times if now - t < self.window_s]
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


def describe_exit(rc: int | None) -> str:
    """``status 1`` or ``signal SIGKILL`` for a Popen return code."""
    if rc is None:
        return "still running"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"status {rc}"


def _pool_settings(args: argparse.Namespace) -> PoolSettings | None:
    """The pool's settings when ``--memory-budget-mb`` is given (ConfigError if invalid)."""
    if args.memory_budget_mb is None:
        if args.pin or args.idle_ttl_s:
            raise ConfigError("--pin and --idle-ttl-s need --memory-budget-mb: give the budget")
        return None
    return PoolSettings(
        memory_budget_mb=args.memory_budget_mb, idle_ttl_s=args.idle_ttl_s, pinned=tuple(args.pin)
    )


def _supervise(
    server: LocalTriton, policy: RestartPolicy, pool_settings: PoolSettings | None = None
) -> int:
    server.start()  # a first start that fails is a configuration problem: exit 1
    _print_banner(server)
    pool = None
    if pool_settings is not None:  # follows the server across restarts (its pid is re-read)
        pool = ModelPool.for_server(server, pool_settings).start()
        print(
            f"  pool     budget {pool_settings.memory_budget_mb:g} MiB, idle TTL "
            f"{pool_settings.idle_ttl_s:g} s, pinned {list(pool_settings.pinned) or '-'}",
            flush=True,
        )
    try:
        while True:
            while server.running:
                time.sleep(0.5)
            how = describe_exit(server.returncode)
            _say(
                f"tritonserver exited unexpectedly ({how}); last lines of "
                f"{server.log_path}:\n{server.log_tail()}"
            )
            server.stop()  # reap the orphaned stubs of the dead server
            if not _restart(server, policy, how):
                return 1
    finally:
        if pool is not None:
            pool.stop()


def _restart(server: LocalTriton, policy: RestartPolicy, how: str) -> bool:
    """Start again until it works or the budget is spent; False when giving up."""
    while policy.allow(time.monotonic()):
        began = time.monotonic()
        try:
            server.start()
        except ServerError as exc:
            _say(f"restart failed: {exc}")
            continue
        _say(
            f"restarted tritonserver after {how} in {time.monotonic() - began:.1f} s "
            f"(pid {server.pid}; removed {len(server.shm_removed)} stale shared-memory regions)"
        )
        for model, reason in server.unavailable.items():
            _say(f"  NOT SERVING {model}: {reason}")
        return True
    _say(
        f"{policy.max_restarts} restarts within {policy.window_s:.0f} s; giving up. "
        "Read the log above and fix the cause."
    )
    return False


def _say(message: str) -> None:
    print(f"setsuna.server: {message}", file=sys.stderr, flush=True)


def _print_banner(server: LocalTriton) -> None:
    s = server.settings
    source = admin_token_source()
    if source == f"${ADMIN_TOKEN_ENV}":
        token_line = f"token from ${ADMIN_TOKEN_ENV}"
    else:
        token_line = (
            f"token generated for this run (set ${ADMIN_TOKEN_ENV} to choose one): "
            f"{server.admin_token}"
        )
    startup = f"{server.startup_s:.1f} s" if server.startup_s is not None else "?"
    print(
        f"Triton ready in {startup}; models: {', '.join(s.models) or '(none)'}\n"
        + (
            f"  HTTP     {server.http_url}   (http://{server.http_url}/v2)\n"
            if s.http
            else "  HTTP     off (--http turns it on; see the security notes)\n"
        )
        + f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        f"  log      {server.log_path}\n"
        f"  admin    {', '.join(s.restricted_apis)} need HTTP header '{s.admin_header}' "
        f"(gRPC metadata '{GRPC_HEADER_PREFIX}{s.admin_header}'); {token_line}\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )
    for model, reason in server.unavailable.items():
        print(f"  NOT SERVING {model}: {reason}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
