"""Faults and bad input against the real local Triton (issue: serve the repository).

A bad request gets a 400 / INVALID_ARGUMENT naming the input and costs the
server nothing; an oversized body is refused; a full queue refuses at once
and a stale queued request times out, instead of the queue growing without
bound; every admin method is refused without the token. The blocking model
waits on a FIFO the test writes to, so "busy" is an event, not a sleep.
"""

from __future__ import annotations

import json
import os
import select
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from build_engines import gate
from build_engines.build import build_model
from build_engines.spec import ModelSpec, ServingSpec
from setsuna import seal
from setsuna.server import LocalTriton
from tests.helpers import logistic_candidate, logistic_source

W = np.random.default_rng(9).normal(size=5).astype(np.float32)

GATED_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 1
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
dynamic_batching {{
  default_queue_policy {{
    timeout_action: REJECT
    max_queue_size: {queue}
    default_timeout_microseconds: {timeout_us}
  }}
}}
parameters {{ key: "release" value {{ string_value: "{release}" }} }}
parameters {{ key: "started" value {{ string_value: "{started}" }} }}
"""

# Each execute announces itself on `started`, then blocks until the test writes
# one byte to `release`. Both FIFOs are opened O_RDWR so no open() blocks.
GATED_PY = """\
import json
import os

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.release = os.open(params["release"]["string_value"], os.O_RDWR)
        self.started = os.open(params["started"]["string_value"], os.O_RDWR)

    def execute(self, requests):
        os.write(self.started, b"s")
        os.read(self.release, 1)
        inputs = [pb_utils.get_input_tensor_by_name(r, "features").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("score", x)]) for x in inputs]
