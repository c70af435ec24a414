"""Ticks to bars, one symbol's forming bar visible at any time.

Time bars are aligned to the session's window open (so a 30-minute TSE bar
runs 09:00-09:30, and the 11:00 bar ends at 11:30, not across lunch) and
closed when a tick of a later bucket arrives, on :meth:`BarBuilder.close_until`
(the clock moved on) or :meth:`BarBuilder.flush`. Tick-count bars close after
``ticks_per_bar`` ticks or at a window boundary. A bucket without ticks makes
no bar. This is per-tick Python: it sits at the edge, where ticks arrive one
by one; everything downstream is batched arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from setsuna.errors import (
    BadValueError,
    ConfigError,
    MarketDataError,
    OutOfOrderError,
    UnknownSymbolError,
)
from setsuna.market._bad_rows import DropCounts, OnBadRows, check_on_bad_rows
from setsuna.market._records import Bar, Tick
from setsuna.market._sessions import FX24, TradingSession


class _Forming:
    """Mutable running state of one symbol's open bar."""

    __slots__ = (
        "ask",
        "ask_size",
        "bid",
        "bid_size",
        "close",
        "end_ns",
        "high",
        "last_ns",
        "low",
        "notional",
        "open",
        "start_ns",
        "synthetic",
        "tick_count",
        "volume",
        "window_end_ns",
    )

    def __init__(self, tick: Tick, start_ns: int, end_ns: int, window_end_ns: int) -> None:
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.window_end_ns = window_end_ns
        self.open = self.high = self.low = self.close = tick.price
        self.volume = 0.0
        self.notional = 0.0
        self.tick_count = 0
        self.last_ns = tick.timestamp_ns
        self.synthetic = tick.synthetic
        self.bid: float | None = None
        self.ask: float | None = None
        self.bid_size: float | None = None
        self.ask_size: float | None = None
        self.add(tick)

    def add(self, tick: Tick) -> None:
        price = tick.price
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.close = price
        self.volume += tick.size
        self.notional += price * tick.size
        self.tick_count += 1
        self.last_ns = tick.timestamp_ns
        self.synthetic = self.synthetic or tick.synthetic
        if tick.bid is not None or tick.ask is not None:
            self.bid, self.ask = tick.bid, tick.ask
            self.bid_size, self.ask_size = tick.bid_size, tick.ask_size

    def to_bar(self, symbol: str, end_ns: int) -> Bar:
        # Zero-size ticks (quotes-only feeds) leave the VWAP undefined: NaN,
        # which the feature engine reads as "use the typical price".
        vwap = self.notional / self.volume if self.volume > 0 else math.nan
        return Bar(
            symbol,
            self.start_ns,
            end_ns,
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
            vwap,
            self.tick_count,
            self.bid,
            self.ask,
            self.bid_size,
            self.ask_size,
            self.synthetic,
        )


