"""Processes and servers: start a LocalTriton, find its stubs, kill them, wait on conditions.

Stubs are found from ``/proc`` (parent pid and ``argv[1]``, the model's
``model.py``), not through the watchdog's own reader, so the probes check
the product against an independent view.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from setsuna.server import LocalTriton, ServerSettings


def settings(repo: Path, **kw: Any) -> ServerSettings:
    """Settings on three free ports (HTTP off, as by default)."""
    return ServerSettings.on_free_ports(repo, **kw)


def start(repo: Path, log: Path, **kw: Any) -> LocalTriton:
    """A started LocalTriton on ``repo`` (keyword arguments go to LocalTriton)."""
    return LocalTriton(settings(repo), log_path=log, **kw).start()


def children(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    out = [pid]
    for child in children(pid):
        out += descendants(child)
    return out


def argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def stub_pids(server_pid: int, model: str) -> list[int]:
    """Children of the server whose ``argv[1]`` is ``.../<model>/<version>/model.py``."""
    out = []
    for pid in children(server_pid):
        args = argv(pid)
        path = Path(args[1]) if len(args) > 1 else Path()
        if path.name == "model.py" and path.parent.parent.name == model:
            out.append(pid)
    return out


def gone(pid: int) -> bool:
    """``pid`` has exited (no such process, or a zombie not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def exe_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return ""


def kill_9(pids: list[int], timeout_s: float = 30.0) -> None:
    """SIGKILL each process and return once each has exited (pidfds, no polling)."""
    if not pids:
        raise RuntimeError("nothing to kill: no process found")
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for fd in fds:
            ready, _, _ = select.select([fd], [], [], timeout_s)
            if not ready:
                raise RuntimeError(f"a killed process did not exit within {timeout_s:g} s")
    finally:
        for fd in fds:
            os.close(fd)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition`` every 50 ms; seconds it took, or TimeoutError naming ``what``."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - began


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS of /proc/<pid>/status), KiB."""
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    if m is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(m.group(1))


def infer(url: str, model: str, x: np.ndarray[Any, Any], timeout_s: float = 30.0) -> Any:
    """One gRPC request with raw tritonclient (no client-side checks): the result."""
    with grpcclient.InferenceServerClient(url) as c:
        inp = grpcclient.InferInput(
            "features", list(x.shape), grpcclient.np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        return c.infer(model, [inp], client_timeout=timeout_s)


def answers(url: str, model: str, x: np.ndarray[Any, Any], timeout_s: float = 2.0) -> bool:
    """Whether ``model`` echoes/answers ``x`` now (a fresh channel each time)."""
    try:
        return infer(url, model, x, timeout_s).as_numpy("score") is not None
    except InferenceServerException:
        return False


def live(url: str) -> bool:
    """The server answers its liveness call (a fresh channel: a dead one backs off)."""
    try:
        with grpcclient.InferenceServerClient(url) as c:
            return bool(c.is_server_live(client_timeout=5.0))
    except InferenceServerException:
        return False


def ready(url: str, model: str) -> bool:
    try:
        with grpcclient.InferenceServerClient(url) as c:
            return bool(c.is_model_ready(model, client_timeout=5.0))
    except InferenceServerException:
        return False
