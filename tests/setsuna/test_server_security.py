"""What a hostile local user and a crash can do to the local server (issue: hardening).

- the admin key is on no command line and in no environment another user can
  read, and the stubs (which run model code) never inherit it;
- HTTP, whose 2.51 frontend one request can crash, is off unless asked for;
- the server runs as an unprivileged user;
- ``python -m setsuna.server`` restarts a tritonserver that was killed;
- shared memory that a killed server left behind is removed, a live one's kept.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from setsuna import seal
from setsuna.server import (
    ADMIN_TOKEN_ENV,
    GRPC_HEADER_PREFIX,
    SHM_PREFIX,
    TOKEN_PLACEHOLDER,
    LocalTriton,
    ServerSettings,
    clean_stale_shm,
    free_ports,
)
from tests.helpers import python_model

NOBODY = 65534
TOKEN = "t0ken-for-the-security-tests-" + "x" * 8


def _settings(repo: Path, **kw: object) -> ServerSettings:
    return ServerSettings.on_free_ports(repo, **kw)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("secure")
    python_model(repo, "echo")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[LocalTriton]:
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_TOKEN_ENV, TOKEN)
    try:
        with LocalTriton(_settings(repo), token=TOKEN, log_path=repo.parent / "t.log") as srv:
            yield srv
    finally:
        mp.undo()


def test_the_admin_key_is_not_on_the_command_line(server: LocalTriton) -> None:
    assert server.pid is not None
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in cmdline
    assert TOKEN_PLACEHOLDER.encode() in cmdline  # the shim's stand-in, not a secret


def test_the_admin_key_is_in_no_environment(server: LocalTriton) -> None:
    assert server.pid is not None
    stubs = _children(server.pid)
    assert stubs, "the echo model's stub should be a child of the server"
    for pid in [server.pid, *stubs]:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert TOKEN.encode() not in environ, pid
        assert ADMIN_TOKEN_ENV.encode() not in environ, pid  # not even the name


def test_the_key_works_and_the_placeholder_does_not(server: LocalTriton) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        c.get_model_repository_index(headers=server.grpc_admin_headers)
        header = GRPC_HEADER_PREFIX + server.settings.admin_header
        with pytest.raises(InferenceServerException, match="restricted"):
            c.get_model_repository_index(headers={header: TOKEN_PLACEHOLDER})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_read_the_key(server: LocalTriton) -> None:
    def as_nobody(path: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["cat", path], user=NOBODY, group=NOBODY, capture_output=True, cwd="/"
        )

    cmdline = as_nobody(f"/proc/{server.pid}/cmdline")
    assert cmdline.returncode == 0 and TOKEN_PLACEHOLDER.encode() in cmdline.stdout
    assert TOKEN.encode() not in cmdline.stdout
    environ = as_nobody(f"/proc/{server.pid}/environ")
    assert environ.returncode != 0 and b"Permission denied" in environ.stderr


def test_http_is_off_by_default(server: LocalTriton) -> None:
    assert "--allow-http=false" in server.command
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.settings.http_port), timeout=5).close()


def test_shared_memory_of_a_killed_server_is_removed(repo: Path, server: LocalTriton) -> None:
    victim = LocalTriton(_settings(repo), log_path=repo.parent / "victim.log").start()
    assert victim.pid is not None
    live_before = _regions()
    os.killpg(victim.pid, signal.SIGKILL)  # server and stubs, as the OOM killer would
    os.waitpid(victim.pid, 0)
    _wait(lambda: not _children(victim.pid or 0), 10, "the stubs to die")
    left = _regions()
    removed = clean_stale_shm(min_age_s=0)
    still = _regions()
    assert set(removed) <= left
    assert not (left & set(removed)) & still
    # The running module server's regions are mapped by its stubs: never removed.
    mine = {n for n in live_before if _mapped_by(n, server.pid or 0)}
    assert mine and mine <= still
    victim._proc = None  # already reaped above


def _regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(SHM_PREFIX + "*")}


def _mapped_by(name: str, server_pid: int) -> bool:
    for pid in [server_pid, *_children(server_pid)]:
        try:
            if name in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create an unprivileged user's files")
def test_the_server_runs_as_an_unprivileged_user(repo: Path) -> None:
    """tritonserver, its stubs and the guard need no root: run it all as nobody."""
    home = Path(tempfile.mkdtemp(prefix="setsuna-nobody-"))
    opened = _let_others_traverse(Path(sys.executable).resolve().parent)
    try:
        shutil.copytree(repo / "echo", home / "repo" / "echo")
        keys = home / "trusted_keys"
        shutil.copy(seal.trusted_keys_path(), keys)
        for p in [home, *home.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        home.chmod(0o755)
        http, grpc, metrics = free_ports(3)
        env = {
            **os.environ,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / "cache"),
            seal.TRUSTED_KEYS_ENV: str(keys),
        }
        env.pop(ADMIN_TOKEN_ENV, None)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "setsuna.server",
                "--model-repository",
                str(home / "repo"),
                "--http-port",
                str(http),
                "--grpc-port",
                str(grpc),
                "--metrics-port",
                str(metrics),
            ],
            user=NOBODY,
            group=NOBODY,
            env=env,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}") as c:
                _wait(lambda: _ready(c, "echo") or proc.poll() is not None, 120, "readiness")
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            uids = {Path(f"/proc/{p}").stat().st_uid for p in _descendants(proc.pid)}
            assert uids == {NOBODY}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        for path, mode in opened:
            path.chmod(mode)


def _let_others_traverse(path: Path) -> list[tuple[Path, int]]:
    """Add o+x to ``path``'s ancestors that lack it (pyenv lives in 0700 /root here).

    Traversal only: nothing becomes listable or readable that was not; the
    modes are restored after the test.
    """
    changed = []
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode & 0o7777
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
            changed.append((parent, mode))
    return changed


def _ready(c: grpcclient.InferenceServerClient, model: str) -> bool:
    try:
        return bool(c.is_model_ready(model))
    except InferenceServerException:
        return False


def _ready_at(url: str, model: str) -> bool:
    """A fresh channel each time: a dead server's channel backs off reconnecting."""
    with grpcclient.InferenceServerClient(url) as c:
        return _ready(c, model)


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for child in _children(pid):
        out += _descendants(child)
    return out


