"""Would a GPU help these models? PyTorch on CUDA beside the CPU engines, same run.

    python perf/gpu_torch.py            # on a host with a CUDA GPU (CPU rows run anywhere)

For the example MLP and LSTM (trained here, fixed seeds) this times, per
engine: single-row p50/p99 in microseconds *including* the host-to-device and
device-to-host copies a server pays (numpy in, numpy out), and rows/s at a
batch of 1,024; and for reduced precision, the share of held-out decisions
identical to the fp32 CPU source. Engines: torch fp32 on 1 CPU thread (the
source), torch fp32 and fp16 on CUDA, and the same replayed from a captured
CUDA graph (which removes per-kernel launch cost, the dominant cost of a
one-row call). TensorRT is not installed on the lent GPU hosts, so it is not
here. Prints one table per model; writes nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch

from build_engines.examples import data
from build_engines.examples.neural import train_lstm, train_mlp

F32 = npt.NDArray[np.float32]
CALLS = 2000
BATCH = 1024


def _time(fn: Callable[[F32], F32], rows: F32) -> tuple[float, float, float]:
    singles = [np.ascontiguousarray(rows[i : i + 1]) for i in range(256)]
    for x in singles[:32]:
        fn(x)
    lat = np.empty(CALLS)
    for i in range(CALLS):
        t0 = time.perf_counter_ns()
        fn(singles[i % len(singles)])
        lat[i] = time.perf_counter_ns() - t0
    big = np.ascontiguousarray(np.resize(rows, (BATCH, *rows.shape[1:])))
    fn(big)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        fn(big)
        n += BATCH
    return (
        float(np.percentile(lat, 50)) / 1e3,
        float(np.percentile(lat, 99)) / 1e3,
        n / (time.perf_counter() - start),
    )


def _cpu(net: torch.nn.Module) -> Callable[[F32], F32]:
    def run(x: F32) -> F32:
        with torch.inference_mode():
            return np.asarray(net(torch.from_numpy(x)).numpy(), dtype=np.float32)

    return run


def _cuda(net: torch.nn.Module, dtype: torch.dtype) -> Callable[[F32], F32]:
    gpu = net.to("cuda", dtype)

    def run(x: F32) -> F32:
        with torch.inference_mode():
            y = gpu(torch.from_numpy(x).to("cuda", dtype, non_blocking=True))
            return np.asarray(y.float().cpu().numpy(), dtype=np.float32)

    return run


def _graph(
    net: torch.nn.Module, dtype: torch.dtype, shape: tuple[int, ...]
) -> Callable[[F32], F32]:
    """A CUDA graph captured for one input shape; other shapes fall back to eager."""
    gpu = net.to("cuda", dtype)
    static_in = torch.zeros(shape, device="cuda", dtype=dtype)
    with torch.inference_mode():
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                gpu(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = gpu(static_in)
    eager = _cuda(net, dtype)
    pinned = torch.empty(static_out.shape, dtype=torch.float32).pin_memory()

    def run(x: F32) -> F32:
        if x.shape != shape:
            return eager(x)
        static_in.copy_(torch.from_numpy(x), non_blocking=True)
        graph.replay()
        pinned.copy_(static_out, non_blocking=False)
        return np.array(pinned.numpy(), dtype=np.float32)

    return run


def main() -> int:
    torch.set_num_threads(1)
    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}; GPU: {torch.cuda.get_device_name() if gpu else 'none'}")
    try:
        import tensorrt  # noqa: F401

        print("tensorrt: importable")
    except ImportError:
        print("tensorrt: not installed on this host")
    for name, split, train in (
        ("mlp", data.tabular(), train_mlp),
        ("lstm", data.sequences(), train_lstm),
    ):
        net = train(split).eval()
        x = split.x_valid
        with torch.inference_mode():
            ref = net(torch.from_numpy(x)).numpy()
        engines: dict[str, Callable[[F32], F32]] = {"torch fp32 CPU 1 thread (source)": _cpu(net)}
        if gpu:
            import copy

            engines["torch fp32 CUDA"] = _cuda(copy.deepcopy(net), torch.float32)
            engines["torch fp16 CUDA"] = _cuda(copy.deepcopy(net), torch.float16)
            one = (1, *x.shape[1:])
            engines["torch fp32 CUDA graph (1 row)"] = _graph(
                copy.deepcopy(net), torch.float32, one
            )
            engines["torch fp16 CUDA graph (1 row)"] = _graph(
                copy.deepcopy(net), torch.float16, one
            )
        print(f"\n== {name} ({len(x)} held-out rows) ==")
        print(
            f"{'engine':36} {'identical':>10} {'max|d|':>9} {'p50 us':>8} {'p99 us':>8} "
            f"{'rows/s@1024':>12}"
        )
        base = None
        for label, fn in engines.items():
            out = np.concatenate([fn(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
            same = float(np.mean((out >= 0.5) == (ref >= 0.5)))
            p50, p99, rps = _time(fn, x)
            base = base or (p50, rps)
            print(
                f"{label:36} {same:>10.4%} {float(np.abs(out - ref).max()):>9.2e} {p50:>8.1f} "
                f"{p99:>8.1f} {rps:>12,.0f}   p50 {base[0] / p50:.2f}x rows/s {rps / base[1]:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
