"""The replay's backtest (backtesting.py, real) and its progress bar (tqdm, real).

Oracles are computed by hand from the bars: a position ordered on bar t
fills at bar t+1's open (backtesting's default), takes all the cash but a
millionth (``INVEST_FRACTION``), pays the spread once, at entry (the fill
price moves by it), and ``commission`` of the traded value at entry (of that
fill price) and at exit. The units are sized before the spread is added to the
commission's base, as backtesting does.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

pytest.importorskip("backtesting")
pd = pytest.importorskip("pandas")

from setsuna.backtest import (  # noqa: E402
    INVEST_FRACTION,
    BacktestSettings,
    backtest_decisions,
    backtest_symbol,
    backtest_table,
    stance_per_bar,
)
from setsuna.errors import ConfigError  # noqa: E402
from setsuna.market import BAR_DTYPE, ReplayFeed, datasets  # noqa: E402
from setsuna.pipeline import RunSummary  # noqa: E402
from setsuna.replay import ProgressBar, ReplayResult, summary_text, write_report  # noqa: E402

ROOT = Path(__file__).parents[2]
FREE = BacktestSettings(cash=10_000.0, commission_bps=0.0, spread_bps=0.0)


def real_bars(name: str) -> npt.NDArray[Any]:
    """backtesting's own data set (GOOG daily, EURUSD hourly) as replay records."""
    return np.array(ReplayFeed.from_frame(datasets.load(name)).records)


def tiny_bars(opens: list[float]) -> npt.NDArray[Any]:
    rec = np.zeros(len(opens), dtype=BAR_DTYPE)
    rec["timestamp_ns"] = np.arange(len(opens)) * 86_400 * 10**9 + 1_600_000_000 * 10**9
    o = np.asarray(opens, dtype=np.float64)
    rec["open"] = o
    rec["close"] = o * 1.01
    rec["high"] = o * 1.02
    rec["low"] = o * 0.98
    rec["volume"] = 1000.0
    return rec


def long_oracle(cash: float, entry: float, exit_: float, s: BacktestSettings) -> float:
    """Final equity after one long trade from ``entry`` to ``exit_`` (prices, opens)."""
    units = cash * INVEST_FRACTION / (entry * (1 + s.spread) + entry * s.commission)
    paid = units * entry * (1 + s.spread) * (1 + s.commission)
    return cash - paid + units * exit_ * (1 - s.commission)


def short_oracle(cash: float, entry: float, exit_: float, s: BacktestSettings) -> float:
    units = cash * INVEST_FRACTION / (entry * (1 - s.spread) + entry * s.commission)
    filled = entry * (1 - s.spread)
    pnl = units * (filled - exit_)
    return cash + pnl - units * filled * s.commission - units * exit_ * s.commission


# ----------------------------------------------------------------- hand-checked


@pytest.mark.parametrize("t,k", [(0, 3), (2, 1), (1, 4)])
@pytest.mark.parametrize("costs", [FREE, BacktestSettings(commission_bps=5.0, spread_bps=20.0)])
def test_one_long_stance_earns_the_opens_it_spans_minus_costs(
    t: int, k: int, costs: BacktestSettings
) -> None:
    opens = [100.0, 104.0, 97.0, 110.0, 121.0, 90.0, 95.0, 99.0]
    bars = tiny_bars(opens)
    stance = np.zeros(len(bars), np.int8)
    stance[t : t + k] = 1  # decided at the close of bars t..t+k-1
    r = backtest_symbol("X", bars, stance, costs)
    want = long_oracle(costs.cash, opens[t + 1], opens[t + k + 1], costs)
    assert r.final_equity == pytest.approx(want, rel=1e-9)
    assert r.return_pct == pytest.approx((want / costs.cash - 1) * 100, rel=1e-9)
    assert r.trades == 1
    assert r.win_rate_pct == (100.0 if want > costs.cash else 0.0)


def test_one_short_stance_earns_the_fall_minus_costs() -> None:
    opens = [100.0, 104.0, 97.0, 110.0, 121.0, 90.0, 95.0, 99.0]
    costs = BacktestSettings(commission_bps=5.0, spread_bps=20.0)
    stance = np.array([0, 0, 0, -1, -1, 0, 0, 0], np.int8)  # short 121 -> 95
    r = backtest_symbol("X", tiny_bars(opens), stance, costs)
    assert r.final_equity == pytest.approx(short_oracle(costs.cash, 121.0, 95.0, costs), rel=1e-9)
    assert r.trades == 1 and r.win_rate_pct == 100.0


