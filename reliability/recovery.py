"""Probes of crashes and what comes back: a killed server, its shared memory, a killed stub.

Every kill is a real ``SIGKILL``; every recovery time runs from the kill to
the first correct answer a client gets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Final

import numpy as np

from reliability import models, procs
from reliability.harness import Lab, Outcome, Shared, probe
from reliability.report import Probe
from setsuna.server import SHM_PREFIX, LocalTriton, clean_stale_shm, free_ports

ROW: Final = np.arange(4, dtype=np.float32).reshape(1, 4)
#: A kill -9 of a stub must be answered again within this (architecture.md: ~2 s measured).
STUB_RECOVERY_LIMIT_S: Final = 15.0
#: ... and of the whole server, restarted by python -m setsuna.server.
SERVER_RECOVERY_LIMIT_S: Final = 60.0
#: clean_stale_shm's default min_age_s: younger regions are never removed.
SHM_MIN_AGE_S: Final = 5.0


def run_supervised(lab: Lab) -> list[Probe]:
    return [
        probe(
            "4",
            "kill -9 of tritonserver under python -m setsuna.server",
            "restarted and answering again within "
            f"{SERVER_RECOVERY_LIMIT_S:.0f} s; stderr says 'restarted tritonserver after "
            "signal SIGKILL'",
            lambda: _supervised(lab),
            note="starts, kills and restarts a whole server: the slowest probe",
        )
    ]


def run_served(lab: Lab, main: Shared[LocalTriton]) -> list[Probe]:
    return [
        probe(
            "5",
            "stale shared memory after kill -9 of a server",
            "clean_stale_shm removes the dead server's regions; the live server's are kept",
            lambda: _stale_shm(lab, main.get()),
            note=f"waits out the cleaner's {SHM_MIN_AGE_S:g} s age guard",
        ),
        probe(
            "9",
            "kill -9 of a model's stub (default LocalTriton: watchdog on)",
            f"answering again within {STUB_RECOVERY_LIMIT_S:.0f} s (watchdog reload); "
            "requests failed meanwhile counted",
            lambda: _dead_stub(main.get()),
        ),
    ]


# -- 4: a supervised server ------------------------------------------------------------------


class _Lines:
    """Lines of a text stream read by a thread, with a wait for one holding a needle."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout_s: float) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: any(needle in ln for ln in self.lines), timeout_s)
            return next((ln for ln in self.lines if needle in ln), None)

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)


def _supervised(lab: Lab) -> Outcome:
    repo = lab.path("supervised", "repo")
    models.python_model(repo, "echo")
    http, grpc, metrics = free_ports(3)
    url = f"127.0.0.1:{grpc}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "setsuna.server",
            "--model-repository",
            str(repo),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--log-file",
            str(lab.root / "supervised" / "triton.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        err = _Lines(proc.stderr)
        out = _Lines(proc.stdout)
        if out.wait_for("Triton ready", 120) is None:
            return Outcome(f"no banner; stderr: {err.text[-300:]!r}", False)
        first = [p for p in procs.children(proc.pid) if procs.exe_name(p) == "tritonserver"]
        if len(first) != 1:
            return Outcome(f"expected one tritonserver child, found {first}", False)
        os.kill(first[0], signal.SIGKILL)
        recovery = procs.wait_until(
            lambda: procs.answers(url, "echo", ROW), SERVER_RECOVERY_LIMIT_S, "echo answers"
        )
        said = err.wait_for("restarted tritonserver", 30) or ""
        second = [p for p in procs.children(proc.pid) if procs.exe_name(p) == "tritonserver"]
        logged = "restarted tritonserver after signal SIGKILL" in said
        new_pid = len(second) == 1 and second != first
        supervisor_alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Outcome(
        f"answering again {recovery:.1f} s after the kill; new tritonserver pid: {new_pid}; "
        f"stderr: {' '.join(said.split())[:120]!r}; supervisor exit on SIGTERM: {proc.returncode}",
        logged and new_pid and supervisor_alive and proc.returncode == 0,
        {"recovery_s": round(recovery, 2)},
    )


# -- 5: shared memory a killed server left -----------------------------------------------------


def _regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(SHM_PREFIX + "*")}


