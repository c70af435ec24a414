"""Feature-engine cost per symbol-update beside talib.stream, on the same real data.

    .venv/bin/python perf/features.py [--bars 2000] [--symbols 1000] [--repeats 5]

(a) one symbol, one Python call per bar (``FeatureEngine.update`` of one
record); (b) ``--symbols`` symbols, one batched call per bar time. Beside
each, TA-Lib's O(1) stream handles (ta-lib 0.8 ``talib.stream``: ``update``
per bar) computing the TA-Lib-covered part of the default set on the same
bars. Input: EURUSD hourly from ``backtesting`` (each extra symbol is the
same path scaled, so every symbol does real work). Figures are the median of
``--repeats`` timed passes; targets are printed PASS/MISS.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import talib
from talib import stream

from setsuna.features import FeatureEngine, default_spec
from setsuna.market import BarRecords, datasets, frame_to_records

WARMUP_BARS = 60
TARGET_BATCHED_US = 0.3
TARGET_SINGLE_US = 2.0
TARGET_RATIO = 10.0


def median_us(fn: Callable[[], int], repeats: int) -> float:
    """Median over ``repeats`` passes of (seconds / updates) in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


class TalibStreams:
    """The default set's TA-Lib-covered features as talib.stream handles, one symbol."""

    def __init__(self, r: BarRecords) -> None:
        h, lo, c, v = (np.ascontiguousarray(r[k]) for k in ("high", "low", "close", "volume"))
        log_ret = np.log(c[1:] / c[:-1])
        pv = (h + lo + c) / 3 * v
        self.prev = float(c[-1])
        self.on_close: list[Any] = [stream.ROCR(c, timeperiod=p) for p in (1, 5, 20)] + [
            stream.SMA(c, timeperiod=20),
            stream.EMA(c, timeperiod=20),
            stream.RSI(c, timeperiod=14),
            stream.MACD(c, fastperiod=12, slowperiod=26, signalperiod=9),
            stream.BBANDS(c, timeperiod=20, nbdevup=2.0, nbdevdn=2.0),
        ]
        self.atr: Any = stream.ATR(h, lo, c, timeperiod=14)
        self.rvol: Any = stream.STDDEV(log_ret, timeperiod=20)
        self.vol: list[Any] = [stream.SMA(v, timeperiod=20), stream.STDDEV(v, timeperiod=20)]
        self.vwap: list[Any] = [stream.SMA(pv, timeperiod=20), stream.SMA(v, timeperiod=20)]

    def update(self, high: float, low: float, close: float, volume: float) -> None:
        for handle in self.on_close:
            handle.update(close)
        self.atr.update(high, low, close)
        self.rvol.update(math.log(close / self.prev))
        self.prev = close
        for handle in self.vol:
            handle.update(volume)
        pv = (high + low + close) / 3 * volume
        self.vwap[0].update(pv)
        self.vwap[1].update(volume)


def scaled(records: BarRecords, n_symbols: int) -> list[BarRecords]:
    """One batch per bar time: ``n_symbols`` copies of the bar, prices scaled per symbol."""
    factor = 1.0 + 0.001 * np.arange(n_symbols)
    batches = []
    for row in records:
        batch = np.repeat(row[np.newaxis], n_symbols)
        batch["symbol_id"] = np.arange(n_symbols)
        for name in ("open", "high", "low", "close"):
            batch[name] = batch[name] * factor
        batches.append(batch)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=2000, help="timed bars per pass")
    parser.add_argument("--symbols", type=int, default=1000, help="symbols in the batched case")
    parser.add_argument("--talib-symbols", type=int, default=50, help="symbols timed for talib")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    records, _, _ = frame_to_records(datasets.eurusd())
    warm, timed = records[:WARMUP_BARS], records[WARMUP_BARS : WARMUP_BARS + args.bars]
    spec = default_spec()
    print(f"talib {talib.__version__}; {len(spec)} features; EURUSD hourly, {len(timed)} bars")

    # (a) one symbol, one call per bar.
    rows = [timed[i : i + 1].copy() for i in range(len(timed))]
    warm_rows = warm.copy()

    def single() -> int:
        engine = FeatureEngine(spec, ["EURUSD"])
        engine.update(warm_rows)
        for row in rows:
            engine.update(row)
        return len(rows)

    hlcv = [
        (float(b["high"]), float(b["low"]), float(b["close"]), float(b["volume"])) for b in timed
    ]

    def talib_single() -> int:
        handles = TalibStreams(warm)
        for bar in hlcv:
            handles.update(*bar)
        return len(hlcv)

    single()  # compile / warm caches
    single_us = median_us(single, args.repeats)
    talib_us = median_us(talib_single, args.repeats)

    # (b) many symbols, one batched call per bar time.
    n_batched_bars = min(len(timed), 300)
    batches = scaled(timed[:n_batched_bars], args.symbols)
    warm_batches = scaled(warm, args.symbols)

    def batched_us_once() -> float:
        engine = FeatureEngine(spec, [f"S{i}" for i in range(args.symbols)], max_batch=args.symbols)
        for batch in warm_batches:
            engine.update(batch)
        start = time.perf_counter()
        for batch in batches:
            engine.update(batch)
        return float((time.perf_counter() - start) / (len(batches) * args.symbols) * 1e6)

    batched_us_once()
    batched_us = statistics.median(batched_us_once() for _ in range(args.repeats))

    # talib.stream has no batch form: one handle set per symbol, one update per bar,
    # fed Python floats prepared outside the timed loop.
    n_talib = args.talib_symbols
    talib_warm = scaled(warm, n_talib)
    talib_bars = [
        [(float(b["high"]), float(b["low"]), float(b["close"]), float(b["volume"])) for b in batch]
        for batch in scaled(timed[:n_batched_bars], n_talib)
    ]

    def talib_many_us_once() -> float:
        handles = [
            TalibStreams(np.concatenate([b[s : s + 1] for b in talib_warm])) for s in range(n_talib)
        ]
        start = time.perf_counter()
        for bars_at_t in talib_bars:
            for handle, bar in zip(handles, bars_at_t, strict=True):
                handle.update(*bar)
        return float((time.perf_counter() - start) / (len(talib_bars) * n_talib) * 1e6)

    talib_many_us = statistics.median(talib_many_us_once() for _ in range(args.repeats))

    print()
    print(f"{'case':44s} {'setsuna us':>11s} {'talib.stream us':>16s} {'ratio':>7s}")
    print(
        f"{'(a) 1 symbol, 1 call per bar':44s} {single_us:11.3f} {talib_us:16.3f} "
        f"{talib_us / single_us:6.1f}x"
    )
    print(
        f"{f'(b) {args.symbols} symbols batched (talib: {args.talib_symbols})':44s} "
        f"{batched_us:11.3f} {talib_many_us:16.3f} {talib_many_us / batched_us:6.1f}x"
    )
    print()
    ratio = talib_many_us / batched_us
    report(batched_us <= TARGET_BATCHED_US, f"batched <= {TARGET_BATCHED_US} us", batched_us)
    report(ratio >= TARGET_RATIO, f"batched >= {TARGET_RATIO:.0f}x talib.stream", ratio, "x")
    report(single_us <= TARGET_SINGLE_US, f"single call <= {TARGET_SINGLE_US} us", single_us)


def report(ok: bool, target: str, value: float, unit: str = " us") -> None:
    print(f"{'PASS' if ok else 'MISS'}  {target:34s} {value:.3f}{unit}")


if __name__ == "__main__":
    main()
