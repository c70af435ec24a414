"""perf/targets.py: the stall target reads PASS only for a checked run with no stall."""

from __future__ import annotations

from pathlib import Path

from perf import perf_analyzer as pa
from perf import targets

DATA = Path(__file__).parent / "data"


def _run(export: str | None = None, *, message: str = "") -> pa.RunResult:
    spec = pa.RunSpec("lightgbm", "127.0.0.1:1", concurrency=1, window_ms=20_000, max_trials=3)
    if message:
        return pa.RunResult(spec, "failed", 1, 1.0, message=message)
    stats = None if export is None else pa.parse_profile_export((DATA / export).read_bytes())
    row = pa.LatencyRow(1, 2500.0, 350, 450, 500, 600)
    return pa.RunResult(spec, "ok", 0, 60.0, row, requests=stats)


def test_a_clean_long_run_passes() -> None:
    others = {"grpc c=1": _run("grpc_c1_export_ok.json")}
    what, got, ok = targets.stall_check(_run("grpc_c1_export_ok.json"), 60, others)
    assert ok and what.startswith("0 stalls (> 450 ms) in a 60 s c=1 gRPC run")
    assert "0 stall(s) in 120 requests" in got and "slowest 1.33 ms" in got
    assert "the other runs: 0 in 120 requests" in got


def test_stalls_miss_and_are_listed() -> None:
    _, got, ok = targets.stall_check(_run("grpc_c1_export_stalls.json"), 60, {})
    assert not ok and "7 stall(s) in 80 requests" in got and "(508.7, " in got


def test_a_run_that_could_not_be_checked_misses() -> None:
    refused = _run(message="Request timeout expired (1 thread)")
    _, got, ok = targets.stall_check(refused, 60, {})
    assert not ok and got.startswith("1 stall(s); failed: Request timeout expired")
    _, got, ok = targets.stall_check(_run(None), 60, {})
    assert not ok and "no profile export" in got
    _, got, ok = targets.stall_check(None, 0, {"x": _run(message="boom")})
    assert not ok and got.startswith("not run") and "0 in 0 requests" in got
