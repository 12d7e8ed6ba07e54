"""What the scale-out unit tests share: a replica whose one peer owns every function."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from gpufaas.cache import ClusterDirectory
from gpufaas.scheduler.peers import Membership, static_peers
from gpufaas.scheduler.replicas import Replicas

SELF = "http://a"


def replica_with_owner(
    url: str,
    *,
    heartbeat: Callable[[httpx.Request], Awaitable[httpx.Response]] | None,
    devices: Sequence[str] = ("n/0",),
    **options: Any,
) -> Replicas:
    """The replica at ``SELF`` with one reachable peer at ``url`` that owns every function
    (so every placement goes to it); ``heartbeat`` answers the peer's heartbeats, if given."""
    directory = ClusterDirectory()
    for device in devices:
        directory.add_device(device, capacity_bytes=100, node="n")
    membership = Membership(self_url=SELF, discover=static_peers([SELF, url]))
    membership.adopt([SELF, url])
    peer = membership.peers[url]
    peer.reachable = True
    if heartbeat is not None:
        peer.client = httpx.AsyncClient(base_url=url, transport=httpx.MockTransport(heartbeat))
    replicas = Replicas(
        membership=membership,
        directory=directory,
        registry=CollectorRegistry(),
        own_misses=lambda: 0.0,
        forward_probe_s=0.05,
        **options,
    )
    replicas.owner = lambda name: url  # type: ignore[method-assign]  # the peer places
    return replicas


async def close_replicas(replicas: Replicas) -> None:
    await replicas.calls.close()
    await replicas.membership.close()
