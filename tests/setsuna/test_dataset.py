"""``setsuna dataset``: serving features, labels from the same symbol's future, no look-ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from setsuna.cli import main
from setsuna.dataset import FORWARD_RETURN, LABEL, build_dataset
from setsuna.errors import ConfigError, OutOfOrderError
from setsuna.features import default_spec, features_frame
from setsuna.market import datasets

SPEC = default_spec()


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    a = datasets.eurusd().iloc[:600]
    b = datasets.sp500().iloc[:500]
    return pd.concat([a, b], ignore_index=True)


def test_labels_are_each_symbols_own_close_h_bars_ahead(bars: pd.DataFrame) -> None:
    """Recomputed row by row from the raw bars: a label shifted by one bar fails here."""
    h = 3
    data = build_dataset(bars, horizon_bars=h, spec=SPEC)
    by_symbol = {s: f.reset_index(drop=True) for s, f in bars.groupby("symbol")}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data), 200, replace=False):
        row = data.iloc[i]
        own = by_symbol[row["symbol"]]
        j = int(np.flatnonzero((own["timestamp"] == row["timestamp"]).to_numpy())[0])
        want = own["close"].iloc[j + h] / own["close"].iloc[j] - 1
        assert row[FORWARD_RETURN] == pytest.approx(want, rel=1e-12)
        assert row[LABEL] == int(want > 0)
    # the last h bars of each symbol have no label and are dropped, not guessed
    for s, own in by_symbol.items():
        last = data[data["symbol"] == s]["timestamp"].max()
        assert last == own["timestamp"].iloc[-h - 1]


def test_features_use_no_bar_after_their_own(bars: pd.DataFrame) -> None:
    """Features of bar t from the whole file equal those from the file cut after t."""
    data = build_dataset(bars, horizon_bars=2, spec=SPEC)
    eur = bars[bars["symbol"] == "EURUSD"]
    cut = eur.iloc[:300]
    alone, _ = features_frame(cut, SPEC)
    t = cut["timestamp"].iloc[-1]
    got = data[(data["symbol"] == "EURUSD") & (data["timestamp"] == t)][list(SPEC.names)]
    want = alone.iloc[[-1]][list(SPEC.names)]
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_rows_are_time_ordered_ready_and_finite(bars: pd.DataFrame) -> None:
    data = build_dataset(bars, horizon_bars=5, spec=SPEC)
    assert data["timestamp"].is_monotonic_increasing
    assert np.isfinite(data[list(SPEC.names)].to_numpy()).all()


def test_cli_writes_parquet_and_refuses_bad_input(bars: pd.DataFrame, tmp_path: Path) -> None:
    src = tmp_path / "bars.csv"
    bars.to_csv(src, index=False)
    out = tmp_path / "ds.parquet"
    assert main(["dataset", "--data", str(src), "--horizon", "4", "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) > 900 and out.with_suffix(".spec.json").is_file()
    assert main(["dataset", "--data", str(src), "--horizon", "0", "--out", str(out)]) == 2
    swapped = bars.copy()
    swapped.iloc[[10, 11]] = swapped.iloc[[11, 10]].to_numpy()
    with pytest.raises(OutOfOrderError):
        build_dataset(swapped, horizon_bars=1)
    with pytest.raises(ConfigError):
        build_dataset(bars, horizon_bars=0)
