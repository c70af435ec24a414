"""What a running server holds: every model, its versions and state, memory, traffic.

    setsuna models list  [--url 127.0.0.1:8001] [--model-repository model_repository/local]
    setsuna models status NAME [...]

The first of the day-2 operations (issue 14): what serves, what failed and
why, and what each model costs, read from Triton's own APIs: the repository
index (a restricted API: it needs the admin token, ``$SETSUNA_ADMIN_TOKEN``,
sent as gRPC metadata), each ready model's config (its backend) and the
inference statistics (requests and the last one's time). Memory is the PSS of
a Python-backend model's stub processes, found as children of the server's
``tritonserver`` (the server's pid comes from the ``setsuna.server`` lock of
``--model-repository``, or ``--server-pid``); a model on a native backend
(``setsuna_forest``) runs inside ``tritonserver`` and has no memory of its own
to show.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from setsuna.errors import ServerError

DEFAULT_URL: Final = "127.0.0.1:8001"
#: How Triton names a restricted API it refused (2.51, gRPC).
_RESTRICTED_MARK: Final = "restricted"


@dataclass(frozen=True)
class VersionState:
    """One version of a model as the repository index reports it."""

    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class ModelStatus:
    """One model of the repository: versions, backend, memory and traffic."""

    name: str
    versions: tuple[VersionState, ...]
    backend: str
    #: PSS of its stub processes (MiB); None where it has none (native backend, not loaded).
    memory_mib: float | None
    stubs: int
    requests: int
    #: When the last request was answered (ms since the epoch); None if never.
    last_use_ms: int | None

    @property
    def serving(self) -> tuple[str, ...]:
        return tuple(v.version for v in self.versions if v.state == "READY")

    @property
    def state(self) -> str:
        return "READY" if self.serving else (self.versions[0].state if self.versions else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "serving": list(self.serving),
            "versions": [v.__dict__ for v in self.versions],
            "backend": self.backend,
            "memory_mib": self.memory_mib,
            "stubs": self.stubs,
            "requests": self.requests,
            "last_use_ms": self.last_use_ms,
        }


def status(
    url: str, headers: Mapping[str, str], *, server_pid: int | None = None
) -> list[ModelStatus]:
    """Every model of the server at ``url`` (gRPC), sorted by name.

    ``headers`` must carry the admin token (``LocalTriton.grpc_admin_headers``):
    the repository index is a restricted API. Raises :class:`ServerError` when
    the server is unreachable or refuses the token, saying which.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
    except InferenceServerException as exc:
        raise ServerError(f"cannot reach a Triton server at {url}: {exc}") from exc
    with client:
        try:
            index = client.get_model_repository_index(headers=dict(headers), as_json=True)
        except InferenceServerException as exc:
            if _RESTRICTED_MARK in str(exc).lower():
                raise ServerError(
                    "the repository index is an admin API and the server refused the token: "
                    "set SETSUNA_ADMIN_TOKEN to the server's admin token"
                ) from None
            raise ServerError(f"cannot read the repository index at {url}: {exc}") from exc
        try:
            stats = client.get_inference_statistics(as_json=True).get("model_stats", [])
        except InferenceServerException as exc:
            raise ServerError(f"cannot read inference statistics at {url}: {exc}") from exc
        versions: dict[str, list[VersionState]] = {}
        for m in index.get("models", []):
            versions.setdefault(m["name"], []).append(
                VersionState(str(m.get("version", "")), m.get("state", ""), m.get("reason", ""))
            )
        backends = {}
        for name, vs in versions.items():
            if any(v.state == "READY" for v in vs):
                try:
                    cfg = client.get_model_config(name, as_json=True).get("config", {})
                    backends[name] = cfg.get("backend") or cfg.get("platform", "")
                except InferenceServerException:
                    backends[name] = ""
    traffic = _traffic(stats)
    memory = stub_memory(server_pid) if server_pid else {}
    out = []
    for name in sorted(versions):
        mib, n = memory.get(name, (None, 0))
        requests, last = traffic.get(name, (0, None))
        out.append(
            ModelStatus(
                name=name,
                versions=tuple(sorted(versions[name], key=lambda v: v.version)),
                backend=backends.get(name, ""),
                memory_mib=mib,
                stubs=n,
                requests=requests,
                last_use_ms=last,
            )
        )
    return out


