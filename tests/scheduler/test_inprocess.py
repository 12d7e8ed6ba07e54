"""A gateway and a co-located GPU manager in one process (``--node-transport inprocess``).

The node is built the way ``gpufaas up`` builds it, through the entry point that
:mod:`gpufaas.core.colocated` resolves; a second gateway on the same node calls it over its
framed Unix socket, so each answer, error included, is compared with the framed lane's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gpufaas.core.api import InferenceFunction
from gpufaas.core.colocated import (
    Answer,
    ColocatedNode,
    ColocatedOptions,
    NoColocatedNode,
    colocated_node,
)
from gpufaas.core.commands import ManagerOptions
from gpufaas.core.frames import InferHead
from gpufaas.core.http import BATCH_SIZE_HEADER, CACHE_HEADER, REASON_HEADER
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.node import STATE, NodeState, Residency
from gpufaas.core.protocol import HEADER_LENGTH, decode_response, encode_request
from gpufaas.scheduler.gateway import (
    DeadlineExceeded,
    Gateway,
    GatewayConfig,
    Unavailable,
    answer_infer,
)
from gpufaas.scheduler.local import free_port
from gpufaas.scheduler.main import build_gateway

TOKEN = "colocated-secret"
BROKEN = """apiVersion: gpufaas.dev/v1alpha1
kind: InferenceFunction
metadata: {{name: broken}}
spec:
  model: {{uri: "file://{path}", format: torchscript}}
  inputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]
  outputs: [{{name: y, datatype: FP32, shape: [-1, 4]}}]
"""


def functions(models_dir: Path, tmp_path: Path) -> list[InferenceFunction]:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a TorchScript archive")
    (tmp_path / "broken.yaml").write_text(BROKEN.format(path=broken))
    return load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml", tmp_path / "broken.yaml"],
        variables={"GPUFAAS_MODELS": str(models_dir)},
    )


def tiny_request(rows: int = 1, *, value: float = 1.0) -> tuple[bytes, int]:
    x = np.full((rows, 16), value, dtype=np.float32)
    body, headers = encode_request({"x": (x, "FP32")}, binary_outputs=True)
    return body, int(headers[HEADER_LENGTH])


def output(body: bytes, headers: Any) -> np.ndarray:
    (y,) = decode_response(body, header_length=int(headers[HEADER_LENGTH.lower()]))[1].values()
    assert isinstance(y, np.ndarray)
    return y


class Both:
    """The co-located node, a gateway calling it in-process, and one calling it framed."""

    def __init__(self, node: ColocatedNode, inprocess: Gateway, framed: Gateway) -> None:
        self.node, self.inprocess, self.framed = node, inprocess, framed


def node_in_this_process(
    tmp_path: Path, *, cpu_devices: int, token: str | None = None
) -> ColocatedNode:
    """node-0 on CPU devices, built through the entry point as ``gpufaas up`` builds it."""
    return colocated_node(
        ColocatedOptions(
            name="node-0",
            host="127.0.0.1",
            port=free_port(),
            options=ManagerOptions(
                cpu_devices=cpu_devices,
                device_memory="1Gi",
                host_memory="1Gi",
                artifact_dir=tmp_path / "a",
            ),
            framed_socket=tmp_path / "node-0.sock",
            token=token,
        )
    )


@contextlib.asynccontextmanager
async def both(tmp_path: Path, models_dir: Path) -> AsyncIterator[Both]:
    node = node_in_this_process(tmp_path, cpu_devices=2, token=TOKEN)
    fns = functions(models_dir, tmp_path)
    gateways = []
    for transport in ("inprocess", "framed"):
        gateway = build_gateway(
            manager_urls={node.name: node.url},
            functions=fns,
            config=GatewayConfig(transport=transport),  # type: ignore[arg-type]
            manager_token=TOKEN,
        )
        gateways.append(gateway)
    gateways[0].lanes.attach(node.name, node.answer)
    await node.start()
    try:
        for gateway in gateways:
            await gateway.start()
        yield Both(node, *gateways)
    finally:
        for gateway in gateways:
            await gateway.stop()
        await node.stop()


async def committed(node: ColocatedNode, model: str) -> None:
    """Wait until the node has committed ``model``: a load's last step runs in the background
    after the first answer, and only then is the next request a hit."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=node.url, headers=auth, timeout=10) as client:
        for _ in range(1500):  # 30 s
            state = NodeState.model_validate_json((await client.get(STATE)).content)
            rows = [r for device in state.devices for r in device.residents]
            if any(r.model == model and r.state is Residency.RESIDENT for r in rows):
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"{model} was not committed on {node.name} within 30 s")


