"""Fixtures shared across the test packages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (started once, always stopped).

    It cannot start: the test fails with what to install, it never skips.
    """
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A new, empty shared-state database of each backend (:mod:`ensembles.statedb`):
    a SQLite path, then a ``postgresql://`` URL on the session's server."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.createdb(f"t_{uuid.uuid4().hex[:16]}")
