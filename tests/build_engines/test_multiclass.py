"""Multiclass sources (issue 15): every engine that applies, built, gated and published.

LightGBM ``multiclass``, XGBoost ``multi:softprob`` and a scikit-learn forest of
three classes are converted to every engine that applies (ONNX, lleaves,
tl2cgen, FIL's file judged by GTIL); each must decide the argmax like the source
and keep every class's probability close, and the published model answers
``score`` [C] with its class labels in the manifest and in the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

lgb = pytest.importorskip("lightgbm")
xgb = pytest.importorskip("xgboost")
pytest.importorskip("lleaves")
pytest.importorskip("tl2cgen")
pytest.importorskip("onnxmltools")

from sklearn.ensemble import RandomForestClassifier  # noqa: E402

from build_engines import base, gate  # noqa: E402
from build_engines.build import build_model  # noqa: E402
from build_engines.candidates import trees as cand  # noqa: E402
from build_engines.sources.trees import from_lightgbm, from_sklearn, from_xgboost  # noqa: E402
from build_engines.spec import ModelSpec  # noqa: E402
from setsuna import manifest, model_config, native_forest, runtime  # noqa: E402
from setsuna.errors import ConfigError, SourceError  # noqa: E402

F32 = base.F32
LABELS = ("down", "flat", "up")


def three_class(n: int = 3000, seed: int = 5, n_features: int = 8) -> tuple[F32, Any]:
    """Rows and labels 0/1/2 (down/flat/up) with a signal in features 0-2 and noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    z = x[:, 0] + np.tanh(x[:, 1] * x[:, 2]) + 0.5 * rng.normal(size=n)
    return x, np.digitize(z, [-0.5, 0.5]).astype(np.int32)


def lgbm_source(x: F32, y: Any, **kw: Any) -> base.Source:
    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 7, "verbose": -1}
    booster = lgb.train(
        {**params, "num_threads": 1, "seed": 1}, lgb.Dataset(x[:2000], y[:2000]), 15
    )
    return from_lightgbm(booster, name="mc_lgbm", class_labels=LABELS, **kw)


def xgb_source(x: F32, y: Any) -> base.Source:
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1, "seed": 1},
        xgb.DMatrix(x[:2000], label=y[:2000]),
        num_boost_round=15,
    )
    return from_xgboost(booster, name="mc_xgb", class_labels=LABELS)


def sklearn_source(x: F32, y: Any) -> base.Source:
    labels = np.array(LABELS)[y[:2000]]
    rf = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x[:2000], labels)
    return from_sklearn(rf, name="mc_rf", n_features=x.shape[1])


@pytest.fixture(scope="module")
def data() -> tuple[F32, Any]:
    return three_class()


@pytest.mark.parametrize(
    "make", [lgbm_source, xgb_source, sklearn_source], ids=["lgbm", "xgb", "rf"]
)
def test_sources_score_class_probabilities(make: Any, data: tuple[F32, Any]) -> None:
    x, y = data
    src = make(x, y)
    assert src.task == "classification"
    assert src.classes == LABELS
    p = src.reference(x[2000:2100])
    assert p.shape == (100, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "engines"),
    [
        (lgbm_source, {"onnx", "lleaves", "tl2cgen", "fil"}),
        (xgb_source, {"onnx", "tl2cgen", "fil"}),
        (sklearn_source, {"onnx", "tl2cgen", "fil"}),
    ],
    ids=["lgbm", "xgb", "rf"],
)
def test_every_engine_decides_like_the_source(
    make: Any, engines: set[str], data: tuple[F32, Any], tmp_path: Path
) -> None:
    x, y = data
    src = make(x, y)
    built = cand.convert(src, tmp_path / "stage", x[:64], cache_dir=tmp_path / "cache")
    got = {b.name for b in built if isinstance(b, base.Candidate)}
    assert got == engines, [b for b in built if isinstance(b, base.Skipped)]
    held_out = x[2000:]
    expected = src.reference(held_out)
    settings = gate.GateSettings(latency_calls=20, batch_budget_s=0.01, row_by_row_rows=200)
    for c in built:
        if not isinstance(c, base.Candidate):
            continue
        f = gate.judge(c, src, held_out, expected, settings)
        assert f.passed, (c.name, f.reason)
        assert f.identical_decisions == 1.0, c.name
        assert len(f.class_max_abs_diff) == 3 and max(f.class_max_abs_diff) < 1e-3, c.name
        engine = runtime.load(c.engine or c.gate_engine, c.folder, c.params or c.gate_params)
        out = engine.predict(held_out)
        assert out.shape == (len(held_out), 3)
        np.testing.assert_array_equal(out.argmax(axis=1), expected.argmax(axis=1))


