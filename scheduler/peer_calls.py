"""Calls from one gateway replica to its peers: pooled connections, and owner calls that give up
on an owner that stops answering its heartbeat (see docs/scheduling.md, "Scale-out").

Placement questions and residency events go over the gateway's pooled HTTP/1.1 transport
(httptools), as requests to the GPU managers do: httpx would cost a forward about as much as the
rest of the hop. A forwarded request goes over the owner's keyed-forward lane
(:mod:`gpufaas.scheduler.forward_lane`: one frame each way on a persistent connection) when the
owner advertises one in its heartbeat, else over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from urllib.parse import urlsplit

from gpufaas.scheduler.forward_lane import LANE_DEADLINE_KEY, LANE_PORT_KEY, ForwardPool
from gpufaas.scheduler.peers import Membership
from gpufaas.scheduler.transport import NodePool, NodeReply

__all__ = ["OwnerHung", "PeerCalls"]


class OwnerHung(Exception):
    """The placement owner stopped answering its heartbeat while a call to it was in flight."""


class PeerCalls:
    """One pool of kept-alive connections per peer, and calls that probe a silent owner."""

    def __init__(self, *, membership: Membership, probe_s: float, token: str | None = None) -> None:
        self.membership = membership
        self.probe_s = probe_s
        self.token = token  # presented in each lane connection's HELLO
        self._pools: dict[str, NodePool] = {}
        self._lanes: dict[str, ForwardPool] = {}

    def pool(self, peer_id: str) -> NodePool:
        pool = self._pools.get(peer_id)
        if pool is None:
            pool = self._pools[peer_id] = NodePool(
                peer_id,
                size=64,
                headers=self.membership.auth_headers,
                timeout_s=self.membership.request_timeout_s,
                connect_timeout_s=2.0,
            )
        return pool

    def lane(self, peer_id: str) -> ForwardPool | None:
        """The peer's keyed-forward lane, if its last heartbeat advertised one (a pool made
        again when the port changes: a restarted peer)."""
        peer = self.membership.peer(peer_id)
        port = peer.report.get(LANE_PORT_KEY) if peer is not None else None
        if not isinstance(port, int) or isinstance(port, bool):
            return None
        lane = self._lanes.get(peer_id)
        if lane is not None and lane.port == port:
            return lane
        lane = self._lanes[peer_id] = ForwardPool(
            host=urlsplit(peer_id).hostname or "127.0.0.1",
            port=port,
            size=64,
            token=self.token,
            timeout_s=self.membership.request_timeout_s,
            connect_timeout_s=2.0,
        )
        return lane

    def lane_reads_deadline(self, peer_id: str) -> bool:
        """Whether the peer's last heartbeat said its lane reads a head's fifth line (the
        client's time left); an older replica's does not, and refuses one."""
        peer = self.membership.peer(peer_id)
        return peer is not None and peer.report.get(LANE_DEADLINE_KEY) is True

    def deadline_refused(self, peer_id: str) -> None:
        """The peer refused a head's fifth line although it advertised it (it restarted older
        on the same port): four lines to it until its next heartbeat says otherwise (each
        heartbeat replaces the report)."""
        peer = self.membership.peer(peer_id)
        if peer is not None:
            peer.report = {**peer.report, LANE_DEADLINE_KEY: False}

    async def call_owner(
        self, owner: str, path: str, body: bytes | memoryview, headers: Mapping[str, str]
    ) -> NodeReply:
        """POST to the owner, watched (:meth:`watched`). Raises ``NodeUnreachable`` as the
        pool does."""
        return await self.watched(owner, self.pool(owner).post(path, body, dict(headers)))

    async def watched(self, owner: str, call: Awaitable[NodeReply]) -> NodeReply:
        """``call`` to the owner; every ``probe_s`` without an answer its heartbeat is probed,
        and an owner that does not answer it is given up (:class:`OwnerHung`): a hung owner
        holds a placement for about ``probe_s`` plus the heartbeat timeout, not for a sync
        interval or the client's whole timeout."""
        sending = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=self.probe_s)
                if done:
                    return sending.result()
                if not await self.membership.probe(owner):
                    raise OwnerHung(f"the placement owner {owner} does not answer its heartbeat")
        finally:
            if not sending.done():
                sending.cancel()

    def drop(self, peer_id: str) -> None:
        """Forget ``peer_id``'s pools (their connections may hang with the peer)."""
        for pools in (self._pools, self._lanes):
            pool = pools.pop(peer_id, None)
            if pool is not None:
                task = asyncio.get_running_loop().create_task(pool.close())
                task.add_done_callback(lambda t: t.exception())

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
        await asyncio.gather(*(lane.close() for lane in self._lanes.values()))
        self._pools.clear()
        self._lanes.clear()
