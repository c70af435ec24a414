"""Forward-return regressors: the signal rule in return units, in ``decide`` and alone.

The served test trains a LightGBM regressor of a forward return, builds it
through the real pipeline, and serves ``decide`` over it with return
thresholds; the oracle for every served signal is the rule applied to
LightGBM's own prediction of the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from build_engines import gate
from build_engines.build import build_model
from build_engines.sources import from_object
from build_engines.spec import ModelSpec
from ensembles import repository as rep
from ensembles import signal
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import ConfigError, InputError
from setsuna.server import LocalTriton
from tests.helpers import tabular

grpcclient = pytest.importorskip("tritonclient.grpc")
lgb = pytest.importorskip("lightgbm")

T = signal.ReturnThresholds(buy_above_return=0.0005, sell_below_return=-0.0005)


def test_the_rule_in_return_units_by_hand() -> None:
    r = np.array([0.002, 0.0005, 0.0004, 0.0, -0.0005, -0.003], dtype=np.float32)
    code, conf = signal.decide_returns(r, T)
    assert code.tolist() == [1, 1, 0, 0, -1, -1]
    # BUY: (r - 5 bps) / 10 bps, capped; HOLD: distance to the nearer edge over 5 bps.
    np.testing.assert_allclose(conf, [1.0, 0.0, 0.2, 1.0, 0.0, 1.0], atol=1e-5)
    with pytest.raises(InputError, match="row 1 is not finite"):
        signal.decide_returns(np.array([0.0, np.nan], np.float32), T)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"buy_above_return": -0.001, "sell_below_return": 0.001}, "sell_below_return <"),
        ({"buy_above_return": 2.0, "sell_below_return": 0.0}, "0.0005 is 5 bps"),
        ({"buy_above_return": 0.001}, "buy_above_return"),
    ],
)
def test_bad_return_thresholds_are_refused(tmp_path: Path, doc: dict[str, Any], match: str) -> None:
    path = tmp_path / signal.THRESHOLDS_FILE
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        signal.load_any_thresholds(path)


def test_kinds_pair_with_their_models_only() -> None:
    with pytest.raises(ConfigError, match="predicts a return"):
        signal.check_pairing(signal.Thresholds(), (), "x", "regression")
    with pytest.raises(ConfigError, match="model is a classifier"):
        signal.check_pairing(T, (), "x", "classification")
    signal.check_pairing(T, (), "x", "regression")


N = 8


def _returns(x: np.ndarray[Any, Any]) -> Any:
    """A forward return in fractions: a few bps of signal in features 0-1, and noise."""
    rng = np.random.default_rng(5)
    noise = 0.0004 * rng.normal(size=len(x))
    return (0.0008 * x[:, 0] - 0.0005 * np.tanh(x[:, 1]) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTriton, Any, Any]]:
    root = tmp_path_factory.mktemp("returns")
    x, _ = tabular(3000, n_features=N)
    r = _returns(x)
    params = {"objective": "regression", "num_leaves": 7, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x[:2000], r[:2000]), num_boost_round=30)
    spec = ModelSpec("ret", gate=gate.GateSettings(latency_calls=20, batch_budget_s=0.01))
    source = from_object(booster, name="ret")
    build_model(source, x[2000:], spec, root, ("local",), root / "w", echo=False)
    repo = root / "local"
    exp = root / "exp.json"
    exp.write_text(ExperimentDoc.single("r", {"only": Target("ret", 1)}, {"only": 1.0}).dumps())
    with pytest.raises(ConfigError, match="predicts a return"):
        rep.write_router(repo, exp, N, name="bad", in_process=True, thresholds=signal.Thresholds())
    rep.write_router(repo, exp, N, name="decide_ret", in_process=True, thresholds=T)
    with LocalTriton.on_free_ports(repo, load_models=("ret", "decide_ret")) as server:
        yield server, booster, x[2000:]


def test_decide_over_a_regressor_signals_by_the_predicted_return(
    served: tuple[LocalTriton, Any, Any],
) -> None:
    server, booster, x = served
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        f = grpcclient.InferInput("features", [len(x), N], "FP32")
        f.set_data_from_numpy(np.ascontiguousarray(x))
        k = grpcclient.InferInput("key", [len(x), 1], "BYTES")
        k.set_data_from_numpy(np.array([[b"EURUSD"]] * len(x), dtype=object))
        out = c.infer("decide_ret", [f, k])
    want_code, want_conf = signal.decide_returns(booster.predict(x).astype(np.float32), T)
    got = out.as_numpy("signal").ravel()
    assert (got == want_code).mean() >= 0.999  # the gate's own bar for the engine
    assert set(got.tolist()) == {-1, 0, 1}
    np.testing.assert_allclose(out.as_numpy("score").ravel(), booster.predict(x), atol=1e-6)
    same = got == want_code
    np.testing.assert_allclose(out.as_numpy("confidence").ravel()[same], want_conf[same], atol=1e-3)
