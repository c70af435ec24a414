"""Judge served stances with backtesting.py, one backtest per symbol.

The replay records, per symbol, the stance the pipeline's policy held after
each decision (long 1, flat 0, short -1). :func:`backtest_decisions` turns
those into a stance per bar (the last decision at or before the bar; flat
before the first, and the stance is held through bars where no decision was
made) and runs :class:`backtesting.lib.FractionalBacktest` over the symbol's
bars with a strategy that follows them:

- **No look-ahead.** A stance decided on bar ``t`` (its close known) is
  ordered in ``Strategy.next`` on bar ``t`` and filled at bar ``t+1``'s open:
  backtesting's default execution (``trade_on_close=False``). The stance of
  the first bar is ordered in ``Strategy.init`` (backtesting calls ``next``
  from the second bar on), so it too fills at the second bar's open.
- **Sizing.** All the equity (less a millionth: backtesting's relative sizes
  must be below 1) goes into each position, long or short, no leverage.
  ``FractionalBacktest`` trades 1e-8 units, so an index at 7,000 and a
  currency pair at 1.1 are both sized to the cash, not rounded to whole units.
- **Costs.** ``commission_bps`` per side, of the traded value (backtesting
  charges it at entry and at exit); ``spread_bps`` the whole bid-ask spread,
  paid once per position (backtesting moves the entry price by it).
- **End.** A position still open on the last bar is closed at that bar's
  open (``finalize_trades=True``), so it counts in trades and win rate.
- **Start.** backtesting back-fills the first bar's equity from the second
  (it records equity from the second bar on); when the first stance is
  already a position that would be the base of every figure, so the first
  bar's equity is set to the cash and the figures recomputed with
  ``backtesting.lib.compute_stats``.
- **Figures** are backtesting's own: return, buy & hold return (last close
  over first close), Sharpe ratio (annualised from the bars' spacing, no
  risk-free rate), max drawdown, exposure time, number of trades, win rate.

Needs the ``data`` extra (``backtesting``, which brings pandas); the SDK
imports without it and :func:`require_backtesting` says what to install.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna.errors import BadValueError, ConfigError

#: Share of the available cash each position takes (backtesting wants < 1).
INVEST_FRACTION = 0.999999
#: Smallest tradable unit handed to ``FractionalBacktest``.
FRACTIONAL_UNIT = 1e-8
#: backtesting refuses a relative commission of 10 % or more.
MAX_BPS = 1000.0


@dataclass(frozen=True)
class BacktestSettings:
    """Costs and cash of a backtest; checked once, here."""

    #: Starting cash per symbol.
    cash: float = 10_000.0
    #: Commission per side (entry and exit), basis points of the traded value.
    commission_bps: float = 1.0
    #: Whole bid-ask spread, basis points of the price, paid once per position.
    spread_bps: float = 1.0

    def __post_init__(self) -> None:
        for name, unit in (
            ("commission_bps", "per side, in basis points of the traded value"),
            ("spread_bps", "the whole bid-ask spread, in basis points of the price"),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r}: a finite number of basis points ({unit})")
            if not 0.0 <= v < MAX_BPS:
                raise ConfigError(
                    f"{name}={v!r}: must be >= 0 and < {MAX_BPS:g} bps (10 %) ({unit}; "
                    "rebates are not modelled)"
                )
        c = self.cash
        if (
            isinstance(c, bool)
            or not isinstance(c, int | float)
            or not (math.isfinite(c) and c > 0)
        ):
            raise ConfigError(f"cash={c!r}: a finite amount > 0 (starting cash per symbol)")

    @property
    def commission(self) -> float:
        """As backtesting takes it: a fraction of the traded value."""
        return self.commission_bps / 1e4

    @property
    def spread(self) -> float:
        return self.spread_bps / 1e4

    def describe(self) -> str:
        return (
            f"cash {self.cash:,.0f} per symbol, commission {self.commission_bps:g} bp per side, "
            f"spread {self.spread_bps:g} bp"
        )


@dataclass(frozen=True)
class SymbolBacktest:
    """One symbol's backtest: backtesting's figures and the two equity curves."""

    symbol: str
    bars: int
    final_equity: float
    return_pct: float
    buy_hold_return_pct: float
    sharpe: float
    max_drawdown_pct: float
    exposure_pct: float
    trades: int
    win_rate_pct: float  # NaN without trades
    #: Bar open times (UTC ns), the strategy's equity and buy & hold's (same cash).
    time_ns: npt.NDArray[np.int64]
    equity: npt.NDArray[np.float64]
    buy_hold_equity: npt.NDArray[np.float64]
    #: backtesting's warnings during the run (e.g. an order cancelled for margin).
    notes: tuple[str, ...] = ()

    def figures(self) -> dict[str, Any]:
        """The scalar figures (for summary.json)."""
        return {
            "symbol": self.symbol,
            "bars": self.bars,
            "final_equity": self.final_equity,
            "return_pct": self.return_pct,
            "buy_hold_return_pct": self.buy_hold_return_pct,
            "sharpe": self.sharpe,
            "max_drawdown_pct": self.max_drawdown_pct,
            "exposure_pct": self.exposure_pct,
            "trades": self.trades,
            "win_rate_pct": self.win_rate_pct,
            "notes": list(self.notes),
        }


def require_backtesting() -> None:
    """Raise :class:`ConfigError` naming the extra when backtesting is missing."""
    try:
        import backtesting  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "judging signals with a backtest needs the 'backtesting' package: "
            "pip install 'setsuna[data]'"
        ) from exc


@functools.cache
def _strategy() -> Any:
    require_backtesting()
    from backtesting import Strategy

    class FollowStances(Strategy):  # type: ignore[misc]
        """Hold the recorded stance of each bar from the next bar's open."""

        stances: Any = None  # per bar, set by Backtest.run(stances=...)

        def _apply(self, i: int) -> None:
            want = int(self.stances[i])
            held = int(np.sign(self.position.size))
            if want == held:
                return
            if held:
                self.position.close()
            if want > 0:
                self.buy(size=INVEST_FRACTION)
            elif want < 0:
                self.sell(size=INVEST_FRACTION)

        def init(self) -> None:
            self._apply(0)  # fills at bar 1's open, before next() first runs

        def next(self) -> None:
            self._apply(len(self.data) - 1)

    return FollowStances