async def infer(
    gateway: Gateway, name: str, body: bytes, header_length: int | None, **kw: Any
) -> Any:
    return await gateway.infer(name, body, header_length=header_length, **kw)


async def test_an_inprocess_call_answers_as_the_framed_lane_and_no_frame_is_sent(
    tmp_path: Path, example_models_dir: Path
) -> None:
    body, length = tiny_request(value=0.5)
    async with both(tmp_path, example_models_dir) as s:
        await infer(s.inprocess, "tiny-mlp", body, length)  # the load
        await committed(s.node, "tiny-mlp")
        here = await infer(s.inprocess, "tiny-mlp", body, length)
        there = await infer(s.framed, "tiny-mlp", body, length)
        # In-process, nothing went over a socket; framed, the node's own socket served it.
        assert s.inprocess.lanes.framed == {} and s.inprocess.lanes.http == {}
        assert list(s.framed.lanes.framed) == ["node-0"]
    assert here.status == there.status == 200
    assert here.body == there.body
    assert here.headers[CACHE_HEADER] == there.headers[CACHE_HEADER] == "hit"
    assert set(here.headers) == set(there.headers)
    np.testing.assert_array_equal(
        output(here.body, here.headers), output(there.body, there.headers)
    )


async def test_the_policy_and_the_dispatcher_decide_every_inprocess_request(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """A path that called the node without the policy's decision or the dispatcher's admission
    (a shortcut in ``Gateway.infer`` or ``forward``) fails here."""
    body, length = tiny_request()
    async with both(tmp_path, example_models_dir) as s:
        gateway = s.inprocess
        decided: list[str] = []
        admitted: list[str] = []
        sent: list[str | None] = []
        choose, submit, answer = (
            gateway.policy.choose,
            gateway.dispatcher.submit,
            gateway.lanes.colocated["node-0"],
        )

        def spy_choose(*args: Any, **kwargs: Any) -> Any:
            decision = choose(*args, **kwargs)
            decided.append(decision.device)
            return decision

        async def spy_submit(key: str, job: Any, run: Callable[[], Awaitable[Any]]) -> Any:
            admitted.append(key)
            return await submit(key, job, run)

        async def spy_answer(call: InferHead, content: bytes | memoryview) -> Answer:
            sent.append(call.device)
            return await answer(call, content)

        gateway.policy.choose = spy_choose  # type: ignore[method-assign]
        gateway.dispatcher.submit = spy_submit  # type: ignore[method-assign]
        gateway.lanes.colocated["node-0"] = spy_answer
        replies = await asyncio.gather(
            *(infer(gateway, "tiny-mlp", body, length) for _ in range(6))
        )
    assert [r.status for r in replies] == [200] * 6
    assert len(decided) == len(admitted) == len(sent) == 6
    # The device the node was told to run on is the one the policy chose, every time.
    assert sorted(admitted) == sorted(decided)
    assert sorted(f"node-0/{device}" for device in sent) == sorted(decided)


async def test_errors_answer_as_over_the_framed_lane(
    tmp_path: Path, example_models_dir: Path
) -> None:
    body, length = tiny_request()
    async with both(tmp_path, example_models_dir) as s:
        outcomes: dict[str, list[tuple[int, str | None, str]]] = {}
        for label, gateway in (("inprocess", s.inprocess), ("framed", s.framed)):
            got = outcomes.setdefault(label, [])
            # a model that fails to load: the node's answer, passed through
            reply = await infer(gateway, "broken", body, length)
            got.append((reply.status, reply.headers.get(REASON_HEADER), "load"))
            # an output the model does not have: the node's 400
            wrong = json.dumps(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}
                    ],
                    "outputs": [{"name": "nope"}],
                }
            ).encode()
            reply = await infer(gateway, "tiny-mlp", wrong, None)
            got.append(
                (reply.status, reply.headers.get(REASON_HEADER), json.loads(reply.body)["error"])
            )
            # a deadline that passes before the call is sent: the gateway's 504
            with pytest.raises(DeadlineExceeded):
                await infer(gateway, "tiny-mlp", body, length, timeout_ms=1e-6)
            # and the server goes on serving
            assert (await infer(gateway, "tiny-mlp", body, length)).status == 200

            # the whole HTTP answer, as the front sends it
            async def read() -> bytes:
                return b"{not json"

            status, headers, _ = await answer_infer(gateway, "tiny-mlp", read, {})
            reason = dict(headers).get(REASON_HEADER.encode())  # the front's bytes
            got.append((status, reason.decode() if reason else None, "json"))
    assert outcomes["inprocess"] == outcomes["framed"]
    load, output_error, bad_json = outcomes["inprocess"]
    assert load[0] in (500, 502, 503) and load[1] == "ModelLoadFailed"
    assert output_error[0] == 400 and "nope" in output_error[2]
    assert bad_json[:2] == (400, "InvalidRequest")


