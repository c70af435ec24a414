"""What differs between Triton's gRPC and HTTP clients, in one adapter per protocol.

``tritonclient`` ships the two protocols as two modules whose calls look
alike but differ in details: HTTP wants ``binary_data=True`` on every tensor
(else JSON numbers), answers metadata as dicts where gRPC answers protobuf,
takes no ``as_json`` flag, and bounds a call by the connection's network
timeout where gRPC takes a ``client_timeout`` per call. :class:`setsuna.client`
asks its :class:`Transport` instead of testing the protocol at each of those
places.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from setsuna.errors import ConfigError

Protocol = Literal["grpc", "http"]
#: (input name -> dims, output names, max_batch_size)
Signature = tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]
_NONE: Mapping[str, bool] = MappingProxyType({})


class Transport:
    """One protocol's way of building, sending and reading what the client needs."""

    name: Protocol
    #: Keyword arguments for every InferInput / InferRequestedOutput data call.
    tensor: Mapping[str, bool]
    #: Keyword arguments that make ``get_inference_statistics`` answer a dict.
    as_json: Mapping[str, bool]

    def module(self) -> Any:
        raise NotImplementedError

    def stub(self, url: str, *, connect_timeout_s: float, network_timeout_s: float) -> Any:
        raise NotImplementedError

    def async_stub(self, url: str, *, connect_timeout_s: float) -> Any:
        raise NotImplementedError

    def call_timeout(self, left_s: float) -> dict[str, float]:
        """Keyword arguments bounding one synchronous ``infer`` by the time left."""
        raise NotImplementedError

    def signature(
        self, meta: Any, config: Any
    ) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]:
        """What a model takes and answers, from its metadata and config."""
        raise NotImplementedError

    def served_by(self, response: Any) -> tuple[str, str]:
        """(model name, version) of the model that answered."""
        raise NotImplementedError


class GrpcTransport(Transport):
    name: Protocol = "grpc"
    tensor = _NONE
    as_json = MappingProxyType({"as_json": True})

    def module(self) -> Any:
        import tritonclient.grpc as mod

        return mod

    def stub(self, url: str, *, connect_timeout_s: float, network_timeout_s: float) -> Any:
        return self.module().InferenceServerClient(url)

    def async_stub(self, url: str, *, connect_timeout_s: float) -> Any:
        import tritonclient.grpc.aio as aio

        return aio.InferenceServerClient(url)

    def call_timeout(self, left_s: float) -> dict[str, float]:
        return {"client_timeout": left_s}

    def signature(
        self, meta: Any, config: Any
    ) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]:
        inputs = {i.name: tuple(int(d) for d in i.shape) for i in meta.inputs}
        return inputs, tuple(o.name for o in meta.outputs), int(config.config.max_batch_size)

    def served_by(self, response: Any) -> tuple[str, str]:
        return str(response.model_name), str(response.model_version)


class HttpTransport(Transport):
    name: Protocol = "http"
    tensor = MappingProxyType({"binary_data": True})
    as_json = _NONE

    def module(self) -> Any:
        import tritonclient.http as mod

        return mod

    def stub(self, url: str, *, connect_timeout_s: float, network_timeout_s: float) -> Any:
        return self.module().InferenceServerClient(
            url, connection_timeout=connect_timeout_s, network_timeout=network_timeout_s
        )

    def async_stub(self, url: str, *, connect_timeout_s: float) -> Any:
        import tritonclient.http.aio as aio

        return aio.InferenceServerClient(url, conn_timeout=connect_timeout_s)

    def call_timeout(self, left_s: float) -> dict[str, float]:
        return {}  # the connection's network timeout, set once from settings.deadline_ms

    def signature(
        self, meta: Any, config: Any
    ) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], int]:
        inputs = {i["name"]: tuple(int(d) for d in i["shape"]) for i in meta["inputs"]}
        outputs = tuple(o["name"] for o in meta["outputs"])
        return inputs, outputs, int(config.get("max_batch_size", 0))

    def served_by(self, response: Any) -> tuple[str, str]:
        return str(response["model_name"]), str(response["model_version"])


def transport(protocol: str) -> Transport:
    if protocol == "grpc":
        return GrpcTransport()
    if protocol == "http":
        return HttpTransport()
    raise ConfigError(f"protocol={protocol!r}: choose 'grpc' or 'http'")
