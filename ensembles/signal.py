"""Probability -> BUY / SELL / HOLD with a confidence, as array operations.

A model says how likely the price goes up; a desk acts on a decision. The
rule: BUY when ``p >= buy_at``, SELL when ``p <= sell_at``, HOLD between.
Confidence in [0, 1] is how far ``p`` sits into its zone: for BUY
``(p - buy_at) / (1 - buy_at)``, for SELL ``(sell_at - p) / sell_at``, for
HOLD the distance to the nearer threshold over half the band's width (1 in the
middle of the band, 0 on its edge). Thresholds live in the model's config
(``parameters``), so a new threshold is a new model version, and the version
is reported with every decision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from setsuna.errors import ConfigError, InputError

THRESHOLDS_FILE: Final = "thresholds.json"


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


def load_thresholds(path: Path) -> Thresholds:
    """``thresholds.json`` of a signal version folder; ConfigError says what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read signal thresholds {path}: {exc}") from exc
    if not isinstance(doc, Mapping) or set(doc) != {"buy_at", "sell_at"}:
        raise ConfigError(f"{path}: give exactly {{'buy_at': x, 'sell_at': y}}, got {doc!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in doc.values()):
        raise ConfigError(f"{path}: thresholds must be numbers, got {doc!r}")
    return Thresholds(buy_at=float(doc["buy_at"]), sell_at=float(doc["sell_at"]))


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