class BarBuilder:
    """Build time bars (``bar_ns``) or tick-count bars (``ticks_per_bar``) for many symbols.

    ``symbols``, when given, is the closed set of accepted symbols (anything
    else raises :class:`UnknownSymbolError`). ``on_bad_rows`` decides what a bad
    value, a timestamp going backwards or an exact duplicate tick does:
    raise, or be dropped and counted in :attr:`drops`. Ticks outside the
    session are always dropped and counted.
    """

    def __init__(
        self,
        *,
        bar_ns: int | None = None,
        ticks_per_bar: int | None = None,
        session: TradingSession = FX24,
        symbols: Iterable[str] | None = None,
        on_bad_rows: OnBadRows = "raise",
    ) -> None:
        if (bar_ns is None) == (ticks_per_bar is None):
            raise ConfigError("give exactly one of bar_ns (time bars) or ticks_per_bar")
        if bar_ns is not None and bar_ns <= 0:
            raise ConfigError(f"bar_ns must be positive, got {bar_ns}")
        if ticks_per_bar is not None and ticks_per_bar <= 0:
            raise ConfigError(f"ticks_per_bar must be positive, got {ticks_per_bar}")
        self.bar_ns = bar_ns
        self.ticks_per_bar = ticks_per_bar
        self.session = session
        self.on_bad_rows = check_on_bad_rows(on_bad_rows)
        self.symbols = frozenset(symbols) if symbols is not None else None
        self.drops = DropCounts()
        self._forming: dict[str, _Forming] = {}
        self._last: dict[str, Tick] = {}

    def forming(self, symbol: str) -> Bar | None:
        """The bar still open for ``symbol`` (its end is the bucket end), or None."""
        state = self._forming.get(symbol)
        return None if state is None else state.to_bar(symbol, state.end_ns)

    def add(self, tick: Tick) -> list[Bar]:
        """Feed one tick; return the bars it completed (zero or one)."""
        if self.symbols is not None and tick.symbol not in self.symbols:
            raise UnknownSymbolError(
                f"tick for unknown symbol {tick.symbol!r}; pass it in BarBuilder(symbols=...)"
            )
        if not self._accept(tick):
            return []
        window = self.session.window_of(tick.timestamp_ns)
        if window is None:
            self.drops.outside_session += 1
            return []
        self._last[tick.symbol] = tick
        completed: list[Bar] = []
        state = self._forming.get(tick.symbol)
        if state is not None and tick.timestamp_ns >= state.end_ns:
            completed.append(self._complete(tick.symbol, state))
            state = None
        if state is None:
            start, end = self._bucket(tick.timestamp_ns, window)
            self._forming[tick.symbol] = _Forming(tick, start, end, window[1])
        else:
            state.add(tick)
            if self.ticks_per_bar is not None and state.tick_count >= self.ticks_per_bar:
                completed.append(self._complete(tick.symbol, state))
        return completed

    def close_until(self, timestamp_ns: int) -> list[Bar]:
        """Complete every forming bar whose end is at or before ``timestamp_ns`` (clock tick)."""
        done = [s for s, f in self._forming.items() if f.end_ns <= timestamp_ns]
        return [self._complete(s, self._forming[s]) for s in sorted(done)]

    def flush(self) -> list[Bar]:
        """Complete every forming bar now (end of replay)."""
        return [self._complete(s, self._forming[s]) for s in sorted(self._forming)]

    def _complete(self, symbol: str, state: _Forming) -> Bar:
        del self._forming[symbol]
        end = state.end_ns if self.bar_ns is not None else state.last_ns + 1
        return state.to_bar(symbol, end)

    def _bucket(self, timestamp_ns: int, window: tuple[int, int]) -> tuple[int, int]:
        window_start, window_end = window
        if self.bar_ns is None:  # tick bars: open until full or the window ends
            return timestamp_ns, window_end
        start = window_start + (timestamp_ns - window_start) // self.bar_ns * self.bar_ns
        return start, min(start + self.bar_ns, window_end)

    def _accept(self, tick: Tick) -> bool:
        problem = self._problem(tick)
        if problem is None:
            return True
        reason, error = problem
        if self.on_bad_rows == "raise":
            raise error
        setattr(self.drops, reason, getattr(self.drops, reason) + 1)
        return False

    def _problem(self, tick: Tick) -> tuple[str, MarketDataError] | None:
        try:
            tick.validate()
        except BadValueError as exc:
            return "bad_value", exc
        last = self._last.get(tick.symbol)
        if last is None:
            return None
        if tick.timestamp_ns < last.timestamp_ns:
            return "out_of_order", OutOfOrderError(
                f"{tick.symbol}: tick at {tick.timestamp_ns} ns is before the last accepted "
                f"one at {last.timestamp_ns} ns; setsuna never reorders: sort the source "
                "or use on_bad_rows='drop'"
            )
        if tick == last:
            return "duplicate", OutOfOrderError(
                f"{tick.symbol}: exact duplicate tick at {tick.timestamp_ns} ns; "
                "de-duplicate the source or use on_bad_rows='drop'"
            )
        return None