def _mapped_by(pids: list[int]) -> set[str]:
    names: set[str] = set()
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names |= {n for n in _regions() if n in text}
    return names


def _stale_shm(lab: Lab, srv: LocalTriton) -> Outcome:
    assert srv.pid is not None
    repo = lab.path("shm", "repo")
    models.python_model(repo, "echo")
    mine = _mapped_by(procs.descendants(srv.pid))
    victim = procs.start(repo, lab.root / "shm" / "victim.log", watchdog=False)
    assert victim.pid is not None
    theirs = _mapped_by(procs.descendants(victim.pid))
    pids = procs.descendants(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)  # server and stubs, as the OOM killer would
    procs.wait_until(
        lambda: all(procs.gone(p) for p in pids), 30, "the killed server's processes exit"
    )
    victim.stop()  # reaps the killed server; its regions stay in /dev/shm
    left_before = len(theirs & _regions())
    # The cleaner's own age guard (5 s: a starting server's region may not be mapped
    # yet) is waited out rather than turned off, so another server starting on this
    # host meanwhile is never touched.
    newest = max((Path("/dev/shm", n).stat().st_mtime for n in theirs & _regions()), default=0.0)
    time.sleep(max(0.0, newest + SHM_MIN_AGE_S + 0.2 - time.time()))
    removed = set(clean_stale_shm())
    left_after = len(theirs & _regions())
    kept = mine <= _regions()
    wrongly = removed & mine
    return Outcome(
        f"dead server's regions left: {left_before} before, {left_after} after clean_stale_shm "
        f"(removed {len(removed)}); live server's {len(mine)} regions kept: {kept}",
        left_before > 0 and left_after == 0 and bool(mine) and kept and not wrongly,
        {"stale_before": left_before, "stale_after": left_after, "live_kept": len(mine)},
    )


# -- 9: a dead stub under the watchdog ---------------------------------------------------------


def _dead_stub(srv: LocalTriton) -> Outcome:
    assert srv.pid is not None and srv.watchdog is not None
    victims = procs.stub_pids(srv.pid, "victim")
    if not victims:
        return Outcome("found no stub of model 'victim'", False)
    stats = {"ok_before": 0, "failed": 0, "ok_after": 0}
    recovered_at: list[float] = []
    killed = threading.Event()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            ok = procs.answers(srv.grpc_url, "victim", ROW, 2.0)
            if not killed.is_set():
                stats["ok_before"] += ok
            elif ok:
                stats["ok_after"] += 1
                if not recovered_at:
                    recovered_at.append(time.monotonic())
            else:
                stats["failed"] += 1
            time.sleep(0.01)

    loop = threading.Thread(target=client, daemon=True)
    loop.start()
    try:
        procs.wait_until(lambda: stats["ok_before"] >= 3, 10, "victim answers before the kill")
        killed_at = time.monotonic()
        procs.kill_9(victims)
        killed.set()
        procs.wait_until(lambda: bool(recovered_at), STUB_RECOVERY_LIMIT_S, "victim answers")
        procs.wait_until(lambda: stats["ok_after"] >= 20, 10, "20 answers after recovery")
    finally:
        stop.set()
        loop.join(10)
    recovery = recovered_at[0] - killed_at
    restarts = srv.watchdog.restarts.get("victim", 0)
    return Outcome(
        f"answering again {recovery:.2f} s after the kill; {stats['failed']} requests failed "
        f"meanwhile, {stats['ok_after']} ok after; watchdog restarts: {restarts}",
        recovery <= STUB_RECOVERY_LIMIT_S and restarts >= 1,
        {
            "recovery_s": round(recovery, 2),
            "requests_failed": stats["failed"],
            "requests_ok_after": stats["ok_after"],
        },
    )
