"""The SDK's Triton client: one stub, validated binary tensors, typed errors, bounded retries.

``Client(url)`` speaks gRPC by default (``protocol="http"`` works too) through
one reused ``tritonclient`` stub. The first call to a model reads its
metadata and config once (``Client(url, models=[...])`` or :meth:`Client.warm_up`
does it ahead, so that connecting and reading them never count against a
call's deadline); every later request is checked against that cache
client side (shape, batch size, dtype) before anything goes on the wire, so
a wrong request fails in microseconds with a :class:`~setsuna.errors.ShapeError`
instead of a server round trip. Tensors travel as binary data.

Every answer carries the model name and version that produced it
(:class:`Prediction`; for routed models such as ``decide`` also the
``name:version`` of the engine that scored each row). Failures are translated
into the :class:`~setsuna.errors.ServingError` family at this boundary. Only
the safe ones are retried — :class:`~setsuna.errors.UnavailableError` and
:class:`~setsuna.errors.OverloadedError`, where the request did not run — with
exponential backoff capped by ``backoff_max_ms`` and never past the call's
``deadline_ms``. A deadline, a refused input or a model that is not ready is
raised at once: retrying cannot fix them and would only spend the budget. A
model whose backend stub process died is not ready, although Triton 2.51
still reports it READY (:data:`_DEAD_STUB`).

:class:`AsyncClient` is the ``asyncio`` twin with the same API and rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from setsuna import deadline
from setsuna.contract import KEY, MODEL
from setsuna.errors import (
    ConfigError,
    DeadlineError,
    ModelNotReadyError,
    OverloadedError,
    RejectedInputError,
    ServingError,
    ShapeError,
    UnavailableError,
)
from setsuna.replicas import (
    ReplicaSet,
    ReplicaSettings,
    ReplicaStats,
    fails_over,
    replica_settings,
)
from setsuna.schema import INPUT_NAME
from setsuna.transport import Protocol, transport

if TYPE_CHECKING:
    from setsuna.pool import Pool

KEY_INPUT = KEY
#: Output of routed models (``router``, ``decide``) naming the engine of each row.
SERVED_BY_OUTPUT = MODEL


@dataclass(frozen=True)
class ClientSettings:
    """How every call behaves; validated once at construction.

    ``deadline_ms`` is the default budget of one call, retries and backoff
    included (a call may pass its own). ``max_retries`` bounds the retries of
    the safe errors; the wait before retry ``k`` is
    ``min(backoff_initial_ms * 2**k, backoff_max_ms)``, cut to what is left
    of the deadline. Over HTTP the socket timeout is ``deadline_ms`` (the
    HTTP stub cannot take a per-call client deadline; gRPC can).
    """

    deadline_ms: float = 100.0
    max_retries: int = 2
    backoff_initial_ms: float = 1.0
    backoff_max_ms: float = 20.0
    connect_timeout_ms: float = 2_000.0
    #: Calls this client lets be in flight at once (0: no limit). One more fails at
    #: once with a retryable OverloadedError instead of queueing behind the others:
    #: admission control, so a burst cannot grow the server's queue without bound.
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        if not self.deadline_ms > 0:
            raise ConfigError(f"deadline_ms={self.deadline_ms}: give a positive budget")
        if not 0 <= self.max_retries <= 10:
            raise ConfigError(f"max_retries={self.max_retries}: give 0..10")
        if not 0 <= self.backoff_initial_ms <= self.backoff_max_ms:
            raise ConfigError(
                f"backoff_initial_ms={self.backoff_initial_ms} / backoff_max_ms="
                f"{self.backoff_max_ms}: give 0 <= initial <= max"
            )
        if not self.connect_timeout_ms > 0:
            raise ConfigError(f"connect_timeout_ms={self.connect_timeout_ms}: give > 0")
        if not 0 <= self.max_in_flight <= 1_000_000:
            raise ConfigError(f"max_in_flight={self.max_in_flight}: give 0 (no limit) or more")

    def backoff_s(self, attempt: int) -> float:
        return min(self.backoff_initial_ms * 2.0**attempt, self.backoff_max_ms) / 1e3


@dataclass(frozen=True)
class ModelInfo:
    """What one model accepts, read from Triton once and cached by the client."""

    name: str
    version: str
    feature_dims: tuple[int, ...]
    max_batch_size: int
    has_key: bool
    outputs: tuple[str, ...]

    def check(self, features: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """``features`` as a contiguous float32 batch, or a ShapeError naming the fix."""
        x = np.asarray(features)
        if x.dtype.kind not in "fiub":
            raise ShapeError(f"{self.name}: features have dtype {x.dtype}; send numbers")
        if x.shape == self.feature_dims:
            x = x[np.newaxis]
        dims_ok = x.ndim == len(self.feature_dims) + 1 and all(
            want in (-1, got) for want, got in zip(self.feature_dims, x.shape[1:], strict=True)
        )
        if not dims_ok:
            raise ShapeError(
                f"{self.name}: expected features of shape [n, "
                f"{', '.join(map(str, self.feature_dims))}], got {list(x.shape)}"
            )
        if self.max_batch_size and x.shape[0] > self.max_batch_size:
            raise ShapeError(
                f"{self.name}: {x.shape[0]} rows exceed its max_batch_size "
                f"{self.max_batch_size}; split the batch"
            )
        if x.shape[0] == 0:
            raise ShapeError(f"{self.name}: an empty batch; send at least one row")
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Prediction:
    """One answer: the outputs and who produced them.

    ``model``/``version`` name the model that was called (as Triton reports
    it); :attr:`served_by` names, per row, the engine that scored it.
    """

    model: str
    version: str
    outputs: Mapping[str, np.ndarray[Any, Any]]
    request_id: str
    attempts: int = 1
    _served_by: tuple[str, ...] | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]

    @property
    def served_by(self) -> np.ndarray[Any, Any]:
        """``name:version`` of the engine behind each row (object array of str)."""
        routed = self.outputs.get(SERVED_BY_OUTPUT)
        if routed is not None:
            flat = routed.reshape(-1)
            first = flat[0]
            if len(flat) == 1 or (flat == first).all():  # one arm: decode once
                return np.full(len(flat), first.decode(), dtype=object)
            return np.array([b.decode() for b in flat.tolist()], dtype=object)
        n = len(next(iter(self.outputs.values()))) if self.outputs else 0
        return np.full(n, f"{self.model}:{self.version}", dtype=object)


# --------------------------------------------------------------------------- errors


#: Triton 2.51's answer (gRPC INTERNAL, HTTP 500), after its 1 s health check, to a
#: request for a model whose Python stub process died: "Stub process 'm_0_1' is not
#: healthy." The model stays READY, so only this text tells (measured: SIGKILL of the stubs).
_DEAD_STUB = ("stub process", "is not healthy")
_NOT_READY = ("is not ready", "unknown model", "is not found", "not found", "unavailable model")
_OVERLOADED = ("exceeds maximum queue size", "request timeout expired", "resource exhausted")
_GONE = (
    "failed to connect",
    "connection refused",
    "socket closed",
    "connection reset",
    "broken pipe",
    "unavailable",
    "failed to establish",
    "connect failed",
    "name resolution",
)


def translate(exc: BaseException, model: str) -> ServingError:
    """A foreign exception from a call to ``model`` as a :class:`ServingError` leaf."""
    if isinstance(exc, ServingError):
        return exc
    status = str(getattr(exc, "status", lambda: "")() or "").upper()
    text = f"{status} {exc}".lower()
    where = f"{model}: {exc}"
    if deadline.SHED_MARK in text:  # the backend shed it unseen: retryable overload
        return OverloadedError(where)
    if "deadline" in text or isinstance(exc, TimeoutError) or "timed out" in text:
        return DeadlineError(f"{where}; no answer within the deadline: raise deadline_ms")
    if any(s in text for s in _OVERLOADED):
        return OverloadedError(f"{where}; the server is overloaded: slow down or add instances")
    if all(s in text for s in _DEAD_STUB):
        return ModelNotReadyError(
            f"{where}; the model's backend process died although Triton still reports the "
            "model READY: reload the model (model-repository API, admin key) or restart the "
            "server, and read the server log for why it died"
        )
    if any(s in text for s in _NOT_READY):
        return ModelNotReadyError(
            f"{where}; load the model (make serve loads the repository) or check its name"
        )
    if "invalid_arg" in text or "invalid argument" in text or "400" in status:
        return RejectedInputError(f"{where}; fix the request's features")
    if any(s in text for s in _GONE) or isinstance(exc, ConnectionError | OSError):
        return UnavailableError(f"{where}; is the server running at this url?")
    return ServingError(f"{where}")


# --------------------------------------------------------------------------- shared core


class _Core:
    """What the sync and async clients share: settings, metadata cache, tensor building."""

    def __init__(
        self,
        url: str | Sequence[str] | ReplicaSettings,
        protocol: Protocol,
        settings: ClientSettings,
    ) -> None:
        self.wire = transport(protocol)
        self.replica_settings = replica_settings(url)
        if self.replica_settings.hedging and protocol != "grpc":
            raise ConfigError(
                f"hedge_quantile={self.replica_settings.hedge_quantile} with protocol="
                f"{protocol!r}: hedging cancels the losing copy, which only tritonclient's "
                "gRPC client can; use protocol='grpc' or hedge_quantile=0"
            )
        self.url = ",".join(self.replica_settings.endpoints)
        self.protocol: Protocol = protocol
        self.settings = settings
        self.replicas = ReplicaSet(self.replica_settings, self.probe)
        self.models: dict[tuple[str, str], ModelInfo] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{time.monotonic_ns():x}-"
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.mod: Any = self.wire.module()

    def _channel_args(self) -> list[tuple[str, Any]] | None:
        """gRPC channel options of a multi-replica client: tritonclient's, plus a private
        subchannel pool.

        gRPC shares one subchannel per target across channels by default, so a
        "fresh" channel to a replica that died inherits its reconnect backoff
        (1 s, x1.6 up to 120 s): measured here, a restarted replica rejoined
        ~2 s after it was ready instead of at the next probe. With a private
        pool a probe, and the stub opened at rejoin, connect at once.
        """
        if self.protocol != "grpc" or len(self.replicas) == 1:
            return None  # the single-server client is left exactly as it was
        from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

        keep = KeepAliveOptions()
        return [
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
            ("grpc.use_local_subchannel_pool", 1),
        ]

    def stub(self, endpoint: str, timeout_s: float | None = None) -> Any:
        """A synchronous stub for ``endpoint`` (``timeout_s``: connect and network bound)."""
        args = self._channel_args()
        if args is not None:
            return self.mod.InferenceServerClient(endpoint, channel_args=args)
        s = self.settings
        return self.wire.stub(
            endpoint,
            connect_timeout_s=timeout_s or s.connect_timeout_ms / 1e3,
            network_timeout_s=timeout_s or s.deadline_ms / 1e3,
        )

    def async_stub(self, endpoint: str) -> Any:
        args = self._channel_args()
        if args is not None:
            import tritonclient.grpc.aio as aio

            return aio.InferenceServerClient(endpoint, channel_args=args)
        return self.wire.async_stub(
            endpoint, connect_timeout_s=self.settings.connect_timeout_ms / 1e3
        )

    def probe(self, endpoint: str, models: tuple[str, ...]) -> bool:
        """Is ``endpoint`` ready, with each of ``models``? Asked over a fresh connection.

        A fresh one because the client's own channel to a replica that died may
        sit in gRPC's reconnect backoff long after the replica came back.
        """
        timeout_s = self.replica_settings.probe_timeout_ms / 1e3
        stub = self.stub(endpoint, timeout_s)
        bound = self.wire.call_timeout(timeout_s)
        try:
            return bool(stub.is_server_ready(**bound)) and all(
                stub.is_model_ready(m, **bound) for m in models
            )
        except Exception:  # unreachable or refusing: not ready
            return False
        finally:
            stub.close()

    def after_failure(
        self,
        err: ServingError,
        cause: BaseException,
        model: str,
        tried: list[int],
        attempt: int,
        budget_ms: float,
        start: float,
    ) -> float | None:
        """After a failed send: None to fail over now, or seconds to back off and retry.

        Fails over to an untried healthy replica when the request did not run
        (:func:`setsuna.replicas.fails_over`); otherwise the single-server
        policy (:meth:`retry_wait_s`) decides, and raises what cannot be retried.
        """
        reps = self.replicas
        if (
            len(reps) > 1
            and fails_over(err, len(reps))
            and reps.pick(tried, healthy_only=True) is not None
            and budget_ms / 1e3 > time.perf_counter() - start
        ):
            reps.count("failovers")
            return None
        wait_s = self.retry_wait_s(err, model, attempt, budget_ms, start, cause=cause)
        reps.count("retries")
        tried.clear()
        return wait_s

    def deadline_error(self, model: str, budget_ms: float) -> DeadlineError:
        return DeadlineError(
            f"{model}: no answer within the {budget_ms:g} ms deadline from any replica; "
            "raise deadline_ms"
        )

    def info_from(self, model: str, version: str, meta: Any, config: Any) -> ModelInfo:
        shapes, outputs, max_batch = self.wire.signature(meta, config)
        if INPUT_NAME not in shapes:
            raise ModelNotReadyError(
                f"{model} has no {INPUT_NAME!r} input (inputs: {sorted(shapes)}): "
                "it is not a setsuna feature model"
            )
        dims = shapes[INPUT_NAME][1:] if max_batch else shapes[INPUT_NAME]
        return ModelInfo(model, version, dims, max_batch, KEY_INPUT in shapes, outputs)

    def request_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    @contextlib.contextmanager
    def admitted(self, model: str) -> Iterator[None]:
        """Count one call in flight, or refuse it at once past ``max_in_flight``."""
        limit = self.settings.max_in_flight
        with self._in_flight_lock:
            if limit and self._in_flight >= limit:
                raise OverloadedError(
                    f"{model}: {self._in_flight} calls already in flight from this client "
                    f"(max_in_flight={limit}); refused without sending: retry later or "
                    "raise max_in_flight"
                )
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    @staticmethod
    def call_options(left_s: float) -> dict[str, Any]:
        """What every request carries of the caller's budget (see :mod:`setsuna.deadline`).

        ``parameters``: the absolute deadline, which setsuna's backends read to
        shed what they cannot answer in time; ``timeout``: Triton's own
        per-request timeout in microseconds, which BLS models read to bound
        their downstream calls.
        """
        return {"parameters": deadline.parameters(left_s), "timeout": max(1, int(left_s * 1e6))}

    def budget_ms(self, deadline_ms: float | None) -> float:
        budget = self.settings.deadline_ms if deadline_ms is None else float(deadline_ms)
        if not budget > 0:
            raise ConfigError(f"deadline_ms={deadline_ms}: give a positive budget")
        return budget

    @staticmethod
    def time_left_s(model: str, budget_ms: float, start: float) -> float:
        """Seconds left of the budget; DeadlineError once none are."""
        left_s = budget_ms / 1e3 - (time.perf_counter() - start)
        if left_s <= 0:
            raise DeadlineError(f"{model}: the {budget_ms:g} ms deadline passed")
        return left_s

    def retry_wait_s(
        self,
        exc: BaseException,
        model: str,
        attempt: int,
        budget_ms: float,
        start: float,
        *,
        cause: BaseException | None = None,
    ) -> float:
        """How long to wait before retrying; raises the typed error when retrying is wrong.

        Only retryable errors are retried, at most ``max_retries`` times, and never
        when the backoff would not end inside the deadline. The sync and async
        clients share this one policy.
        """
        err = translate(exc, model)
        wait_s = self.settings.backoff_s(attempt)
        left_s = budget_ms / 1e3 - (time.perf_counter() - start)
        if not err.retryable or attempt >= self.settings.max_retries or wait_s >= left_s:
            origin = cause if cause is not None else exc
            if origin is err:
                raise err
            raise err from origin
        return wait_s

    def build(
        self, info: ModelInfo, x: npt.NDArray[np.float32], key: Any, outputs: Sequence[str] | None
    ) -> tuple[list[Any], list[Any]]:
        mod = self.mod
        binary = self.wire.tensor
        inp = mod.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, **binary)
        inputs = [inp]
        if key is not None:
            if not info.has_key:
                raise ShapeError(f"{info.name} takes no key; call it without key=")
            keys = _keys(key, x.shape[0])
            k = mod.InferInput(KEY_INPUT, [x.shape[0], 1], "BYTES")
            k.set_data_from_numpy(keys, **binary)
            inputs.append(k)
        wanted = info.outputs if outputs is None else tuple(outputs)
        unknown = sorted(set(wanted) - set(info.outputs))
        if unknown:
            raise ShapeError(f"{info.name} has no output(s) {unknown}; it has {info.outputs}")
        return inputs, [mod.InferRequestedOutput(n, **binary) for n in wanted]

    def prediction(
        self, result: Any, wanted: Sequence[str], request_id: str, attempts: int
    ) -> Prediction:
        name, version = self.wire.served_by(result.get_response())
        outputs = {n: result.as_numpy(n) for n in wanted}
        return Prediction(name, version, outputs, request_id, attempts)


def _keys(key: Any, n: int) -> np.ndarray[Any, Any]:
    """A ``[n, 1]`` BYTES array: one key for every row, or one per row."""
    if isinstance(key, str | bytes):
        one = key.encode() if isinstance(key, str) else key
        return np.full((n, 1), one, dtype=object)
    arr = np.asarray(key, dtype=object).reshape(-1, 1)
    if arr.shape[0] != n:
        raise ShapeError(f"{arr.shape[0]} keys for {n} rows: give one key per row, or one")
    if arr.size and isinstance(arr[0, 0], str):
        arr = np.char.encode(arr.astype(str), "utf-8").astype(object)
    return arr


# --------------------------------------------------------------------------- sync


class Client:
    """A Triton client for feature models, on one server or several replicas.

    >>> client = Client("127.0.0.1:8001")                      # doctest: +SKIP
    >>> p = client.infer("decide", rows, key=symbols)           # doctest: +SKIP
    >>> p["signal"], p.model, p.version, p.served_by            # doctest: +SKIP
    >>> Client(["127.0.0.1:8001", "127.0.0.1:9001"])            # doctest: +SKIP
    >>> Client(ReplicaSettings(("a:8001", "b:8001"), hedge_quantile=0.95))  # doctest: +SKIP

    With several endpoints every call goes to one replica (fewest outstanding
    calls), fails over to another when the request did not run, and may be
    hedged: :mod:`setsuna.replicas`. :meth:`replica_stats` shows the counters.
    """

    def __init__(
        self,
        url: str | Sequence[str] | ReplicaSettings,
        protocol: Protocol = "grpc",
        settings: ClientSettings | None = None,
        *,
        models: Sequence[str] = (),
        pool: Pool | None = None,
    ) -> None:
        """``url``: ``host:port``, several of them, or :class:`ReplicaSettings`.

        ``models``: connect and read these models' metadata now (:meth:`warm_up`).

        ``pool``: a model pool (:class:`setsuna.pool.ModelPool`) that every call
        leases its model from: a model the pool evicted is loaded on its first
        call, within that call's deadline (:class:`~setsuna.errors.ModelLoadingError`,
        retryable, when the load takes longer); a loaded one costs a dict lookup
        and a counter. Give ``models`` only for models the pool holds. A pool
        manages one server, so it takes one endpoint.
        """
        self._pool = pool
        self._core = _Core(url, protocol, settings or ClientSettings())
        if pool is not None and len(self._core.replicas) > 1:
            raise ConfigError(
                f"pool= with {len(self._core.replicas)} endpoints: a model pool manages one "
                "server; give one endpoint, or no pool"
            )
        self._stubs: list[Any] = [self._new_stub(e) for e in self._core.replicas.endpoints]
        self._generations = [0] * len(self._stubs)
        self._retired: list[Any] = []
        self._stub_lock = threading.Lock()
        if models:
            try:
                self.warm_up(*models)
            except BaseException:
                self.close()
                raise

    def _new_stub(self, endpoint: str) -> Any:
        return self._core.stub(endpoint)

    def _stub(self, i: int = 0) -> Any:
        """Replica ``i``'s stub; a fresh one once the replica rejoined (see ReplicaSet)."""
        generation = self._core.replicas.generation(i)
        if self._generations[i] == generation:
            return self._stubs[i]
        with self._stub_lock:
            if self._generations[i] != generation:
                # Closed at close(): a call may still hold the old one.
                self._retired.append(self._stubs[i])
                self._stubs[i] = self._new_stub(self._core.replicas.endpoint(i))
                self._generations[i] = generation
            return self._stubs[i]

    def warm_up(self, *models: str) -> None:
        """Connect, and read each model's metadata and config into the cache, now.

        A call's ``deadline_ms`` covers everything the call does: on a fresh
        client that includes opening the connection and the two metadata
        round trips (8 ms measured here), which a 5 ms budget cannot hold.
        Raises what a call would (unknown model: ModelNotFoundError; server
        down: UnavailableError). With several replicas each one is connected;
        one that does not answer is ejected (the prober brings it back), and
        only none answering raises.
        """
        reps = self._core.replicas
        if not models or len(reps) > 1:
            errors: list[ServingError] = []
            for i in range(len(reps)):
                try:
                    self._stub(i).is_server_live()
                except Exception as exc:  # translated at the boundary
                    err = translate(exc, f"<server {reps.endpoint(i)}>")
                    reps.failed(i, err)
                    errors.append(err)
                    if len(errors) == len(reps):
                        raise err from exc
        for model in models:
            self.model_info(model)

    @property
    def url(self) -> str:
        """The endpoint, or the replicas' endpoints joined by commas."""
        return self._core.url

    @property
    def settings(self) -> ClientSettings:
        return self._core.settings

    @property
    def replica_settings(self) -> ReplicaSettings:
        return self._core.replica_settings

    def replica_stats(self) -> ReplicaStats:
        """Calls per replica, failovers, retries, hedges sent and won, ejections, rejoins."""
        return self._core.replicas.snapshot()

    def model_info(self, model: str, version: str = "") -> ModelInfo:
        """The model's inputs and outputs, read once from Triton and cached.

        With several replicas, read from the first that answers (they serve
        the same repository).
        """
        cached = self._core.models.get((model, version))
        if cached is not None:
            return cached
        reps = self._core.replicas
        tried: list[int] = []
        while True:
            i = reps.pick(tried)
            assert i is not None
            tried.append(i)
            stub = self._stub(i)
            try:
                meta = stub.get_model_metadata(model, version)
                config = stub.get_model_config(model, version)
                break
            except Exception as exc:  # tritonclient raises its own exception type, or OS errors
                err = translate(exc, model)
                reps.failed(i, err)
                if len(tried) >= len(reps) or not fails_over(err, len(reps)):
                    raise err from exc
        info = self._core.info_from(model, version, meta, config)
        self._core.models[(model, version)] = info
        return info

    def infer(
        self,
        model: str,
        features: npt.ArrayLike,
        key: Any = None,
        *,
        deadline_ms: float | None = None,
        version: str = "",
        outputs: Sequence[str] | None = None,
    ) -> Prediction:
        """Score ``features`` (one row or a batch) with ``model``; see the module docstring."""
        budget_ms = self._core.budget_ms(deadline_ms)
        start = time.perf_counter()
        pool = self._pool
        if pool is None:
            return self._infer(model, features, key, budget_ms, start, version, outputs)
        for retry in (False, True):  # loads an evicted model within the budget
            left_s = budget_ms / 1e3 - (time.perf_counter() - start)
            with pool.lease(model, deadline_s=left_s):
                try:
                    return self._infer(model, features, key, budget_ms, start, version, outputs)
                except ModelNotReadyError:
                    if retry or not pool.forget(model):  # unloaded by someone else: once more
                        raise
        raise AssertionError("unreachable")

    def _infer(
        self,
        model: str,
        features: npt.ArrayLike,
        key: Any,
        budget_ms: float,
        start: float,
        version: str,
        outputs: Sequence[str] | None,
    ) -> Prediction:
        core = self._core
        reps = core.replicas
        info = self.model_info(model, version)
        x = info.check(features)
        inputs, requested = core.build(info, x, key, outputs)
        call = _Call(model, inputs, version, requested, core.request_id())
        wanted = [r.name() for r in requested]
        attempt = sends = 0
        tried: list[int] = []
        with core.admitted(model):
            while True:
                left_s = core.time_left_s(model, budget_ms, start)
                i = reps.pick(tried)
                assert i is not None
                sends += 1
                try:
                    delay_s = reps.hedge_delay_s(model, left_s)
                    if delay_s is None:
                        result = self._send(i, tried, call, left_s)
                    else:
                        result = self._send_hedged(i, tried, call, left_s, delay_s, budget_ms)
                    return core.prediction(result, wanted, call.request_id, sends)
                except _Failed as failed:
                    wait_s = core.after_failure(
                        failed.err, failed.cause, model, tried, attempt, budget_ms, start
                    )
                if wait_s is not None:
                    time.sleep(wait_s)
                    attempt += 1

    def _send(self, i: int, tried: list[int], call: _Call, left_s: float) -> Any:
        """One request to replica ``i``, blocking: the answer, or _Failed with the typed error."""
        core = self._core
        reps = core.replicas
        tried.append(i)
        stub = self._stub(i)
        reps.begin(i, call.model)
        began = time.perf_counter()
        try:
            result = stub.infer(
                call.model,
                call.inputs,
                model_version=call.version,
                outputs=call.outputs,
                request_id=call.request_id,
                **core.wire.call_timeout(left_s),
                **core.call_options(left_s),
            )
        except Exception as exc:  # translated at this boundary
            err = translate(exc, call.model)
            reps.failed(i, err)
            raise _Failed(err, exc) from exc
        finally:
            reps.end(i)
        reps.answered(call.model, (time.perf_counter() - began) * 1e3)
        return result

    def _send_hedged(
        self,
        i: int,
        tried: list[int],
        call: _Call,
        left_s: float,
        delay_s: float,
        budget_ms: float,
    ) -> Any:
        """Send to ``i``; after ``delay_s`` without an answer, a copy to another replica.

        tritonclient's gRPC ``async_infer`` answers on a callback and returns a
        context whose ``cancel()`` cancels the RPC, so the losing copy is
        cancelled, not left running. The first success wins; an error waits
        for the other copy, if one was sent.
        """
        core = self._core
        reps = core.replicas
        answers: queue.SimpleQueue[tuple[int, Any, Any, float]] = queue.SimpleQueue()
        contexts: dict[int, Any] = {}
        sent_at: dict[int, float] = {}
        ends_at = time.perf_counter() + left_s

        def send(j: int) -> None:
            left = ends_at - time.perf_counter()
            tried.append(j)
            reps.begin(j, call.model)
            sent_at[j] = time.perf_counter()

            def done(result: Any, error: Any, j: int = j) -> None:
                reps.end(j)
                answers.put((j, result, error, time.perf_counter()))

            try:
                contexts[j] = self._stub(j).async_infer(
                    call.model,
                    call.inputs,
                    done,
                    model_version=call.version,
                    outputs=call.outputs,
                    request_id=call.request_id,
                    client_timeout=left,
                    **core.call_options(left),
                )
            except Exception as exc:  # refused before sending: an answer like any other
                done(None, exc)

        send(i)
        pending = {i}
        hedge: int | None = None
        hedge_at = sent_at[i] + delay_s
        last: _Failed | None = None
        try:
            while pending:
                now = time.perf_counter()
                waiting_to_hedge = hedge is None and now < hedge_at
                try:
                    j, result, error, t = answers.get(
                        timeout=max(0.0, (hedge_at if waiting_to_hedge else ends_at) - now)
                    )
                except queue.Empty:
                    if not waiting_to_hedge:
                        break  # the deadline passed
                    h = reps.pick(tried, healthy_only=True)
                    hedge = -1 if h is None else h
                    if h is not None:
                        reps.count("hedges_sent")
                        send(h)
                        pending.add(h)
                    continue
                pending.discard(j)
                if error is None:
                    if j == hedge:
                        reps.count("hedges_won")
                    reps.answered(call.model, (t - sent_at[j]) * 1e3)
                    return result
                err = translate(error, call.model)
                reps.failed(j, err)
                last = _Failed(err, error)
                if hedge is None:  # failed before a copy went out: the caller fails over
                    break
        finally:
            for k in pending:
                ctx = contexts.get(k)
                if ctx is not None:
                    ctx.cancel()
        if last is not None and not pending:
            raise last
        err = core.deadline_error(call.model, budget_ms)
        raise _Failed(err, err)

    # -- readiness and statistics -----------------------------------------------------

    def server_ready(self) -> bool:
        """True when the server (with several: any replica) answers ready; never raises."""
        for i in range(len(self._stubs)):
            try:
                if self._stub(i).is_server_ready():
                    return True
            except Exception:  # not reachable is an answer here
                continue
        return False

    def model_ready(self, model: str, version: str = "") -> bool:
        """True when the model is ready on the server (with several: on any replica)."""
        for i in range(len(self._stubs)):
            try:
                if self._stub(i).is_model_ready(model, version):
                    return True
            except Exception:  # not reachable is an answer here
                continue
        return False

    def wait_ready(self, model: str | None = None, *, timeout_s: float = 30.0) -> None:
        """Block until the server (and ``model``) is ready, or raise UnavailableError."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok = self.server_ready() and (model is None or self.model_ready(model))
            if ok:
                return
            if time.monotonic() >= deadline:
                what = f"model {model!r}" if model else "the server"
                raise UnavailableError(f"{what} at {self.url} was not ready in {timeout_s:g} s")
            time.sleep(0.05)

    def statistics(self, model: str = "", version: str = "") -> dict[str, dict[str, int]]:
        """Triton's cumulative per-model counters: counts and nanoseconds per stage.

        With several replicas, the sum over those that answer (UnavailableError
        when none does).
        """
        parts: list[dict[str, dict[str, int]]] = []
        for i in range(len(self._stubs)):
            try:
                raw = self._stub(i).get_inference_statistics(
                    model, version, **self._core.wire.as_json
                )
            except Exception as exc:  # translated at the boundary
                if len(self._stubs) == 1 or (not parts and i == len(self._stubs) - 1):
                    raise translate(exc, model or "<server>") from exc
                continue
            parts.append(parse_statistics(raw))
        return _summed(parts)

    def close(self) -> None:
        self._core.replicas.close()
        for stub in (*self._stubs, *self._retired):
            stub.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Call:
    """What every send of one call repeats: the request, built once."""

    model: str
    inputs: list[Any]
    version: str
    outputs: list[Any]
    request_id: str


class _Failed(Exception):
    """Internal: one send failed with ``err`` (typed), caused by ``cause`` (foreign)."""

    def __init__(self, err: ServingError, cause: BaseException) -> None:
        super().__init__(str(err))
        self.err, self.cause = err, cause


def _summed(parts: Sequence[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """Per-model counters added over replicas (one replica: unchanged)."""
    if len(parts) == 1:
        return {k: dict(v) for k, v in parts[0].items()}
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, row in part.items():
            into = out.setdefault(name, {})
            for k, v in row.items():
                into[k] = into.get(k, 0) + v
    return out


def parse_statistics(raw: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{"name:version": {"success": n, "fail": n, "queue_ns": ..., ...}}``."""
    out: dict[str, dict[str, int]] = {}
    for entry in raw.get("model_stats", []):
        stats = entry.get("inference_stats", {})
        row = {"inferences": int(entry.get("inference_count", 0))}
        row["executions"] = int(entry.get("execution_count", 0))
        for stage in ("success", "fail", "queue", "compute_input", "compute_infer"):
            item = stats.get(stage, {})
            if stage in ("success", "fail"):
                row[stage] = int(item.get("count", 0))
            else:
                row[f"{stage}_ns"] = int(item.get("ns", 0))
        out[f"{entry.get('name')}:{entry.get('version')}"] = row
    return out


