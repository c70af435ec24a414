"""One closed-loop HTTP load client for every peer in ``perf/peers.py``.

    python perf/peers_client.py --url http://127.0.0.1:8000/v2/models/lightgbm/infer \
        --protocol v2 --rows rows.npy --concurrency 32 --duration 10 --warmup 2

``concurrency`` workers each keep exactly one request in flight (closed loop):
send, wait for the whole answer, send the next. Each request is ONE row of
float32 features, taken in turn from many distinct held-out rows (worker ``k``
sends rows ``k, k + c, k + 2c, ...``), never one repeated tensor. Bodies are
encoded once before the run, so the loop only sends bytes and reads bytes:

``v2``
    the KServe V2 / Triton JSON protocol, ``POST .../v2/models/<name>/infer``
    with ``{"inputs": [{"name", "shape": [1, n], "datatype": "FP32", "data"}]}``;
    the score is ``outputs[0].data[0]``.
``json``
    a plain endpoint: ``{"features": [n floats]}`` in, ``{"score": p}`` out.

Floats are written as the exact decimal of each float32 (``float(np.float32)``)
so every server parses back the very same float32 (LightGBM compares the
widened value against double thresholds: a shortened decimal could flip a split).

Requests that start after the warm-up and finish before the end are measured
(``requests``; ``sent`` counts every request, warm-up included): latency
(send to last byte read) -> p50/p90/p99, and completed requests per second of
the window. In the loop only the HTTP status is checked (answers are checked
before timing, with :func:`predict`); any other status or a transport error is
counted in ``errors``. One process, asyncio with aiohttp (C parser) and one
pooled keep-alive connection per worker, uvloop when importable. Its own cost
is measured, not assumed: ``client_cpu_us_per_req`` is this process's CPU time
over the run divided by the requests sent; it shares the host's cores with
the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aiohttp
import numpy as np
import numpy.typing as npt

Protocol = Literal["v2", "json"]
PROTOCOLS: tuple[Protocol, ...] = ("v2", "json")
_HEADERS = {"Content-Type": "application/json"}
#: Headers aiohttp would add by itself: not needed, and Accept-Encoding could
#: make a server spend time compressing (MLServer has a gzip middleware).
_SKIP_HEADERS = ("User-Agent", "Accept-Encoding")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask one peer for a score."""

    url: str
    protocol: Protocol
    input_name: str = "features"

    def body(self, row: npt.NDArray[np.float32]) -> bytes:
        values = [float(v) for v in np.asarray(row, dtype=np.float32).reshape(-1)]
        payload: dict[str, Any]
        if self.protocol == "v2":
            payload = {
                "inputs": [
                    {
                        "name": self.input_name,
                        "shape": [1, len(values)],
                        "datatype": "FP32",
                        "data": values,
                    }
                ]
            }
        else:
            payload = {"features": values}
        return json.dumps(payload, separators=(",", ":")).encode()

    def score(self, answer: bytes) -> float:
        doc = json.loads(answer)
        if self.protocol == "v2":
            return float(np.asarray(doc["outputs"][0]["data"], dtype=np.float64).reshape(-1)[0])
        return float(doc["score"])


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run at one concurrency."""

    concurrency: int
    duration_s: float
    warmup_s: float
    requests: int
    sent: int
    errors: int
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    distinct_rows: int
    client_cpu_us_per_req: float
    event_loop: str
    first_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None, "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, f"uvloop {getattr(uvloop, '__version__', '?')}"


def _session(concurrency: int, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_HEADERS,
        auto_decompress=False,
    )


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers=_HEADERS) as resp:
        return resp.status, await resp.read()


async def _predict(endpoint: Endpoint, bodies: list[bytes], timeout_s: float) -> list[float]:
    out: list[float] = []
    async with _session(1, timeout_s) as session:
        for body in bodies:
            status, answer = await _post(session, endpoint.url, body)
            if status != 200:
                text = answer[:300].decode(errors="replace")
                raise RuntimeError(f"HTTP {status} from {endpoint.url}: {text}")
            out.append(endpoint.score(answer))
    return out


def predict(
    endpoint: Endpoint, rows: npt.NDArray[np.float32], *, timeout_s: float = 10.0
) -> list[float]:
    """Scores for ``rows``, one request per row, one after another (for checking answers)."""
    factory, _ = _loop_factory()
    bodies = [endpoint.body(r) for r in rows]
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_predict(endpoint, bodies, timeout_s))


def probe(
    endpoint: Endpoint, row: npt.NDArray[np.float32], *, timeout_s: float = 2.0
) -> str | None:
    """``None`` when the peer scores ``row`` (HTTP 200 with a score), else why not."""
    try:
        predict(endpoint, row.reshape(1, -1), timeout_s=timeout_s)
    except (aiohttp.ClientError, TimeoutError, RuntimeError, KeyError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class _Tally:
    latencies: list[float]
    sent: int = 0
    errors: int = 0
    first_error: str | None = None


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[bytes],
    first: int,
    stride: int,
    measure_from: float,
    end: float,
    tally: _Tally,
) -> None:
    i, n = first, len(bodies)
    perf_counter = time.perf_counter
    while True:
        t0 = perf_counter()
        if t0 >= end:
            return
        body = bodies[i % n]
        i += stride
        error: str | None = None
        try:
            async with session.post(url, data=body, headers=_HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        t1 = perf_counter()
        tally.sent += 1
        if error is not None:
            tally.errors += 1
            tally.first_error = tally.first_error or error
            await asyncio.sleep(0.001)  # a refusing server must not turn this into a spin
        elif t0 >= measure_from and t1 <= end:
            tally.latencies.append(t1 - t0)


async def _load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
) -> _Tally:
    tally = _Tally(latencies=[])
    async with _session(concurrency, timeout_s) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        end = measure_from + duration_s
        # A task group cancels and awaits every worker if one fails or we are interrupted.
        async with (
            asyncio.timeout(warmup_s + duration_s + timeout_s + 5),
            asyncio.TaskGroup() as tg,
        ):
            for k in range(concurrency):
                tg.create_task(
                    _worker(session, url, bodies, k, concurrency, measure_from, end, tally)
                )
    return tally


def run_load(
    endpoint: Endpoint,
    rows: npt.NDArray[np.float32],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    timeout_s: float = 10.0,
) -> LoadResult:
    """One closed-loop run; see the module docstring for what is measured."""
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("give concurrency >= 1, duration_s > 0 and warmup_s >= 0")
    if len(rows) < concurrency:
        raise ValueError(f"give at least {concurrency} rows (one per worker), got {len(rows)}")
    bodies = [endpoint.body(r) for r in rows]
    factory, loop_name = _loop_factory()
    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=factory) as runner:
        tally = runner.run(
            _load(endpoint.url, bodies, concurrency, duration_s, warmup_s, timeout_s)
        )
    cpu = time.process_time() - cpu0
    lat_ms = np.asarray(tally.latencies, dtype=np.float64) * 1e3
    n = len(lat_ms)
    sent = tally.sent  # the CPU time covers the warm-up too

    def pct(q: float) -> float:
        return float(np.percentile(lat_ms, q)) if n else float("nan")

    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        requests=n,
        sent=sent,
        errors=tally.errors,
        req_per_s=n / duration_s,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=float(lat_ms.mean()) if n else float("nan"),
        max_ms=float(lat_ms.max()) if n else float("nan"),
        distinct_rows=len(set(bodies)),
        client_cpu_us_per_req=cpu / sent * 1e6 if sent else float("nan"),
        event_loop=loop_name,
        first_error=tally.first_error,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perf/peers_client.py", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, default="v2")
    p.add_argument("--input-name", default="features")
    p.add_argument("--rows", required=True, help=".npy file of float32 rows [n, features]")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    rows = np.ascontiguousarray(np.load(args.rows), dtype=np.float32)
    endpoint = Endpoint(args.url, args.protocol, args.input_name)
    result = run_load(
        endpoint,
        rows,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    print(json.dumps(result.to_json(), indent=2))
    return 0 if result.errors == 0 and result.requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
