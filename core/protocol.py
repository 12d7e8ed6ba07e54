"""The Open Inference Protocol v2 (KServe v2 REST) on the wire: models and the one tensor codec.

The gateway and the GPU manager both speak this protocol, so both use this module and
no other code turns bodies into arrays or back. It covers:

* the pydantic models of the JSON documents (inference request and response, server and
  model metadata, errors, the repository index), used for the OpenAPI schema and by clients;
* :func:`inspect_request` for a forwarder (the gateway): the header checked, the tensor data
  left untouched;
* :func:`decode_request` / :func:`encode_answer` for a server, and
  :func:`encode_request` / :func:`decode_response` for a client (the gateway forwarding
  to a GPU manager, tests, benchmarks);
* Triton's binary tensor data extension: the ``Inference-Header-Content-Length`` header
  gives the length of the JSON header, raw tensor bytes follow it in tensor order, and
  each binary tensor says its size in ``parameters.binary_data_size``. ``BYTES`` tensors
  in binary are each element as a 4-byte little-endian length then the bytes.

Arrays are numpy arrays in the tensor's shape. ``BF16`` arrays hold the raw bfloat16 bits
as ``uint16`` (numpy has no bfloat16; a torch consumer views them as ``torch.bfloat16``);
encoders also take ``ml_dtypes.bfloat16`` arrays. ``BYTES`` arrays are object arrays of
``bytes``; encoders also take ``str`` elements and ``S``/``U`` arrays.

In JSON, ``BYTES`` data are strings. An output whose elements are not all valid UTF-8
can't be a JSON string, so :func:`encode_answer` sends that output in binary even when
JSON was asked for: the response stays lossless and says so in ``binary_data_size``,
which clients of the extension (tritonclient) read per output.

Every bad body raises :class:`ProtocolError`, whose message names the tensor and what
was wrong and is safe to show to the user; numeric data never go through Python loops.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from types import MappingProxyType
from typing import Annotated, Any, Final

import numpy as np
import numpy.typing as npt
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufaas.core.api import Datatype, InferenceFunctionSpec, TensorSpec, format_validation_error

Array = npt.NDArray[Any]
# Where a decoder puts a tensor: (shape, native dtype) -> a writable C-contiguous array.
Allocate = Callable[[tuple[int, ...], "np.dtype[Any]"], Array]
NonNegative = Annotated[int, Field(ge=0)]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE: Final = "application/json"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"

DATATYPE_TO_NUMPY: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "UINT8": np.dtype(np.uint8),
        "UINT16": np.dtype(np.uint16),
        "UINT32": np.dtype(np.uint32),
        "UINT64": np.dtype(np.uint64),
        "INT8": np.dtype(np.int8),
        "INT16": np.dtype(np.int16),
        "INT32": np.dtype(np.int32),
        "INT64": np.dtype(np.int64),
        "FP16": np.dtype(np.float16),
        "FP32": np.dtype(np.float32),
        "FP64": np.dtype(np.float64),
        "BF16": np.dtype(np.uint16),  # raw bfloat16 bits
        "BYTES": np.dtype(np.object_),  # elements are bytes
    }
)
# Tensor bytes on the wire are little-endian whatever the host.
_WIRE_DTYPES: Final = {
    name: dtype.newbyteorder("<") for name, dtype in DATATYPE_TO_NUMPY.items() if name != "BYTES"
}
_BY_KIND_AND_SIZE: Final = {
    (dtype.kind, dtype.itemsize): name
    for name, dtype in DATATYPE_TO_NUMPY.items()
    if name not in ("BF16", "BYTES")
}
_DATATYPES_TEXT: Final = ", ".join(DATATYPE_TO_NUMPY)
# numpy_to_datatype of the common dtypes, looked up by the dtype itself (its .name is slow)
_DATATYPE_OF_DTYPE: Final = {
    dtype: name for name, dtype in DATATYPE_TO_NUMPY.items() if name not in ("BF16", "BYTES")
}

# What JSON `data` may hold per datatype (Python types from the parser); bool is not int here.
_INTEGERS: Final = frozenset({int})
_NUMBERS: Final = frozenset({int, float})
_JSON_TYPES: Final[Mapping[str, tuple[frozenset[type], str]]] = {
    "BOOL": (frozenset({bool}), "true/false"),
    "BYTES": (frozenset({str}), "strings"),
    **{name: (_INTEGERS, "integers") for name in DATATYPE_TO_NUMPY if "INT" in name},
    **{name: (_NUMBERS, "numbers") for name in ("FP16", "FP32", "FP64", "BF16")},
}

_U32: Final = struct.Struct("<I")
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_DEPTH_CHUNK = 1 << 20  # not Final: tests shrink it to cross chunk edges
_QUOTE, _OPEN_LIST, _CLOSE_LIST, _OPEN_OBJ, _CLOSE_OBJ = b'"[]{}'
_SHARED_MEMORY_KEYS: Final = ("shared_memory_region", "shared_memory_byte_size")


def numpy_to_datatype(dtype: npt.DTypeLike) -> str:
    """The v2 datatype of a numpy dtype; ``ValueError`` when there is none.

    ``uint16`` is ``UINT16`` (raw bfloat16 bits can't be told apart); an
    ``ml_dtypes.bfloat16`` dtype is ``BF16``; object, ``S`` and ``U`` arrays are ``BYTES``.
    """
    dt = np.dtype(dtype)
    if dt.name == "bfloat16" and dt.itemsize == 2:
        return "BF16"
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _BY_KIND_AND_SIZE[dt.kind, dt.itemsize]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no Open Inference Protocol datatype") from None


class ProtocolError(Exception):
    """A request or response that breaks the protocol; the message is safe to show to a user.

    ``status_code`` is the HTTP status to answer with: 400 for a bad request, 413 for one
    over the limits, 500 when our own side produced an unencodable tensor, 502 for a bad
    response from upstream.
    """

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on one body, so that a hostile one costs bounded time and memory."""

    max_body_bytes: int = 64 * 2**20
    max_elements: int = 16 * 2**20  # all tensors of the body together
    max_json_depth: int = 32
    max_inputs: int = 64
    max_outputs: int = 64
    max_rank: int = 16
    max_bytes_element: int = 16 * 2**20


DEFAULT_LIMITS: Final = Limits()
# Responses come from our own GPU managers: larger, but still bounded.
RESPONSE_LIMITS: Final = Limits(max_body_bytes=2**30, max_elements=2**28, max_bytes_element=2**30)


# --- The JSON documents -------------------------------------------------------------------


class _Wire(BaseModel):
    """Inference documents: the protocol lets either side add fields and ``parameters``."""

    model_config = ConfigDict(extra="allow")


class RequestInput(_Wire):
    name: str
    shape: list[NonNegative] = Field(max_length=64)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: Any = Field(default=None, description="Flat or nested row-major list; absent if binary.")


class RequestOutput(_Wire):
    name: str
    parameters: dict[str, Any] | None = Field(default=None, description="e.g. binary_data: true")


class InferenceRequest(_Wire):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    name: str
    shape: list[NonNegative]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: Any = Field(default=None, description="Flat row-major list; absent if binary.")


class InferenceResponse(_Wire):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a variable dimension.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]

    @classmethod
    def from_spec(
        cls,
        name: str,
        spec: InferenceFunctionSpec,
        *,
        platform: str = "pytorch",
        versions: Sequence[str] | None = None,
    ) -> ModelMetadata:
        """The metadata document of a function, from its spec."""
        return cls(
            name=name,
            versions=list(versions) if versions is not None else None,
            platform=platform,
            inputs=[_metadata_tensor(t) for t in spec.inputs],
            outputs=[_metadata_tensor(t) for t in spec.outputs],
        )


