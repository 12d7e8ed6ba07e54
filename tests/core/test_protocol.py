"""The Open Inference Protocol codec: interop with tritonclient, round trips, and every bad body."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpufaas.core import protocol
from gpufaas.core.api import TensorSpec, parse_spec
from gpufaas.core.peerhttp import RawHeaders
from gpufaas.core.protocol import (
    DATATYPE_TO_NUMPY,
    HEADER_LENGTH,
    DecodedRequest,
    InferenceRequest,
    InferenceResponse,
    Limits,
    ModelMetadata,
    ProtocolError,
    bf16_bits_to_float32,
    decode_request,
    decode_response,
    encode_answer,
    encode_request,
    float32_to_bf16_bits,
    numpy_to_datatype,
    parse_header_length,
    validate_inputs,
    validate_outputs,
)

Client = triton.InferenceServerClient
DATATYPES = list(DATATYPE_TO_NUMPY)
JSON_DATATYPES = [d for d in DATATYPES if d != "BF16"]  # tritonclient sends BF16 only in binary


def sample(datatype: str, shape: tuple[int, ...], *, utf8: bool = True) -> np.ndarray:
    """A deterministic array of `datatype` in the form tritonclient wants it."""
    rng = np.random.default_rng(abs(hash((datatype, shape))) % 2**32)
    n = int(np.prod(shape))
    if datatype == "BYTES":
        words = [f"w{i}-é".encode() if utf8 else bytes([i % 256, 0xFF]) for i in range(n)]
        return np.array(words, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if datatype == "BF16":
        return (rng.standard_normal(shape) * 100).astype(ml_dtypes.bfloat16)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def as_ours(array: np.ndarray, datatype: str) -> np.ndarray:
    """tritonclient's array as this codec represents it (BF16 as raw uint16 bits)."""
    return array.view(np.uint16) if datatype == "BF16" else array


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == np.object_:
        assert actual.dtype == np.object_
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.dtype == expected.dtype
        assert actual.tobytes() == expected.tobytes()  # bit-exact, NaN payloads included


# --- tritonclient -> decode_request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "binary"),
    [(d, True) for d in DATATYPES] + [(d, False) for d in JSON_DATATYPES],
    ids=[f"{d}-binary" for d in DATATYPES] + [f"{d}-json" for d in JSON_DATATYPES],
)
def test_decodes_tritonclient_requests(datatype: str, binary: bool) -> None:
    expected = sample(datatype, (2, 3))
    tensor = triton.InferInput("x", [2, 3], datatype)
    tensor.set_data_from_numpy(expected, binary_data=binary)
    empty = triton.InferInput("empty", [0, 4], "FP32")
    empty.set_data_from_numpy(np.zeros((0, 4), np.float32), binary_data=binary)
    body, json_size = Client.generate_request_body([tensor, empty], request_id="r-1")

    decoded = decode_request(body, header_length=json_size)

    assert decoded.id == "r-1"
    assert list(decoded.inputs) == ["x", "empty"]
    assert decoded.datatypes == {"x": datatype, "empty": "FP32"}
    assert_same(decoded.inputs["x"], as_ours(expected, datatype))
    assert decoded.inputs["empty"].shape == (0, 4)
    assert decoded.inputs["x"].flags.writeable and decoded.inputs["x"].flags.aligned
    # No outputs listed: tritonclient asks for all of them in binary.
    assert decoded.requested_outputs is None
    assert decoded.binary_outputs is True


def test_requested_outputs_and_parameters_from_tritonclient() -> None:
    tensor = triton.InferInput("x", [1], "INT64")
    tensor.set_data_from_numpy(np.array([7]), binary_data=False)
    outputs = [
        triton.InferRequestedOutput("a", binary_data=True),
        triton.InferRequestedOutput("b", binary_data=False),
    ]
    body, json_size = Client.generate_request_body(
        [tensor], outputs=outputs, priority=3, parameters={"custom": "yes"}
    )
    assert json_size is None  # all JSON: tritonclient sends no header length

    decoded = decode_request(body, header_length=json_size)

    assert decoded.requested_outputs == ["a", "b"]
    assert decoded.binary_outputs == {"a"}
    assert decoded.parameters == {"priority": 3, "custom": "yes"}
    assert decoded.id is None
    # The pydantic model accepts the same document.
    assert InferenceRequest.model_validate_json(body).inputs[0].name == "x"


