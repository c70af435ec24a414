"""build_engines.tuning: the variants, the choice rule and the report.

The choice is tested on hand-made results (the rule, not the host's speed);
test_tuning_sweep.py serves real models, test_tuning_tuned.py the settings file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from build_engines.spec import ServingSpec
from build_engines.tuning import choice as rule
from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.choice import choice_json, choose
from build_engines.tuning.report import markdown
from build_engines.tuning.results import VariantResult
from build_engines.tuning.sweep import Settings
from build_engines.tuning.variants import Variant, make_variants


def _run(
    variant: str,
    c: int,
    rate: float,
    p99_ms: float,
    *,
    ok: bool = True,
    message: str = "boom",
    slow_ms: tuple[float, ...] = (),
) -> pa.RunResult:
    """A run; ``slow_ms``: latencies of requests past the stall threshold in its export."""
    spec = pa.RunSpec(variant, "127.0.0.1:1", "grpc", concurrency=c, input_data=Path("rows.json"))
    row = pa.LatencyRow(c, rate, p99_ms * 400, p99_ms * 700, p99_ms * 800, p99_ms * 1000)
    if not ok:
        return pa.RunResult(spec, "failed", 1, 1.0, message=message)
    stalls = tuple(sorted((x * 1000 for x in slow_ms), reverse=True))
    stats = pa.RequestStats(
        requests=int(rate),
        stalls=len(stalls),
        stall_latency_us=pa.STALL_LATENCY_US,
        max_latency_us=max((*stalls, p99_ms * 3000)),
        span_s=1.0,
        stall_latencies_us=stalls,
    )
    return pa.RunResult(spec, "ok", 0, 1.0, row, requests=stats)


def _result(v: Variant, *points: tuple[int, float, float]) -> VariantResult:
    return VariantResult(v, [_run(v.name, c, rate, p99) for c, rate, p99 in points])


VARIANTS = {v.name: v for v in make_variants()}


def test_variants_cover_the_knobs_and_start_with_default() -> None:
    vs = make_variants()
    assert vs[0].name == "default" and vs[0].serving == ServingSpec()
    knobs = [json.dumps(v.knobs(), sort_keys=True) for v in vs]
    assert len(set(knobs)) == len(knobs)  # no duplicate configs
    assert {v.serving.cpu_instances for v in vs} >= {1, 2, 4}
    assert {v.serving.max_queue_delay_us for v in vs if v.dynamic_batching} >= {0, 100, 500}
    assert any(not v.dynamic_batching for v in vs)
    assert any(v.serving.response_cache for v in vs)
    assert any(v.serving.preferred_batch_sizes == () for v in vs)


def test_highest_throughput_within_budget_wins() -> None:
    a = _result(VARIANTS["db0-2i"], (1, 2000, 0.8), (4, 5000, 1.9), (32, 9000, 12))
    b = _result(VARIANTS["db500-2i"], (1, 1500, 1.0), (4, 4000, 1.5), (32, 9500, 10))
    choice = choose([a, b], "grpc", 2000)
    assert choice.variant is a and choice.budget_met
    assert choice.point is not None and choice.point.spec.concurrency == 4


def test_ties_go_to_the_lowest_single_request_p99() -> None:
    a = _result(VARIANTS["db0-2i"], (1, 2000, 0.95), (4, 5000, 1.9))
    b = _result(VARIANTS["db500-2i"], (1, 1800, 0.9), (4, 4900, 1.9))  # within 20 %
    choice = choose([a, b], "grpc", 2000)
    assert choice.variant is b and "tied" in choice.why


def test_among_ties_fewer_instances_win_before_latency() -> None:
    four = _result(VARIANTS["db100-4i"], (1, 2000, 0.7), (8, 8200, 1.9))
    two = _result(VARIANTS["default"], (1, 1900, 0.9), (8, 8000, 1.8))  # within 20 %
    choice = choose([four, two], "grpc", 2000)
    assert choice.variant is two and "fewest instances" in choice.why


def test_on_the_native_backend_ties_go_to_the_instance_count_nearest_the_cores() -> None:
    # An instance of setsuna_forest is a thread, not a process: among tied variants
    # the one with an instance per core wins (large batches then run side by side).
    one = _result(VARIANTS["db100-1i"], (1, 2000, 0.7), (32, 9000, 6.0))
    two = _result(VARIANTS["default"], (1, 2000, 0.9), (32, 8800, 6.0))
    four = _result(VARIANTS["db100-4i"], (1, 2000, 0.6), (32, 9100, 6.0))
    choice = choose([one, two, four], "grpc", 10_000, instances_are_threads=True, cores=2)
    assert choice.variant is two and "nearest the 2 cores" in choice.why
    assert choose([one, two, four], "grpc", 10_000).variant is one  # processes: fewest
    assert choose([one, four], "grpc", 10_000, instances_are_threads=True, cores=2).variant is one


def test_an_instance_must_buy_more_than_the_run_to_run_spread() -> None:
    """A process that adds 15 % on this host's noisy figures is not kept; one that adds 30 % is."""
    one = _result(VARIANTS["db100-1i"], (1, 2000, 0.8), (32, 8500, 6.0))
    for more, kept in ((10_000, False), (12_200, True)):
        two = _result(VARIANTS["default"], (1, 2000, 0.8), (32, more, 6.0))
        choice = choose([two, one], "grpc", 10_000)
        assert (choice.variant is two) is kept, (more, choice.why)


