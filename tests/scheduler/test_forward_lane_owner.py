"""The owner's end of the keyed-forward lane (scheduler/forward_lane.py, replica_setup.py's
``lane_answer``) on a real gateway and a real GPU manager: a call that arrives over the lane is
decided here even where this replica's ring names another owner (it is never forwarded again),
counted as forwarded in, and its request key goes on to the manager, which runs the key once:
over HTTP, or over the manager's framed lane (the key in ``InferHead.request_key``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from tiny_manager import tiny_mlp_manager

from gpufaas.core.http import REQUEST_KEY_HEADER
from gpufaas.core.node import EXECUTIONS
from gpufaas.core.protocol import encode_request
from gpufaas.scheduler.forward_lane import ForwardHead, ForwardListener, ForwardPool
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.peers import static_peers
from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer

if TYPE_CHECKING:
    from gpufaas.scheduler.gateway import Gateway
    from gpufaas.scheduler.replicas import Replicas

SELF, PEER = "http://127.0.0.1:9", "http://127.0.0.1:10"


class KeySeen:
    """ASGI middleware in front of the manager: the request key of each infer call."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.keys: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            headers = dict(scope["headers"])
            key = headers.get(REQUEST_KEY_HEADER.encode())
            self.keys.append(None if key is None else key.decode())
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def owner_lane(gateway: Gateway) -> AsyncIterator[tuple[Replicas, ForwardPool]]:
    """``gateway`` as a replica whose ring names PEER the owner of every function, with its
    keyed-forward lane listening and a peer's pool to it; all closed on the way out."""
    replicas = attach_replicas(
        gateway, self_url=SELF, discover=static_peers([SELF, PEER]), token="t"
    )
    replicas.owner = lambda name: PEER  # type: ignore[method-assign]  # the ring says: PEER
    listener = ForwardListener(lane_answer(gateway), token="t", max_body_bytes=1 << 20)
    port = await listener.start(host="127.0.0.1")
    pool = ForwardPool(host="127.0.0.1", port=port, size=1, token="t")
    try:
        yield replicas, pool
    finally:
        await pool.close()
        await listener.close()
        await replicas.calls.close()
        await replicas.membership.close()
        await gateway.stop()


async def test_a_call_over_the_lane_is_decided_here_and_its_key_reaches_the_manager(
    tmp_path: Path, example_models_dir: Path
) -> None:
    seen: list[KeySeen] = []

    def wrap(app: Any) -> KeySeen:
        seen.append(KeySeen(app))
        return seen[-1]

    async with tiny_mlp_manager(tmp_path, example_models_dir, wrap=wrap) as (url, functions):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        body, headers = encode_request({"x": (np.ones((1, 16), np.float32), "FP32")})
        length = int(headers["Inference-Header-Content-Length"])
        async with owner_lane(gateway) as (replicas, pool):
            reply = await pool.forward(ForwardHead("tiny-mlp", "key-1", PEER, length), body)
            assert reply.status == 200, reply.body
            assert "x-gpufaas-owner-ms" in reply.headers  # answered as the owner
            assert seen[0].keys == ["key-1"]  # dispatched here, keyed; not forwarded to PEER
            assert replicas.metrics.forwarded_in._value.get() == 1
            assert sum(s.value for s in replicas.metrics.forwarded.collect()[0].samples) == 0


async def test_a_keyed_call_goes_over_the_managers_framed_lane_and_runs_once(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The same forward twice under one key (a forward cut after the owner dispatched, sent
    again): both reach the manager over its framed lane, not HTTP, and the manager runs the
    key once, as it does over HTTP (``RequestOnce``)."""
    seen: list[KeySeen] = []

    def wrap(app: Any) -> KeySeen:
        seen.append(KeySeen(app))
        return seen[-1]

    framed = tmp_path / "manager.sock"
    manager = tiny_mlp_manager(tmp_path, example_models_dir, wrap=wrap, framed_socket=framed)
    async with manager as (url, functions):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        assert gateway.cluster.nodes["node-0"].framed is not None  # the lane is offered
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        body, headers = encode_request({"x": (x, "FP32")}, request_id="r-1")
        head = ForwardHead(
            "tiny-mlp", "key-1", PEER, int(headers["Inference-Header-Content-Length"])
        )
        async with owner_lane(gateway) as (_, pool):
            first = await pool.forward(head, body)
            again = await pool.forward(head, body)
            assert first.status == again.status == 200, first.body
            assert again.body == first.body
            assert seen[0].keys == []  # no HTTP infer call: both went framed
            async with httpx.AsyncClient(base_url=url) as client:
                runs = (await client.get(EXECUTIONS)).json()["executions"]
            assert runs == {"r-1": 1}
