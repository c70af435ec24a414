"""The standalone ``signal`` model takes every rule: direction classes and returns too.

Served by the real ``tritonserver``; the oracle is :func:`ensembles.signal.apply` on
the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ensembles import repository as rep
from ensembles import signal
from setsuna.errors import ConfigError
from setsuna.server import LocalTriton

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

CLASSES = ("up", "down", "flat")  # any column order: the config records it
DIRECTION = signal.ClassThresholds(margin=0.05, min_prob=0.4)
RETURNS = signal.ReturnThresholds(buy_above_return=0.0005, sell_below_return=-0.0005)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    repo = tmp_path_factory.mktemp("signals")
    rep.write_signal(repo, {1: DIRECTION}, name="signal_dir", classes=CLASSES)
    rep.write_signal(repo, {1: RETURNS}, name="signal_ret")
    with LocalTriton.on_free_ports(repo) as srv:
        yield srv


def _call(server: LocalTriton, model: str, p: Any) -> Any:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        inp = grpcclient.InferInput("score", list(p.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(p, dtype=np.float32))
        return c.infer(model, [inp])


def test_direction_probabilities_in_the_configs_column_order(server: LocalTriton) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=300).astype(np.float32)
    out = _call(server, "signal_dir", p)
    code, conf = signal.apply(p, DIRECTION, signal.direction_columns(CLASSES, "test"))
    np.testing.assert_array_equal(out.as_numpy("signal").ravel(), code)
    np.testing.assert_allclose(out.as_numpy("confidence").ravel(), conf, atol=1e-6)
    assert set(code.tolist()) == {-1, 0, 1}
    with pytest.raises(InferenceServerException, match="sum"):
        _call(server, "signal_dir", np.array([[0.5, 0.5, 0.5]], np.float32))


def test_predicted_returns(server: LocalTriton) -> None:
    r = np.random.default_rng(1).normal(0, 0.001, size=(300, 1)).astype(np.float32)
    out = _call(server, "signal_ret", r)
    code, conf = signal.apply(r, RETURNS, None)
    np.testing.assert_array_equal(out.as_numpy("signal").ravel(), code)
    np.testing.assert_allclose(out.as_numpy("confidence").ravel(), conf, atol=1e-6)
    with pytest.raises(InferenceServerException, match="not finite"):
        _call(server, "signal_ret", np.array([[np.inf]], np.float32))


def test_a_rule_that_does_not_fit_the_scores_is_refused_when_written(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="gives buy_at/sell_at"):
        rep.write_signal(tmp_path, {1: signal.Thresholds()}, classes=CLASSES)
    with pytest.raises(ConfigError, match="gives margin/min_prob"):
        rep.write_signal(tmp_path, {1: DIRECTION})
    with pytest.raises(ConfigError):
        rep.write_signal(tmp_path, {1: DIRECTION}, classes=("a", "b", "c"))
