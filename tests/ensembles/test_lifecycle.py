"""The lifecycle's documents, records and shadow log, without a server.

Key movement is judged by assigning real keys with :mod:`ensembles.experiment`
(what the router does) before and after each step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from ensembles import deployments, lifecycle, shadowlog, signal
from ensembles import experiment as ex
from ensembles.watch import file_digest
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import ConfigError, DeploymentConflictError

KEYS = [f"K{i}" for i in range(20_000)]


def _start() -> ExperimentDoc:
    return ExperimentDoc.single(
        "ab",
        {"control": Target("alpha", 1), "treatment": Target("beta", 1)},
        {"control": 0.6, "treatment": 0.4},
        salt="s",
    )


def _where(doc: ExperimentDoc) -> np.ndarray:
    """The target label each key lands on."""
    e = ex.from_doc(doc)
    labels = np.array([t.label for t in e.targets])
    return labels[e.assign(KEYS)]


def test_a_canary_moves_its_share_of_the_arm_and_nothing_else() -> None:
    doc = _start()
    before = _where(doc)
    canary, moved = lifecycle._with_canary(doc, "alpha", 2, 0.10)
    assert canary is not None and moved == {1}
    after = _where(canary)
    changed = before != after
    assert set(before[changed]) == {"alpha:1"} and set(after[changed]) == {"alpha:2"}
    assert changed.mean() == pytest.approx(0.06, abs=0.01)  # 10 % of control's 60 %
    assert (after[before == "beta:1"] == "beta:1").all()
    # Raised to 25 %: the 10 % stay where they are, only the difference moves.
    wider, _ = lifecycle._with_canary(canary, "alpha", 2, 0.25)
    assert wider is not None
    again = _where(wider)
    assert (again[after == "alpha:2"] == "alpha:2").all()
    assert (again != after).mean() == pytest.approx(0.09, abs=0.01)
    assert wider.latest.version == canary.latest.version + 1


def test_promote_puts_every_key_of_the_model_on_the_new_version_and_moves_no_other() -> None:
    doc, _ = lifecycle._with_canary(_start(), "alpha", 2, 0.10)
    assert doc is not None
    before = _where(doc)
    promoted, replaced = lifecycle._promoted(doc, "alpha", 2)
    assert promoted is not None and replaced == {1}
    after = _where(promoted)
    assert set(after[before != "beta:1"]) == {"alpha:2"}
    assert (after[before == "beta:1"] == "beta:1").all()
    assert promoted.latest.weights["control.canary"] == 0.0
    assert promoted.latest.weights["control"] == pytest.approx(0.6)
    assert lifecycle._promoted(promoted, "alpha", 2) == (None, set())  # nothing left to do


def test_a_canary_of_another_version_in_flight_is_refused() -> None:
    doc, _ = lifecycle._with_canary(_start(), "alpha", 2, 0.10)
    assert doc is not None
    with pytest.raises(DeploymentConflictError, match=r"canary of alpha:2 at 6\.00%"):
        lifecycle._with_canary(doc, "alpha", 3, 0.10)


def test_a_shadow_on_the_promoted_version_is_dropped() -> None:
    doc = _start()
    shadowed = ExperimentDoc(doc.name, doc.salt, doc.arms, doc.versions, Target("alpha", 2))
    promoted, _ = lifecycle._promoted(shadowed, "alpha", 2)
    assert promoted is not None and promoted.shadow is None


def test_settings_are_checked_once() -> None:
    with pytest.raises(ConfigError, match="settle_timeout_s"):
        lifecycle.LifecycleSettings(settle_timeout_s=0)
    with pytest.raises(ConfigError, match="warmup_requests"):
        lifecycle.LifecycleSettings(warmup_requests=0)


def test_references_find_versions_named_by_any_file(tmp_path: Path) -> None:
    (tmp_path / "combiner").mkdir()
    (tmp_path / "combiner" / "members.json").write_text(
        json.dumps({"members": [{"model": "alpha", "version": 1, "weight": 1.0}]})
    )
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "x.json").write_text(json.dumps({"model": "alpha", "version": 9}))
    assert lifecycle._references(tmp_path, "alpha") == {1: ["combiner/members.json"]}


def test_the_digest_a_model_publishes_survives_a_prometheus_double() -> None:
    for data in (b"", b"{}", os.urandom(4096)):
        d = file_digest(data)
        assert 0 <= d < 1 << 48 and int(float(repr(float(d)))) == d


# ---------------------------------------------------------------------- records


def test_rollbacks_undo_in_stack_order(state_db: Path | str) -> None:
    """On both backends (``state_db``: a SQLite path, then a PostgreSQL URL)."""
    db = state_db
    assert deployments.last_undoable(db) is None
    exps = {"router": {"before": "a", "after": "b"}}
    one = deployments.record(
        db, action="canary", model="m", outcome="done", detail="", experiments=exps
    )
    deployments.record(db, action="publish", model="m", outcome="done", detail="")
    two = deployments.record(
        db, action="promote", model="m", outcome="done", detail="", experiments=exps
    )
    deployments.record(
        db, action="canary", model="m", outcome="refused", detail="", experiments=exps
    )
    assert deployments.last_undoable(db) == two
    deployments.record(
        db, action="rollback", model="m", outcome="done", detail="", experiments=exps, undoes=two.id
    )
    assert deployments.last_undoable(db) == one
    steps = deployments.history(db, "m")
    assert [s.action for s in steps] == ["canary", "publish", "promote", "canary", "rollback"]
    assert all("pid" in s.who for s in steps)
    with pytest.raises(ValueError, match="action"):
        deployments.record(db, action="delete", model="m", outcome="done", detail="")


def test_a_decision_joins_the_step_that_put_its_version_in_place(state_db: Path | str) -> None:
    db = state_db
    pub = deployments.record(
        db, action="publish", model="m", outcome="done", detail="", to_version=2
    )
    can = deployments.record(
        db, action="canary", model="m", outcome="done", detail="", to_version=2
    )
    assert deployments.deployment_of(db, "m", 2, can.t_ns + 1) == can
    assert deployments.deployment_of(db, "m", 2, pub.t_ns) == pub
    assert deployments.deployment_of(db, "m", 2, pub.t_ns - 1) is None
    assert deployments.deployment_of(db, "m", 1, can.t_ns + 1) is None


# ---------------------------------------------------------------------- shadow log


def _writer(path: str, tag: int, n: int) -> None:
    log = shadowlog.ShadowLog(Path(path), max_bytes=64 * 1024)
    for i in range(n):
        log.write({"t_ns": i, "tag": tag, "pad": "x" * 300})
    log.close()


def test_two_processes_append_whole_lines_and_the_log_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), t, 600)) for t in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for f in (path, path.with_name(path.name + ".1")):
        assert f.stat().st_size < 64 * 1024 + 2 * 400  # one record past the bound at most
        for line in f.read_bytes().splitlines():
            assert json.loads(line)["pad"] == "x" * 300  # no line torn or interleaved


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    log = shadowlog.ShadowLog(path)
    log.write({"a": 1})
    log.close()
    with path.open("ab") as f:
        f.write(b'{"a": 2, "b"')
    assert list(shadowlog.read(path)) == [{"a": 1}]


def test_compare_judges_signals_differences_and_latency() -> None:
    t = signal.Thresholds(buy_at=0.55, sell_at=0.45)
    records = [
        {
            "t_ns": 10,
            "shadow": "alpha:2",
            "arms": ["control", "treatment", "control"],
            "models": {"control": "alpha:1", "treatment": "beta:1"},
            "primary": [0.60, 0.10, 0.50],
            "score": [0.61, 0.90, 0.56],  # BUY/BUY agree; HOLD/BUY differ
            "latency_us": {"primary": 100.0, "shadow": 300.0},
        },
        {"t_ns": 11, "shadow": "alpha:2", "arms": ["control"], "models": {"control": "alpha:1"},
         "primary": [0.2], "error": "timed out", "latency_us": {"primary": 1.0, "shadow": 9.0}},
        {"t_ns": 12, "shadow": "other:1", "arms": ["control"], "models": {"control": "alpha:1"},
         "primary": [0.2], "score": [0.9]},
    ]  # fmt: skip
    (c,) = shadowlog.compare(records, "alpha:2", t, primary_model="alpha")
    assert (c.primary, c.rows, c.batches, c.errors) == ("alpha:1", 2, 1, 1)
    assert c.identical_signals == 0.5
    assert c.max_abs_diff == pytest.approx(0.06, abs=1e-6)
    assert (c.primary_p50_us, c.shadow_p50_us) == (100.0, 300.0)


def test_publishing_beside_a_latest_only_config_is_refused(tmp_path: Path) -> None:
    """Loading N+1 under ``latest 1`` would unload N while the arms still name it."""
    from setsuna.errors import DeploymentError
    from tests.helpers import build_logistic_models

    w = np.ones(4, np.float32)
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    repo = build_logistic_models(tmp_path, {"alpha": w}, x)
    life = lifecycle.Lifecycle(repo, "127.0.0.1:1", {}, metrics_url="http://127.0.0.1:1/")
    life._check_compatible("alpha", repo / "alpha", repo / "alpha")  # policy all: fine
    config = repo / "alpha" / "config.pbtxt"
    text = config.read_text()
    assert "all {" in text
    config.write_text(text.replace("all {\n  }", "latest {\n    num_versions: 1\n  }"))
    with pytest.raises(DeploymentError, match=r"latest \{ num_versions: 1 \}.*make build-engines"):
        life._check_compatible("alpha", repo / "alpha", repo / "alpha")


def test_in_process_engines_keep_the_file_in_force_and_the_one_before(tmp_path: Path) -> None:
    """``decide`` and the combiner would otherwise hold every version they ever served."""
    import shutil

    from ensembles.models.in_process import InProcessEngines
    from setsuna import seal
    from setsuna.errors import EngineError
    from tests.helpers import build_logistic_models

    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    repo = build_logistic_models(tmp_path, {"alpha": np.ones(4, np.float32)}, x)
    for v in (2, 3):
        shutil.copytree(repo / "alpha" / "1", repo / "alpha" / str(v))
        seal.remove_seal(repo / "alpha" / str(v))
        seal.seal_version(repo / "alpha" / str(v))
    a1, a2, a3 = (Target("alpha", v) for v in (1, 2, 3))
    engines = InProcessEngines(repo)
    engines.prepare([a1])
    engines.prepare([a2])
    assert engines.predict(a1, x[:2]).shape == (2, 1)  # a batch begun under the old file
    engines.prepare([a2, a3])
    assert set(engines.engines) == {"alpha:2", "alpha:3"}
    with pytest.raises(EngineError, match="alpha:1 was released"):
        engines.predict(a1, x[:2])
    engines.prepare([a1])  # a rollback: loaded again from its folder
    assert engines.predict(a1, x[:2]).shape == (2, 1)