def test_a_flip_from_long_to_short_closes_then_opens_at_the_same_open() -> None:
    opens = [100.0, 104.0, 97.0, 110.0, 121.0, 90.0, 95.0, 99.0]
    stance = np.array([1, 1, -1, -1, 0, 0, 0, 0], np.int8)  # long 104->110, short 110->90
    r = backtest_symbol("X", tiny_bars(opens), stance, FREE)
    after_long = long_oracle(FREE.cash, 104.0, 110.0, FREE)
    assert r.final_equity == pytest.approx(short_oracle(after_long, 110.0, 90.0, FREE), rel=1e-9)
    assert r.trades == 2


def test_stance_per_bar_holds_the_last_decision_and_is_flat_before_the_first() -> None:
    bar_ns = np.array([10, 20, 30, 40, 50, 60], np.int64)
    # No decision on bar 40 (a skipped request): bar 30's stance is still held.
    d_ns = np.array([20, 30, 50], np.int64)
    got = stance_per_bar(bar_ns, d_ns, np.array([1, -1, 0], np.int8))
    assert got.tolist() == [0, 1, -1, -1, 0, 0]


# ------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", ["goog", "eurusd"])
def test_long_on_every_bar_is_buy_and_hold_within_costs(name: str) -> None:
    bars = real_bars(name)
    o, c = bars["open"], bars["close"]
    stance = np.ones(len(bars), np.int8)
    free = backtest_symbol(name, bars, stance, FREE)
    # Bought at bar 1's open, closed at the last bar's open ...
    assert free.final_equity == pytest.approx(FREE.cash * o[-1] / o[1], rel=1e-5)
    # ... which is backtesting's buy & hold (first to last close) but for those two gaps.
    gaps = (c[0] / o[1]) * (o[-1] / c[-1])
    assert 1 + free.return_pct / 100 == pytest.approx(
        (1 + free.buy_hold_return_pct / 100) * gaps, rel=1e-5
    )
    assert free.trades == 1 and free.exposure_pct > 99.0
    costs = BacktestSettings(commission_bps=2.0, spread_bps=3.0)
    paid = backtest_symbol(name, bars, stance, costs)
    assert paid.final_equity == pytest.approx(long_oracle(costs.cash, o[1], o[-1], costs), rel=1e-6)
    assert paid.final_equity < free.final_equity
    assert free.equity.shape == free.buy_hold_equity.shape == (len(bars),)
    assert free.buy_hold_equity[-1] == pytest.approx(
        FREE.cash * (1 + free.buy_hold_return_pct / 100)
    )


def test_flat_on_every_bar_trades_nothing_and_keeps_the_cash() -> None:
    bars = real_bars("goog")
    r = backtest_symbol("GOOG", bars, np.zeros(len(bars), np.int8), BacktestSettings())
    assert r.trades == 0 and r.final_equity == 10_000.0 and r.return_pct == 0.0
    assert r.exposure_pct == 0.0 and math.isnan(r.win_rate_pct)
    assert np.all(r.equity == 10_000.0)


def test_costs_lower_the_result_commission_and_spread_each() -> None:
    bars = real_bars("eurusd")
    rng = np.random.default_rng(7)
    stance = np.repeat(rng.choice(np.array([-1, 0, 1], np.int8), len(bars) // 20 + 1), 20)
    stance = stance[: len(bars)]
    base = backtest_symbol("EURUSD", bars, stance, FREE)
    assert base.trades > 100
    finals = [
        backtest_symbol("EURUSD", bars, stance, BacktestSettings(commission_bps=b)).final_equity
        for b in (0.0, 1.0, 5.0)
    ]
    assert finals[0] > finals[1] > finals[2]
    spreads = [
        backtest_symbol(
            "EURUSD", bars, stance, BacktestSettings(commission_bps=0, spread_bps=b)
        ).final_equity
        for b in (0.0, 1.0, 5.0)
    ]
    assert spreads[0] == pytest.approx(base.final_equity)
    assert spreads[0] > spreads[1] > spreads[2]


def test_backtest_decisions_runs_one_per_symbol_from_the_replays_arrays() -> None:
    feed = ReplayFeed.from_frame(pd.concat([datasets.goog(), datasets.eurusd()]))
    rec = np.array(feed.records)
    # A decision on every 3rd row; long for GOOG, short for EURUSD.
    rows = rec[::3]
    decisions = {
        "event_ns": rows["timestamp_ns"],
        "symbol_id": rows["symbol_id"],
        "stance": np.where(rows["symbol_id"] == feed.symbols.index("GOOG"), 1, -1).astype(np.int8),
    }
    out = backtest_decisions(rec, feed.symbols, decisions, FREE)
    assert [b.symbol for b in out] == list(feed.symbols)
    by = {b.symbol: b for b in out}
    assert by["GOOG"].trades == 1 and by["EURUSD"].trades == 1
    assert by["GOOG"].bars == int(np.count_nonzero(rec["symbol_id"] == feed.symbols.index("GOOG")))
    table = backtest_table(out, FREE)
    assert "GOOG" in table and "EURUSD" in table and "next bar's open" in table


# -------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"commission_bps": -1.0}, "commission_bps=-1.0"),
        ({"commission_bps": 1000.0}, "< 1000 bps"),
        ({"commission_bps": math.nan}, "finite number of basis points"),
        ({"commission_bps": "1"}, "commission_bps='1'"),
        ({"commission_bps": True}, "commission_bps=True"),
        ({"spread_bps": -0.5}, "spread_bps=-0.5"),
        ({"spread_bps": math.inf}, "spread_bps=inf"),
        ({"cash": 0.0}, "cash=0.0"),
        ({"cash": -10.0}, "starting cash"),
        ({"cash": math.nan}, "cash=nan"),
    ],
)
def test_bad_settings_are_refused_with_the_value_and_its_unit(
    kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match="") as info:
        BacktestSettings(**kwargs)
    assert needle in str(info.value)