# --------------------------------------------------------------------------- async


class AsyncClient:
    """The ``asyncio`` twin of :class:`Client`: same settings, checks, errors and retries.

    Several endpoints work as for :class:`Client`; a hedge is a second task,
    and the loser's task is cancelled (grpc.aio cancels its RPC).
    """

    def __init__(
        self,
        url: str | Sequence[str] | ReplicaSettings,
        protocol: Protocol = "grpc",
        settings: ClientSettings | None = None,
        *,
        models: Sequence[str] = (),
    ) -> None:
        """``models``: warmed up on ``async with`` (a constructor cannot await)."""
        self._core = _Core(url, protocol, settings or ClientSettings())
        self._warm = tuple(models)
        self._stubs: list[Any] = [self._new_stub(e) for e in self._core.replicas.endpoints]
        self._generations = [0] * len(self._stubs)
        self._retired: list[Any] = []

    def _new_stub(self, endpoint: str) -> Any:
        return self._core.async_stub(endpoint)

    def _stub(self, i: int = 0) -> Any:
        """As :meth:`Client._stub` (one event loop: no lock)."""
        generation = self._core.replicas.generation(i)
        if self._generations[i] != generation:
            self._retired.append(self._stubs[i])
            self._stubs[i] = self._new_stub(self._core.replicas.endpoint(i))
            self._generations[i] = generation
        return self._stubs[i]

    @property
    def url(self) -> str:
        return self._core.url

    @property
    def settings(self) -> ClientSettings:
        return self._core.settings

    @property
    def replica_settings(self) -> ReplicaSettings:
        return self._core.replica_settings

    def replica_stats(self) -> ReplicaStats:
        """As :meth:`Client.replica_stats`."""
        return self._core.replicas.snapshot()

    async def warm_up(self, *models: str) -> None:
        """As :meth:`Client.warm_up`."""
        reps = self._core.replicas
        if not models or len(reps) > 1:
            errors = 0
            for i in range(len(reps)):
                try:
                    await self._stub(i).is_server_live()
                except Exception as exc:  # translated at the boundary
                    err = translate(exc, f"<server {reps.endpoint(i)}>")
                    reps.failed(i, err)
                    errors += 1
                    if errors == len(reps):
                        raise err from exc
        for model in models:
            await self.model_info(model)

    async def model_info(self, model: str, version: str = "") -> ModelInfo:
        """As :meth:`Client.model_info`."""
        cached = self._core.models.get((model, version))
        if cached is not None:
            return cached
        reps = self._core.replicas
        tried: list[int] = []
        while True:
            i = reps.pick(tried)
            assert i is not None
            tried.append(i)
            stub = self._stub(i)
            try:
                meta = await stub.get_model_metadata(model, version)
                config = await stub.get_model_config(model, version)
                break
            except Exception as exc:  # translated at the boundary
                err = translate(exc, model)
                reps.failed(i, err)
                if len(tried) >= len(reps) or not fails_over(err, len(reps)):
                    raise err from exc
        info = self._core.info_from(model, version, meta, config)
        self._core.models[(model, version)] = info
        return info

    async def infer(
        self,
        model: str,
        features: npt.ArrayLike,
        key: Any = None,
        *,
        deadline_ms: float | None = None,
        version: str = "",
        outputs: Sequence[str] | None = None,
    ) -> Prediction:
        core = self._core
        reps = core.replicas
        budget_ms = core.budget_ms(deadline_ms)
        start = time.perf_counter()
        info = await self.model_info(model, version)
        x = info.check(features)
        inputs, requested = core.build(info, x, key, outputs)
        call = _Call(model, inputs, version, requested, core.request_id())
        wanted = [r.name() for r in requested]
        attempt = sends = 0
        tried: list[int] = []
        with core.admitted(model):
            while True:
                left_s = core.time_left_s(model, budget_ms, start)
                i = reps.pick(tried)
                assert i is not None
                sends += 1
                try:
                    delay_s = reps.hedge_delay_s(model, left_s)
                    if delay_s is None:
                        result = await self._send(i, tried, call, left_s)
                    else:
                        result = await self._send_hedged(i, tried, call, left_s, delay_s, budget_ms)
                    return core.prediction(result, wanted, call.request_id, sends)
                except _Failed as failed:
                    wait_s = core.after_failure(
                        failed.err, failed.cause, model, tried, attempt, budget_ms, start
                    )
                if wait_s is not None:
                    await asyncio.sleep(wait_s)
                    attempt += 1

    def _request(self, j: int, call: _Call, left_s: float) -> Any:
        """The awaitable of one request to replica ``j``, bounded by ``left_s``."""
        coro = self._stub(j).infer(
            call.model,
            call.inputs,
            model_version=call.version,
            outputs=call.outputs,
            request_id=call.request_id,
            **self._core.call_options(left_s),
        )
        return asyncio.wait_for(coro, timeout=left_s)

    async def _send(self, i: int, tried: list[int], call: _Call, left_s: float) -> Any:
        reps = self._core.replicas
        tried.append(i)
        reps.begin(i, call.model)
        began = time.perf_counter()
        try:
            result = await self._request(i, call, left_s)
        except Exception as exc:  # translated at this boundary
            err = translate(exc, call.model)
            reps.failed(i, err)
            raise _Failed(err, exc) from exc
        finally:
            reps.end(i)
        reps.answered(call.model, (time.perf_counter() - began) * 1e3)
        return result

    async def _send_hedged(
        self,
        i: int,
        tried: list[int],
        call: _Call,
        left_s: float,
        delay_s: float,
        budget_ms: float,
    ) -> Any:
        """As :meth:`Client._send_hedged`, with tasks: the loser's task is cancelled."""
        core = self._core
        reps = core.replicas
        ends_at = time.perf_counter() + left_s
        tasks: dict[asyncio.Future[Any], int] = {}
        sent_at: dict[int, float] = {}

        def send(j: int) -> None:
            tried.append(j)
            reps.begin(j, call.model)
            sent_at[j] = time.perf_counter()
            task = asyncio.ensure_future(self._request(j, call, ends_at - sent_at[j]))
            task.add_done_callback(lambda _t, j=j: reps.end(j))
            tasks[task] = j

        send(i)
        hedge: int | None = None
        hedge_at = sent_at[i] + delay_s
        last: _Failed | None = None
        try:
            while tasks:
                now = time.perf_counter()
                waiting_to_hedge = hedge is None and now < hedge_at
                done, _ = await asyncio.wait(
                    tasks,
                    timeout=max(0.0, (hedge_at if waiting_to_hedge else ends_at) - now),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    if not waiting_to_hedge:
                        break  # the deadline passed
                    h = reps.pick(tried, healthy_only=True)
                    hedge = -1 if h is None else h
                    if h is not None:
                        reps.count("hedges_sent")
                        send(h)
                    continue
                for task in done:
                    j = tasks.pop(task)
                    exc = task.exception()
                    if exc is None:
                        if j == hedge:
                            reps.count("hedges_won")
                        reps.answered(call.model, (time.perf_counter() - sent_at[j]) * 1e3)
                        return task.result()
                    err = translate(exc, call.model)
                    reps.failed(j, err)
                    last = _Failed(err, exc)
                if hedge is None:  # failed before a copy went out: the caller fails over
                    break
        finally:
            for task in tasks:
                task.cancel()
        if last is not None and not tasks:
            raise last
        err = core.deadline_error(call.model, budget_ms)
        raise _Failed(err, err)

    async def server_ready(self) -> bool:
        """As :meth:`Client.server_ready`."""
        for i in range(len(self._stubs)):
            try:
                if await self._stub(i).is_server_ready():
                    return True
            except Exception:  # not reachable is an answer here
                continue
        return False

    async def model_ready(self, model: str, version: str = "") -> bool:
        """As :meth:`Client.model_ready`."""
        for i in range(len(self._stubs)):
            try:
                if await self._stub(i).is_model_ready(model, version):
                    return True
            except Exception:  # not reachable is an answer here
                continue
        return False

    async def wait_ready(self, model: str | None = None, *, timeout_s: float = 30.0) -> None:
        """As :meth:`Client.wait_ready`."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok = await self.server_ready() and (model is None or await self.model_ready(model))
            if ok:
                return
            if time.monotonic() >= deadline:
                what = f"model {model!r}" if model else "the server"
                raise UnavailableError(f"{what} at {self.url} was not ready in {timeout_s:g} s")
            await asyncio.sleep(0.05)

    async def statistics(self, model: str = "", version: str = "") -> dict[str, dict[str, int]]:
        """As :meth:`Client.statistics`."""
        parts: list[dict[str, dict[str, int]]] = []
        for i in range(len(self._stubs)):
            try:
                raw = await self._stub(i).get_inference_statistics(
                    model, version, **self._core.wire.as_json
                )
            except Exception as exc:  # translated at the boundary
                if len(self._stubs) == 1 or (not parts and i == len(self._stubs) - 1):
                    raise translate(exc, model or "<server>") from exc
                continue
            parts.append(parse_statistics(raw))
        return _summed(parts)

    async def close(self) -> None:
        self._core.replicas.close()
        for stub in (*self._stubs, *self._retired):
            await stub.close()

    async def __aenter__(self) -> AsyncClient:
        if self._warm:
            try:
                await self.warm_up(*self._warm)
            except BaseException:
                await self.close()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
