"""Small real artifacts for tests: a logistic model as ONNX and its numpy oracle."""

from __future__ import annotations

import hashlib
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from build_engines.base import F32, Candidate, ContainerSpec, Source
from setsuna.schema import INPUT_NAME, OUTPUT_NAME, FeatureSchema


def logistic_onnx(path: Path, w: F32, b: float) -> Path:
    """Write score = sigmoid(x @ w + b) as an ONNX file with setsuna's tensor names."""
    n = len(w)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], [OUTPUT_NAME]),
        ],
        "logistic",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        [
            numpy_helper.from_array(w.reshape(n, 1).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([b], dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def logistic_source(w: F32, b: float, *, name: str = "logit", allow_nan: bool = False) -> Source:
    """A Source whose oracle is numpy: the same function the ONNX graph computes."""

    def reference(x: F32) -> F32:
        z = x.astype(np.float64) @ w.astype(np.float64) + b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32).reshape(-1, 1)

    return Source(
        name=name,
        kind="onnx",
        model=None,
        schema=FeatureSchema.tabular(len(w), allow_nan=allow_nan),
        task="classification",
        sha256=hashlib.sha256(w.tobytes() + np.float32(b).tobytes()).hexdigest(),
        reference=reference,
        reference_label="numpy logistic",
    )


def logistic_candidate(folder: Path, w: F32, b: float, name: str = "onnx") -> Candidate:
    logistic_onnx(folder / "model.onnx", w, b)
    return Candidate(
        name=name,
        engine="onnxruntime",
        folder=folder,
        params={"file": "model.onnx", "threads": 1, "optimized_offline": False},
        container=ContainerSpec(default_model_filename="model.onnx", platform="onnxruntime_onnx"),
    )


def build_logistic_models(root: Path, weights: dict[str, F32], x: F32) -> Path:
    """Build one logistic model per name through the real pipeline; return ``root/local``.

    Served by setsuna's ONNX Runtime wrapper like any published engine; the
    oracle of model ``name`` is ``sigmoid(x @ weights[name])``.
    """
    from build_engines import gate
    from build_engines.build import build_model
    from build_engines.spec import ModelSpec

    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    for name, w in weights.items():
        build_model(
            logistic_source(w, 0.0, name=name),
            x,
            ModelSpec(name, gate=fast),
            root,
            ("local",),
            root / "work",
            converter=lambda s, d, c, w=w: [logistic_candidate(d / "onnx", w, 0.0)],
            echo=False,
        )
    return root / "local"


def tabular(n: int = 3000, seed: int = 3, n_features: int = 8) -> tuple[F32, np.ndarray]:
    """Rows and binary labels with a non-linear signal (features 0-2) and noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    y = (x[:, 0] + np.tanh(x[:, 1] * x[:, 2]) + 0.5 * rng.normal(size=n) > 0).astype(np.int8)
    return x, y


@dataclass(frozen=True)
class SmallForests:
    """20-tree boosters trained on the first 2,000 rows of :func:`tabular`.

    ``lgbm_nan`` saw feature 3 missing in every 7th row (``x_nan``), so it
    learned a default direction for missing values.
    """

    x: F32
    x_nan: F32
    lgbm: Any
    lgbm_nan: Any
    xgbm: Any


def small_forests() -> SmallForests:
    import lightgbm as lgb
    import xgboost as xgb

    x, y = tabular()
    x_nan = x.copy()
    x_nan[::7, 3] = np.nan
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1, "seed": 1}
    return SmallForests(
        x=x,
        x_nan=x_nan,
        lgbm=lgb.train(params, lgb.Dataset(x[:2000], y[:2000]), num_boost_round=20),
        lgbm_nan=lgb.train(params, lgb.Dataset(x_nan[:2000], y[:2000]), num_boost_round=20),
        xgbm=xgb.train(
            {"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 1},
            xgb.DMatrix(x[:2000], label=y[:2000]),
            num_boost_round=20,
        ),
    )


def batch_dependent_onnx(path: Path, w: F32) -> Path:
    """score = sigmoid(z - mean_batch(z)), z = x @ w: right in a crowd, 0.5 alone."""
    n = len(w)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "w"], ["z"]),
            helper.make_node("ReduceMean", ["z"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["z", "m"], ["c"]),
            helper.make_node("Sigmoid", ["c"], [OUTPUT_NAME]),
        ],
        "batch_dependent",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w.reshape(n, 1).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


PYTHON_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {n} ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ {n} ] }} ]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
"""

#: Echoes its input: the smallest model a server test needs.
IDENTITY_PY = """\
import triton_python_backend_utils as pb_utils

from setsuna.schema import INPUT_NAME, OUTPUT_NAME


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT_NAME, x.copy())]))
        return out
"""


def python_model(
    repo: Path,
    name: str,
    code: str = IDENTITY_PY,
    *,
    config: str | None = None,
    n: int = 4,
    instances: int = 1,
    seal: bool = True,
) -> Path:
    """Write ``repo/name/{config.pbtxt, 1/model.py}`` and seal it as the build would."""
    from setsuna import seal as sealing

    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    text = config if config is not None else PYTHON_CONFIG
    (model_dir / "config.pbtxt").write_text(text.format(name=name, n=n, instances=instances))
    (model_dir / "1" / "model.py").write_text(code)
    if seal:
        sealing.seal_model(model_dir)
    return model_dir


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Poll ``check()`` until it returns something truthy (and return it); fail after
    ``timeout_s`` naming ``what`` and the last value. For state another process changes
    with no event to wait on (a reload, a pushed metric); never to pass time."""
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while True:
            got = check()
            if got:
                return got
            if done.wait(0.02):
                raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {got!r})")
    finally:
        deadline.cancel()


def metrics_text(metrics_url: str) -> str:
    """Triton's Prometheus page (no proxy: the server is on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(metrics_url, timeout=10) as resp:
        return str(resp.read().decode())


def metric_series(metrics_url: str, name: str, **labels: str) -> list[float]:
    """Values of every series of ``name`` whose labels include ``labels``."""
    out = []
    for line in metrics_text(metrics_url).splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                out.append(float(value))
    return out
