"""The audit log: one SQLite record per decision, durable before the decision leaves.

:meth:`AuditLog.record` copies nothing and does no I/O: it queues a batch
and returns a ticket; a writer thread commits whatever is queued in one
transaction (group commit: batches that arrive while a commit is being
written join the next one) and :meth:`AuditLog.wait` returns once the
ticket's transaction is committed. :meth:`AuditLog.commit` is both, and is
what the pipeline calls before it hands a decision on: nothing leaves
unrecorded, so a crash can lose only decisions nobody was told about.

"Committed" means durable as ``synchronous`` says (SQLite in WAL mode):
``FULL`` (the default) syncs the WAL to the disk in every commit, so a
record survives a power cut, and a file system that reports a full disk only
when asked to sync is heard before the decision leaves; ``NORMAL`` leaves
the commit in the OS's cache: it survives a killed process but not a
crashed machine, for ~15 us a commit instead of ~250 us measured here.
Checkpoints (copying the WAL into the database file) run in the writer
after the waiters are released, not inside a commit somebody waits for.

A record holds the event time, symbol, the model called and the engine that
answered (``name``, ``version``, sha256 of its ``manifest.json``: which
covers every artifact file), the input features as float32 bytes, the
outputs (``score`` for a model with one score per row; for a multiclass
model, ``score`` is NULL and ``scores`` holds the whole probability vector as
float32 bytes, in the model's class order), the signal, the stage latencies
up to the record (a row cannot hold the duration of the commit that writes
it) and the request id.

Failures are typed: a database another connection keeps locked past
``busy_timeout_ms`` is an :class:`~setsuna.errors.AuditLockedError`, a full
disk (or ``max_db_bytes`` reached) an :class:`~setsuna.errors.AuditFullError`,
a commit not done within ``commit_timeout_ms`` an
:class:`~setsuna.errors.AuditError`. The failed transaction is rolled back,
never half written; every batch queued behind it fails too (counted in
``lost``), and the error is raised by ``wait``/``commit`` of those batches
and by every later ``record``, ``flush`` and ``close``.

:func:`verify` re-sends the recorded features to the recorded model version
and lists every prediction that does not reproduce (every class of a
multiclass model's vector).

Format 2 added the ``scores`` column. A format-1 database (no such column)
is upgraded in place when opened for writing (``ALTER TABLE ... ADD COLUMN``:
its rows keep their ``score`` and read ``scores`` as NULL) and verifies as
before; a database of a newer format than this code is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from setsuna.errors import AuditError, AuditFullError, AuditLockedError, ConfigError

if TYPE_CHECKING:
    from setsuna.client import Client

FORMAT_VERSION = 2
LATENCY_COLUMNS = ("features_us", "infer_us", "policy_us", "audit_us", "tick_to_signal_us")
#: Rows committed between two checkpoints (~1 MB of WAL at ~250 bytes a row).
_CHECKPOINT_ROWS = 4_000
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    event_ns INTEGER NOT NULL,
    symbol TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    features BLOB NOT NULL,
    score REAL,
    served_signal INTEGER,
    signal INTEGER NOT NULL,
    {", ".join(f"{c} REAL NOT NULL" for c in LATENCY_COLUMNS)},
    scores BLOB
);
CREATE INDEX IF NOT EXISTS decisions_model ON decisions (model, version);
"""
_INSERT = (
    "INSERT INTO decisions (request_id, event_ns, symbol, endpoint, model, version, "
    "artifact_sha256, features, score, served_signal, signal, "
    f"{', '.join(LATENCY_COLUMNS)}, scores) VALUES ({', '.join('?' * (12 + len(LATENCY_COLUMNS)))})"
)

Synchronous = Literal["FULL", "NORMAL"]


