"""Real series (from packages, never copied here) and small helpers for the feature tests."""

from __future__ import annotations

import numpy as np
import pytest

from setsuna.market import BarRecords, datasets, empty_records, frame_to_records


@pytest.fixture(scope="session", params=["eurusd", "sp500", "goog"])
def real(request: pytest.FixtureRequest) -> BarRecords:
    """One real OHLCV series as bar records: EURUSD hourly, S&P 500 daily, GOOG daily."""
    records, _, _ = frame_to_records(datasets.load(request.param))
    return records


def bars(close: np.ndarray, *, symbol_id: int = 0, start_ns: int = 0) -> BarRecords:
    """Records for a close path (high/low 0.1 % around it, volume 100), one hour apart."""
    rec = empty_records(len(close))
    rec["symbol_id"] = symbol_id
    rec["timestamp_ns"] = start_ns + np.arange(len(close), dtype=np.int64) * 3_600_000_000_000
    rec["open"] = close
    rec["close"] = close
    rec["high"] = close * 1.001
    rec["low"] = close * 0.999
    rec["volume"] = 100.0
    return rec
