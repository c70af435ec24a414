"""FeatureEngine behaviour: bad input, snapshots, spec round trip, the features without a
TA-Lib twin (VWAP deviation, session time, quotes), and the CLI."""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from setsuna.cli import main
from setsuna.errors import (
    BadValueError,
    ConfigError,
    DataFormatError,
    OutOfOrderError,
    SnapshotError,
    UnknownSymbolError,
)
from setsuna.features import FeatureEngine, FeatureSpec, compute_features, default_spec
from setsuna.features._engine import SNAPSHOT_VERSION
from setsuna.market import BarRecords, datasets

from .conftest import bars

SPEC = default_spec()


def engine_after(n: int, *, on_bad_rows: str = "raise") -> tuple[FeatureEngine, BarRecords]:
    rec = bars(100 + np.arange(n + 3, dtype=np.float64))
    engine = FeatureEngine(SPEC, ["A", "B"], on_bad_rows=on_bad_rows)  # type: ignore[arg-type]
    engine.update(rec[:n])
    return engine, rec[n:]


@pytest.mark.parametrize(
    ("field", "value", "error", "reason"),
    [
        ("close", math.nan, BadValueError, "bad_value"),
        ("close", -1.0, BadValueError, "bad_value"),
        ("volume", -1.0, BadValueError, "bad_value"),
        ("volume", math.inf, BadValueError, "bad_value"),
        ("bid_size", -2.0, BadValueError, "bad_value"),
        ("timestamp_ns", 0, OutOfOrderError, "out_of_order"),
        ("timestamp_ns", None, OutOfOrderError, "duplicate"),  # None: the event before's
    ],
)
def test_bad_events_are_refused_atomically_or_dropped_and_counted(
    field: str, value: float | None, error: type[Exception], reason: str
) -> None:
    engine, nxt = engine_after(40)
    batch = nxt[:2].copy()
    batch[1][field] = batch[0]["timestamp_ns"] if value is None else value
    before = engine.snapshot()
    with pytest.raises(error, match=r"on_bad_rows='drop'.*nothing in this batch was applied"):
        engine.update(batch)
    assert engine.snapshot() == before  # the good first event was not applied either

    lenient, nxt = engine_after(40, on_bad_rows="drop")
    batch = nxt[:2].copy()
    batch[1][field] = batch[0]["timestamp_ns"] if value is None else value
    rows = lenient.update(batch)
    assert lenient.drops.as_dict()[reason] == 1 and lenient.drops.total == 1
    assert rows.ready[0].all() and not rows.ready[1].any() and np.isnan(rows.values[1]).all()
    assert lenient.bars_seen("A") == 41


def test_unknown_symbols_are_refused_even_when_dropping() -> None:
    engine, nxt = engine_after(5, on_bad_rows="drop")
    batch = nxt[:1].copy()
    batch["symbol_id"] = 2
    with pytest.raises(UnknownSymbolError, match="symbol_ids"):
        engine.update(batch)
    with pytest.raises(UnknownSymbolError, match="'C' is not one of"):
        engine.symbol_id("C")
    assert engine.symbol_ids(["B", "A"]).tolist() == [1, 0]


def test_wrong_event_dtype_and_out_shape() -> None:
    engine, nxt = engine_after(5)
    with pytest.raises(DataFormatError, match="BAR_DTYPE"):
        engine.update(np.zeros(3))
    with pytest.raises(ConfigError, match="float32"):
        engine.update(nxt[:1], out=np.empty((1, 3), np.float32), ready=np.empty((1, 3), bool))


def test_readonly_and_strided_events_take_the_checked_path() -> None:
    engine, nxt = engine_after(25)
    twin = FeatureEngine.restore(engine.snapshot())
    strided = np.repeat(nxt[:2], 2)[::2]  # the same two events, not contiguous
    readonly = nxt[:2].copy()
    readonly.flags.writeable = False
    a = engine.update(strided).values.copy()
    b = twin.update(readonly).values.copy()
    assert a.tobytes() == b.tobytes() and np.isfinite(a[:, :3]).all()


def test_snapshot_refuses_corrupt_foreign_or_future_bytes() -> None:
    engine, _ = engine_after(40)
    data = engine.snapshot()
    flipped = bytearray(data)
    flipped[-20] ^= 1
    with pytest.raises(SnapshotError, match="corrupt"):
        FeatureEngine.restore(bytes(flipped))
    with pytest.raises(SnapshotError, match="not a setsuna feature snapshot"):
        FeatureEngine.restore(b"PK\x03\x04" + data[4:])
    with pytest.raises(SnapshotError, match="truncated"):
        FeatureEngine.restore(data[:5])
    future = bytearray(data[:-4])
    struct.pack_into("<H", future, 12, SNAPSHOT_VERSION + 1)
    import zlib

    future += struct.pack("<I", zlib.crc32(bytes(future)))
    with pytest.raises(SnapshotError, match="replaying history"):
        FeatureEngine.restore(bytes(future))