def test_binary_data_output_default_is_overridden_per_output() -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    decoded = decode_request(body)
    assert decoded.binary_outputs == {"a"}
    assert decoded.parameters == {}


# --- encode_answer -> tritonclient -------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_parses_responses(datatype: str, binary: bool) -> None:
    ours = as_ours(sample(datatype, (3, 2)), datatype)
    body, raw = encode_answer(
        model_name="m",
        model_version="1",
        request_id="r-2",
        outputs={"y": (ours, datatype)},
        binary=binary,
    )
    headers = RawHeaders(raw)
    header_length = headers.get(HEADER_LENGTH.lower())
    assert (header_length is not None) == binary
    assert headers["content-type"] == ("application/octet-stream" if binary else "application/json")

    result = Client.parse_response_body(
        body, header_length=int(header_length) if header_length else None
    )

    got = result.as_numpy("y")
    assert result.get_response()["id"] == "r-2"
    assert result.get_response()["model_version"] == "1"
    if datatype == "BYTES" and not binary:
        assert got.tolist() == [[e.decode() for e in row] for row in ours.tolist()]
    else:
        assert_same(as_ours(got, datatype), ours)


def test_non_utf8_bytes_output_falls_back_to_binary() -> None:
    raw = sample("BYTES", (3,), utf8=False)
    text = np.array([b"ok"], dtype=np.object_)
    body, headers = encode_answer(
        model_name="m",
        model_version=None,
        request_id=None,
        outputs={"raw": (raw, "BYTES"), "text": (text, "BYTES")},
        binary=False,
    )
    length = RawHeaders(headers)[HEADER_LENGTH.lower()]
    result = Client.parse_response_body(body, header_length=int(length))
    assert result.as_numpy("raw").tolist() == raw.tolist()
    assert result.get_output("raw")["parameters"]["binary_data_size"] == 3 * (4 + 2)
    assert result.get_output("text")["data"] == ["ok"]


def test_json_special_floats_reach_tritonclient() -> None:
    values = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    body, _ = encode_answer(
        model_name="m",
        model_version=None,
        request_id=None,
        outputs={"y": (values, "FP32")},
        binary=False,
    )
    got = Client.parse_response_body(body).as_numpy("y")
    np.testing.assert_array_equal(got, values)
    assert np.signbit(got[3])


# --- our own round trips -----------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    if datatype == "BYTES":
        elements = st.binary(max_size=8)
        return draw(hnp.arrays(np.object_, shape, elements=elements)), datatype
    return draw(hnp.arrays(DATATYPE_TO_NUMPY[datatype], shape)), datatype


named_tensors = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), tensors(), min_size=1, max_size=4
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=named_tensors, request_id=st.none() | st.text(max_size=8))
def test_encode_request_decode_request_round_trip(
    inputs: dict[str, tuple[np.ndarray, str]], request_id: str | None
) -> None:
    body, headers = encode_request(inputs, request_id=request_id, outputs=["y"])
    decoded = decode_request(body, header_length=parse_header_length(headers[HEADER_LENGTH]))
    assert decoded.id == request_id
    assert decoded.datatypes == {name: datatype for name, (_, datatype) in inputs.items()}
    assert decoded.requested_outputs == ["y"]
    assert decoded.binary_outputs == {"y"}
    for name, (array, _) in inputs.items():
        assert_same(decoded.inputs[name], array)


