"""Replaying bar files and frames: many symbols, one timestamp-ordered stream.

A file or frame is checked once, as arrays: the required columns exist,
prices are finite and positive, and each symbol's timestamps strictly
increase in file order. A row breaking that is refused or dropped and
counted (``on_bad_rows``); it is never moved. Rows of different symbols are then
interleaved by a stable sort on the timestamp, which keeps each symbol's own
order, so the replay is what a live feed would have delivered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from setsuna.errors import BadValueError, ConfigError, DataFormatError, OutOfOrderError
from setsuna.market._bad_rows import DropCounts, OnBadRows, check_on_bad_rows
from setsuna.market._records import BarRecords, empty_records

if TYPE_CHECKING:
    import pandas as pd

#: Columns every bar file or frame must have (timestamp = bar open time).
REQUIRED_COLUMNS = ("timestamp", "symbol", "open", "high", "low", "close", "volume")
#: Columns used when present: a bar's own VWAP and tick count, and its closing quote.
OPTIONAL_COLUMNS = ("vwap", "tick_count", "bid", "ask", "bid_size", "ask_size")


class Feed(Protocol):
    """Anything that yields bars of known symbols in timestamp order, in batches."""

    @property
    def symbols(self) -> tuple[str, ...]:
        """Symbol names; a record's ``symbol_id`` indexes this tuple."""
        ...

    def batches(self, max_rows: int) -> Iterator[BarRecords]:
        """Consecutive :data:`BAR_DTYPE` arrays of at most ``max_rows`` rows."""
        ...


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - the features extra brings it
        raise ConfigError(
            "reading bar files needs pandas: pip install 'setsuna[features]'"
        ) from exc
    return pd


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet bar file as a frame (no validation yet)."""
    pd = _pandas()
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file; pass an existing .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise DataFormatError(f"{path}: unknown format {suffix!r}; use .csv or .parquet")


def timestamps_ns(column: pd.Series) -> npt.NDArray[np.int64]:
    """UTC ns since the epoch from datetimes (naive = UTC), integers (ns) or ISO strings."""
    pd = _pandas()
    if pd.api.types.is_integer_dtype(column.dtype):
        return np.asarray(column.to_numpy(dtype=np.int64), dtype=np.int64)
    try:
        parsed = pd.to_datetime(column, utc=True)
    except (ValueError, TypeError) as exc:
        raise DataFormatError(
            f"column 'timestamp' cannot be parsed as times ({exc}); use ISO-8601 strings, "
            "datetimes or integer ns since the epoch"
        ) from exc
    naive_utc = parsed.dt.tz_localize(None).dt.as_unit("ns")
    return np.array(naive_utc.to_numpy(dtype="datetime64[ns]").view(np.int64), dtype=np.int64)


def _float_column(frame: pd.DataFrame, name: str) -> npt.NDArray[np.float64]:
    try:
        return np.asarray(frame[name].to_numpy(dtype=np.float64, na_value=np.nan), np.float64)
    except (ValueError, TypeError) as exc:
        raise DataFormatError(f"column {name!r} is not numeric: {exc}") from exc


def _bad_rows(rec: BarRecords) -> npt.NDArray[np.bool_]:
    prices = np.stack([rec[n] for n in ("open", "high", "low", "close")])
    bad = ~(np.isfinite(prices) & (prices > 0)).all(axis=0)
    bad |= ~(np.isfinite(rec["volume"]) & (rec["volume"] >= 0))
    bad |= rec["high"] < rec["low"]
    for name, positive in (("vwap", True), ("bid", True), ("ask", True)):
        v = rec[name]
        bad |= ~np.isnan(v) & ~(np.isfinite(v) & ((v > 0) if positive else (v >= 0)))
    for name in ("bid_size", "ask_size"):
        v = rec[name]
        bad |= ~np.isnan(v) & ~(np.isfinite(v) & (v >= 0))
    return np.asarray(bad, dtype=np.bool_)


def _order_problems(
    symbol_id: npt.NDArray[np.int64], ts: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(out_of_order, duplicate) masks: a row is late if its timestamp is below, and a
    duplicate if equal to, the latest earlier timestamp of its symbol."""
    pd = _pandas()
    series = pd.Series(ts)
    prev_max = series.groupby(symbol_id).cummax().groupby(symbol_id).shift(1)
    prev = prev_max.to_numpy(dtype=np.float64, na_value=np.nan)
    has_prev = ~np.isnan(prev)
    # Compare as int64: ns timestamps exceed float64's exact integer range.
    prev_int = np.where(has_prev, prev_max.fillna(0).to_numpy(dtype=np.int64), 0)
    late = has_prev & (ts < prev_int)
    dup = has_prev & (ts == prev_int)
    return late, dup


