"""Deployment records: every lifecycle step, who took it, and what it changed.

One SQLite table, ``deployments``, in whichever database the operator names
(``--audit-db``). Pointed at the trading audit database (:mod:`setsuna.audit`,
table ``decisions``), a decision joins the deployment that put its engine in
place: :func:`deployment_of` is that query (the newest step that finished
before the decision's ``event_ns`` and routed to its ``model:version``)::

    id | t_ns | who | action | model | from_version | to_version | outcome | detail
       | figures (JSON) | experiments (JSON: {model: {"before": doc, "after": doc}})

``outcome`` is ``done``, ``refused`` (nothing changed) or ``failed`` (undone:
what served before serves); a step writes its row as ``started`` before it
touches a file and updates it at the end, so a step whose process was
killed midway is still on record, with the files it was replacing.
``experiments`` holds each changed experiment file before and after, which
is what :func:`last_undoable` hands a rollback. Each write is one
transaction (WAL, ``synchronous=FULL``): a row is written whole or not at all.

The records live in a SQLite file or, given a ``postgresql://`` URL, in
PostgreSQL (:mod:`ensembles.statedb`), where operators on several hosts share
them; there every write is committed with ``synchronous_commit=on``, so a
``started`` row is on the server's disk before the step touches a file.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ensembles import statedb
from setsuna.errors import AuditError

_COLUMNS: Final = """
    t_ns BIGINT NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    figures TEXT NOT NULL,
    experiments TEXT NOT NULL,
    undoes BIGINT
);
CREATE INDEX IF NOT EXISTS deployments_model ON deployments (model, t_ns);
"""
#: The same table in both: only the key differs (SQLite's rowid alias, PostgreSQL's sequence).
SCHEMA: Final = {
    "sqlite": "CREATE TABLE IF NOT EXISTS deployments (\n    id INTEGER PRIMARY KEY," + _COLUMNS,
    "postgresql": "CREATE TABLE IF NOT EXISTS deployments (\n    id BIGSERIAL PRIMARY KEY,"
    + _COLUMNS,
}
#: Where the records live: a SQLite path or a ``postgresql://`` URL (:func:`statedb.target`).
Where = Path | str | statedb.Target
ACTIONS: Final = ("publish", "shadow", "compare", "canary", "promote", "rollback")
#: ``started``: written before a step touches anything, replaced by the step's outcome
#: when it ends; one left behind is a step whose process died midway (``kill -9``).
OUTCOMES: Final = ("started", "done", "refused", "failed")


def operator() -> str:
    """``user@host pid N``: who is taking the step (recorded, and named in conflicts)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


@dataclass(frozen=True)
class Step:
    """One recorded lifecycle step."""

    id: int
    t_ns: int
    who: str
    action: str
    model: str
    from_version: int | None
    to_version: int | None
    outcome: str
    detail: str
    figures: Mapping[str, Any]
    experiments: Mapping[str, Mapping[str, Any]]
    undoes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "t_ns": self.t_ns,
            "who": self.who,
            "action": self.action,
            "model": self.model,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "outcome": self.outcome,
            "detail": self.detail,
            "figures": dict(self.figures),
            "experiments": sorted(self.experiments),
            "undoes": self.undoes,
        }


@contextmanager
def _connect(where: Where) -> Iterator[statedb.Connection]:
    with statedb.connect(
        where, what="deployment records", schema=SCHEMA, error=AuditError, durable=True,
        application_name="setsuna lifecycle",
    ) as db:  # fmt: skip
        yield db


def target(where: Where) -> statedb.Target:
    """``where`` validated (a bad or password-carrying URL: :class:`AuditError`)."""
    try:
        return statedb.target(where)
    except statedb.StateError as exc:
        raise AuditError(f"deployment records: {exc}") from None


