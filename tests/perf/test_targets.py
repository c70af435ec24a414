"""perf/targets.py: the stall target reads PASS only for a checked run with no stall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from build_engines.tuning import perf_analyzer as pa
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


def test_memory_is_broken_down_per_model_from_the_stub_command_lines(tmp_path: Path) -> None:
    """A real process tree: this process as the server, two stubs of one model, one of another."""
    script = "import time; time.sleep(60)"
    kids = []
    for model in ("mem_alpha", "mem_alpha", "mem_beta"):
        path = tmp_path / model / "1" / "model.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        kids.append(subprocess.Popen([sys.executable, str(path)]))
    try:
        mem = targets.measure_memory(os.getpid())
    finally:
        for k in kids:
            k.kill()
            k.wait()
    assert mem.per_model["mem_alpha"][0] == 2 and mem.per_model["mem_beta"][0] == 1
    assert mem.per_model["tritonserver"][0] == 1
    assert abs(sum(v for _, v in mem.per_model.values()) - mem.pss_mib) < 1e-6
    assert "mem_alpha 2x" in mem.describe() and mem.pss_mb > mem.per_model["mem_beta"][1]
