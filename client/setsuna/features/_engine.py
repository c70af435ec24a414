"""The online feature engine: state of N symbols in arrays, one compiled call per batch.

State is two arrays with one row per symbol: ``state_f`` (float64: rings and
running sums of every block) and ``state_i`` (int64: bars seen, last
timestamp). :meth:`FeatureEngine.update` commits a batch of bars;
:meth:`FeatureEngine.peek` computes the same rows for forming bars on a
scratch copy and commits nothing. Both write float32 rows into a
preallocated matrix with a readiness mask (NaN where not ready), returned as
views that the next call overwrites: copy them to keep them.

Snapshots (:meth:`snapshot` / :meth:`restore`) carry a format version, the
spec, the symbols and a CRC, so state moves between processes bit for bit or
is refused with a :class:`SnapshotError` that says why.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from setsuna.errors import (
    BadValueError,
    ConfigError,
    DataFormatError,
    OutOfOrderError,
    SnapshotError,
    UnknownSymbolError,
)
from setsuna.features._kernel import (
    BAD_VALUE,
    DUPLICATE,
    OUT_OF_ORDER,
    UNKNOWN_SYMBOL,
    step,
)
from setsuna.features._layout import I_LAST_TS, NO_TIMESTAMP, compile_layout
from setsuna.features._spec import FeatureSpec
from setsuna.market import BAR_DTYPE, BarRecords, DropCounts, OnBadRows
from setsuna.market._bad_rows import check_on_bad_rows

SNAPSHOT_MAGIC = b"SETSUNA-FEAT"
SNAPSHOT_VERSION = 1
_HEADER = struct.Struct("<12sHI")  # magic, version, header JSON length
_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_ENTRY: list[Callable[..., int]] = []


def _entry_point() -> Callable[..., int]:
    """The compiled ``step`` for the engine's own buffers, without numba's dispatch.

    Typing a structured-array argument costs the dispatcher ~1.5 us per call,
    most of a single-bar update. The engine's own buffers always have the
    same types, so the overload is looked up once and called directly; if
    numba ever drops ``entry_point``, the dispatcher is used instead.
    """
    if not _ENTRY:
        layout = compile_layout(FeatureSpec.of(("r", "return", {"window_bars": 1})))
        args = (
            layout.blocks,
            layout.fparams,
            layout.sessions,
            np.zeros((1, layout.width)),
            np.zeros((1, 2), dtype=np.int64),
            np.zeros(1, dtype=BAR_DTYPE),  # a zero price: refused, so nothing runs
            np.empty((1, 1), dtype=np.float32),
            np.empty((1, 1), dtype=np.bool_),
            np.empty(1, dtype=np.int8),
            True,
            False,
        )
        step(*args)
        try:
            import numba

            key = tuple(numba.typeof(a) for a in args)
            _ENTRY.append(step.overloads[key].entry_point)
        except (AttributeError, KeyError):  # pragma: no cover - numba internals moved
            _ENTRY.append(step)
    return _ENTRY[0]


class FeatureRows(NamedTuple):
    """Feature values (float32, NaN where not ready) and the readiness mask, one row per bar."""

    values: npt.NDArray[np.floating[Any]]
    ready: npt.NDArray[np.bool_]


class FeatureEngine:
    """Incremental features for a fixed set of symbols.

    >>> from setsuna.features import FeatureEngine, default_spec
    >>> engine = FeatureEngine(default_spec(), ["7203.T", "6758.T"])
    >>> engine.symbol_id("6758.T")
    1
    """

    def __init__(
        self,
        spec: FeatureSpec,
        symbols: Sequence[str],
        *,
        on_bad_rows: OnBadRows = "raise",
        max_batch: int = 1024,
    ) -> None:
        if isinstance(symbols, str):
            raise ConfigError("symbols must be a sequence of names, not one string")
        self.symbols = tuple(str(s) for s in symbols)
        if not self.symbols:
            raise ConfigError("a feature engine needs at least one symbol")
        if len(set(self.symbols)) != len(self.symbols):
            raise ConfigError("symbol names must be unique")
        if max_batch <= 0:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        self.spec = spec
        self.on_bad_rows = check_on_bad_rows(on_bad_rows)
        self.drops = DropCounts()
        self._ids = {s: i for i, s in enumerate(self.symbols)}
        layout = compile_layout(spec)
        self._blocks = layout.blocks
        self._fparams = layout.fparams
        self._sessions = layout.sessions
        self._drop = self.on_bad_rows == "drop"
        self._state_f = np.zeros((len(self.symbols), layout.width), dtype=np.float64)
        self._state_i = np.zeros((len(self.symbols), 2), dtype=np.int64)
        self._state_i[:, I_LAST_TS] = NO_TIMESTAMP
        self._allocate(max_batch)
        self._step = _entry_point()

    # -- introspection --------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.names

    @property
    def n_features(self) -> int:
        return len(self.spec)

    def symbol_id(self, symbol: str) -> int:
        try:
            return self._ids[symbol]
        except KeyError:
            raise UnknownSymbolError(
                f"symbol {symbol!r} is not one of this engine's {len(self.symbols)} symbols; "
                "create the engine with it"
            ) from None

    def symbol_ids(self, symbols: Sequence[str]) -> npt.NDArray[np.int64]:
        return np.array([self.symbol_id(s) for s in symbols], dtype=np.int64)

    def bars_seen(self, symbol: str) -> int:
        return int(self._state_i[self.symbol_id(symbol), 0])

    # -- the hot path ---------------------------------------------------------
    def update(
        self,
        events: BarRecords,
        *,
        out: npt.NDArray[np.floating[Any]] | None = None,
        ready: npt.NDArray[np.bool_] | None = None,
    ) -> FeatureRows:
        """Commit a batch of bars (any symbols, each symbol's bars in time order)."""
        return self._run(events, out, ready, True)

    def peek(
        self,
        events: BarRecords,
        *,
        out: npt.NDArray[np.floating[Any]] | None = None,
        ready: npt.NDArray[np.bool_] | None = None,
    ) -> FeatureRows:
        """Features as if each bar (a forming bar) closed now; state is left unchanged.

        Each event is judged against the committed state alone, so several
        peeks at the same symbol in one batch are independent what-ifs.
        """
        return self._run(events, out, ready, False)

    def _run(
        self,
        events: BarRecords,
        out: npt.NDArray[np.floating[Any]] | None,
        ready: npt.NDArray[np.bool_] | None,
        commit: bool,
    ) -> FeatureRows:
        if events.dtype != BAR_DTYPE:
            raise DataFormatError(
                f"events have dtype {events.dtype}; build them with setsuna.market.BAR_DTYPE"
            )
        n = events.shape[0]
        kernel: Any = step  # numba's dispatcher, which types the arguments on every call
        if out is None or ready is None:
            if n != self._views_n:
                self._set_views(n)
            rows, status = self._views
            flags = events.flags
            if flags.c_contiguous and flags.writeable and flags.aligned and events.ndim == 1:
                # Fast path: every argument has the one type the entry point was
                # compiled for, so numba's per-call typing (~1.5 us) is skipped.
                kernel = self._step
        else:
            if (
                out.shape != (n, self.n_features)
                or ready.shape != out.shape
                or out.dtype not in _OUT_DTYPES
                or ready.dtype != np.bool_
            ):
                raise ConfigError(
                    f"out must be float32 (or float64, for checks) and ready bool, both of "
                    f"shape ({n}, {self.n_features}); got {out.dtype}{out.shape} and "
                    f"{ready.dtype}{ready.shape}"
                )
            rows = FeatureRows(out, ready)
            status = np.empty(n, dtype=np.int8)
        first_bad = kernel(
            self._blocks,
            self._fparams,
            self._sessions,
            self._state_f,
            self._state_i,
            events,
            rows.values,
            rows.ready,
            status,
            commit,
            self._drop,
        )
        if first_bad >= 0:
            self._refused(events, status, first_bad)
        return rows

    def _set_views(self, n: int) -> None:
        """Views of the first ``n`` rows of the output buffers, kept for the next call."""
        if n > self._capacity:
            self._allocate(max(n, 2 * self._capacity))
        self._views = (FeatureRows(self._out[:n], self._ready[:n]), self._status[:n])
        self._views_n = n

    def _refused(self, events: BarRecords, status: npt.NDArray[np.int8], first: int) -> None:
        """Raise for the first refused event, or count the dropped ones."""
        codes = np.bincount(status, minlength=5)
        if codes[UNKNOWN_SYMBOL]:
            bad = int(np.flatnonzero(status == UNKNOWN_SYMBOL)[0])
            raise UnknownSymbolError(
                f"event {bad} has symbol_id {int(events['symbol_id'][bad])} but this engine "
                f"has {len(self.symbols)} symbols (ids 0..{len(self.symbols) - 1}); map names "
                "with engine.symbol_ids(); nothing in this batch was applied"
            )
        if not self._drop:
            ev = events[first]
            symbol = self.symbols[int(ev["symbol_id"])]
            if status[first] == BAD_VALUE:
                raise BadValueError(
                    f"event {first} ({symbol}): NaN, infinite, non-positive price, negative "
                    "volume/size or high < low; clean it, or use on_bad_rows='drop'; nothing in "
                    "this batch was applied"
                )
            what = "goes backwards" if status[first] == OUT_OF_ORDER else "repeats"
            raise OutOfOrderError(
                f"event {first} ({symbol}): timestamp {int(ev['timestamp_ns'])} ns {what} "
                "for this symbol; setsuna never reorders: send each symbol's bars in time "
                "order, or use on_bad_rows='drop'; nothing in this batch was applied"
            )
        self.drops.bad_value += int(codes[BAD_VALUE])
        self.drops.out_of_order += int(codes[OUT_OF_ORDER])
        self.drops.duplicate += int(codes[DUPLICATE])

    def _allocate(self, capacity: int) -> None:
        self._capacity = capacity
        self._out = np.empty((capacity, self.n_features), dtype=np.float32)
        self._ready = np.empty((capacity, self.n_features), dtype=np.bool_)
        self._status = np.empty(capacity, dtype=np.int8)
        self._views_n = -1

    # -- state ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget every symbol's history (as after construction)."""
        self._state_f[:] = 0.0
        self._state_i[:, 0] = 0
        self._state_i[:, I_LAST_TS] = NO_TIMESTAMP
        self.drops = DropCounts()

    def state_equal(self, other: FeatureEngine) -> bool:
        """True when both engines hold bit-identical state (NaN-safe, byte comparison)."""
        return (
            self.spec == other.spec
            and self.symbols == other.symbols
            and self._state_f.tobytes() == other._state_f.tobytes()
            and self._state_i.tobytes() == other._state_i.tobytes()
        )

    def snapshot(self) -> bytes:
        """All state as bytes: header, spec, symbols, the two state arrays and a CRC32."""
        header = json.dumps(
            {
                "spec": self.spec.to_json(),
                "symbols": list(self.symbols),
                "on_bad_rows": self.on_bad_rows,
                "width": int(self._state_f.shape[1]),
                "drops": self.drops.as_dict(),
            },
            sort_keys=True,
        ).encode()
        body = b"".join(
            (
                _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(header)),
                header,
                self._state_f.astype("<f8", copy=False).tobytes(),
                self._state_i.astype("<i8", copy=False).tobytes(),
            )
        )
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def restore(cls, data: bytes) -> FeatureEngine:
        """Rebuild an engine from :meth:`snapshot` bytes, bit for bit."""
        if len(data) < _HEADER.size + 4:
            raise SnapshotError("snapshot is truncated; take a new one with engine.snapshot()")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        magic, version, header_len = _HEADER.unpack_from(body)
        if magic != SNAPSHOT_MAGIC:
            raise SnapshotError("these bytes are not a setsuna feature snapshot")
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"snapshot format v{version}, this setsuna reads v{SNAPSHOT_VERSION}; "
                "rebuild the state by replaying history"
            )
        if zlib.crc32(body) != crc:
            raise SnapshotError("snapshot CRC mismatch: the bytes are corrupt")
        try:
            header = json.loads(body[_HEADER.size : _HEADER.size + header_len])
            engine = cls(
                FeatureSpec.from_json(header["spec"]),
                header["symbols"],
                # saved before the rename, the key was "policy"
                on_bad_rows=header.get("on_bad_rows", header.get("policy", "raise")),
            )
            width = int(header["width"])
            drops = {k: int(v) for k, v in header["drops"].items()}
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise SnapshotError(f"snapshot header is unreadable: {exc}") from exc
        if width != engine._state_f.shape[1]:
            raise SnapshotError(
                f"snapshot state width {width} != {engine._state_f.shape[1]} for its spec; "
                "it was written by an incompatible setsuna"
            )
        n = len(engine.symbols)
        start = _HEADER.size + header_len
        f_bytes, i_bytes = n * width * 8, n * 2 * 8
        if len(body) != start + f_bytes + i_bytes:
            raise SnapshotError("snapshot size does not match its header: the bytes are corrupt")
        engine._state_f[:] = np.frombuffer(body, "<f8", n * width, start).reshape(n, width)
        engine._state_i[:] = np.frombuffer(body, "<i8", n * 2, start + f_bytes).reshape(n, 2)
        engine.drops = DropCounts(**drops)
        return engine