def test_the_sdk_imports_without_backtesting_and_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['backtesting'] = None\n"
        "import setsuna.replay, setsuna.backtest as b\n"
        "from setsuna.errors import ConfigError\n"
        "try:\n    b.require_backtesting()\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "pip install 'setsuna[data]'" in out.stdout


def test_setsuna_replay_refuses_bad_costs_before_reading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from setsuna import cli

    args = ["replay", "--model", "m", "--data", str(tmp_path / "none.csv")]
    assert cli.main([*args, "--spread-bps", "-2"]) == 2
    assert "spread_bps=-2.0" in capsys.readouterr().err


# -------------------------------------------------------------- report, summary


def test_summary_and_report_carry_the_per_symbol_backtest(tmp_path: Path) -> None:
    feed = ReplayFeed.from_frame(pd.concat([datasets.goog(), datasets.eurusd()]))
    rec = np.array(feed.records)
    rows = rec[::5]
    decisions = {
        "event_ns": rows["timestamp_ns"],
        "symbol_id": rows["symbol_id"],
        "signal": np.zeros(len(rows), np.int8),
        "stance": np.where(np.arange(len(rows)) % 7 < 3, 1, 0).astype(np.int8),
    }
    settings = BacktestSettings(commission_bps=1.0, spread_bps=2.0)
    result = ReplayResult(
        RunSummary(),
        feed.symbols,
        rec,
        decisions,
        math.nan,
        0,
        0,
        {},
        None,
        backtest_decisions(rec, feed.symbols, decisions, settings),
        settings,
    )
    text = summary_text(result)
    assert "cumulative return" not in text
    assert "commission 1 bp per side, spread 2 bp" in text
    for b in result.backtests:
        assert b.symbol in text and f"{b.return_pct:+.2f}%" in text
    report = write_report(result, tmp_path / "report")
    assert (tmp_path / "report" / "backtest.png").stat().st_size > 10_000
    assert "backtest.png" in report.read_text()
    doc = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert doc["backtest"]["settings"]["spread_bps"] == 2.0
    assert [s["symbol"] for s in doc["backtest"]["symbols"]] == list(feed.symbols)


# -------------------------------------------------------------------- progress


def feed_progress(bar: ProgressBar, total: int, every: int) -> None:
    """As ``Pipeline.run`` calls it: every few groups, then once at the end."""
    for done in range(every, total, every):
        bar(done, total)
    bar(total, total)


def test_progress_in_a_log_is_whole_lines_bounded_and_ends_with_the_total() -> None:
    log = io.StringIO()
    feed_progress(ProgressBar(log, interval_s=math.inf), 5165, 7)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 5 <= len(lines) <= 11  # one per 10 %, plus the end
    assert "5165/5165" in lines[-1] and "100%" in lines[-1]
    assert all(line.startswith("replay:") for line in lines)


def test_progress_in_a_log_also_writes_a_line_every_interval() -> None:
    log = io.StringIO()
    t = iter(range(10_000))
    bar = ProgressBar(log, percent_step=100, interval_s=10.0, clock=lambda: float(next(t)))
    feed_progress(bar, 100, 1)  # a clock tick of 1 "second" per call
    lines = log.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and "100/100" in lines[-1]


def test_progress_of_a_stopped_run_ends_with_where_it_stopped() -> None:
    log = io.StringIO()
    bar = ProgressBar(log, interval_s=math.inf)
    for done in (100, 150, 160):
        bar(done, 5000)
    bar.close()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "160/5000" in lines[-1]


def test_progress_on_a_terminal_is_tqdms_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    feed_progress(ProgressBar(term), 1000, 10)
    text = term.getvalue()
    assert "\r" in text and "1000/1000" in text.rsplit("\r", 1)[-1]


@pytest.mark.parametrize("kwargs", [{"percent_step": 0}, {"percent_step": 101}, {"interval_s": 0}])
def test_progress_options_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ProgressBar(io.StringIO(), **kwargs)
