"""setsuna.serve_lock: one server per repository; `--stop` ends that one and no other.

Real processes hold the locks: a child Python that takes the lock and waits,
killed with SIGKILL where the test needs a holder that died.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from setsuna import serve_lock
from setsuna.errors import ServerError

HOLD = """\
import sys
from pathlib import Path
from setsuna.serve_lock import ServeLock
lock = ServeLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin or kills us
"""


@pytest.fixture()
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    return root


def _hold(tmp_path: Path, runtime: Path, *extra: str) -> subprocess.Popen[str]:
    (tmp_path / "repo").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "repo"), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)),
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@pytest.fixture()
def holder(tmp_path: Path, runtime: Path) -> Iterator[subprocess.Popen[str]]:
    """A process (not a setsuna.server) holding the lock of tmp_path/repo."""
    proc = _hold(tmp_path, runtime)
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_server_on_the_repository_is_refused_naming_the_first(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(ServerError, match=rf"pid {holder.pid}\) already serves .*make stop"):
        serve_lock.ServeLock(tmp_path / "repo").acquire()
    # the same folder by another spelling is the same repository
    link = tmp_path / "alias"
    link.symlink_to(tmp_path / "repo")
    with pytest.raises(ServerError, match="already serves"):
        serve_lock.ServeLock(link).acquire()
    # another repository is not affected
    (tmp_path / "other").mkdir()
    with serve_lock.ServeLock(tmp_path / "other"):
        pass


def test_stop_kills_nothing_that_is_not_our_server(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(ServerError, match=rf"held by pid {holder.pid}, which is not your"):
        serve_lock.stop(tmp_path / "repo", timeout_s=1)
    assert holder.poll() is None  # still alive: no signal was sent


def test_a_holder_killed_with_sigkill_leaves_no_lock(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()
    holder.wait()
    path = serve_lock.lock_path(tmp_path / "repo")
    assert path.exists()  # the file stays, the lock went with the process
    assert serve_lock.stop(tmp_path / "repo") is None
    with serve_lock.ServeLock(tmp_path / "repo") as lock:
        assert path.read_text().split("\n")[0] == str(os.getpid())
        assert lock.path == path


def test_stop_without_a_server_says_none(tmp_path: Path, runtime: Path) -> None:
    assert serve_lock.stop(tmp_path / "nothing-here") is None
    assert oct((runtime / "setsuna").stat().st_mode & 0o777) == "0o700"  # private


def test_server_pid_names_only_our_server_and_never_a_dead_one(
    tmp_path: Path, runtime: Path, holder: subprocess.Popen[str]
) -> None:
    assert serve_lock.server_pid(tmp_path / "repo") is None  # a holder, but not setsuna.server
    holder.kill()
    holder.wait()
    # The same PID file, written by a process whose argv names the server module
    # (what _is_our_server checks), then by that process killed: its PID is gone.
    ours = _hold(tmp_path, runtime, serve_lock.SERVER_MODULE)
    try:
        assert serve_lock.server_pid(tmp_path / "repo") == ours.pid
    finally:
        ours.kill()
        ours.wait()
    assert serve_lock.server_pid(tmp_path / "repo") is None
    assert serve_lock.server_pid(tmp_path / "nobody") is None
