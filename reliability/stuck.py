"""A model that blocks until told to answer: "a downstream model hangs" as an event.

Each execute announces itself on the ``started`` FIFO, then waits until one
byte arrives on ``release``; it answers 0.5 for every row. Both FIFOs are
opened O_RDWR so no open() blocks. Busy is an event the caller waits on
(:meth:`Gate.wait_started`), never a sleep. Used by the reliability probes
and the served tests.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass
from pathlib import Path

from setsuna import seal

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

    def close(self) -> None:
        """Close the FIFOs (``open()`` the blocked executes first, so the server can stop)."""
        os.close(self.release)
        os.close(self.started)

    def drain(self) -> int:
        """Forget the executes announced so far; how many there were."""
        n = 0
        while select.select([self.started], [], [], 0)[0]:
            n += len(os.read(self.started, 4096))
        return n


def stuck_model(repo: Path, fifo_dir: Path, n_features: int) -> Gate:
    """Write and seal ``repo/stuck`` (a leaf model) and return the gate that drives it."""
    release, started = fifo_dir / "stuck.release", fifo_dir / "stuck.started"
    os.mkfifo(release)
    os.mkfifo(started)
    (repo / "stuck" / "1").mkdir(parents=True)
    config = _STUCK_CONFIG.replace("N_FEATURES", str(n_features))
    config = config.replace("RELEASE", str(release)).replace("STARTED", str(started))
    (repo / "stuck" / "config.pbtxt").write_text(config)
    (repo / "stuck" / "1" / "model.py").write_text(_STUCK_PY)
    seal.seal_model(repo / "stuck")  # the stub guard loads only sealed folders
    return Gate(os.open(release, os.O_RDWR), os.open(started, os.O_RDWR))