class ErrorResponse(BaseModel):
    error: str


class RepositoryIndexEntry(BaseModel):
    """One function in the repository index. ``state`` is READY when the function can be
    served (a cold one loads on its first request); residency is apart: the devices that
    hold it (``resident_on``) or are loading it (``loading_on``), empty when none does."""

    name: str
    version: str | None = None
    state: str = ""
    reason: str = ""
    resident_on: list[str] = Field(default_factory=list)
    loading_on: list[str] = Field(default_factory=list)


def _metadata_tensor(spec: TensorSpec) -> MetadataTensor:
    return MetadataTensor(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


# --- Decoding --------------------------------------------------------------------------------


@dataclass
class DecodedRequest:
    """An inference request as arrays, checked against the protocol (not yet a function)."""

    id: str | None
    inputs: dict[str, Array]  # name -> array in the declared shape, in request order
    datatypes: dict[str, str]  # name -> v2 datatype as sent
    requested_outputs: list[str] | None  # None = all
    binary_outputs: set[str] | bool  # outputs wanted in binary; True = all
    parameters: dict[str, Any]  # request parameters, less binary_data_output


def parse_header_length(value: str | None) -> int | None:
    """The value of an ``Inference-Header-Content-Length`` header, or None when absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {_q(value)}")
    return int(text)


@dataclass(frozen=True)
class _Envelope:
    """A request document's top level, checked: what both decoders read before the tensors."""

    id: str | None
    parameters: Mapping[str, Any]
    raw_inputs: list[Any]


def _request_envelope(document: Mapping[str, Any], limits: Limits) -> _Envelope:
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"request 'id' must be a string, got {_short(request_id)}")
    parameters = _parameters(document.get("parameters"), "request")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise ProtocolError("request parameter 'binary_data_output' must be true or false")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise ProtocolError("request needs an 'inputs' list")
    if len(raw_inputs) > limits.max_inputs:
        raise ProtocolError(
            f"request has {len(raw_inputs)} inputs, more than the limit of {limits.max_inputs}"
        )
    return _Envelope(id=request_id, parameters=parameters, raw_inputs=raw_inputs)


def decode_request(
    body: bytes | memoryview,
    *,
    header_length: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    allocate: Allocate | None = None,
) -> DecodedRequest:
    """Decode an inference request body (JSON, or JSON header plus binary tensor data).

    ``header_length`` is the ``Inference-Header-Content-Length`` header, None when the
    whole body is JSON. Raises :class:`ProtocolError` (400, or 413 over ``limits``).

    ``allocate(shape, dtype)``: where a binary numeric tensor is decoded to (a pinned staging
    block on a CUDA host), instead of a new array; the one copy out of the body lands there.

    A binary request whose header (every input in binary) was seen before is not parsed again:
    its checked header is remembered by its exact bytes (:func:`inspect_request`), and only the
    binary section's length is checked against it before the tensors are decoded.
    """
    known = _remembered_header(body, header_length, limits)
    if known is not None:
        return _decode_binary(known, memoryview(body)[header_length:], limits, allocate)
    document, binary = _split_and_parse(body, header_length, limits)
    known = _binary_header(document, binary, header_length, body, limits)
    if known is not None:
        return _decode_binary(known, binary, limits, allocate)
    envelope = _request_envelope(document, limits)
    parameters = dict(envelope.parameters)
    default_binary = parameters.pop("binary_data_output", False)
    request_id, raw_inputs = envelope.id, envelope.raw_inputs
    inputs, datatypes = _decode_tensors(
        raw_inputs, binary, kind="input", limits=limits, allocate=allocate
    )

    requested, binary_outputs = _requested_outputs(document.get("outputs"), default_binary, limits)
    return DecodedRequest(
        id=request_id,
        inputs=inputs,
        datatypes=datatypes,
        requested_outputs=requested,
        binary_outputs=binary_outputs,
        parameters=parameters,
    )