def test_a_variant_slow_for_a_lone_request_is_not_eligible() -> None:
    slow_alone = _result(VARIANTS["db500-2i"], (1, 900, 1.6), (8, 9000, 1.9))
    fast_alone = _result(VARIANTS["db0-2i"], (1, 2400, 0.6), (4, 5200, 1.5))
    choice = choose([slow_alone, fast_alone], "grpc", 2000)
    assert choice.variant is fast_alone
    assert "single-request" in choice.not_eligible["db500-2i"]
    only_slow = choose([slow_alone], "grpc", 2000)
    assert only_slow.variant is slow_alone and not only_slow.budget_met
    assert "c=1 p99 within the single-request budget of 1 ms" in only_slow.why


def test_cache_and_batching_off_are_not_eligible_unless_allowed() -> None:
    cache = _result(VARIANTS["db100-2i-cache"], (1, 9000, 0.2))
    off = _result(VARIANTS["nobatch-2i"], (1, 8000, 0.3))
    default = _result(VARIANTS["default"], (1, 1000, 1.0))
    choice = choose([default, cache, off], "grpc", 2000)
    assert choice.variant is default
    assert "db100-2i-cache" in choice.not_eligible
    assert choice.not_eligible["nobatch-2i"].startswith("batching off")
    allowed_off = choose([default, cache, off], "grpc", 2000, allow_batching_off=True)
    assert allowed_off.variant is off
    allowed = choose([default, cache], "grpc", 2000, allow_cache=True)
    assert allowed.variant is cache


def test_default_budget_is_the_c32_target() -> None:
    """10 ms at c=32 (>= 10k infer/s) and 1 ms at c=1: the serving targets."""
    assert set(rule.DEFAULT_BUDGET_P99_MS.values()) == {10.0}
    assert rule.FALLBACK_BUDGET_P99_MS == 10.0 and rule.C1_BUDGET_P99_US == 1000.0
    # Measured shapes (lightgbm, 2026-12-01): batching off wins only under a 2 ms budget.
    off = _result(VARIANTS["nobatch-1i"], (1, 3037, 0.58), (2, 4748, 0.78), (32, 3961, 12.5))
    on = _result(VARIANTS["db100-2i-nopref"], (1, 1742, 0.82), (2, 2478, 1.6), (32, 12132, 7.1))
    budget_us = rule.DEFAULT_BUDGET_P99_MS["lightgbm"] * 1000
    choice = choose([off, on], "grpc", budget_us, allow_batching_off=True)
    assert choice.variant is on and choice.point is not None
    assert choice.point.spec.concurrency == 32
    assert choose([off, on], "grpc", 2000, allow_batching_off=True).variant is off


def test_nothing_within_budget_falls_back_to_lowest_latency() -> None:
    a = _result(VARIANTS["db0-2i"], (1, 2000, 3.0))
    b = _result(VARIANTS["db500-2i"], (1, 1500, 2.5))
    choice = choose([a, b], "grpc", 2000)
    assert choice.variant is b and not choice.budget_met


def test_failed_runs_do_not_count() -> None:
    v = VARIANTS["db0-2i"]
    vr = VariantResult(v, [_run(v.name, 1, 99999, 0.1, ok=False)])
    choice = choose([vr], "grpc", 2000)
    assert choice.variant is None and choice.not_eligible == {"db0-2i": "no successful run"}