@dataclass(frozen=True)
class AuditSettings:
    """How the audit log writes; validated once.

    ``synchronous`` is how durable a commit is (see the module: ``FULL``
    survives a power cut, ``NORMAL`` only a killed process).
    ``commit_timeout_ms`` bounds how long :meth:`AuditLog.commit` waits for
    its batch's commit; it must exceed ``busy_timeout_ms`` so that a locked
    database is reported as locked. ``max_pending_batches`` bounds memory:
    when the writer falls that far behind, ``record`` waits (back-pressure)
    rather than dropping records. ``max_db_bytes`` (0: no cap) caps the
    database, so "full" is a setting and not only a disk event.
    """

    synchronous: Synchronous = "FULL"
    commit_timeout_ms: float = 10_000.0
    max_pending_batches: int = 10_000
    busy_timeout_ms: float = 2_000.0
    max_db_bytes: int = 0

    def __post_init__(self) -> None:
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(
                f"synchronous={self.synchronous!r}: choose 'FULL' (survives a power cut) or "
                "'NORMAL' (survives a killed process)"
            )
        if not self.busy_timeout_ms >= 0:
            raise ConfigError(f"busy_timeout_ms={self.busy_timeout_ms}: give >= 0")
        if not self.commit_timeout_ms > self.busy_timeout_ms:
            raise ConfigError(
                f"commit_timeout_ms={self.commit_timeout_ms}: give more than busy_timeout_ms="
                f"{self.busy_timeout_ms}, or a locked database reads as a slow one"
            )
        if self.max_pending_batches < 1:
            raise ConfigError(f"max_pending_batches={self.max_pending_batches}: give >= 1")
        if self.max_db_bytes < 0:
            raise ConfigError(f"max_db_bytes={self.max_db_bytes}: give >= 0 (0: no cap)")


@dataclass
class DecisionBatch:
    """The decisions of one request, as columns (copies: the caller's buffers are reused)."""

    request_id: str
    endpoint: str
    event_ns: npt.NDArray[np.int64]
    symbols: npt.NDArray[np.object_]
    served_by: npt.NDArray[np.object_]
    artifacts: npt.NDArray[np.object_]
    features: npt.NDArray[np.float32]
    #: ``[n]`` (one score per row), or ``[n, C]``: a multiclass model's probabilities.
    score: npt.NDArray[np.float32] | None
    served_signal: npt.NDArray[np.int8] | None
    signal: npt.NDArray[np.int8]
    #: features, infer, policy, audit, tick-to-signal in microseconds, up to the
    #: record: set before ``record`` (the writer may read them at once).
    latencies_us: list[float] = field(default_factory=lambda: [0.0] * len(LATENCY_COLUMNS))

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """One insert tuple per decision, built column-wise (the caller waits for the commit)."""
        n = len(self.event_ns)
        by = self.served_by.tolist()
        if n and by.count(by[0]) == n:  # one engine answered the whole batch: split once
            model, version = by[0].split(":", 1)
            models: Iterable[str] = repeat(model, n)
            versions: Iterable[str] = repeat(version, n)
        else:
            pairs = [s.split(":", 1) for s in by]
            models, versions = [p[0] for p in pairs], [p[1] for p in pairs]
        features = np.ascontiguousarray(self.features, dtype=np.float32).reshape(n, -1)
        blobs = features.view(np.dtype((np.void, features.shape[1] * 4))).reshape(n).tolist()
        none = repeat(None, n)
        score: Iterable[Any] = repeat(None, n)
        vectors: Iterable[Any] = repeat(None, n)
        if self.score is not None:
            s = np.ascontiguousarray(self.score, dtype=np.float32).reshape(n, -1)
            if s.shape[1] == 1:
                score = s.reshape(-1).tolist()
            else:  # the whole vector, in class order: verify compares every class
                vectors = s.view(np.dtype((np.void, s.shape[1] * 4))).reshape(n).tolist()
        return zip(
            repeat(self.request_id, n),
            self.event_ns.tolist(),
            self.symbols.tolist(),
            repeat(self.endpoint, n),
            models,
            versions,
            self.artifacts.tolist(),
            blobs,
            score,
            none if self.served_signal is None else self.served_signal.tolist(),
            self.signal.tolist(),
            *(repeat(float(v), n) for v in self.latencies_us),
            vectors,
            strict=True,  # a column of another length is a bug, never a short record
        )