@dataclass(frozen=True)
class TensorHeader:
    """One input as a request's header declares it; its data not decoded."""

    name: str
    datatype: str
    shape: list[int]
    binary_size: int | None  # bytes in the binary section; None: JSON ``data``


@dataclass(frozen=True)
class RequestHeader:
    """An inference request's header, checked, with its tensor data left as they are.

    What a forwarder needs (:func:`inspect_request`): the inputs' names, datatypes, shapes
    and byte counts, the request id and parameters; the body itself travels on untouched.
    Read only: a remembered header is handed to every request that sends the same bytes.
    """

    id: str | None
    inputs: list[TensorHeader]
    parameters: Mapping[str, Any]  # as sent, binary_data_output included
    outputs: list[str] | None  # None: all
    binary_outputs: set[str] | bool
    header_length: int | None  # of the JSON part; None: the whole body is JSON
    binary_bytes: int = 0  # the binary section's length, which the sizes add up to

    def signature(self) -> dict[str, tuple[str | None, list[int]]]:
        return {t.name: (t.datatype, t.shape) for t in self.inputs}


def inspect_request(
    body: bytes | memoryview, *, header_length: int | None, limits: Limits = DEFAULT_LIMITS
) -> RequestHeader:
    """Parse and check only the header of an inference request; the tensor data stay as sent.

    Everything :func:`decode_request` checks that the header alone can tell: the JSON, the
    limits, each input's name, datatype and shape, and for binary inputs that every size
    agrees with its shape and that the sizes add up to the binary section exactly. So a
    header that lies about sizes is a 400 before any tensor byte is copied or forwarded.
    JSON ``data`` is not converted here (the node converts it, once).
    """
    known = _remembered_header(body, header_length, limits)
    if known is not None:
        return known
    document, binary = _split_and_parse(body, header_length, limits)
    header = _inspect_document(document, binary, header_length, limits)
    _remember(header, body, limits)
    return header


def _inspect_document(
    document: dict[str, Any], binary: memoryview, header_length: int | None, limits: Limits
) -> RequestHeader:
    envelope = _request_envelope(document, limits)
    request_id, parameters, raw_inputs = envelope.id, envelope.parameters, envelope.raw_inputs
    default_binary = parameters.get("binary_data_output", False)
    inputs: list[TensorHeader] = []
    seen: set[str] = set()
    elements = 0
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor = _tensor_header(raw, index, seen, limits)
        elements += math.prod(tensor.shape)
        if elements > limits.max_elements:
            raise ProtocolError(
                f"input {_q(tensor.name)}: shape {tensor.shape} takes the body to {elements} "
                f"elements, more than the limit of {limits.max_elements}",
                status_code=413,
            )
        if tensor.binary_size is not None:
            offset += tensor.binary_size
            if offset > len(binary):
                raise ProtocolError(
                    f"input {_q(tensor.name)}: binary_data_size {tensor.binary_size} runs past "
                    f"the end of the body ({len(binary) - offset + tensor.binary_size} bytes left)"
                )
        elif "data" not in raw:
            raise ProtocolError(
                f"input {_q(tensor.name)}: has neither 'data' nor parameters.binary_data_size"
            )
        inputs.append(tensor)
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    outputs, binary_outputs = _requested_outputs(document.get("outputs"), default_binary, limits)
    return RequestHeader(
        id=request_id,
        inputs=inputs,
        parameters=parameters,
        outputs=outputs,
        binary_outputs=binary_outputs,
        header_length=header_length,
        binary_bytes=offset,
    )


def _tensor_header(raw: object, index: int, seen: set[str], limits: Limits) -> TensorHeader:
    if not isinstance(raw, dict):
        raise ProtocolError(f"input #{index} must be an object with name, shape, datatype")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"input #{index} needs a non-empty string 'name'")
    label = f"input {_q(name)}"
    if name in seen:
        raise ProtocolError(f"{label} appears more than once")
    seen.add(name)
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
        raise ProtocolError(
            f"{label}: unknown datatype {_short(datatype)}; expected one of {_DATATYPES_TEXT}"
        )
    shape = _shape(raw.get("shape"), label, limits)
    parameters = _parameters(raw.get("parameters"), label)
    if any(key in parameters for key in _SHARED_MEMORY_KEYS):
        raise ProtocolError(f"{label}: shared memory is not supported")
    size = parameters.get("binary_data_size")
    if size is None:
        return TensorHeader(name=name, datatype=datatype, shape=shape, binary_size=None)
    if raw.get("data") is not None:
        raise ProtocolError(f"{label}: has both 'data' and binary_data_size")
    if type(size) is not int or size < 0:
        raise ProtocolError(
            f"{label}: binary_data_size must be a non-negative integer, got {_short(size)}"
        )
    if datatype != "BYTES":
        needed = math.prod(shape) * _WIRE_DTYPES[datatype].itemsize
        if size != needed:
            raise ProtocolError(
                f"{label}: shape {shape} of {datatype} needs {needed} bytes, "
                f"binary_data_size is {size}"
            )
    elif size < 4 * math.prod(shape):  # each element has at least its 4-byte length
        raise ProtocolError(
            f"{label}: shape {shape} of BYTES needs at least {4 * math.prod(shape)} bytes, "
            f"binary_data_size is {size}"
        )
    return TensorHeader(name=name, datatype=datatype, shape=shape, binary_size=size)


# -- remembered headers: a client sends the same header bytes again and again ------------------

