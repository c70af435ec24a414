"""Sessions as data, ticks to bars, and the bad-tick on_bad_rows."""

from __future__ import annotations

import math
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from setsuna.errors import BadValueError, ConfigError, OutOfOrderError, UnknownSymbolError
from setsuna.market import FX24, TSE, BarBuilder, Tick, TradingSession

MIN = 60 * 1_000_000_000


def tokyo_ns(hh: int, mm: int, ss: int = 0) -> int:
    return int(datetime(2024, 3, 5, hh, mm, ss, tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()) * (
        1_000_000_000
    )


def test_tse_windows_skip_lunch_and_close() -> None:
    assert TSE.window_of(tokyo_ns(11, 29)) == (tokyo_ns(9, 0), tokyo_ns(11, 30))
    assert TSE.window_of(tokyo_ns(11, 30)) is None  # half-open: the close is outside
    assert TSE.window_of(tokyo_ns(12, 0)) is None
    assert TSE.window_of(tokyo_ns(12, 30)) == (tokyo_ns(12, 30), tokyo_ns(15, 30))
    assert TSE.window_of(tokyo_ns(15, 30)) is None


def test_elapsed_fraction_counts_trading_minutes_only() -> None:
    total = 150 + 180
    got = TSE.elapsed_fraction(
        [tokyo_ns(8, 0), tokyo_ns(10, 0), tokyo_ns(12, 0), tokyo_ns(13, 30), tokyo_ns(16, 0)]
    )
    np.testing.assert_allclose(got, [0, 60 / total, 150 / total, 210 / total, 1.0])
    assert FX24.elapsed_fraction([6 * 60 * MIN])[0] == 0.25


def test_session_validation() -> None:
    with pytest.raises(ConfigError, match="daylight saving"):
        TradingSession("NY", "America/New_York", (("09:30", "16:00"),))
    with pytest.raises(ConfigError, match="non-overlapping"):
        TradingSession("X", "UTC", (("10:00", "12:00"), ("11:00", "13:00")))
    with pytest.raises(ConfigError, match="HH:MM"):
        TradingSession("X", "UTC", (("ten", "12:00"),))


def tick(ts: int, price: float, size: float = 1.0, symbol: str = "7203") -> Tick:
    return Tick(symbol, ts, price, size)


def test_time_bars_align_to_session_and_never_span_lunch() -> None:
    builder = BarBuilder(bar_ns=30 * MIN, session=TSE)
    assert builder.add(tick(tokyo_ns(11, 5), 100.0, 2)) == []
    assert builder.add(tick(tokyo_ns(11, 20), 102.0, 1)) == []
    forming = builder.forming("7203")
    assert forming is not None
    assert (forming.start_ns, forming.end_ns) == (tokyo_ns(11, 0), tokyo_ns(11, 30))
    assert forming.close == 102.0 and forming.tick_count == 2
    assert forming.vwap == pytest.approx((200 + 102) / 3)
    (bar,) = builder.add(tick(tokyo_ns(12, 31), 101.0))  # first afternoon tick closes it
    assert bar.end_ns == tokyo_ns(11, 30)  # ended at the lunch break, not 11:30 + 30 min
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == (100, 102, 100, 102, 3)
    afternoon = builder.forming("7203")
    assert afternoon is not None and afternoon.start_ns == tokyo_ns(12, 30)


def test_ticks_outside_session_are_dropped_and_counted() -> None:
    builder = BarBuilder(bar_ns=MIN, session=TSE, on_bad_rows="raise")
    assert builder.add(tick(tokyo_ns(12, 0), 100.0)) == []
    assert builder.drops.outside_session == 1
    assert builder.forming("7203") is None


def test_tick_count_bars_and_close_until() -> None:
    builder = BarBuilder(ticks_per_bar=3)
    out = [b for i in range(7) for b in builder.add(tick(i * MIN, 100.0 + i))]
    assert [b.tick_count for b in out] == [3, 3]
    assert [b.close for b in out] == [102.0, 105.0]
    timed = BarBuilder(bar_ns=MIN)
    timed.add(tick(10, 1.0))
    assert timed.close_until(MIN - 1) == []
    assert [b.close for b in timed.close_until(MIN)] == [1.0]


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (Tick("7203", 5 * MIN, 101.0, 1.0), "out_of_order"),
        (Tick("7203", 10 * MIN, 100.0, 1.0), "duplicate"),
        (Tick("7203", 11 * MIN, math.nan, 1.0), "bad_value"),
        (Tick("7203", 11 * MIN, 100.0, -1.0), "bad_value"),
        (Tick("7203", 11 * MIN, -3.0, 1.0), "bad_value"),
    ],
)
def test_bad_ticks_raise_or_are_counted(second: Tick, reason: str) -> None:
    first = Tick("7203", 10 * MIN, 100.0, 1.0)
    strict = BarBuilder(bar_ns=MIN)
    strict.add(first)
    error = BadValueError if reason == "bad_value" else OutOfOrderError
    with pytest.raises(error, match=r"on_bad_rows='drop'|drop or repair"):
        strict.add(second)
    lenient = BarBuilder(bar_ns=MIN, on_bad_rows="drop")
    lenient.add(first)
    assert lenient.add(second) == []
    assert lenient.drops.as_dict()[reason] == 1 and lenient.drops.total == 1
    forming = lenient.forming("7203")
    assert forming is not None and forming.tick_count == 1 and forming.close == 100.0


def test_same_timestamp_different_trade_is_accepted() -> None:
    builder = BarBuilder(bar_ns=MIN)
    builder.add(Tick("A", 10, 100.0, 1.0))
    builder.add(Tick("A", 10, 100.5, 2.0))
    forming = builder.forming("A")
    assert forming is not None and forming.tick_count == 2


def test_unknown_symbol_is_refused() -> None:
    builder = BarBuilder(bar_ns=MIN, symbols=["A"])
    with pytest.raises(UnknownSymbolError, match="symbols="):
        builder.add(Tick("B", 10, 100.0, 1.0))


def test_builder_settings_validated_once() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        BarBuilder()
    with pytest.raises(ConfigError, match="on_bad_rows"):
        BarBuilder(bar_ns=MIN, on_bad_rows="ignore")  # type: ignore[arg-type]
