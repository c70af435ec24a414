"""``python -m build_engines.demo``: predictions through a real local Triton.

Starts the wheel's ``tritonserver`` on the ``local`` repository, sends a few
held-out rows of each model over gRPC with binary tensors, and prints
Triton's scores beside the in-process engine's (from the same version folder)
and the decision each implies. It exits non-zero if Triton and the engine
disagree beyond float32 noise, so the demo is also a smoke test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from build_engines.base import F32
from build_engines.examples import data
from setsuna import manifest, runtime
from setsuna.schema import INPUT_NAME, OUTPUT_NAME, FeatureSchema
from setsuna.server import LocalTriton, ServerSettings, free_ports

ROWS = 5
ATOL = 1e-5


def demo_rows(schema: FeatureSchema, n: int = ROWS) -> F32:
    """Held-out rows of the example data that fit ``schema``'s shape."""
    if len(schema.row_shape) == 2:
        return data.sequences(n_seqs=400).x_valid[:n]
    return data.tabular(n_rows=400, n_features=schema.n_features).x_valid[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m build_engines.demo", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    args = p.parse_args(argv)
    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(
        model_repository=args.model_repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    worst = 0.0
    with LocalTriton(settings) as server:
        print(f"tritonserver ready at grpc://{server.grpc_url} with {', '.join(settings.models)}")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        engines = [
            n
            for n in settings.models
            if (args.model_repository / n / "1" / manifest.MANIFEST_NAME).is_file()
        ]
        for name in engines:
            folder = args.model_repository / name / "1"
            m = manifest.verify(folder)
            x = demo_rows(m.schema)
            inp = grpcclient.InferInput(INPUT_NAME, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer(
                name, [inp], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)]
            )
            got = result.as_numpy(OUTPUT_NAME)
            local = runtime.load(m.engine, folder, m.engine_params).predict(x)
            worst = max(worst, float(np.abs(got - local).max()))
            print(f"\n{name}: {m.candidate} ({m.engine}), source {m.source['label']}")
            print("  row  triton     in-process  decision")
            for i in range(len(x)):
                d = "long" if got[i, 0] >= m.decision_threshold else "flat/short"
                print(f"  {i:<4} {got[i, 0]:.6f}   {local[i, 0]:.6f}    {d}")
        if "decide" in settings.models:
            _decisions(
                client, demo_rows(manifest.read(args.model_repository / engines[0] / "1").schema)
            )
        client.close()
    print(f"\nmax |triton - in-process| = {worst:.2e}")
    return 0 if worst <= ATOL else 1


def _decisions(client: Any, x: F32) -> None:
    """One request to ``decide``: each row a symbol, routed by its A/B arm, then signalled."""
    symbols = [f"SYM{i}" for i in range(len(x))]
    inputs = [
        grpcclient.InferInput(INPUT_NAME, list(x.shape), "FP32"),
        grpcclient.InferInput("key", [len(x), 1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.array([[s.encode()] for s in symbols], dtype=np.object_))
    r = client.infer("decide", inputs)
    names = {1: "BUY", 0: "HOLD", -1: "SELL"}
    print("\ndecide (A/B arm by symbol, engine in process, signal): one request")
    print("  symbol  arm        model       score     signal  confidence")
    for i, sym in enumerate(symbols):
        print(
            f"  {sym:<7} {r.as_numpy('arm')[i, 0].decode():<10} "
            f"{r.as_numpy('model')[i, 0].decode():<11} {r.as_numpy(OUTPUT_NAME)[i, 0]:.6f}  "
            f"{names[int(r.as_numpy('signal')[i, 0])]:<7} {r.as_numpy('confidence')[i, 0]:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
