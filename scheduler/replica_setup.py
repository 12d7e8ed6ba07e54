"""Making a gateway one of N replicas (docs/scheduling.md, "Scale-out"): the wiring of
:class:`~gpufaas.scheduler.replicas.Replicas` into a :class:`~gpufaas.scheduler.gateway.Gateway`
(its miss counter, its dispatcher's per-replica shares, recovery of a cut forward by its request
key at the GPU managers, membership and the merged use stream), peers from a static list or the
headless Service (``gpufaas gateway --peers`` / ``--peer-service``), and the replica's listening
sockets (its own port, and one shared with the others through SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from gpufaas.core import node as node_api
from gpufaas.core.sockets import listening_socket
from gpufaas.scheduler.forward_lane import (
    LANE_DEADLINE_KEY,
    LANE_PORT_KEY,
    ForwardAnswer,
    ForwardHead,
    ForwardListener,
    LaneAnswer,
    lane_headers,
)
from gpufaas.scheduler.peers import Membership
from gpufaas.scheduler.replicas import (
    Forwarding,
    OwnerDecision,
    Ownership,
    Replicas,
    ReplicaSlots,
)
from gpufaas.scheduler.transport import NodeReply

if TYPE_CHECKING:
    from gpufaas.scheduler.gateway import Gateway

__all__ = ["attach_replicas", "enable_replicas", "lane_answer", "serve_replica"]

logger = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}


def attach_replicas(
    gateway: Gateway,
    *,
    self_url: str,
    discover: Callable[[], Awaitable[list[str]]],
    token: str | None,
    ownership: Ownership = "leader",
    slots: ReplicaSlots = "full",
    forwarding: Forwarding = "request",
    forward_lane_port: int | None = 0,
) -> Replicas:
    """Make ``gateway`` one replica among those ``discover`` lists (``self_url`` is how they
    reach it). Heartbeats follow the gateway's sync interval. ``forward_lane_port``: serve the
    keyed-forward lane (:mod:`~gpufaas.scheduler.forward_lane`) on this port of ``self_url``'s
    host (0: an ephemeral one; None: no lane, peers forward here over HTTP) and advertise it,
    so that peers forward requests here over it."""
    if slots not in ("full", "share"):
        raise ValueError(f"slots must be 'full' or 'share', got {slots!r}")
    registry = gateway.metrics.registry
    lookups = gateway.metrics.cache
    max_queue = gateway.config.max_queue_per_device
    concurrency = gateway.config.device_concurrency

    def own_misses() -> float:
        # This counter alone: collecting the registry would call the cluster-misses gauge.
        return sum(
            sample.value
            for family in lookups.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels.get("result") == "miss"
        )

    def on_members(live: int) -> None:
        # Each replica's share of a device's queue, so that together they keep near the bound.
        # Slots: 'full' lets each replica run as many on a device as one gateway would, and the
        # GPU manager (which sees every replica) admits at most the bound cluster-wide; 'share'
        # splits them, ceil(bound / live), which keeps the manager's FIFO empty but queues a
        # replica's hits behind its own loads while the device has free slots.
        dispatcher = gateway.dispatcher
        share = max(1, math.ceil(concurrency / live))
        dispatcher.concurrency = concurrency if slots == "full" else share
        dispatcher.max_queue = max(1, math.ceil(max_queue / live))

    async def recover(key: str) -> NodeReply | None:
        """The answer of a keyed request from whichever healthy GPU manager ran it, or runs
        it (it waits for a run in flight); None when none did."""
        path = node_api.REQUEST_ANSWER.format(key=key)
        wait_s = gateway.config.node_timeout_s

        async def ask(client: httpx.AsyncClient) -> NodeReply | None:
            try:
                response = await client.get(path, params={"wait_s": wait_s}, timeout=wait_s + 5)
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            headers = {k.lower(): v for k, v in response.headers.items()}
            return NodeReply(status=200, headers=headers, body=response.content)

        nodes = [n for n in gateway.cluster.nodes.values() if n.healthy]
        answers = await asyncio.gather(*(ask(n.client) for n in nodes))
        return next((a for a in answers if a is not None), None)

    lane = (
        ForwardListener(
            lane_answer(gateway),
            token=token,
            max_body_bytes=gateway.config.limits.max_body_bytes,
        )
        if forward_lane_port is not None
        else None
    )

    def heartbeat() -> dict[str, object]:
        report: dict[str, object] = {"misses": own_misses(), "at": time.time()}
        if lane is not None and lane.port is not None:
            report[LANE_PORT_KEY] = lane.port
            report[LANE_DEADLINE_KEY] = True  # its heads' fifth line, the time left, is read
        return report

    membership = Membership(self_url=self_url, discover=discover, token=token, heartbeat=heartbeat)

    def decide(name: str, tried: frozenset[str], size_bytes: int) -> OwnerDecision:
        # The gateway's own routing decision (its policy, view, loads and residency policy's
        # victims), as for a request of its own; popularity is not observed (a peer's request
        # was counted where its client sent it: the caller marks the task forwarded-in). A
        # model whose size this replica never learnt (it dispatched none of its loads and none
        # was resident at a sync) takes the asker's: sized 0, its load was planned with no
        # victims, and the GPU manager evicted by its own LRU order what one gateway would have
        # chosen by value (nineteenth session, bench/RESULTS.md #16).
        _learn_size(gateway.model_bytes, name, size_bytes, replace=False)
        decision = gateway._route(name, exclude=set(tried))
        return OwnerDecision(decision.device, tuple(decision.victims))

    def order_to(
        device_key: str,
    ) -> tuple[str, Callable[[bytes], Coroutine[Any, Any, NodeReply]]] | None:
        # A load the owner decided for a peer, ordered at the device's GPU manager.
        device = gateway.cluster.devices.get(device_key)
        if device is None:
            return None
        node = device.node
        return device.device_id, lambda body: gateway.lanes.post(
            node, node_api.LOAD_ORDER, body, _JSON
        )

    def observe_requests(model: str, count: int) -> None:
        for _ in range(count):
            gateway.estimates.observe_request(model)
        if gateway.prefetch is not None:  # the owner's arrival model sees the peers' requests
            gateway.prefetch.observe_relayed(model, count)

    def observe_load(model: str, size: int, load_ms: float) -> None:
        # A peer's answer to a load this replica decided for it: the load's time and the
        # model's size on the device, as the GPU manager reported them (as from an answer of
        # its own: learn_from_reply).
        _learn_size(gateway.model_bytes, model, size, replace=True)
        gateway.estimates.observe_load(model, size_bytes=size, load_ms=load_ms)

    def lost_requests(requests: Mapping[str, int], reason: object) -> None:
        if gateway.prefetch is not None:
            gateway.prefetch.lost_relay(requests, reason)

    replicas = Replicas(
        membership=membership,
        directory=gateway.cluster.directory,
        registry=registry,
        own_misses=own_misses,
        on_members=on_members,
        token=token,
        known_size=gateway.model_bytes.get,
        ownership=ownership,
        recover=recover,
        observe_requests=observe_requests,
        observe_load=observe_load,
        forwarding=forwarding,
        decide=decide,
        lost_requests=lost_requests,
        order_to=order_to,
        # httpx needs a task from its first step; the pooled transport writes at once
        order_eagerly=gateway.lanes.transport != "httpx",
    )
    gateway.replicas = replicas

    async def run(stop: asyncio.Event) -> None:
        await replicas.run(stop, interval_s=gateway.config.sync_interval_s)

    if lane is not None:  # first: listening before this replica's first heartbeat answers
        listener, host = lane, urlsplit(self_url).hostname or "127.0.0.1"
        port = forward_lane_port or 0
        gateway.background.append(lambda stop: listener.serve(stop, host=host, port=port))
    gateway.background.append(run)
    return replicas


def _learn_size(sizes: dict[str, int], model: str, size_bytes: int, *, replace: bool) -> None:
    """Note ``model``'s size on a device in ``sizes`` (a gateway's ``model_bytes``), if it is
    one (> 0): over a size known already only with ``replace`` (a GPU manager's report of it,
    not a peer's hearsay)."""
    if size_bytes > 0 and (replace or model not in sizes):
        sizes[model] = size_bytes


def lane_answer(gateway: Gateway) -> ForwardAnswer:
    """The owner's answer to a call a peer forwarded over the lane: the gateway's own HTTP
    inference path, in the call's task, admitted as forwarded with its request key (so it is
    decided here, never forwarded again, and its key goes on to the GPU manager)."""
    from gpufaas.scheduler.gateway import answer_infer

    async def answer(head: ForwardHead, body: bytes) -> LaneAnswer:
        replicas = gateway.replicas
        if replicas is not None:
            replicas.admit(head.model, forwarded_by=head.sender, request_key=head.key)

        async def read() -> bytes:
            return body

        return await answer_infer(gateway, head.model, read, lane_headers(head))

    return answer


def enable_replicas(
    gateway: Gateway,
    *,
    self_url: str,
    peers: Sequence[str] = (),
    peer_service: str | None = None,
    namespace: str = "default",
    ownership: Ownership = "leader",
    slots: ReplicaSlots = "full",
    forwarding: Forwarding = "request",
    forward_lane_port: int | None = 0,
) -> Replicas:
    """``gpufaas gateway --peers`` / ``--peer-service``: the replicas from a static list or
    from the gateways' headless Service. Peers authenticate with ``GPUFAAS_PEER_TOKEN`` (in
    Kubernetes the admin token, which every replica has)."""
    from gpufaas.scheduler.peers import kubernetes_peers, static_peers

    discover = (
        kubernetes_peers(namespace=namespace, service=peer_service)
        if peer_service
        else static_peers(peers)
    )
    token = os.environ.get("GPUFAAS_PEER_TOKEN") or os.environ.get("GPUFAAS_ADMIN_TOKEN") or None
    return attach_replicas(
        gateway,
        self_url=self_url,
        discover=discover,
        token=token,
        ownership=ownership,
        slots=slots,
        forwarding=forwarding,
        forward_lane_port=forward_lane_port,
    )


def serve_replica(
    *,
    gateway: Gateway,
    host: str,
    port: int,
    shared_port: int | None,
    grpc_port: int | None = None,
    own: socket.socket | None = None,
    own_grpc: socket.socket | None = None,
) -> None:
    """Serve on ``port`` (this replica's own: peers and tests reach it there; ``own``, a socket
    already listening there, if given) and, if given, on ``shared_port`` together with the
    other replicas; gRPC too unless ``grpc_port`` is None (on ``own_grpc`` if given). As
    ``scheduler.main.serve`` otherwise (the gateway's HTTP front, uvloop)."""
    from gpufaas.scheduler.main import serve_on

    sockets = [own if own is not None else listening_socket(host, port, shared=False)]
    if shared_port is not None:
        sockets.append(listening_socket(host, shared_port, shared=True))
    logger.info(
        "gateway replica on http://%s:%d%s (policy %s)",
        host,
        port,
        f" and the shared port {shared_port}" if shared_port is not None else "",
        gateway.policy.name,
    )
    serve_on(gateway=gateway, host=host, sockets=sockets, grpc_port=grpc_port, grpc_socket=own_grpc)