def test_one_queue_timeout_disqualifies_a_variant_however_fast() -> None:
    """A request stranded by the batcher is a latency spike no throughput pays for."""
    fast = _result(VARIANTS["db100-2i-nopref"], (1, 3000, 0.5), (8, 12000, 1.5))
    stall = "Thread [3] had error: Request timeout expired"
    fast.runs.append(_run("db100-2i-nopref", 16, 0, 0, ok=False, message=stall))
    safe = _result(VARIANTS["db0-2i"], (1, 2900, 0.5), (8, 6000, 1.8))
    choice = choose([fast, safe], "grpc", 2000)
    assert choice.variant is safe
    assert "500 ms" in choice.not_eligible["db100-2i-nopref"]
    assert not safe.stalled and fast.stalled


def test_one_slow_request_in_the_export_disqualifies_a_variant() -> None:
    """No queue policy, no refusal: the stall shows only as one request of ~500 ms."""
    fast = _result(VARIANTS["db100-2i-nopref"], (1, 3000, 0.5))
    fast.runs.append(_run("db100-2i-nopref", 8, 12000, 1.5, slow_ms=(501.2,)))
    safe = _result(VARIANTS["default"], (1, 2900, 0.5), (8, 9000, 1.8))
    assert fast.stalled and fast.stall_count == 1 and fast.max_latency_us == 501_200
    assert not safe.stalled and safe.requests_checked == 2900 + 9000
    choice = choose([fast, safe], "grpc", 2000)
    assert choice.variant is safe and "stalled" in choice.not_eligible["db100-2i-nopref"]


def test_batching_variants_without_stalls_are_eligible_again() -> None:
    """Batching wins on throughput once nothing stalls (the stall was the queue policy's)."""
    batching = _result(VARIANTS["db100-2i-nopref"], (1, 2800, 0.6), (8, 11000, 1.8))
    off = _result(VARIANTS["nobatch-2i"], (1, 2900, 0.5), (8, 6000, 1.8))
    choice = choose([batching, off], "grpc", 2000, allow_batching_off=True)
    assert choice.variant is batching and not choice.not_eligible
    assert "queue policy" in rule.STALL_WHY and "500 ms" in rule.STALL_WHY


def test_report_shows_stalls_requests_checked_and_the_slowest() -> None:
    settings = Settings(concurrency=(1, 8))
    stalled = _result(VARIANTS["db0-2i"], (1, 3000, 0.5))
    stalled.runs.append(_run("db0-2i", 8, 12000, 1.5, slow_ms=(501.0, 503.5)))
    clean = _result(VARIANTS["default"], (1, 2900, 0.5), (8, 9000, 1.8))
    unchecked = _result(VARIANTS["db500-2i"], (1, 2500, 0.7))
    unchecked.runs = [dataclasses.replace(r, requests=None) for r in unchecked.runs]
    results = [clean, stalled, unchecked]
    choice = choose(results, "grpc", 2000)
    doc = {
        "host": {"cpus": 2, "platform": "test", "load_before": 0.1, "load_after": 0.2},
        "perf_analyzer": "Perf Analyzer Version 2.47.0",
        "_settings": settings,
        "models": [
            {
                "model": "m",
                "engine": "onnx",
                "candidate": "c",
                "budget_p99_ms": 2.0,
                "input": {"rows": 10, "origin": "test rows"},
                "config_drift": "",
                "_results": results,
                "_choice": choice,
            }
        ],
    }
    text = markdown(doc, {}, "")
    assert "| **2** / 15,000, 503.50 |" in text  # the stalled variant: bold count, slowest
    assert "| 0 / 11,900, 5.40 |" in text  # clean: every request checked, slowest 5.4 ms
    assert "1 run(s) without a stall check" in text
    assert choice.variant is clean
    stall_json = choice_json(choice, "grpc")["stall_check"]
    assert stall_json == {
        "stalls": 0,
        "requests_checked": 11_900,
        "unchecked_runs": 0,
        "max_latency_ms": 5.4,
        "stall_latency_ms": 450.0,
    }


def test_a_variant_that_stalled_on_another_model_is_not_eligible() -> None:
    fast = _result(VARIANTS["db100-2i-nopref"], (1, 3000, 0.5), (8, 12000, 1.5))
    safe = _result(VARIANTS["db0-2i"], (1, 2900, 0.5), (8, 6000, 1.8))
    assert choose([fast, safe], "grpc", 2000).variant is fast
    choice = choose([fast, safe], "grpc", 2000, stalled_elsewhere={"db100-2i-nopref"})
    assert choice.variant is safe and "another model" in choice.not_eligible["db100-2i-nopref"]