def stance_per_bar(
    bar_ns: npt.NDArray[np.int64],
    decision_ns: npt.NDArray[np.int64],
    stance: npt.NDArray[Any],
) -> npt.NDArray[np.int8]:
    """The stance held at each bar: the last decision at or before it, flat before any."""
    order = np.argsort(decision_ns, kind="stable")
    d_ns, d_st = decision_ns[order], np.asarray(stance)[order]
    k = np.searchsorted(d_ns, bar_ns, side="right") - 1
    out = np.zeros(len(bar_ns), dtype=np.int8)
    has = k >= 0
    out[has] = np.sign(d_st[k[has]]).astype(np.int8)
    return out


def backtest_symbol(
    symbol: str,
    bars: npt.NDArray[Any],
    stances: npt.NDArray[Any],
    settings: BacktestSettings | None = None,
) -> SymbolBacktest:
    """Backtest one symbol: ``bars`` (``BAR_DTYPE`` rows, time order), one stance per bar."""
    settings = settings or BacktestSettings()
    if len(bars) != len(stances):
        raise ConfigError(f"{symbol}: {len(bars)} bars but {len(stances)} stances")
    if len(bars) < 2:
        raise ConfigError(f"{symbol}: a backtest needs at least 2 bars, got {len(bars)}")
    require_backtesting()
    import pandas as pd
    from backtesting.lib import FractionalBacktest

    o, c = bars["open"].astype(np.float64), bars["close"].astype(np.float64)
    if not (np.isfinite(o).all() and np.isfinite(c).all()):
        raise BadValueError(f"{symbol}: bars with a missing open or close cannot be backtested")
    # An unknown high/low (NaN) is bounded by the open and close.
    h = np.where(np.isfinite(bars["high"]), bars["high"], np.maximum(o, c))
    lo = np.where(np.isfinite(bars["low"]), bars["low"], np.minimum(o, c))
    ts = bars["timestamp_ns"].astype(np.int64)
    frame = pd.DataFrame(
        {"Open": o, "High": h, "Low": lo, "Close": c, "Volume": bars["volume"]},
        index=pd.DatetimeIndex(ts.astype("datetime64[ns]")),
    )
    bt = FractionalBacktest(
        frame,
        _strategy(),
        cash=settings.cash,
        commission=settings.commission,
        spread=settings.spread,
        finalize_trades=True,
        fractional_unit=FRACTIONAL_UNIT,
    )
    # backtesting draws its own tqdm bar ('\r' lines) on stderr for every run: kept out.
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("always")
        stats = bt.run(stances=np.asarray(stances, dtype=np.int8))
    curve = stats["_equity_curve"]
    if curve["Equity"].iloc[0] != settings.cash:
        # backtesting records equity from the second bar on and back-fills the
        # first with it: a position ordered on bar 0 (filled at bar 1's open)
        # would make that the base of Return, drawdown and Sharpe. Nothing is
        # held on bar 0; its equity is the cash. Recomputed with backtesting's
        # own lib.compute_stats.
        from backtesting.lib import compute_stats

        curve.iloc[0, curve.columns.get_loc("Equity")] = settings.cash
        stats = compute_stats(stats=stats, data=frame)
    equity = stats["_equity_curve"]["Equity"].to_numpy(np.float64)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    return SymbolBacktest(
        symbol=symbol,
        bars=len(bars),
        final_equity=float(stats["Equity Final [$]"]),
        return_pct=float(stats["Return [%]"]),
        buy_hold_return_pct=float(stats["Buy & Hold Return [%]"]),
        sharpe=float(stats["Sharpe Ratio"]),
        max_drawdown_pct=float(stats["Max. Drawdown [%]"]),
        exposure_pct=float(stats["Exposure Time [%]"]),
        trades=int(stats["# Trades"]),
        win_rate_pct=float(stats["Win Rate [%]"]),
        time_ns=ts,
        equity=equity,
        buy_hold_equity=settings.cash * c / c[0],
        notes=notes,
    )


