"""Shared state in PostgreSQL (:mod:`ensembles.statedb`), against a real server.

``postgres`` (tests/conftest.py) is a PostgreSQL 15 started for the session
as an unprivileged user; ``state_db`` is a fresh database of each backend (a
SQLite path, then a PostgreSQL URL), so the behaviour tests run on both.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ensembles import deployments, lifecycle, statedb
from ensembles.outcomes import Outcomes, from_config
from setsuna.errors import AuditError, ConfigError, DeploymentConflictError
from tests.helpers import wait_until
from tests.pgserver import PostgresServer, free_port

# ---------------------------------------------------------------------- outcomes


def test_add_returns_the_new_totals_and_readers_see_them(state_db: Path | str) -> None:
    writer, reader = Outcomes(state_db), Outcomes(state_db)  # feedback, a selector
    try:
        assert reader.totals() == {}
        assert writer.add({}) == {}
        assert writer.add({"a:1": (3, 4), "b:1": (0, 2)}) == {"a:1": (3, 4), "b:1": (0, 2)}
        assert writer.add({"a:1": (1, 1)}) == {"a:1": (4, 5)}  # only the models of the batch
        assert reader.totals() == {"a:1": (4, 5), "b:1": (0, 2)}
    finally:
        writer.close()
        reader.close()


def _add_many(where: str, tag: int, rounds: int) -> None:
    db = Outcomes(where)
    for i in range(rounds):
        # the shared key in every batch, plus one of its own; keys in both orders
        batch = {"shared:1": (i % 2, 1), f"own{tag}:1": (1, 1)}
        db.add(dict(reversed(batch.items())) if tag % 2 else batch)
    db.close()


def test_two_processes_adding_at_once_lose_no_count(state_db: Path | str) -> None:
    rounds = 300
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(state_db), t, rounds)) for t in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    db = Outcomes(state_db)
    try:
        assert db.totals() == {
            "shared:1": (rounds, 2 * rounds),  # hits: half of each process's rounds
            "own1:1": (rounds, rounds),
            "own2:1": (rounds, rounds),
        }
    finally:
        db.close()


def test_two_replicas_selectors_read_the_same_totals(postgres: PostgresServer) -> None:
    """Two readers (two replicas' selectors) and a writer (a feedback) on one server."""
    url = postgres.createdb("replicas")
    feedback, sel_a, sel_b = Outcomes(url), Outcomes(url), Outcomes(url)
    try:
        for _ in range(5):
            feedback.add({"lightgbm:1": (7, 10), "xgboost:1": (2, 10)})
            assert sel_a.totals() == sel_b.totals()
        assert sel_b.totals() == {"lightgbm:1": (35, 50), "xgboost:1": (10, 50)}
    finally:
        for db in (feedback, sel_a, sel_b):
            db.close()


def test_a_model_names_its_database_in_its_config(tmp_path: Path, postgres: PostgresServer) -> None:
    """``outcomes_db``: relative to the model folder, absolute, or a URL."""
    db = from_config(tmp_path, "rel/outcomes.db", "feedback")
    assert db.where.path == tmp_path / "rel" / "outcomes.db"
    db.close()
    url = postgres.createdb("from_config")
    db = from_config(tmp_path, url, "feedback")
    assert db.where.url == url and db.totals() == {}
    db.close()


def test_a_lost_connection_fails_that_call_and_the_next_one_reconnects(
    postgres: PostgresServer,
) -> None:
    url = postgres.createdb("reconnect")
    db = Outcomes(url)
    try:
        db.add({"a:1": (1, 1)})
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'reconnect' AND application_name = 'setsuna outcomes'"
            )
        with pytest.raises(statedb.StateError, match="outcomes database"):
            db.totals()
        assert db.add({"a:1": (1, 1)}) == {"a:1": (2, 2)}  # a new connection, no count lost
    finally:
        db.close()


# ---------------------------------------------------------------------- clear errors


def test_a_password_in_the_url_is_refused_with_where_to_put_it(tmp_path: Path) -> None:
    url = "postgresql://setsuna:hunter2@db.example:5432/state"
    for opener in (lambda: Outcomes(url), lambda: statedb.target(url)):
        with pytest.raises(statedb.StateError, match="PGPASSWORD, PGPASSFILE") as info:
            opener()
        assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"feedback: config parameter 'outcomes_db'.*PGPASS"):
        from_config(tmp_path, url, "feedback")
    with pytest.raises(AuditError, match=r"deployment records.*PGPASSWORD"):
        lifecycle.Lifecycle(tmp_path, "127.0.0.1:1", {}, metrics_url="", audit_db=url)
    with pytest.raises(statedb.StateError, match="PGPASSWORD"):
        statedb.target("postgresql://db.example/state?password=hunter2")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://db.example/state db", "bad PostgreSQL URL"),
        ("postgresql://db.example:5432", "names no database"),
        ("postgresql:/db.example/state", "not a PostgreSQL URL"),  # what Path() makes of it
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(statedb.StateError, match=says):
        statedb.target(url)
    with pytest.raises(statedb.StateError, match="a filesystem path turns '//' into '/'"):
        statedb.target(Path(url))  # argparse type=Path, say: never read as a file name


