"""Probability -> BUY / SELL / HOLD with a confidence, as array operations.

A model says how likely the price goes up; a desk acts on a decision.

**Binary models** (``score`` [1], the probability of "up"): BUY when
``p >= buy_at``, SELL when ``p <= sell_at``, HOLD between. Confidence in
[0, 1] is how far ``p`` sits into its zone: for BUY ``(p - buy_at) / (1 -
buy_at)``, for SELL ``(sell_at - p) / sell_at``, for HOLD the distance to the
nearer threshold over half the band's width (1 in the middle of the band, 0
on its edge). ``thresholds.json``: ``{"buy_at": x, "sell_at": y}``.

**Direction models** (3 classes, ``score`` [3]: the probabilities of
:data:`DIRECTION_CLASSES` ``down``, ``flat``, ``up``, in the column order the
model's manifest records; :func:`direction_columns` maps labels to columns):

- BUY when ``p_up - max(p_down, p_flat) >= margin`` and ``p_up >= min_prob``;
- SELL when ``p_down - max(p_up, p_flat) >= margin`` and ``p_down >= min_prob``;
- HOLD otherwise (a tie of up and down at margin 0 is HOLD too).

Confidence is the winning margin, which already lies in [0, 1]: for BUY
``p_up - max(p_down, p_flat)``, for SELL ``p_down - max(p_up, p_flat)``, for
HOLD ``max(0, p_flat - max(p_down, p_up))`` (0 when HOLD comes from no side
clearing the bar rather than from "flat" winning). A margin counts as met
within :data:`setsuna.policy.EDGE_TOLERANCE` (float32 rounding). ``thresholds.json``:
``{"margin": m, "min_prob": q}`` with ``0 <= m < 1`` and ``0 < q <= 1``. A
row whose probabilities are outside [0, 1] or do not sum to 1 (within
:data:`SUM_TOLERANCE`) is refused like a binary probability outside [0, 1].

**Return models** (regressors of the forward return, ``score`` [1] in return
units: a fraction, 0.0005 is 5 bps): BUY when ``r >= buy_above_return``, SELL
when ``r <= sell_below_return``, HOLD between. Confidence is the distance
into the zone over the band's width (``buy_above_return -
sell_below_return``), capped at 1; for HOLD the distance to the nearer
threshold over half the band's width, as for a probability. A non-finite
prediction is refused. ``thresholds.json``: ``{"buy_above_return": x,
"sell_below_return": y}`` with ``-1 < y < x < 1``. A regressor paired with
probability thresholds, or a classifier with return thresholds, is refused.

Thresholds live in the version folder, so a new threshold is a new model
version, and the version is reported with every decision (``decided_by``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from setsuna import policy
from setsuna.contract import Target
from setsuna.errors import ConfigError, InputError

THRESHOLDS_FILE: Final = "thresholds.json"
#: The labels a direction model's classes must carry (any column order).
DIRECTION_CLASSES: Final = policy.DIRECTION_CLASSES
#: How far a row of class probabilities may sum from 1 (float32 softmax: ~1e-7).
SUM_TOLERANCE: Final = policy.SUM_TOLERANCE


@dataclass(frozen=True)
class Thresholds:
    buy_at: float = 0.55
    sell_at: float = 0.45

    def __post_init__(self) -> None:
        if not (
            math.isfinite(self.buy_at)
            and math.isfinite(self.sell_at)
            and 0.0 < self.sell_at < self.buy_at < 1.0
        ):
            raise ConfigError(
                f"signal thresholds sell_at={self.sell_at}, buy_at={self.buy_at}: need "
                "0 < sell_at < buy_at < 1"
            )

    def to_json(self) -> dict[str, float]:
        return {"buy_at": self.buy_at, "sell_at": self.sell_at}


@dataclass(frozen=True)
class ClassThresholds:
    """The direction rule's thresholds (see the module): a margin and a minimum probability."""

    margin: float = 0.05
    min_prob: float = 0.4

    def __post_init__(self) -> None:
        if not (
            math.isfinite(self.margin)
            and math.isfinite(self.min_prob)
            and 0.0 <= self.margin < 1.0
            and 0.0 < self.min_prob <= 1.0
        ):
            raise ConfigError(
                f"direction thresholds margin={self.margin}, min_prob={self.min_prob}: need "
                "0 <= margin < 1 and 0 < min_prob <= 1 (probabilities)"
            )

    def to_json(self) -> dict[str, float]:
        return {"margin": self.margin, "min_prob": self.min_prob}


@dataclass(frozen=True)
class ReturnThresholds:
    """A forward-return regressor's rule, in return units (0.0005 = 5 bps; see the module)."""

    buy_above_return: float = 0.0005
    sell_below_return: float = -0.0005

    def __post_init__(self) -> None:
        b, s = self.buy_above_return, self.sell_below_return
        if not (math.isfinite(b) and math.isfinite(s) and -1.0 < s < b < 1.0):
            raise ConfigError(
                f"return thresholds sell_below_return={s}, buy_above_return={b}: need "
                "-1 < sell_below_return < buy_above_return < 1 (returns as fractions: "
                "0.0005 is 5 bps)"
            )

    def to_json(self) -> dict[str, float]:
        return {
            "buy_above_return": self.buy_above_return,
            "sell_below_return": self.sell_below_return,
        }


