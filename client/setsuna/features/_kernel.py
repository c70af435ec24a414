"""The compiled update: one call applies a batch of bars across symbols.

Every feature is O(1) per bar: fixed rings and running sums in one float64
row per symbol. Numerics:

* rolling sums (SMA, VWAP) are Neumaier-compensated, so adding and removing
  values for millions of bars does not drift;
* rolling variances use the sliding-window Welford update, and every
  ``window_bars`` samples the mean and M2 are recomputed exactly from the
  ring (two-pass): drift is bounded by one window's worth of rounding, at an
  amortised cost of two flops per update;
* standard deviations used as denominators are floored at
  ``STD_FLOOR_REL * |mean| + STD_FLOOR_ABS``: a flat window gives a finite
  value (0 for a z-score, 0.5 for %b), never inf or NaN;
* EMA, RSI, MACD and ATR are seeded as TA-Lib seeds them (see ``_spec``).

The kernel is the only code that computes feature values: the online engine
and the offline (training) path both call :func:`step`, so they agree bit
for bit.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from setsuna.features._spec import (
    ATR,
    BB,
    EMA,
    IMBALANCE,
    MACD,
    RET,
    RSI,
    RVOL,
    SESSION,
    SMA,
    SPREAD,
    VOLZ,
    VWAP,
)

STD_FLOOR_REL = 1e-9
STD_FLOOR_ABS = 1e-12
NS_PER_DAY = 86_400_000_000_000

#: Per-event status codes written by :func:`step`.
OK, BAD_VALUE, OUT_OF_ORDER, DUPLICATE, UNKNOWN_SYMBOL = 0, 1, 2, 3, 4

_NAN = np.nan


@nb.njit(cache=True, nogil=True)
def _nsum_add(row, i, x):  # type: ignore[no-untyped-def]
    """Neumaier-compensated ``row[i] += x`` with the compensation in ``row[i + 1]``."""
    s = row[i]
    t = s + x
    if abs(s) >= abs(x):
        row[i + 1] += (s - t) + x
    else:
        row[i + 1] += (x - t) + s
    row[i] = t


@nb.njit(cache=True, nogil=True)
def _window_push(row, off, n, k, x):  # type: ignore[no-untyped-def]
    """Push sample ``k`` (0-based) into a window of ``n``; return (mean, M2) of the window."""
    slot = off + k % n
    mean = row[off + n]
    m2 = row[off + n + 1]
    if k < n:
        d = x - mean
        mean += d / (k + 1)
        m2 += d * (x - mean)
        row[slot] = x
    else:
        old = row[slot]
        row[slot] = x
        if k % n == n - 1:  # the ring is in order again: recompute exactly (two-pass)
            total = 0.0
            for j in range(n):
                total += row[off + j]
            mean = total / n
            m2 = 0.0
            for j in range(n):
                d = row[off + j] - mean
                m2 += d * d
        else:
            new_mean = mean + (x - old) / n
            m2 += (x - old) * ((x - new_mean) + (old - mean))
            mean = new_mean
            if m2 < 0.0:
                m2 = 0.0
    row[off + n] = mean
    row[off + n + 1] = m2
    return mean, m2


@nb.njit(cache=True, nogil=True)
def _floored_std(m2, n, mean):  # type: ignore[no-untyped-def]
    std = math.sqrt(m2 / n)
    floor = STD_FLOOR_REL * abs(mean) + STD_FLOOR_ABS
    return std if std > floor else floor


@nb.njit(cache=True, nogil=True)
def _emit(out, ready, e, col, value, ok):  # type: ignore[no-untyped-def]
    if col >= 0:
        out[e, col] = value if ok else _NAN
        ready[e, col] = ok


@nb.njit(cache=True, nogil=True)
def _apply(blocks, fparams, sessions, row, count, ev, out, ready, e):  # type: ignore[no-untyped-def]
    """Apply one bar to one symbol's state ``row`` (``count`` bars seen before it)."""
    close = ev.close
    prev = row[0]
    has_prev = count > 0
    for b in range(blocks.shape[0]):
        code = blocks[b, 0]
        off = blocks[b, 1]
        n = blocks[b, 2]
        v0 = _NAN
        v1 = _NAN
        v2 = _NAN
        r0 = False
        r1 = False
        if code == RET:
            slot = off + count % n
            if count >= n:
                v0 = close / row[slot] - 1.0
                r0 = True
            row[slot] = close
        elif code == SMA:
            slot = off + count % n
            if count >= n:
                _nsum_add(row, off + n, -row[slot])
            _nsum_add(row, off + n, close)
            row[slot] = close
            if count + 1 >= n:
                mean = (row[off + n] + row[off + n + 1]) / n
                v0 = close / mean - 1.0
                r0 = True
        elif code == EMA:
            if count < n - 1:
                row[off] += close
            elif count == n - 1:
                row[off] = (row[off] + close) / n
            else:
                row[off] = (close - row[off]) * (2.0 / (n + 1)) + row[off]
            if count >= n - 1:
                v0 = close / row[off] - 1.0
                r0 = True
        elif code == RSI:
            if has_prev:
                d = close - prev
                if count > n:
                    row[off] *= n - 1
                    row[off + 1] *= n - 1
                if d < 0:
                    row[off + 1] -= d
                else:
                    row[off] += d
                if count >= n:
                    row[off] /= n
                    row[off + 1] /= n
                    total = row[off] + row[off + 1]
                    v0 = 100.0 * (row[off] / total) if total > 0.0 else 50.0
                    r0 = True
        elif code == MACD:
            fast = n
            slow = blocks[b, 3]
            sig = blocks[b, 4]
            if count < slow - 1:
                row[off + 1] += close
            elif count == slow - 1:
                row[off + 1] = (row[off + 1] + close) / slow
            else:
                row[off + 1] = (close - row[off + 1]) * (2.0 / (slow + 1)) + row[off + 1]
            if count >= slow - fast:  # TA-Lib: the fast EMA's seed ends where the slow one's does
                if count < slow - 1:
                    row[off] += close
                elif count == slow - 1:
                    row[off] = (row[off] + close) / fast
                else:
                    row[off] = (close - row[off]) * (2.0 / (fast + 1)) + row[off]
            if count >= slow - 1:
                line = row[off] - row[off + 1]
                v0 = line / close
                r0 = True
                j = count - (slow - 1)
                if j < sig - 1:
                    row[off + 2] += line
                elif j == sig - 1:
                    row[off + 2] = (row[off + 2] + line) / sig
                else:
                    row[off + 2] = (line - row[off + 2]) * (2.0 / (sig + 1)) + row[off + 2]
                if j >= sig - 1:
                    v1 = row[off + 2] / close
                    v2 = (line - row[off + 2]) / close
                    r1 = True
        elif code == BB:
            mean, m2 = _window_push(row, off, n, count, close)
            if count + 1 >= n:
                width = fparams[b, 0] * _floored_std(m2, n, mean)
                v0 = (close - (mean - width)) / (2.0 * width)
                r0 = True
        elif code == ATR:
            if has_prev:
                tr = ev.high - ev.low
                up = abs(prev - ev.high)
                down = abs(ev.low - prev)
                if up > tr:
                    tr = up
                if down > tr:
                    tr = down
                if count < n:
                    row[off] += tr
                elif count == n:
                    row[off] = (row[off] + tr) / n
                else:
                    row[off] = (row[off] * (n - 1) + tr) / n
                if count >= n:
                    v0 = row[off] / close
                    r0 = True
        elif code == RVOL:
            if has_prev:
                k = count - 1
                mean, m2 = _window_push(row, off, n, k, math.log(close / prev))
                if k + 1 >= n:
                    v0 = math.sqrt(m2 / (n - 1))
                    r0 = True
        elif code == VWAP:
            volume = ev.volume
            price = ev.vwap
            if price != price:
                price = (ev.high + ev.low + close) / 3.0
            slot = count % n
            sums = off + 2 * n
            if count >= n:
                old_v = row[off + n + slot]
                _nsum_add(row, sums, -row[off + slot])
                _nsum_add(row, sums + 2, -old_v)
                if old_v > 0.0:
                    row[sums + 4] -= 1.0
            row[off + slot] = price * volume
            row[off + n + slot] = volume
            _nsum_add(row, sums, price * volume)
            _nsum_add(row, sums + 2, volume)
            if volume > 0.0:
                row[sums + 4] += 1.0
            if count + 1 >= n and row[sums + 4] > 0.0:
                vwap = (row[sums] + row[sums + 1]) / (row[sums + 2] + row[sums + 3])
                v0 = close / vwap - 1.0
                r0 = True
        elif code == VOLZ:
            mean, m2 = _window_push(row, off, n, count, ev.volume)
            if count + 1 >= n:
                v0 = (ev.volume - mean) / _floored_std(m2, n, mean)
                r0 = True
        elif code == SESSION:
            s = n
            of_day = (ev.timestamp_ns + sessions[s, 0]) % NS_PER_DAY
            elapsed = 0
            for w in range(sessions[s, 1]):
                start = sessions[s, 3 + 2 * w]
                end = sessions[s, 4 + 2 * w]
                if of_day >= end:
                    elapsed += end - start
                elif of_day > start:
                    elapsed += of_day - start
            v0 = elapsed / sessions[s, 2]
            r0 = True
        elif code == SPREAD:
            bid = ev.bid
            ask = ev.ask
            if bid == bid and ask == ask:
                v0 = (ask - bid) / ((ask + bid) * 0.5)
                r0 = True
        elif code == IMBALANCE:
            bs = ev.bid_size
            az = ev.ask_size
            if bs == bs and az == az and bs + az > 0.0:
                v0 = (bs - az) / (bs + az)
                r0 = True
        _emit(out, ready, e, blocks[b, 5], v0, r0)
        _emit(out, ready, e, blocks[b, 6], v1, r1)
        _emit(out, ready, e, blocks[b, 7], v2, r1)
    row[0] = close


