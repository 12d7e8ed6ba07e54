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


# -- the answer's remembered JSON header (encode_answer, every output in binary) ----------------


def _answer(outputs: dict[str, tuple[np.ndarray, str]], **kwargs: Any) -> tuple[bytes, int]:
    body, headers = protocol.encode_answer(
        model_name=kwargs.pop("model_name", "m"),
        model_version=None,
        request_id=kwargs.pop("request_id", None),
        outputs=outputs,
        binary=True,
        **kwargs,
    )
    return body, int(dict(headers)[HEADER_LENGTH.lower().encode()])


def _built_afresh(outputs: dict[str, tuple[np.ndarray, str]], model_name: str = "m") -> bytes:
    header, chunks = protocol._response_parts(model_name, None, None, outputs, True, None)
    return b"".join([header, *chunks])


@pytest.mark.parametrize(
    "answers",
    [
        # shapes change from answer to answer: the header must follow
        [
            {"y": (np.ones((1, 4), np.float32), "FP32")},
            {"y": (np.ones((3, 4), np.float32), "FP32")},
        ],
        # BYTES: the same shape, other byte counts
        [
            {"t": (np.array([b"ab"], dtype=np.object_), "BYTES")},
            {"t": (np.array([b"abcdef"], dtype=np.object_), "BYTES")},
        ],
        # another datatype under the same name and shape
        [{"y": (np.ones((2,), np.float32), "FP32")}, {"y": (np.ones((2,), np.int32), "INT32")}],
    ],
)
def test_a_remembered_answer_header_is_the_one_each_answer_needs(
    answers: list[dict[str, tuple[np.ndarray, str]]],
) -> None:
    protocol._binary_answer_head.cache_clear()
    for _ in range(2):  # the second pass answers from the remembered headers
        for outputs in answers:
            body, length = _answer(outputs)
            assert body == _built_afresh(outputs)
            document = json.loads(body[:length])
            for entry, (array, _) in zip(document["outputs"], outputs.values(), strict=True):
                assert entry["shape"] == list(array.shape)


def test_answers_of_other_models_and_with_ids_are_not_mixed_up() -> None:
    protocol._binary_answer_head.cache_clear()
    outputs = {"y": (np.zeros((1, 2), np.float32), "FP32")}
    assert _answer(outputs, model_name="a")[0] == _built_afresh(outputs, "a")
    assert _answer(outputs, model_name="b")[0] == _built_afresh(outputs, "b")
    body, length = _answer(outputs, model_name="a", request_id="r-1")
    assert json.loads(body[:length])["id"] == "r-1"
    body, headers = protocol.encode_answer(
        model_name="a", model_version=None, request_id=None, outputs={}, binary=True
    )
    assert HEADER_LENGTH.lower().encode() not in dict(headers) and json.loads(body) == {
        "model_name": "a",
        "outputs": [],
    }


def test_remembered_answer_headers_are_bounded() -> None:
    protocol._binary_answer_head.cache_clear()
    for rows in range(protocol._ANSWER_HEADERS_MAX + 20):
        _answer({"y": (np.zeros((rows, 1), np.float32), "FP32")})
    assert protocol._binary_answer_head.cache_info().currsize == protocol._ANSWER_HEADERS_MAX
