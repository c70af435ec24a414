"""Realised outcomes per model version, shared by the feedback and selector models.

The two are separate Triton models (separate processes, and with several
replicas separate hosts), so they share a database (:mod:`ensembles.statedb`):
a SQLite file (WAL: the reader never blocks the writer) on one host, or
PostgreSQL (a ``postgresql://`` URL) across replicas. ``feedback`` adds hits
and counts in one transaction per batch (one ``INSERT ... ON CONFLICT DO
UPDATE ... RETURNING`` statement: the new totals come back from the same
transaction, so two writers never lose a count); ``selector`` reads the totals
now and then. The numbers are integers, so the blend in
:func:`ensembles.selection.accuracy` is exact to reproduce.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from ensembles import statedb
from setsuna.errors import ConfigError

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS outcomes (
    model TEXT PRIMARY KEY,   -- model:version that made the prediction
    hits BIGINT NOT NULL,     -- predictions whose decision matched the outcome
    n BIGINT NOT NULL         -- outcomes recorded
)
"""
SCHEMA: Final = {"sqlite": _TABLE, "postgresql": _TABLE}


class Outcomes:
    """The outcome totals at ``where``: a SQLite path or a ``postgresql://`` URL.

    Opening validates the URL and reaches the server once; a bad URL or a
    server that does not answer raises :class:`ensembles.statedb.StateError`
    saying what to fix.
    """

    def __init__(self, where: Path | str | statedb.Target) -> None:
        self._db = statedb.connect(
            where, what="outcomes database", schema=SCHEMA, timeout_s=5.0,
            application_name="setsuna outcomes",
        )  # fmt: skip
        self.where = self._db.where

    def add(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Add (hits, n) per model in one transaction; return the new totals of those models."""
        if not counts:
            return {}
        models = sorted(counts)  # one order for every writer: no deadlock between two batches
        values = ",".join("(?, ?, ?)" for _ in models)
        params = [v for m in models for v in (m, int(counts[m][0]), int(counts[m][1]))]
        (rows,) = self._db.transaction(
            [
                (
                    f"INSERT INTO outcomes (model, hits, n) VALUES {values} "
                    "ON CONFLICT (model) DO UPDATE SET hits = outcomes.hits + excluded.hits, "
                    "n = outcomes.n + excluded.n RETURNING model, hits, n",
                    params,
                )
            ]
        )
        return {m: (int(h), int(n)) for m, h, n in rows}

    def totals(self) -> dict[str, tuple[int, int]]:
        rows = self._db.execute("SELECT model, hits, n FROM outcomes")
        return {m: (int(h), int(n)) for m, h, n in rows}

    def close(self) -> None:
        self._db.close()


def from_config(model_folder: Path, value: str, model: str) -> Outcomes:
    """``model``'s ``outcomes_db`` parameter opened: a path (relative to ``model_folder``)
    or a ``postgresql://`` URL. Any problem is the model's load failure, saying what to fix."""
    try:
        return Outcomes(statedb.target(value, base=model_folder))
    except statedb.StateError as exc:
        raise ConfigError(f"{model}: config parameter 'outcomes_db': {exc}") from None
