"""The default features against TA-Lib's batch functions on real series.

Tolerance: |ours - TA-Lib| <= 1e-9 * max(|TA-Lib|, scale) from bar 300, with
``scale`` the feature's natural unit: 1 for quantities around zero that are
a level divided by a level (returns, close/SMA - 1, MACD/close), so the
test is a relative one on the level; 1 for %b (one band width) and a z-score
(one std); 100 for RSI (its range); 0 (purely relative) for ATR/close and
realised volatility. A plain relative difference of a value crossing zero
measures nothing but cancellation: TA-Lib's uncompensated running SMA drifts
by ~4e-15 relative, which ``close/SMA - 1`` near zero turns into 3e-7.

Warm-up conventions, each tested below:

* EMA: seeded with the SMA of the first ``n`` closes, first value at bar n-1
  (TA-Lib's default); identical to TA-Lib from its first value.
* RSI: Wilder smoothing seeded with the mean gain/loss of the first n
  changes, first value at bar n (TA-Lib); a flat window gives 50 (TA-Lib: 0).
* MACD: the fast EMA is seeded over the ``fast`` closes ending at bar
  slow-1, as TA-Lib does (not from bar 0); our line is ready at bar slow-1
  (25), TA-Lib reports it only from bar slow+signal-2 (33) where the signal
  starts; from there they agree.
* ATR: seeded with the mean true range of bars 1..n, first value at bar n.
* Std: population (ddof 0) for Bollinger %b and the volume z-score, as
  TA-Lib's STDDEV; sample (ddof 1) for realised volatility.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import talib

from setsuna.features import FeatureSpec, compute_features, default_spec
from setsuna.market import BarRecords

from .conftest import bars

FROM_BAR = 300
SCALE = {
    "ret_1": 1.0, "ret_5": 1.0, "ret_20": 1.0, "close_sma_20": 1.0, "close_ema_20": 1.0,
    "rsi_14": 100.0, "macd_line": 1.0, "macd_signal": 1.0, "macd_hist": 1.0,
    "bb_pctb_20": 1.0, "atr_14": 0.0, "rvol_20": 0.0, "volume_z_20": 1.0,
}  # fmt: skip


def ours(records: BarRecords, spec: FeatureSpec | None = None) -> dict[str, np.ndarray]:
    spec = spec or default_spec()
    (values, _), _ = compute_features(records, ("x",), spec, dtype=np.float64)
    return {name: values[:, i] for i, name in enumerate(spec.names)}


def talib_reference(r: BarRecords) -> dict[str, np.ndarray]:
    h, lo, c, v = (np.ascontiguousarray(r[k]) for k in ("high", "low", "close", "volume"))
    line, signal, hist = talib.MACD(c, 12, 26, 9)
    upper, _, lower = talib.BBANDS(c, 20, 2.0, 2.0)
    log_ret = np.log(c[1:] / c[:-1])
    return {
        "ret_1": talib.ROCR(c, 1) - 1,
        "ret_5": talib.ROCR(c, 5) - 1,
        "ret_20": talib.ROCR(c, 20) - 1,
        "close_sma_20": c / talib.SMA(c, 20) - 1,
        "close_ema_20": c / talib.EMA(c, 20) - 1,
        "rsi_14": talib.RSI(c, 14),
        "macd_line": line / c,
        "macd_signal": signal / c,
        "macd_hist": hist / c,
        "bb_pctb_20": (c - lower) / (upper - lower),
        "atr_14": talib.ATR(h, lo, c, 14) / c,
        "rvol_20": np.r_[np.nan, talib.STDDEV(log_ret, 20) * math.sqrt(20 / 19)],
        "volume_z_20": (v - talib.SMA(v, 20)) / talib.STDDEV(v, 20),
    }


def worst(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), scale)))


@pytest.mark.parametrize("name", sorted(SCALE))
def test_agrees_with_talib_from_bar_300(real: BarRecords, name: str) -> None:
    got, want = ours(real)[name][FROM_BAR:], talib_reference(real)[name][FROM_BAR:]
    assert np.isfinite(got).all() and np.isfinite(want).all()
    assert worst(got, want, SCALE[name]) <= 1e-9


def test_sma_is_more_exact_than_talib(real: BarRecords) -> None:
    """Why the scale above: our compensated SMA matches an exact fsum; TA-Lib drifts."""
    c = real["close"]
    exact = np.array([math.fsum(c[i - 19 : i + 1]) / 20 for i in range(19, len(c))])
    ours_sma = c[19:] / (1 + ours(real)["close_sma_20"][19:])
    assert np.max(np.abs(ours_sma - exact) / exact) <= 1e-15
    assert np.max(np.abs(ours_sma - talib.SMA(c, 20)[19:]) / exact) <= 1e-9


@pytest.mark.parametrize(
    ("name", "first_bar"), [("close_ema_20", 19), ("rsi_14", 14), ("atr_14", 14), ("macd_hist", 33)]
)
def test_seeding_matches_talib_from_its_first_value(
    real: BarRecords, name: str, first_bar: int
) -> None:
    got, want = ours(real)[name], talib_reference(real)[name]
    assert np.isnan(want[first_bar - 1]) and not np.isnan(want[first_bar])
    assert np.isnan(got[first_bar - 1])
    assert worst(got[first_bar:], want[first_bar:], SCALE[name]) <= 1e-12


def test_macd_line_is_ready_before_talib_reports_it(real: BarRecords) -> None:
    line = ours(real)["macd_line"]
    assert np.isnan(line[24]) and np.isfinite(line[25:33]).all()
    assert np.isnan(talib_reference(real)["macd_line"][:33]).all()
    # TA-Lib's fast-EMA seeding matters: seeding it at bar 0 instead differs at bar 33.
    c = real["close"]
    naive = (talib.EMA(c, 12) - talib.EMA(c, 26)) / c
    assert abs(naive[33] - line[33]) > 1e-9 * abs(line[33])


def test_realised_vol_is_sample_std_not_population(real: BarRecords) -> None:
    rvol = ours(real)["rvol_20"][FROM_BAR:]
    c = real["close"]
    population = np.r_[np.nan, talib.STDDEV(np.log(c[1:] / c[:-1]), 20)][FROM_BAR:]
    assert worst(rvol, population * math.sqrt(20 / 19), 0.0) <= 1e-9
    assert np.min(rvol / population) > 1.02  # sqrt(20/19) = 1.026


def test_flat_window_gives_finite_neutral_values() -> None:
    """TA-Lib returns 0 for a flat RSI and 0/0 for %b; we return 50 and 0.5."""
    close = np.full(60, 123.25)
    got = ours(bars(close))
    assert got["rsi_14"][14:].tolist() == [50.0] * 46
    assert talib.RSI(close, 14)[14] == 0.0
    np.testing.assert_allclose(got["bb_pctb_20"][19:], 0.5, atol=1e-6)
    assert got["volume_z_20"][19:].tolist() == [0.0] * 41
    assert got["rvol_20"][20:].tolist() == [0.0] * 40
    for name, series in got.items():
        ready = ~np.isnan(series)
        assert np.isfinite(series[ready]).all(), name