@nb.njit(cache=True, nogil=True)
def _positive(x):  # type: ignore[no-untyped-def]
    return x > 0.0 and x < np.inf


@nb.njit(cache=True, nogil=True)
def _bad_values(ev):  # type: ignore[no-untyped-def]
    if not (_positive(ev.open) and _positive(ev.high) and _positive(ev.low)):
        return True
    if not _positive(ev.close) or ev.high < ev.low:
        return True
    if not (ev.volume >= 0.0 and ev.volume < np.inf):
        return True
    for x in (ev.vwap, ev.bid, ev.ask):
        if x == x and not _positive(x):
            return True
    bs = ev.bid_size
    az = ev.ask_size
    bad_bid_size = bs == bs and not (bs >= 0.0 and bs < np.inf)
    return bad_bid_size or (az == az and not (az >= 0.0 and az < np.inf))


@nb.njit(cache=True, nogil=True)
def step(blocks, fparams, sessions, state_f, state_i, events, out, ready, status, commit, drop):  # type: ignore[no-untyped-def]
    """Validate then apply ``events``; return the index of the first refused event or -1.

    A first pass sets ``status`` per event without touching state. If any
    event is bad and ``drop`` is false (or a symbol id is unknown, which is
    never dropped), nothing is applied. Otherwise good events are applied in
    order; ``commit=False`` applies each to a scratch copy of its symbol's
    row (``peek``), leaving the state as it was.
    """
    n_symbols = state_i.shape[0]
    # Timestamps as the batch would leave them; a lone event needs no copy.
    last = state_i[:, 1].copy() if commit and events.shape[0] > 1 else state_i[:, 1]
    first_bad = -1
    unknown = False
    for e in range(events.shape[0]):
        ev = events[e]
        s = ev.symbol_id
        code = OK
        if s < 0 or s >= n_symbols:
            code = UNKNOWN_SYMBOL
            unknown = True
        elif _bad_values(ev):
            code = BAD_VALUE
        elif ev.timestamp_ns < last[s]:
            code = OUT_OF_ORDER
        elif ev.timestamp_ns == last[s]:
            code = DUPLICATE
        elif commit and events.shape[0] > 1:
            last[s] = ev.timestamp_ns
        status[e] = code
        if code != OK and first_bad < 0:
            first_bad = e
    if first_bad >= 0 and (unknown or not drop):
        return first_bad
    scratch = np.empty(0 if commit else state_f.shape[1])
    n_out = out.shape[1]
    for e in range(events.shape[0]):
        if status[e] != OK:
            for c in range(n_out):
                out[e, c] = _NAN
                ready[e, c] = False
            continue
        ev = events[e]
        s = ev.symbol_id
        if commit:
            _apply(blocks, fparams, sessions, state_f[s], state_i[s, 0], ev, out, ready, e)
            state_i[s, 0] += 1
            state_i[s, 1] = ev.timestamp_ns
        else:
            scratch[:] = state_f[s]
            _apply(blocks, fparams, sessions, scratch, state_i[s, 0], ev, out, ready, e)
    return first_bad
