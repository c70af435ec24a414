"""Policies: model outputs to trading signals, with per-symbol state in arrays.

A policy turns each scored event into a signal — BUY (1), HOLD (0) or SELL
(-1) — and keeps a stance per symbol (long 1, flat 0, short -1). A signal is
a change of stance: flat to long is a BUY, long to short a SELL. Two ways to
get the wanted stance, one way to apply it:

* :class:`ThresholdPolicy` computes it locally from the score with
  **hysteresis**: go long at ``score >= buy_at`` and stay long until the score
  falls below ``buy_at - hysteresis`` (short mirrors it), so a score hovering
  at a threshold does not flip the stance every bar.
* :class:`ServedSignalPolicy` takes the ``signal`` output of the decision
  models (``decide``, ``decision``) as the wanted stance.

Both then apply a **cooldown** (no stance change within ``cooldown_ms`` of the
symbol's previous change, in event time) and a **position limit**
(``max_open_positions`` symbols not flat at once; entries beyond it are
refused in row order). Every suppressed change is counted by reason. All
of it is array arithmetic per batch; a batch holding one symbol twice (a
burst of ticks) is applied in order, one pass per repeat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from setsuna.contract import SIGNAL
from setsuna.errors import ConfigError, InputError

I8 = npt.NDArray[np.int8]
I64 = npt.NDArray[np.int64]
#: The labels a direction model's classes must carry (any column order).
DIRECTION_CLASSES: Final = ("down", "flat", "up")
#: How far a row of class probabilities may sum from 1 (float32 softmax: ~1e-7).
SUM_TOLERANCE: Final = 1e-3
#: A margin counts as met this close (float32 differences of probabilities round).
EDGE_TOLERANCE: Final = 1e-6


class TradingPolicy(Protocol):
    """What the pipeline needs from a policy."""

    #: Model outputs the policy reads (the pipeline asks Triton for them).
    needs: tuple[str, ...]
    #: Stance per symbol id after the last decision: 1 long, 0 flat, -1 short.
    stance: I8

    def decide(
        self,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        symbol_ids: I64,
        event_ns: I64,
    ) -> I8:
        """One signal per row; updates the per-symbol state."""
        ...

    @property
    def suppressed(self) -> dict[str, int]:
        """Stance changes refused so far, by reason."""
        ...


@dataclass(frozen=True)
class PolicySettings:
    """Rules shared by every policy; validated once.

    ``cooldown_ms`` is event time (bar timestamps), not wall time, so a replay
    decides as live trading would have. ``max_open_positions=0`` means no limit.
    """

    cooldown_ms: float = 0.0
    max_open_positions: int = 0

    def __post_init__(self) -> None:
        if not self.cooldown_ms >= 0:
            raise ConfigError(f"cooldown_ms={self.cooldown_ms}: give >= 0")
        if self.max_open_positions < 0:
            raise ConfigError(f"max_open_positions={self.max_open_positions}: give >= 0")


class _StancePolicy:
    """Per-symbol stance, cooldown and position limit; subclasses say what stance they want."""

    needs: tuple[str, ...] = ()

    def __init__(self, n_symbols: int, settings: PolicySettings) -> None:
        if n_symbols <= 0:
            raise ConfigError(f"n_symbols={n_symbols}: give at least one symbol")
        self.settings = settings
        self.stance: I8 = np.zeros(n_symbols, dtype=np.int8)
        self.last_change_ns: I64 = np.full(n_symbols, np.iinfo(np.int64).min // 2, np.int64)
        self._cooldown_ns = int(settings.cooldown_ms * 1e6)
        self._suppressed = {"cooldown": 0, "position_limit": 0}

    @property
    def suppressed(self) -> dict[str, int]:
        return dict(self._suppressed)

    @property
    def open_positions(self) -> int:
        return int(np.count_nonzero(self.stance))

    def wanted(
        self, outputs: Mapping[str, np.ndarray[Any, Any]], ids: I64, current: I8
    ) -> I8:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(
        self,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        symbol_ids: I64,
        event_ns: I64,
    ) -> I8:
        ids = np.asarray(symbol_ids, dtype=np.int64)
        n = len(ids)
        signals = np.zeros(n, dtype=np.int8)
        if n == 0:
            return signals
        if n == 1 or len(np.unique(ids)) == n:
            self._apply(outputs, ids, np.asarray(event_ns, np.int64), signals, None)
            return signals
        # Repeats of a symbol in one batch: pass k applies every symbol's k-th event.
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        for k in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == k)
            self._apply(outputs, ids[rows], np.asarray(event_ns, np.int64)[rows], signals, rows)
        return signals

    def _apply(
        self,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        ids: I64,
        event_ns: I64,
        signals: I8,
        rows: I64 | None,
    ) -> None:
        sub = outputs if rows is None else {k: v[rows] for k, v in outputs.items()}
        current = self.stance[ids]
        want = self.wanted(sub, ids, current)
        change = want != current
        if self._cooldown_ns:
            cooling = change & (event_ns - self.last_change_ns[ids] < self._cooldown_ns)
            self._suppressed["cooldown"] += int(cooling.sum())
            change &= ~cooling
        limit = self.settings.max_open_positions
        if limit:
            entering = change & (current == 0) & (want != 0)
            leaving = change & (current != 0) & (want == 0)
            room = limit - self.open_positions + int(leaving.sum())
            refused = entering & (np.cumsum(entering) > max(room, 0))
            self._suppressed["position_limit"] += int(refused.sum())
            change &= ~refused
        new = np.where(change, want, current).astype(np.int8)
        out = np.sign(new.astype(np.int16) - current).astype(np.int8)
        self.stance[ids] = new
        self.last_change_ns[ids] = np.where(change, event_ns, self.last_change_ns[ids])
        if rows is None:
            signals[:] = out
        else:
            signals[rows] = out


def direction_columns(classes: Sequence[str], what: str) -> tuple[int, int, int]:
    """Columns of ``down``, ``flat``, ``up`` in a model's ``classes``; ConfigError otherwise."""
    labels = tuple(classes)
    if sorted(labels) != sorted(DIRECTION_CLASSES):
        raise ConfigError(
            f"{what}: classes {list(labels)} are not the direction classes "
            f"{list(DIRECTION_CLASSES)}; the BUY/HOLD/SELL rule needs a model trained on "
            "exactly those three labels (any order)"
        )
    down, flat, up = (labels.index(c) for c in DIRECTION_CLASSES)
    return down, flat, up