def frame_to_records(
    frame: pd.DataFrame, *, on_bad_rows: OnBadRows = "raise"
) -> tuple[BarRecords, tuple[str, ...], DropCounts]:
    """Validate a bar frame and return (records in replay order, symbols, drops)."""
    on_bad_rows = check_on_bad_rows(on_bad_rows)
    columns = {str(c) for c in frame.columns}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataFormatError(
            f"missing column(s) {missing}; a bar file needs {list(REQUIRED_COLUMNS)} "
            f"(found {sorted(columns)}): rename the columns before loading"
        )
    symbol_names = frame["symbol"].astype(str).to_numpy()
    symbols, first = np.unique(symbol_names, return_index=True)
    ordered = tuple(str(s) for s in symbols[np.argsort(first)])
    index = {s: i for i, s in enumerate(ordered)}
    rec = empty_records(len(frame))
    rec["symbol_id"] = np.fromiter((index[s] for s in symbol_names), np.int64, len(frame))
    rec["timestamp_ns"] = timestamps_ns(frame["timestamp"])
    for name in ("open", "high", "low", "close", "volume", "vwap", "bid", "ask"):
        if name in columns:
            rec[name] = _float_column(frame, name)
    for name in ("bid_size", "ask_size"):
        if name in columns:
            rec[name] = _float_column(frame, name)
    if "tick_count" in columns:
        rec["tick_count"] = frame["tick_count"].to_numpy(dtype=np.int64)

    drops = DropCounts()
    bad = _bad_rows(rec)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        if on_bad_rows == "raise":
            raise BadValueError(
                f"row {row} ({ordered[rec['symbol_id'][row]]}): NaN, negative or "
                "inconsistent price/volume; clean the file or load with on_bad_rows='drop'"
            )
        drops.bad_value += int(bad.sum())
        rec = rec[~bad]
    late, dup = _order_problems(rec["symbol_id"], rec["timestamp_ns"])
    if (late | dup).any():
        row = int(np.flatnonzero(late | dup)[0])
        if on_bad_rows == "raise":
            what = "goes backwards" if late[row] else "repeats"
            raise OutOfOrderError(
                f"{ordered[rec['symbol_id'][row]]}: timestamp {rec['timestamp_ns'][row]} ns "
                f"{what} (row {row} after filtering); setsuna never reorders a symbol's "
                "rows: sort the file or load with on_bad_rows='drop'"
            )
        drops.out_of_order += int(late.sum())
        drops.duplicate += int(dup.sum())
        rec = rec[~(late | dup)]
    order = np.argsort(rec["timestamp_ns"], kind="stable")
    return np.ascontiguousarray(rec[order]), ordered, drops


class ReplayFeed:
    """Bars of many symbols from a file or frame, replayed in timestamp order."""

    def __init__(self, records: BarRecords, symbols: Sequence[str], drops: DropCounts) -> None:
        self._records = records
        self._symbols = tuple(symbols)
        self.drops = drops

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, on_bad_rows: OnBadRows = "raise") -> ReplayFeed:
        return cls(*frame_to_records(frame, on_bad_rows=on_bad_rows))

    @classmethod
    def from_file(cls, path: str | Path, *, on_bad_rows: OnBadRows = "raise") -> ReplayFeed:
        return cls.from_frame(read_frame(path), on_bad_rows=on_bad_rows)

    @property
    def symbols(self) -> tuple[str, ...]:
        return self._symbols

    @property
    def records(self) -> BarRecords:
        """All bars in replay order (read-only view)."""
        view = self._records.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._records)

    def batches(self, max_rows: int) -> Iterator[BarRecords]:
        if max_rows <= 0:
            raise ConfigError(f"max_rows must be positive, got {max_rows}")
        for start in range(0, len(self._records), max_rows):
            yield self._records[start : start + max_rows]