_REMEMBER_MAX_HEADERS = 512  # distinct headers kept (oldest forgotten first)
_REMEMBER_MAX_BYTES = 8192  # longer headers are never kept
_remembered: dict[tuple[bytes, Limits], RequestHeader] = {}


def _remembered_header(
    body: bytes | memoryview, header_length: int | None, limits: Limits
) -> RequestHeader | None:
    """The checked header of a binary request whose header bytes were seen before, if the
    binary section has exactly the bytes its inputs declare (else None: parse it afresh)."""
    if header_length is None or not 0 < header_length <= _REMEMBER_MAX_BYTES:
        return None
    if header_length > len(body):
        return None
    header = _remembered.get((bytes(memoryview(body)[:header_length]), limits))
    if header is None or len(body) - header_length != header.binary_bytes:
        return None
    return header


def _remember(header: RequestHeader, body: bytes | memoryview, limits: Limits) -> None:
    """Keep a checked header whose inputs are all binary: its bytes alone decide it."""
    length = header.header_length
    if length is None or not 0 < length <= _REMEMBER_MAX_BYTES:
        return
    if any(t.binary_size is None for t in header.inputs):
        return  # JSON data in the header: it changes with every request
    if len(_remembered) >= _REMEMBER_MAX_HEADERS:
        del _remembered[next(iter(_remembered))]
    _remembered[bytes(memoryview(body)[:length]), limits] = header


def _binary_header(
    document: dict[str, Any],
    binary: memoryview,
    header_length: int | None,
    body: bytes | memoryview,
    limits: Limits,
) -> RequestHeader | None:
    """The document's checked header when every input is binary (remembered); None for JSON
    data, or for a header the checks refuse (the full decode then names what is wrong)."""
    if header_length is None:
        return None
    try:
        header = _inspect_document(document, binary, header_length, limits)
    except ProtocolError:
        return None
    if any(t.binary_size is None for t in header.inputs):
        return None
    _remember(header, body, limits)
    return header


def _decode_binary(
    header: RequestHeader, binary: memoryview, limits: Limits, allocate: Allocate | None
) -> DecodedRequest:
    """Decode the tensors of a request whose checked header has every input in binary (its
    sizes agree with the shapes and add up to ``binary`` exactly)."""
    inputs: dict[str, Array] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for tensor in header.inputs:
        size = tensor.binary_size or 0
        chunk = binary[offset : offset + size]
        offset += size
        name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
        inputs[name] = _from_binary(
            chunk, datatype, shape, math.prod(shape), _label("input", name), limits, allocate
        )
        datatypes[name] = datatype
    parameters = {k: v for k, v in header.parameters.items() if k != "binary_data_output"}
    binary_outputs = header.binary_outputs
    return DecodedRequest(
        id=header.id,
        inputs=inputs,
        datatypes=datatypes,
        requested_outputs=None if header.outputs is None else list(header.outputs),
        binary_outputs=binary_outputs if isinstance(binary_outputs, bool) else set(binary_outputs),
        parameters=parameters,
    )


def decode_response(
    body: bytes, *, header_length: int | None, limits: Limits = RESPONSE_LIMITS
) -> tuple[InferenceResponse, dict[str, Array]]:
    """Decode an inference response body into its document and its output arrays.

    ``BYTES`` outputs come back as ``bytes`` elements in JSON mode too. A bad body is
    the upstream's fault: :class:`ProtocolError` with status 502.
    """
    try:
        document, binary = _split_and_parse(body, header_length, limits)
        if "outputs" not in document and isinstance(document.get("error"), str):
            raise ProtocolError(f"upstream error: {document['error']}")
        raw_outputs = document.get("outputs")
        if not isinstance(raw_outputs, list):
            raise ProtocolError("response needs an 'outputs' list")
        arrays, _ = _decode_tensors(raw_outputs, binary, kind="output", limits=limits)
        try:
            response = InferenceResponse.model_validate(document)
        except ValidationError as e:
            raise ProtocolError(f"response: {format_validation_error(e)}") from None
    except ProtocolError as e:
        raise ProtocolError(f"bad inference response: {e.message}", status_code=502) from None
    return response, arrays


def validate_inputs(
    decoded: DecodedRequest, specs: Sequence[TensorSpec], *, max_batch_size: int = 0
) -> dict[str, Array]:
    """Check decoded inputs against a function's declared inputs; return them in spec order.

    Names must match exactly, datatypes too, ranks too; fixed dimensions must match and
    ``-1`` dimensions take any size. With ``max_batch_size > 0`` the first dimension of
    every input is the batch: the same for all inputs, and at most ``max_batch_size``.
    """
    check_signature(
        {name: (decoded.datatypes.get(name), list(a.shape)) for name, a in decoded.inputs.items()},
        specs,
        max_batch_size=max_batch_size,
    )
    return {spec.name: decoded.inputs[spec.name] for spec in specs}


