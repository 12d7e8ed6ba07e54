"""The Open Inference Protocol over gRPC: KServe v2 ``inference.GRPCInferenceService``.

The messages are the ones ``tritonclient.grpc`` ships (``service_pb2``), so ``tritonclient.grpc``
and KServe's gRPC clients work unmodified. Implemented: ServerLive, ServerReady,
ServerMetadata, ModelMetadata, ModelReady, ModelInfer (``raw_input_contents`` /
``raw_output_contents``, or typed ``contents`` in), and Triton's repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload). Others answer UNIMPLEMENTED.

ModelInfer takes the HTTP path's one straight path (:meth:`Gateway.infer`): the request becomes
the binary-extension body (its JSON header built from the protobuf, then the raw tensor bytes
as they came), and the manager's binary answer is cut into ``raw_output_contents`` without
decoding a tensor. Requests are parsed by the handlers here (one ``FromString``), so that a
malformed protobuf is an INVALID_ARGUMENT. HTTP statuses map to gRPC codes by
:data:`GRPC_CODES`; a 429 carries ``google.rpc.RetryInfo`` in the rich status details.

The transport is :mod:`gpufaas.scheduler.grpc_h2`: HTTP/2 parsed on the gateway's own event
loop, next to the HTTP front, at about a quarter of grpc.aio's server CPU per call
(``docs/dataplane.md``, "gRPC").
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import pydantic_core
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2 as pb

from gpufaas.core.protocol import (
    DATATYPE_TO_NUMPY,
    HEADER_LENGTH,
    ProtocolError,
    parse_header_length,
)
from gpufaas.scheduler.gateway import (
    MODEL_VERSION,
    Gateway,
    GatewayError,
    NodeFailed,
    load_model,
    model_metadata,
    model_status,
    repository_index,
    server_metadata,
    server_ready,
    unload_model,
)
from gpufaas.scheduler.grpc_h2 import GrpcH2Server, Metadata, RpcError, UnaryHandler
from gpufaas.scheduler.transport import NodeReply

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
DEFAULT_GRPC_PORT = 8081

# HTTP status -> gRPC code; 413 is a bad request too (retrying cannot help).
GRPC_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_REPOSITORY_METHODS = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
# typed contents field -> numpy dtype, per v2 datatype
_CONTENTS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

M = TypeVar("M", bound=Message)


class GrpcAbort(Exception):
    """Answer the call with ``code`` and ``message`` (and rich ``details``)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def _abort_for_status(status: int, message: str, retry_after_s: float | None) -> GrpcAbort:
    code = GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)
    return GrpcAbort(code, message, retry_after_s=retry_after_s)


def _from_reply(reply: NodeReply) -> GrpcAbort:
    """A manager's error answer as a gRPC error: its message, its status's code."""
    message = reply.body.decode("utf-8", "replace")
    try:
        document = pydantic_core.from_json(reply.body)
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            message = document["error"]
    except ValueError:
        pass
    retry = reply.headers.get("retry-after")
    return _abort_for_status(
        reply.status, message, float(retry) if retry and retry.isdigit() else None
    )


# -- requests: protobuf -> the binary-extension body ---------------------------------------------


def _parameter(value: pb.InferParameter) -> Any:
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: _parameter(v) for k, v in params.items()}


