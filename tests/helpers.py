"""Small real artifacts for tests: a logistic model as ONNX and its numpy oracle."""

from __future__ import annotations

import hashlib
import os
import select
from dataclasses import dataclass
from pathlib import Path

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


# A model that blocks: each execute announces itself on `started`, then waits until
# the test writes one byte to `release`; it answers 0.5 for every row. The FIFOs are
# opened O_RDWR so no open() blocks. Busy is an event the test waits on, not a sleep.
_STUCK_CONFIG = """\
name: "stuck"
backend: "python"
max_batch_size: 1024
input [ { name: "features" data_type: TYPE_FP32 dims: [ N_FEATURES ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "leaf" value { string_value: "true" } }
parameters { key: "release" value { string_value: "RELEASE" } }
parameters { key: "started" value { string_value: "STARTED" } }
"""
_STUCK_PY = """\
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.release = os.open(params["release"]["string_value"], os.O_RDWR)
        self.started = os.open(params["started"]["string_value"], os.O_RDWR)

    def execute(self, requests):
        os.write(self.started, b"s")
        os.read(self.release, 1)
        out = []
        for r in requests:
            n = len(pb_utils.get_input_tensor_by_name(r, "features").as_numpy())
            score = np.full((n, 1), 0.5, dtype=np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", score)]))
        return out
"""


@dataclass
class Gate:
    release: int
    started: int

    def wait_started(self, timeout_s: float = 60.0) -> None:
        ready, _, _ = select.select([self.started], [], [], timeout_s)
        assert ready, "stuck never started executing"
        os.read(self.started, 1)

    def open(self, n: int = 1) -> None:
        os.write(self.release, b"r" * n)

    def drain(self) -> int:
        """Forget the executes announced so far; how many there were."""
        n = 0
        while select.select([self.started], [], [], 0)[0]:
            n += len(os.read(self.started, 4096))
        return n


def stuck_model(repo: Path, fifo_dir: Path, n_features: int) -> Gate:
    """Write and seal ``repo/stuck`` (a leaf model) and return the gate that drives it."""
    from setsuna import seal as sealing

    release, started = fifo_dir / "stuck.release", fifo_dir / "stuck.started"
    os.mkfifo(release)
    os.mkfifo(started)
    (repo / "stuck" / "1").mkdir(parents=True)
    config = _STUCK_CONFIG.replace("N_FEATURES", str(n_features))
    config = config.replace("RELEASE", str(release)).replace("STARTED", str(started))
    (repo / "stuck" / "config.pbtxt").write_text(config)
    (repo / "stuck" / "1" / "model.py").write_text(_STUCK_PY)
    sealing.seal_model(repo / "stuck")  # the stub guard loads only sealed folders
    return Gate(os.open(release, os.O_RDWR), os.open(started, os.O_RDWR))