def check_signature(
    tensors: Mapping[str, tuple[str | None, Sequence[int]]],
    specs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 0,
) -> None:
    """Check inputs, ``{name: (datatype, shape)}``, against a function's declared inputs.

    The one signature check, on arrays (:func:`validate_inputs`) or on a request's header alone
    (:class:`RequestHeader`, the gateway: no tensor data decoded). Raises :class:`ProtocolError`.
    """
    if _fits(tensors, specs, max_batch_size):
        return  # the usual request: nothing to name, so no message is built
    declared = {spec.name: spec for spec in specs}
    unknown = [name for name in tensors if name not in declared]
    if unknown:
        raise ProtocolError(
            f"unknown input {_q(unknown[0])}; the function takes {_names(declared)}"
        )
    missing = [spec for spec in specs if spec.name not in tensors]
    if missing:
        m = missing[0]
        raise ProtocolError(f"missing input {_q(m.name)} ({m.datatype} {m.shape})")

    batch: tuple[str, int] | None = None
    for spec in specs:
        datatype, given = tensors[spec.name]
        label = f"input {_q(spec.name)}"
        if datatype != spec.datatype:
            raise ProtocolError(
                f"{label}: datatype {datatype} but the function takes {spec.datatype}"
            )
        shape = list(given)
        if len(shape) != len(spec.shape):
            raise ProtocolError(
                f"{label}: shape {shape} has rank {len(shape)}, "
                f"the function takes rank {len(spec.shape)} {spec.shape}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if want != -1 and got != want:
                raise ProtocolError(
                    f"{label}: dimension {axis} is {got}, the function takes {want} "
                    f"(shape {shape}, declared {spec.shape})"
                )
        if max_batch_size > 0 and shape:
            if shape[0] > max_batch_size:
                raise ProtocolError(
                    f"{label}: batch size {shape[0]} is over the function's maximum of {max_batch_size}"
                )
            if batch is not None and batch[1] != shape[0]:
                raise ProtocolError(
                    f"{label}: batch size {shape[0]} differs from input {_q(batch[0])}'s {batch[1]}"
                )
            batch = batch or (spec.name, shape[0])


def _fits(
    tensors: Mapping[str, tuple[str | None, Sequence[int]]],
    specs: Sequence[TensorSpec],
    max_batch_size: int,
) -> bool:
    """Whether :func:`check_signature` passes ``tensors``, decided without building any of its
    messages (a few µs a request at the gateway and the node); False sends it through the
    full check, which names what is wrong."""
    if len(tensors) != len(specs):
        return False
    if len(specs) > 1 and len({spec.name for spec in specs}) != len(specs):
        return False  # a name declared twice: the full check tells
    batch: int | None = None
    for spec in specs:
        found = tensors.get(spec.name)
        if found is None:
            return False
        datatype, shape = found
        declared = spec.shape
        if datatype != spec.datatype or len(shape) != len(declared):
            return False
        for got, want in zip(shape, declared, strict=True):
            if want != -1 and got != want:
                return False
        if max_batch_size > 0 and len(shape) > 0:
            if shape[0] > max_batch_size or (batch is not None and shape[0] != batch):
                return False
            batch = shape[0]
    return True


def validate_outputs(requested: Sequence[str] | None, specs: Sequence[TensorSpec]) -> list[str]:
    """The output names to produce, in request order; all declared ones when None is asked."""
    if requested is None:
        return [spec.name for spec in specs]
    declared = {spec.name: spec for spec in specs}
    for name in requested:
        if name not in declared:
            raise ProtocolError(
                f"unknown output {_q(name)}; the function produces {_names(declared)}"
            )
    return list(requested)


def _split_and_parse(
    body: bytes | memoryview, header_length: int | None, limits: Limits
) -> tuple[dict[str, Any], memoryview]:
    if len(body) > limits.max_body_bytes:
        raise ProtocolError(
            f"body has {len(body)} bytes, more than the limit of {limits.max_body_bytes}",
            status_code=413,
        )
    view = memoryview(body)
    if header_length is None:
        header = body if isinstance(body, bytes) else bytes(body)  # no copy of bytes
        binary = view[len(view) :]
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} {header_length} is beyond the body's {len(body)} bytes"
            )
        header, binary = bytes(view[:header_length]), view[header_length:]
    _check_depth(header, limits.max_json_depth)
    try:
        document = pydantic_core.from_json(header)
    except ValueError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    if not isinstance(document, dict):
        raise ProtocolError("the body must be a JSON object")
    return document, binary


def _check_depth(text: bytes, max_depth: int) -> None:
    """Refuse JSON that nests deeper than ``max_depth``, before any parser recurses into it."""
    if text.count(b"[") + text.count(b"{") <= max_depth:
        return  # the common small header: cannot be deeper than its bracket count
    if b"\\" in text:
        text = _JSON_STRING.sub(b'""', text)  # escaped quotes would break the quote pairing below
    raw = np.frombuffer(text, dtype=np.uint8)
    depth, in_string = 0, False
    for start in range(0, len(raw), _DEPTH_CHUNK):  # bounded memory on a huge body
        chunk = raw[start : start + _DEPTH_CHUNK]
        quotes = np.flatnonzero(chunk == _QUOTE)
        opens = (chunk == _OPEN_LIST) | (chunk == _OPEN_OBJ)
        where = np.flatnonzero(opens | (chunk == _CLOSE_LIST) | (chunk == _CLOSE_OBJ))
        outside = (np.searchsorted(quotes, where) + in_string) % 2 == 0
        where = where[outside]
        if len(where):
            levels = depth + np.cumsum(np.where(opens[where], 1, -1))
            if int(levels.max()) > max_depth:
                raise ProtocolError(f"JSON nests deeper than {max_depth} levels")
            depth = int(levels[-1])
        in_string = (in_string + len(quotes)) % 2 == 1