def direction_signals(
    p: npt.NDArray[np.float32],
    columns: tuple[int, int, int],
    *,
    margin: float,
    min_prob: float,
) -> tuple[I8, npt.NDArray[np.float32]]:
    """Signal codes and confidences for rows of direction probabilities (the module's rule).

    ``p`` is ``[n, 3]``; ``columns`` the (down, flat, up) columns from
    :func:`direction_columns`. Raises InputError for a row outside [0, 1] or
    not summing to 1 (NaN included): a broken model must not trade.
    """
    q = np.asarray(p, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 3:
        raise InputError(f"direction scores have shape {list(q.shape)}; expected [n, 3]")
    ok = ((q >= 0.0) & (q <= 1.0)).all(axis=1) & (np.abs(q.sum(axis=1) - 1.0) <= SUM_TOLERANCE)
    if not ok.all():  # NaN fails both comparisons
        i = int(np.flatnonzero(~ok)[0])
        raise InputError(
            f"class probabilities {q[i].tolist()} at row {i} are not probabilities summing "
            "to 1; the upstream model is broken or not a softmax classifier"
        )
    # Decided in float32, the precision models answer in (as the binary rule).
    q32 = q.astype(np.float32)
    down, flat, up = (q32[:, c] for c in columns)
    buy_edge = up - np.maximum(down, flat)
    sell_edge = down - np.maximum(up, flat)
    # Met within float32 rounding: a row printed (0.2, 0.3, 0.5) clears margin 0.2.
    margin32, floor = np.float32(margin - EDGE_TOLERANCE), np.float32(min_prob)
    buy = (buy_edge >= margin32) & (up >= floor)
    sell = (sell_edge >= margin32) & (down >= floor)
    code = buy.astype(np.int8) - sell.astype(np.int8)  # both (a tie at margin 0): HOLD
    hold_edge = np.maximum(flat - np.maximum(down, up), 0.0)
    conf = np.where(code == 1, buy_edge, np.where(code == -1, sell_edge, hold_edge))
    return code, np.clip(conf, 0.0, 1.0).astype(np.float32)


class ThresholdPolicy(_StancePolicy):
    """Stance from the model's ``score`` (a probability) with hysteresis; see the module."""

    needs: tuple[str, ...] = ("score",)

    def __init__(
        self,
        n_symbols: int,
        *,
        buy_at: float = 0.55,
        sell_at: float = 0.45,
        hysteresis: float = 0.02,
        settings: PolicySettings | None = None,
    ) -> None:
        if not 0 <= sell_at < buy_at <= 1:
            raise ConfigError(f"sell_at={sell_at}, buy_at={buy_at}: need 0 <= sell < buy <= 1")
        if not 0 <= hysteresis < (buy_at - sell_at) / 2:
            raise ConfigError(
                f"hysteresis={hysteresis}: give 0 <= h < (buy_at - sell_at) / 2 so the "
                "exit levels do not cross"
            )
        super().__init__(n_symbols, settings or PolicySettings())
        self.buy_at, self.sell_at, self.hysteresis = buy_at, sell_at, hysteresis

    def wanted(self, outputs: Mapping[str, np.ndarray[Any, Any]], ids: I64, current: I8) -> I8:
        p = np.asarray(outputs["score"], dtype=np.float64).reshape(-1)
        h = self.hysteresis
        long_ = np.where(current == 1, p >= self.buy_at - h, p >= self.buy_at)
        short = np.where(current == -1, p <= self.sell_at + h, p <= self.sell_at)
        return (long_.astype(np.int8) - short.astype(np.int8)).astype(np.int8)


class ReturnThresholdPolicy(_StancePolicy):
    """Stance from a forward-return regressor's ``score`` (the predicted return, a fraction:
    0.0005 is 5 bps) with hysteresis in the same units; ``decide`` applies the same
    levels without hysteresis (``ensembles.signal.ReturnThresholds``). A non-finite
    prediction compares false both ways: flat, never a trade."""

    needs: tuple[str, ...] = ("score",)

    def __init__(
        self,
        n_symbols: int,
        *,
        buy_above_return: float = 0.0005,
        sell_below_return: float = -0.0005,
        hysteresis_return: float = 0.0001,
        settings: PolicySettings | None = None,
    ) -> None:
        b, s, h = buy_above_return, sell_below_return, hysteresis_return
        if not all(math.isfinite(v) for v in (b, s, h)) or not -1 < s < b < 1:
            raise ConfigError(
                f"sell_below_return={s}, buy_above_return={b}: need -1 < sell < buy < 1 "
                "(returns as fractions: 0.0005 is 5 bps)"
            )
        if not 0 <= h < (b - s) / 2:
            raise ConfigError(
                f"hysteresis_return={h}: give 0 <= h < (buy_above_return - "
                "sell_below_return) / 2 so the exit levels do not cross"
            )
        super().__init__(n_symbols, settings or PolicySettings())
        self.buy_above_return, self.sell_below_return, self.hysteresis_return = b, s, h

    def wanted(self, outputs: Mapping[str, np.ndarray[Any, Any]], ids: I64, current: I8) -> I8:
        r = np.asarray(outputs["score"], dtype=np.float64).reshape(-1)
        h = self.hysteresis_return
        long_ = np.where(current == 1, r >= self.buy_above_return - h, r >= self.buy_above_return)
        short = np.where(
            current == -1, r <= self.sell_below_return + h, r <= self.sell_below_return
        )
        return (long_.astype(np.int8) - short.astype(np.int8)).astype(np.int8)


class ServedSignalPolicy(_StancePolicy):
    """Stance = the ``signal`` output of a decision model; cooldown and limits still apply."""

    needs: tuple[str, ...] = (SIGNAL,)

    def __init__(self, n_symbols: int, *, settings: PolicySettings | None = None) -> None:
        super().__init__(n_symbols, settings or PolicySettings())

    def wanted(self, outputs: Mapping[str, np.ndarray[Any, Any]], ids: I64, current: I8) -> I8:
        return np.clip(np.asarray(outputs[SIGNAL]).reshape(-1), -1, 1).astype(np.int8)


class DirectionPolicy(_StancePolicy):
    """Stance from a 3-class model's ``score`` (down / flat / up probabilities).

    The rule is :func:`direction_signals` (``ensembles.signal`` documents it;
    ``decide`` over a direction model applies the same one): long when ``up``
    beats both others by ``margin`` and reaches ``min_prob``, short mirrored,
    flat otherwise. ``classes`` are the model's class labels in its column
    order (its manifest's ``classes``, or the ``class_labels`` parameter of its
    config: :func:`class_labels_from_config`); a model whose classes are not
    exactly down, flat and up is refused here, before any decision.
    """

    needs: tuple[str, ...] = ("score",)

    def __init__(
        self,
        n_symbols: int,
        *,
        classes: Sequence[str],
        margin: float = 0.05,
        min_prob: float = 0.4,
        settings: PolicySettings | None = None,
    ) -> None:
        if not (0.0 <= margin < 1.0 and 0.0 < min_prob <= 1.0):
            raise ConfigError(
                f"margin={margin}, min_prob={min_prob}: need 0 <= margin < 1 and "
                "0 < min_prob <= 1 (probabilities)"
            )
        self.columns = direction_columns(classes, "DirectionPolicy")
        self.classes = tuple(classes)
        super().__init__(n_symbols, settings or PolicySettings())
        self.margin, self.min_prob = margin, min_prob

    def check_model(self, classes: Sequence[str], label: str) -> None:
        """Refuse a model (``label``) that answers other classes, or the same in another order."""
        if tuple(classes) != self.classes:
            raise ConfigError(
                f"{label} answers classes {list(classes) or 'none (one score per row)'} but "
                f"this DirectionPolicy reads columns {list(self.classes)}: build the policy "
                "from that model's classes, or serve a down/flat/up model"
            )

    def wanted(self, outputs: Mapping[str, np.ndarray[Any, Any]], ids: I64, current: I8) -> I8:
        p = np.asarray(outputs["score"], dtype=np.float32).reshape(len(ids), -1)
        code, _ = direction_signals(p, self.columns, margin=self.margin, min_prob=self.min_prob)
        return code


def class_labels_from_config(config: Mapping[str, Any]) -> tuple[str, ...]:
    """A model's class labels from its Triton config (JSON, as ``get_model_config`` gives it).

    Empty for a model with one score per row. The build writes them into the
    ``class_labels`` parameter, as a JSON list in the order of the ``score``
    columns; a malformed list is a ConfigError naming the parameter.
    """
    import json

    cfg = config.get("config", config)
    raw = cfg.get("parameters", {}).get("class_labels", {}).get("string_value", "")
    if not raw:
        return ()
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config parameter class_labels={raw!r} is not JSON: {exc}") from exc
    if not isinstance(labels, list) or not all(isinstance(c, str) and c for c in labels):
        raise ConfigError(f"config parameter class_labels={raw!r}: expected a list of labels")
    return tuple(labels)
