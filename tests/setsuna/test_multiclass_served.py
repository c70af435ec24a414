"""Multiclass models served by the real Triton (issue 15), compared with their libraries.

A LightGBM ``multiclass`` (tl2cgen, lleaves and ONNX engines, each published on
its own), an XGBoost ``multi:softprob`` and a scikit-learn forest of three
classes are built by the real pipeline into a ``local`` repository and served
by the wheel's ``tritonserver``; ``decide_mc`` runs the LightGBM one in process
with the direction rule. On held-out rows the served probabilities must match
the source library's (argmax identical, every class within the gate's
tolerance), the config must carry the class labels, and ``decide`` must answer
the same probabilities and the rule's signals.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from build_engines import gate
from build_engines.base import F32, Built, Source
from build_engines.build import build_model, converter_for
from build_engines.sources.trees import from_lightgbm
from build_engines.spec import ModelSpec, ServingSpec
from ensembles import repository as rep
from ensembles import signal
from setsuna import manifest, policy
from setsuna.audit import AuditLog, DecisionBatch, verify
from setsuna.client import Client
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, Target
from setsuna.server import LocalTriton, find_tritonserver
from tests.build_engines.test_multiclass import (
    LABELS,
    lgbm_source,
    sklearn_source,
    three_class,
    xgb_source,
)
from tests.helpers import metric_series, wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")
lgb = pytest.importorskip("lightgbm")

FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01, row_by_row_rows=200)
THRESHOLDS = signal.ClassThresholds(margin=0.05, min_prob=0.4)


@dataclass(frozen=True)
class Served:
    server: LocalTriton
    repo: Path
    held_out: F32
    sources: dict[str, Source]


def _only(name: str) -> Any:
    def convert(source: Source, workdir: Path, calib: F32) -> list[Built]:
        return [b for b in converter_for(source)(source, workdir, calib) if b.name == name]

    return convert


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    find_tritonserver()
    root = tmp_path_factory.mktemp("multiclass")
    x, y = three_class()
    lgbm = lgbm_source(x, y)
    models = {
        "mc_lgb_tl": (lgbm, _only("tl2cgen")),
        "mc_lgb_ll": (lgbm, _only("lleaves")),
        "mc_lgb_onnx": (lgbm, _only("onnx")),
        "mc_xgb": (xgb_source(x, y), None),
        "mc_rf": (sklearn_source(x, y), None),
    }
    binary = lgb.train(
        {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1, "seed": 1},
        lgb.Dataset(x[:2000], (y[:2000] == 2).astype(np.int32)),
        15,
    )
    models["bin_lgb"] = (from_lightgbm(binary, name="bin_lgb"), _only("onnx"))
    for name, (source, convert) in models.items():
        spec = ModelSpec(name=name, gate=FAST, serving=ServingSpec(cpu_instances=1))
        build_model(
            source, x[2000:], spec, root / "repo", ("local",), root / "work",
            echo=False, converter=convert,
        )  # fmt: skip
    repo = root / "repo" / "local"
    doc = ExperimentDoc.single("mc", {"main": Target("mc_lgb_tl", 1)}, {"main": 1.0})
    (root / "exp.json").write_text(doc.dumps())
    rep.write_router(
        repo, root / "exp.json", x.shape[1], name="decide_mc", in_process=True,
        thresholds=THRESHOLDS, serving=rep.Serving(instances=1),
    )  # fmt: skip
    with LocalTriton.on_free_ports(
        repo, load_models=(*models, "decide_mc"), log_path=root / "triton.log"
    ) as srv:
        yield Served(srv, repo, x[2000:2600], {n: s for n, (s, _) in models.items()})


def _infer(served: Served, model: str, x: np.ndarray, outputs: tuple[str, ...] = ()) -> Any:
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        if model.startswith("decide"):
            key = grpcclient.InferInput("key", [len(x), 1], "BYTES")
            key.set_data_from_numpy(np.array([[b"k"]] * len(x), dtype=np.object_))
            inputs.append(key)
        asked = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
        return client.infer(model, inputs, outputs=asked)


@pytest.mark.parametrize("model", ["mc_lgb_tl", "mc_lgb_ll", "mc_lgb_onnx", "mc_xgb", "mc_rf"])
def test_served_probabilities_match_the_source_library(served: Served, model: str) -> None:
    x = served.held_out
    got = _infer(served, model, x).as_numpy("score")
    want = served.sources[model].reference(x)
    assert got.shape == (len(x), 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    limit = FAST.max_class_prob_diff_pp / 100
    assert float(np.abs(got - want).max()) <= limit
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    one = _infer(served, model, x[:1]).as_numpy("score")  # a row alone, as the batcher may
    np.testing.assert_allclose(one, got[:1], atol=1e-7)


@pytest.mark.parametrize("model", ["mc_lgb_tl", "mc_xgb", "mc_rf"])
def test_the_config_names_the_classes_for_any_client(served: Served, model: str) -> None:
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        cfg = client.get_model_config(model, as_json=True)
        meta = client.get_model_metadata(model, as_json=True)
    assert policy.class_labels_from_config(cfg) == LABELS
    assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, 3]
    assert cfg["config"]["backend"] == "python"  # setsuna_forest serves [1] only
    assert manifest.read(served.repo / model / "1").classes == LABELS


def test_decide_answers_probabilities_and_the_direction_rule(served: Served) -> None:
    x = served.held_out
    direct = _infer(served, "mc_lgb_tl", x).as_numpy("score")
    out = _infer(served, "decide_mc", x)
    np.testing.assert_array_equal(out.as_numpy("score"), direct)
    columns = signal.direction_columns(LABELS, "test")
    code, conf = signal.decide_classes(direct, THRESHOLDS, columns)
    np.testing.assert_array_equal(out.as_numpy("signal").reshape(-1), code)
    np.testing.assert_allclose(out.as_numpy("confidence").reshape(-1), conf, atol=1e-7)
    assert {int(c) for c in code} == {-1, 0, 1}, "held-out rows should reach all three signals"
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        cfg = client.get_model_config("decide_mc", as_json=True)
    assert policy.class_labels_from_config(cfg) == LABELS
    assert json.loads(cfg["config"]["parameters"]["class_labels"]["string_value"]) == list(LABELS)


def test_the_sdk_policy_decides_like_decide(served: Served) -> None:
    x = served.held_out
    out = _infer(served, "decide_mc", x)
    p = policy.DirectionPolicy(len(x), classes=LABELS, margin=0.05, min_prob=0.4)
    want = p.wanted({"score": out.as_numpy("score")}, np.arange(len(x)), p.stance)
    np.testing.assert_array_equal(want, out.as_numpy("signal").reshape(-1))


def _replace(path: Path, text: str) -> None:
    """Write ``path`` in one step with a fresh stamp: the model watches it from a thread."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    st = tmp.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    tmp.replace(path)


