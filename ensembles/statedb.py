"""State shared by processes and hosts: a SQLite file (embedded default) or PostgreSQL.

Two stores use it: the outcomes the ``feedback`` model writes and every
``selector`` reads (:mod:`ensembles.outcomes`), and the lifecycle's deployment
records (:mod:`ensembles.deployments`). Both take a *path or URL*:

- a path (``outcomes.db``, ``/var/lib/setsuna/deployments.db``): SQLite in WAL
  mode, shared by the processes of one host;
- ``postgresql://[user@]host[:port]/dbname[?param=...]`` (or ``postgres://``):
  PostgreSQL through psycopg 3 (``pip install 'setsuna[postgres]'``), shared by
  every replica and operator that can reach it.

:func:`target` reads and validates that value once: the URL's syntax, and no
password in it. A URL ends up in a ``config.pbtxt`` or on a command line,
where anyone who can read the repository or ``ps`` would see it, so a
password is refused with the way to give it instead: libpq itself reads
``PGPASSWORD``, ``PGPASSFILE`` (or ``?passfile=...`` in the URL) and
``~/.pgpass``. :func:`connect` opens the store and creates its tables; a
server that cannot be reached fails there, naming the URL and what to check.

The SQL is written once, with ``?`` placeholders (turned into ``%s`` for
psycopg) and ``RETURNING`` (SQLite >= 3.35); only the table definitions
differ (``INTEGER PRIMARY KEY`` vs ``BIGSERIAL``, ``BIGINT`` for nanoseconds).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from setsuna.errors import SetsunaError

SCHEMES: Final = ("postgresql://", "postgres://")
#: Seconds libpq waits for a server (unless the URL says ``connect_timeout``).
CONNECT_TIMEOUT_S: Final = 5
_CREDENTIALS_HINT: Final = (
    "libpq reads the password from PGPASSWORD, PGPASSFILE (or ?passfile=... in the URL) "
    "or ~/.pgpass"
)
#: Serialises ``CREATE TABLE IF NOT EXISTS`` between processes starting at once (two
#: such statements racing on one new table fail in PostgreSQL with a unique violation).
_SCHEMA_LOCK_KEY: Final = 0x5E75_0000_0000_0001


class StateError(SetsunaError):
    """A shared-state database (outcomes, deployment records) cannot be opened or used."""


class LockHeldError(StateError):
    """:func:`advisory_lock`: another session holds the lock (``holder`` names it)."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"lock {name!r} is held by {holder}")
        self.holder = holder


@dataclass(frozen=True)
class Target:
    """Where a store lives: ``path`` (SQLite) or ``url`` (PostgreSQL), exactly one."""

    path: Path | None = None
    url: str | None = None

    @property
    def is_postgres(self) -> bool:
        return self.url is not None

    def exists(self) -> bool:
        """Whether there can be rows to read (a SQLite file not yet created has none)."""
        return self.url is not None or (self.path is not None and self.path.exists())

    def __str__(self) -> str:
        return self.url if self.url is not None else str(self.path)


def is_url(value: str | Path) -> bool:
    # A Path collapses "//": "postgresql://h/db" becomes "postgresql:/h/db".
    return str(value).startswith(("postgresql:", "postgres:"))


def target(value: str | Path | Target, *, base: Path | None = None) -> Target:
    """Validate a path-or-URL once. ``base``: the folder a relative path is relative to."""
    if isinstance(value, Target):
        return value
    if not is_url(value):
        path = Path(value)
        if not str(value):
            raise StateError("empty state database: give a file path or a postgresql:// URL")
        return Target(path=path if base is None or path.is_absolute() else base / path)
    url = str(value)
    if isinstance(value, Path) or not url.startswith(SCHEMES):
        raise StateError(
            f"{url!r} is not a PostgreSQL URL: write postgresql://[user@]host[:port]/dbname "
            "(passed as a string: a filesystem path turns '//' into '/')"
        )
    conninfo_to_dict = _psycopg().conninfo.conninfo_to_dict
    try:
        params = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own words
        raise StateError(f"bad PostgreSQL URL {url!r}: {exc}") from None
    if "password" in params:
        shown = url.split("@", 1)[-1] if "@" in url else "(the URL)"
        raise StateError(
            f"the PostgreSQL URL for {shown} carries a password: it would be written into "
            f"config files and command lines. Remove it; {_CREDENTIALS_HINT}"
        )
    if not params.get("dbname"):
        raise StateError(f"PostgreSQL URL {url!r} names no database: add /dbname")
    return Target(url=url)


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg.conninfo
    except ImportError:
        raise StateError(
            "a postgresql:// state database needs psycopg 3: pip install 'setsuna[postgres]' "
            "(psycopg[binary]>=3.1)"
        ) from None
    return psycopg


def _unreachable(where: Target, what: str, exc: BaseException) -> StateError:
    reason = str(exc).strip().replace("\n", " ")
    return StateError(
        f"{what}: cannot connect to PostgreSQL at {where}: {reason}. Check that the server "
        f"runs and that the URL names the right host, port, database and user; {_CREDENTIALS_HINT}"
    )