def _parameters(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object, got {_short(value)}")
    return value


class _BinaryReader:
    """Hands out the binary section in order, tensor by tensor."""

    def __init__(self, data: memoryview, *, kind: str) -> None:
        self.data, self.offset, self.kind = data, 0, kind

    def take(self, size: int, label: str) -> memoryview:
        left = len(self.data) - self.offset
        if size > left:
            if not len(self.data):
                raise ProtocolError(
                    f"{label}: binary_data_size {size} but the body has no binary data "
                    f"(is the {HEADER_LENGTH} header missing?)"
                )
            raise ProtocolError(
                f"{label}: binary_data_size {size} runs past the end of the body ({left} bytes left)"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise ProtocolError(
                f"the body has {left} bytes of binary data that no {self.kind}'s "
                "binary_data_size accounts for"
            )


def _decode_tensors(
    raw_tensors: list[Any],
    binary: memoryview,
    *,
    kind: str,
    limits: Limits,
    allocate: Allocate | None = None,
) -> tuple[dict[str, Array], dict[str, str]]:
    reader = _BinaryReader(binary, kind=kind)
    arrays: dict[str, Array] = {}
    datatypes: dict[str, str] = {}
    elements = 0
    for index, raw in enumerate(raw_tensors):
        if not isinstance(raw, dict):
            raise ProtocolError(f"{kind} #{index} must be an object with name, shape, datatype")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"{kind} #{index} needs a non-empty string 'name'")
        label = f"{kind} {_q(name)}"
        if name in arrays:
            raise ProtocolError(f"{label} appears more than once")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
            raise ProtocolError(
                f"{label}: unknown datatype {_short(datatype)}; expected one of {_DATATYPES_TEXT}"
            )
        shape = _shape(raw.get("shape"), label, limits)
        count = math.prod(shape)
        elements += count
        if elements > limits.max_elements:
            raise ProtocolError(
                f"{label}: shape {shape} takes the body to {elements} elements, "
                f"more than the limit of {limits.max_elements}",
                status_code=413,
            )
        parameters = _parameters(raw.get("parameters"), label)
        if any(key in parameters for key in _SHARED_MEMORY_KEYS):
            raise ProtocolError(f"{label}: shared memory is not supported")
        size = parameters.get("binary_data_size")
        if size is not None:
            if raw.get("data") is not None:
                raise ProtocolError(f"{label}: has both 'data' and binary_data_size")
            if type(size) is not int or size < 0:
                raise ProtocolError(
                    f"{label}: binary_data_size must be a non-negative integer, got {_short(size)}"
                )
            chunk = reader.take(size, label)
            array = _from_binary(chunk, datatype, shape, count, label, limits, allocate)
        elif "data" in raw:
            array = _from_json(raw["data"], datatype, shape, count, label, limits)
        else:
            raise ProtocolError(f"{label}: has neither 'data' nor parameters.binary_data_size")
        arrays[name] = array
        datatypes[name] = datatype
    reader.finish()
    return arrays, datatypes


def _shape(value: object, label: str, limits: Limits) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise ProtocolError(
            f"{label}: shape must be a list of non-negative integers, got {_short(value)}"
        )
    if len(value) > limits.max_rank:
        raise ProtocolError(
            f"{label}: shape has {len(value)} dimensions, more than the limit of {limits.max_rank}"
        )
    return value


def _from_binary(
    chunk: memoryview,
    datatype: str,
    shape: list[int],
    count: int,
    label: str,
    limits: Limits,
    allocate: Allocate | None = None,
) -> Array:
    if datatype == "BYTES":
        return _unpack_bytes(chunk, count, label, limits).reshape(shape)
    wire = _WIRE_DTYPES[datatype]
    needed = count * wire.itemsize
    if len(chunk) != needed:
        raise ProtocolError(
            f"{label}: shape {shape} of {datatype} needs {needed} bytes, "
            f"binary_data_size is {len(chunk)}"
        )
    if datatype == "BOOL":
        array: Array = np.frombuffer(chunk, dtype=np.uint8) != 0  # any non-zero byte is true
    elif allocate is not None:  # the one copy, straight into the caller's block
        array = allocate(tuple(shape), DATATYPE_TO_NUMPY[datatype])
        array.reshape(-1)[:] = np.frombuffer(chunk, dtype=wire)
        return array
    else:
        # A copy: aligned, writable and native-endian, not a view into the request body.
        array = np.frombuffer(chunk, dtype=wire).astype(DATATYPE_TO_NUMPY[datatype])
    return array.reshape(shape)


def _unpack_bytes(chunk: memoryview, count: int, label: str, limits: Limits) -> Array:
    elements: list[bytes] = []
    offset, end = 0, len(chunk)
    for index in range(count):
        if offset + 4 > end:
            raise ProtocolError(
                f"{label}: BYTES data ends before element {index} of {count} (at byte {offset})"
            )
        (length,) = _U32.unpack_from(chunk, offset)
        offset += 4
        if length > limits.max_bytes_element:
            raise ProtocolError(
                f"{label}: BYTES element {index} has {length} bytes, "
                f"more than the limit of {limits.max_bytes_element}",
                status_code=413,
            )
        if offset + length > end:
            raise ProtocolError(
                f"{label}: BYTES element {index} claims {length} bytes, only {end - offset} remain"
            )
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != end:
        raise ProtocolError(
            f"{label}: {end - offset} bytes left over after the {count} BYTES elements "
            "its shape declares"
        )
    return _object_array(elements)


def _from_json(
    data: object, datatype: str, shape: list[int], count: int, label: str, limits: Limits
) -> Array:
    flat, types = _flatten(data, label)
    if len(flat) != count:
        raise ProtocolError(f"{label}: shape {shape} needs {count} elements, got {len(flat)}")
    allowed, what = _JSON_TYPES[datatype]
    if not types <= allowed:
        got = ", ".join(sorted(_json_type_name(t) for t in types - allowed))
        raise ProtocolError(f"{label}: {datatype} data must be {what}, got {got}")
    if datatype == "BYTES":
        encoded = [text.encode() for text in flat]
        longest = max(map(len, encoded), default=0)
        if longest > limits.max_bytes_element:
            raise ProtocolError(
                f"{label}: a BYTES element has {longest} bytes, "
                f"more than the limit of {limits.max_bytes_element}",
                status_code=413,
            )
        return _object_array(encoded).reshape(shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # e.g. 1e9 as FP16 is inf, as it casts
            if datatype == "BF16":
                array = float32_to_bf16_bits(np.asarray(flat, dtype=np.float32))
            else:
                dtype = DATATYPE_TO_NUMPY[datatype]
                if dtype.kind in "iu" and flat:  # numpy < 2 wraps out-of-range ints silently
                    info = np.iinfo(dtype)
                    if min(flat) < info.min or max(flat) > info.max:
                        raise OverflowError
                array = np.asarray(flat, dtype=dtype)
    except (OverflowError, ValueError):
        raise ProtocolError(f"{label}: a value is out of range for {datatype}") from None
    return array.reshape(shape)


def _flatten(data: object, label: str) -> tuple[list[Any], set[type]]:
    """Row-major flattening of flat or nested lists, level by level at C speed."""
    flat: list[Any] = data if isinstance(data, list) else [data]
    while True:  # bounded: each round removes a nesting level, and depth is checked
        types = set(map(type, flat))
        if list not in types:
            return flat, types
        if len(types) > 1:
            raise ProtocolError(f"{label}: data mixes nested lists and values at the same level")
        flat = list(chain.from_iterable(flat))


def _json_type_name(t: type) -> str:
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(
        t, "null" if t is type(None) else "object"
    )


def _requested_outputs(
    value: object, default_binary: bool, limits: Limits
) -> tuple[list[str] | None, set[str] | bool]:
    if value is None:
        return None, default_binary
    if not isinstance(value, list):
        raise ProtocolError("request 'outputs' must be a list")
    if len(value) > limits.max_outputs:
        raise ProtocolError(
            f"request asks for {len(value)} outputs, more than the limit of {limits.max_outputs}"
        )
    names: list[str] = []
    binary: set[str] = set()
    for index, raw in enumerate(value):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ProtocolError(f"requested output #{index} needs a non-empty string 'name'")
        name: str = raw["name"]
        label = f"requested output {_q(name)}"
        if name in names:
            raise ProtocolError(f"{label} appears more than once")
        parameters = _parameters(raw.get("parameters"), label)
        if any(key in parameters for key in _SHARED_MEMORY_KEYS):
            raise ProtocolError(f"{label}: shared memory is not supported")
        if parameters.get("classification"):
            raise ProtocolError(f"{label}: classification is not supported")
        wanted = parameters.get("binary_data", default_binary)
        if not isinstance(wanted, bool):
            raise ProtocolError(f"{label}: parameter binary_data must be true or false")
        names.append(name)
        if wanted:
            binary.add(name)
    return names, binary


# --- Encoding --------------------------------------------------------------------------------


def encode_request(
    inputs: Mapping[str, tuple[Array, str]],
    *,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
    binary_outputs: bool | set[str] = True,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference request, all tensor data in binary; return body and headers.

    ``outputs`` None asks for all outputs; ``binary_outputs`` says which come back in
    binary (a set needs ``outputs``: the protocol can only flag listed outputs).
    """
    document: dict[str, Any] = {}
    if request_id is not None:
        document["id"] = request_id
    request_parameters = dict(parameters or {})
    if outputs is None:
        if not isinstance(binary_outputs, bool):
            raise ValueError("binary_outputs as a set needs the outputs listed")
        if binary_outputs:
            request_parameters["binary_data_output"] = True
    if request_parameters:
        document["parameters"] = request_parameters
    headers_in: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for name, (array, datatype) in inputs.items():
        payload = _binary_payload(array, datatype, f"input {_q(name)}")
        headers_in.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(payload)},
            }
        )
        chunks.append(payload)
    document["inputs"] = headers_in
    if outputs is not None:
        document["outputs"] = [
            {
                "name": name,
                "parameters": {
                    "binary_data": binary_outputs is True
                    or (not isinstance(binary_outputs, bool) and name in binary_outputs)
                },
            }
            for name in outputs
        ]
    header = pydantic_core.to_json(document)
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": BINARY_CONTENT_TYPE}
    return b"".join([header, *chunks]), headers


AnswerHeaders = tuple[tuple[bytes, bytes], ...]


def encode_answer(
    *,
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, tuple[Array, str]],
    binary: set[str] | bool,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, AnswerHeaders]:
    """Encode an inference response; return body and headers as a server writes them: raw
    ``(name, value)`` pairs, names lower-case.

    Outputs named in ``binary`` (all when True) go as binary data, the rest as flat
    row-major JSON ``data``. ``BYTES`` outputs that aren't UTF-8 go in binary regardless.

    The usual answer (every output in binary, no id, no parameters) has a JSON header that
    depends only on the model and each output's name, datatype, shape and byte count: it is
    built once per such key and remembered with its header pairs (:func:`_binary_answer_head`).
    """
    if binary is True and request_id is None and not parameters and outputs:
        return _binary_answer(model_name, model_version, outputs)
    header, chunks = _response_parts(
        model_name, model_version, request_id, outputs, binary, parameters
    )
    if not chunks:
        return header, _JSON_ANSWER
    return b"".join([header, *chunks]), _binary_headers(len(header))


_JSON_ANSWER: AnswerHeaders = ((b"content-type", JSON_CONTENT_TYPE.encode()),)
_ANSWER_HEADERS_MAX = 512  # distinct answer headers kept (least recently used forgotten first)


@functools.lru_cache(maxsize=_ANSWER_HEADERS_MAX)
def _binary_headers(header_length: int) -> AnswerHeaders:
    return (
        (HEADER_LENGTH.lower().encode(), b"%d" % header_length),
        (b"content-type", BINARY_CONTENT_TYPE.encode()),
    )


def _binary_answer(
    model_name: str, model_version: str | None, outputs: Mapping[str, tuple[Array, str]]
) -> tuple[bytes, AnswerHeaders]:
    """:func:`encode_answer` with every output in binary, no id and no parameters: the
    payloads are cut from the arrays as ever, the JSON header and the header pairs are looked
    up by what decides them (the model, its version, each output's name, datatype, shape and
    byte count)."""
    chunks: list[Any] = []
    key: list[Any] = []
    for name, (array, datatype) in outputs.items():
        payload = _binary_payload(array, datatype, _label("output", name))
        chunks.append(payload)
        key.append((name, datatype, array.shape, len(payload)))
    header, headers = _binary_answer_head(model_name, model_version, tuple(key))
    return b"".join([header, *chunks]), headers


@functools.lru_cache(maxsize=_ANSWER_HEADERS_MAX)
def _binary_answer_head(
    model_name: str,
    model_version: str | None,
    outputs: tuple[tuple[str, str, tuple[int, ...], int], ...],
) -> tuple[bytes, AnswerHeaders]:
    """The JSON header of an answer whose outputs (name, datatype, shape, byte count) are all
    binary, with no id and no parameters (as :func:`_response_parts` writes it), and its
    header pairs."""
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    document["outputs"] = [
        {
            "name": name,
            "datatype": datatype,
            "shape": list(shape),
            "parameters": {"binary_data_size": size},
        }
        for name, datatype, shape, size in outputs
    ]
    header = pydantic_core.to_json(document)
    return header, _binary_headers(len(header))


def _response_parts(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, tuple[Array, str]],
    binary: set[str] | bool,
    parameters: Mapping[str, Any] | None,
) -> tuple[bytes, list[Any]]:
    """An answer's JSON header and its binary payloads, in order."""
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    if parameters:
        document["parameters"] = dict(parameters)
    entries: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for name, (array, datatype) in outputs.items():
        label = f"output {_q(name)}"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        data = None
        if not (binary is True or (not isinstance(binary, bool) and name in binary)):
            data = _json_data(array, datatype, label)
        if data is None:
            payload = _binary_payload(array, datatype, label)
            entry["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        else:
            entry["data"] = data
        entries.append(entry)
    document["outputs"] = entries
    return pydantic_core.to_json(document), chunks


def _check_dtype(array: Array, datatype: str, label: str) -> None:
    if not isinstance(array, np.ndarray):
        raise ProtocolError(
            f"{label}: expected a numpy array, got {type(array).__name__}", status_code=500
        )
    if datatype not in DATATYPE_TO_NUMPY:
        raise ProtocolError(f"{label}: unknown datatype {_short(datatype)}", status_code=500)
    actual = _DATATYPE_OF_DTYPE.get(array.dtype)
    if actual is None:
        try:
            actual = numpy_to_datatype(array.dtype)
        except ValueError:
            actual = str(array.dtype)
    if actual != datatype and not (datatype == "BF16" and actual == "UINT16"):
        raise ProtocolError(
            f"{label}: array of {array.dtype} can't be sent as {datatype}", status_code=500
        )


def _binary_payload(array: Array, datatype: str, label: str) -> bytes | memoryview:
    _check_dtype(array, datatype, label)
    if datatype == "BYTES":
        elements = _bytes_elements(array, label)
        return b"".join([part for e in elements for part in (_U32.pack(len(e)), e)])
    wire = array.view(np.uint16) if datatype == "BF16" else array
    if wire.dtype.byteorder == ">":
        wire = wire.astype(wire.dtype.newbyteorder("<"))
    return np.ascontiguousarray(wire).reshape(-1).view(np.uint8).data


def _json_data(array: Array, datatype: str, label: str) -> list[Any] | None:
    """Flat row-major JSON data, or None when the tensor can only go in binary."""
    _check_dtype(array, datatype, label)
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [e.decode() for e in _bytes_elements(array, label)]
        except UnicodeDecodeError:
            return None  # not representable as JSON strings: binary keeps it lossless
    if datatype == "BF16":
        return bf16_bits_to_float32(flat.view(np.uint16)).tolist()  # type: ignore[no-any-return]
    return flat.tolist()  # type: ignore[no-any-return]


def _bytes_elements(array: Array, label: str) -> list[bytes]:
    elements: list[bytes] = []
    for index, element in enumerate(array.reshape(-1).tolist()):
        if isinstance(element, bytes):
            elements.append(element)
        elif isinstance(element, str):
            elements.append(element.encode())
        else:
            raise ProtocolError(
                f"{label}: BYTES element {index} is {type(element).__name__}, not bytes or str",
                status_code=500,
            )
    return elements


# --- Small helpers ---------------------------------------------------------------------------


def float32_to_bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 bits of float32 values, rounded to nearest even (as torch and ml_dtypes do)."""
    shape = np.shape(values)
    values = np.atleast_1d(values)  # .view() needs at least one dimension
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16  # wraps only for NaN
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep the sign, quiet NaN
    return out.reshape(shape)


def bf16_bits_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """float32 values of bfloat16 bits (exact)."""
    wide = np.atleast_1d(bits).astype(np.uint32) << 16  # .view() needs at least one dimension
    return wide.view(np.float32).reshape(np.shape(bits))


def _object_array(elements: Iterable[bytes]) -> Array:
    items = list(elements)
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


@functools.lru_cache(maxsize=1024)
def _label(kind: str, name: str) -> str:
    """``kind`` and the quoted tensor name, as messages say it: built once per name for the
    decode and encode of every request, which pass it on in case a message needs it."""
    return f"{kind} {_q(name)}"


def _q(name: object) -> str:
    """A user-supplied name, quoted and cut short for messages."""
    text = str(name)
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _names(specs: Mapping[str, TensorSpec]) -> str:
    return ", ".join(_q(name) for name in specs)
