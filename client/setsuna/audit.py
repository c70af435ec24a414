"""The audit log: one SQLite record per decision, written off the hot path.

:meth:`AuditLog.record` only copies a batch's arrays into a bounded queue
(microseconds); a writer thread turns batches into rows and commits them in
one transaction per ``flush_interval_ms`` (SQLite in WAL mode). A crash
therefore loses at most one flush interval of records. A record holds the
event time, symbol, the model called and the engine that answered
(``name``, ``version``, sha256 of its ``manifest.json``: which covers every
artifact file), the input features as float32 bytes, the outputs, the
signal, the stage latencies and the request id.

Failures are typed: a database another connection keeps locked past
``busy_timeout_ms`` is an :class:`~setsuna.errors.AuditLockedError`, a full
disk (or ``max_db_bytes`` reached) an :class:`~setsuna.errors.AuditFullError`.
A writer failure is raised by the next ``record``/``flush``/``close``, so the
pipeline stops instead of deciding on without an audit trail; the failed
transaction is rolled back, never half written.

:func:`verify` re-sends the recorded features to the recorded model version
and lists every prediction that does not reproduce.
"""

from __future__ import annotations

import argparse
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from setsuna.errors import AuditError, AuditFullError, AuditLockedError, ConfigError

if TYPE_CHECKING:
    from setsuna.client import Client