AnyThresholds = Thresholds | ClassThresholds | ReturnThresholds
_KINDS: Final = (
    {"buy_at", "sell_at"},
    {"margin", "min_prob"},
    {"buy_above_return", "sell_below_return"},
)


def load_thresholds(path: Path) -> Thresholds:
    """A binary model's ``thresholds.json`` (the ``signal`` model's); ConfigError otherwise."""
    t = load_any_thresholds(path)
    if not isinstance(t, Thresholds):
        raise ConfigError(
            f"{path}: this model applies the binary rule: give {{'buy_at': x, 'sell_at': y}} "
            "(margin/min_prob is the direction rule, which decide applies)"
        )
    return t


def load_any_thresholds(path: Path) -> AnyThresholds:
    """``thresholds.json`` of a version folder; ConfigError says what is wrong.

    ``{"buy_at": x, "sell_at": y}`` for a binary model's probability,
    ``{"margin": m, "min_prob": q}`` for a direction model's classes.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read signal thresholds {path}: {exc}") from exc
    keys = set(doc) if isinstance(doc, Mapping) else set()
    if keys not in _KINDS:
        raise ConfigError(
            f"{path}: give exactly {{'buy_at': x, 'sell_at': y}} (a binary model), "
            f"{{'margin': m, 'min_prob': q}} (a down/flat/up model) or "
            f"{{'buy_above_return': x, 'sell_below_return': y}} (a return regressor), "
            f"got {doc!r}"
        )
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in doc.values()):
        raise ConfigError(f"{path}: thresholds must be numbers, got {doc!r}")
    if keys == {"margin", "min_prob"}:
        return ClassThresholds(margin=float(doc["margin"]), min_prob=float(doc["min_prob"]))
    if keys == {"buy_above_return", "sell_below_return"}:
        return ReturnThresholds(
            buy_above_return=float(doc["buy_above_return"]),
            sell_below_return=float(doc["sell_below_return"]),
        )
    return Thresholds(buy_at=float(doc["buy_at"]), sell_at=float(doc["sell_at"]))


def direction_columns(classes: Sequence[str], what: str) -> tuple[int, int, int]:
    """Columns of ``down``, ``flat``, ``up`` in a model's ``classes``; ConfigError otherwise."""
    return policy.direction_columns(classes, what)


def arm_classes(
    repo: Path, arms: Sequence[str], targets: Sequence[Target], what: str
) -> tuple[str, ...]:
    """The classes every arm answers (from its manifest): () for one score per row.

    Arms of one experiment must answer the same classes in the same order: a
    row's probabilities are read by column, whichever arm scored it. A folder
    without a manifest (a hand-written leaf model) answers one score.
    """
    from ensembles import names
    from setsuna import manifest
    from setsuna.errors import ArtifactError

    found: dict[str, tuple[str, ...]] = {}
    for arm, t in zip(arms, targets, strict=True):
        try:
            m = manifest.read(names.inside(repo, t.model, str(t.version)))
        except ArtifactError:
            found[arm] = ()
            continue
        found[arm] = tuple(m.classes)
    if len(set(found.values())) > 1:
        shown = ", ".join(
            f"{a} ({targets[i].label}): {list(c) or 'one score'}"
            for i, (a, c) in enumerate(found.items())
        )
        raise ConfigError(
            f"{what}: the arms answer different classes ({shown}); every arm of an "
            "experiment must answer the same classes in the same order: put the others "
            "in their own experiment"
        )
    return next(iter(found.values()), ())


def arm_task(repo: Path, targets: Sequence[Target], what: str) -> str:
    """``classification`` or ``regression``: what every arm's manifest says (they must
    agree: a row's score is read by one rule, whichever arm scored it)."""
    from ensembles import names
    from setsuna import manifest
    from setsuna.errors import ArtifactError

    tasks = {}
    for t in targets:
        try:
            tasks[t.label] = manifest.read(names.inside(repo, t.model, str(t.version))).task
        except ArtifactError:
            tasks[t.label] = "classification"  # a hand-written leaf: one probability
    if len(set(tasks.values())) > 1:
        raise ConfigError(
            f"{what}: the arms mix classifiers and regressors ({tasks}); one experiment's "
            "scores are read by one rule: put them in their own experiments"
        )
    return next(iter(tasks.values()), "classification")


