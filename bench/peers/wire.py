"""The tensor payload every system gets: KServe v2 REST with Triton's binary tensor extension.

All three systems receive the same bytes for the same request: a JSON header naming
the tensors, then the raw little-endian tensor bytes, with the header's length in
``Inference-Header-Content-Length``. It is the cheapest encoding gpufaas and Triton
both speak (no JSON number parsing), and the Ray Serve ingress (``ray_app.py``) reads
it with :func:`decode` below, which is a slice and an ``np.frombuffer`` per tensor.

Numeric datatypes only (the example models take FP32 and INT64 tensors). Standard
library and numpy only: the Ray replicas import this file too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

HEADER_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE = "application/octet-stream"

Array = npt.NDArray[Any]

_NUMPY: Mapping[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
_DATATYPE: Mapping[str, str] = {np.dtype(v).str: k for k, v in _NUMPY.items()}


class WireError(ValueError):
    """A body that does not follow the binary tensor extension; the message says why."""


def datatype_of(array: Array) -> str:
    try:
        return _DATATYPE[array.dtype.newbyteorder("<").str]
    except KeyError:
        raise WireError(f"unsupported dtype {array.dtype}") from None


def _tensor_bytes(array: Array) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _pack(header: Mapping[str, Any], payloads: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {HEADER_LENGTH: str(len(head)), "Content-Type": CONTENT_TYPE}
    return head + b"".join(payloads), headers


def encode_request(
    inputs: Mapping[str, Array], *, outputs: Sequence[str]
) -> tuple[bytes, dict[str, str]]:
    """A request body asking for every output in binary, and its headers."""
    payloads = [_tensor_bytes(a) for a in inputs.values()]
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype_of(array),
                "parameters": {"binary_data_size": len(data)},
            }
            for (name, array), data in zip(inputs.items(), payloads, strict=True)
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    return _pack(header, payloads)


def encode_response(model: str, outputs: Mapping[str, Array]) -> tuple[bytes, dict[str, str]]:
    payloads = [_tensor_bytes(a) for a in outputs.values()]
    header = {
        "model_name": model,
        "outputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype_of(array),
                "parameters": {"binary_data_size": len(data)},
            }
            for (name, array), data in zip(outputs.items(), payloads, strict=True)
        ],
    }
    return _pack(header, payloads)


def decode(body: bytes, header_length: str | None, *, key: str) -> dict[str, Array]:
    """Tensors of a request (``key="inputs"``) or response (``key="outputs"``) body.

    Tensors sent as JSON data are read too, so a peer answering in JSON still decodes.
    """
    try:
        size = len(body) if header_length is None else int(header_length)
        if not 0 < size <= len(body):
            raise WireError(f"{HEADER_LENGTH} {size} is outside the body ({len(body)} bytes)")
        header = json.loads(body[:size])
        view = memoryview(body)
        offset = size
        tensors: dict[str, Array] = {}
        for tensor in header[key]:
            dtype = np.dtype(_NUMPY[tensor["datatype"]])
            shape = tuple(int(d) for d in tensor["shape"])
            nbytes = (tensor.get("parameters") or {}).get("binary_data_size")
            if nbytes is None:
                array = np.asarray(tensor["data"], dtype=dtype).reshape(shape)
            else:
                chunk = view[offset : offset + int(nbytes)]
                if len(chunk) != int(nbytes):
                    raise WireError(f"tensor {tensor['name']!r} runs past the end of the body")
                offset += int(nbytes)
                array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
            tensors[str(tensor["name"])] = array
    except WireError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed {key} body: {type(e).__name__}: {e}") from None
    return tensors
