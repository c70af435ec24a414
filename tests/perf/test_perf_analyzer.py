"""perf/perf_analyzer.py: parsing real perf_analyzer output, and one real short run.

The fixtures under ``data/`` are files the ``tritonclient==2.47.0``
perf_analyzer wrote here (lightgbm example model, local Triton 2.51):
``--verbose-csv`` reports over gRPC and HTTP, the stdout of the same gRPC
run, a run where every request was a response-cache hit, and a run whose
requests were rejected by the queue timeout. Two ``--profile-export-file``
exports come from an identity Python model with dynamic batching, one
instance, c=1 over gRPC: ``grpc_c1_export_ok.json`` (no queue policy, a whole
120-request run, 0 stalls) and ``grpc_c1_export_stalls.json`` (with
``default_queue_policy { max_queue_size: 4096 }``: the first 80 requests of a
10,000-request run that had 143 stalls of 500.7-508.7 ms; 7 in these 80). Both
hold raw output bytes in their JSON strings, as perf_analyzer writes them.
The live tests need the binary (``make perf-setup``) and the wheel's
``tritonserver``; they skip otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from build_engines.tuning import perf_analyzer as pa
from setsuna import seal
from setsuna.errors import ServerError
from setsuna.server import LocalTriton, find_tritonserver

DATA = Path(__file__).parent / "data"


def _read(name: str) -> str:
    return (DATA / name).read_text()


# --------------------------------------------------------------------------- parsing


def test_parses_grpc_verbose_csv() -> None:
    (row,) = pa.parse_csv(_read("grpc_c32_rows.csv"))
    assert row.concurrency == 32
    assert row.throughput_infer_s == pytest.approx(6856.76)
    assert (row.p50_us, row.p90_us, row.p95_us, row.p99_us) == (4299, 7114, 8238, 12448)
    assert row.avg_us == 4634
    assert row.server_queue_us == 813 and row.compute_infer_us == 1411
    assert row.server_cache_hit_us is None  # the column exists only with the cache on
    assert row.p50_us <= row.p90_us <= row.p95_us <= row.p99_us


def test_parses_http_verbose_csv() -> None:
    (row,) = pa.parse_csv(_read("http_c32_rows.csv"))
    assert row.concurrency == 32 and row.throughput_infer_s == pytest.approx(8264.92)
    assert row.client_send_us == 68 and row.p99_us == 12331


def test_parses_cache_columns() -> None:
    (row,) = pa.parse_csv(_read("grpc_c1_cache_hits.csv"))
    assert row.server_cache_hit_us == 1 and row.server_cache_miss_us == 27
    assert row.p99_us == 284


def test_rejects_what_is_not_a_report() -> None:
    with pytest.raises(pa.PerfAnalyzerError, match="p99 latency"):
        pa.parse_csv("Concurrency,Inferences/Second\n1,10\n")
    bad = _read("grpc_c32_rows.csv").replace("6856.76", "lots")
    with pytest.raises(pa.PerfAnalyzerError, match="non-numeric"):
        pa.parse_csv(bad)


def test_server_counts_from_stdout() -> None:
    counts = pa.parse_server_counts(_read("grpc_c32_rows_stdout.txt"))
    assert counts.inference_count == 7595 and counts.execution_count == 874
    assert counts.avg_batch == pytest.approx(7595 / 874)  # dynamic batching at work
    assert counts.cache_hits is None and counts.hit_share is None  # cache off: not reported
    hits = pa.parse_server_counts(_read("grpc_c1_cache_hits_stdout.txt"))
    assert (hits.cache_hits, hits.cache_misses) == (8223, 1)
    assert hits.hit_share is not None and hits.hit_share > 0.999  # "random" = one tensor


def test_explain_collapses_per_thread_errors() -> None:
    text = pa.explain(_read("grpc_c32_queue_timeout_stdout.txt"))
    assert "Request timeout expired (32 threads)" in text
    assert "Failed to maintain requested inference load" in text
    assert text.count("Request timeout expired") == 1


def test_profile_export_counts_every_request_over_the_threshold() -> None:
    raw = (DATA / "grpc_c1_export_stalls.json").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # raw FP32 output bytes: read as Latin-1
    q = pa.parse_profile_export(raw)
    assert (q.requests, q.stalls, q.unanswered) == (80, 7, 0)
    assert q.max_latency_us == pytest.approx(508733.102)
    assert q.stall_latencies_us[0] == q.max_latency_us
    assert list(q.stall_latencies_us) == sorted(q.stall_latencies_us, reverse=True)
    assert min(q.stall_latencies_us) > 500_000  # the batcher's 500 ms sleep
    assert q.span_s == pytest.approx(3.599, abs=0.001)
    assert q.to_json()["stalls"] == 7


def test_profile_export_of_a_healthy_run() -> None:
    q = pa.parse_profile_export((DATA / "grpc_c1_export_ok.json").read_bytes())
    assert (q.requests, q.stalls, q.stall_latencies_us) == (120, 0, ())
    assert q.max_latency_us == pytest.approx(1329.351)
    strict = pa.parse_profile_export(
        (DATA / "grpc_c1_export_ok.json").read_bytes(), stall_latency_us=500
    )
    assert 0 < strict.stalls < strict.requests  # the threshold is the caller's


def test_profile_export_malformed_or_unanswered() -> None:
    with pytest.raises(pa.PerfAnalyzerError, match="profile export"):
        pa.parse_profile_export(b"Concurrency,Inferences/Second\n")
    with pytest.raises(pa.PerfAnalyzerError, match="request 0"):
        pa.parse_profile_export('{"experiments": [{"requests": [{"response_timestamps": []}]}]}')
    doc = {
        "experiments": [
            {"requests": [{"timestamp": 0, "response_timestamps": [500_000_000]}]},
            {"requests": [{"timestamp": 10, "response_timestamps": []}]},
        ]
    }
    q = pa.parse_profile_export(json.dumps(doc))
    assert (q.requests, q.stalls, q.unanswered, q.max_latency_us) == (2, 1, 1, 500_000)


def _result(message: str = "", stats: pa.RequestStats | None = None) -> pa.RunResult:
    spec = pa.RunSpec("m", "127.0.0.1:1")
    if message:
        return pa.RunResult(spec, "failed", 1, 1.0, message=message)
    row = pa.LatencyRow(1, 2000.0, 400, 500, 550, 600)
    return pa.RunResult(spec, "ok", 0, 1.0, row, requests=stats)


def test_run_result_stalls_from_export_or_queue_timeout() -> None:
    slow = pa.parse_profile_export((DATA / "grpc_c1_export_stalls.json").read_bytes())
    stalled = _result(stats=slow)
    assert stalled.ok and stalled.stalls == 7 and stalled.max_latency_us == slow.max_latency_us
    assert "STALLS 7" in pa.summarize([stalled])
    refused = _result(message=pa.explain(_read("grpc_c32_queue_timeout_stdout.txt")))
    assert refused.queue_timeout and refused.stalls == 1 and refused.requests is None
    healthy = _result(stats=pa.parse_profile_export((DATA / "grpc_c1_export_ok.json").read_bytes()))
    assert healthy.stalls == 0 and "STALLS" not in pa.summarize([healthy])
    assert "stalls not checked" in pa.summarize([_result()])
    doc = stalled.to_json()
    assert doc["stalls"] == 7 and doc["requests"]["requests"] == 80
    assert refused.to_json()["queue_timeout"] is True


def test_runspec_command_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    grpc = pa.RunSpec("m", "127.0.0.1:1", "grpc", concurrency=8, batch_size=4, input_data=data)
    args = grpc.args(tmp_path / "out.csv")
    assert args[args.index("-i") + 1] == "grpc"
    assert args[args.index("--concurrency-range") + 1] == "8"
    assert args[args.index("-b") + 1] == "4"
    assert args[args.index("--input-data") + 1] == str(data)
    assert "--verbose-csv" in args and "--input-tensor-format" not in args
    assert "--profile-export-file" not in args
    exported = grpc.args(tmp_path / "out.csv", tmp_path / "export.json")
    assert exported[exported.index("--profile-export-file") + 1] == str(tmp_path / "export.json")
    http = pa.RunSpec("m", "127.0.0.1:1", "http", headers={"k": "v"})
    hargs = http.args(tmp_path / "out.csv")
    assert hargs[hargs.index("--input-data") + 1] == "random"
    assert hargs[hargs.index("--input-tensor-format") + 1] == "binary"
    assert hargs[hargs.index("-H") + 1] == "k:v"
    with pytest.raises(pa.PerfAnalyzerError):
        pa.RunSpec("m", "u", "grpc", max_trials=2)
    with pytest.raises(pa.PerfAnalyzerError, match="stall_latency_us"):
        pa.RunSpec("m", "u", "grpc", stall_latency_us=0)


def test_input_json_round_trips_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((5, 3, 2)) * 1e3).astype(np.float32)
    path = pa.write_input_json(rows, tmp_path / "in.json", input_name="features")
    doc = json.loads(path.read_text())
    got = np.array([e["features"] for e in doc["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, rows.reshape(5, -1))
    with pytest.raises(pa.PerfAnalyzerError, match="NaN"):
        pa.write_input_json(
            np.full((2, 3), np.nan, np.float32), tmp_path / "x.json", input_name="f"
        )
    whole = np.array([[4242.0, 0.0, -3.0, 1e20]], np.float32)
    text = pa.write_input_json(whole, tmp_path / "w.json", input_name="f").read_text()
    assert "[4242.0,0.0,-3.0,1.00000002e+20]" in text  # perf_analyzer refuses 4242 for FP32


def test_locate_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(pa.PerfAnalyzerError, match="make perf-setup"):
        pa.locate(tmp_path)


# --------------------------------------------------------------------------- live


def _binary() -> pa.Binary:
    try:
        binary = pa.locate()
        binary.version()
    except pa.PerfAnalyzerError as exc:
        pytest.skip(f"perf_analyzer not set up ({exc})")
    try:
        find_tritonserver()
    except ServerError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    return binary


#: A row whose first value is this makes the identity model sleep SLOW_S: a stall.
SLOW_MAGIC = 4242.0
SLOW_S = 0.55

IDENTITY_PY = f"""\
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
            if x[0, 0] == {SLOW_MAGIC!r}:
                time.sleep({SLOW_S!r})
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", x[:, :1].copy())]))
        return out