def test_a_server_that_is_down_says_what_to_check(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/state"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(statedb.StateError) as info:
        Outcomes(url)
    assert time.monotonic() - t0 < 10
    text = str(info.value)
    assert "cannot connect to PostgreSQL at " + url in text
    assert "Check that the server runs" in text and "PGPASSFILE" in text
    with pytest.raises(AuditError, match="deployment records: cannot connect"):
        deployments.history(url)


# ---------------------------------------------------------------------- deployments


def _operator(repo: str, url: str, queue: Any) -> None:
    """An operator on another host: takes the lifecycle lock, records its step as
    ``started``, and waits (to be killed)."""
    life = lifecycle.Lifecycle(Path(repo), "127.0.0.1:1", {}, metrics_url="", audit_db=url)
    with life._lock("canary", "alpha"):
        life._begin()
        queue.put((life._intent, life.who))
        time.sleep(120)


def test_operators_on_two_hosts_conflict_and_a_killed_ones_started_row_stays(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """Two repositories (two state folders: their flocks never meet, as on two hosts)
    sharing PostgreSQL records: the second step is refused at once naming the first; a
    ``kill -9`` of the first leaves its ``started`` row committed and frees the lock."""
    url = postgres.createdb("operators")
    (tmp_path / "a" / "repo").mkdir(parents=True)
    (tmp_path / "b" / "repo").mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_operator, args=(str(tmp_path / "a" / "repo"), url, queue))
    proc.start()
    try:
        step_id, who = queue.get(timeout=60)
        other = lifecycle.Lifecycle(
            tmp_path / "b" / "repo", "127.0.0.1:1", {}, metrics_url="", audit_db=url
        )
        t0 = time.monotonic()
        with pytest.raises(DeploymentConflictError) as info, other._lock("promote", "alpha"):
            pass
        assert time.monotonic() - t0 < 2  # refused at once, not waited for
        assert f"canary alpha by {who}" in str(info.value)
        assert url in str(info.value)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
    (row,) = [s for s in deployments.history(url) if s.id == step_id]
    assert (row.outcome, row.action, row.model, row.who) == ("started", "canary", "alpha", who)

    def free() -> bool:
        try:
            with other._lock("promote", "alpha"):
                return True
        except DeploymentConflictError:
            return False

    wait_until("the killed operator's lock is released", free, timeout_s=30)


def test_a_started_row_is_on_the_server_before_record_returns(postgres: PostgresServer) -> None:
    """What ``kill -9`` relies on: ``record`` returns after the commit, seen by any session."""
    url = postgres.createdb("durable")
    step = deployments.record(url, action="canary", model="m", outcome="started", detail="")
    with psycopg.connect(url) as db:
        row = db.execute("SELECT outcome FROM deployments WHERE id = %s", (step.id,)).fetchone()
    assert row == ("started",)
    done = deployments.finish(url, step.id, outcome="done", detail="ok", to_version=2)
    assert (done.outcome, done.to_version, done.id) == ("done", 2, step.id)
    with pytest.raises(AuditError, match="no step 999"):
        deployments.finish(url, 999, outcome="done", detail="")


def test_the_repository_writes_a_url_verbatim_and_never_one_with_a_password(
    tmp_path: Path,
) -> None:
    from ensembles import repository as rep
    from ensembles.__main__ import write_examples

    url = "postgresql://setsuna@db.internal:5432/state?sslmode=require"
    rep.write_feedback(tmp_path, url)
    config = (tmp_path / "feedback" / "config.pbtxt").read_text()
    assert url in config
    with pytest.raises(ConfigError, match=r"outcomes_db: .*carries a password"):
        rep.write_feedback(tmp_path, "postgresql://setsuna:pw@db.internal/state", name="fb2")
    assert not (tmp_path / "fb2").exists()
    with pytest.raises(ConfigError, match="give a postgresql:// URL"):
        write_examples(tmp_path, outcomes_db="outcomes.db")
