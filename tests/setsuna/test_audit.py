"""The audit log on real SQLite: group commits in WAL, durable before ``commit`` returns,
a locked, full or slow database, verify input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from setsuna.audit import AuditLog, AuditSettings, DecisionBatch, read_records
from setsuna.errors import AuditError, AuditFullError, AuditLockedError, ConfigError

NAMES = ("a", "b", "c")


def _batch(n: int, start: int = 0) -> DecisionBatch:
    return DecisionBatch(
        request_id=f"r{start}",
        endpoint="decide",
        event_ns=np.arange(start, start + n, dtype=np.int64),
        symbols=np.array(["X"] * n, dtype=object),
        served_by=np.array(["m:1"] * n, dtype=object),
        artifacts=np.array(["0" * 64] * n, dtype=object),
        features=np.random.default_rng(start).normal(size=(n, 3)).astype(np.float32),
        score=np.full(n, 0.5, np.float32),
        served_signal=None,
        signal=np.zeros(n, np.int8),
    )


def test_records_round_trip_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with AuditLog(db, feature_names=NAMES) as log:
        for k in range(10):
            log.record(_batch(7, start=k * 7))
    assert log.recorded == 70 and log.lost == 0
    names, rows = read_records(db)
    assert names == NAMES and len(rows) == 70
    x = np.frombuffer(rows[8][3], np.float32)
    np.testing.assert_array_equal(x, _batch(7, start=7).features[1])
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_commit_returns_once_the_rows_are_committed(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db, feature_names=NAMES)
    log.commit(_batch(5))
    with sqlite3.connect(db) as con:  # visible to another reader at once, before close
        assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 5
    ticket = log.record(_batch(4, start=5))
    log.wait(ticket)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 9
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.record(_batch(1))


def test_batches_queued_during_a_commit_share_the_next_transaction(tmp_path: Path) -> None:
    """Group commit: 50 batches queued while another connection holds the lock -> <= 2 commits."""
    db = tmp_path / "a.db"
    AuditLog(db, feature_names=NAMES).close()
    holder = sqlite3.connect(db, isolation_level=None)
    log = AuditLog(db, feature_names=NAMES)
    holder.execute("BEGIN IMMEDIATE")  # the writer cannot commit until this ends
    tickets = [log.record(_batch(3, start=3 * k)) for k in range(50)]
    holder.execute("ROLLBACK")
    holder.close()
    log.wait(tickets[-1])
    assert log.recorded == 150 and log.commits <= 2
    log.close()
    assert len(read_records(db)[1]) == 150


def test_a_commit_slower_than_its_timeout_is_an_error(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    AuditLog(db, feature_names=NAMES).close()
    holder = sqlite3.connect(db, isolation_level=None)
    log = AuditLog(db, feature_names=NAMES)
    holder.execute("BEGIN IMMEDIATE")
    try:
        ticket = log.record(_batch(2))
        with pytest.raises(AuditError, match="commit_timeout_ms"):
            log.wait(ticket, timeout_s=0.05)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    log.close()


def test_a_locked_database_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    AuditLog(db, feature_names=NAMES).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(AuditLockedError, match="locked"):
            AuditLog(db, feature_names=NAMES, settings=AuditSettings(busy_timeout_ms=50))
        # the lock taken after start: the writer fails, the next record raises
        holder.execute("ROLLBACK")
        log = AuditLog(db, feature_names=NAMES, settings=AuditSettings(busy_timeout_ms=50))
        holder.execute("BEGIN EXCLUSIVE")
        log.record(_batch(3))
        with pytest.raises(AuditLockedError):
            log.flush()
        with pytest.raises(AuditLockedError):
            log.record(_batch(3))
        assert log.recorded == 0 and log.lost == 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with pytest.raises(AuditError):
        log.close()


def test_a_full_database_is_a_clear_error_and_nothing_half_written(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db, feature_names=NAMES, settings=AuditSettings(max_db_bytes=64 * 1024))
    log.commit(_batch(10))
    with pytest.raises(AuditFullError):  # the batch whose commit failed is told so
        log.commit(_batch(5000, start=10))
    with pytest.raises(AuditFullError):  # and nothing is queued after it
        log.record(_batch(1, start=5010))
    with pytest.raises(AuditFullError):
        log.close()
    assert log.recorded == 10 and log.lost == 5000
    assert len(read_records(db)[1]) == 10  # the failed transaction was rolled back


def test_another_runs_features_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    AuditLog(db, feature_names=NAMES).close()
    with pytest.raises(ConfigError, match="new audit file"):
        AuditLog(db, feature_names=("x",))
    with pytest.raises(ConfigError):
        AuditSettings(synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="locked database"):
        AuditSettings(commit_timeout_ms=100, busy_timeout_ms=2_000)
