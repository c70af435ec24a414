"""Peer: the naive Triton deployment, PyTriton serving ``lightgbm.Booster.predict``.

    python perf/peer_servers/pytriton_app.py --model model.txt --http-port 8000 \
        --grpc-port 8001 --metrics-port 8002 [--no-batching]

PyTriton's defaults (``ModelConfig()``: batching on, ``max_batch_size=4``,
dynamic batcher with no queue delay), or ``--no-batching`` for
``ModelConfig(batching=False)``. The model is ``lightgbm`` with input
``features`` FP32 [48] and output ``score`` FP32 [1]; every endpoint binds to
127.0.0.1. Set ``OMP_NUM_THREADS`` in the environment to bound LightGBM's
threads, and start it with the environment ``setsuna.server`` builds for the
wheel's tritonserver (interpreter ``LIBDIR`` first on ``LD_LIBRARY_PATH``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

import lightgbm as lgb
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

N_FEATURES = 48


def _scores(booster: lgb.Booster, x: Any) -> Any:
    """``Booster.predict`` as the FP32 [n, 1] tensor the model config declares."""
    return np.asarray(booster.predict(x), dtype=np.float32).reshape(-1, 1)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LightGBM text model file")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--no-batching", action="store_true")
    args = p.parse_args(argv)
    booster = lgb.Booster(model_file=args.model)

    if args.no_batching:
        config = ModelConfig(batching=False)
        shape: tuple[int, ...] = (-1, N_FEATURES)
        out_shape: tuple[int, ...] = (-1, 1)

        def infer(requests: list[Any]) -> list[dict[str, Any]]:
            # No decorator: PyTriton hands over the list of requests as they came.
            return [{"score": _scores(booster, r["features"])} for r in requests]

        infer_func = infer
    else:
        config = ModelConfig()  # PyTriton's defaults
        shape, out_shape = (N_FEATURES,), (1,)

        @batch  # type: ignore[untyped-decorator]
        def infer_batched(**inputs: Any) -> dict[str, Any]:
            return {"score": _scores(booster, inputs["features"])}

        infer_func = infer_batched

    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Triton(config=triton_config) as triton:
            triton.bind(
                model_name="lightgbm",
                infer_func=infer_func,
                inputs=[Tensor(name="features", dtype=np.float32, shape=shape)],
                outputs=[Tensor(name="score", dtype=np.float32, shape=out_shape)],
                config=config,
                strict=False,
            )
            triton.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