def _contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """Typed ``contents`` as wire bytes (the one conversion of a request without raw data)."""
    label = f"input {tensor.name!r}"
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise ProtocolError(f"{label}: {tensor.datatype} needs raw_input_contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    dtype = DATATYPE_TO_NUMPY[tensor.datatype].newbyteorder("<")
    try:
        return np.asarray(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError):
        raise ProtocolError(f"{label}: a value is out of range for {tensor.datatype}") from None


# A client sends requests of the same shape again and again: their JSON headers, remembered by
# what decides them (see _plain_key), are built once. Bounded; the oldest is forgotten first.
_MEMO_MAX = 256
_headers: dict[tuple[Any, ...], bytes] = {}


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_MAX:
        del memo[next(iter(memo))]
    memo[key] = value


def _plain_key(request: pb.ModelInferRequest) -> tuple[Any, ...] | None:
    """What alone decides the header of a request with raw contents and no parameters (the id,
    each input's name, datatype, byte count and shape, the outputs' names); None for any other
    request (built afresh). Indexed access: iterating a protobuf container costs more here."""
    raw = request.raw_input_contents
    if not raw or request.parameters:
        return None
    inputs, outputs = request.inputs, request.outputs
    parts: list[Any] = [request.id]
    for i in range(len(inputs)):
        tensor = inputs[i]
        if tensor.parameters:
            return None
        parts += (tensor.name, tensor.datatype, len(raw[i]), tuple(tensor.shape[:]))
    for i in range(len(outputs)):
        output = outputs[i]
        if output.parameters:
            return None
        parts.append(output.name)
    return tuple(parts)


def infer_body(request: pb.ModelInferRequest) -> tuple[bytes, int]:
    """The binary-extension body of a ModelInfer request, and its header's length. All outputs
    are asked for in binary: they become ``raw_output_contents`` as they are."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents"
        )
    key = _plain_key(request)
    header = None if key is None else _headers.get(key)
    if header is not None:
        return b"".join([header, *raw]), len(header)
    chunks: list[bytes] = list(raw) if raw else [_contents_bytes(t) for t in request.inputs]
    header = _infer_header(request, chunks)
    if key is not None:
        _remember(_headers, key, header)
    return b"".join([header, *chunks]), len(header)


def _infer_header(request: pb.ModelInferRequest, chunks: Sequence[bytes]) -> bytes:
    """The JSON header of :func:`infer_body` (``chunks``: each input's bytes)."""
    inputs = []
    for tensor, chunk in zip(request.inputs, chunks, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": {**_parameters(tensor.parameters), "binary_data_size": len(chunk)},
        }
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    parameters = _parameters(request.parameters)
    if request.outputs:
        document["outputs"] = [
            {"name": o.name, "parameters": {**_parameters(o.parameters), "binary_data": True}}
            for o in request.outputs
        ]
    else:
        parameters["binary_data_output"] = True
    document["parameters"] = parameters
    return pydantic_core.to_json(document)


# -- responses: the manager's binary answer -> protobuf -------------------------------------------


# Per (model, the manager's answer header): the serialized response without its raw contents.
_answers: dict[tuple[str, bytes], tuple[bytes, tuple[int, ...]]] = {}


def infer_response_bytes(name: str, reply: NodeReply) -> bytes:
    """:func:`infer_response`, serialized. An answer whose outputs are all binary is written
    straight from its header, remembered: the response's fields but ``raw_output_contents``
    serialized once, then each output's bytes appended as field 6 (a protobuf message may be
    written field by field, in any order), sliced from the answer without a copy in between."""
    header_length = parse_header_length(reply.headers.get(HEADER_LENGTH.lower()))
    if header_length is None or header_length > 8192:
        return _serialized(infer_response(name, reply))
    body = memoryview(reply.body)
    key = (name, bytes(body[:header_length]))
    known = _answers.get(key)
    if known is None:
        response = infer_response(name, reply)
        sizes = _binary_sizes(key[1])
        if sizes is None or sum(sizes) != len(body) - header_length:
            return _serialized(response)
        del response.raw_output_contents[:]
        known = (_serialized(response), sizes)
        _remember(_answers, key, known)
    prefix, sizes = known  # (an answer cut short gives short outputs, as infer_response does)
    parts: list[bytes | memoryview] = [prefix]
    offset = header_length
    for size in sizes:
        parts += (_RAW_OUTPUT_TAG, _varint(size), body[offset : offset + size])
        offset += size
    return b"".join(parts)


def _serialized(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


_RAW_OUTPUT_TAG = b"\x32"  # field 6 (raw_output_contents), wire type 2 (length-delimited)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _binary_sizes(header: bytes) -> tuple[int, ...] | None:
    """Each output's ``binary_data_size``; None if any came as JSON data."""
    sizes = []
    for output in pydantic_core.from_json(header).get("outputs", []):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if type(size) is not int:
            return None
        sizes.append(size)
    return tuple(sizes)


def infer_response(name: str, reply: NodeReply) -> pb.ModelInferResponse:
    """Cut the manager's answer into a ModelInferResponse: tensor bytes sliced, not decoded."""
    header_length = parse_header_length(reply.headers.get(HEADER_LENGTH.lower()))
    body = memoryview(reply.body)
    header = reply.body if header_length is None else bytes(body[:header_length])
    document = pydantic_core.from_json(header)
    response = pb.ModelInferResponse(model_name=name, model_version=MODEL_VERSION)
    if document.get("id"):
        response.id = document["id"]
    offset = 0 if header_length is None else header_length
    for output in document.get("outputs", []):
        tensor = response.outputs.add(
            name=output["name"], datatype=output["datatype"], shape=output["shape"]
        )
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:  # came as JSON data (the manager's choice): convert it, once
            tensor_bytes = _json_output_bytes(output)
        else:
            tensor_bytes = bytes(body[offset : offset + size])
            offset += size
        response.raw_output_contents.append(tensor_bytes)
        del tensor
    return response


def _json_output_bytes(output: Mapping[str, Any]) -> bytes:
    datatype = output["datatype"]
    data = output.get("data") or []
    if datatype == "BYTES":
        encoded = [d.encode() if isinstance(d, str) else bytes(d) for d in data]
        return b"".join(len(e).to_bytes(4, "little") + e for e in encoded)
    return np.asarray(data, dtype=DATATYPE_TO_NUMPY[datatype].newbyteorder("<")).tobytes()


# -- the service ---------------------------------------------------------------------------------


class InferenceService:
    """The handlers; each takes the parsed request and returns the response message."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=server_ready(self.gateway))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        metadata = server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata.name, version=metadata.version, extensions=metadata.extensions
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        metadata = model_metadata(self.gateway, request.name)
        return pb.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions or [],
            platform=metadata.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in metadata.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in metadata.outputs
            ],
        )

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=model_status(self.gateway, request.name).ready)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, *, timeout_ms: float | None = None
    ) -> bytes:
        """The serialized ModelInferResponse (:func:`infer_response_bytes`)."""
        gateway = self.gateway
        name = request.model_name
        started = time.perf_counter()
        status = 500
        if gateway.replicas is not None:  # the scale-out ingress, as the HTTP front's
            # gRPC calls arrive from clients only: peers forward over HTTP
            gateway.replicas.admit(name, forwarded_by=None)
        try:
            body, header_length = infer_body(request)
            reply = await gateway.infer(
                name, body, header_length=header_length, timeout_ms=timeout_ms
            )
            status = reply.status
            if reply.status != 200:
                raise _from_reply(reply)
            return infer_response_bytes(name, reply)
        except GatewayError as e:
            status = e.status
            raise
        except ProtocolError as e:
            status = e.status_code
            raise
        finally:
            function = gateway.function(name)
            gateway.metrics.answered(
                name if function is not None else "_unknown",
                status,
                elapsed_s=time.perf_counter() - started,
                slo_ms=function.spec.slo.latency_ms if function else None,
            )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version or "", state=e.state, reason=e.reason
                )
                for e in repository_index(self.gateway)
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        await load_model(self.gateway, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self.gateway, request.model_name)
        return pb.RepositoryModelUnloadResponse()


_MESSAGES: Mapping[str, tuple[type[Message], type[Message]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
}


def _status_of(error: Exception) -> GrpcAbort:
    if isinstance(error, GrpcAbort):
        return error
    if isinstance(error, NodeFailed):
        return _from_reply(error.reply)
    if isinstance(error, GatewayError):
        return _abort_for_status(error.status, str(error), error.retry_after_s)
    if isinstance(error, ProtocolError):
        return _abort_for_status(error.status_code, error.message, None)
    logger.exception("unhandled error in a gRPC call", exc_info=error)
    return GrpcAbort(
        grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
    )


def _rpc_error(error: GrpcAbort) -> RpcError:
    """The status the call ends with; a retry hint travels as ``google.rpc.RetryInfo``."""
    if error.retry_after_s is None:
        return RpcError(error.code, error.message)
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=max(1, math.ceil(error.retry_after_s)))
    )
    detail = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message)
    detail.details.add().Pack(retry)
    return RpcError(error.code, error.message, details=detail.SerializeToString())


def _handler(service: InferenceService, method: str, *, admin_token: str | None) -> UnaryHandler:
    """The unary handler of ``method``: the request is parsed here (a malformed protobuf is
    INVALID_ARGUMENT), every error leaves as a status, never a traceback."""
    request_type = _MESSAGES[method][0]
    call: Callable[..., Awaitable[Message | bytes]] = getattr(service, method)
    protected = admin_token is not None and method in _REPOSITORY_METHODS
    expected = f"Bearer {admin_token}"
    infer = method == "ModelInfer"

    async def handle(data: bytes, metadata: Metadata, timeout_s: float | None) -> bytes:
        try:
            if protected and metadata.get("authorization") != expected:
                raise GrpcAbort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the gpufaas admin API requires 'authorization: Bearer <token>'",
                )
            try:
                request = request_type.FromString(data)
            except DecodeError as e:
                raise GrpcAbort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__}: {e}"
                ) from None
            if infer:
                timeout_ms = None if timeout_s is None else max(timeout_s, 1e-6) * 1000
                response = await call(request, timeout_ms=timeout_ms)
            else:
                response = await call(request)
        except Exception as e:
            raise _rpc_error(_status_of(e)) from None
        if isinstance(response, bytes):  # ModelInfer writes its own
            return response
        serialized: bytes = response.SerializeToString()
        return serialized

    return handle


def make_server(
    gateway: Gateway,
    *,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    methods: Sequence[str] = tuple(_MESSAGES),
) -> tuple[GrpcH2Server, int]:
    """A gRPC server for ``gateway`` bound to ``host:port`` (0: any free port), or on ``sock``,
    already listening there; not started. Returns it and its port. It runs on the caller's
    event loop, next to HTTP."""
    handlers = {
        f"/{SERVICE}/{m}": _handler(service, m, admin_token=gateway.config.admin_token)
        for service in (InferenceService(gateway),)
        for m in methods
    }
    try:
        server = GrpcH2Server(
            handlers,
            host=host,
            port=port,
            sock=sock,
            max_message_bytes=gateway.config.limits.max_body_bytes,
        )
    except OSError as e:
        raise OSError(
            f"cannot bind the gRPC port {host}:{port} ({e.strerror or e}); see --grpc-port"
        ) from None
    return server, server.port
