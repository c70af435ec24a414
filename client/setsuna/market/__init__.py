"""Market data: ticks and bars, trading sessions, bar building and replay feeds.

Everything a feature engine consumes arrives as :data:`BAR_DTYPE` arrays;
:class:`Tick` and :class:`Bar` are the one-at-a-time forms at the edges.
Real data sets that packages ship live in :mod:`setsuna.market.datasets`.
"""

from setsuna.market import datasets
from setsuna.market._bad_rows import DropCounts, OnBadRows
from setsuna.market._bars import BarBuilder
from setsuna.market._feed import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Feed,
    ReplayFeed,
    frame_to_records,
    read_frame,
)
from setsuna.market._records import BAR_DTYPE, Bar, BarRecords, Tick, bars_to_records, empty_records
from setsuna.market._sessions import FX24, SESSIONS, TSE, TradingSession, get_session

__all__ = [
    "BAR_DTYPE",
    "FX24",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SESSIONS",
    "TSE",
    "Bar",
    "BarBuilder",
    "BarRecords",
    "DropCounts",
    "Feed",
    "OnBadRows",
    "ReplayFeed",
    "Tick",
    "TradingSession",
    "bars_to_records",
    "datasets",
    "empty_records",
    "frame_to_records",
    "get_session",
    "read_frame",
]
