"""What every ensembles Python-backend model shares: parameters, BLS calls, errors, labels.

Imported only inside Triton's Python backend stub (``triton_python_backend_utils``
exists nowhere else). The logic each model applies (bucketing, thresholds,
weights) lives in plain modules of :mod:`ensembles` and is tested without Triton.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from ensembles.limits import Limits, Overdue, call_timeout
from setsuna import deadline
from setsuna.contract import Target
from setsuna.errors import InputError, SetsunaError
from setsuna.schema import INPUT_NAME, OUTPUT_NAME

F32 = npt.NDArray[np.float32]


class Counters:
    """Prometheus counters added up in the stub and pushed every ``flush_s``.

    Each ``Metric.increment`` is a round trip from the stub to the server
    process (measured: ~80 us, a third of a one-row decision); a scraper reads
    every few seconds, so counts are pushed at most every ``flush_s`` (and at
    the first increment, so a series exists from the first request).
    """

    def __init__(self, family: Any, base_labels: Mapping[str, str], flush_s: float = 0.25):
        self._family, self._base, self._flush_s = family, dict(base_labels), flush_s
        self._metrics: dict[tuple[tuple[str, str], ...], Any] = {}
        self._pending: dict[tuple[tuple[str, str], ...], int] = {}
        self._last = -math.inf

    def add(self, n: int, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._pending[key] = self._pending.get(key, 0) + n
        if time.monotonic() - self._last >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        for key, n in self._pending.items():
            m = self._metrics.get(key)
            if m is None:
                m = self._metrics[key] = self._family.Metric(labels={**self._base, **dict(key)})
            if n:
                m.increment(n)
        self._pending.clear()


class DownstreamError(SetsunaError):
    """A model called through BLS answered with an error (returned as an error, never a default)."""


def model_parameters(args: Mapping[str, Any]) -> dict[str, str]:
    """The ``parameters`` of this model's config.pbtxt, as plain strings."""
    cfg = json.loads(args["model_config"])
    return {k: str(v.get("string_value", "")) for k, v in cfg.get("parameters", {}).items()}


def config_path(args: Mapping[str, Any], value: str) -> Path:
    """A path parameter: absolute, or relative to the model's folder."""
    p = Path(value)
    return p if p.is_absolute() else Path(args["model_repository"]) / p


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    if not raw or raw == "{}":  # the usual case: no JSON to parse
        return {}
    out = json.loads(raw)
    return out if isinstance(out, dict) else {}


def inputs(request: Any) -> dict[str, Any]:
    """A request's input tensors by name: one ``inputs()`` call, however many are read.

    (``pb_utils.get_input_tensor_by_name`` builds the list of inputs again on each call.)
    """
    return {t.name(): t for t in request.inputs()}


def features(request: Any, *, allow_nan: bool, tensors: dict[str, Any] | None = None) -> F32:
    tensor = (tensors if tensors is not None else inputs(request)).get(INPUT_NAME)
    if tensor is None:  # Triton checks required inputs; a model config could drop it
        raise InputError(f"input '{INPUT_NAME}' is missing")
    x: F32 = tensor.as_numpy()
    if not allow_nan and not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise InputError(
            f"input '{INPUT_NAME}': row {row} holds NaN or inf, which this model does not "
            "allow; fix the feature pipeline upstream"
        )
    return x


def stack(
    model: str, requests: Sequence[Any], *, allow_nan: bool
) -> tuple[list[Any], list[int], list[F32], F32 | None]:
    """Responses (refusals filled in), the kept requests' indices, their rows, all stacked."""
    responses: list[Any] = [None] * len(requests)
    kept: list[int] = []
    xs: list[F32] = []
    for i, r in enumerate(requests):
        try:
            xs.append(features(r, allow_nan=allow_nan))
            kept.append(i)
        except SetsunaError as exc:
            responses[i] = refusal(model, exc)
    if not xs:
        return responses, kept, xs, None
    return responses, kept, xs, xs[0] if len(xs) == 1 else np.concatenate(xs)