def _traffic(stats: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int | None]]:
    """Requests answered (successes and failures; ``inference_count`` would count rows)
    and the last one's time (ms), per model over its versions."""
    out: dict[str, tuple[int, int | None]] = {}
    for s in stats:
        inference = s.get("inference_stats", {})
        count = sum(int(inference.get(k, {}).get("count", 0) or 0) for k in ("success", "fail"))
        last = int(s.get("last_inference", 0) or 0) or None
        before, seen = out.get(s["name"], (0, None))
        newest = max((t for t in (seen, last) if t is not None), default=None)
        out[s["name"]] = (before + count, newest)
    return out


def process_pss_mib(pid: int) -> float | None:
    """PSS of process ``pid`` in MiB (``/proc/<pid>/smaps_rollup``, read by psutil), or
    None when it is gone or unreadable. PSS splits each shared page among the
    processes mapping it, so the PSS of several processes adds up to what they hold
    together (RSS would count a shared library once per process)."""
    import psutil

    try:
        return float(psutil.Process(pid).memory_full_info().pss) / 2**20
    except psutil.Error:
        return None  # gone between the scan and the read


def stub_memory(server_pid: int) -> dict[str, tuple[float, int]]:
    """PSS (MiB) and count of each model's live stub processes under ``server_pid``.

    Shared by ``setsuna models`` and the model pool (``setsuna.pool``).
    """
    from setsuna.watchdog import scan_stubs

    out: dict[str, tuple[float, int]] = {}
    for stub in scan_stubs(server_pid):
        pss = process_pss_mib(stub.pid)
        if pss is None:
            continue
        mib, n = out.get(stub.model, (0.0, 0))
        out[stub.model] = (mib + pss, n + 1)
    return out


def server_pid_of(repository: Path) -> int | None:
    """The ``tritonserver`` that ``setsuna.server`` runs for ``repository``, if one does."""
    import psutil

    from setsuna import serve_lock

    supervisor = serve_lock.server_pid(repository)
    if supervisor is None:
        return None
    try:
        children = psutil.Process(supervisor).children()
    except psutil.Error:
        return None
    return next((c.pid for c in children if c.name() == "tritonserver"), None)


def render(models: Sequence[ModelStatus]) -> str:
    """A table for people: one line per model."""
    head = f"{'model':<16} {'state':<12} {'serving':<8} {'backend':<15} {'memory':>10} "
    lines = [head + f"{'requests':>9}  last use"]
    for m in models:
        if m.memory_mib is not None:
            mem = f"{m.memory_mib:.0f} MiB"
        elif m.backend and m.backend != "python":
            mem = "in server"
        else:
            mem = "-"
        last = (
            datetime.fromtimestamp(m.last_use_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            if m.last_use_ms
            else "never"
        )
        lines.append(
            f"{m.name:<16} {m.state:<12} {','.join(m.serving) or '-':<8} "
            f"{m.backend or '-':<15} {mem:>10} {m.requests:>9}  {last}"
        )
        for v in m.versions:
            if v.state != "READY" and v.reason:
                lines.append(f"  version {v.version} {v.state}: {v.reason}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("models", help="what a running server holds (list, status)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ("list", "status"):
        q = sub.add_parser(action, help="every model" if action == "list" else "one model")
        if action == "status":
            q.add_argument("name")
        q.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address")
        q.add_argument(
            "--model-repository",
            type=Path,
            default=Path("model_repository/local"),
            help="to find the server served by `make serve` (memory of its stubs)",
        )
        q.add_argument("--server-pid", type=int, default=None, help="tritonserver's pid")
        q.add_argument("--json", action="store_true", help="JSON instead of a table")
        q.set_defaults(handler=_main)


def env_admin_headers(why: str) -> dict[str, str]:
    """gRPC metadata carrying ``$SETSUNA_ADMIN_TOKEN``; ServerError saying ``why`` it is
    needed when it is unset (every ``setsuna models`` verb calls this first)."""
    from setsuna.server import ADMIN_HEADER, ADMIN_TOKEN_ENV, GRPC_HEADER_PREFIX

    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ServerError(f"{why}: set {ADMIN_TOKEN_ENV} to the server's admin token")
    return {GRPC_HEADER_PREFIX + ADMIN_HEADER: token}


def _main(args: argparse.Namespace) -> int:
    headers = env_admin_headers("the repository index is an admin API")
    pid = args.server_pid or server_pid_of(args.model_repository)
    models = status(args.url, headers, server_pid=pid)
    if args.action == "status":
        models = [m for m in models if m.name == args.name]
        if not models:
            raise ServerError(f"no model {args.name!r} in the server's repository at {args.url}")
    if args.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
    else:
        print(render(models))
    return 0