def _translate(exc: sqlite3.Error, path: Path) -> AuditError:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return AuditLockedError(
            f"audit database {path} is locked by another connection ({exc}); stop the other "
            "writer or use another file"
        )
    if "full" in text:
        return AuditFullError(
            f"audit database {path} is full ({exc}); free disk space, raise max_db_bytes "
            "or start a new file"
        )
    return AuditError(f"audit database {path}: {exc}")


class AuditLog:
    """An append-only SQLite decision log with a group-committing writer (see the module)."""

    def __init__(
        self,
        path: str | Path,
        *,
        feature_names: Sequence[str],
        settings: AuditSettings | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings or AuditSettings()
        self.feature_names = tuple(feature_names)
        self._queue: queue.Queue[tuple[int, DecisionBatch] | None] = queue.Queue(
            self.settings.max_pending_batches
        )
        self._error: AuditError | None = None
        #: Tickets are handed out and queued under one lock, so they commit in order.
        self._order = threading.Lock()
        self._issued = 0
        self._done = threading.Condition()
        self._committed = 0  # highest ticket whose transaction committed
        self._closed = False
        self.queued = 0
        self.recorded = 0
        self.lost = 0
        self.commits = 0  # transactions: recorded / commits is the group size
        self.checkpoint_failures = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=self.settings.busy_timeout_ms / 1e3,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self.settings.synchronous}")
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # the writer checkpoints
            if self.settings.max_db_bytes:
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                self._db.execute(f"PRAGMA max_page_count={self.settings.max_db_bytes // page}")
            self._db.executescript(_SCHEMA)
            self._upgrade()
            self._check_meta(run_info or {})
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        self._thread = threading.Thread(target=self._writer, name="setsuna-audit", daemon=True)
        self._thread.start()

    def _upgrade(self) -> None:
        """Refuse a newer format; give a format-1 database the ``scores`` column (compatible)."""
        found = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if found is not None and not str(found[0]).isdigit():
            raise ConfigError(f"{self.path} has audit format {found[0]!r}; write to a new file")
        if found is not None and int(found[0]) > FORMAT_VERSION:
            raise ConfigError(
                f"{self.path} is audit format {found[0]}, newer than this setsuna's "
                f"{FORMAT_VERSION}: upgrade setsuna or write this run to a new file"
            )
        if "scores" not in _columns(self._db):
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("ALTER TABLE decisions ADD COLUMN scores BLOB")
        if found is not None and int(found[0]) < FORMAT_VERSION:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION),)
                )

    def _check_meta(self, run_info: dict[str, Any]) -> None:
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        names = json.dumps(list(self.feature_names))
        if rows and rows.get("feature_names") != names:
            raise ConfigError(
                f"{self.path} records other features ({rows.get('feature_names')}); "
                "write this run to a new audit file"
            )
        meta = {"format": str(FORMAT_VERSION), "feature_names": names, **rows}
        meta.setdefault("run_info", json.dumps(run_info, sort_keys=True))
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())

    # -- hot path ---------------------------------------------------------------------

    def record(self, batch: DecisionBatch) -> int:
        """Queue one batch for the next commit; returns the ticket :meth:`wait` takes.

        Raises the writer's error if it has failed: nothing is queued after a
        failed commit.
        """
        if self._error is not None:
            raise self._error
        with self._order:
            if self._closed:
                raise AuditError(f"audit log {self.path} is closed; open a new AuditLog to record")
            self._issued += 1
            ticket = self._issued
            self.queued += len(batch.event_ns)
            self._queue.put((ticket, batch))
        return ticket

    def wait(self, ticket: int, timeout_s: float | None = None) -> None:
        """Return once ``ticket``'s batch is committed; raise if its commit failed.

        ``timeout_s`` defaults to ``commit_timeout_ms``; past it the batch
        counts as not recorded (an :class:`AuditError`), whatever the writer
        does with it later.
        """
        limit_s = self.settings.commit_timeout_ms / 1e3 if timeout_s is None else timeout_s
        with self._done:
            settled = self._done.wait_for(
                lambda: self._committed >= ticket or self._error is not None, limit_s
            )
            if self._committed >= ticket:
                return
        if settled and self._error is not None:
            raise self._error
        raise AuditError(
            f"audit database {self.path}: a commit took over {limit_s * 1e3:g} ms; "
            "check the disk, or raise commit_timeout_ms"
        )

    def commit(self, batch: DecisionBatch) -> None:
        """Record ``batch`` and wait until it is durable: what a caller does before acting."""
        self.wait(self.record(batch))

    # -- writer thread ----------------------------------------------------------------

    def _writer(self) -> None:
        closing = False
        since_checkpoint = 0
        while not closing:
            group: list[tuple[int, DecisionBatch]] = []
            item = self._queue.get()
            while item is not None:
                group.append(item)
                try:  # what queued up during the last commit joins this one
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            closing = item is None
            if group:
                since_checkpoint += self._commit(group)
            if since_checkpoint >= _CHECKPOINT_ROWS and self._error is None:
                self._checkpoint()
                since_checkpoint = 0
        self._db.close()

    def _commit(self, group: list[tuple[int, DecisionBatch]]) -> int:
        """Write ``group`` in one transaction, release its waiters; the rows written."""
        n = sum(len(b.event_ns) for _, b in group)
        if self._error is None:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(_INSERT, (r for _, b in group for r in b.rows()))
                self._db.execute("COMMIT")
            except Exception as exc:  # a failed commit fails its waiters, never the thread
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # failed either way; nothing half kept
                        self._db.execute("ROLLBACK")
                self._error = (
                    _translate(exc, self.path)
                    if isinstance(exc, sqlite3.Error)
                    else AuditError(f"audit writer could not write a batch: {exc!r} (a bug)")
                )
        with self._done:
            if self._error is None:
                self.recorded += n
                self.commits += 1
                self._committed = group[-1][0]
            else:
                self.lost += n
            self._done.notify_all()
        return n if self._error is None else 0

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file, after the waiters were released.

        A failed checkpoint loses nothing (the rows are committed in the WAL);
        a full disk is then reported by the next commit.
        """
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            self.checkpoint_failures += 1

    # -- lifecycle --------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued so far is committed (or raise the writer's error)."""
        with self._order:
            last = self._issued
        self.wait(last, timeout_s)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Commit what is queued, stop the writer, raise its error if it failed."""
        with self._order:  # nothing is queued behind the stop sign
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Mismatch:
    """One recorded prediction that did not reproduce."""

    record_id: int
    model: str
    #: The score, or a multiclass model's whole vector (list, class order).
    recorded: float | list[float] | None
    got: float | list[float] | None
    reason: str


@dataclass
class VerifyReport:
    checked: int = 0
    reproduced: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.mismatches


def _columns(db: sqlite3.Connection) -> set[str]:
    return {str(r[1]) for r in db.execute("PRAGMA table_info(decisions)").fetchall()}


def read_records(path: str | Path) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(feature names, rows of id, model, version, features blob, score, scores blob).

    ``scores`` (a multiclass model's float32 vector) is None for a row with one
    score, and for every row of a format-1 database (read as it is, never
    upgraded by a reader). A newer format than this code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit database")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            fmt = str(meta.get("format", "1"))
            if not fmt.isdigit() or int(fmt) > FORMAT_VERSION:
                raise AuditError(
                    f"{path} is audit format {fmt}, newer than this setsuna's {FORMAT_VERSION}: "
                    "verify it with the setsuna that wrote it"
                )
            vectors = "scores" if "scores" in _columns(db) else "NULL"
            rows = db.execute(
                f"SELECT id, model, version, features, score, {vectors} FROM decisions ORDER BY id"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc
    return tuple(json.loads(meta.get("feature_names", "[]"))), rows


def verify(
    path: str | Path, client: Client, *, atol: float = 1e-6, batch_rows: int = 512
) -> VerifyReport:
    """Re-send every recorded input to its recorded model version; compare the scores.

    A row recorded with a probability vector (multiclass) reproduces when every
    class is within ``atol``; a vector of another length than the answer differs.
    """
    from setsuna.errors import ServingError

    _, rows = read_records(path)
    report = VerifyReport()
    groups: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for row in rows:
        groups.setdefault((row[1], row[2]), []).append(row)
    for (model, version), items in groups.items():
        for start in range(0, len(items), batch_rows):
            chunk = items[start : start + batch_rows]
            report.checked += len(chunk)
            x = np.frombuffer(b"".join(r[3] for r in chunk), np.float32).reshape(len(chunk), -1)
            try:
                pred = client.infer(model, x, version=version, outputs=["score"])
            except ServingError as exc:
                report.mismatches += [
                    Mismatch(r[0], f"{model}:{version}", r[4], None, str(exc)) for r in chunk
                ]
                continue
            answer = np.asarray(pred["score"], dtype=np.float64).reshape(len(chunk), -1)
            if any(r[5] is not None for r in chunk):
                _compare_vectors(report, chunk, answer, f"{model}:{version}", atol)
                continue
            got = answer.reshape(-1) if answer.shape[1] == 1 else np.full(len(chunk), np.nan)
            want = np.array([np.nan if r[4] is None else r[4] for r in chunk])
            bad = ~(np.abs(got - want) <= atol)
            report.reproduced += int(np.count_nonzero(~bad))
            report.mismatches += [
                Mismatch(
                    chunk[i][0],
                    f"{model}:{version}",
                    chunk[i][4],
                    float(got[i]) if answer.shape[1] == 1 else answer[i].tolist(),
                    "differs" if answer.shape[1] == 1 else "the model now answers a vector",
                )
                for i in np.flatnonzero(bad)
            ]
    return report


def _compare_vectors(
    report: VerifyReport,
    chunk: list[tuple[Any, ...]],
    answer: npt.NDArray[np.float64],
    label: str,
    atol: float,
) -> None:
    """Rows recorded with a probability vector: every class must reproduce within ``atol``."""
    for r, got in zip(chunk, answer, strict=True):
        want = None if r[5] is None else np.frombuffer(r[5], np.float32).astype(np.float64)
        if want is None or len(want) != len(got):
            what = "no vector recorded" if want is None else f"{len(want)} classes recorded"
            report.mismatches.append(
                Mismatch(
                    r[0],
                    label,
                    None if want is None else want.tolist(),
                    got.tolist(),
                    f"{what}, {len(got)} answered",
                )
            )
        elif bool((np.abs(got - want) <= atol).all()):
            report.reproduced += 1
        else:
            report.mismatches.append(Mismatch(r[0], label, want.tolist(), got.tolist(), "differs"))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("audit", help="work with an audit database")
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser(
        "verify",
        help="re-send recorded inputs to the recorded model versions; list what differs",
    )
    v.add_argument("db", type=Path, help="audit database (SQLite)")
    v.add_argument("--url", default="127.0.0.1:8001", help="server host:port")
    v.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    v.add_argument("--atol", type=float, default=1e-6, help="allowed |score difference|")
    v.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from setsuna.client import Client

    with Client(args.url, args.protocol) as client:
        report = verify(args.db, client, atol=args.atol)
    for m in report.mismatches[:50]:
        print(f"record {m.record_id} {m.model}: recorded {m.recorded} got {m.got} ({m.reason})")
    if len(report.mismatches) > 50:
        print(f"... and {len(report.mismatches) - 50} more")
    print(
        f"{report.reproduced}/{report.checked} predictions reproduced; "
        f"{len(report.mismatches)} did not"
    )
    return 0 if report.ok else 1