def test_a_killed_server_is_restarted_and_logged(repo: Path) -> None:
    http, grpc, metrics = free_ports(3)
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
            str(repo.parent / "supervised.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"127.0.0.1:{grpc}"
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # printed once start() returned: supervision began
        assert banner.startswith("Triton ready"), banner
        (first,) = [p for p in _children(proc.pid) if _is_triton(p)]
        os.kill(first, signal.SIGKILL)
        assert proc.stderr is not None
        said = _read_until(proc.stderr, "setsuna.server: restarted tritonserver", 120)
        assert "exited unexpectedly (signal SIGKILL)" in said
        assert "restarted tritonserver after signal SIGKILL" in said
        (second,) = [p for p in _children(proc.pid) if _is_triton(p)]
        assert second != first
        assert _ready_at(url, "echo")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def _read_until(stream: IO[str], needle: str, timeout_s: float) -> str:
    """Lines of ``stream`` up to the one holding ``needle`` (AssertionError past the deadline).

    A reader thread, not select(): lines already in the text buffer would not
    wake select again.
    """
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            seen.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout_s)
    text = "".join(seen)
    assert found.is_set(), f"no {needle!r} within {timeout_s} s; read:\n{text}"
    return text


def _is_triton(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"
    except OSError:
        return False


def test_a_killed_stub_is_reloaded_by_the_servers_watchdog(server: LocalTriton) -> None:
    """LocalTriton runs the watchdog by default: a dead stub is not READY-but-failing for long."""
    assert server.watchdog is not None and server.pid is not None
    (stub,) = _children(server.pid)
    os.kill(stub, signal.SIGKILL)
    x = np.ones((1, 4), np.float32)

    def answers() -> bool:
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            inp = grpcclient.InferInput("features", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            try:
                return bool(
                    (c.infer("echo", [inp], client_timeout=2.0).as_numpy("score") == x).all()
                )
            except InferenceServerException:
                return False

    _wait(answers, 60, "the echo model to answer again")
    assert server.watchdog.restarts.get("echo", 0) >= 1


def test_a_garbled_config_is_named_not_loaded(tmp_path: Path) -> None:
    python_model(tmp_path, "fine")
    python_model(tmp_path, "garbled")
    (tmp_path / "garbled" / "config.pbtxt").write_text('name: "garbled"\nbackend: "python"\n}}{{\n')
    with LocalTriton(_settings(tmp_path), require_all_models=False, watchdog=False) as srv:
        assert set(srv.unavailable) == {"garbled"}
        assert "garbled/config.pbtxt:3" in srv.unavailable["garbled"]
        assert "--load-model=garbled" not in srv.command
