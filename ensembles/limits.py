"""The bounds an ensembles model keeps: key sizes, memo bytes, how long a downstream call may take.

Read from the model's ``config.pbtxt`` parameters (units in the names)::

    max_key_bytes        256       longest sticky key; a longer one fails its request (INVALID_ARG)
    max_key_cache_bytes  16777216  the key -> arm memo of each instance, in bytes (0: none)
    bls_timeout_ms       1000      a downstream (BLS) call's limit when the request sets none
    watch_interval_ms    100       how often each instance looks at its watched file
    max_overdue_calls    4         calls to one model past their timeout and not back yet,
                                   beyond which the next call to it fails at once
    cache_max_bytes      0         the routers' answer cache of each instance, in bytes
                                   (0: no cache; see :mod:`ensembles.cache`)
    cache_ttl_ms         60000     how long a cached answer is served (0: no cache)

A downstream call waits at most the request's own timeout (Triton's
per-request ``timeout``, in microseconds: ``tritonclient``'s ``infer(...,
timeout=)``) when the caller set one, else ``bls_timeout_ms``; for several
requests in one batch, the smallest. It is passed on to the downstream
request too (Triton enforces it in a dynamic batcher's queue when the
model's queue policy allows an override). A call still running when its
time is up cannot be taken back from the Python backend: its thread waits
for the answer and it is counted overdue until it comes; :class:`Overdue`
stops a model that never answers from taking every thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from ensembles import keys
from setsuna.errors import ConfigError

#: The answer cache is off unless a model's config turns it on: a row of market
#: features rarely repeats bit for bit, and a miss costs its row's bytes() and a
#: dict insert (see the Ensembles section of docs/architecture.md for figures).
DEFAULT_CACHE_MAX_BYTES: Final = 0
#: Long enough for bursts of the same row (fan-out, retries), short enough that
#: a cached answer never outlives the minute it was computed in.
DEFAULT_CACHE_TTL_MS: Final = 60_000.0


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = keys.DEFAULT_MAX_KEY_BYTES
    max_key_cache_bytes: int = keys.DEFAULT_CACHE_BYTES
    bls_timeout_ms: float = 1000.0
    watch_interval_ms: float = 100.0
    max_overdue_calls: int = 4
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    cache_ttl_ms: float = DEFAULT_CACHE_TTL_MS

    def __post_init__(self) -> None:
        rules: dict[str, tuple[Any, str]] = {
            "max_key_bytes": (lambda v: v >= 1, "a whole number of bytes >= 1"),
            "max_key_cache_bytes": (lambda v: v >= 0, "a whole number of bytes >= 0"),
            "bls_timeout_ms": (lambda v: 0 < v <= 3_600_000, "milliseconds in (0, 3600000]"),
            "watch_interval_ms": (lambda v: 1 <= v <= 60_000, "milliseconds in [1, 60000]"),
            "max_overdue_calls": (lambda v: v >= 1, "a whole number >= 1"),
            "cache_max_bytes": (lambda v: v >= 0, "a whole number of bytes >= 0 (0: off)"),
            "cache_ttl_ms": (lambda v: 0 <= v <= 86_400_000, "milliseconds in [0, 86400000]"),
        }
        for name, (ok, want) in rules.items():
            v = getattr(self, name)
            whole = isinstance(v, int) and not isinstance(v, bool)
            number = whole or (isinstance(v, float) and math.isfinite(v))
            counted = name.startswith("max_") or name.endswith("_bytes")
            if not number or (counted and not whole) or not ok(v):
                raise ConfigError(f"{name}={v!r}: give {want}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model: str) -> Limits:
        """The limits in a model's config parameters; ConfigError names the bad one."""
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            raw = params.get(name, "").strip()
            if not raw:
                continue
            try:
                values[name] = type(default)(raw)
            except ValueError:
                kind = "a whole number" if isinstance(default, int) else "a number"
                raise ConfigError(
                    f"{model}: config parameter {name}={raw!r} is not {kind}"
                ) from None
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{model}: config parameter {exc}") from None

    def parameters(self) -> dict[str, str]:
        """As config parameters (what :meth:`from_parameters` reads back)."""
        return {k: str(v) for k, v in asdict(self).items()}


def call_timeout(request_timeouts_us: Iterable[int], default_ms: float) -> tuple[float, str]:
    """Seconds a downstream call for these requests may take, and where the figure comes from."""
    given = [t for t in request_timeouts_us if t > 0]
    if given:
        return min(given) / 1e6, "the request's timeout"
    return default_ms / 1e3, "bls_timeout_ms"


class Overdue:
    """Calls per downstream model that outlived their timeout and have not returned.

    Thread-safe: counted up by the caller that gave up, down by the thread
    that finally gets the answer.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._n: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, label: str) -> int:
        with self._lock:
            return self._n.get(label, 0)

    def full(self, label: str) -> bool:
        return self.count(label) >= self.limit

    def add(self, label: str) -> None:
        with self._lock:
            self._n[label] = self._n.get(label, 0) + 1

    def done(self, label: str) -> None:
        with self._lock:
            n = self._n.get(label, 0) - 1
            if n > 0:
                self._n[label] = n
            else:
                self._n.pop(label, None)
