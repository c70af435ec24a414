"""Properties of the engine on drawn price paths: the online/offline, snapshot, peek
and cross-symbol-order contracts, each compared byte for byte."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from setsuna.features import FeatureEngine, compute_features, default_spec
from setsuna.market import BarRecords

from .conftest import bars

SPEC = default_spec(session="TSE", quotes=True)
SYMBOLS = ("A", "B", "C")


@st.composite
def histories(draw: st.DrawFn) -> BarRecords:
    """2-3 symbols, 1-80 bars each, log-normal walks with flat stretches, some quotes."""
    parts = []
    for sid in range(draw(st.integers(2, 3))):
        n = draw(st.integers(1, 80))
        steps = draw(
            st.lists(st.sampled_from([0.0, 0.0, 0.01, -0.01, 0.03, -0.02]), min_size=n, max_size=n)
        )
        rec = bars(100.0 * np.exp(np.cumsum(steps)), symbol_id=sid, start_ns=sid * 7)
        rec["volume"] = draw(
            st.lists(st.sampled_from([0.0, 5.0, 100.0, 1e6]), min_size=n, max_size=n)
        )
        if draw(st.booleans()):
            rec["bid"] = rec["close"] * 0.9995
            rec["ask"] = rec["close"] * 1.0005
            rec["bid_size"] = 3.0
            rec["ask_size"] = 1.0
        parts.append(rec)
    merged = np.concatenate(parts)
    return merged[np.argsort(merged["timestamp_ns"], kind="stable")]  # fmt: skip


def offline(records: BarRecords) -> tuple[bytes, bytes]:
    (values, ready), _ = compute_features(records, SYMBOLS, SPEC)
    return values.tobytes(), ready.tobytes()


def by_symbol(records: BarRecords, values: np.ndarray) -> dict[int, bytes]:
    return {s: values[records["symbol_id"] == s].tobytes() for s in range(len(SYMBOLS))}


@settings(max_examples=40, deadline=None)
@given(histories(), st.lists(st.integers(1, 7), min_size=1, max_size=40))
def test_online_in_any_chunks_equals_offline(records: BarRecords, chunks: list[int]) -> None:
    engine = FeatureEngine(SPEC, SYMBOLS)
    values, ready = [], []
    start, i = 0, 0
    while start < len(records):
        size = chunks[i % len(chunks)]
        rows = engine.update(records[start : start + size])
        values.append(rows.values.copy())
        ready.append(rows.ready.copy())
        start += size
        i += 1
    assert (np.concatenate(values).tobytes(), np.concatenate(ready).tobytes()) == offline(records)


@settings(max_examples=40, deadline=None)
@given(histories(), st.integers(0, 200))
def test_snapshot_restore_continues_bit_identically(records: BarRecords, cut: int) -> None:
    cut = min(cut, len(records))
    engine = FeatureEngine(SPEC, SYMBOLS)
    engine.update(records[:cut])
    restored = FeatureEngine.restore(engine.snapshot())
    assert restored.state_equal(engine) and restored.snapshot() == engine.snapshot()
    if cut < len(records):
        a = engine.update(records[cut:])
        b = restored.update(records[cut:])
        assert a.values.tobytes() == b.values.tobytes()
        assert a.ready.tobytes() == b.ready.tobytes()


@settings(max_examples=40, deadline=None)
@given(histories(), st.integers(0, 200))
def test_peek_never_changes_committed_state(records: BarRecords, cut: int) -> None:
    cut = min(cut, len(records) - 1)
    engine = FeatureEngine(SPEC, SYMBOLS)
    engine.update(records[:cut])
    before = engine.snapshot()
    forming = records[cut:]  # each symbol's next bars, peeked as if forming
    peeked = engine.peek(forming).values.copy()
    assert engine.snapshot() == before
    # A peek equals what committing that one bar would give.
    first = forming[:1]
    twin = FeatureEngine.restore(before)
    assert twin.update(first).values.tobytes() == peeked[:1].tobytes()


@settings(max_examples=40, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_order_across_symbols_does_not_change_values(records: BarRecords, rnd: object) -> None:
    # Interleave the symbols differently while keeping each symbol's own order.
    keys = np.array([rnd.random() for _ in range(len(records))])  # type: ignore[attr-defined]
    labels = records["symbol_id"]
    slots = labels[np.argsort(keys)]  # a random arrangement of the same symbol labels
    reordered = np.empty_like(records)
    for s in range(len(SYMBOLS)):
        reordered[slots == s] = records[labels == s]
    (a, _), _ = compute_features(records, SYMBOLS, SPEC)
    (b, _), _ = compute_features(reordered, SYMBOLS, SPEC)
    assert by_symbol(records, a) == by_symbol(reordered, b)


@settings(max_examples=30, deadline=None)
@given(histories())
def test_ready_means_finite_and_float32_is_float64_rounded(records: BarRecords) -> None:
    (f32, ready), _ = compute_features(records, SYMBOLS, SPEC)
    (f64, ready64), _ = compute_features(records, SYMBOLS, SPEC, dtype=np.float64)
    assert np.isfinite(f32[ready]).all() and np.isnan(f32[~ready]).all()
    assert (ready == ready64).all()
    assert f64.astype(np.float32).tobytes() == f32.tobytes()
