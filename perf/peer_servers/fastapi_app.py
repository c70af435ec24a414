"""Peer: a hand-written FastAPI endpoint running ONNX Runtime once per request.

    python perf/peer_servers/fastapi_app.py --onnx model.onnx --port 8000

``POST /predict`` takes ``{"features": [48 floats]}`` and answers
``{"score": p}``; ``GET /health`` answers 200 once the session is loaded. One
uvicorn worker (uvloop and httptools when installed), access log off, the
handler ``async def`` so ``sess.run`` (~30 us) runs inline on the event loop
rather than hopping to a thread pool. ONNX Runtime: one intra-op thread.

Runs in the peers venv (``make perf-peers``); the project venv lacks fastapi.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

N_FEATURES = 48


class Row(BaseModel):
    features: list[float]


def build_app(onnx_path: str) -> FastAPI:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(row: Row) -> dict[str, float]:
        if len(row.features) != N_FEATURES:
            raise HTTPException(422, f"expected {N_FEATURES} features, got {len(row.features)}")
        x = np.asarray(row.features, dtype=np.float32).reshape(1, N_FEATURES)
        out: Any = sess.run(None, {input_name: x})[0]
        return {"score": float(np.asarray(out).reshape(-1)[-1])}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--onnx", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(
        build_app(args.onnx),
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
