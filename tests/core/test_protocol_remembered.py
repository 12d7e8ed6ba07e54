"""The decoders' remembered headers and decoding straight into a caller's block (#17)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from gpufaas.core import protocol
from gpufaas.core.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    decode_request,
    encode_request,
    inspect_request,
)


def _binary_request(x: np.ndarray, *, request_id: str | None = None) -> tuple[bytes, int]:
    body, headers = encode_request({"x": (x, "FP32")}, request_id=request_id)
    return body, int(headers[HEADER_LENGTH])


def test_a_remembered_header_decodes_each_bodys_own_data() -> None:
    first, length = _binary_request(np.arange(4, dtype=np.float32).reshape(1, 4))
    second, again = _binary_request(np.arange(4, 8, dtype=np.float32).reshape(1, 4))
    assert first[:length] == second[:again]  # the same header bytes
    for _ in range(2):
        np.testing.assert_array_equal(
            decode_request(first, header_length=length).inputs["x"], [[0, 1, 2, 3]]
        )
        np.testing.assert_array_equal(
            decode_request(second, header_length=length).inputs["x"], [[4, 5, 6, 7]]
        )


@pytest.mark.parametrize("cut", [-1, +1, -16])
def test_a_remembered_header_still_checks_the_binary_sections_length(cut: int) -> None:
    body, length = _binary_request(np.ones((2, 4), dtype=np.float32))
    decode_request(body, header_length=length)  # remembered now
    assert inspect_request(body, header_length=length).binary_bytes == len(body) - length
    lying = body[:cut] if cut < 0 else body + b"\0" * cut
    with pytest.raises(ProtocolError) as decoded:
        decode_request(lying, header_length=length)
    assert decoded.value.status_code == 400
    with pytest.raises(ProtocolError) as inspected:
        inspect_request(lying, header_length=length)
    assert inspected.value.status_code == 400


def test_the_same_header_under_other_limits_is_checked_again() -> None:
    body, length = _binary_request(np.ones((1, 64), dtype=np.float32))
    decode_request(body, header_length=length)
    tight = protocol.Limits(max_elements=8)
    with pytest.raises(ProtocolError) as e:
        decode_request(body, header_length=length, limits=tight)
    assert e.value.status_code == 413


def test_remembered_headers_are_bounded() -> None:
    for i in range(protocol._REMEMBER_MAX_HEADERS + 50):
        body, length = _binary_request(np.ones((1, 2), dtype=np.float32), request_id=f"r{i}")
        assert decode_request(body, header_length=length).id == f"r{i}"
    assert len(protocol._remembered) <= protocol._REMEMBER_MAX_HEADERS


def test_headers_with_json_data_are_decoded_afresh() -> None:
    def body_with(value: int) -> tuple[bytes, int]:
        header = json.dumps(
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 2],
                     "parameters": {"binary_data_size": 8}},
                    {"name": "n", "datatype": "INT64", "shape": [1], "data": [value]},
                ]
            }
        ).encode()  # fmt: skip
        return header + np.ones(2, dtype="<f4").tobytes(), len(header)

    for value in (3, 4, 3):
        body, length = body_with(value)
        assert decode_request(body, header_length=length).inputs["n"].tolist() == [value]


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("INT64", np.arange(6, dtype=np.int64).reshape(3, 2)),
        ("FP16", np.arange(4, dtype=np.float16)),
        ("BF16", np.arange(4, dtype=np.uint16)),
    ],
)
def test_binary_tensors_are_decoded_straight_into_the_callers_block(
    datatype: str, array: np.ndarray
) -> None:
    blocks: list[np.ndarray] = []

    def allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        blocks.append(np.empty(shape, dtype=dtype))
        return blocks[-1]

    body, headers = encode_request({"t": (array, datatype)})
    length = int(headers[HEADER_LENGTH])
    for _ in range(2):  # fresh, then with the header remembered
        decoded = decode_request(body, header_length=length, allocate=allocate)
        assert decoded.inputs["t"] is blocks[-1]
        np.testing.assert_array_equal(decoded.inputs["t"], array)
        assert decoded.inputs["t"].dtype == protocol.DATATYPE_TO_NUMPY[datatype]
    assert len(blocks) == 2


def test_bool_and_bytes_tensors_take_no_block() -> None:
    def allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        raise AssertionError("BOOL and BYTES are not numeric copies")

    body, headers = encode_request(
        {
            "b": (np.array([True, False]), "BOOL"),
            "s": (np.array([b"hi", b"there"], dtype=object), "BYTES"),
        }
    )
    decoded = decode_request(body, header_length=int(headers[HEADER_LENGTH]), allocate=allocate)
    assert decoded.inputs["b"].tolist() == [True, False]
    assert decoded.inputs["s"].tolist() == [b"hi", b"there"]
