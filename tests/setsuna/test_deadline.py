"""Deadlines travel with requests; the backend sheds what it cannot answer in time.

Overload without a Triton queue policy (it stalls 2.51's batcher) is bounded
two ways: the backend answers a request whose deadline is nearer than a batch
takes with a retryable refusal, without computing it; the SDK refuses a call
past ``max_in_flight`` before sending it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from build_engines import gate
from build_engines.build import build_model
from build_engines.spec import ModelSpec
from setsuna import deadline, seal
from setsuna.client import AsyncClient, Client, ClientSettings
from setsuna.errors import ConfigError, OverloadedError
from setsuna.server import LocalTriton
from tests.helpers import logistic_candidate, logistic_source

W = np.random.default_rng(4).normal(size=5).astype(np.float32)
ROW = np.full((1, 5), 0.5, np.float32)


# ------------------------------------------------------------------ no server


def test_parameters_round_trip_and_bad_values_are_ignored() -> None:
    p = deadline.parameters(0.25, now_ns=1_000)
    assert p == {deadline.PARAMETER: 1_000 + 250_000_000}
    assert deadline.read(json.dumps(p)) == 250_001_000
    assert deadline.read("{}") is None
    assert deadline.read(json.dumps({deadline.PARAMETER: "soon"})) is None
    assert deadline.read(json.dumps({deadline.PARAMETER: True})) is None
    assert deadline.read(f'{{"{deadline.PARAMETER}": ') is None


def test_the_shedder_follows_how_long_batches_take() -> None:
    s = deadline.Shedder(margin_us=100, initial_batch_us=1_000)
    now = 10**12
    assert not s.too_late(None, now)  # no deadline: always served
    assert not s.too_late(now + 2_000_000, now)  # 2 ms left, a batch takes ~1.1 ms
    assert s.too_late(now + 1_000_000, now)
    for _ in range(50):
        s.observe(5_000_000)  # batches became slow: 5 ms
    assert s.too_late(now + 2_000_000, now)
    assert s.shed == 2
    assert deadline.SHED_MARK in s.message("m", now + 1, now)


def test_admission_control_refuses_past_max_in_flight() -> None:
    with pytest.raises(ConfigError):
        ClientSettings(max_in_flight=-1)
    client = Client("127.0.0.1:1", settings=ClientSettings(max_in_flight=1))
    core = client._core
    with core.admitted("m"):
        with pytest.raises(OverloadedError, match="max_in_flight=1") as info, core.admitted("m"):
            pass
        assert info.value.retryable
    with core.admitted("m"):  # released: admitted again
        pass
    client.close()


# ------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("deadline")
    x = np.random.default_rng(2).normal(size=(600, 5)).astype(np.float32)
    build_model(
        logistic_source(W, 0.0),
        x,
        ModelSpec("logit", gate=gate.GateSettings(latency_calls=20, batch_budget_s=0.01)),
        root,
        ("local",),
        root / "work",
        converter=lambda s, w, c: [logistic_candidate(w / "onnx", W, 0.0)],
        echo=False,
    )
    # "strict": the same engine keeping 60 s for the way back, so it sheds every
    # request that carries a deadline: the SDK's stamping shows, deterministically.
    repo = root / "local"
    shutil.copytree(repo / "logit", repo / "strict")
    config = repo / "strict" / "config.pbtxt"
    text = config.read_text().replace('name: "logit"', 'name: "strict"')
    config.write_text(
        text + 'parameters { key: "shed_margin_us" value { string_value: "60e6" } }\n'
    )
    seal.seal_model(repo / "strict")
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as srv:
        yield srv


def _infer_raw(
    server: LocalTriton, params: dict[str, int] | None, model: str = "logit"
) -> np.ndarray:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        inp = grpcclient.InferInput("features", [1, 5], "FP32")
        inp.set_data_from_numpy(ROW)
        return np.asarray(c.infer(model, [inp], parameters=params).as_numpy("score"))


def _shed_total(server: LocalTriton) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r'^setsuna_shed_total\{model="logit"\} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_a_request_past_its_deadline_is_refused_uncomputed(server: LocalTriton) -> None:
    before = _shed_total(server)
    with pytest.raises(InferenceServerException) as info:
        _infer_raw(server, {deadline.PARAMETER: time.time_ns() - 1_000_000})
    assert "UNAVAILABLE" in str(info.value.status()), str(info.value)
    assert deadline.SHED_MARK in str(info.value)
    assert _shed_total(server) == before + 1  # counted as shed, never sent to the engine
    # No deadline (perf_analyzer, other clients) or a generous one: served as before.
    assert _infer_raw(server, None).shape == (1, 1)
    assert _infer_raw(server, deadline.parameters(5.0)).shape == (1, 1)
    assert _shed_total(server) == before + 1


def test_the_sdk_sends_its_deadline_and_maps_a_shed_to_a_retryable_overload(
    server: LocalTriton,
) -> None:
    with Client(server.grpc_url, settings=ClientSettings(max_retries=0)) as client:
        assert client.infer("logit", ROW, deadline_ms=1_000)["score"].shape == (1, 1)
        # "strict" sheds whatever carries a deadline: this one did, typed for the caller.
        with pytest.raises(OverloadedError, match=deadline.SHED_MARK) as info:
            client.infer("strict", ROW, deadline_ms=1_000)
        assert info.value.retryable
    assert _infer_raw(server, None, model="strict").shape == (1, 1)  # no deadline: served


def test_async_admission_refuses_the_calls_past_the_limit(server: LocalTriton) -> None:
    async def burst() -> list[object]:
        async with AsyncClient(
            server.grpc_url, settings=ClientSettings(max_in_flight=2, max_retries=0)
        ) as client:
            await client.model_info("logit")  # metadata cached: the burst goes straight out
            calls = [client.infer("logit", ROW, deadline_ms=5_000) for _ in range(10)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) == 2 and len(refused) == 8
    assert all("max_in_flight=2" in str(r) for r in refused)