def test_gate_rejects_probabilities_that_drift(data: tuple[F32, Any], tmp_path: Path) -> None:
    """Same argmax everywhere, but one class moved by 0.01: rejected, the class named."""
    x, y = data
    src = lgbm_source(x, y)
    built = cand.convert(src, tmp_path / "stage", x[:64], cache_dir=tmp_path / "cache")
    onnx_c = next(b for b in built if isinstance(b, base.Candidate) and b.name == "onnx")
    held_out = x[2000:]
    expected = src.reference(held_out)
    # Shift the source's "flat" column where it is far from winning or losing.
    moved = expected.copy()
    top = expected.max(axis=1)
    safe = (top - np.sort(expected, axis=1)[:, -2] > 0.05) & (expected.argmax(axis=1) != 1)
    moved[safe, 1] += 0.01
    settings = gate.GateSettings(latency_calls=20, batch_budget_s=0.01, row_by_row_rows=50)
    f = gate.judge(onnx_c, src, held_out, moved, settings)
    assert f.identical_decisions == 1.0
    assert not f.passed and "flat" in f.reason and "0.1 pp" in f.reason
    loose = gate.GateSettings(
        latency_calls=20, batch_budget_s=0.01, row_by_row_rows=50, max_class_prob_diff_pp=2.0
    )
    assert gate.judge(onnx_c, src, held_out, moved, loose).passed
    with pytest.raises(ConfigError, match="percentage"):
        gate.GateSettings(max_class_prob_diff_pp=-1)


def test_published_model_names_its_classes(data: tuple[F32, Any], tmp_path: Path) -> None:
    x, y = data
    src = lgbm_source(x, y)
    spec = ModelSpec(name="mc_lgbm")
    result = build_model(
        src,
        x[2000:],
        spec,
        tmp_path / "repo",
        ("local", "container"),
        tmp_path / "work",
        echo=False,
    )
    local = result.published["local"]
    m = manifest.verify(local)
    assert m.classes == LABELS and m.n_outputs == 3
    cfg = model_config.load(local.parent / "config.pbtxt", name="mc_lgbm")
    assert list(cfg.output[0].dims) == [3]
    assert json.loads(cfg.parameters["class_labels"].string_value) == list(LABELS)
    # setsuna_forest serves one score per row: a multiclass forest stays on the wrapper.
    assert cfg.backend == "python"
    assert "class probabilities" in native_forest.unsupported(m.engine, m.engine_params) or (
        m.engine == "onnxruntime"
    )
    container = result.published["container"]
    ccfg = model_config.load(container.parent / "config.pbtxt", name="mc_lgbm")
    assert list(ccfg.output[0].dims) == [3]
    assert json.loads(ccfg.parameters["class_labels"].string_value) == list(LABELS)


def test_refusals_say_what_to_do(data: tuple[F32, Any]) -> None:
    x, y = data
    ova = lgb.train(
        {"objective": "multiclassova", "num_class": 3, "verbose": -1, "num_threads": 1},
        lgb.Dataset(x[:600], y[:600]),
        3,
    )
    with pytest.raises(SourceError, match="objective='multiclass'"):
        from_lightgbm(ova, name="m")
    softmax = xgb.train(
        {"objective": "multi:softmax", "num_class": 3, "nthread": 1},
        xgb.DMatrix(x[:600], label=y[:600]),
        3,
    )
    with pytest.raises(SourceError, match="multi:softprob"):
        from_xgboost(softmax, name="m")
    with pytest.raises(ConfigError, match="3 distinct"):
        lgbm_source(x, y, feature_names=None) if False else from_lightgbm(
            lgb.train(
                {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
                lgb.Dataset(x[:600], y[:600]),
                3,
            ),
            name="m",
            class_labels=("a", "a", "b"),
        )
    binary = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1},
        lgb.Dataset(x[:600], (y[:600] == 2).astype(int)),
        3,
    )
    with pytest.raises(ConfigError, match="class_labels is for multiclass"):
        from_lightgbm(binary, name="b", class_labels=LABELS)