def test_decide_refuses_an_experiment_mixing_classes_and_keeps_serving(served: Served) -> None:
    path = served.repo / "decide_mc" / EXPERIMENT_FILE
    before = path.read_text()
    mixed = ExperimentDoc.single(
        "mc",
        {"main": Target("mc_lgb_tl", 1), "other": Target("bin_lgb", 1)},
        {"main": 0.5, "other": 0.5},
    )
    _replace(path, mixed.dumps())
    try:
        metrics = served.server.metrics_url
        wait_until(
            "decide_mc refused the file",
            lambda: sum(metric_series(metrics, "setsuna_router_reload_failures_total")) >= 1,
        )
        out = _infer(served, "decide_mc", served.held_out[:8])
        assert out.as_numpy("score").shape == (8, 3)
        assert {m.decode() for m in out.as_numpy("model").reshape(-1)} == {"mc_lgb_tl:1"}
        log = served.server.log_path
        assert log is not None and "different classes" in log.read_text()
    finally:
        _replace(path, before)


def test_audit_stores_the_vector_and_verify_compares_every_class(
    served: Served, tmp_path: Path
) -> None:
    x = served.held_out[:40]
    scores = _infer(served, "mc_lgb_tl", x).as_numpy("score")
    n = len(x)
    batch = DecisionBatch(
        request_id="r1",
        endpoint="mc_lgb_tl",
        event_ns=np.arange(n, dtype=np.int64),
        symbols=np.array(["EURUSD"] * n, dtype=object),
        served_by=np.array(["mc_lgb_tl:1"] * n, dtype=object),
        artifacts=np.array(["0" * 64] * n, dtype=object),
        features=x,
        score=scores,
        served_signal=None,
        signal=np.zeros(n, np.int8),
    )
    db = tmp_path / "audit.db"
    with AuditLog(db, feature_names=[f"f{i}" for i in range(x.shape[1])]) as log:
        log.commit(batch)
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT score, scores FROM decisions WHERE id = 1").fetchone()
    assert row[0] is None
    np.testing.assert_array_equal(np.frombuffer(row[1], np.float32), scores[0])
    with Client(served.server.grpc_url) as client:
        report = verify(db, client)
        assert report.ok and report.reproduced == n
        # One class of one record moved by 0.01: that record, and only it, differs.
        tampered = scores[3].copy()
        tampered[1] += 0.01
        with sqlite3.connect(db) as con:
            con.execute("UPDATE decisions SET scores = ? WHERE id = 4", (tampered.tobytes(),))
        report = verify(db, client)
    assert report.reproduced == n - 1
    assert [m.record_id for m in report.mismatches] == [4]
    assert report.mismatches[0].reason == "differs"
    assert report.mismatches[0].recorded == pytest.approx(tampered.tolist())
