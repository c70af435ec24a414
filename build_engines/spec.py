"""Per-model build settings, validated once when the spec is made.

A :class:`ModelSpec` says how strict the gate is for this model, which
figure picks the winner (``latency``: single-row p50; ``throughput``: rows/s
at 1,024), and how Triton should serve it (batching, instances, cache).
Defaults suit a trading desk: small queue delays, two CPU instances on a
two-core host; overload is bounded by deadlines, not by a Triton queue policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from build_engines.gate import GateSettings
from setsuna.errors import ConfigError

Profile = Literal["latency", "throughput"]
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class ServingSpec:
    """What goes into ``config.pbtxt`` besides the tensors."""

    max_batch_size: int = 1024
    #: Off serves each request as it comes (one execute per request): lowest
    #: latency at c=1, no help under concurrency. make perf measures both.
    dynamic_batching: bool = True
    #: Batches the dynamic batcher tries to form; each must be <= max_batch_size.
    preferred_batch_sizes: tuple[int, ...] = (8, 32, 128)
    #: How long the batcher may hold the first request waiting for company. There is
    #: deliberately no Triton queue policy (size, timeout): with dynamic batching it
    #: stalls 2.51's batcher (setsuna.model_config.QUEUE_POLICY_STALL); the caller's
    #: deadline travels with each request and the backend sheds what cannot make it.
    max_queue_delay_us: int = 100
    cpu_instances: int = 2
    gpu_instances: int = 1
    #: Off by default: Triton 2.51 caches a Python-backend *error* response as an
    #: empty success, so a request refused once (NaN, say) "succeeds" with no
    #: output when repeated (measured; tests/setsuna/test_serving_faults.py).
    #: Turn it on only where a model can never refuse an input.
    response_cache: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1 << 20:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be in 1..1048576")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(
                f"preferred_batch_sizes {bad} outside 1..max_batch_size={self.max_batch_size}"
            )
        if self.max_queue_delay_us < 0:
            raise ConfigError("max_queue_delay_us must be >= 0 (0 batches only what is queued)")
        if self.cpu_instances < 1 or self.gpu_instances < 1:
            raise ConfigError("cpu_instances and gpu_instances must be >= 1")


@dataclass(frozen=True)
class ModelSpec:
    """One model's name, gate and serving settings."""

    name: str
    profile: Profile = "latency"
    gate: GateSettings = field(default_factory=GateSettings)
    serving: ServingSpec = field(default_factory=ServingSpec)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"model name {self.name!r} must be lowercase letters, digits and '_', "
                "starting with a letter (it becomes a Triton model and folder name)"
            )
        if self.profile not in ("latency", "throughput"):
            raise ConfigError(f"profile {self.profile!r} must be 'latency' or 'throughput'")
