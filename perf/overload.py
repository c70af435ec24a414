"""Overload at twice the sustainable rate: setsuna's deadline shedding beside a plain client.

``python -m perf.overload`` (about a minute on 2 cores; builds its own model):

1. builds a wide MLP (48-1024-1024-1, PyTorch -> the gated engines) so the
   server, not this Python load generator, is the bottleneck, and serves it
   as the builder ships it (dynamic batching, no queue policy);
2. measures the sustainable rate: answers/s of a closed loop (concurrency
   ``--concurrency``, no deadline);
3. offers twice that rate, open loop (requests are sent on a clock, whether or
   not earlier ones came back), for ``--seconds``, every request with a
   ``--deadline-ms`` budget, twice:

   * **setsuna**: ``AsyncClient`` (deadline stamped on each request, the
     backend sheds what it cannot answer in time, ``max_in_flight`` admission),
   * **plain**: ``tritonclient`` aio with the same client-side timeout and no
     deadline parameter (the server computes everything it is sent);

4. prints, for each: goodput (answers within the deadline per second), p50/p99
   of the answered requests beside the deadline, and every refusal by type,
   with whether the SDK typed it retryable, and this generator's own lag
   (it shares the cores with the server). Targets: setsuna's p99 of answered
   <= deadline, and every refusal typed and retryable (a ``DeadlineError``,
   the caller's budget spent waiting, is counted apart: too late to retry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as aio

from setsuna.client import AsyncClient, ClientSettings
from setsuna.errors import ServingError
from setsuna.server import LocalTriton

MODEL = "wide_mlp"
N_FEATURES = 48


@dataclass
class Outcome:
    """What one load phase saw."""

    offered: int = 0
    answered_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    retryable: Counter[str] = field(default_factory=Counter)
    #: How late each request started against its slot on the clock: this
    #: generator's own lag (it shares the host's cores with the server).
    start_lag_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, deadline_ms: float) -> dict[str, Any]:
        ok = np.array(self.answered_ms) if self.answered_ms else np.array([np.nan])
        return {
            "offered": self.offered,
            "offered_per_s": round(self.offered / self.seconds),
            "answered": len(self.answered_ms),
            "goodput_per_s": round(len(self.answered_ms) / self.seconds),
            "answered_p50_ms": round(float(np.nanpercentile(ok, 50)), 2),
            "answered_p99_ms": round(float(np.nanpercentile(ok, 99)), 2),
            "deadline_ms": deadline_ms,
            "answered_late": len(self.late_ms),
            "refused": dict(self.refused),
            "refused_retryable": dict(self.retryable),
            "generator_lag_p50_ms": round(float(np.percentile(self.start_lag_ms, 50)), 2),
            "generator_lag_p99_ms": round(float(np.percentile(self.start_lag_ms, 99)), 2),
        }


def build(root: Path) -> Path:
    """Train nothing: a fixed random wide MLP, converted and gated like any source."""
    import torch

    from build_engines.build import build_model
    from build_engines.sources import from_object
    from build_engines.spec import ModelSpec

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1),
        torch.nn.Sigmoid(),
    ).eval()
    x = np.random.default_rng(0).normal(size=(2_000, N_FEATURES)).astype(np.float32)
    source = from_object(net, name=MODEL, example_input=torch.from_numpy(x[:8]))
    build_model(source, x, ModelSpec(MODEL), root, ("local",), root / "work", echo=False)
    return root / "local"


def rows(n: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(1).normal(size=(n, 1, N_FEATURES)).astype(np.float32)


async def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    """Answers per second with ``concurrency`` callers and no deadline: the sustainable rate."""
    data = rows(256)
    done = 0
    settings = ClientSettings(deadline_ms=60_000, max_retries=0)
    async with AsyncClient(url, settings=settings) as client:
        await client.infer(MODEL, data[0])
        end = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await client.infer(MODEL, data[(i + done) % len(data)])
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        return done / (time.perf_counter() - began)


async def open_loop(send: Any, rate_per_s: float, seconds: float, deadline_ms: float) -> Outcome:
    """Send ``rate_per_s`` requests a second on a clock; ``send(i)`` is one request."""
    out = Outcome()
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due_s: float) -> None:
        t0 = time.perf_counter()
        out.start_lag_ms.append((t0 - due_s) * 1e3)
        try:
            await send(i)
        except ServingError as exc:
            kind = type(exc).__name__
            out.refused[kind] += 1
            out.retryable[kind] += exc.retryable
            return
        except Exception as exc:  # the plain client's own errors
            kind = "deadline" if "deadline" in str(exc).lower() else type(exc).__name__
            out.refused[kind] += 1
            return
        ms = (time.perf_counter() - t0) * 1e3
        (out.answered_ms if ms <= deadline_ms else out.late_ms).append(ms)

    began = time.perf_counter()
    end = began + seconds
    while (now := time.perf_counter()) < end:
        due = int((now - began) * rate_per_s)
        while out.offered < due:
            slot = began + out.offered / rate_per_s
            tasks.append(asyncio.create_task(one(out.offered, slot)))
            out.offered += 1
        await asyncio.sleep(0.0005)
    await asyncio.gather(*tasks)
    out.seconds = seconds
    return out


async def phases(url: str, args: argparse.Namespace) -> dict[str, Any]:
    sustainable = await closed_loop(url, args.concurrency, args.seconds / 2)
    rate = 2 * sustainable
    data = rows(256)
    # Admit what the server can answer in half the deadline: the queue a request
    # joins then drains in time, and the rest is refused before it is sent.
    in_flight = max(1, int(sustainable * args.deadline_ms / 2e3))
    settings = ClientSettings(deadline_ms=args.deadline_ms, max_retries=0, max_in_flight=in_flight)
    async with AsyncClient(url, settings=settings) as client:
        await client.infer(MODEL, data[0])

        async def setsuna(i: int) -> None:
            await client.infer(MODEL, data[i % len(data)])

        ours = await open_loop(setsuna, rate, args.seconds, args.deadline_ms)
    plain_client = aio.InferenceServerClient(url)
    try:

        async def plain(i: int) -> None:
            inp = aio.InferInput("features", [1, N_FEATURES], "FP32")
            inp.set_data_from_numpy(data[i % len(data)])
            await plain_client.infer(MODEL, [inp], client_timeout=args.deadline_ms / 1e3)

        theirs = await open_loop(plain, rate, args.seconds, args.deadline_ms)
    finally:
        await plain_client.close()
    return {
        "sustainable_per_s": round(sustainable),
        "offered_rate_per_s": round(rate),
        "max_in_flight": in_flight,
        "setsuna": ours.summary(args.deadline_ms),
        "plain": theirs.summary(args.deadline_ms),
    }


def verdict(doc: dict[str, Any]) -> list[str]:
    ours, theirs = doc["setsuna"], doc["plain"]
    # A DeadlineError is the caller's own budget running out while it waited (not
    # retryable: too late for this answer); every other refusal must be retryable.
    refusals = {k: n for k, n in ours["refused"].items() if k != "DeadlineError"}
    typed = all(ours["refused_retryable"].get(k, 0) == n for k, n in refusals.items())
    ratio = ours["goodput_per_s"] / max(1, theirs["goodput_per_s"])
    within = ours["answered_p99_ms"] <= ours["deadline_ms"]
    return [
        f"sustainable {doc['sustainable_per_s']:,}/s; offered {doc['offered_rate_per_s']:,}/s "
        f"(2x) for each client; deadline {ours['deadline_ms']:g} ms",
        f"setsuna: goodput {ours['goodput_per_s']:,}/s, answered p50/p99 "
        f"{ours['answered_p50_ms']}/{ours['answered_p99_ms']} ms, refused {ours['refused']} "
        f"(retryable {ours['refused_retryable']}), late {ours['answered_late']}; this "
        f"generator's lag p50/p99 {ours['generator_lag_p50_ms']}/"
        f"{ours['generator_lag_p99_ms']} ms",
        f"plain:   goodput {theirs['goodput_per_s']:,}/s, answered p50/p99 "
        f"{theirs['answered_p50_ms']}/{theirs['answered_p99_ms']} ms, refused "
        f"{theirs['refused']}, late {theirs['answered_late']}",
        f"goodput setsuna/plain {ratio:.2f}x",
        f"{'PASS' if within else 'MISS'} answered p99 within the deadline",
        f"{'PASS' if typed else 'MISS'} every refusal typed and retryable "
        f"(DeadlineError, the caller's budget spent waiting, reported apart)",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.overload", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(".cache/perf/overload"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build(Path(tmp))
        log = args.out / "triton.log"
        with LocalTriton.on_free_ports(repo, cache_size_bytes=0, log_path=log) as server:
            doc = asyncio.run(phases(server.grpc_url, args))
    lines = verdict(doc)
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(not line.startswith("MISS") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
