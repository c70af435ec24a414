"""Peer: Ray Serve with ``@serve.batch`` around ``lightgbm.Booster.predict``.

    python perf/peer_servers/ray_app.py --model model.txt --port 8000 --temp-dir /tmp/rp

``POST /predict`` takes ``{"features": [48 floats]}`` and answers
``{"score": p}``; ``GET /-/healthz`` is Serve's own readiness route. One
replica; requests are gathered by ``@serve.batch`` (``--max-batch-size``,
``--batch-wait-s``) into one ``predict`` call.

Everything stays on loopback: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set
before ``import ray`` (otherwise Ray picks the machine's external address for
its internal traffic), the node address is 127.0.0.1, the HTTP proxy binds
127.0.0.1, the dashboard is off and usage-stats reporting is disabled.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import argparse
import signal
import sys
import time
from types import FrameType
from typing import Any

import lightgbm as lgb
import numpy as np
import ray
from ray import serve
from starlette.requests import Request

N_FEATURES = 48


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def build(model_path: str, max_batch_size: int, batch_wait_s: float) -> Any:
    @serve.deployment(num_replicas=1, max_ongoing_requests=256)
    class LightGBM:
        def __init__(self) -> None:
            self.booster = lgb.Booster(model_file=model_path)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def predict(self, rows: list[list[float]]) -> list[float]:
            x = np.asarray(rows, dtype=np.float32)
            return [float(v) for v in self.booster.predict(x)]

        async def __call__(self, request: Request) -> dict[str, float]:
            body = await request.json()
            features = body["features"]
            if len(features) != N_FEATURES:
                raise ValueError(f"expected {N_FEATURES} features, got {len(features)}")
            return {"score": await self.predict(features)}

    return LightGBM.bind()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="LightGBM text model file")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--temp-dir", required=True, help="Ray's session folder (keep it short)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=0.001)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            _temp_dir=args.temp_dir,
            log_to_driver=False,
        )
        # ray.init installs its own SIGTERM handler (it aborts): take it back so that
        # SIGTERM shuts Serve and Ray down in order.
        signal.signal(signal.SIGTERM, _interrupt)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(
            build(args.model, args.max_batch_size, args.batch_wait_s),
            name="lightgbm",
            route_prefix="/predict",
        )
        print("ray-serve-ready", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