"""


@dataclass
class Gate:
    name: str
    release: int
    started: int

    def wait_started(self, timeout_s: float = 30.0) -> None:
        ready, _, _ = select.select([self.started], [], [], timeout_s)
        assert ready, f"{self.name} never started executing"
        os.read(self.started, 1)

    def open(self, n: int) -> None:
        os.write(self.release, b"r" * n)


def _gated(repo: Path, name: str, queue: int, timeout_us: int) -> Gate:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    release, started = (
        folder.parent.parent / f"{name}.release",
        folder.parent.parent / f"{name}.started",
    )
    os.mkfifo(release)
    os.mkfifo(started)
    (folder / "config.pbtxt").write_text(
        GATED_CONFIG.format(
            name=name, queue=queue, timeout_us=timeout_us, release=release, started=started
        )
    )
    (folder / "1" / "model.py").write_text(GATED_PY)
    seal.seal_model(folder)  # the stub guard loads only sealed folders
    return Gate(name, os.open(release, os.O_RDWR), os.open(started, os.O_RDWR))


Fixture = tuple[LocalTriton, dict[str, Gate]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    root = tmp_path_factory.mktemp("faults")
    repo = root / "repo"
    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    x = np.random.default_rng(1).normal(size=(600, 5)).astype(np.float32)
    build_model(
        logistic_source(W, 0.0),
        x,
        # Batched (the NaN test needs requests sharing a batch), with no queue policy
        # (the builder never writes one: it stalls 2.51's batcher). The queue-policy
        # tests use the hand-written gated models, which pin Triton's own behaviour.
        ModelSpec("logit", gate=fast, serving=ServingSpec()),
        root,
        ("local",),
        root / "work",
        converter=lambda s, w, c: [logistic_candidate(w / "onnx", W, 0.0)],
        echo=False,
    )
    (root / "local").rename(repo)
    gates = {
        "full": _gated(repo, "gated_full", queue=2, timeout_us=0),
        "stale": _gated(repo, "gated_stale", queue=8, timeout_us=200_000),
    }
    # HTTP on: these probes pin the HTTP frontend's answers too (it is off by default).
    with LocalTriton.on_free_ports(repo, http=True, log_path=root / "triton.log") as srv:
        yield srv, gates


def _http_infer(srv: LocalTriton, model: str, x: np.ndarray, dtype: str) -> tuple[int, str]:
    """Raw V2 JSON request: the status code is what a non-Python client sees."""
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(x.shape),
                    "datatype": dtype,
                    "data": x.flatten().tolist(),
                }
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{srv.http_url}/v2/models/{model}/infer",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _grpc_infer(srv: LocalTriton, model: str, x: np.ndarray) -> Any:
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        inp = grpcclient.InferInput(
            "features", list(x.shape), grpcclient.np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp])


BAD = [
    pytest.param(np.zeros((2, 6), np.float32), "FP32", "features", id="wrong-shape"),
    pytest.param(np.zeros((2, 5), np.float64), "FP64", "features", id="wrong-dtype"),
    pytest.param(np.array([[0, 1, np.nan, 0, 0]], np.float32), "FP32", "allow_nan", id="nan"),
]


@pytest.mark.parametrize(("x", "dtype", "needle"), BAD)
def test_bad_request_is_400_naming_the_input(
    server: Fixture, x: np.ndarray, dtype: str, needle: str
) -> None:
    srv, _ = server
    # JSON has no NaN literal, so the NaN case goes as a binary tensor.
    status, body = _nan_http(srv, x) if np.isnan(x).any() else _http_infer(srv, "logit", x, dtype)
    assert status == 400, body
    assert "features" in body and needle in body


def _nan_http(srv: LocalTriton, x: np.ndarray) -> tuple[int, str]:
    with httpclient.InferenceServerClient(srv.http_url) as client:
        inp = httpclient.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        try:
            client.infer("logit", [inp])
        except InferenceServerException as exc:
            return int(exc.status() or 0), str(exc)
    return 200, "accepted"


@pytest.mark.parametrize(("x", "dtype", "needle"), BAD)
def test_bad_request_is_invalid_argument_over_grpc(
    server: Fixture, x: np.ndarray, dtype: str, needle: str
) -> None:
    srv, _ = server
    with pytest.raises(InferenceServerException) as info:
        _grpc_infer(srv, "logit", x)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert "features" in str(info.value) and needle in str(info.value)
    assert _grpc_infer(srv, "logit", np.zeros((1, 5), np.float32)).as_numpy("score").shape == (1, 1)


def test_a_refused_request_is_refused_again_not_served_from_cache(server: Fixture) -> None:
    """Triton 2.51 caches error responses as empty successes: our configs keep the cache off."""
    srv, _ = server
    x = np.array([[0, np.nan, 0, 0, 0]], np.float32)
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="allow_nan"):
            _grpc_infer(srv, "logit", x)


def test_oversized_request_is_refused_and_the_server_survives(server: Fixture) -> None:
    srv, _ = server
    big = np.zeros((400_000, 5), np.float32)  # 8 MB: past the default 4 MiB stack crash point
    with httpclient.InferenceServerClient(srv.http_url, network_timeout=60) as client:
        inp = httpclient.InferInput("features", list(big.shape), "FP32")
        inp.set_data_from_numpy(big, binary_data=True)
        with pytest.raises(InferenceServerException, match="batch"):
            client.infer("logit", [inp])
        assert client.is_server_live()
    with pytest.raises(InferenceServerException, match="batch"):
        _grpc_infer(srv, "logit", big)


def test_a_full_queue_refuses_at_once(server: Fixture) -> None:
    srv, gates = server
    g = gates["full"]
    one = np.ones((1, 1), np.float32)
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(_grpc_infer, srv, g.name, one)
        g.wait_started()  # request 1 is executing; the queue (size 2) is empty
        queued = [pool.submit(_grpc_infer, srv, g.name, one) for _ in range(2)]
        _wait_pending(srv, g.name, 2)
        with pytest.raises(InferenceServerException, match="queue"):
            _grpc_infer(srv, g.name, one)  # the 4th: refused, not queued
        g.open(3)
        for fut in [running, *queued]:
            assert fut.result(timeout=30).as_numpy("score").tolist() == [[1.0]]


def test_a_stale_queued_request_times_out(server: Fixture) -> None:
    srv, gates = server
    g = gates["stale"]
    one = np.ones((1, 1), np.float32)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_grpc_infer, srv, g.name, one)
        g.wait_started()
        stale: Future[Any] = pool.submit(_grpc_infer, srv, g.name, one)
        with pytest.raises(InferenceServerException, match=r"timeout|Timeout|timed out"):
            stale.result(timeout=30)  # rejected after 200 ms in the queue, while 1 still runs
        g.open(1)
        assert running.result(timeout=30).as_numpy("score").tolist() == [[1.0]]


def _wait_pending(srv: LocalTriton, model: str, n: int) -> None:
    """Poll the pending-request gauge until ``n`` requests are queued (bounded)."""
    _wait_metric(srv, f'nv_inference_pending_request_count{{model="{model}",version="1"}} {n}')


def _wait_metric(srv: LocalTriton, needle: str) -> None:
    """Metrics refresh on Triton's own interval: poll (bounded) until ``needle`` shows."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(300):
        with opener.open(srv.metrics_url, timeout=5) as resp:
            if needle in resp.read().decode():
                return
        select.select([], [], [], 0.05)  # wait for the next metrics refresh
    raise AssertionError(f"{needle} never appeared in {srv.metrics_url}")