def backtest_decisions(
    records: npt.NDArray[Any],
    symbols: Sequence[str],
    decisions: dict[str, npt.NDArray[Any]],
    settings: BacktestSettings | None = None,
) -> tuple[SymbolBacktest, ...]:
    """One backtest per symbol with at least 2 bars, in ``symbols`` order.

    ``records``: the replayed bars (``BAR_DTYPE``); ``decisions``: arrays
    ``event_ns``, ``symbol_id``, ``stance`` (the replay's collected decisions).
    """
    out = []
    for sid, name in enumerate(symbols):
        mine = records[records["symbol_id"] == sid]
        if len(mine) < 2:
            continue
        sel = decisions["symbol_id"] == sid
        st = stance_per_bar(
            mine["timestamp_ns"], decisions["event_ns"][sel], decisions["stance"][sel]
        )
        out.append(backtest_symbol(name, mine, st, settings))
    return tuple(out)


def _pct(v: float, signed: bool = True) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:+.2f}%" if signed else f"{v:.1f}%"


def backtest_table(results: Sequence[SymbolBacktest], settings: BacktestSettings) -> str:
    """A fixed-width table of the per-symbol figures."""
    head = (
        f"{'symbol':<10} {'bars':>6} {'return':>9} {'buy&hold':>9} {'sharpe':>7} "
        f"{'max dd':>8} {'exposure':>8} {'trades':>6} {'win rate':>8} {'final equity':>13}"
    )
    lines = [
        f"backtest (backtesting.py; {settings.describe()}; a stance decided at a bar's close "
        "fills at the next bar's open)",
        head,
    ]
    for r in results:
        sharpe = "-" if math.isnan(r.sharpe) else f"{r.sharpe:.2f}"
        lines.append(
            f"{r.symbol:<10} {r.bars:>6,} {_pct(r.return_pct):>9} "
            f"{_pct(r.buy_hold_return_pct):>9} {sharpe:>7} {_pct(r.max_drawdown_pct):>8} "
            f"{_pct(r.exposure_pct, False):>8} {r.trades:>6,} "
            f"{_pct(r.win_rate_pct, False):>8} {r.final_equity:>13,.2f}"
        )
        lines += [f"  {r.symbol}: {n}" for n in r.notes]
    return "\n".join(lines)
