"""Realised outcomes per model version, shared by the feedback and selector models.

The two are separate Triton models (separate processes), so they share a
SQLite file: ``feedback`` adds hits and counts in one transaction per batch,
``selector`` reads the totals now and then. WAL mode lets the reader never
block the writer. The numbers are integers, so the blend in
:func:`ensembles.selection.accuracy` is exact to reproduce.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    model TEXT PRIMARY KEY,   -- model:version that made the prediction
    hits INTEGER NOT NULL,    -- predictions whose decision matched the outcome
    n INTEGER NOT NULL        -- outcomes recorded
)
"""


class Outcomes:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: Triton calls initialize and execute on different
        # threads of one stub, never at the same time.
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def add(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Add (hits, n) per model in one transaction; return the new totals of those models."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for model, (hits, n) in counts.items():
                self._db.execute(
                    "INSERT INTO outcomes (model, hits, n) VALUES (?, ?, ?) "
                    "ON CONFLICT(model) DO UPDATE SET hits = hits + excluded.hits, "
                    "n = n + excluded.n",
                    (model, hits, n),
                )
            rows = self._db.execute(
                f"SELECT model, hits, n FROM outcomes WHERE model IN "
                f"({','.join('?' * len(counts))})",
                list(counts),
            ).fetchall()
        return {m: (h, n) for m, h, n in rows}

    def totals(self) -> dict[str, tuple[int, int]]:
        rows = self._db.execute("SELECT model, hits, n FROM outcomes").fetchall()
        return {m: (h, n) for m, h, n in rows}

    def close(self) -> None:
        self._db.close()
