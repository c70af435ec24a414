"""A BLS model's downstream calls carry a deadline the engine sheds by.

The router bounds each call to an arm (``bls_timeout_ms``, or the caller's
own timeout); the same bound travels to the engine as ``setsuna_deadline_ns``
so an engine that cannot answer in time does not compute for nobody. The
``strict`` engine keeps 60 s for the way back, so it sheds every call that
carries a deadline: what reaches the caller shows that the router sent one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ensembles import repository as rep
from ensembles.limits import Limits
from setsuna import deadline, seal
from setsuna.contract import ExperimentDoc, Target
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

N = 5
W = {"alpha": np.random.default_rng(7).normal(size=N).astype(np.float32)}


def _experiment(model: str) -> dict[str, object]:
    arms = {"only": Target(model, 1)}
    return ExperimentDoc.single("deadline", arms, {"only": 1.0}, salt="deadline-2026").to_json()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("forwarding")
    repo = build_logistic_models(root, W, np.random.default_rng(1).normal(size=(400, N)))
    shutil.copytree(repo / "alpha", repo / "strict")
    config = repo / "strict" / "config.pbtxt"
    text = config.read_text().replace('name: "alpha"', 'name: "strict"')
    margin = 'parameters { key: "shed_margin_us" value { string_value: "60e6" } }\n'
    config.write_text(text + margin)
    seal.seal_model(repo / "strict")
    for name, model in (("to_alpha", "alpha"), ("to_strict", "strict")):
        exp = root / f"{name}.json"
        exp.write_text(json.dumps(_experiment(model)))
        rep.write_router(repo, exp, N, name=name, limits=Limits(bls_timeout_ms=5_000))
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as srv:
        yield srv


def _call(server: LocalTriton, router: str) -> np.ndarray:
    x = np.full((2, N), 0.25, np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        inp = grpcclient.InferInput("features", [2, N], "FP32")
        inp.set_data_from_numpy(x)
        key = grpcclient.InferInput("key", [2, 1], "BYTES")
        key.set_data_from_numpy(np.array([[b"a"], [b"b"]], dtype=object))
        return np.asarray(c.infer(router, [inp, key]).as_numpy("score"))


def test_the_router_sends_its_bound_and_the_engine_sheds_by_it(server: LocalTriton) -> None:
    assert _call(server, "to_alpha").shape == (2, 1)  # the usual margin: served
    with pytest.raises(InferenceServerException, match=deadline.SHED_MARK):
        _call(server, "to_strict")  # deadline forwarded, so "strict" shed it uncomputed
