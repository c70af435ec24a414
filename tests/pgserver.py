"""A throwaway PostgreSQL server for the tests: initdb + postgres as an unprivileged user.

Debian's ``postgresql`` package (``apt-get install postgresql``) puts the
binaries in ``/usr/lib/postgresql/<version>/bin``, not on ``PATH``; both are
searched. ``initdb`` and ``postgres`` refuse to run as root, and these
machines run everything as root: then the server runs as the ``postgres``
user (the package creates it) through ``runuser``, its data folder in a
temporary folder that user owns. It listens on a free 127.0.0.1 port (and a
Unix socket in that folder), trusts local connections (no password: nothing
leaves the host) and is stopped, then killed if it must be, by :meth:`stop`.

A server that cannot start raises :class:`PostgresUnavailable` saying what to
install: the PostgreSQL tests fail then, they never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = (
    "the PostgreSQL tests run a real server: install it (Debian: apt-get install postgresql; "
    "binaries in /usr/lib/postgresql/<version>/bin are found) and psycopg 3 "
    "(pip install -e '.[postgres]')"
)


class PostgresUnavailable(RuntimeError):
    pass


def find_binaries() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (newest Debian version first)."""
    candidates = [Path(p).parent for p in (shutil.which("initdb"),) if p]
    candidates += [
        *sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: (len(p.parent.name), p.parent.name),
            reverse=True,
        )
    ]
    for folder in candidates:
        real = Path(os.path.realpath(folder / "initdb")).parent
        if all((real / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return real
    raise PostgresUnavailable(f"no initdb/pg_ctl/postgres found: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()``, then ``url(dbname)``; ``createdb(name)`` for a fresh database."""

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="setsuna-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["runuser", "-u", self.user, "--", *argv]

    def _run(self, argv: list[str]) -> None:
        r = subprocess.run(self._as_user(argv), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-800:]}; "
                + INSTALL_HINT
            )

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' user to run the server as "
                    "(initdb refuses root): " + INSTALL_HINT
                ) from None
            self.user = "postgres"
            self.root.chmod(0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D", str(self.data),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )  # fmt: skip
        argv = [
            str(self.bin / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.root}",
            "-c", "max_connections=100",
            "-c", "shared_buffers=16MB",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self._as_user(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited ({self.proc.returncode}): "
                    f"{self.log.read_text(errors='replace')[-800:]}; {INSTALL_HINT}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if self._ready():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise PostgresUnavailable(f"postgres did not accept connections within 60 s: {self.log}")

    def _ready(self) -> bool:
        try:
            import psycopg
        except ImportError:
            raise PostgresUnavailable(f"psycopg is not installed: {INSTALL_HINT}") from None
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def createdb(self, name: str) -> str:
        """A new empty database ``name``; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL of the whole group after 10 s; data removed."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
