"""Gateway scale-out: N replicas that schedule as one (see docs/scheduling.md, "Scale-out").

Each function has one *owner* among the live replicas (:class:`~gpufaas.scheduler.ring.Ring`,
rendezvous hashing over :class:`~gpufaas.scheduler.peers.Membership`). The owner makes every
residency decision for its functions; any replica serves a request whose model its view already
places on the chosen device. Per request, in the gateway:

1. :meth:`Replicas.admit` (at ingress): counts the request as owned or not, and carries the
   forwarded marker so that a forwarded request is never forwarded again.
2. The policy chooses a device as with one gateway. If the model is already there (resident or
   loading, as this replica's view says), the request is dispatched here: no hop.
3. Otherwise the decision would change residency, and :meth:`Replicas.place` sends the request
   to the function's owner (:class:`~gpufaas.scheduler.forwards.Forwards`), which decides with
   its own view (and the same code). If this replica is the owner, or the owner cannot be
   reached, it places the model here and publishes the load (device, model, size, victims) to
   every peer (:class:`~gpufaas.scheduler.residency_events.ResidencyEvents`, once the load is
   answered), which notes it in its own directory: the next request for the model, anywhere,
   finds it there.

So two replicas never load the same model blindly, a burst for a cold model waits for the one
load its owner started, and every replica's view of every device follows the others' loads
within milliseconds of their answers, not one sync interval. Cluster-wide per-device
concurrency is enforced by the GPU managers (``gpu_manager/admission.py``), which see every
replica's requests; each replica bounds its own device queues to its share of
``max_queue_per_device``.

Faults: a peer that fails to connect is marked unreachable at once and leaves the ring (its
functions move to the others); the request that found it dead is placed here instead, so it
is answered once. A replica that reaches no peer owns everything: it schedules locally and says
so (``gpufaas_replica_mode`` and ``/v2/health/ready``). Heartbeats every sync interval bring
peers back and pick up membership changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge

from gpufaas.cache import ClusterDirectory
from gpufaas.core import node as node_api
from gpufaas.core.http import (
    REQUEST_KEY_HEADER,
    install_token_auth,
    match_fast_post,
    token_auth,
)
from gpufaas.scheduler.forwards import (
    FORWARD_MS_HEADER,
    FORWARDED_HEADER,
    Forwards,
    LoadOrdering,
    OrderTo,
    OwnerDecision,
    Placement,
    PlacementAnswers,
    keyed_call,
)
from gpufaas.scheduler.lanes import NodeCall
from gpufaas.scheduler.peer_calls import PeerCalls
from gpufaas.scheduler.peers import (
    EVENTS_PATH,
    HEARTBEAT_PATH,
    PEER_PATHS,
    PLACE_PATH,
    Membership,
)
from gpufaas.scheduler.residency_events import ResidencyEvents, note_peer_loads
from gpufaas.scheduler.ring import Ring
from gpufaas.scheduler.transport import NodeReply
from gpufaas.scheduler.uses import UseStream

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


logger = logging.getLogger(__name__)

# How often an unreachable peer is probed again (a reachable one: every sync interval).
UNREACHABLE_PROBE_S = 1.0

__all__ = [
    "FORWARDED_HEADER",
    "FORWARD_MS_HEADER",
    "OWNER_MS_HEADER",
    "Forwarding",
    "OwnerDecision",
    "Ownership",
    "Placement",
    "ReplicaSlots",
    "Replicas",
]

_FORWARDED_HEADER_BYTES = FORWARDED_HEADER.encode()
# On a forwarded request's answer, with FORWARD_MS_HEADER (the sender's wall time for the
# forward): the owner's own part (its ingress to the start of its answer), in milliseconds.
OWNER_MS_HEADER = "x-gpufaas-owner-ms"
_MODES = ("single", "coordinated", "degraded", "local")
# leader: one replica (the ring's owner of this key) places every model, as one gateway would;
# function: each function's owner places it (decisions spread, but owners race for devices).
Ownership = Literal["leader", "function"]
# What a replica sends the placement owner for a placement. decision: only the question (which
# device, which victims); the owner decides, notes and publishes the load, and answers with the
# decision, and the sender dispatches the request itself (the body and the answer never pass
# through the owner). request: the whole request; the owner decides and dispatches it, and its
# answer is relayed (a forward cut after the owner dispatched is recovered by its request key).
Forwarding = Literal["decision", "request"]
_PLACEMENT_KEY = "\x00placement"
# True while a request forwarded by a peer is handled here (set by Replicas.admit, per request).
_FORWARDED_IN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gpufaas_forwarded_in", default=False
)
# When a forwarded request reached this replica's ingress (perf_counter), per request.
_FORWARDED_AT: contextvars.ContextVar[float] = contextvars.ContextVar(
    "gpufaas_forwarded_at", default=0.0
)
# A placement the owner decided for this request (forwarding "decision"): the question's wall
# time here and the owner's own, in ms (OWNER_MS_HEADER, FORWARD_MS_HEADER), the device, model.
_ASKED: contextvars.ContextVar[tuple[float, float, str, str] | None] = contextvars.ContextVar(
    "gpufaas_asked", default=None
)
# The request key a peer forwarded with the request (x-gpufaas-request-key), per request: it
# goes on to the GPU manager, which runs a key once (gpu_manager/admission.py RequestOnce).
_REQUEST_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gpufaas_request_key", default=None
)
_REQUEST_KEY_BYTES = REQUEST_KEY_HEADER.encode()
# slots: each replica's share of a device's concurrency. full: every replica may use all of a
# device's slots, and the GPU manager's admission (which sees every replica) is the bound;
# share: ceil(bound / live replicas) each (before #16's second pass; it queues a replica's hits
# behind its own loads while the device has free slots).
ReplicaSlots = Literal["full", "share"]
# A forward that has not answered after this long makes the replica ask whether the owner still
# answers heartbeats; one that does not is given up (the request is placed here).
FORWARD_PROBE_S = 1.0


class ReplicaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.owned = Counter(
            "gpufaas_replica_owned_requests",
            "Requests received for functions this replica owns (forwarded ones included)",
            registry=registry,
        )
        self.forwarded = Counter(
            "gpufaas_replica_forwarded_requests",
            "Requests this replica sent to the function's owner (a residency decision)",
            ["peer"],
            registry=registry,
        )
        self.lane_forwards = Counter(
            "gpufaas_replica_lane_forwards",
            "Of the forwarded requests, those sent over the owner's keyed-forward lane (one "
            "frame each way; the rest went over HTTP)",
            registry=registry,
        )
        self.forwarded_in = Counter(
            "gpufaas_replica_forwarded_in_requests",
            "Requests a peer forwarded here as the function's owner",
            registry=registry,
        )
        self.forward_failures = Counter(
            "gpufaas_replica_forward_failures",
            "Forwards that failed to reach the owner (the request was placed here instead)",
            registry=registry,
        )
        self.recovered = Counter(
            "gpufaas_replica_recovered_requests",
            "Forwards that failed after the owner may have dispatched them, answered by a GPU "
            "manager that ran them (by request key) instead of running them again",
            registry=registry,
        )
        self.events = Counter(
            "gpufaas_replica_residency_events",
            "Residency events (loads, and demotions) published to peers, or applied from them",
            ["direction"],
            registry=registry,
        )
        self.mode = Gauge(
            "gpufaas_replica_mode",
            "1 for this replica's coordination mode: single, coordinated, degraded (some peers "
            "unreachable), local (no peer reachable: scheduling alone)",
            ["mode"],
            registry=registry,
        )
        self.peers = Gauge(
            "gpufaas_replica_peers", "Peers by reachability", ["state"], registry=registry
        )
        self.load_orders = Counter(
            "gpufaas_replica_load_orders",
            "Loads this replica, as the placement owner, ordered at a GPU manager as it answered "
            "a peer's question (forwarding decision), by the node's result (started, present, "
            "busy) or refused, failed, unknown-device",
            ["result"],
            registry=registry,
        )
        self.cluster_misses = Gauge(
            "gpufaas_replica_cluster_misses",
            "Device-cache misses seen by every replica together (this one, plus each peer's "
            "last heartbeat)",
            registry=registry,
        )


class Replicas:
    """One gateway replica: ownership, where a placement is made (here or through the owner),
    the per-request context, metrics and the peer routes."""

    def __init__(
        self,
        *,
        membership: Membership,
        directory: ClusterDirectory,
        registry: CollectorRegistry,
        own_misses: Callable[[], float],
        on_members: Callable[[int], None] = lambda live: None,
        flush_delay_s: float = 0.002,
        token: str | None = None,
        known_size: Callable[[str], int | None] = lambda model: None,
        ownership: Ownership = "leader",
        recover: Callable[[str], Awaitable[NodeReply | None]] | None = None,
        forward_probe_s: float = FORWARD_PROBE_S,
        observe_requests: Callable[[str, int], None] = lambda model, count: None,
        observe_load: Callable[[str, int, float], None] = lambda model, size, load_ms: None,
        forwarding: Forwarding = "request",
        decide: Callable[[str, frozenset[str], int], OwnerDecision] | None = None,
        lost_requests: Callable[[Mapping[str, int], object], None] = lambda requests, why: None,
        order_to: OrderTo | None = None,
        order_eagerly: bool = True,
    ) -> None:
        if ownership not in ("leader", "function"):
            raise ValueError(f"ownership must be 'leader' or 'function', got {ownership!r}")
        if forwarding not in ("decision", "request"):
            raise ValueError(f"forwarding must be 'decision' or 'request', got {forwarding!r}")
        self.ownership: Ownership = ownership
        self.forwarding: Forwarding = forwarding
        self.membership = membership
        self.token = token
        self.known_size = known_size
        self.directory = directory
        self.own_misses = own_misses
        self.on_members = on_members
        self.ring = Ring([membership.self_id])
        self.metrics = ReplicaMetrics(registry)
        self.calls = PeerCalls(membership=membership, probe_s=forward_probe_s, token=token)
        # With forwarding "decision" (and the GPU managers to order at), each load it decides
        # for a peer is ordered at the device's manager as it answers (LoadOrdering).
        ordering = (
            LoadOrdering(to=order_to, counted=self.metrics.load_orders, eager=order_eagerly)
            if forwarding == "decision" and order_to is not None
            else None
        )
        # Placements sent to the owner: the request, or the question where it goes.
        self.forwards = Forwards(
            membership=membership,
            directory=directory,
            calls=self.calls,
            forwarded=self.metrics.forwarded,
            lane_forwards=self.metrics.lane_forwards,
            failures=self.metrics.forward_failures,
            recovered=self.metrics.recovered,
            lost=self._lost,
            recover=recover,
        )
        # Loads placed here, published to the peers, and the merged stream (this replica's
        # requests and hits for whoever decides evictions); the peers' applied here.
        self.events = ResidencyEvents(
            membership=membership,
            directory=directory,
            calls=self.calls,
            uses=UseStream(
                directory=directory,
                observe_requests=observe_requests,
                # A peer's report of a load is the load's whole time, also when its request
                # joined a load this replica ordered (the manager reports the load's time, not
                # the request's wait: gpu_manager/runtime.py ``InferOutcome.load_ms``).
                observe_load=observe_load,
            ),
            counted=self.metrics.events,
            deciders=self._deciders,
            on_unreachable=self._unreachable,
            known_size=known_size,
            flush_delay_s=flush_delay_s,
            victims_of_noted=forwarding == "decision",
            lost_requests=lost_requests,
        )
        # As the owner, the peers' placement questions (forwarding "decision").
        self.answers = PlacementAnswers(
            directory=directory,
            events=self.events,
            decide=decide,
            asked=self._asked_in,
            orders=ordering,
        )
        self.metrics.cluster_misses.set_function(self.cluster_misses)
        self._update_ring()

    @property
    def self_id(self) -> str:
        return self.membership.self_id

    # -- ownership ---------------------------------------------------------------------------

    def _update_ring(self) -> None:
        live = self.membership.live()
        if self.ring.set_members(live):
            logger.info("gateway replicas now %s (%s)", sorted(live), self.membership.mode)
        self.on_members(len(live))
        for mode in _MODES:
            self.metrics.mode.labels(mode).set(1 if mode == self.membership.mode else 0)
        peers = self.membership.peers.values()
        reachable = sum(p.reachable for p in peers)
        self.metrics.peers.labels("reachable").set(reachable)
        self.metrics.peers.labels("unreachable").set(len(peers) - reachable)

    def _deciders(self) -> frozenset[str] | None:
        """The replicas that decide evictions (None: every one, with function ownership)."""
        return frozenset({self.owner("")}) if self.ownership == "leader" else None

    def owner(self, name: str) -> str:
        """The replica that makes ``name``'s residency decisions."""
        return self.ring.owner(name if self.ownership == "function" else _PLACEMENT_KEY)

    def admit(self, name: str, *, forwarded_by: str | None, request_key: str | None = None) -> None:
        """At ingress (:class:`_IngressMarker`, per request): count the request as owned or
        not, and remember for this request's task whether a peer forwarded it here (and the
        request key it carries)."""
        if forwarded_by:
            self.metrics.forwarded_in.inc()
            _FORWARDED_IN.set(True)  # this request's own task: see forwarded_in
            _FORWARDED_AT.set(time.perf_counter())
            if request_key:
                _REQUEST_KEY.set(request_key)
        if forwarded_by or self.owner(name) == self.self_id:
            self.metrics.owned.inc()

    def forwarded_in(self) -> bool:
        """Whether a peer forwarded the request this task serves. Such a request was counted
        at the replica that received it: each replica's ingress is a fair sample of the
        cluster's stream, and counting it again at the owner would inflate exactly the models
        that miss (only placements are forwarded)."""
        return _FORWARDED_IN.get()

    def begin(self, name: str, call: NodeCall) -> NodeCall:
        """At the start of the gateway's request path (HTTP and gRPC alike): count a client's
        inference request for the peers (:class:`UseStream`), and return ``call`` with the
        request key a peer forwarded with this request, if any: the GPU manager then runs it at
        most once, even if the sender, its forward failed, sends it again (:meth:`place`)."""
        if not _FORWARDED_IN.get() and call.path.endswith("/infer"):
            self.events.requested(name)
        key = _REQUEST_KEY.get()
        if key is None or call.headers.get(REQUEST_KEY_HEADER) == key:
            return call
        return keyed_call(call, key)  # over HTTP or the manager's framed lane, run once

    def answered(self, reply: NodeReply) -> NodeReply:
        """``reply`` as this replica answers it: a forwarded request's answer says how long
        the owner (this replica) held it (:data:`OWNER_MS_HEADER`); one whose placement the
        owner decided, how long the question took here and at the owner. Load events held
        for this answer may go to the peers now (:meth:`ResidencyEvents.settled`)."""
        self.events.settled()
        asked = _ASKED.get()
        if asked is not None:
            forward_ms, owner_ms, device_key, name = asked
            self.events.loaded(device_key, name, reply)
            stamps = {FORWARD_MS_HEADER: f"{forward_ms:.3f}", OWNER_MS_HEADER: f"{owner_ms:.3f}"}
        elif _FORWARDED_IN.get():
            took_ms = (time.perf_counter() - _FORWARDED_AT.get()) * 1000
            stamps = {OWNER_MS_HEADER: f"{took_ms:.3f}"}
        else:
            return reply
        return dataclasses.replace(reply, headers={**reply.headers, **stamps})

    def touched(self, device_key: str, name: str) -> None:
        """A request for ``name`` was dispatched here to ``device_key`` as a hit: the peers
        mark it used there too (their LRU orders follow every replica's hits)."""
        self.events.touched(device_key, name)

    def _owner_elsewhere(self, name: str) -> str | None:
        if _FORWARDED_IN.get():
            return None  # the sender chose us as the owner: decide here, whatever our ring says
        owner = self.owner(name)
        return None if owner == self.self_id else owner

    async def place(
        self,
        name: str,
        device_key: str,
        *,
        call: NodeCall,
        size_bytes: int,
        victims: Sequence[str],
        tried: frozenset[str] = frozenset(),
        deadline: float | None = None,
    ) -> Placement:
        """A decision that loads ``name`` on ``device_key``: the owner's answer (forwarding
        ``request``) or decision (``decision``) if another replica owns the placement;
        otherwise no answer, the call to dispatch here, and the load is published. ``tried``:
        devices this request already failed on, which the owner must not choose. ``deadline``:
        the client's (monotonic), carried to the owner with a forwarded request or a
        question; raises :class:`~gpufaas.scheduler.forwards.DeadlinePassed` when it passes
        first."""
        owner = self._owner_elsewhere(name)
        # Only inference is forwarded (the owner's gateway serves the same call); an admin load
        # is placed where it lands.
        if owner is not None and call.path.endswith("/infer"):
            if self.forwarding == "decision":
                asked = await self.forwards.ask(
                    owner, name, size_bytes=size_bytes, tried=tried, deadline=deadline
                )
                if asked is not None:  # the owner noted and published the load
                    decided = asked.decided
                    _ASKED.set((asked.forward_ms, asked.owner_ms, decided.device, name))
                    # Noted here as the owner's event would note it (every victim it planned),
                    # before the request goes: the event itself then finds it noted and is
                    # skipped, and a view that noted only the hint kept models the GPU
                    # manager evicted (stale hits, with forwarding "decision").
                    load = {"device": decided.device, "model": name, "size": size_bytes}
                    note_peer_loads(
                        self.directory,
                        [{**load, "victims": list(decided.planned)}],
                        known_size=self.known_size,
                    )
                    return Placement(reply=None, call=call, decided=decided)
                forward_failed = True
            else:
                forwarded = await self.forwards.forward(owner, call, deadline=deadline)
                if forwarded.reply is not None:
                    return forwarded
                call, forward_failed = forwarded.call, forwarded.forward_failed
            self.events.publish_load(device_key, name, size_bytes=size_bytes, victims=victims)
            return Placement(reply=None, call=call, forward_failed=forward_failed)
        self.events.publish_load(device_key, name, size_bytes=size_bytes, victims=victims)
        return Placement(reply=None, call=call)

    def _asked_in(self) -> None:
        """A peer's placement question is being answered in this task: it counts as a
        forwarded-in request (and its popularity was counted where its client sent it)."""
        self.metrics.forwarded_in.inc()
        self.metrics.owned.inc()
        _FORWARDED_IN.set(True)

    def _lost(self, owner: str, reason: object) -> None:
        self.metrics.forward_failures.inc()
        self._unreachable(owner, reason)

    def _unreachable(self, peer_id: str, reason: object) -> None:
        """``peer_id`` failed a call: forget its connections, and take it off the ring until
        its heartbeat answers again."""
        self.calls.drop(peer_id)
        if self.membership.mark_unreachable(peer_id, reason):
            self._update_ring()

    # -- membership --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, interval_s: float) -> None:
        """Heartbeats every ``interval_s`` and the event flusher, until ``stop`` is set.

        While a peer is unreachable it is probed every :data:`UNREACHABLE_PROBE_S` instead: a
        replica that started a moment after this one (or came back) must not wait a whole
        sync interval, with the two replicas disagreeing about the placement owner meanwhile.
        """
        flusher = asyncio.create_task(self.events.flush_forever(), name="gpufaas-replica-events")
        try:
            while not stop.is_set():
                await self.membership.refresh()
                self._update_ring()
                lost = any(not p.reachable for p in self.membership.peers.values())
                wait_s = min(interval_s, UNREACHABLE_PROBE_S) if lost else interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait_s)
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self.calls.close()
            await self.membership.close()

    def cluster_misses(self) -> float:
        peers = self.membership.peers.values()
        return self.own_misses() + sum(float(p.report.get("misses", 0)) for p in peers)

    def health(self) -> dict[str, Any]:
        placement: dict[str, str] = {"placement": self.ownership}
        if self.ownership == "leader":
            placement["placement_owner"] = self.owner("")
        return {**self.membership.health(), **placement}

    # -- HTTP --------------------------------------------------------------------------------

    def ingress(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the ingress marker (:meth:`admit` for each inference request; the
        peers' residency events answered without FastAPI); it must be the outermost layer,
        ahead of the gateway's own fast path. With a token, peer paths need it here too."""
        marked: ASGIApp = _IngressMarker(app, replicas=self)
        if self.token:
            marked = token_auth(
                marked,
                token=self.token,
                protect=lambda path: path.startswith(PEER_PATHS),
                realm="the gateway's peer API",
            )
        return marked

    def install(self, app: FastAPI) -> None:
        """The peer routes (heartbeat, events); with a token, peers must present it."""
        if self.token:
            install_token_auth(
                app,
                token=self.token,
                protect=lambda path: path.startswith(PEER_PATHS),
                realm="the gateway's peer API",
            )

        @app.get(HEARTBEAT_PATH)
        async def heartbeat() -> JSONResponse:
            return JSONResponse(self.membership.heartbeat())

        @app.post(EVENTS_PATH)
        async def events(request: Request) -> Response:  # served by the ingress; for the docs
            return await self.events.receive(request.body)

        @app.post(PLACE_PATH)
        async def place(request: Request) -> Response:  # served by the ingress; for the docs
            return await self.answers.receive(request.body)


_EVENTS_PATH = re.compile("^" + re.escape(EVENTS_PATH) + "$")
_PLACE_PATH = re.compile("^" + re.escape(PLACE_PATH) + "$")
_MAX_PLACE_BYTES = 64 << 10
_MAX_EVENTS_BYTES = 16 << 20


class _IngressMarker:
    """Pure ASGI middleware (no task of its own, so the context variable it sets is the
    request's): :meth:`Replicas.admit` for every inference request."""

    def __init__(self, app: ASGIApp, *, replicas: Replicas) -> None:
        self.app = app
        self.replicas = replicas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            post = match_fast_post(scope, receive, path=_EVENTS_PATH, max_bytes=_MAX_EVENTS_BYTES)
            if post is not None:
                response = await self.replicas.events.receive(post.read)
                await response(scope, receive, send)
                return
            post = match_fast_post(scope, receive, path=_PLACE_PATH, max_bytes=_MAX_PLACE_BYTES)
            if post is not None:
                response = await self.replicas.answers.receive(post.read)
                await response(scope, receive, send)
                return
            found = node_api.MODEL_INFER_PATH.match(scope["path"])
            if found is not None:
                marker = key = b""
                for header, value in scope["headers"]:
                    if header == _FORWARDED_HEADER_BYTES:
                        marker = value
                    elif header == _REQUEST_KEY_BYTES:
                        key = value
                self.replicas.admit(
                    found.group("name"),
                    forwarded_by=marker.decode() or None,
                    request_key=key.decode() or None,
                )
        await self.app(scope, receive, send)
