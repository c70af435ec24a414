"""Several models, one answer: the combiner's member file and the combination rule.

::

    {"format": 1, "method": "mean",
     "members": [{"model": "lightgbm", "version": 1, "weight": 0.6},
                 {"model": "xgboost", "version": 1, "weight": 0.4}]}

``mean`` is the weighted average of the members' probabilities (weights are
normalised). ``logit`` is linear stacking: ``sigmoid(bias + sum w_i *
logit(p_i))``, the form a logistic meta-model fitted on the members' held-out
outputs takes (probabilities clipped to [1e-7, 1 - 1e-7] first). Every member
pins its version, and the answer names them all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from ensembles.watch import decode_json, read_bytes
from setsuna.contract import Target
from setsuna.errors import ConfigError

FORMAT: Final = 1
METHODS: Final = ("mean", "logit")
_EPS: Final = 1e-7


@dataclass(frozen=True)
class Members:
    method: Literal["mean", "logit"]
    targets: tuple[Target, ...]
    weights: tuple[float, ...]
    bias: float = 0.0

    @property
    def label(self) -> str:
        """Every member's ``model:version``, comma-separated: what produced the answer."""
        return ",".join(t.label for t in self.targets)

    def combine(self, scores: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
        """Combine the members' ``[n, 1]`` probabilities, in member order."""
        p = np.hstack([np.asarray(s, dtype=np.float64).reshape(-1, 1) for s in scores])
        w = np.asarray(self.weights, dtype=np.float64)
        if self.method == "mean":
            out = p @ (w / w.sum())
        else:
            q = np.clip(p, _EPS, 1 - _EPS)
            z = self.bias + np.log(q / (1 - q)) @ w
            out = 1.0 / (1.0 + np.exp(-z))
        return np.asarray(out, dtype=np.float32).reshape(-1, 1)


def parse(doc: Any, *, origin: str = "members") -> Members:
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ConfigError(f"{origin}: expected a JSON object with 'format': {FORMAT}")
    unknown = set(doc) - {"format", "method", "members", "bias"}
    if unknown:
        raise ConfigError(f"{origin}: unknown fields {sorted(unknown)}")
    method = doc.get("method", "mean")
    if method not in METHODS:
        raise ConfigError(f"{origin}: method {method!r} is not one of {METHODS}")
    raw = doc.get("members")
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError(f"{origin}: 'members' must list at least two models")
    targets, weights = [], []
    for i, m in enumerate(raw):
        at = f"{origin}: members[{i}]"
        if not isinstance(m, Mapping) or "weight" not in m:
            raise ConfigError(f"{at}: give {{'model', 'version', 'weight'}}")
        targets.append(Target.from_json({k: m[k] for k in m if k != "weight"}, at))
        w = m["weight"]
        ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
        if not ok or (method == "mean" and w <= 0):
            raise ConfigError(
                f"{at}: weight {w!r} must be a finite number"
                + (" > 0 for 'mean'" if method == "mean" else "")
            )
        weights.append(float(w))
    if len({t.label for t in targets}) != len(targets):
        raise ConfigError(f"{origin}: a member is listed twice")
    bias = doc.get("bias", 0.0)
    if method == "mean" and bias not in (0, 0.0):
        raise ConfigError(f"{origin}: 'bias' applies to method 'logit' only")
    if not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ConfigError(f"{origin}: bias {bias!r} must be a finite number")
    return Members(method, tuple(targets), tuple(weights), float(bias))


def loads(data: bytes, origin: str) -> Members:
    """Validate the bytes of a member file read from ``origin`` (named in errors)."""
    return parse(decode_json(data, origin, "member"), origin=origin)


def load(path: Path) -> Members:
    return loads(read_bytes(path), str(path))