def record(
    path: Where,
    *,
    action: str,
    model: str,
    outcome: str,
    detail: str,
    who: str | None = None,
    from_version: int | None = None,
    to_version: int | None = None,
    figures: Mapping[str, Any] | None = None,
    experiments: Mapping[str, Mapping[str, Any]] | None = None,
    undoes: int | None = None,
) -> Step:
    """Append one step (one transaction) and return it."""
    if action not in ACTIONS or outcome not in OUTCOMES:
        raise ValueError(
            f"action {action!r} / outcome {outcome!r}: not one of {ACTIONS}/{OUTCOMES}"
        )
    step = Step(
        0,
        time.time_ns(),
        who or operator(),
        action,
        model,
        from_version,
        to_version,
        outcome,
        detail,
        dict(figures or {}),
        dict(experiments or {}),
        undoes,
    )
    with _connect(path) as db:
        ((new_id,),) = db.execute(
            "INSERT INTO deployments (t_ns, who, action, model, from_version, to_version, "
            "outcome, detail, figures, experiments, undoes) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "RETURNING id",
            (
                step.t_ns,
                step.who,
                action,
                model,
                from_version,
                to_version,
                outcome,
                detail,
                json.dumps(step.figures, allow_nan=True),
                json.dumps(step.experiments),
                undoes,
            ),
        )
    return Step(**{**step.__dict__, "id": new_id})


def finish(
    path: Where,
    step_id: int,
    *,
    outcome: str,
    detail: str,
    from_version: int | None = None,
    to_version: int | None = None,
    figures: Mapping[str, Any] | None = None,
    experiments: Mapping[str, Mapping[str, Any]] | None = None,
    undoes: int | None = None,
) -> Step:
    """Turn the ``started`` row ``step_id`` into the step's outcome (one transaction)."""
    if outcome not in OUTCOMES or outcome == "started":
        raise ValueError(f"outcome {outcome!r}: one of {OUTCOMES[1:]}")
    with _connect(path) as db:
        rows = db.execute(
            "UPDATE deployments SET t_ns=?, outcome=?, detail=?, from_version=?, to_version=?, "
            "figures=?, experiments=?, undoes=? WHERE id=? RETURNING *",
            (
                time.time_ns(),
                outcome,
                detail,
                from_version,
                to_version,
                json.dumps(dict(figures or {}), allow_nan=True),
                json.dumps(dict(experiments or {})),
                undoes,
                step_id,
            ),
        )
    if not rows:
        raise AuditError(f"deployment records {path}: no step {step_id} to finish")
    return _step(rows[0])


def history(path: Where, model: str | None = None, limit: int = 100) -> list[Step]:
    """The newest ``limit`` steps (of ``model``), oldest first."""
    if not target(path).exists():
        return []
    where, args = ("WHERE model = ?", (model,)) if model else ("", ())
    with _connect(path) as db:
        rows = db.execute(
            f"SELECT * FROM deployments {where} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
    return [_step(r) for r in reversed(rows)]


def last_undoable(path: Where) -> Step | None:
    """The newest ``done`` (or interrupted: ``started``) step that changed experiments
    and has not been rolled back.

    Rollbacks undo in stack order: a second rollback undoes the step before
    the first one's.
    """
    if not target(path).exists():
        return None
    with _connect(path) as db:
        rows = db.execute(
            "SELECT * FROM deployments WHERE outcome IN ('done', 'started') "
            "AND experiments != '{}' "
            "ORDER BY id DESC"
        )
    undone: set[int] = set()
    for row in rows:
        step = _step(row)
        if step.action == "rollback":
            if step.undoes is not None:
                undone.add(step.undoes)
            undone.add(step.id)
            continue
        if step.id not in undone:
            return step
    return None


def deployment_of(path: Where, model: str, version: int, event_ns: int) -> Step | None:
    """The step that put ``model:version`` in place before ``event_ns`` (a decision's time)."""
    with _connect(path) as db:
        rows = db.execute(
            "SELECT * FROM deployments WHERE outcome = 'done' AND model = ? AND to_version = ? "
            "AND action IN ('canary', 'promote', 'rollback', 'publish') AND t_ns <= ? "
            "ORDER BY t_ns DESC LIMIT 1",
            (model, version, event_ns),
        )
    return _step(rows[0]) if rows else None


def _step(row: tuple[Any, ...]) -> Step:
    (id_, t_ns, who, action, model, v0, v1, outcome, detail, figures, exps, undoes) = row
    return Step(
        id_, t_ns, who, action, model, v0, v1, outcome, detail,
        json.loads(figures), json.loads(exps), undoes,
    )  # fmt: skip
