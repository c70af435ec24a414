"""CatBoost as a source: its ``.cbm`` file, its exports as candidates, served by Triton.

The oracle is CatBoost's own predictor on held-out rows; the served answers
come from the real ``tritonserver`` (the compiled C++ export on
``setsuna_forest`` when the native backend builds here, the Python wrapper
otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from build_engines import gate
from build_engines.build import build_model
from build_engines.sources import from_object, from_path
from build_engines.spec import ModelSpec
from setsuna import manifest
from setsuna.errors import PickleRefusedError, SourceError
from setsuna.server import LocalTriton
from tests.helpers import tabular

catboost = pytest.importorskip("catboost")
grpcclient = pytest.importorskip("tritonclient.grpc")

FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
#: CatBoost writes training logs into ./catboost_info unless told not to.
QUIET = {"verbose": 0, "allow_writing_files": False}


@dataclass(frozen=True)
class Built:
    repo: Path
    x_valid: np.ndarray
    classifier: Any
    regressor: Any


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("catboost")
    x, y = tabular(3000, n_features=8)
    r = (x[:, 0] * 0.5 + np.tanh(x[:, 1]) + 0.1 * x[:, 2]).astype(np.float32)
    clf = catboost.CatBoostClassifier(iterations=120, depth=5, random_seed=0, **QUIET)
    clf.fit(x[:2000], y[:2000])
    reg = catboost.CatBoostRegressor(iterations=120, depth=5, random_seed=0, **QUIET)
    reg.fit(x[:2000], r[:2000])
    clf.save_model(str(root / "clf.cbm"))
    for name, source in (
        ("cb_clf", from_path(root / "clf.cbm", name="cb_clf")),
        ("cb_reg", from_object(reg, name="cb_reg")),
    ):
        spec = ModelSpec(name, gate=FAST)
        build_model(source, x[2000:], spec, root, ("local", "container"), root / "work", echo=False)
    return Built(root / "local", x[2000:], clf, reg)


@pytest.fixture(scope="module")
def served(built: Built) -> Iterator[LocalTriton]:
    with LocalTriton.on_free_ports(built.repo, load_models=("cb_clf", "cb_reg")) as server:
        yield server


def _served(server: LocalTriton, model: str, x: np.ndarray) -> np.ndarray:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        inp = grpcclient.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return np.asarray(c.infer(model, [inp]).as_numpy("score"))


def test_every_export_passes_the_gate_and_one_is_published(built: Built) -> None:
    for model in ("cb_clf", "cb_reg"):
        m = manifest.read(built.repo / model / "1")
        figures = m.gate.get("figures", {})
        assert figures.get("identical_decisions", 0) >= 0.999, m.gate
        assert m.candidate in ("catboost-cpp", "onnx")
    report = (built.repo.parent / "work" / "cb_clf" / "gate_report.md").read_text()
    assert "catboost-cpp" in report and "onnx" in report


def test_the_served_classifier_and_regressor_match_catboost(
    built: Built, served: LocalTriton
) -> None:
    x = built.x_valid[:257]  # an odd batch
    p = built.classifier.predict(x, prediction_type="Probability")[:, 1]
    np.testing.assert_allclose(_served(served, "cb_clf", x).ravel(), p, atol=1e-5)
    v = built.regressor.predict(x)
    np.testing.assert_allclose(_served(served, "cb_reg", x).ravel(), v, atol=1e-4)
    # Decisions, the gate's measure, are identical.
    served_p = _served(served, "cb_clf", built.x_valid).ravel()
    oracle = built.classifier.predict(built.x_valid, prediction_type="Probability")
    oracle = oracle[:, 1]
    assert ((served_p >= 0.5) == (oracle >= 0.5)).all()


def test_categorical_features_are_refused_with_what_to_do(tmp_path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"venue": rng.choice(["XNYS", "XNAS", "BATS"], 300), "ret": rng.normal(size=300)}
    )
    y = (frame["ret"] > 0).astype(int)
    model = catboost.CatBoostClassifier(iterations=5, cat_features=["venue"], **QUIET)
    model.fit(frame, y)
    with pytest.raises(SourceError, match=r"categorical features \['venue'\].*encode them"):
        from_object(model, name="cat")


def test_multiclass_and_ranking_are_refused_and_files_are_checked(tmp_path: Path) -> None:
    x, _ = tabular(300, n_features=4)
    y3 = np.digitize(x[:, 0], [-0.5, 0.5])
    multi = catboost.CatBoostClassifier(iterations=5, loss_function="MultiClass", **QUIET)
    multi.fit(x, y3)
    with pytest.raises(SourceError, match=r"MultiClass.*binary classifier"):
        from_object(multi, name="multi")
    garbage = tmp_path / "broken.cbm"
    garbage.write_bytes(b"not a catboost model at all")
    with pytest.raises(SourceError, match="not a CatBoost model file"):
        from_path(garbage, name="broken")
    with pytest.raises(PickleRefusedError):
        from_path(_pickled(tmp_path), name="pickled")


def _pickled(tmp_path: Path) -> Path:
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x04N.")  # a pickle of None: never loaded
    return path
