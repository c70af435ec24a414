"""Ticks and bars: one typed object for a single event, one dtype for bulk.

A :class:`Tick` or :class:`Bar` is what a caller handles one at a time (a
slots dataclass: small, typed, immutable). Anything that moves in bulk (a
replayed file, a batch for the feature engine) is a numpy structured array of
:data:`BAR_DTYPE`, so a whole batch crosses into compiled code as one buffer.
Quotes are optional everywhere: NaN in a record, ``None`` on an object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from setsuna.errors import BadValueError, UnknownSymbolError

#: One bar per row, the unit the feature engine consumes. ``timestamp_ns`` is
#: the bar's open time (UTC ns since the epoch), as OHLCV files label bars;
#: ``vwap`` NaN means "unknown" (the engine then uses the typical price);
#: quote fields NaN mean "no quote".
BAR_DTYPE = np.dtype(
    [
        ("symbol_id", np.int64),
        ("timestamp_ns", np.int64),
        ("open", np.float64),
        ("high", np.float64),
        ("low", np.float64),
        ("close", np.float64),
        ("volume", np.float64),
        ("vwap", np.float64),
        ("tick_count", np.int64),
        ("bid", np.float64),
        ("ask", np.float64),
        ("bid_size", np.float64),
        ("ask_size", np.float64),
    ]
)

BarRecords = npt.NDArray[np.void]


def _finite_nonneg(name: str, value: float, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "a finite positive number" if positive else "a finite number >= 0"
        raise BadValueError(
            f"{name}={value!r}: must be {need}; drop or repair the record before passing it on"
        )


@dataclass(frozen=True, slots=True)
class Tick:
    """One trade (and optionally the quote at that moment) for one symbol.

    ``synthetic`` marks ticks derived from bars rather than observed: no data
    package ships real ticks, and a backtest must be able to tell.
    """

    symbol: str
    timestamp_ns: int
    price: float
    size: float
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    synthetic: bool = False

    def validate(self) -> None:
        """Raise :class:`BadValueError` on NaN/inf or negative price, size or quote."""
        _finite_nonneg("price", self.price, positive=True)
        _finite_nonneg("size", self.size)
        for name in ("bid", "ask"):
            value = getattr(self, name)
            if value is not None:
                _finite_nonneg(name, value, positive=True)
        for name in ("bid_size", "ask_size"):
            value = getattr(self, name)
            if value is not None:
                _finite_nonneg(name, value)


@dataclass(frozen=True, slots=True)
class Bar:
    """OHLCV over ``[start_ns, end_ns)`` with its VWAP, tick count and last quote."""

    symbol: str
    start_ns: int
    end_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    vwap: float
    tick_count: int
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    synthetic: bool = False


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def bars_to_records(bars: Sequence[Bar], symbol_ids: dict[str, int]) -> BarRecords:
    """Pack bars into a :data:`BAR_DTYPE` array; symbols are mapped through ``symbol_ids``.

    Meant for the edges (a few forming bars to peek, tests); bulk data should
    arrive as arrays from a feed, not as objects.
    """
    out = np.empty(len(bars), dtype=BAR_DTYPE)
    for i, bar in enumerate(bars):
        try:
            sid = symbol_ids[bar.symbol]
        except KeyError:
            raise UnknownSymbolError(
                f"symbol {bar.symbol!r} is not configured; add it to the engine's symbols"
            ) from None
        out[i] = (
            sid,
            bar.start_ns,
            bar.open,
            bar.high,
            bar.low,
            bar.close,
            bar.volume,
            bar.vwap,
            bar.tick_count,
            _or_nan(bar.bid),
            _or_nan(bar.ask),
            _or_nan(bar.bid_size),
            _or_nan(bar.ask_size),
        )
    return out


def empty_records(n: int) -> BarRecords:
    """``n`` bar records with vwap and quotes NaN (unknown), the rest zero."""
    out = np.zeros(n, dtype=BAR_DTYPE)
    for name in ("vwap", "bid", "ask", "bid_size", "ask_size"):
        out[name] = np.nan
    return out
