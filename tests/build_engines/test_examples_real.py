"""The real-data example (eurusd_lgbm): trained on setsuna's own features, no leakage.

Trains the small variant on the EURUSD hourly bars ``backtesting`` ships,
builds it through the real pipeline into a local repository, and checks that
the manifest records the feature schema the pipeline will compute, and that
no training label looks past the cut into the held-out bars.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("backtesting")
pytest.importorskip("numba")

from build_engines import gate
from build_engines.build import build_model
from build_engines.examples import market
from build_engines.examples.catalog import train
from build_engines.spec import ModelSpec
from setsuna import manifest


def test_training_rows_end_before_the_unseen_bars_minus_the_horizon() -> None:
    from setsuna.dataset import build_dataset
    from setsuna.market import datasets

    bars = datasets.eurusd()
    cut = market.cut_index(len(bars))
    data = build_dataset(bars, horizon_bars=market.HORIZON_BARS, spec=market.spec())
    s = market.split()
    # The training rows are the first ones; the last of them must be at least
    # HORIZON_BARS bars before the first unseen bar, so its label stays inside history.
    first_unseen = bars["timestamp"].iloc[cut]
    train_rows = data[data["timestamp"] < first_unseen].iloc[: -market.HORIZON_BARS]
    assert len(s.x_train) == len(train_rows) and len(s.x_train) > 1000
    last = train_rows["timestamp"].iloc[-1]
    position = int(np.flatnonzero(bars["timestamp"].to_numpy() == last)[0])
    assert position + market.HORIZON_BARS < cut
    assert len(s.x_valid) > 1000 and np.isfinite(s.x_valid).all()


def test_built_model_records_the_feature_schema(tmp_path: Path) -> None:
    ex = train(market.NAME, small=True)
    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    result = build_model(
        ex.source,
        ex.x_valid,
        ModelSpec(market.NAME, gate=fast),
        tmp_path,
        ("local",),
        tmp_path / "work",
        echo=False,
    )
    m = manifest.verify(result.published["local"])
    assert list(m.schema.names) == list(market.spec().names)
    assert m.source["kind"] == "lightgbm"