"""

CONFIG = """\
backend: "python"
max_batch_size: 64
input [ { name: "features" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
response_cache { enable: true }
"""


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTriton, Path]]:
    _binary()  # skips the live tests when perf_analyzer or tritonserver is missing
    repo = tmp_path_factory.mktemp("pa-repo")
    (repo / "identity" / "1").mkdir(parents=True)
    (repo / "identity" / "config.pbtxt").write_text(CONFIG)
    (repo / "identity" / "1" / "model.py").write_text(IDENTITY_PY)
    seal.seal_model(repo / "identity")  # the stub guard loads only sealed folders
    rows = np.random.default_rng(1).standard_normal((2000, 4)).astype(np.float32)
    data = pa.write_input_json(rows, repo.parent / "rows.json", input_name="features")
    with LocalTriton.on_free_ports(
        repo,
        http=True,  # both protocols are measured
        cache_size_bytes=16 * 1024,  # far fewer entries than rows: distinct rows all miss
        log_path=repo.parent / "triton.log",
    ) as server:
        yield server, data


@pytest.mark.parametrize("protocol", pa.PROTOCOLS)
def test_real_run_measures_misses_on_distinct_rows(
    identity: tuple[LocalTriton, Path], protocol: pa.Protocol, tmp_path: Path
) -> None:
    server, _ = identity
    url = server.grpc_url if protocol == "grpc" else server.http_url
    # Rows of its own: the cache still holds the last rows the other protocol's run
    # sent, and replaying the shared file would hit them (seen: ~150 hits).
    seed = pa.PROTOCOLS.index(protocol) + 10
    rows = np.random.default_rng(seed).standard_normal((2000, 4)).astype(np.float32)
    data = pa.write_input_json(rows, tmp_path / "rows.json", input_name="features")
    spec = pa.RunSpec(
        "identity", url, protocol, concurrency=1, input_data=data, window_ms=200, timeout_s=60
    )
    result = pa.run(pa.locate(), spec, csv_path=tmp_path / "out.csv")
    assert result.ok, result.message
    assert result.row is not None and result.row.concurrency == 1
    assert result.row.throughput_infer_s > 0 and 0 < result.row.p50_us <= result.row.p99_us
    assert (tmp_path / "out.csv").is_file()
    assert result.server.cache_hits == 0 and (result.server.cache_misses or 0) > 0
    q = result.requests  # every request checked, none stalled
    assert q is not None and q.stalls == 0 and result.stalls == 0
    assert q.requests > 0.9 * (result.server.success_count or 0) > 0  # all windows
    assert q.max_latency_us is not None and q.max_latency_us >= result.row.p99_us


def test_real_run_counts_a_slow_request_that_percentiles_hide(
    identity: tuple[LocalTriton, Path], tmp_path: Path
) -> None:
    server, _ = identity
    rows = np.random.default_rng(20).standard_normal((20_000, 4)).astype(np.float32)
    rows[1000, 0] = SLOW_MAGIC  # one request in 20,000 sleeps 550 ms
    data = pa.write_input_json(rows, tmp_path / "rows.json", input_name="features")
    # Windows longer than the slow request: at c=1 a 200 ms window that the 550 ms
    # request spans records no request at all, and perf_analyzer gives up ("No valid
    # requests recorded within time interval": 1 run in 4). And the slow row comes
    # round once per 20,000 requests, so after its window perf_analyzer finds three
    # stable ones in a row (with 3,000 rows it recurred every 2-3 windows, and a busy
    # host failed "to obtain stable measurement within 10 measurement windows").
    spec = pa.RunSpec(
        "identity",
        server.grpc_url,
        "grpc",
        input_data=data,
        window_ms=1000,
        max_trials=20,
        timeout_s=120,
    )
    export = tmp_path / "export.json"
    result = pa.run(pa.locate(), spec, export_path=export)
    assert result.ok, result.message
    assert export.is_file()  # kept where asked
    q = result.requests
    assert q is not None and q.stalls >= 1 and result.stalls == q.stalls
    assert all(SLOW_S * 1e6 <= x < 2 * SLOW_S * 1e6 for x in q.stall_latencies_us)
    assert result.row is not None and result.row.p99_us < pa.STALL_LATENCY_US


def test_real_run_random_input_is_all_cache_hits(identity: tuple[LocalTriton, Path]) -> None:
    server, _ = identity
    spec = pa.RunSpec("identity", server.grpc_url, "grpc", window_ms=200, timeout_s=60)
    result = pa.run(pa.locate(), spec)
    assert result.ok, result.message
    assert result.server.hit_share is not None and result.server.hit_share > 0.99


def test_real_run_failure_is_a_result_not_an_exception(identity: tuple[LocalTriton, Path]) -> None:
    server, _ = identity
    spec = pa.RunSpec("no_such_model", server.grpc_url, "grpc", window_ms=200, timeout_s=30)
    result = pa.run(pa.locate(), spec)
    assert not result.ok and result.status == "failed" and result.rc not in (0, None)
    assert "no_such_model" in result.message + result.output_tail


def test_timeout_kills_the_run(identity: tuple[LocalTriton, Path]) -> None:
    server, data = identity
    spec = pa.RunSpec(
        "identity", server.grpc_url, "grpc", input_data=data, window_ms=5000, timeout_s=1.5
    )
    result = pa.run(pa.locate(), spec)
    assert result.status == "timeout" and result.elapsed_s < 10
