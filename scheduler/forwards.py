"""A placement sent to the placement owner (scale-out, #16; see docs/scheduling.md,
"Scale-out", step 4): the whole request (forwarding ``request``) or only the question where
its model goes (forwarding ``decision``), and what a replica does when the owner cannot answer.

- **The request** goes under a fresh request key (``x-gpufaas-request-key``), over the owner's
  keyed-forward lane when it advertises one (:mod:`gpufaas.scheduler.forward_lane`), else over
  HTTP, so that a GPU manager runs it at most once: if the forward fails after the owner may have dispatched it,
  the managers are asked for the key's answer first, and only if none has it is the request
  placed here, under the same key.
- **The client's deadline** goes with the request as the time it has left (``X-Gpufaas-Timeout-Ms``
  over HTTP; the lane head's fifth line to an owner that advertises it, else four lines and a
  refused fifth resent with four), and the forward waits at most that plus
  :data:`DEADLINE_MARGIN_S` (the pool's own limit, the peers' request timeout, still holds).
  A deadline that passes first is :class:`DeadlinePassed` (the gateway's 504), not a failed
  owner: it stays on the ring, no key is recovered and nothing is placed here.
- **The question** (``POST /v2/gpufaas/peers/place``) carries the model, its size, the
  devices already tried and the client's time left (``timeout_ms``, bounding the wait as for a
  forward; an older owner ignores it); the owner answers with its decision, and the request is
  dispatched here. The owner never holds the request, so a question lost with its owner cannot make it
  run twice; an owner that is gone, hung, answers an error or names an unknown device means
  the request is placed here. The owner's side is :class:`PlacementAnswers`: it decides with
  the gateway's own code, notes the load in its view at once and publishes it, and, for a load,
  orders it at the device's GPU manager as it answers (:class:`LoadOrdering`;
  ``gpu_manager/load_orders.py``), so that the asker's request, one hop later, joins the load
  in flight instead of starting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter

from gpufaas.cache import ClusterDirectory, InsufficientCapacity, UnknownKey
from gpufaas.core.eager import start_eagerly
from gpufaas.core.http import REASON_HEADER, REQUEST_KEY_HEADER, TIMEOUT_HEADER, error_response
from gpufaas.core.node import LoadOrder, LoadOrderTaken
from gpufaas.core.protocol import ProtocolError
from gpufaas.scheduler.forward_lane import ForwardHead
from gpufaas.scheduler.lanes import NodeCall
from gpufaas.scheduler.peer_calls import OwnerHung, PeerCalls
from gpufaas.scheduler.peers import PLACE_PATH, Membership
from gpufaas.scheduler.policy import NoDevice
from gpufaas.scheduler.residency_events import ResidencyEvents
from gpufaas.scheduler.transport import NodeReply, NodeUnreachable

__all__ = [
    "DEADLINE_MARGIN_S",
    "FORWARDED_HEADER",
    "FORWARD_MS_HEADER",
    "Asked",
    "DeadlinePassed",
    "Forwards",
    "LoadOrdering",
    "OrderTo",
    "OwnerDecision",
    "Placement",
    "PlacementAnswers",
    "keyed_call",
]

logger = logging.getLogger(__name__)

# Set on a request a replica forwards to the function's owner; the owner never forwards it on.
FORWARDED_HEADER = "x-gpufaas-forwarded-by"
# On a forwarded request's answer (for clients and benchmarks, to see what the hop costs): the
# sender's wall time for the forward (send to answer), in milliseconds.
FORWARD_MS_HEADER = "x-gpufaas-forward-ms"
# A forward with a client deadline waits for the owner at most the time left plus this: the
# hop back, so that the owner's own answer (its 504 included) comes first where it can.
DEADLINE_MARGIN_S = 0.05


class DeadlinePassed(Exception):
    """The client's deadline passed before a forward was sent, or before the owner answered
    it. The owner is not at fault: it stays on the ring, and nothing is recovered or placed
    again (if it still runs the request, its key keeps a second run away)."""


@dataclass(frozen=True, slots=True)
class OwnerDecision:
    """The placement owner's decision for a peer's request (forwarding ``decision``): the
    device, and the victims the GPU manager evicts first if it loads the model there."""

    device: str
    victims: tuple[str, ...] = ()
    # Every victim the owner predicts for the load (the hint first, then its LRU order), as it
    # publishes them: the asker drops them from its own view, as a peer drops a published
    # load's (its LRU order differs from the owner's). Only ``victims`` go to the manager.
    planned: tuple[str, ...] = dataclasses.field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Placement:
    """What :meth:`Replicas.place` decided: the owner's answer (``reply``), or no answer and
    the call to dispatch here (with the request key a failed forward carried, if any)."""

    reply: NodeReply | None
    call: NodeCall
    forward_failed: bool = False  # the owner was not reached: placed here (misses.py's cause)
    # forwarding "decision": the owner's decision, to dispatch here (None: this replica's own)
    decided: OwnerDecision | None = None


@dataclass(frozen=True, slots=True)
class Asked:
    """The owner's answer to a placement question: its decision, the question's wall time
    here and the owner's own part of it (ms)."""

    decided: OwnerDecision
    forward_ms: float
    owner_ms: float