def assert_same_values(actual: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    """Equal as values: JSON carries NaN but not its payload bits."""
    if datatype == "BF16":
        actual, expected = bf16_bits_to_float32(actual), bf16_bits_to_float32(expected)
    if expected.dtype.kind == "f":
        assert actual.dtype == expected.dtype or datatype == "BF16"
        np.testing.assert_array_equal(actual, expected)  # NaN == NaN here
        numbers = ~np.isnan(expected)  # JSON NaN has no sign or payload
        assert (np.signbit(actual[numbers]) == np.signbit(expected[numbers])).all()
    else:
        assert_same(actual, expected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outputs=named_tensors, binary=st.booleans())
def test_encode_answer_decode_response_round_trip(
    outputs: dict[str, tuple[np.ndarray, str]], binary: bool
) -> None:
    body, headers = encode_answer(
        model_name="m", model_version=None, request_id="i", outputs=outputs, binary=binary
    )
    header_length = parse_header_length(RawHeaders(headers).get(HEADER_LENGTH.lower()))
    response, arrays = decode_response(body, header_length=header_length)
    assert response.id == "i"
    assert [o.name for o in response.outputs] == list(outputs)
    for name, (array, datatype) in outputs.items():
        assert_same_values(arrays[name], array, datatype)


def test_nested_and_flat_json_data_are_both_accepted() -> None:
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    for data in (nested, [1, 2, 3, 4, 5, 6, 7, 8]):
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [2, 2, 2], "datatype": "INT32", "data": data}]}
        ).encode()
        array = decode_request(body).inputs["x"]
        assert array.dtype == np.int32
        assert array.tolist() == nested


def test_bf16_json_input_rounds_to_nearest_even() -> None:
    values = np.array(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.14159, -2.5e-40, 3.4e38, np.inf, -np.inf, 1e-45],
        dtype=np.float32,
    )
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [len(values)], "datatype": "BF16", "data": values.tolist()}
            ]
        }
    ).encode()
    decoded = decode_request(body).inputs["x"]
    assert decoded.dtype == np.uint16
    assert decoded.tolist() == values.astype(ml_dtypes.bfloat16).view(np.uint16).tolist()


def test_bf16_conversion_matches_ml_dtypes() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=20_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        expected = values.astype(ml_dtypes.bfloat16)
    got = float32_to_bf16_bits(values)
    finite = np.isfinite(values)
    assert (got[finite] == expected.view(np.uint16)[finite]).all()
    assert np.isnan(bf16_bits_to_float32(got[np.isnan(values)])).all()
    assert (np.signbit(bf16_bits_to_float32(got)) == np.signbit(values)).all()


def test_encode_request_flags_outputs_and_parameters() -> None:
    x = np.ones((1, 2), np.float32)
    body, headers = encode_request(
        {"x": (x, "FP32")},
        outputs=["a", "b"],
        binary_outputs={"b"},
        parameters={"priority": 1},
    )
    assert headers["Content-Type"] == "application/octet-stream"
    decoded = decode_request(body, header_length=int(headers[HEADER_LENGTH]))
    assert decoded.requested_outputs == ["a", "b"]
    assert decoded.binary_outputs == {"b"}
    assert decoded.parameters == {"priority": 1}

    body, headers = encode_request({"x": (x, "FP32")}, binary_outputs=False)
    decoded = decode_request(body, header_length=int(headers[HEADER_LENGTH]))
    assert decoded.requested_outputs is None
    assert decoded.binary_outputs is False

    with pytest.raises(ValueError, match="needs the outputs"):
        encode_request({"x": (x, "FP32")}, binary_outputs={"a"})


