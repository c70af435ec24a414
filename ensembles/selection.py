"""Which variant of a model family answers: the most accurate that fits the latency budget.

The selector file names the family's variants (fp32 ONNX, INT8, compiled
trees of one source...), the p99 budget, and each variant's prior accuracy
(from the gate report)::

    {"format": 1, "family": "lightgbm", "budget_p99_ms": 2.0,
     "variants": [{"model": "lightgbm_onnx", "version": 1, "prior_accuracy": 0.999},
                  {"model": "lightgbm", "version": 1, "prior_accuracy": 0.998}],
     "margin": 0.2, "min_dwell_calls": 50, "probe_interval_ms": 200, "window": 200,
     "prior_weight": 100}

Accuracy blends the prior with realised outcomes fed back through the
``feedback`` model: ``(prior * prior_weight + hits) / (prior_weight + n)``.
Latency is the selector's own timing of each BLS call (so it includes the
queueing of the current load): p99 over the last ``window`` calls; variants
not serving are probed every ``probe_interval_ms`` from a thread of the selector.

Hysteresis, so it does not flap: the serving variant stays while its p99 is
within ``budget * (1 + margin)``; another replaces it only when it is more
accurate and its p99 is within ``budget * (1 - margin)``; and no switch
happens within ``min_dwell_calls`` calls of the last one (except to leave a
variant that failed).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ensembles.watch import decode_json, read_bytes
from setsuna.contract import Target
from setsuna.errors import ConfigError

FORMAT: Final = 1


@dataclass(frozen=True)
class Variant:
    target: Target
    prior_accuracy: float


@dataclass(frozen=True)
class SelectorSpec:
    family: str
    budget_p99_ms: float
    variants: tuple[Variant, ...]
    margin: float = 0.2
    min_dwell_calls: int = 50
    probe_interval_ms: float = 200.0
    window: int = 200
    prior_weight: float = 100.0


def _number(doc: Mapping[str, Any], key: str, default: float, ok: Any, at: str) -> float:
    v = doc.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
        raise ConfigError(f"{at}: {key}={v!r} is out of range")
    return float(v)


def parse(doc: Any, *, origin: str = "selector") -> SelectorSpec:
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ConfigError(f"{origin}: expected a JSON object with 'format': {FORMAT}")
    known = {
        "format", "family", "budget_p99_ms", "variants", "margin",
        "min_dwell_calls", "probe_interval_ms", "window", "prior_weight",
    }  # fmt: skip
    if set(doc) - known:
        raise ConfigError(f"{origin}: unknown fields {sorted(set(doc) - known)}")
    family = doc.get("family")
    if not isinstance(family, str) or not family:
        raise ConfigError(f"{origin}: 'family' must name the model family")
    raw = doc.get("variants")
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError(f"{origin}: 'variants' must list at least two models")
    variants = []
    for i, v in enumerate(raw):
        at = f"{origin}: variants[{i}]"
        if not isinstance(v, Mapping):
            raise ConfigError(f"{at}: give {{'model', 'version', 'prior_accuracy'}}")
        target = Target.from_json({k: v[k] for k in v if k != "prior_accuracy"}, at)
        acc = _number(v, "prior_accuracy", -1.0, lambda x: 0 <= x <= 1, at)
        variants.append(Variant(target, acc))
    if len({v.target.label for v in variants}) != len(variants):
        raise ConfigError(f"{origin}: a variant is listed twice")
    return SelectorSpec(
        family=family,
        budget_p99_ms=_number(doc, "budget_p99_ms", -1.0, lambda x: x > 0, origin),
        variants=tuple(variants),
        margin=_number(doc, "margin", 0.2, lambda x: 0 <= x < 1, origin),
        min_dwell_calls=int(_number(doc, "min_dwell_calls", 50, lambda x: x >= 0, origin)),
        probe_interval_ms=_number(doc, "probe_interval_ms", 200.0, lambda x: x >= 1, origin),
        window=int(_number(doc, "window", 200, lambda x: x >= 10, origin)),
        prior_weight=_number(doc, "prior_weight", 100.0, lambda x: x >= 0, origin),
    )


def loads(data: bytes, origin: str) -> SelectorSpec:
    """Validate the bytes of a selector file read from ``origin`` (named in errors)."""
    return parse(decode_json(data, origin, "selector"), origin=origin)


def load(path: Path) -> SelectorSpec:
    return loads(read_bytes(path), str(path))


class Latency:
    """The last ``window`` call latencies of one variant, in milliseconds."""

    def __init__(self, window: int) -> None:
        self._ms: deque[float] = deque(maxlen=window)

    def resize(self, window: int) -> None:
        if window != self._ms.maxlen:
            self._ms = deque(self._ms, maxlen=window)

    def add(self, ms: float) -> None:
        self._ms.append(ms)

    def p99_ms(self) -> float:
        """p99 of the window; +inf until a variant has been measured at least 10 times."""
        if len(self._ms) < 10:
            return math.inf
        return float(np.percentile(np.fromiter(self._ms, float), 99))


def accuracy(prior: float, prior_weight: float, hits: int, n: int) -> float:
    return (prior * prior_weight + hits) / (prior_weight + n) if prior_weight + n > 0 else prior


def initial(spec: SelectorSpec) -> int:
    """Before any measurement: the most accurate prior."""
    return max(range(len(spec.variants)), key=lambda i: spec.variants[i].prior_accuracy)


def choose(
    spec: SelectorSpec,
    current: int,
    p99_ms: Sequence[float],
    acc: Sequence[float],
    calls_since_switch: int,
    *,
    failed: bool = False,
) -> int:
    """Index of the variant to serve next (``current`` unless the rules say move)."""
    hi = spec.budget_p99_ms * (1 + spec.margin)
    lo = spec.budget_p99_ms * (1 - spec.margin)
    n = len(spec.variants)
    if not failed and calls_since_switch < spec.min_dwell_calls:
        return current
    unknown = math.isinf(p99_ms[current])  # not measured yet: nothing says leave
    keep = not failed and (unknown or p99_ms[current] <= hi)
    if keep:
        better = [i for i in range(n) if i != current and acc[i] > acc[current] and p99_ms[i] <= lo]
        return max(better, key=lambda i: (acc[i], -p99_ms[i])) if better else current
    others = [i for i in range(n) if i != current]
    fits = [i for i in others if p99_ms[i] <= lo]
    if fits:
        return max(fits, key=lambda i: (acc[i], -p99_ms[i]))
    # Nothing measured fits: the fastest measured, if it is faster by the margin too
    # (a spike in the serving variant's window must not send it to a slower one).
    measured = [i for i in others if math.isfinite(p99_ms[i])]
    if measured:
        best = min(measured, key=lambda i: p99_ms[i])
        faster = p99_ms[best] < p99_ms[current] * (1 - spec.margin)
        return best if failed or faster else current
    return others[0] if failed else current
