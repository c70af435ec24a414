"""Audit format 2 (issue 15): the ``scores`` column beside format-1 databases.

A database written before the column existed is upgraded in place when opened
for writing (its rows keep their ``score``, and read ``scores`` as NULL), is
read as it is by a reader, and a database of a newer format is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from setsuna.audit import FORMAT_VERSION, LATENCY_COLUMNS, AuditLog, DecisionBatch, read_records
from setsuna.errors import AuditError, ConfigError

NAMES = ("a", "b", "c")
#: The decisions table as format 1 created it (no ``scores``).
FORMAT_1 = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, event_ns INTEGER NOT NULL,
    symbol TEXT NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL, features BLOB NOT NULL, score REAL, served_signal INTEGER,
    signal INTEGER NOT NULL, {", ".join(f"{c} REAL NOT NULL" for c in LATENCY_COLUMNS)}
);
INSERT INTO meta VALUES ('format', '1'), ('feature_names', '["a", "b", "c"]');
INSERT INTO decisions VALUES (1, 'r0', 0, 'X', 'm', 'm', '1', '', x'0000803f0000803f0000803f',
    0.25, NULL, 0, 1, 1, 1, 1, 1);
"""


def _batch(score: np.ndarray) -> DecisionBatch:
    n = len(score)
    return DecisionBatch(
        request_id="r1",
        endpoint="m",
        event_ns=np.arange(n, dtype=np.int64),
        symbols=np.array(["X"] * n, dtype=object),
        served_by=np.array(["m:1"] * n, dtype=object),
        artifacts=np.array(["0" * 64] * n, dtype=object),
        features=np.ones((n, 3), np.float32),
        score=score,
        served_signal=None,
        signal=np.zeros(n, np.int8),
    )


def test_a_format_1_database_is_read_as_it_is_and_upgraded_for_writing(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:
        con.executescript(FORMAT_1)
    names, rows = read_records(db)  # a reader never changes the file
    assert names == NAMES and rows == [(1, "m", "1", rows[0][3], 0.25, None)]
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
    with AuditLog(db, feature_names=NAMES) as log:
        log.commit(_batch(probs))
        log.commit(_batch(np.array([0.75], np.float32)))
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM meta WHERE key='format'").fetchone()[0] == str(
            FORMAT_VERSION
        )
    _, rows = read_records(db)
    assert [r[4] for r in rows] == [0.25, None, None, 0.75]
    assert rows[0][5] is None and rows[3][5] is None
    np.testing.assert_array_equal(np.frombuffer(rows[2][5], np.float32), probs[1])


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    with AuditLog(db, feature_names=NAMES) as log:
        log.commit(_batch(np.array([0.5], np.float32)))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION + 1),))
    with pytest.raises(AuditError, match="newer than this setsuna"):
        read_records(db)
    with pytest.raises(ConfigError, match="newer than this setsuna"):
        AuditLog(db, feature_names=NAMES)