async def test_requests_that_arrive_together_are_batched_inprocess(
    tmp_path: Path, example_models_dir: Path
) -> None:
    rows = [tiny_request(value=float(i)) for i in range(8)]
    async with both(tmp_path, example_models_dir) as s:
        alone = [await infer(s.framed, "tiny-mlp", b, n) for b, n in rows]
        replies = await asyncio.gather(*(infer(s.inprocess, "tiny-mlp", b, n) for b, n in rows))
    assert max(int(r.headers[BATCH_SIZE_HEADER]) for r in replies) > 1
    for one, batched in zip(alone, replies, strict=True):
        np.testing.assert_allclose(
            output(batched.body, batched.headers), output(one.body, one.headers), rtol=1e-5
        )


async def test_an_inprocess_node_that_never_answers_is_unreachable_and_called_down(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """As a framed call that times out: the node is marked down and the request fails over
    (here there is no other node: 503)."""
    body, length = tiny_request()
    called: list[InferHead] = []

    async def silent(call: InferHead, content: bytes | memoryview) -> Answer:
        called.append(call)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with both(tmp_path, example_models_dir) as s:
        gateway = s.inprocess
        gateway.lanes.attach("node-0", silent)
        gateway.lanes.timeout_s = 0.05
        with pytest.raises(Unavailable, match="no answer within"):
            await infer(gateway, "tiny-mlp", body, length)
        assert len(called) == 1 and not gateway.cluster.nodes["node-0"].healthy


async def test_the_node_guards_its_inprocess_answer_as_its_framed_listener(tmp_path: Path) -> None:
    """A body over the node's limit is the frame's 413; an error raised is a 500 naming it."""
    from gpufaas.gpu_manager.server import in_process_answer

    async def raises(call: InferHead, content: bytes | memoryview) -> Answer:
        raise KeyError("boom")

    guarded = in_process_answer(raises, max_body_bytes=8)
    status, headers, content = await guarded(InferHead("m"), b"123456789")
    assert status == 413 and (b"x-gpufaas-reason", b"InvalidFrame") in headers
    status, headers, content = await guarded(InferHead("m"), b"1234")
    assert status == 500 and json.loads(bytes(content)) == {"error": "internal error (KeyError)"}


def test_an_unknown_colocated_kind_is_named() -> None:
    with pytest.raises(NoColocatedNode, match=r"no co-located node .nope.*gpu-manager"):
        colocated_node(
            ColocatedOptions(name="n", host="127.0.0.1", port=1, options=ManagerOptions()),
            kind="nope",
        )
