"""The tiny models the probes serve, written into the lab (never into model_repository/).

- :func:`python_model`: a sealed Python-backend model (an echo by default),
  as the build would publish it;
- :func:`logistic_models`: ``score = sigmoid(x @ w)`` as ONNX, built
  through the real build (gate, manifest, seal, publish), served by
  setsuna's backend like any engine;
- :func:`planted_library`: a C shared library whose constructor writes a
  sentinel file, so "it never ran" is a file that does not exist.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from build_engines.spec import ServingSpec
from setsuna import seal
from setsuna.schema import INPUT_NAME, OUTPUT_NAME, FeatureSchema

F32 = npt.NDArray[np.float32]

PYTHON_CONFIG: Final = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {n} ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ {n} ] }} ]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
"""

IDENTITY_PY: Final = """\
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

#: Model code that writes ``sentinel`` the moment it is imported.
EVIL_PY: Final = """\
from pathlib import Path
Path({sentinel!r}).write_text("ran")
class TritonPythonModel:
    def execute(self, requests):
        return []
"""

_SO_SOURCE: Final = """\
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {{
  FILE *f = fopen("{sentinel}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
}}
"""


def python_model(
    repo: Path,
    name: str,
    code: str = IDENTITY_PY,
    *,
    n: int = 4,
    instances: int = 1,
    config: str = PYTHON_CONFIG,
    sealed: bool = True,
) -> Path:
    """Write ``repo/name/{config.pbtxt, 1/model.py}`` and seal it as the build would."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config.format(name=name, n=n, instances=instances))
    (model_dir / "1" / "model.py").write_text(code)
    if sealed:
        seal.seal_model(model_dir)
    return model_dir


def logistic_onnx(path: Path, w: F32) -> Path:
    """``score = sigmoid(x @ w)`` as an ONNX file with setsuna's tensor names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(w)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "w"], ["z"]),
            helper.make_node("Sigmoid", ["z"], [OUTPUT_NAME]),
        ],
        "logistic",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w.reshape(n, 1).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def oracle(w: F32, x: F32) -> F32:
    """What the logistic model of ``w`` answers for ``x``: ``[n, 1]`` float32."""
    z = x.astype(np.float64) @ w.astype(np.float64)
    out: F32 = (1.0 / (1.0 + np.exp(-z))).astype(np.float32).reshape(-1, 1)
    return out


def logistic_models(
    root: Path, weights: dict[str, F32], serving: ServingSpec | None = None
) -> Path:
    """Build one logistic model per name through the real build; return ``root/local``.

    ``serving`` replaces the build's default ``ServingSpec`` (e.g. a
    ``queue_timeout_us`` above Triton 2.51's ~500 ms batcher stall, for a
    probe whose verdict must not depend on that stall).
    """
    from build_engines import gate
    from build_engines.base import Built, Candidate, ContainerSpec, Source
    from build_engines.build import build_model
    from build_engines.spec import ModelSpec

    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
    spec_serving = serving or ServingSpec()
    for name, w in weights.items():
        x = np.random.default_rng(len(name)).normal(size=(300, len(w))).astype(np.float32)
        source = Source(
            name=name,
            kind="onnx",
            model=None,
            schema=FeatureSchema.tabular(len(w)),
            task="classification",
            sha256=hashlib.sha256(w.tobytes()).hexdigest(),
            reference=functools.partial(oracle, w),
            reference_label="numpy logistic",
        )

        def convert(s: Source, d: Path, c: F32, w: F32 = w) -> list[Built]:
            return [
                Candidate(
                    name="onnx",
                    engine="onnxruntime",
                    folder=logistic_onnx(d / "onnx" / "model.onnx", w).parent,
                    params={"file": "model.onnx", "threads": 1, "optimized_offline": False},
                    container=ContainerSpec(
                        default_model_filename="model.onnx", platform="onnxruntime_onnx"
                    ),
                )
            ]

        build_model(
            source,
            x,
            ModelSpec(name, gate=fast, serving=spec_serving),
            root,
            ("local",),
            root / "work",
            converter=convert,
            echo=False,
        )
    return root / "local"


def planted_library(out: Path, sentinel: Path) -> Path:
    """Compile a shared library whose load (its constructor) writes ``sentinel``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) to build the planted library")
    src = out.with_name(out.name + ".c")
    src.write_text(_SO_SOURCE.format(sentinel=sentinel))
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    src.unlink()
    return out
