"""From a spec to the arrays the kernel reads: blocks, parameters, sessions, state width.

Features that share a computation share one *block* (``macd_line``,
``macd_signal`` and ``macd_hist`` with the same periods are one MACD; two
specs naming the same SMA twice compute it once). Each block owns a slice of
the per-symbol float64 state row; column 0 of every row is the previous close.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from setsuna.features._spec import (
    ATR,
    BB,
    EMA,
    IMBALANCE,
    KINDS,
    MACD,
    RET,
    RSI,
    RVOL,
    SESSION,
    SMA,
    SPREAD,
    VOLZ,
    VWAP,
    FeatureSpec,
)
from setsuna.market import get_session

#: Columns of a row of ``Layout.blocks``.
B_CODE, B_OFF, B_P0, B_P1, B_P2, B_OUT0, B_OUT1, B_OUT2 = range(8)
#: State columns used by every symbol before the blocks' own.
COMMON_WIDTH = 1  # previous close
#: Columns of ``state_i``: bars accepted so far, last accepted timestamp.
I_COUNT, I_LAST_TS = 0, 1
NO_TIMESTAMP = np.iinfo(np.int64).min


def _state_width(code: int, p0: int) -> int:
    """float64 slots a block keeps per symbol (rings of ``p0`` values plus running sums)."""
    return {
        RET: p0,  # ring of closes
        SMA: p0 + 2,  # ring, Neumaier sum and compensation
        EMA: 1,  # seed sum, then the EMA
        RSI: 2,  # average gain, average loss (seed sums until ready)
        MACD: 3,  # fast, slow, signal (each a seed sum until seeded)
        BB: p0 + 2,  # ring, mean, M2
        ATR: 1,  # seed sum, then the ATR
        RVOL: p0 + 2,  # ring of log returns, mean, M2
        VWAP: 2 * p0 + 5,  # rings of p*v and v, two Neumaier sums, bars with volume
        VOLZ: p0 + 2,  # ring, mean, M2
        SESSION: 0,
        SPREAD: 0,
        IMBALANCE: 0,
    }[code]


@dataclass(frozen=True)
class Layout:
    """Everything the kernel needs to know about a spec, as arrays."""

    blocks: npt.NDArray[np.int64]
    fparams: npt.NDArray[np.float64]
    sessions: npt.NDArray[np.int64]
    width: int
    n_features: int


def compile_layout(spec: FeatureSpec) -> Layout:
    keys: dict[tuple[object, ...], list[int]] = {}
    rows: list[list[int]] = []
    fparams: list[float] = []
    session_names: list[str] = []
    offset = COMMON_WIDTH
    for column, feature in enumerate(spec.features):
        info = KINDS[feature.kind]
        params = feature.param_map
        ints = [0, 0, 0]
        fp = 0.0
        if info.block == MACD:
            ints = [int(params["fast_bars"]), int(params["slow_bars"]), int(params["signal_bars"])]
        elif info.block == EMA:
            ints[0] = int(params["span_bars"])
        elif info.block == SESSION:
            name = str(params["session"])
            if name not in session_names:
                session_names.append(name)
            ints[0] = session_names.index(name)
        elif "window_bars" in params:
            ints[0] = int(params["window_bars"])
        if info.block == BB:
            fp = float(params["width_std"])
        key = (info.block, *ints, fp)
        free = [i for i in keys.get(key, []) if rows[i][B_OUT0 + info.output] < 0]
        if free:
            block = free[0]
        else:  # a new block, or the same output named twice: compute it again
            block = len(rows)
            keys.setdefault(key, []).append(block)
            rows.append([info.block, offset, *ints, -1, -1, -1])
            fparams.append(fp)
            offset += _state_width(info.block, ints[0])
        rows[block][B_OUT0 + info.output] = column
    sessions = [get_session(n) for n in session_names]
    max_windows = max((len(s.windows) for s in sessions), default=0)
    table = np.zeros((max(len(sessions), 1), 3 + 2 * max_windows), dtype=np.int64)
    for i, session in enumerate(sessions):
        bounds = session.window_bounds_ns()
        table[i, 0] = session.utc_offset_ns
        table[i, 1] = len(bounds)
        table[i, 2] = session.trading_ns_per_day
        table[i, 3 : 3 + bounds.size] = bounds.ravel()
    return Layout(
        blocks=np.array(rows, dtype=np.int64),
        fparams=np.array(fparams, dtype=np.float64).reshape(-1, 1),
        sessions=table,
        width=offset,
        n_features=len(spec.features),
    )
