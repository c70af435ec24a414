"""Replay feeds: file formats, ordering without reordering, bad rows, package data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from setsuna.errors import BadValueError, DataFormatError, OutOfOrderError
from setsuna.market import BAR_DTYPE, BarBuilder, ReplayFeed, datasets, frame_to_records

H = 3_600_000_000_000


def frame(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    ts, sym, close = zip(*rows, strict=True)
    c = np.array(close)
    return pd.DataFrame(
        {"timestamp": np.array(ts, dtype=np.int64), "symbol": sym, "open": c, "high": c + 1,
         "low": c - 1, "close": c, "volume": np.full(len(c), 10.0)}
    )  # fmt: skip


def test_many_symbols_replay_in_time_order_each_in_its_own_order() -> None:
    df = frame([(3 * H, "B", 30), (1 * H, "A", 10), (2 * H, "A", 11), (1 * H, "B", 20)])
    with pytest.raises(OutOfOrderError, match="B"):  # B goes 3h -> 1h in file order
        ReplayFeed.from_frame(df)
    feed = ReplayFeed.from_frame(df, on_bad_rows="drop")
    assert feed.drops.out_of_order == 1
    rec = feed.records
    assert rec.dtype == BAR_DTYPE and feed.symbols == ("B", "A")
    assert rec["timestamp_ns"].tolist() == [1 * H, 2 * H, 3 * H]
    assert rec["close"].tolist() == [10, 11, 30]  # B's late 20 dropped, not moved
    assert [len(b) for b in feed.batches(2)] == [2, 1]


def test_equal_timestamps_across_symbols_keep_file_order() -> None:
    feed = ReplayFeed.from_frame(frame([(H, "B", 10), (H, "A", 20), (2 * H, "A", 30)]))
    assert feed.records["close"].tolist() == [10, 20, 30]


def test_duplicate_bar_is_refused_or_counted() -> None:
    df = frame([(H, "A", 10), (H, "A", 10)])
    with pytest.raises(OutOfOrderError, match="repeats"):
        frame_to_records(df)
    _, _, drops = frame_to_records(df, on_bad_rows="drop")
    assert drops.duplicate == 1


@pytest.mark.parametrize("column,value", [("close", np.nan), ("open", -1.0), ("volume", -5.0)])
def test_bad_rows_refused_or_counted(column: str, value: float) -> None:
    df = frame([(H, "A", 10), (2 * H, "A", 20)])
    df.loc[1, column] = value
    with pytest.raises(BadValueError, match="on_bad_rows='drop'"):
        frame_to_records(df)
    rec, _, drops = frame_to_records(df, on_bad_rows="drop")
    assert drops.bad_value == 1 and len(rec) == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_files_round_trip(tmp_path: Path, suffix: str) -> None:
    df = frame([(H, "A", 11.5), (H, "B", 12.5), (2 * H, "A", 13.5)])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    path = tmp_path / f"bars{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    feed = ReplayFeed.from_file(path)
    assert feed.records["timestamp_ns"].tolist() == [H, H, 2 * H]
    assert feed.records["close"].tolist() == [11.5, 12.5, 13.5]


def test_wrong_column_names_say_what_to_rename(tmp_path: Path) -> None:
    df = frame([(H, "A", 1)]).rename(columns={"close": "Close", "timestamp": "time"})
    path = tmp_path / "bars.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['timestamp', 'close'\]"):
        ReplayFeed.from_file(path)
    with pytest.raises(DataFormatError, match="unknown format"):
        ReplayFeed.from_file(path.rename(tmp_path / "bars.txt"))


@pytest.mark.parametrize("name,n_bars", [("eurusd", 5000), ("goog", 2148), ("sp500", 5031)])
def test_package_data_loads_as_bar_frames(name: str, n_bars: int) -> None:
    rec, symbols, drops = frame_to_records(datasets.load(name))
    assert len(rec) == n_bars and len(symbols) == 1 and drops.total == 0
    assert (np.diff(rec["timestamp_ns"]) > 0).all()


def test_synthetic_ticks_are_labelled_and_rebuild_the_bars() -> None:
    bars = datasets.eurusd().iloc[:48]
    ticks = datasets.synthetic_ticks(bars, bar_ns=H)
    assert len(ticks) == 4 * len(bars) and all(t.synthetic for t in ticks)
    builder = BarBuilder(bar_ns=H)
    rebuilt = [b for t in ticks for b in builder.add(t)] + builder.flush()
    assert len(rebuilt) == len(bars) and all(b.synthetic for b in rebuilt)
    got = np.array([[b.open, b.high, b.low, b.close, b.volume] for b in rebuilt])
    want = bars[["open", "high", "low", "close", "volume"]].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
