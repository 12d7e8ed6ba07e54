"""End to end over gRPC: ``gpufaas up``'s KServe v2 GRPCInferenceService, called with an
unmodified ``tritonclient.grpc``. Mirrors the HTTP tests in ``test_local_mode.py``: the same
answers as torch, the same errors mapped to gRPC codes, and the server keeps serving."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from local_up import running_up
from test_local_mode import _expected
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from gpufaas.core.examples import EXAMPLES, FUNCTIONS, example_inputs
from gpufaas.scheduler.local import free_port

pytestmark = pytest.mark.slow

SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def grpc_client(server: str, grpc_port: int) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(server: str, grpc_port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


def _infer(
    client: tgrpc.InferenceServerClient, name: str, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    metadata = client.get_model_metadata(name, as_json=True)
    request = []
    for spec in metadata["inputs"]:
        array = inputs[spec["name"]]
        tensor = tgrpc.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    outputs = [tgrpc.InferRequestedOutput(o["name"]) for o in metadata["outputs"]]
    result = client.infer(name, request, outputs=outputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_matches_torch(
    grpc_client: tgrpc.InferenceServerClient, example_models_dir: Path, name: str
) -> None:
    inputs = example_inputs(name, batch=3)
    got = _infer(grpc_client, name, inputs)
    expected = _expected(name, inputs, example_models_dir)
    assert len(got) == len(expected)
    for actual, want in zip(got.values(), expected, strict=True):
        assert actual.shape == want.shape
        np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-5)


def test_typed_contents_are_accepted(channel: grpc.Channel) -> None:
    """A KServe client that sends ``contents`` instead of raw bytes gets the same answer."""
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    infer = channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    typed = pb.ModelInferRequest(model_name="tiny-mlp")
    tensor = typed.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    raw = pb.ModelInferRequest(model_name="tiny-mlp")
    raw.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    raw.raw_input_contents.append(x.tobytes())
    a, b = infer(typed, timeout=60), infer(raw, timeout=60)
    assert a.raw_output_contents == b.raw_output_contents
    assert [o.name for o in a.outputs] == ["y"] and list(a.outputs[0].shape) == [1, 4]


def test_server_and_model_metadata_and_readiness_agree(
    grpc_client: tgrpc.InferenceServerClient, server: str
) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.get_server_metadata(as_json=True)["name"] == "gpufaas"
    index = {m["name"]: m for m in grpc_client.get_model_repository_index(as_json=True)["models"]}
    assert set(index) == set(FUNCTIONS)
    http_index = {m["name"]: m for m in httpx.post(f"{server}/v2/repository/index").json()}
    for name in FUNCTIONS:
        http_ready = httpx.get(f"{server}/v2/models/{name}/ready").status_code == 200
        assert grpc_client.is_model_ready(name) is http_ready is True
        assert index[name]["state"] == http_index[name]["state"] == "READY"
        http_metadata = httpx.get(f"{server}/v2/models/{name}").json()
        grpc_metadata = grpc_client.get_model_metadata(name, as_json=True)
        for tensor in grpc_metadata["inputs"]:  # protobuf's JSON writes int64 as strings
            tensor["shape"] = [int(d) for d in tensor["shape"]]
        assert grpc_metadata["inputs"] == http_metadata["inputs"]
        assert grpc_metadata["platform"] == http_metadata["platform"]


def _code(error: InferenceServerException) -> str:
    return str(error.status())


def test_unknown_model_is_not_found(grpc_client: tgrpc.InferenceServerClient) -> None:
    tensor = tgrpc.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("no-such-model", [tensor])
    assert _code(info.value) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_metadata("no-such-model")
    assert _code(info.value) == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("shape", "datatype", "array", "needle"),
    [
        ([1, 15], "FP32", np.zeros((1, 15), np.float32), "shape"),
        ([1, 16], "INT32", np.zeros((1, 16), np.int32), "datatype"),
    ],
    ids=["wrong-shape", "wrong-datatype"],
)
def test_wrong_input_is_invalid_argument_naming_the_tensor(
    grpc_client: tgrpc.InferenceServerClient,
    shape: list[int],
    datatype: str,
    array: np.ndarray,
    needle: str,
) -> None:
    tensor = tgrpc.InferInput("x", shape, datatype)
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("tiny-mlp", [tensor])
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in info.value.message() and needle in info.value.message().lower()


def test_raw_contents_that_lie_about_size_are_invalid_argument(channel: grpc.Channel) -> None:
    infer = channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    request = pb.ModelInferRequest(model_name="tiny-mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\x00" * 63)  # 16 FP32 need 64 bytes
    with pytest.raises(grpc.RpcError) as info:
        infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 bytes" in (info.value.details() or "")


def test_malformed_protobuf_is_invalid_argument_and_serving_goes_on(
    channel: grpc.Channel, grpc_client: tgrpc.InferenceServerClient
) -> None:
    raw = channel.unary_unary(SERVICE + "ModelInfer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    inputs = example_inputs("tiny-mlp", batch=1)
    assert _infer(grpc_client, "tiny-mlp", inputs)["y"].shape == (1, 4)


def test_deadline_is_deadline_exceeded(channel: grpc.Channel) -> None:
    """The server's own deadline (Triton's ``timeout`` parameter, 1 us) passes while the request
    waits: DEADLINE_EXCEEDED from the gateway, not from the client's clock (it allows 60 s)."""
    infer = channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    request = pb.ModelInferRequest(model_name="tiny-mlp")
    request.parameters["timeout"].int64_param = 1
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        infer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in (info.value.details() or "")