def keyed_call(call: NodeCall, key: str) -> NodeCall:
    """``call`` under a request key: in its headers (the manager's HTTP route) and in its framed
    head (``InferHead.request_key``: the manager's framed lane). A manager runs a key once
    whichever way it comes."""
    infer = None if call.infer is None else call.infer._replace(request_key=key)
    return NodeCall(call.path, call.body, {**call.headers, REQUEST_KEY_HEADER: key}, infer)


class Forwards:
    """One replica's placements sent to the owner: forwards and questions."""

    def __init__(
        self,
        *,
        membership: Membership,
        directory: ClusterDirectory,
        calls: PeerCalls,
        forwarded: Counter,
        failures: Counter,
        recovered: Counter,
        lane_forwards: Counter,
        lost: Callable[[str, object], None],
        recover: Callable[[str], Awaitable[NodeReply | None]] | None = None,
    ) -> None:
        self.membership = membership
        self.directory = directory
        self.calls = calls
        self.forwarded = forwarded  # gpufaas_replica_forwarded_requests{peer}
        self.lane_forwards = lane_forwards  # gpufaas_replica_lane_forwards
        self.failures = failures  # gpufaas_replica_forward_failures
        self.recovered = recovered  # gpufaas_replica_recovered_requests
        # The owner failed a call: counted as a failure, and taken off the ring.
        self.lost = lost
        # Ask the GPU managers for a request key's answer (after a forward that may have been
        # dispatched failed); None: nothing to ask.
        self.recover = recover

    async def forward(
        self, owner: str, call: NodeCall, *, deadline: float | None = None
    ) -> Placement:
        """Send ``call`` to the owner under a fresh request key; the owner's answer. If the
        forward fails (the owner is gone, its connection broke mid-request, or it stopped
        answering heartbeats), the owner may have dispatched the request already: the GPU
        managers are asked for the key's answer first (``recover``; a run in flight is waited
        for), and if none has it, the call comes back to be placed here, keeping the key, so
        that a manager that runs it, or ran it, answers it again instead of running it twice.

        ``deadline`` (monotonic): the client's; its time left goes to the owner, and the
        forward waits at most that plus :data:`DEADLINE_MARGIN_S`. Raises
        :class:`DeadlinePassed` when it has passed already (nothing is sent) or passes first."""
        peer = self.membership.peer(owner)
        if peer is None:
            return Placement(reply=None, call=call)
        left_ms = None if deadline is None else (deadline - time.monotonic()) * 1000
        if left_ms is not None and left_ms <= 0:
            raise DeadlinePassed(f"the deadline passed before the forward to {owner}")
        key = uuid.uuid4().hex
        # The owner's lane carries the key; so does HTTP; so does the call that comes back to
        # be placed here, to whichever manager lane it takes (keyed_call).
        keyed = keyed_call(call, key)
        self.forwarded.labels(owner).inc()
        started = time.perf_counter()
        try:
            if left_ms is None:
                reply = await self._send(owner, call, keyed, key, None)
            else:
                async with asyncio.timeout(left_ms / 1000 + DEADLINE_MARGIN_S) as waiting:
                    reply = await self._send(owner, call, keyed, key, left_ms)
        except TimeoutError:
            if left_ms is not None and waiting.expired():
                raise DeadlinePassed(
                    f"the deadline passed while the placement owner {owner} held the request"
                ) from None
            raise
        except (NodeUnreachable, OwnerHung) as e:
            # The owner is gone or hung, perhaps after it dispatched the request: a manager may
            # hold (or be computing) the answer under the key. Else serve here, under the key.
            self.lost(owner, e)
            recovered = await self.recover(key) if self.recover is not None else None
            if recovered is not None:
                self.recovered.inc()
                return Placement(reply=recovered, call=keyed)
            return Placement(reply=None, call=keyed, forward_failed=True)
        took_ms = f"{(time.perf_counter() - started) * 1000:.3f}"
        reply = dataclasses.replace(reply, headers={**reply.headers, FORWARD_MS_HEADER: took_ms})
        return Placement(reply=reply, call=keyed)

    async def _send(
        self, owner: str, call: NodeCall, keyed: NodeCall, key: str, left_ms: float | None
    ) -> NodeReply:
        """The forward itself, over the owner's lane (one frame each way) or HTTP, with the
        client's time left where there is one and the owner reads it."""
        infer = call.infer
        lane = self.calls.lane(owner) if infer is not None else None
        if lane is None or infer is None:
            headers = {**keyed.headers, FORWARDED_HEADER: self.membership.self_id}
            if left_ms is not None:  # every owner reads it: request_deadline
                headers[TIMEOUT_HEADER] = repr(left_ms)
            return await self.calls.call_owner(owner, call.path, call.body, headers)
        head = ForwardHead(infer.model, key, self.membership.self_id, infer.header_length)
        self.lane_forwards.inc()
        if left_ms is None or not self.calls.lane_reads_deadline(owner):
            return await self.calls.watched(owner, lane.forward(head, call.body))
        reply = await self.calls.watched(
            owner, lane.forward(head._replace(timeout_ms=left_ms), call.body)
        )
        if not _refused_frame(reply):
            return reply
        # It advertised the fifth line and refused it (restarted older on the same port): the
        # frame was refused before anything ran, so it goes again at once with four lines.
        self.calls.deadline_refused(owner)
        return await self.calls.watched(owner, lane.forward(head, call.body))

    async def ask(
        self,
        owner: str,
        name: str,
        *,
        size_bytes: int,
        tried: frozenset[str],
        deadline: float | None = None,
    ) -> Asked | None:
        """Ask the owner where ``name`` goes (forwarding ``decision``); its decision, or None
        when it cannot be used (the owner is gone or hung, answers with an error, or names a
        device this replica does not know): the request is then placed here. The owner never
        dispatches the request, so nothing can run twice.

        ``deadline`` (monotonic): the client's; its time left goes with the question
        (``timeout_ms``), and the question waits at most that plus :data:`DEADLINE_MARGIN_S`.
        Raises :class:`DeadlinePassed` when it has passed already (nothing is asked) or passes
        first (the owner is not at fault: it stays on the ring)."""
        peer = self.membership.peer(owner)
        if peer is None:
            return None
        left_ms = None if deadline is None else (deadline - time.monotonic()) * 1000
        if left_ms is not None and left_ms <= 0:
            raise DeadlinePassed(f"the deadline passed before the question to {owner}")
        self.forwarded.labels(owner).inc()
        asking: dict[str, object] = {
            "from": self.membership.self_id,
            "model": name,
            "size": size_bytes,
            "tried": sorted(tried),
        }
        if left_ms is not None:  # an owner of before it ignores the field
            asking["timeout_ms"] = left_ms
        question = json.dumps(asking).encode()
        headers = {"Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            if left_ms is None:
                reply = await self.calls.call_owner(owner, PLACE_PATH, question, headers)
            else:
                async with asyncio.timeout(left_ms / 1000 + DEADLINE_MARGIN_S) as waiting:
                    reply = await self.calls.call_owner(owner, PLACE_PATH, question, headers)
        except TimeoutError:
            if left_ms is not None and waiting.expired():
                raise DeadlinePassed(
                    f"the deadline passed while the placement owner {owner} had the question"
                ) from None
            raise
        except (NodeUnreachable, OwnerHung) as e:
            self.lost(owner, e)
            return None
        try:
            answer = json.loads(reply.body) if reply.status == 200 else {}
            victims = tuple(str(v) for v in answer.get("victims") or ())
            planned = answer.get("planned")
            decided = OwnerDecision(
                str(answer["device"]),
                victims,
                victims if planned is None else tuple(str(v) for v in planned),
            )
            owner_ms = float(answer.get("owner_ms") or 0.0)
        except (ValueError, KeyError, TypeError):
            logger.warning(
                "the placement owner %s answered %d: %.200r", owner, reply.status, reply.body
            )
            self.failures.inc()
            return None
        if decided.device not in self.directory:
            self.failures.inc()
            return None
        return Asked(decided, (time.perf_counter() - started) * 1000, owner_ms)


def _check_time_left(value: object) -> None:
    """A placement question's ``timeout_ms``, the asker's client's time left, is absent or a
    positive, finite number of milliseconds; anything else is a ``ValueError`` naming it (the
    owner's 400). The owner answers at once, from memory, so it only checks it."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"timeout_ms must be a number of milliseconds, got {value!r:.40}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"timeout_ms must be a positive, finite number, got {value!r:.40}")


def _refused_frame(reply: NodeReply) -> bool:
    """Whether the owner's lane refused the call's frame (``core/framelisten.py``: 400,
    ``InvalidFrame``) rather than answering the request."""
    return reply.status == 400 and reply.headers.get(REASON_HEADER) == "InvalidFrame"


# A device (by its key in the view): its id at its GPU manager, and how to post a load order's
# body there (the call, to await); None when the device is not known (nothing is sent).
OrderTo = Callable[[str], tuple[str, Callable[[bytes], Coroutine[Any, Any, NodeReply]]] | None]


class LoadOrdering:
    """The placement owner's load orders (forwarding ``decision``): as it answers a peer's
    question with a load, it orders that load at the device's GPU manager
    (``POST LOAD_ORDER``), so the load starts one hop before the peer's request arrives, which
    joins it in flight. Never awaited by the answer, and never the request's failure: an order
    that is refused, fails or is lost only means the request starts the load itself, as it
    did before orders. Counted in ``gpufaas_replica_load_orders_total{result}`` (the node's
    result, or ``refused``, ``failed``, ``unknown-device``)."""

    def __init__(self, *, to: OrderTo, counted: Counter, eager: bool = True) -> None:
        self.to = to
        self.counted = counted
        # Write the order at once, before the answer (the send's first step needs no task:
        # the pooled transport); False for a send that needs a task (httpx).
        self.eager = eager
        self._sending: set[asyncio.Task[None]] = set()

    def order(self, device_key: str, name: str, victims: tuple[str, ...]) -> None:
        where = self.to(device_key)
        if where is None:
            self.counted.labels("unknown-device").inc()
            return
        device_id, post = where
        body = LoadOrder(model=name, device=device_id, victims=list(victims))
        call = post(body.model_dump_json().encode())
        sending = self._sent(name, call)
        task = start_eagerly(sending) if self.eager else asyncio.create_task(sending)
        if task is not None:
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _sent(self, name: str, call: Coroutine[Any, Any, NodeReply]) -> None:
        try:
            reply = await call
            if reply.status == 202:
                result = LoadOrderTaken.model_validate_json(reply.body).result
            else:
                logger.info("a load order of %s was refused: %.200r", name, reply.body)
                result = "refused"
        except Exception as e:  # the node is gone or answered nonsense: the request loads it
            logger.info("a load order of %s was not taken: %s", name, e)
            result = "failed"
        self.counted.labels(result).inc()


class PlacementAnswers:
    """As the placement owner, the peers' placement questions (forwarding ``decision``)."""

    def __init__(
        self,
        *,
        directory: ClusterDirectory,
        events: ResidencyEvents,
        decide: Callable[[str, frozenset[str], int], OwnerDecision] | None,
        asked: Callable[[], None],
        orders: LoadOrdering | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        # Loads decided for peers are ordered at their GPU manager as they are answered.
        self.orders = orders
        # This gateway's policy decision for a model, the devices the peer already tried
        # excluded, and the model's size as the asker knows it (0: unknown there), which an
        # owner that knows none plans room for. None: the peers' questions are answered 503,
        # and they place it themselves.
        self.decide = decide
        # A question is being answered in this task (counted; not a client request here).
        self.asked = asked

    def decide_for_peer(
        self, name: str, *, size_bytes: int, tried: frozenset[str]
    ) -> OwnerDecision:
        """This gateway's decision for ``name``, as for a request of its own; a load is noted
        in this replica's view and published to every peer (the asker too), as if dispatched
        here, and the decision carries every victim published (``planned``).

        Raises what ``decide`` raises (no device)."""
        if self.decide is None:
            raise LookupError("this replica does not decide placements for its peers")
        decided = self.decide(name, tried, size_bytes)
        if self.directory.state(decided.device, name) is not None:
            return decided  # the asker's view was behind: a hit here
        if self.orders is not None:  # first: the manager starts the load one hop sooner
            self.orders.order(decided.device, name, decided.victims)
        # The victims planned once, as the view notes the load: the same list is published
        # and answered (the hint first, then least recently used here).
        planned = list(decided.victims)
        with contextlib.suppress(InsufficientCapacity, UnknownKey):
            planned = self.directory.note_dispatch(
                decided.device, name, size_bytes=size_bytes, prefer=decided.victims
            )
        self.events.publish(decided.device, name, size_bytes=size_bytes, victims=planned)
        return dataclasses.replace(decided, planned=tuple(planned))

    async def receive(self, read: Callable[[], Awaitable[bytes]]) -> Response:
        """``POST`` :data:`PLACE_PATH`: a peer's question, where a model goes
        (:meth:`decide_for_peer`); ``{"device", "victims", "planned", "owner_ms"}``."""
        started = time.perf_counter()
        try:
            body = json.loads(await read())
            name, size = str(body["model"]), int(body.get("size") or 0)
            tried = frozenset(str(d) for d in body.get("tried") or ())
            _check_time_left(body.get("timeout_ms"))
        except ProtocolError as e:
            return error_response(e.status_code, str(e), reason="InvalidPlacement")
        except (ValueError, KeyError, TypeError) as e:
            return error_response(400, f"bad placement question: {e}", reason="InvalidPlacement")
        self.asked()
        try:
            decided = self.decide_for_peer(name, size_bytes=size, tried=tried)
        except (NoDevice, LookupError) as e:  # the asker places it itself
            return error_response(
                503, f"no placement for {name[:100]!r}: {e}", reason="NoPlacement"
            )
        owner_ms = (time.perf_counter() - started) * 1000
        return JSONResponse(
            {
                "device": decided.device,
                "victims": list(decided.victims),
                "planned": list(decided.planned),
                "owner_ms": owner_ms,
            }
        )
