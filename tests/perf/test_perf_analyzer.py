"""perf/perf_analyzer.py: parsing real perf_analyzer output, and one real short run.

The fixtures under ``data/`` are files the ``tritonclient==2.47.0``
perf_analyzer wrote here (lightgbm example model, local Triton 2.51):
``--verbose-csv`` reports over gRPC and HTTP, the stdout of the same gRPC
run, a run where every request was a response-cache hit, and a run whose
requests were rejected by the queue timeout. The live tests need the binary
(``make perf-setup``) and the wheel's ``tritonserver``; they skip otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from perf import perf_analyzer as pa
from setsuna import seal
from setsuna.errors import ServerError
from setsuna.server import LocalTriton, ServerSettings, find_tritonserver, free_ports

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


def test_runspec_command_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    grpc = pa.RunSpec("m", "127.0.0.1:1", "grpc", concurrency=8, batch_size=4, input_data=data)
    args = grpc.args(tmp_path / "out.csv")
    assert args[args.index("-i") + 1] == "grpc"
    assert args[args.index("--concurrency-range") + 1] == "8"
    assert args[args.index("-b") + 1] == "4"
    assert args[args.index("--input-data") + 1] == str(data)
    assert "--verbose-csv" in args and "--input-tensor-format" not in args
    http = pa.RunSpec("m", "127.0.0.1:1", "http", headers={"k": "v"})
    hargs = http.args(tmp_path / "out.csv")
    assert hargs[hargs.index("--input-data") + 1] == "random"
    assert hargs[hargs.index("--input-tensor-format") + 1] == "binary"
    assert hargs[hargs.index("-H") + 1] == "k:v"
    with pytest.raises(pa.PerfAnalyzerError):
        pa.RunSpec("m", "u", "grpc", max_trials=2)


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


IDENTITY_PY = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
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
    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(
        repo,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        http=True,  # both protocols are measured
        cache_size_bytes=16 * 1024,  # far fewer entries than rows: distinct rows all miss
    )
    with LocalTriton(settings, log_path=repo.parent / "triton.log") as server:
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