def check_pairing(
    thresholds: AnyThresholds,
    classes: Sequence[str],
    what: str,
    task: str = "classification",
) -> None:
    """Refuse thresholds of one kind for a model of the other, saying which file to give."""
    if task == "regression" and not isinstance(thresholds, ReturnThresholds):
        raise ConfigError(
            f"{what}: the model predicts a return (a regressor) but {THRESHOLDS_FILE} gives a "
            "probability rule: give {'buy_above_return': x, 'sell_below_return': y} in "
            "return units"
        )
    if task != "regression" and isinstance(thresholds, ReturnThresholds):
        raise ConfigError(
            f"{what}: {THRESHOLDS_FILE} gives return thresholds but the model is a "
            "classifier: give {'buy_at': x, 'sell_at': y} (or margin/min_prob for classes)"
        )
    if task == "regression":
        return
    if classes and not isinstance(thresholds, ClassThresholds):
        raise ConfigError(
            f"{what}: the model answers class probabilities {list(classes)} but "
            f"{THRESHOLDS_FILE} gives buy_at/sell_at (a binary rule): give "
            "{'margin': m, 'min_prob': q}"
        )
    if not classes and isinstance(thresholds, ClassThresholds):
        raise ConfigError(
            f"{what}: the model answers one probability but {THRESHOLDS_FILE} gives "
            "margin/min_prob (the direction rule): give {'buy_at': x, 'sell_at': y}"
        )


def decide_classes(
    p: npt.NDArray[np.float32], t: ClassThresholds, columns: tuple[int, int, int]
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Signal codes and confidences for rows of direction probabilities (see the module).

    ``p`` is ``[n, 3]``; ``columns`` the (down, flat, up) columns from
    :func:`direction_columns`. Raises InputError for a row outside [0, 1] or
    not summing to 1 (NaN included): a broken model must not trade. The rule
    itself is :func:`setsuna.policy.direction_signals`, which the SDK's
    :class:`~setsuna.policy.DirectionPolicy` applies too.
    """
    return policy.direction_signals(p, columns, margin=t.margin, min_prob=t.min_prob)


def apply(
    p: npt.NDArray[np.float32], t: AnyThresholds, columns: tuple[int, int, int] | None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """The rule for ``t``'s kind: :func:`decide` (binary), :func:`decide_classes` or
    :func:`decide_returns`."""
    if isinstance(t, ReturnThresholds):
        return decide_returns(p, t)
    if isinstance(t, ClassThresholds):
        if columns is None:
            raise ConfigError("direction thresholds need the model's class columns")
        return decide_classes(p, t, columns)
    return decide(p, t)


def decide(
    p: npt.NDArray[np.float32], t: Thresholds
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Signal codes (:class:`setsuna.contract.Signal`) and confidences for probabilities ``p``.

    Raises InputError for anything outside [0, 1] (NaN included): a broken
    upstream model must not turn into a confident trade.
    """
    q = np.asarray(p, dtype=np.float64).reshape(-1)
    if not ((q >= 0.0) & (q <= 1.0)).all():  # NaN compares False both ways
        i = int(np.flatnonzero(~((q >= 0.0) & (q <= 1.0)))[0])
        raise InputError(
            f"probability {q[i]!r} at row {i} is outside [0, 1]; the upstream model is "
            "broken or not a classifier"
        )
    # Zones are decided in float32, the precision models answer in: a score printed
    # as 0.4 is on the SELL edge of sell_at=0.4, not 6e-9 above it.
    q32 = q.astype(np.float32)
    buy, sell = q32 >= np.float32(t.buy_at), q32 <= np.float32(t.sell_at)
    code = buy.astype(np.int8) - sell.astype(np.int8)  # Signal.BUY 1, HOLD 0, SELL -1
    # Each zone's distance, scaled to [0, 1]; the zone picks which one applies.
    hold = np.minimum(q - t.sell_at, t.buy_at - q) * (2.0 / (t.buy_at - t.sell_at))
    conf = np.where(buy, (q - t.buy_at) / (1.0 - t.buy_at), hold)
    conf = np.where(sell, (t.sell_at - q) / t.sell_at, conf)
    return code, np.clip(conf, 0.0, 1.0).astype(np.float32)


def decide_returns(
    r: npt.NDArray[np.float32], t: ReturnThresholds
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Signal codes and confidences for predicted returns ``r`` (see the module).

    Raises InputError for a non-finite prediction: a broken regressor must not
    trade.
    """
    q = np.asarray(r, dtype=np.float64).reshape(-1)
    if not np.isfinite(q).all():
        i = int(np.flatnonzero(~np.isfinite(q))[0])
        raise InputError(f"predicted return {q[i]!r} at row {i} is not finite")
    q32 = q.astype(np.float32)  # zones in the precision models answer in
    buy = q32 >= np.float32(t.buy_above_return)
    sell = q32 <= np.float32(t.sell_below_return)
    code = buy.astype(np.int8) - sell.astype(np.int8)
    band = t.buy_above_return - t.sell_below_return
    hold = np.minimum(q - t.sell_below_return, t.buy_above_return - q) * (2.0 / band)
    conf = np.where(buy, (q - t.buy_above_return) / band, hold)
    conf = np.where(sell, (t.sell_below_return - q) / band, conf)
    return code, np.clip(conf, 0.0, 1.0).astype(np.float32)