def test_repository_unload_and_load(grpc_client: tgrpc.InferenceServerClient) -> None:
    grpc_client.unload_model("small-cnn")
    index = {m["name"]: m for m in grpc_client.get_model_repository_index(as_json=True)["models"]}
    assert index["small-cnn"]["state"] == "READY"  # servable: it loads on the next request
    grpc_client.load_model("small-cnn")
    assert grpc_client.is_model_ready("small-cnn")
    with pytest.raises(InferenceServerException) as info:
        grpc_client.load_model("nope")
    assert _code(info.value) == "StatusCode.NOT_FOUND"


# -- overload: RESOURCE_EXHAUSTED with retry information, UNAVAILABLE --------------------------


@pytest.fixture(scope="module")
def bounded_grpc(
    tmp_path_factory: pytest.TempPathFactory, example_models_dir: Path
) -> Iterator[int]:
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path_factory.mktemp("home")),
        "GPUFAAS_MODELS": str(example_models_dir),
    }
    port = free_port()
    args = [
        "--cpu-devices", "1", "--device-concurrency", "1", "--max-queue-per-device", "1",
        "--max-pending-per-function", "2", "--grpc-port", str(port),
    ]  # fmt: skip
    with running_up(args, env=env):
        yield port


def test_overload_is_resource_exhausted_with_retry_info(bounded_grpc: int) -> None:
    request = pb.ModelInferRequest(model_name="minilm")
    ids = np.full((8, 256), 1000, dtype=np.int64)
    for name in ("input_ids", "attention_mask"):
        request.inputs.add(name=name, datatype="INT64", shape=[8, 256])
        request.raw_input_contents.append(ids.tobytes())

    async def burst() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bounded_grpc}") as ch:
            infer = ch.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )

            async def one() -> tuple[grpc.StatusCode, object]:
                try:
                    await infer(request, timeout=120)
                    return grpc.StatusCode.OK, None
                except grpc.aio.AioRpcError as e:
                    return e.code(), e

            results = await asyncio.gather(*(one() for _ in range(8)))
        exhausted = [e for code, e in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert exhausted, [code for code, _ in results]
        status = rpc_status.from_call(exhausted[0])  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details)
        assert retry.retry_delay.seconds >= 1
        return [code for code, _ in results]

    codes = asyncio.run(burst())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.OK in codes  # every request got exactly one answer, some served
