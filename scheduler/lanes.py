"""The gateway's lanes to the GPU managers: how one call reaches the device the policy chose.

Per node, a pool of kept-alive HTTP connections (:class:`NodePool`) and, where the node offers
it, its framed lane (:class:`FramedPool`: over the node's Unix socket when that socket is on this
host, else its framed TCP port). An inference call takes the framed lane when it can; every other
call, and every call when ``transport`` says so, goes over HTTP. With ``transport`` ``inprocess``,
an inference call to a node that runs in this process (:meth:`NodeLanes.attach`, the contract in
:mod:`gpufaas.core.colocated`) is a call of the node's answer function, the framed lane's call and
answer without the frame; other nodes' calls go framed. The policy has decided the device, and the
dispatcher admitted the call, before it gets here: the lane never changes where a request runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from gpufaas.core.colocated import InferNode
from gpufaas.core.eager import resume
from gpufaas.core.frames import FramedEndpoint, InferHead
from gpufaas.core.http import DEVICE_HEADER, EVICT_FIRST_HEADER, format_evict_first
from gpufaas.core.peerhttp import RawHeaders
from gpufaas.scheduler.cluster import Node
from gpufaas.scheduler.transport import FramedPool, NodePool, NodeReply, NodeUnreachable

__all__ = ["NodeCall", "NodeLanes"]

_Pool = TypeVar("_Pool", NodePool, FramedPool)


@dataclass(frozen=True, slots=True)
class NodeCall:
    """One call to a GPU manager: the path, the body as the client sent it, and its headers."""

    path: str
    body: bytes | memoryview = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    # An inference call: what the node's framed lane carries instead of the path and headers.
    infer: InferHead | None = None


class NodeLanes:
    """Every node's connections, made on first use and sized to what its devices run at once."""

    def __init__(
        self,
        *,
        transport: str,
        device_concurrency: int,
        timeout_s: float,
        token: str | None,
    ) -> None:
        self.transport = transport
        self.device_concurrency = device_concurrency
        self.timeout_s = timeout_s
        self.token = token
        self.http: dict[str, NodePool] = {}  # node name -> its hot-path connections
        self.framed: dict[str, FramedPool] = {}  # node name -> its framed lane, if it has one
        self._framed_for: dict[str, FramedEndpoint] = {}  # what each framed pool was made for
        # node name -> its answer function, for a node on this process's loop ("inprocess")
        self.colocated: dict[str, InferNode] = {}

    def attach(self, node_name: str, answer: InferNode) -> None:
        """Take ``node_name``'s inference calls in-process (with ``transport`` ``inprocess``)."""
        self.colocated[node_name] = answer

    def send(
        self, node: Node, device_id: str, call: NodeCall, *, victims: Sequence[str]
    ) -> Coroutine[Any, Any, NodeReply]:
        """``call`` to ``device_id`` on ``node``, with the policy's eviction hints: the chosen
        lane's coroutine, to await (no coroutine layer of its own per call)."""
        evict = format_evict_first(victims) if victims else ""
        if call.infer is not None and self.transport == "inprocess":
            local = self.colocated.get(node.name)
            if local is not None:  # the node on this loop: its answer function, no frame
                model, _, header_length, _, key = call.infer
                head = InferHead(model, device_id, header_length, evict, key)
                return self._in_process(local, head, call.body)
        if (
            call.infer is not None
            and node.framed is not None
            and self.transport in ("framed", "inprocess")
        ):
            framed = self.framed_pool(node, node.framed)
            if framed is not None:  # the node's framed lane: no HTTP at either end
                model, _, header_length, _, key = call.infer
                head = InferHead(model, device_id, header_length, evict, key)
                return framed.infer(head, call.body)
        headers = {**call.headers, DEVICE_HEADER: device_id}
        if evict:
            headers[EVICT_FIRST_HEADER] = evict
        return self.post(node, call.path, call.body, headers)

    async def _in_process(
        self, answer: InferNode, head: InferHead, body: bytes | memoryview
    ) -> NodeReply:
        """As a framed call: an answer whatever its status, or :class:`NodeUnreachable` when
        none comes within ``timeout_s`` (the node's work is cancelled then, where over the
        wire the node would finish it unread).

        The node's answer runs at once, up to its first wait: a warm small model's never waits
        (its forward pass runs inline), and then there is no timer to arm and cancel (an
        ``asyncio.timeout`` costs ~5 µs a call here). One that waits (a load, a batch, a pass on
        a worker thread) goes on in a task of its own, bounded by ``timeout_s``."""
        call = answer(head, body)
        try:
            waiting = call.send(None)
        except StopIteration as finished:
            status, raw, content = finished.value
        else:
            rest = asyncio.get_running_loop().create_task(resume(call, waiting))
            try:
                status, raw, content = await asyncio.wait_for(rest, self.timeout_s)
            except TimeoutError:
                raise NodeUnreachable(f"no answer within {self.timeout_s:.1f} s") from None
        return NodeReply(status, RawHeaders(raw), bytes(content))

    async def post(
        self, node: Node, path: str, body: bytes | memoryview, headers: Mapping[str, str]
    ) -> NodeReply:
        if self.transport == "httpx":
            try:
                response = await node.client.post(path, content=bytes(body), headers=headers)
            except httpx.TransportError as e:
                raise NodeUnreachable(str(e)) from None
            return NodeReply(response.status_code, response.headers, response.content)
        return await self.http_pool(node).post(path, body, headers)

    def _size(self, node: Node) -> int:
        # As many kept-alive connections as the node's devices run requests at once.
        return max(1, len(node.devices)) * self.device_concurrency

    def http_pool(self, node: Node) -> NodePool:
        pool = self.http.get(node.name)
        if pool is None or pool.size < self._size(node):
            pool = NodePool(
                node.url,
                size=self._size(node),
                headers={
                    k: v for k, v in node.client.headers.items() if k.lower() == "authorization"
                },
                timeout_s=self.timeout_s,
            )
            self._replace(self.http, node.name, pool)
        return pool

    def framed_pool(self, node: Node, endpoint: FramedEndpoint) -> FramedPool | None:
        """The node's framed pool: over its Unix socket when that socket is on this host, else
        its framed TCP port; None when it has neither that this gateway can reach."""
        pool = self.framed.get(node.name)
        made_for = self._framed_for.get(node.name)
        if pool is not None and (made_for is endpoint or made_for == endpoint):
            return pool  # the endpoint it was made for: no file-system check per call
        unix_path = (
            endpoint.unix_path
            if endpoint.unix_path and os.path.exists(endpoint.unix_path)
            else None
        )
        where = (unix_path, None if unix_path else endpoint.tcp_port)
        if pool is not None and (pool.unix_path, pool.port) == where:
            self._framed_for[node.name] = endpoint
            return pool
        if where == (None, None):
            return None
        pool = FramedPool(
            unix_path=unix_path,
            host=None if unix_path else urlsplit(node.url).hostname,
            port=None if unix_path else endpoint.tcp_port,
            size=self._size(node),
            token=self.token,
            timeout_s=self.timeout_s,
        )
        self._replace(self.framed, node.name, pool)
        self._framed_for[node.name] = endpoint
        return pool

    @staticmethod
    def _replace(pools: dict[str, _Pool], name: str, pool: _Pool) -> None:
        old = pools.get(name)
        pools[name] = pool
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())

    async def forget_absent(self, nodes: Collection[str]) -> None:
        """Close the lanes of nodes no longer in the cluster."""
        for pools in (self.http, self.framed):
            for name in [n for n in pools if n not in nodes]:
                await pools.pop(name).close()
        for name in [n for n in self._framed_for if n not in nodes]:
            del self._framed_for[name]
        # self.colocated stays: a co-located node lives as long as this process

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.http.values()))
        await asyncio.gather(*(pool.close() for pool in self.framed.values()))
        self.http.clear()
        self.framed.clear()
        self._framed_for.clear()