def test_encoders_take_ml_dtypes_bf16_str_elements_and_big_endian() -> None:
    bf16 = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    words = np.array(["héllo", b"raw"], dtype=np.object_)
    big = np.array([1, 2, 3], dtype=">i4")
    body, headers = encode_request(
        {"b": (bf16, "BF16"), "w": (words, "BYTES"), "i": (big, "INT32")}
    )
    decoded = decode_request(body, header_length=int(headers[HEADER_LENGTH]))
    assert decoded.inputs["b"].tolist() == bf16.view(np.uint16).tolist()
    assert decoded.inputs["w"].tolist() == ["héllo".encode(), b"raw"]
    assert decoded.inputs["i"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.zeros(2, np.float64), "FP32"),
        (np.zeros(2, np.int32), "BYTES"),
        (np.array([1, b"x"], dtype=np.object_), "BYTES"),
        (np.zeros(2, np.complex64), "FP32"),
        (np.zeros(2, np.float32), "FLOAT"),
    ],
)
def test_encoding_a_mismatched_array_is_a_server_error(array: np.ndarray, datatype: str) -> None:
    with pytest.raises(ProtocolError, match="output 'y'") as info:
        encode_answer(
            model_name="m",
            model_version=None,
            request_id=None,
            outputs={"y": (array, datatype)},
            binary=True,
        )
    assert info.value.status_code == 500


def test_numpy_to_datatype() -> None:
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        if datatype != "BF16":
            assert numpy_to_datatype(dtype) == datatype
    assert numpy_to_datatype(np.dtype(">f4")) == "FP32"
    assert numpy_to_datatype(ml_dtypes.bfloat16) == "BF16"
    assert numpy_to_datatype(np.dtype("S3")) == "BYTES"
    with pytest.raises(ValueError, match="complex64"):
        numpy_to_datatype(np.complex64)


# --- bad bodies --------------------------------------------------------------------------------