class Connection:
    """One connection to either backend; every error surfaces as ``error`` naming the store."""

    def __init__(
        self,
        where: Target,
        *,
        what: str,
        schema: Mapping[str, str],
        error: type[SetsunaError] = StateError,
        durable: bool = False,
        timeout_s: float = 10.0,
        application_name: str = "setsuna",
    ) -> None:
        self.where, self.what, self.error = where, what, error
        self._durable, self._timeout_s, self._app = durable, timeout_s, application_name
        self._schema = schema["postgresql" if where.is_postgres else "sqlite"]
        self._local = threading.Lock()  # one statement or transaction at a time
        self._db: Any = None
        self._open()

    # --------------------------------------------------------------- open, close

    def _open(self) -> None:
        if self.where.url is not None:
            self._db = self._open_postgres(self.where.url)
            return
        assert self.where.path is not None
        try:
            self.where.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: Triton calls initialize and execute on different
            # threads of one stub, never at the same time (and ``_local`` serialises).
            db = sqlite3.connect(
                self.where.path,
                timeout=self._timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
                db.executescript(self._schema)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as exc:
            raise self.error(f"{self.what} {self.where}: {exc}") from exc
        except OSError as exc:
            raise self.error(f"{self.what} {self.where}: {exc.strerror or exc}") from exc
        self._db = db

    def _open_postgres(self, url: str) -> Any:
        psycopg = _psycopg()
        extra: dict[str, Any] = {"autocommit": True, "application_name": self._app[:63]}
        if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(url):
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            db = psycopg.connect(url, **extra)
        except psycopg.Error as exc:
            raise self.error(str(_unreachable(self.where, self.what, exc))) from None
        try:
            if self._durable:  # a committed row is on the server's disk (whatever its default)
                db.execute("SET synchronous_commit = on")
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                for statement in _statements(self._schema):
                    db.execute(statement)
        except psycopg.Error as exc:
            db.close()
            raise self.error(f"{self.what} {self.where}: {exc}") from None
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- statements

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (_psycopg().Error,) if self.where.is_postgres else (sqlite3.Error,)

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self.where.is_postgres:
            cur = self._db.execute(sql.replace("?", "%s"), tuple(params))
            return list(cur.fetchall()) if cur.description is not None else []
        return list(self._db.execute(sql, tuple(params)).fetchall())

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._local:
            if self._db is None or getattr(self._db, "broken", False):
                self.close()  # a PostgreSQL connection lost with its server: open a new one
                self._open()
            try:
                yield
            except self._errors() as exc:
                raise self.error(f"{self.what} {self.where}: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement on its own (autocommit); its rows, if it returns any."""
        with self._guard():
            return self._run(sql, params)

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Run ``statements`` in one transaction (a write lock from the start on SQLite):
        all committed or none. Returns each statement's rows."""
        with self._guard():
            if self.where.is_postgres:
                with self._db.transaction():
                    return [self._run(sql, p) for sql, p in statements]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = [self._run(sql, p) for sql, p in statements]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out


def _statements(script: str) -> list[str]:
    """A schema script's statements (no ``;`` inside one: they are plain DDL)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def connect(
    where: str | Path | Target,
    *,
    what: str,
    schema: Mapping[str, str],
    error: type[SetsunaError] = StateError,
    durable: bool = False,
    timeout_s: float = 10.0,
    application_name: str = "setsuna",
) -> Connection:
    """Open ``where`` (path or URL, see :func:`target`) and create ``schema`` there.

    ``schema``: ``{"sqlite": ddl, "postgresql": ddl}``. ``durable``: a commit is on
    disk when it returns (SQLite ``synchronous=FULL``, PostgreSQL
    ``synchronous_commit=on``); otherwise SQLite runs ``synchronous=NORMAL``.
    """
    try:
        t = target(where)
    except StateError as exc:
        raise error(f"{what}: {exc}") from None
    return Connection(
        t,
        what=what,
        schema=schema,
        error=error,
        durable=durable,
        timeout_s=timeout_s,
        application_name=application_name,
    )


_LOCKS_SCHEMA: Final = {
    "postgresql": "CREATE TABLE IF NOT EXISTS setsuna_locks "
    "(name TEXT PRIMARY KEY, holder TEXT NOT NULL)",
    "sqlite": "",
}


def lock_key(name: str) -> int:
    """The 64-bit key of ``pg_advisory_lock`` for ``name`` (stable across hosts and runs)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(where: Target, name: str, holder: str) -> Iterator[None]:
    """Hold PostgreSQL's session lock ``name`` (not waited for) for the ``with`` block.

    Taken with ``pg_try_advisory_lock`` on a connection of its own: a second
    taker, on any host, gets :class:`LockHeldError` at once, naming ``holder``
    as the first one wrote it in ``setsuna_locks``. The server drops the lock
    when the holder's connection ends, so an operator killed with ``kill -9``
    does not keep it (its socket closes with the process).
    """
    assert where.is_postgres, "advisory locks are PostgreSQL's (SQLite stores use flock)"
    key = lock_key(name)
    db = Connection(where, what=f"lock {name}", schema=_LOCKS_SCHEMA, application_name=holder)
    try:
        got = db.execute("SELECT pg_try_advisory_lock(?)", (key,))[0][0]
        if not got:
            rows = db.execute("SELECT holder FROM setsuna_locks WHERE name = ?", (name,))
            raise LockHeldError(name, rows[0][0] if rows else "another session (not named yet)")
        db.execute(
            "INSERT INTO setsuna_locks (name, holder) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder",
            (name, holder),
        )
        try:
            yield
        finally:
            with suppress(StateError):  # the connection is gone, and the lock with it
                db.execute("SELECT pg_advisory_unlock(?)", (key,))
    finally:
        db.close()
