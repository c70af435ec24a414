"""Two Triton replicas sharing the outcomes in PostgreSQL: feedback on A moves B's selector.

Each replica is a real ``tritonserver`` on its own copy of the repository
(as two hosts would have it), with ``selector`` and ``feedback`` configured
with the same ``postgresql://`` URL (``outcomes_db``) on the session's
PostgreSQL server (tests/conftest.py). Outcomes sent to replica A's
``feedback`` are the totals replica B's ``selector`` blends: it leaves the
prior favourite for the variant the outcomes show right.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest

from ensembles import repository as rep
from setsuna import seal
from setsuna.server import LocalTriton
from tests.ensembles.test_served import FAULTY_CONFIG, N_FEATURES, PATIENT, SLOW_PY, W, _selector
from tests.helpers import build_logistic_models
from tests.pgserver import PostgresServer

grpcclient = pytest.importorskip("tritonclient.grpc")

RNG = np.random.default_rng(17)


@dataclass
class Replicas:
    a: LocalTriton  # feedback and selector
    b: LocalTriton  # selector only
    url: str


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[Replicas]:
    url = postgres.createdb("replicas_served")
    root = tmp_path_factory.mktemp("pg_replica_a")
    x = RNG.normal(size=(300, N_FEATURES)).astype(np.float32)
    repo = build_logistic_models(root, {"alpha": W["alpha"]}, x)
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(FAULTY_CONFIG.replace("faulty", "slow"))
    (repo / "slow" / "1" / "model.py").write_text(SLOW_PY)
    seal.seal_model(repo / "slow")
    files = root / "files"
    files.mkdir()
    (files / "selector.json").write_text(json.dumps(_selector(1000.0)))
    one = rep.Serving(instances=1)  # one state machine: its choices in a row
    rep.write_selector(
        repo, files / "selector.json", N_FEATURES, outcomes_db=url, refresh_s=0.0,
        limits=PATIENT, serving=one,
    )  # fmt: skip
    rep.write_feedback(repo, url)
    repo_b = tmp_path_factory.mktemp("pg_replica_b") / "local"
    shutil.copytree(repo, repo_b, symlinks=True)  # the other host's copy
    models_b = ("alpha", "slow", "selector")
    with (
        LocalTriton.on_free_ports(repo, log_path=root / "triton-a.log") as a,
        LocalTriton.on_free_ports(
            repo_b, load_models=models_b, log_path=repo_b.parent / "triton-b.log"
        ) as b,
    ):
        yield Replicas(a, b, url)


def _select(server: LocalTriton, n: int) -> list[str]:
    x = RNG.normal(size=(1, N_FEATURES)).astype(np.float32)
    inp = grpcclient.InferInput("features", [1, N_FEATURES], "FP32")
    inp.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        return [c.infer("selector", [inp]).as_numpy("model")[0, 0].decode() for _ in range(n)]


def _feedback(server: LocalTriton, rows: list[tuple[bytes, float, float]]) -> Any:
    arrays = (
        np.array([[m] for m, _, _ in rows], dtype=np.object_),
        np.array([[s] for _, s, _ in rows], dtype=np.float32),
        np.array([[o] for _, _, o in rows], dtype=np.float32),
    )
    inputs = [
        grpcclient.InferInput(name, [len(rows), 1], dtype)
        for name, dtype in (("model", "BYTES"), ("score", "FP32"), ("outcome", "FP32"))
    ]
    for inp, arr in zip(inputs, arrays, strict=True):
        inp.set_data_from_numpy(arr)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        return c.infer("feedback", inputs)


def test_feedback_on_one_replica_moves_the_selector_of_the_other(replicas: Replicas) -> None:
    # Priors: slow 0.99 beats alpha 0.9 on both replicas, nothing recorded yet.
    assert _select(replicas.a, 3) == ["slow:1"] * 3
    assert _select(replicas.b, 3) == ["slow:1"] * 3
    n = 300  # slow always wrong, alpha always right (score 0.9: decision "up")
    r = _feedback(replicas.a, [(b"slow:1", 0.9, 0.0)] * n + [(b"alpha:1", 0.9, 1.0)] * n)
    assert r.as_numpy("outcomes").reshape(-1).tolist() == [n] * (2 * n)
    with psycopg.connect(replicas.url) as db:  # in PostgreSQL, not in a file on A
        rows = db.execute("SELECT model, hits, n FROM outcomes ORDER BY model").fetchall()
    assert rows == [("alpha:1", n, n), ("slow:1", 0, n)]
    # B never saw a feedback request: its selector reads A's totals from PostgreSQL.
    # Blend: slow (0.99*100 + 0) / 400 < alpha (0.9*100 + 300) / 400.
    seen_b = _select(replicas.b, 60)
    assert seen_b[-1] == "alpha:1" and seen_b.count("alpha:1") >= 40, seen_b
    seen_a = _select(replicas.a, 60)
    assert seen_a[-1] == "alpha:1" and seen_a.count("alpha:1") >= 40, seen_a
    # A second batch through A adds to the same totals (one upsert per batch).
    r = _feedback(replicas.a, [(b"alpha:1", 0.2, 1.0)] * 10)
    assert r.as_numpy("outcomes").reshape(-1).tolist() == [n + 10] * 10
    assert float(r.as_numpy("accuracy")[0, 0]) == pytest.approx(n / (n + 10))
