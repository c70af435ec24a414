"""What the sweep measured for one variant, and the stall check over it.

**Stalls**: every run writes perf_analyzer's per-request export, and a request
slower than :data:`~build_engines.tuning.perf_analyzer.STALL_LATENCY_US`
(450 ms) is a stall, as is a request Triton refused with ``Request timeout
expired`` (a hand-made config with a queue policy). In Triton 2.51 a
``default_queue_policy`` turns the dynamic batcher's payload pre-fetching off,
and a request that lands between a response and the instance's release then
sleeps 500 ms (``setsuna.model_config.batching_hazards``). The builder writes
no queue policy, so the sweep should find none; the report counts stalls,
requests checked and the slowest request per variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.variants import Variant


@dataclass
class VariantResult:
    """Every run against one variant's server (a failed start leaves ``runs`` short)."""

    variant: Variant
    runs: list[pa.RunResult] = field(default_factory=list)
    server_error: str = ""
    startup_s: float | None = None

    def find(
        self, protocol: str, concurrency: int, batch: int = 1, *, random: bool = False
    ) -> pa.RunResult | None:
        for r in reversed(self.runs):
            s = r.spec
            if (
                r.ok
                and s.protocol == protocol
                and s.concurrency == concurrency
                and s.batch_size == batch
                and (s.input_data is None) == random
            ):
                return r
        return None

    def sweep(self, protocol: str) -> list[pa.RunResult]:
        """Successful batch-1 runs on distinct rows, by concurrency."""
        points = {
            r.spec.concurrency: r
            for r in self.runs
            if r.ok
            and r.spec.protocol == protocol
            and r.spec.batch_size == 1
            and r.spec.input_data is not None
        }
        return [points[c] for c in sorted(points)]

    def best_within(self, protocol: str, budget_us: float) -> pa.RunResult | None:
        ok = [r for r in self.sweep(protocol) if r.row is not None and r.row.p99_us <= budget_us]
        return max(ok, key=throughput, default=None)

    @property
    def stalled(self) -> bool:
        """Whether any run (failed ones too) saw a stalled request.

        A stall is a request slower than the run's ``stall_latency_us`` in
        perf_analyzer's per-request export, or one Triton refused for waiting past a
        queue policy's timeout. Measured with Triton 2.51: with dynamic batching and
        a queue policy (which turns payload pre-fetching off) a request now and then
        waits ~500 ms, the batcher's idle sleep (``default_wait_microseconds``): one
        that lands after the response went out but before the instance is released
        wakes nobody (identity model, c=1, one instance: 143 in 10,000 requests with
        ``max_queue_size`` alone, 0 in 10,000 without a policy). A trading call
        cannot wait half a second now and then, so one stall disqualifies.
        """
        return any(r.stalls for r in self.runs)

    @property
    def stall_count(self) -> int:
        return sum(r.stalls for r in self.runs)

    @property
    def requests_checked(self) -> int:
        """Requests whose latency the stall check saw (every exported request)."""
        return sum(r.requests.requests for r in self.runs if r.requests is not None)

    @property
    def unchecked_runs(self) -> int:
        """Successful runs without an export (stalls in them would go unseen)."""
        return sum(1 for r in self.runs if r.ok and r.requests is None)

    @property
    def max_latency_us(self) -> float | None:
        """The slowest request seen in any run's export (batch-1 and batched runs)."""
        return max((x for r in self.runs if (x := r.max_latency_us) is not None), default=None)

    def c1_p99_us(self, protocol: str) -> float:
        pts = self.sweep(protocol)
        row = pts[0].row if pts else None
        return row.p99_us if row is not None else math.inf

    def c1_p50_us(self, protocol: str) -> float:
        pts = self.sweep(protocol)
        row = pts[0].row if pts else None
        return row.p50_us if row is not None else math.inf


def throughput(r: pa.RunResult) -> float:
    """Rows per second of a run; 0 for one that reported nothing."""
    return r.row.throughput_infer_s if r.row is not None else 0.0


# --------------------------------------------------------------------------- as JSON


def row_json(r: pa.RunResult | None) -> dict[str, Any] | None:
    if r is None or r.row is None:
        return None
    return {
        "protocol": r.spec.protocol,
        "concurrency": r.spec.concurrency,
        "batch": r.spec.batch_size,
        "infer_s": round(r.row.throughput_infer_s, 1),
        "p50_ms": round(r.row.p50_us / 1000, 3),
        "p99_ms": round(r.row.p99_us / 1000, 3),
        "avg_batch": None if r.server.avg_batch is None else round(r.server.avg_batch, 2),
        "cache_hit_share": r.server.hit_share,
    }


def variant_json(vr: VariantResult, protocol: str, budget_us: float) -> dict[str, Any]:
    return {
        "name": vr.variant.name,
        "describe": vr.variant.describe(),
        "serving": vr.variant.knobs(),
        "startup_s": vr.startup_s,
        "server_error": vr.server_error,
        "best_within_budget": row_json(vr.best_within(protocol, budget_us)),
        "stall_check": stall_json(vr),
        "runs": [r.to_json() for r in vr.runs],
    }


def stall_json(vr: VariantResult) -> dict[str, Any]:
    top = vr.max_latency_us
    return {
        "stalls": vr.stall_count,
        "requests_checked": vr.requests_checked,
        "unchecked_runs": vr.unchecked_runs,
        "max_latency_ms": None if top is None else round(top / 1000, 3),
        "stall_latency_ms": pa.STALL_LATENCY_US / 1000,
    }