FORMAT_VERSION = 1
LATENCY_COLUMNS = ("features_us", "infer_us", "policy_us", "audit_us", "tick_to_signal_us")
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
    {", ".join(f"{c} REAL NOT NULL" for c in LATENCY_COLUMNS)}
);
CREATE INDEX IF NOT EXISTS decisions_model ON decisions (model, version);
"""
_INSERT = (
    "INSERT INTO decisions (request_id, event_ns, symbol, endpoint, model, version, "
    "artifact_sha256, features, score, served_signal, signal, "
    f"{', '.join(LATENCY_COLUMNS)}) VALUES ({', '.join('?' * (11 + len(LATENCY_COLUMNS)))})"
)


@dataclass(frozen=True)
class AuditSettings:
    """How the audit log writes; validated once.

    ``flush_interval_ms`` bounds what a crash can lose. ``max_pending_batches``
    bounds memory: when the writer falls that far behind, ``record`` waits
    (back-pressure) rather than dropping records. ``max_db_bytes`` (0: no cap)
    caps the database file, so "full" is a setting and not only a disk event.
    """

    flush_interval_ms: float = 100.0
    max_pending_batches: int = 10_000
    busy_timeout_ms: float = 2_000.0
    max_db_bytes: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.flush_interval_ms <= 60_000:
            raise ConfigError(f"flush_interval_ms={self.flush_interval_ms}: give 0 < ms <= 60000")
        if self.max_pending_batches < 1:
            raise ConfigError(f"max_pending_batches={self.max_pending_batches}: give >= 1")
        if not self.busy_timeout_ms >= 0:
            raise ConfigError(f"busy_timeout_ms={self.busy_timeout_ms}: give >= 0")
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
    score: npt.NDArray[np.float32] | None
    served_signal: npt.NDArray[np.int8] | None
    signal: npt.NDArray[np.int8]
    #: features, infer, policy, audit, tick-to-signal in microseconds (the batch's own).
    latencies_us: list[float] = field(default_factory=lambda: [0.0] * len(LATENCY_COLUMNS))

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """One insert tuple per decision (writer thread: per-row Python is fine there)."""
        n = len(self.event_ns)
        split = [s.split(":", 1) for s in self.served_by.tolist()]
        score = self.score.tolist() if self.score is not None else [None] * n
        served = self.served_signal.tolist() if self.served_signal is not None else [None] * n
        lat = tuple(self.latencies_us)
        columns = zip(
            self.event_ns.tolist(),
            self.symbols.tolist(),
            split,
            self.artifacts.tolist(),
            score,
            served,
            self.signal.tolist(),
            strict=True,
        )
        for i, (ts, sym, (model, version), art, sc, ss, sig) in enumerate(columns):
            blob = self.features[i].tobytes()
            yield (
                self.request_id,
                ts,
                sym,
                self.endpoint,
                model,
                version,
                art,
                blob,
                sc,
                ss,
                sig,
                *lat,
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
    """An append-only SQLite decision log with a background writer (see the module)."""

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
        self._queue: queue.Queue[DecisionBatch | None] = queue.Queue(
            self.settings.max_pending_batches
        )
        self._error: AuditError | None = None
        self.queued = 0
        self.recorded = 0
        self.lost = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=self.settings.busy_timeout_ms / 1e3,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if self.settings.max_db_bytes:
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                self._db.execute(f"PRAGMA max_page_count={self.settings.max_db_bytes // page}")
            self._db.executescript(_SCHEMA)
            self._check_meta(run_info or {})
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        self._thread = threading.Thread(target=self._writer, name="setsuna-audit", daemon=True)
        self._thread.start()

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

    def record(self, batch: DecisionBatch) -> None:
        """Queue one batch; raises the writer's error if it has failed."""
        if self._error is not None:
            raise self._error
        self.queued += len(batch.event_ns)
        self._queue.put(batch)

    # -- writer thread ----------------------------------------------------------------

    def _writer(self) -> None:
        interval_s = self.settings.flush_interval_ms / 1e3
        pending: list[DecisionBatch] = []
        first_at = 0.0
        closing = False
        while not closing:
            timeout = None if not pending else max(0.0, first_at + interval_s - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
                if item is None:
                    closing = True
                else:
                    if not pending:
                        first_at = time.monotonic()
                    pending.append(item)
                    while True:  # take what is already queued without waiting
                        more = self._queue.get_nowait()
                        if more is None:
                            closing = True
                            break
                        pending.append(more)
            except queue.Empty:
                pass
            if pending and (closing or time.monotonic() >= first_at + interval_s):
                self._commit(pending)
                pending = []
        self._db.close()

    def _commit(self, batches: list[DecisionBatch]) -> None:
        n = sum(len(b.event_ns) for b in batches)
        if self._error is not None:
            self.lost += n
            return
        rows = [r for b in batches for r in b.rows()]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.lost += n
            self._error = _translate(exc, self.path)
            return
        self.recorded += n

    # -- lifecycle --------------------------------------------------------------------

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything queued so far is committed (or raise the writer's error)."""
        deadline = time.monotonic() + timeout_s
        while self.recorded + self.lost < self.queued and time.monotonic() < deadline:
            if not self._thread.is_alive():
                break
            time.sleep(self.settings.flush_interval_ms / 4e3)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Commit what is queued, stop the writer, raise its error if it failed."""
        if self._thread.is_alive():
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
    recorded: float | None
    got: float | None
    reason: str


@dataclass
class VerifyReport:
    checked: int = 0
    reproduced: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.mismatches


def read_records(path: str | Path) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(feature names, rows of id, model, version, features blob, score) from a database."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no such audit database")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute(
                "SELECT id, model, version, features, score FROM decisions ORDER BY id"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc
    return tuple(json.loads(meta.get("feature_names", "[]"))), rows


def verify(
    path: str | Path, client: Client, *, atol: float = 1e-6, batch_rows: int = 512
) -> VerifyReport:
    """Re-send every recorded input to its recorded model version; compare the scores."""
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
            got = pred["score"].reshape(-1).astype(np.float64)
            want = np.array([np.nan if r[4] is None else r[4] for r in chunk])
            bad = ~(np.abs(got - want) <= atol)
            report.reproduced += int(np.count_nonzero(~bad))
            report.mismatches += [
                Mismatch(chunk[i][0], f"{model}:{version}", chunk[i][4], float(got[i]), "differs")
                for i in np.flatnonzero(bad)
            ]
    return report


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