def request(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def fp32(name: str = "x", shape: list[int] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "shape": [2, 3] if shape is None else shape, "datatype": "FP32", **fields}


SIX: dict[str, Any] = {"data": [1, 2, 3, 4, 5, 6]}
BIN24: dict[str, Any] = {"parameters": {"binary_data_size": 24}}
TINY = Limits(
    max_body_bytes=1000, max_elements=10, max_json_depth=8, max_inputs=2, max_bytes_element=4
)


def with_binary(header: bytes, binary: bytes) -> tuple[bytes, int]:
    return header + binary, len(header)


BAD_BODIES: list[tuple[str, bytes, int | None, Limits, int, list[str]]] = [
    ("malformed", b'{"inputs": [', None, Limits(), 400, ["malformed JSON"]),
    ("not an object", b"[1, 2]", None, Limits(), 400, ["JSON object"]),
    ("no inputs", b'{"id": "a"}', None, Limits(), 400, ["'inputs'"]),
    ("bad id", request(fp32(**SIX), id=5), None, Limits(), 400, ["'id'"]),
    (
        "wrong element count",
        request(fp32(data=[1, 2, 3, 4, 5])),
        None,
        Limits(),
        400,
        ["input 'x'", "shape [2, 3] needs 6 elements, got 5"],
    ),
    (
        "ragged nesting",
        request(fp32(data=[[1, 2, 3], [4, [5, 6]]])),
        None,
        Limits(),
        400,
        ["input 'x'", "mixes nested lists"],
    ),
    (
        "unknown datatype",
        request({"name": "x", "shape": [1], "datatype": "FLOAT32", "data": [1]}),
        None,
        Limits(),
        400,
        ["input 'x'", "unknown datatype 'FLOAT32'", "FP32"],
    ),
    (
        "negative dim",
        request(fp32(shape=[-1, 3], **SIX)),
        None,
        Limits(),
        400,
        ["input 'x'", "non-negative"],
    ),
    (
        "float dim",
        request(fp32(**SIX) | {"shape": [2.0, 3]}),
        None,
        Limits(),
        400,
        ["input 'x'", "shape"],
    ),
    (
        "no name",
        request({"shape": [1], "datatype": "FP32", "data": [1]}),
        None,
        Limits(),
        400,
        ["input #0"],
    ),
    ("no data", request(fp32()), None, Limits(), 400, ["input 'x'", "neither"]),
    (
        "string in FP32",
        request(fp32(data=[1, 2, 3, 4, 5, "6"])),
        None,
        Limits(),
        400,
        ["input 'x'", "FP32 data must be numbers, got string"],
    ),
    (
        "float in INT64",
        request({"name": "i", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}),
        None,
        Limits(),
        400,
        ["input 'i'", "must be integers, got number"],
    ),
    (
        "int in BOOL",
        request({"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, 1]}),
        None,
        Limits(),
        400,
        ["input 'b'", "true/false, got integer"],
    ),
    (
        "null in FP32",
        request(fp32(data=[1, 2, 3, 4, 5, None])),
        None,
        Limits(),
        400,
        ["input 'x'", "got null"],
    ),
    (
        "number in BYTES",
        request({"name": "s", "shape": [1], "datatype": "BYTES", "data": [1]}),
        None,
        Limits(),
        400,
        ["input 's'", "must be strings"],
    ),
    (
        "out of range",
        request({"name": "u", "shape": [1], "datatype": "UINT8", "data": [256]}),
        None,
        Limits(),
        400,
        ["input 'u'", "out of range for UINT8"],
    ),
    (
        "duplicate names",
        request(fp32(**SIX), fp32(**SIX)),
        None,
        Limits(),
        400,
        ["input 'x' appears more than once"],
    ),
    (
        "duplicate outputs",
        request(fp32(**SIX), outputs=[{"name": "y"}, {"name": "y"}]),
        None,
        Limits(),
        400,
        ["output 'y' appears more than once"],
    ),
    (
        "bad binary_data flag",
        request(fp32(**SIX), outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        None,
        Limits(),
        400,
        ["output 'y'", "binary_data"],
    ),
    (
        "shared memory",
        request(fp32(parameters={"shared_memory_region": "r"})),
        None,
        Limits(),
        400,
        ["input 'x'", "shared memory"],
    ),
    (
        "data and binary",
        *with_binary(request(fp32(**SIX, **BIN24)), bytes(24)),
        Limits(),
        400,
        ["input 'x'", "both"],
    ),
    (
        "binary size mismatch",
        *with_binary(request(fp32(parameters={"binary_data_size": 20})), bytes(20)),
        Limits(),
        400,
        ["input 'x'", "needs 24 bytes, binary_data_size is 20"],
    ),
    (
        "binary size past the end",
        *with_binary(request(fp32(**BIN24)), bytes(10)),
        Limits(),
        400,
        ["input 'x'", "runs past the end"],
    ),
    (
        "binary without header length",
        request(fp32(**BIN24)),
        None,
        Limits(),
        400,
        ["input 'x'", HEADER_LENGTH],
    ),
    (
        "unclaimed binary bytes",
        *with_binary(request(fp32(**BIN24)), bytes(30)),
        Limits(),
        400,
        ["6 bytes of binary data"],
    ),
    (
        "header length beyond body",
        request(fp32(**SIX)),
        10_000,
        Limits(),
        400,
        [HEADER_LENGTH, "beyond"],
    ),
    (
        "truncated BYTES element",
        *with_binary(
            request(
                {
                    "name": "s",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 9},
                }
            ),
            b"\x01\x00\x00\x00a\x09\x00\x00\x00",
        ),
        Limits(),
        400,
        ["input 's'", "element 1 claims 9 bytes"],
    ),
    (
        "BYTES count short",
        *with_binary(
            request(
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 5},
                }
            ),
            b"\x01\x00\x00\x00a",
        ),
        Limits(),
        400,
        ["input 's'", "ends before element 1 of 3"],
    ),
    (
        "BYTES extra bytes",
        *with_binary(
            request(
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 7},
                }
            ),
            b"\x01\x00\x00\x00abc",
        ),
        Limits(),
        400,
        ["input 's'", "2 bytes left over"],
    ),
    (
        "body too large",
        request(fp32(data=list(range(600)), shape=[600])),
        None,
        TINY,
        413,
        ["1000"],
    ),
    (
        "too many elements",
        request(fp32(shape=[3, 4], data=[0] * 12)),
        None,
        TINY,
        413,
        ["input 'x'", "12 elements", "limit of 10"],
    ),
    (
        "too many elements declared in binary",
        *with_binary(request(fp32(shape=[10**12, 10**12], **BIN24)), bytes(24)),
        Limits(),
        413,
        ["input 'x'"],
    ),
    (
        "BYTES element too large",
        request({"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hello"]}),
        None,
        TINY,
        413,
        ["input 's'", "5 bytes"],
    ),
    (
        "too many inputs",
        request(fp32("a", [1], data=[1]), fp32("b", [1], data=[1]), fp32("c", [1], data=[1])),
        None,
        TINY,
        400,
        ["3 inputs"],
    ),
    (
        "too deep",
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[[[[[1]]]]]]]]}]}',
        None,
        TINY,
        400,
        ["deeper than 8"],
    ),
    ("very deep", b"[" * 200_000 + b"]" * 200_000, None, Limits(), 400, ["deeper than 32"]),
    (
        "rank over the limit",
        request(fp32(shape=[1] * 17, data=[1])),
        None,
        Limits(),
        400,
        ["input 'x'", "17 dimensions"],
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "limits", "status", "fragments"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_requests_raise_protocol_errors(
    body: bytes, header_length: int | None, limits: Limits, status: int, fragments: list[str]
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(body, header_length=header_length, limits=limits)
    assert info.value.status_code == status
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.fixture(params=[1 << 20, 7], ids=["one-chunk", "tiny-chunks"])
def depth_chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The depth scan works in chunks; strings and brackets must survive chunk edges."""
    monkeypatch.setattr(protocol, "_DEPTH_CHUNK", request.param)


@pytest.mark.usefixtures("depth_chunk")
def test_depth_scan_ignores_brackets_inside_strings() -> None:
    tricky = ['[[[[[[[[[[{{{{{{{{{{"', 'a\\"[[[[[[[[[[[[', "]]]]]]]]]]]]]]"]
    body = request({"name": "s", "shape": [3], "datatype": "BYTES", "data": tricky})
    decoded = decode_request(body, limits=Limits(max_json_depth=6))
    assert decoded.inputs["s"].tolist() == [t.encode() for t in tricky]
    # ... yet still counts brackets outside strings after such a string.
    nested = request(
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ['"]]]]]]]]]]']},
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[[[1]]]]]]},
    )
    with pytest.raises(ProtocolError, match="deeper than 6"):
        decode_request(nested, limits=Limits(max_json_depth=6))


def test_long_names_are_cut_short_in_messages() -> None:
    body = request(fp32(name="n" * 10_000, data=[1]))
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert len(str(info.value)) < 300


def test_parse_header_length() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(" 12 ") == 12
    for bad in ("-1", "abc", "1.5", "١٢"):
        with pytest.raises(ProtocolError, match=HEADER_LENGTH):
            parse_header_length(bad)


def test_bad_responses_are_upstream_errors() -> None:
    with pytest.raises(ProtocolError, match="upstream error: boom") as info:
        decode_response(b'{"error": "boom"}', header_length=None)
    assert info.value.status_code == 502
    with pytest.raises(ProtocolError, match="output 'y'") as info:
        decode_response(
            b'{"model_name": "m", "outputs": [{"name": "y", "shape": [2], "datatype": "FP32", "data": [1]}]}',
            header_length=None,
        )
    assert info.value.status_code == 502
    with pytest.raises(ProtocolError, match="model_name") as info:
        decode_response(b'{"outputs": []}', header_length=None)
    assert info.value.status_code == 502


# --- validate_inputs ------------------------------------------------------------------------


SPECS = [
    TensorSpec(name="ids", datatype="INT64", shape=[-1, 8]),
    TensorSpec(name="mask", datatype="INT64", shape=[-1, 8]),
]


def decoded(**arrays: tuple[np.ndarray, str]) -> DecodedRequest:
    return DecodedRequest(
        id=None,
        inputs={name: array for name, (array, _) in arrays.items()},
        datatypes={name: datatype for name, (_, datatype) in arrays.items()},
        requested_outputs=None,
        binary_outputs=True,
        parameters={},
    )


def ints(*shape: int) -> tuple[np.ndarray, str]:
    return np.zeros(shape, np.int64), "INT64"


def test_validate_inputs_returns_arrays_in_spec_order() -> None:
    request = decoded(mask=ints(3, 8), ids=ints(3, 8))
    arrays = validate_inputs(request, SPECS, max_batch_size=4)
    assert list(arrays) == ["ids", "mask"]
    assert arrays["mask"] is request.inputs["mask"]


@pytest.mark.parametrize(
    ("inputs", "max_batch_size", "fragments"),
    [
        ({"ids": ints(1, 8)}, 0, ["missing input 'mask'", "INT64 [-1, 8]"]),
        (
            {"ids": ints(1, 8), "mask": ints(1, 8), "extra": ints(1)},
            0,
            ["unknown input 'extra'", "'ids'"],
        ),
        (
            {"ids": (np.zeros((1, 8), np.int32), "INT32"), "mask": ints(1, 8)},
            0,
            ["input 'ids'", "INT32", "INT64"],
        ),
        ({"ids": ints(8), "mask": ints(1, 8)}, 0, ["input 'ids'", "rank 1", "rank 2"]),
        (
            {"ids": ints(1, 7), "mask": ints(1, 8)},
            0,
            ["input 'ids'", "dimension 1 is 7", "takes 8"],
        ),
        (
            {"ids": ints(5, 8), "mask": ints(5, 8)},
            4,
            ["input 'ids'", "batch size 5", "maximum of 4"],
        ),
        ({"ids": ints(2, 8), "mask": ints(3, 8)}, 4, ["input 'mask'", "batch size 3", "'ids'"]),
    ],
)
def test_validate_inputs_rejects(
    inputs: dict[str, tuple[np.ndarray, str]], max_batch_size: int, fragments: list[str]
) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_inputs(decoded(**inputs), SPECS, max_batch_size=max_batch_size)
    assert info.value.status_code == 400
    for fragment in fragments:
        assert fragment in str(info.value)


def test_validate_outputs() -> None:
    specs = [
        TensorSpec(name="a", datatype="FP32", shape=[-1]),
        TensorSpec(name="b", datatype="FP32", shape=[1]),
    ]
    assert validate_outputs(None, specs) == ["a", "b"]
    assert validate_outputs(["b"], specs) == ["b"]
    with pytest.raises(ProtocolError, match="unknown output 'c'"):
        validate_outputs(["c"], specs)


def test_model_metadata_from_spec() -> None:
    spec = parse_spec(
        {
            "model": {"uri": "file:///m.pt", "format": "torchscript"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        }
    )
    metadata = ModelMetadata.from_spec("fn", spec, versions=["1"])
    assert metadata.model_dump() == {
        "name": "fn",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }
    assert InferenceResponse.model_validate({"model_name": "m", "outputs": []}).outputs == []


# -- the signature check's plain pass for the usual request (_fits) --------------------------------

_names_st = st.sampled_from(["a", "b", "c"])
_dims = st.lists(st.sampled_from([-1, 1, 2, 3]), max_size=3)
_spec_lists = st.lists(
    st.builds(TensorSpec, name=_names_st, datatype=st.sampled_from(["FP32", "INT64"]), shape=_dims),
    min_size=1,
    max_size=3,
    unique_by=lambda spec: spec.name,
)
_given_tensors = st.dictionaries(
    _names_st,
    st.tuples(st.sampled_from(["FP32", "INT64", None]), st.lists(st.integers(0, 4), max_size=3)),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(specs=_spec_lists, tensors=_given_tensors, max_batch_size=st.sampled_from([0, 2, 3]))
def test_the_plain_pass_agrees_with_the_full_signature_check(
    specs: list[TensorSpec], tensors: dict[str, tuple[str | None, list[int]]], max_batch_size: int
) -> None:
    fits = protocol._fits(tensors, specs, max_batch_size)
    with mock.patch.object(protocol, "_fits", lambda *_: False):  # the full check alone
        try:
            protocol.check_signature(tensors, specs, max_batch_size=max_batch_size)
        except ProtocolError:
            passes = False
        else:
            passes = True
    assert fits == passes
