"""The gRPC handlers (``scheduler/grpc_server.py``) without a transport: the admin token on the
repository methods, malformed protobuf, each gateway error's code (with RetryInfo where the
gateway gives a retry hint), the deadline handed to ModelInfer, and no traceback ever."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2 as pb

from gpufaas.core.peerhttp import RawHeaders
from gpufaas.core.protocol import encode_answer
from gpufaas.scheduler.gateway import DeadlineExceeded, Overloaded, Unavailable, UnknownModel
from gpufaas.scheduler.grpc_h2 import RpcError
from gpufaas.scheduler.grpc_server import (
    _handler,
    infer_body,
    infer_response,
    infer_response_bytes,
)
from gpufaas.scheduler.transport import NodeReply


class FakeService:
    """Stands in for InferenceService: records calls, raises what it is told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, Any]] = []

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> Any:
        self.calls.append(("RepositoryIndex", request))
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name="m")])

    async def ModelInfer(self, request: pb.ModelInferRequest, *, timeout_ms: float | None) -> Any:
        self.calls.append(("ModelInfer", timeout_ms))
        if self.error is not None:
            raise self.error
        return pb.ModelInferResponse(model_name=request.model_name)


def _infer_bytes() -> bytes:
    return pb.ModelInferRequest(model_name="tiny").SerializeToString()


async def test_repository_methods_need_the_admin_token_when_one_is_set() -> None:
    service = FakeService()
    handle = _handler(service, "RepositoryIndex", admin_token="s3cret")  # type: ignore[arg-type]
    for metadata in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(RpcError) as info:
            await handle(b"", metadata, None)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert service.calls == []
    answer = await handle(b"", {"authorization": "Bearer s3cret"}, None)
    assert pb.RepositoryIndexResponse.FromString(answer).models[0].name == "m"
    infer = _handler(service, "ModelInfer", admin_token="s3cret")  # type: ignore[arg-type]
    assert await infer(_infer_bytes(), {}, None)  # inference needs no admin token


async def test_a_malformed_protobuf_is_invalid_argument_and_reaches_no_service() -> None:
    service = FakeService()
    handle = _handler(service, "ModelInfer", admin_token=None)  # type: ignore[arg-type]
    with pytest.raises(RpcError) as info:
        await handle(b"\x0a\xff\xff\xff\xff\x0f garbage", {}, None)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInferRequest" in info.value.message
    assert service.calls == []


async def test_the_call_deadline_becomes_the_gateway_timeout() -> None:
    service = FakeService()
    handle = _handler(service, "ModelInfer", admin_token=None)  # type: ignore[arg-type]
    await handle(_infer_bytes(), {}, 2.5)
    await handle(_infer_bytes(), {}, None)
    assert service.calls == [("ModelInfer", 2500.0), ("ModelInfer", None)]


@pytest.mark.parametrize(
    ("error", "code", "retry_s"),
    [
        (UnknownModel("no function 'x'"), grpc.StatusCode.NOT_FOUND, None),
        (Overloaded("queue full", retry_after_s=3), grpc.StatusCode.RESOURCE_EXHAUSTED, 3),
        (DeadlineExceeded("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED, None),
        (Unavailable("no device"), grpc.StatusCode.UNAVAILABLE, 1),
        (RuntimeError("boom\nTraceback (most recent call last)"), grpc.StatusCode.INTERNAL, None),
    ],
    ids=["404", "429", "504", "503", "unhandled"],
)
async def test_each_error_leaves_as_its_status(
    error: Exception, code: grpc.StatusCode, retry_s: int | None
) -> None:
    handle = _handler(FakeService(error), "ModelInfer", admin_token=None)  # type: ignore[arg-type]
    with pytest.raises(RpcError) as info:
        await handle(_infer_bytes(), {}, None)
    assert info.value.code == code
    assert "Traceback" not in info.value.message
    if retry_s is None:
        assert info.value.details is None
        return
    assert info.value.details is not None
    status = status_pb2.Status.FromString(info.value.details)
    retry = error_details_pb2.RetryInfo()
    assert status.code == code.value[0] and status.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == retry_s


# -- the ModelInfer body and answer, remembered by their shape ----------------------------------


def _answer(outputs: dict[str, np.ndarray], *, request_id: str | None = None) -> NodeReply:
    body, headers = encode_answer(
        model_name="m",
        model_version=None,
        request_id=request_id,
        outputs={k: (a, "FP32") for k, a in outputs.items()},
        binary=True,
    )
    return NodeReply(200, RawHeaders(headers), body)


@pytest.mark.parametrize("request_id", [None, "r-1"])
def test_a_written_answer_equals_the_protobuf_one_also_when_remembered(
    request_id: str | None,
) -> None:
    for seed in range(3):  # the first builds the remembered part, the others reuse it
        rng = np.random.default_rng(seed)
        outputs = {
            "y": rng.random((2, 4), dtype=np.float32),
            "z": rng.random((2, 200), dtype=np.float32),  # a length over one varint byte
        }
        reply = _answer(outputs, request_id=request_id)
        written = pb.ModelInferResponse.FromString(infer_response_bytes("m", reply))
        assert written == infer_response("m", reply)
        assert [np.frombuffer(c, "<f4").tolist() for c in written.raw_output_contents] == [
            a.reshape(-1).tolist() for a in outputs.values()
        ]


def test_a_json_answer_is_converted_as_before() -> None:
    body = b'{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[2],"data":[1,2]}]}'
    reply = NodeReply(200, {}, body)
    written = pb.ModelInferResponse.FromString(infer_response_bytes("m", reply))
    assert np.frombuffer(written.raw_output_contents[0], "<f4").tolist() == [1.0, 2.0]


def _request(x: np.ndarray, **parameters: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def test_request_bodies_of_one_shape_share_a_header_and_keep_their_own_bytes() -> None:
    bodies = [infer_body(_request(np.full((1, 3), v, np.float32))) for v in (1, 2)]
    (first, length), (second, again) = bodies
    assert length == again and first[:length] == second[:length]
    assert np.frombuffer(second[length:], "<f4").tolist() == [2.0, 2.0, 2.0]
    wider, wide_length = infer_body(_request(np.ones((1, 5), np.float32)))
    assert b"[1,5]" in wider[:wide_length]  # another shape: its own header
    with_parameter, p_length = infer_body(_request(np.ones((1, 3), np.float32), priority=3))
    assert b'"priority":3' in with_parameter[:p_length]  # parameters: never from memory