def test_spec_round_trips_through_json_and_validates() -> None:
    spec = default_spec(session="TSE", quotes=True)
    text = spec.dumps()
    assert FeatureSpec.loads(text) == spec and FeatureSpec.loads(text).dumps() == text
    assert spec.to_schema().names == spec.names and spec.to_schema().n_features == 17
    with pytest.raises(ConfigError, match="unknown kind"):
        FeatureSpec.of(("x", "momentum", {}))
    with pytest.raises(ConfigError, match="fast_bars must be below"):
        FeatureSpec.of(("m", "macd_line", {"fast_bars": 30}))
    with pytest.raises(ConfigError, match="needs parameter 'window_bars'"):
        FeatureSpec.of(("r", "return", {}))
    with pytest.raises(ConfigError, match="duplicate feature names"):
        FeatureSpec.of(("r", "return", {"window_bars": 1}), ("r", "return", {"window_bars": 2}))
    with pytest.raises(ConfigError, match="unknown session"):
        default_spec(session="NYSE")
    with pytest.raises(ConfigError, match="format"):
        FeatureSpec.from_json({"features": []})


def test_shared_blocks_compute_once_and_agree() -> None:
    both = FeatureSpec.of(
        ("line", "macd_line", {}), ("hist", "macd_hist", {}), ("line2", "macd_line", {})
    )
    rec = bars(100 * np.exp(np.cumsum(np.sin(np.arange(80)) * 0.01)))
    (values, _), _ = compute_features(rec, ("x",), both)
    assert values[:, 0].tobytes() == values[:, 2].tobytes()
    assert np.isfinite(values[25:, 0]).all() and np.isfinite(values[33:, 1]).all()


def test_vwap_deviation_against_a_plain_reference() -> None:
    rec, _, _ = datasets_records()
    (values, ready), _ = compute_features(rec, ("x",), SPEC, dtype=np.float64)
    typical = (rec["high"] + rec["low"] + rec["close"]) / 3
    pv = pd.Series(typical * rec["volume"]).rolling(20).sum()
    vol = pd.Series(rec["volume"]).rolling(20).sum()
    want = rec["close"] / (pv / vol).to_numpy() - 1
    col = SPEC.names.index("vwap_dev_20")
    assert not ready[18, col] and ready[19:, col].all()
    np.testing.assert_allclose(values[19:, col], want[19:], rtol=0, atol=1e-12)


def datasets_records() -> tuple[BarRecords, tuple[str, ...], object]:
    from setsuna.market import frame_to_records

    return frame_to_records(datasets.goog().iloc[:400])


def test_vwap_not_ready_without_volume_and_uses_bar_vwap() -> None:
    spec = FeatureSpec.of(("v", "vwap_dev", {"window_bars": 2}))
    rec = bars(np.array([100.0, 101, 102, 103]))
    rec["volume"] = [0, 0, 5, 0]
    rec["vwap"] = [np.nan, np.nan, 99.0, np.nan]
    (values, ready), _ = compute_features(rec, ("x",), spec, dtype=np.float64)
    assert ready[:, 0].tolist() == [False, False, True, True]
    assert values[2, 0] == pytest.approx(102 / 99 - 1) and values[3, 0] == pytest.approx(
        103 / 99 - 1
    )


def test_time_in_session_and_quote_features() -> None:
    spec = FeatureSpec.of(
        ("t", "time_in_session", {"session": "TSE"}),
        ("s", "spread", {}),
        ("q", "quote_imbalance", {}),
    )
    tokyo = ZoneInfo("Asia/Tokyo")
    ts = [int(datetime(2024, 3, 5, h, m, tzinfo=tokyo).timestamp()) * 10**9 for h, m in
          [(9, 0), (10, 15), (12, 0), (14, 0), (15, 45)]]  # fmt: skip
    rec = bars(np.full(5, 100.0))
    rec["timestamp_ns"] = ts
    rec["bid"], rec["ask"] = 99.0, 101.0
    rec["bid_size"], rec["ask_size"] = [3.0, 1.0, 0.0, np.nan, 2.0], [1.0, 1.0, 0.0, 1.0, 2.0]
    rec["bid"][4] = np.nan
    (values, ready), _ = compute_features(rec, ("x",), spec, dtype=np.float64)
    np.testing.assert_allclose(values[:, 0], [0, 75 / 330, 150 / 330, 240 / 330, 1.0])
    assert values[0, 1] == pytest.approx(0.02) and ready[:4, 1].all() and not ready[4, 1]
    assert values[:2, 2].tolist() == [0.5, 0.0] and ready[:, 2].tolist() == [
        True, True, False, False, True
    ]  # fmt: skip


def test_cli_writes_features_and_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bars.csv"
    frame = pd.concat([datasets.goog().iloc[:120], datasets.sp500().iloc[:100]])
    frame.to_csv(data, index=False)
    out = tmp_path / "features.parquet"
    assert main(["features", "--data", str(data), "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 220 and list(table.columns[2:-1]) == list(SPEC.names)
    assert table["timestamp"].is_monotonic_increasing
    spec = FeatureSpec.from_json(json.loads(out.with_suffix(".spec.json").read_text()))
    assert spec == SPEC
    rec, symbols, _ = __import__("setsuna.market", fromlist=["x"]).frame_to_records(frame)
    (values, _), _ = compute_features(rec, symbols, SPEC)
    assert table[list(SPEC.names)].to_numpy().tobytes() == values.tobytes()

    frame.rename(columns={"close": "Close"}).to_csv(data, index=False)
    assert main(["features", "--data", str(data), "--out", str(out)]) == 2
    assert "missing column(s) ['close']" in capsys.readouterr().err
