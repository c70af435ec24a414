"""Answers of the arms, remembered per row: a cache in the BLS layer, bounded and expiring.

Triton 2.51's response cache stores a Python-backend error as an empty
success, so the routers cannot sit behind it (a refused request would
"succeed" with no outputs when repeated). They keep their own instead, per
instance: an arm's ``score`` for one row, keyed by

* the experiment in force (an :class:`~ensembles.experiment.Experiment`:
  every file that takes effect, a new version included, starts from an
  empty cache, and an answer computed under the previous one is not stored);
* the arm's ``model:version`` (a new model or version is a different key);
* the row's bytes (float32, as sent: ``-0.0`` and ``0.0`` are two rows).

What it holds is the engine's score, not the decision: ``decide`` applies
its thresholds (fixed per ``decide`` version, loaded once per instance) to
cached and computed scores alike, every time.

Only answers are stored: a refused request never reaches the cache, an
arm's error is not stored, and the routers store a batch's scores only once
it answered (``decide``: after the signal accepted them).

Bounds: ``max_bytes`` counts each entry as its row's bytes plus
:data:`ENTRY_OVERHEAD_BYTES`; when the next rows would not fit, everything is
dropped (counted in :attr:`ScoreCache.clears`), so the hot path stays one
dict lookup per row and no eviction order is kept. ``ttl_ms``: an entry is
served for at most that long after it was stored (monotonic clock), then it
is a miss and computed again. 0 for either turns the cache off.

Per batch: one ``bytes`` per row (a C-level ``tolist`` of a void view of the
rows) and one dict lookup per row (``map(dict.get, ...)``); the rest is
array operations. Scores are kept in numpy arrays indexed by a slot number,
so expiry is checked for the whole batch at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import repeat
from typing import Any, Final

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

#: What one entry costs beyond its row's bytes, at most (CPython 3.11, 64-bit): the
#: bytes object's header (33), the slot number (an int object, 28), its share of the
#: dict's tables (up to ~72 just after a resize) and of the score and expiry arrays
#: (12, up to 24 after a resize). Measured with tracemalloc: 107-142 per entry.
ENTRY_OVERHEAD_BYTES: Final = 160
_NO_SLOT: Final = -1
_FIRST_SLOTS: Final = 1024


def row_keys(x: npt.NDArray[Any]) -> npt.NDArray[np.void]:
    """One opaque value per row whose ``tolist()`` is the row's bytes."""
    c = np.ascontiguousarray(x)
    rows = len(c)
    width = c.nbytes // rows if rows else c.itemsize
    return c.reshape(rows, -1).view(np.dtype((np.void, width))).reshape(rows)


class ScoreCache:
    """``(experiment, model:version, row bytes) -> score`` for one model instance.

    Not thread-safe: one execute at a time uses it (``decide`` is synchronous;
    the router's coroutines run on one event loop and never await inside a
    call here). Other threads may read the counters.
    """

    def __init__(
        self,
        max_bytes: int,
        ttl_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or not ttl_ms >= 0:
            raise ValueError(f"max_bytes={max_bytes} and ttl_ms={ttl_ms} must be >= 0")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_ms / 1e3
        self.on = max_bytes > 0 and ttl_ms > 0
        self._clock = clock
        self.hits = 0  # rows answered from the cache
        self.misses = 0  # rows looked up and computed (expired ones included)
        self.clears = 0  # times it was full and dropped whole
        self.bytes = 0  # what the slots in use cost, by the rule above
        self.peak = 0  # the most they ever cost: never above max_bytes
        self._owner: object = None
        self._slots: dict[str, dict[bytes, int]] = {}
        self._score: F32 = np.empty(0, dtype=np.float32)
        self._expires = np.empty(0, dtype=np.float64)
        self._used = 0

    def __len__(self) -> int:
        return sum(map(len, self._slots.values()))

    def bind(self, owner: object) -> None:
        """Serve answers of ``owner`` (the experiment in force) only; another drops all."""
        if owner is not self._owner:
            self._drop()
            self._owner = owner

    def _drop(self) -> None:
        self._slots = {}
        self._used = 0
        self.bytes = 0

    def lookup(self, owner: object, label: str, keys: list[bytes]) -> tuple[Mask, F32]:
        """Which rows are cached (a mask) and their scores (for the True rows, in order).

        Counts every row as a hit or a miss. ``owner`` is bound first.
        """
        self.bind(owner)
        n = len(keys)
        slots = self._slots.get(label)
        if slots is None or not n:
            self.misses += n
            return np.zeros(n, dtype=bool), np.empty(0, dtype=np.float32)
        idx = np.fromiter(map(slots.get, keys, repeat(_NO_SLOT)), dtype=np.int64, count=n)
        hit = idx >= 0
        if hit.any():
            hit[hit] = self._expires[idx[hit]] > self._clock()
        scores = self._score[idx[hit]]
        got = len(scores)
        self.hits += got
        self.misses += n - got
        return hit, scores

    def store(self, owner: object, label: str, keys: list[bytes], scores: F32) -> None:
        """Remember ``scores`` (one per key) computed by ``label`` under ``owner``.

        Ignored when ``owner`` is no longer the one bound (the experiment changed
        while the batch ran) or the cache is off. Rows of one batch are all the
        same width (the model's input shape).
        """
        n = len(keys)
        if not self.on or not n or owner is not self._owner:
            return
        size = len(keys[0]) + ENTRY_OVERHEAD_BYTES
        fits = self.max_bytes // size
        if fits == 0:
            return
        if n > fits:  # a batch larger than the whole cache: keep its first rows
            keys, scores, n = keys[:fits], scores[:fits], fits
        if self.bytes + n * size > self.max_bytes:
            self._drop()
            self.clears += 1
        start, stop = self._used, self._used + n
        if stop > len(self._score):
            self._grow(stop, fits)
        self._score[start:stop] = np.asarray(scores, dtype=np.float32).reshape(-1)
        self._expires[start:stop] = self._clock() + self.ttl_s
        slots = self._slots.get(label)
        if slots is None:
            slots = self._slots[label] = {}
        slots.update(zip(keys, range(start, stop), strict=True))
        self._used = stop
        self.bytes += n * size  # a key stored twice costs twice here: an upper bound
        if self.bytes > self.peak:
            self.peak = self.bytes

    def _grow(self, needed: int, most: int) -> None:
        n = min(most, max(needed, _FIRST_SLOTS, 2 * len(self._score)))
        score = np.empty(n, dtype=np.float32)
        expires = np.empty(n, dtype=np.float64)
        score[: self._used] = self._score[: self._used]
        expires[: self._used] = self._expires[: self._used]
        self._score, self._expires = score, expires
