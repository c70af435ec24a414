"""The tick-to-signal pipeline beside its raw parts, in one run against one local server.

``python -m perf.pipeline --model-repository model_repository/local``
(needs ``eurusd_lgbm`` built: ``make build-engines``):

(a) one symbol, bar by bar (real EURUSD bars): tick-to-signal p50/p99 of
    the pipeline with the audit log on (each decision waits for its audit
    commit, ``--audit-synchronous`` FULL or NORMAL), next to the raw feature update
    (``FeatureEngine.update`` of one bar) and the direct Triton call
    (``tritonclient`` gRPC ``infer`` of one row, no setsuna code) measured in
    the same run. Targets: p99 <= 3 ms and <= 1.3x (raw features + raw call).
(b) 500 symbols, one bar at a time: symbol-decisions per second (audit on)
    next to perf_analyzer's throughput for the same model and batch size.
    Target: >= 50,000 symbol-decisions/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from setsuna.audit import AuditLog, AuditSettings, Synchronous
from setsuna.client import Client
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import BarRecords, ReplayFeed, datasets
from setsuna.pipeline import LatencyHistogram, Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.server import LocalTriton

MODEL = "eurusd_lgbm"


def _pct(h: LatencyHistogram) -> tuple[float, float]:
    return h.quantile(0.5) / 1e3, h.quantile(0.99) / 1e3


def one_symbol(url: str, bars: BarRecords, out: Path, audit: AuditSettings) -> dict[str, float]:
    warm, live = bars[:100], bars[100:]
    # raw parts
    raw_engine = FeatureEngine(default_spec(), ("EURUSD",))
    raw_engine.update(np.ascontiguousarray(warm))
    feat, call = LatencyHistogram(), LatencyHistogram()
    stub = grpcclient.InferenceServerClient(url)
    rows = []
    for i in range(len(live)):
        one = live[i : i + 1].copy()
        t0 = time.perf_counter_ns()
        r = raw_engine.update(one)
        feat.record((time.perf_counter_ns() - t0) / 1e3)
        rows.append(r.values.copy())
    for x in rows:
        inp = grpcclient.InferInput("features", [1, x.shape[1]], "FP32")
        t0 = time.perf_counter_ns()
        inp.set_data_from_numpy(x)
        stub.infer(MODEL, [inp])
        call.record((time.perf_counter_ns() - t0) / 1e3)
    stub.close()
    # the pipeline, audit on
    engine = FeatureEngine(default_spec(), ("EURUSD",))
    engine.update(np.ascontiguousarray(warm))
    with (
        Client(url) as client,
        AuditLog(out / "one.db", feature_names=default_spec().names, settings=audit) as log,
    ):
        pipe = Pipeline(engine, client, ThresholdPolicy(1), PipelineSettings(MODEL), audit=log)
        for i in range(len(live)):
            pipe.process(live[i : i + 1].copy())
    h = pipe.summary.latency["tick_to_signal"]
    f50, f99 = _pct(feat)
    c50, c99 = _pct(call)
    p50, p99 = _pct(h)
    return {
        "bars": len(live),
        "audit_commits": log.commits,
        "pipeline_p50_ms": p50,
        "pipeline_p99_ms": p99,
        "raw_features_p50_ms": f50,
        "raw_features_p99_ms": f99,
        "raw_triton_p50_ms": c50,
        "raw_triton_p99_ms": c99,
        "ratio_p50": p50 / (f50 + c50),
        "ratio_p99": p99 / (f99 + c99),
    }


def many_symbols(
    url: str, bars: BarRecords, n_symbols: int, out: Path, audit: AuditSettings
) -> dict[str, float]:
    """Every symbol gets the same real series, offset in time by one bar per symbol id."""
    n_bars = 300
    base = bars[:n_bars]
    symbols = tuple(f"S{i:03d}" for i in range(n_symbols))
    rec = np.repeat(base, n_symbols)
    rec["symbol_id"] = np.tile(np.arange(n_symbols), n_bars)
    engine = FeatureEngine(default_spec(), symbols, max_batch=n_symbols)
    warm_bars = 100
    engine.update(np.ascontiguousarray(rec[: warm_bars * n_symbols]))
    live = np.ascontiguousarray(rec[warm_bars * n_symbols :])
    with (
        Client(url) as client,
        AuditLog(out / "many.db", feature_names=default_spec().names, settings=audit) as log,
    ):
        pipe = Pipeline(
            engine, client, ThresholdPolicy(n_symbols), PipelineSettings(MODEL), audit=log
        )
        began = time.perf_counter()
        for start in range(0, len(live), n_symbols):
            pipe.process(live[start : start + n_symbols])
        wall = time.perf_counter() - began
    s = pipe.summary
    p50, p99 = _pct(s.latency["tick_to_signal"])
    return {
        "symbols": n_symbols,
        "bars": n_bars - warm_bars,
        "decisions_per_s": s.decisions / wall,
        "audit_rows_per_commit": log.recorded / max(log.commits, 1),
        "batch_p50_ms": p50,
        "batch_p99_ms": p99,
    }


def perf_analyzer(url: str, batch: int) -> float | None:
    """perf_analyzer's rows/s (its infer/sec) for the same model and batch size, or None."""
    from build_engines.tuning.perf_analyzer import PerfAnalyzerError, locate

    try:
        binary = locate()
    except PerfAnalyzerError:
        return None
    cmd = [
        str(binary.path),
        "-m",
        MODEL,
        "-u",
        url,
        "-i",
        "grpc",
        "-b",
        str(batch),
        "--concurrency-range",
        "1",
        "--measurement-interval",
        "3000",
        "--stability-percentage",
        "50",
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env=binary.env(), check=False
        )
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines():
        if "Throughput:" in line and "infer/sec" in line:
            # perf_analyzer counts inferences as rows: a batch of 500 is 500 infer.
            return float(line.split("Throughput:")[1].split("infer/sec")[0])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.pipeline", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--symbols", type=int, default=500)
    p.add_argument(
        "--audit-synchronous",
        choices=("FULL", "NORMAL"),
        default=AuditSettings.synchronous,
        help="how durable each audit commit is before its decision is passed on",
    )
    args = p.parse_args(argv)
    sync: Synchronous = args.audit_synchronous
    audit = AuditSettings(synchronous=sync)
    bars = np.array(ReplayFeed.from_frame(datasets.eurusd()).records)
    server_ = LocalTriton.on_free_ports(
        args.model_repository, load_models=(MODEL,), max_input_size_bytes=64 << 20
    )
    with tempfile.TemporaryDirectory() as tmp, server_ as server:
        out = Path(tmp)
        a = one_symbol(server.grpc_url, bars[:1600], out, audit)
        b = many_symbols(server.grpc_url, bars, args.symbols, out, audit)
        b["perf_analyzer_rows_per_s"] = perf_analyzer(server.grpc_url, args.symbols) or float("nan")
    ok_a = a["pipeline_p99_ms"] <= 3.0 and a["ratio_p99"] <= 1.3
    ok_b = b["decisions_per_s"] >= 50_000
    print(json.dumps({"audit_synchronous": sync, "one_symbol": a, "many_symbols": b}, indent=2))
    print(
        f"(a) tick-to-signal p50/p99 {a['pipeline_p50_ms']:.3f}/{a['pipeline_p99_ms']:.3f} ms; "
        f"raw features {a['raw_features_p50_ms']:.4f}/{a['raw_features_p99_ms']:.4f} ms + "
        f"raw Triton call {a['raw_triton_p50_ms']:.3f}/{a['raw_triton_p99_ms']:.3f} ms; "
        f"ratio p50 {a['ratio_p50']:.2f}x p99 {a['ratio_p99']:.2f}x  "
        f"[{'PASS' if ok_a else 'MISS'}: p99 <= 3 ms and <= 1.3x]"
    )
    print(
        f"(b) {b['symbols']} symbols: {b['decisions_per_s']:,.0f} symbol-decisions/s "
        f"(batch p50/p99 {b['batch_p50_ms']:.2f}/{b['batch_p99_ms']:.2f} ms); perf_analyzer "
        f"b={b['symbols']}: {b['perf_analyzer_rows_per_s']:,.0f} rows/s  "
        f"[{'PASS' if ok_b else 'MISS'}: >= 50,000/s]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
