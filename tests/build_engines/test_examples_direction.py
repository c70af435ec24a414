"""The 3-class example (eurusd_direction): real bars, a flat band, served through decide.

Trains the small variant on the same EURUSD bars, features, cut and purge as
``eurusd_lgbm``, builds it through the real pipeline, writes
``decide_direction`` over it as ``python -m ensembles`` does, and serves both:
decide's probabilities are the engine's, its signals the direction rule's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("backtesting")
pytest.importorskip("numba")
grpcclient = pytest.importorskip("tritonclient.grpc")

from build_engines import gate  # noqa: E402
from build_engines.build import build_model  # noqa: E402
from build_engines.examples import market  # noqa: E402
from build_engines.examples.catalog import EXAMPLES, train  # noqa: E402
from build_engines.spec import ModelSpec  # noqa: E402
from ensembles import signal  # noqa: E402
from ensembles.__main__ import (  # noqa: E402
    DIRECTION_DECIDE,
    DIRECTION_MODEL,
    DIRECTION_THRESHOLDS,
    write_direction_decide,
)
from setsuna import manifest  # noqa: E402
from setsuna.server import LocalTriton  # noqa: E402


def test_labels_follow_the_flat_band() -> None:
    r = np.array([-0.002, -0.0007, -0.0006, 0.0, 0.0006, 0.0007, 0.003])
    assert market.direction_labels(r, 7.0).tolist() == [0, 0, 1, 1, 1, 2, 2]
    s = market.split(direction=True)
    binary = market.split()
    np.testing.assert_array_equal(s.x_train, binary.x_train)  # same rows and features
    np.testing.assert_array_equal(s.x_valid, binary.x_valid)
    shares = np.bincount(s.y_train, minlength=3) / len(s.y_train)
    assert shares.min() > 0.2, shares  # the band splits the series into rough thirds


def test_built_and_served_through_decide(tmp_path: Path) -> None:
    assert DIRECTION_MODEL in EXAMPLES and DIRECTION_MODEL == market.DIRECTION_NAME
    ex = train(DIRECTION_MODEL, small=True)
    assert ex.source.classes == market.DIRECTION_CLASSES
    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01, row_by_row_rows=200)
    result = build_model(
        ex.source, ex.x_valid, ModelSpec(DIRECTION_MODEL, gate=fast), tmp_path, ("local",),
        tmp_path / "work", echo=False,
    )  # fmt: skip
    m = manifest.verify(result.published["local"])
    assert m.classes == market.DIRECTION_CLASSES
    assert list(m.schema.names) == list(market.spec().names)
    repo = tmp_path / "local"
    with tempfile.TemporaryDirectory() as files:
        write_direction_decide(repo, Path(files))
    x = ex.x_valid[:512]
    with (
        LocalTriton.on_free_ports(
            repo, load_models=(DIRECTION_MODEL, DIRECTION_DECIDE), log_path=tmp_path / "t.log"
        ) as srv,
        grpcclient.InferenceServerClient(srv.grpc_url) as client,
    ):
        inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        direct = client.infer(DIRECTION_MODEL, inputs).as_numpy("score")
        key = grpcclient.InferInput("key", [len(x), 1], "BYTES")
        key.set_data_from_numpy(np.array([[b"EURUSD"]] * len(x), dtype=np.object_))
        out = client.infer(DIRECTION_DECIDE, [*inputs, key])
    np.testing.assert_array_equal(out.as_numpy("score"), direct)
    np.testing.assert_allclose(direct, ex.source.reference(x), atol=1e-6)
    columns = signal.direction_columns(m.classes, "test")
    code, _ = signal.decide_classes(direct, DIRECTION_THRESHOLDS, columns)
    np.testing.assert_array_equal(out.as_numpy("signal").reshape(-1), code)