ADMIN_HTTP = [
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/models/logit/load", b"{}"),
    ("POST", "/v2/repository/models/logit/unload", b"{}"),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", b'{"log_verbose_level": 1}'),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", b'{"trace_level": ["TIMESTAMPS"]}'),
    ("GET", "/v2/systemsharedmemory/status", None),
    (
        "POST",
        "/v2/systemsharedmemory/region/r/register",
        b'{"key": "/k", "offset": 0, "byte_size": 8}',
    ),
    ("POST", "/v2/systemsharedmemory/unregister", b"{}"),
    ("GET", "/v2/cudasharedmemory/status", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), ADMIN_HTTP, ids=[f"{m} {p}" for m, p, _ in ADMIN_HTTP]
)
def test_every_admin_http_method_needs_the_token(
    server: Fixture, method: str, path: str, body: bytes | None
) -> None:
    srv, _ = server
    req = urllib.request.Request(f"http://{srv.http_url}{path}", data=body, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(req, timeout=10)
    assert info.value.code == 403 and "restricted" in info.value.read().decode()


GRPC_ADMIN = [
    ("get_model_repository_index", ()),
    ("load_model", ("logit",)),
    ("unload_model", ("logit",)),
    ("get_log_settings", ()),
    ("update_log_settings", ({"log_verbose_level": 1},)),
    ("get_trace_settings", ()),
    ("update_trace_settings", ("logit", {"trace_level": ["TIMESTAMPS"]})),
    ("get_system_shared_memory_status", ()),
    ("register_system_shared_memory", ("r", "/k", 8)),
    ("unregister_system_shared_memory", ()),
    ("get_cuda_shared_memory_status", ()),
]


@pytest.mark.parametrize(("method", "args"), GRPC_ADMIN, ids=[m for m, _ in GRPC_ADMIN])
def test_every_admin_grpc_method_needs_the_token(
    server: Fixture, method: str, args: tuple[Any, ...]
) -> None:
    srv, _ = server
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        with pytest.raises(InferenceServerException, match=r"restricted|admin"):
            getattr(client, method)(*args)
        assert client.is_model_ready("logit")


def test_repository_api_with_the_token_unloads_and_loads(server: Fixture) -> None:
    srv, _ = server
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        client.unload_model("logit", headers=srv.grpc_admin_headers)
        assert not client.is_model_ready("logit")
        client.load_model("logit", headers=srv.grpc_admin_headers)
        assert client.is_model_ready("logit")
        index = client.get_model_repository_index(headers=srv.grpc_admin_headers, as_json=True)
        assert {m["name"] for m in index["models"]} >= {"logit", "gated_full", "gated_stale"}


def test_readiness_statistics_and_metrics_respond(server: Fixture) -> None:
    srv, _ = server
    _grpc_infer(srv, "logit", np.zeros((3, 5), np.float32))
    with httpclient.InferenceServerClient(srv.http_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        stats = client.get_inference_statistics("logit")
        assert int(stats["model_stats"][0]["inference_count"]) >= 3
        assert client.get_model_config("logit")["max_batch_size"] == 1024
    _wait_metric(srv, 'nv_inference_request_success{model="logit",version="1"}')


def test_a_nan_request_fails_alone_among_concurrent_good_ones(server: Fixture) -> None:
    srv, _ = server
    rows = np.random.default_rng(3).normal(size=(32, 1, 5)).astype(np.float32)
    rows[::4, 0, 1] = np.nan  # every 4th request carries a NaN
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_grpc_infer, srv, "logit", r) for r in rows]
        for i, fut in enumerate(futures):
            if i % 4 == 0:
                with pytest.raises(InferenceServerException, match="allow_nan"):
                    fut.result(timeout=30)
            else:
                z = rows[i] @ W
                expected = 1.0 / (1.0 + np.exp(-z))
                np.testing.assert_allclose(
                    fut.result(timeout=30).as_numpy("score")[:, 0], expected, atol=1e-6
                )


def test_refused_requests_are_counted_where_triton_counts_a_success(server: Fixture) -> None:
    """Triton 2.51 counts an error response as nv_inference_request_success; the wrapper's
    own counter is what an alert can see (deploy/prometheus/alerts.yml)."""
    from tests.helpers import metric_series, wait_until

    srv, _ = server
    name, labels = "setsuna_request_failures_total", {"model": "logit", "reason": "refused"}
    before = sum(metric_series(srv.metrics_url, name, **labels))
    bad = np.zeros((2, 5), np.float32)
    bad[1, 2] = np.nan
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="allow_nan"):
            _grpc_infer(srv, "logit", bad)
    wait_until(
        "three refusals counted",
        lambda: sum(metric_series(srv.metrics_url, name, **labels)) >= before + 3,
    )
    assert sum(metric_series(srv.metrics_url, name, model="logit", reason="engine")) == 0