def refusal(model: str, exc: SetsunaError) -> Any:
    """INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) for a request the caller can fix."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"{model}: {exc}", pb_utils.TritonError.INVALID_ARG)
    )


def answer(
    request: Any,
    columns: Mapping[str, Any],
    rows: slice,
    *,
    by_name: Mapping[str, Callable[[int], Any]] | None = None,
) -> Any:
    """One request's response: its ``rows`` of each column it asked for.

    A request that names no output gets every column; ``by_name`` columns are
    built only for a request that names them (they cost work, or say more than
    the answer: which instance answered). Each output tensor costs a
    shared-memory allocation and copy in the Python backend (a string one,
    serialisation too), so nothing unasked is built.
    """
    asked = request.requested_output_names()
    wanted = asked or columns.keys()
    tensors = [pb_utils.Tensor(k, columns[k][rows]) for k in wanted if k in columns]
    for name, build in (by_name or {}).items():
        if name in asked:
            tensors.append(pb_utils.Tensor(name, build(rows.stop - rows.start)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def failure(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def bls_request(target: Target, x: F32, timeout_us: int = 0) -> Any:
    """One downstream request for a whole batch of rows, pinned to the target's version.

    ``timeout_us`` rides along as the request's Triton timeout (0: none) and as
    the deadline parameter setsuna's engines shed by (:mod:`setsuna.deadline`).
    """
    return pb_utils.InferenceRequest(
        model_name=target.model,
        model_version=target.version,
        requested_output_names=[OUTPUT_NAME],
        inputs=[pb_utils.Tensor(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))],
        timeout=timeout_us,
        # The engine sheds the call if it cannot answer before this model gives up
        # on it (setsuna.deadline): no computing answers nobody will read.
        parameters=deadline.parameters(timeout_us / 1e6) if timeout_us > 0 else {},
    )


Timeout = tuple[float, str]  # seconds, and where the figure comes from


def timeout_of(requests: Sequence[Any], limits: Limits) -> Timeout:
    """How long a downstream call for these requests may take (see ``limits.call_timeout``)."""
    return call_timeout((int(r.timeout()) for r in requests), limits.bls_timeout_ms)


class Downstream:
    """Every BLS call of one model instance: each one timed out, overdue ones bounded.

    A call runs ``InferenceRequest.exec`` in this pool's threads, as the
    stub's ``async_exec`` does in the event loop's default pool, and the
    caller waits at most the timeout: Triton 2.51's stub has no timeout of
    its own (``exec`` waits forever) and the core enforces a request's
    ``timeout`` only in a queue policy's queue, which these models must not
    have (see Measuring). The Python backend cannot take a call back, so a
    call past its time keeps its thread until the answer comes and counts as
    overdue meanwhile; with ``max_overdue_calls`` of them a model gets no more
    calls until one returns (they fail at once), so a model that never
    answers holds a few threads, not all of them.

    :meth:`call` is for coroutines (router, selector), :meth:`call_sync` for
    one call from a thread, :meth:`call_all` for several at once from a
    synchronous execute (the combiner: no event loop to hop through).
    """

    def __init__(self, model: str, limits: Limits, workers: int = 32) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{model}-bls")
        self.overdue = Overdue(limits.max_overdue_calls)

    def _stuck(self, target: Target) -> DownstreamError | None:
        """The error a call to ``target`` fails with at once: max_overdue_calls are out."""
        n = self.overdue.count(target.label)
        if n < self.overdue.limit:
            return None
        return DownstreamError(
            f"{target.label} has {n} calls unanswered past their timeout; not calling it until "
            f"one returns (max_overdue_calls={self.overdue.limit}): it is stuck, fix it"
        )

    def _submit(self, target: Target, x: F32, timeout: Timeout) -> Future[Any]:
        stuck = self._stuck(target)
        if stuck is not None:
            raise stuck
        request = bls_request(target, x, max(1, int(timeout[0] * 1e6)))
        return self._pool.submit(request.exec)

    def _gave_up(self, target: Target, future: Future[Any], timeout: Timeout) -> DownstreamError:
        label = target.label
        if not future.cancel():  # running: its thread waits on for the answer
            self.overdue.add(label)
            future.add_done_callback(lambda _: self.overdue.done(label))
        return DownstreamError(
            f"{label} did not answer within {timeout[0] * 1e3:g} ms ({timeout[1]}): timed out; "
            "the call was abandoned. Raise the timeout, or find why that model is slow or stuck"
        )

    async def call(self, target: Target, x: F32, timeout: Timeout) -> Any:
        """The response, or DownstreamError when it does not come within ``timeout``."""
        future = self._submit(target, x, timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout[0])
        except TimeoutError:
            raise self._gave_up(target, future, timeout) from None
        except SetsunaError:
            raise
        except Exception as exc:  # exec itself failed (e.g. the stub is shutting down)
            raise DownstreamError(f"{target.label} failed: {exc}") from exc

    def call_all(self, targets: Sequence[Target], x: F32, timeout: Timeout) -> list[Any]:
        """Every target scores ``x``, all in flight together, one bounded wait for them all.

        :meth:`call` for synchronous code (the combiner): no event loop between
        the stub's thread and the calls, and the caller wakes once, when the
        last answer is in or the time is up. Each item is the response or the
        DownstreamError of that call, in ``targets`` order; a call not back
        within ``timeout`` is abandoned (and counted overdue) as in :meth:`call`.
        All or nothing: when one target has ``max_overdue_calls`` out, none is
        called and every item is an error naming it, at once.
        """
        for t in targets:
            stuck = self._stuck(t)
            if stuck is not None:
                return [
                    stuck if u is t else DownstreamError(f"{u.label} not called: {stuck}")
                    for u in targets
                ]
        out: list[Any] = []
        futures: dict[int, Future[Any]] = {}
        for i, t in enumerate(targets):
            try:
                futures[i] = self._submit(t, x, timeout)
                out.append(None)
            except DownstreamError as exc:
                out.append(exc)
        if futures:
            wait(futures.values(), timeout[0])
        for i, f in futures.items():
            t = targets[i]
            out[i] = self._answer(t, f) if f.done() else self._gave_up(t, f, timeout)
        return out

    @staticmethod
    def _answer(target: Target, future: Future[Any]) -> Any:
        try:
            return future.result()
        except Exception as exc:  # exec itself failed (e.g. the stub is shutting down)
            return DownstreamError(f"{target.label} failed: {exc}")

    def call_sync(self, target: Target, x: F32, timeout: Timeout) -> Any:
        """:meth:`call` for synchronous code (``decide``, probe threads)."""
        future = self._submit(target, x, timeout)
        try:
            return future.result(timeout[0])
        except TimeoutError:
            raise self._gave_up(target, future, timeout) from None
        except Exception as exc:
            raise DownstreamError(f"{target.label} failed: {exc}") from exc

    def close(self) -> None:
        """Stop taking calls; overdue ones are left to finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def bls_score(response: Any, target: Target, rows: int) -> F32:
    """The ``score`` of a BLS response, or DownstreamError naming the model and version.

    ``response`` may be the exception a call ended with (``gather(...,
    return_exceptions=True)``): it is raised as a DownstreamError.
    """
    if isinstance(response, DownstreamError):
        raise response
    if isinstance(response, BaseException):
        raise DownstreamError(f"{target.label} failed: {response}")
    if response.has_error():
        raise DownstreamError(f"{target.label} failed: {response.error().message()}")
    out = pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME)
    if out is None:
        raise DownstreamError(f"{target.label} returned no '{OUTPUT_NAME}' output")
    y: F32 = np.asarray(out.as_numpy(), dtype=np.float32).reshape(-1, 1)
    if len(y) != rows:
        raise DownstreamError(f"{target.label} returned {len(y)} rows for {rows}")
    return y


@functools.lru_cache(maxsize=64)
def _label_table(values: tuple[str, ...]) -> npt.NDArray[np.object_]:
    return np.array([v.encode() for v in values], dtype=np.object_)


def labels(values: Sequence[str], index: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.object_]:
    """A BYTES column: ``values[index[i]]`` per row, without a Python loop over rows."""
    table = _label_table(tuple(values))
    return np.asarray(table[index], dtype=np.object_).reshape(-1, 1)


def constant(value: str, rows: int) -> npt.NDArray[np.object_]:
    return np.full((rows, 1), value.encode(), dtype=np.object_)


def split(total: int, sizes: Sequence[int]) -> list[slice]:
    """Row slices of each request in a stacked batch."""
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    assert start == total
    return out
