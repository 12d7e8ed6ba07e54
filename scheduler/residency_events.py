"""Residency events of one gateway replica (scale-out, #16; see docs/scheduling.md,
"Scale-out"): the fan-out to its peers and what it takes in from them.

- **Loads.** A load this replica places (as the placement owner, or because the owner cannot be
  reached) is published to every peer: device, model, size and every victim predicted here.
  A peer drops the victims from its view and notes the model loading there, so the next
  request for the model, at any replica, is a hit there.
- **Demotions** (prediction, #13): a model the placement owner's driver demoted to the node's
  host tier is published to every peer in the post's ``demoted`` list (``[device, model]``
  pairs), and a peer drops it from its view: its next request for it is a miss there (sent to
  the owner), not a hit that reloads it. A separate top-level field, not an event: a peer of an
  older version reads only ``events`` and ``uses`` and ignores it (its view then holds the model
  until its next sync, as before), whereas an event of an unknown kind would read there as a load
  of the demoted model.
- **Uses** (:class:`~gpufaas.scheduler.uses.UseStream`): this replica's client requests and
  hits (and, with forwarding ``decision``, the answers of the loads the owner decided for it)
  go to whoever decides evictions (the leader; with function ownership every peer), so that
  it decides on the merged stream.

Both are batched, one post per peer over the pooled peer connections
(:class:`~gpufaas.scheduler.peer_calls.PeerCalls`); a post that fails marks the peer
unreachable, except a 400: the peer answered and refused the body (a malformed post, or one a
peer of another version cannot read), which is logged and, for uses, counted as lost; the peer
stays in the ring. Uses go within :data:`~gpufaas.scheduler.uses.USE_FLUSH_S`, or with the next load
event. **A load event goes once the load is done**: while a load published here is still
loading in this replica's view (its answer not back yet), the post waits for the answer, at most
``hold_s`` (:data:`HOLD_S`), then ``flush_delay_s`` more so that the answer's relay goes first.
Posting while the GPU manager loads woke every peer at the moment the load and the forwarded
request's answer needed the cores (2 cores, 7 processes in the benchmark). What a peer misses
meanwhile is small: a request for the model there is forwarded to the owner, which sees the load
and sends it there as a hit; a request for a victim there is sent as a hit and loads it again
(a stale hit, counted as one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter

from gpufaas.cache import ClusterDirectory, InsufficientCapacity, Residency, UnknownKey
from gpufaas.core.http import CACHE_HEADER, LOAD_MS_HEADER, MODEL_BYTES_HEADER, error_response
from gpufaas.core.protocol import ProtocolError
from gpufaas.scheduler.peer_calls import PeerCalls
from gpufaas.scheduler.peers import EVENTS_PATH, Membership
from gpufaas.scheduler.transport import NodeReply, NodeUnreachable
from gpufaas.scheduler.uses import USE_FLUSH_S, UseStream

__all__ = [
    "EVENTS_TIMEOUT_S",
    "HOLD_S",
    "ResidencyEvents",
    "note_peer_demotions",
    "note_peer_loads",
]

logger = logging.getLogger(__name__)

_MAX_EVENTS_PER_POST = 4096
# A residency-event post that takes longer marks the peer unreachable.
EVENTS_TIMEOUT_S = 2.0
# How long a load event waits for its load's answer at most (a load here takes 2-4 ms; one
# whose answer never comes, a node gone mid-request, is published anyway after this).
HOLD_S = 0.025


class ResidencyEvents:
    """One replica's outbox of load events and uses, its flush loop, and the peers' events
    applied here."""

    def __init__(
        self,
        *,
        membership: Membership,
        directory: ClusterDirectory,
        calls: PeerCalls,
        uses: UseStream,
        counted: Counter,
        deciders: Callable[[], frozenset[str] | None],
        on_unreachable: Callable[[str, object], None],
        known_size: Callable[[str], int | None] = lambda model: None,
        flush_delay_s: float = 0.002,
        hold_s: float = HOLD_S,
        victims_of_noted: bool = False,
        lost_requests: Callable[[Mapping[str, int], object], None] = lambda requests, why: None,
    ) -> None:
        self.membership = membership
        self.directory = directory
        self.calls = calls
        self.uses = uses
        # gpufaas_replica_residency_events{direction}
        self.counted = counted
        # The replicas that decide evictions, who need this replica's uses (None: every peer).
        self.deciders = deciders
        # A peer whose post failed: dropped from the ring until its heartbeat answers again.
        self.on_unreachable = on_unreachable
        self.known_size = known_size
        self.flush_delay_s = flush_delay_s
        self.hold_s = hold_s
        # With forwarding "decision": a peer's event takes its victims out of this view even
        # where the load itself is already noted here (note_peer_loads).
        self.victims_of_noted = victims_of_noted
        # A post of uses that failed: its requests never reached the decider (prediction, #13).
        self.lost_requests = lost_requests
        self._uses_due: asyncio.TimerHandle | None = None
        self._outbox: list[dict[str, Any]] = []
        self._demoted: list[tuple[str, str]] = []  # (device, model) not yet published
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # a request placed here was answered

    # -- this replica's loads and uses --------------------------------------------------------

    def publish(
        self, device_key: str, model: str, *, size_bytes: int, victims: Sequence[str]
    ) -> None:
        """Tell every peer that ``model`` is being loaded on ``device_key`` (evicting
        ``victims`` first); sent in a batch within ``flush_delay_s``."""
        if not self.membership.peers:
            return
        self._outbox.append(
            {"device": device_key, "model": model, "size": size_bytes, "victims": list(victims)}
        )
        self._wake.set()

    def publish_demotion(self, device_key: str, model: str) -> None:
        """Tell every peer that ``model`` left ``device_key`` for the node's host tier (the
        owner's driver demoted it); sent with the next batch, within ``flush_delay_s``."""
        if not self.membership.peers:
            return
        # A peer applies a post's demotions before its loads, so a load of this model still
        # in the outbox must not follow: it goes, its victims becoming demotions (gone alike).
        loads = [e for e in self._outbox if (e["device"], e["model"]) == (device_key, model)]
        for event in loads:
            self._outbox.remove(event)
            self._demoted += [(device_key, str(victim)) for victim in event["victims"]]
        self._demoted.append((device_key, model))
        del self._demoted[:-_MAX_EVENTS_PER_POST]
        self._wake.set()

    def publish_load(
        self, device_key: str, name: str, *, size_bytes: int, victims: Sequence[str]
    ) -> list[str]:
        """Publish a load placed here with every victim it will take, as predicted here (the
        hint ``victims`` first, then least recently used): the peers' own LRU orders differ
        from ours. Returns those victims."""
        planned = list(victims)
        with contextlib.suppress(InsufficientCapacity, UnknownKey):
            planned = self.directory.plan_dispatch(
                device_key, name, size_bytes=size_bytes, prefer=victims
            )
        self.publish(device_key, name, size_bytes=size_bytes, victims=planned)
        return planned

    def wanted(self) -> bool:
        """Whether a peer decides evictions (with one leader, it alone needs the uses)."""
        if not self.membership.peers:
            return False
        deciders = self.deciders()
        return deciders is None or deciders != {self.membership.self_id}

    def requested(self, name: str) -> None:
        """A client's inference request for ``name`` arrived here (not a peer's forward)."""
        if self.wanted():
            self.uses.request(name)
            self._uses_soon()

    def touched(self, device_key: str, name: str) -> None:
        """A request for ``name`` was dispatched here to ``device_key`` as a hit."""
        if self.wanted():
            self.uses.touch(device_key, name)
            self._uses_soon()

    def loaded(self, device_key: str, name: str, reply: NodeReply) -> None:
        """The answer of a load the owner decided for this replica goes to the owner with the
        uses (:meth:`UseStream.loaded`): it learns from it as from a load it dispatched."""
        headers = reply.headers
        if reply.status != 200 or headers.get(CACHE_HEADER) == "hit" or not self.wanted():
            return
        try:
            size = int(headers.get(MODEL_BYTES_HEADER) or 0)
            load_ms = float(headers.get(LOAD_MS_HEADER) or 0.0)
        except ValueError:
            return
        self.uses.loaded(device_key, name, size_bytes=size, load_ms=load_ms)
        # At once, not within USE_FLUSH_S: the owner's view holds the model loading until
        # then, and its own event for the load waits for this (flush_forever).
        self._wake.set()

    def settled(self) -> None:
        """A request dispatched here was answered (a load's answer is in the view by now):
        load events held for it may go (:meth:`flush_forever`)."""
        if self._outbox:
            self._settled.set()

    def _uses_soon(self) -> None:
        if self._uses_due is None:
            self._uses_due = asyncio.get_running_loop().call_later(USE_FLUSH_S, self._wake.set)

    # -- sending ------------------------------------------------------------------------------

    async def flush_forever(self) -> None:
        """Post each batch of load events and uses to the peers, until cancelled."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_delay_s)  # gather a burst into one post
            if await self._after_loads():
                await asyncio.sleep(self.flush_delay_s)  # the load's answer goes out first
            self._wake.clear()
            events, self._outbox = (
                self._outbox[:_MAX_EVENTS_PER_POST],
                self._outbox[_MAX_EVENTS_PER_POST:],
            )
            if self._outbox:
                self._wake.set()
            demoted, self._demoted = self._demoted, []
            uses = None
            if self.uses:  # they ride along with the load events, or go on their own
                uses = self.uses.take()
                if self._uses_due is not None:
                    self._uses_due.cancel()
                    self._uses_due = None
            if events or uses or demoted:
                await self._send(events, uses, demoted)

    async def _after_loads(self) -> bool:
        """Wait while a load in the outbox is still loading in this replica's view, at most
        ``hold_s``: the peers are woken when the GPU manager is done, not while it loads.
        Whether there was one to wait for."""
        if not self._loading():
            return False
        loop = asyncio.get_running_loop()
        until = loop.time() + self.hold_s
        while self._loading() and (left := until - loop.time()) > 0:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), left)
        return True

    def _loading(self) -> bool:
        state = self.directory.state
        return any(
            state(event["device"], event["model"]) is Residency.LOADING for event in self._outbox
        )

    async def _send(
        self,
        events: list[dict[str, Any]],
        uses: dict[str, Any] | None,
        demoted: Sequence[tuple[str, str]] = (),
    ) -> None:
        peers = [p for p in self.membership.peers.values() if p.reachable]
        # Uses go only to whoever decides evictions (the leader, or with function ownership
        # every peer); load events and demotions to every peer. Uses held for a peer that no
        # longer decides (this replica became the leader) are dropped: what they carry, this
        # replica's own requests, hits and load answers, its driver, estimates and view
        # already took in at ingress (docs/prediction.md, "Several gateway replicas").
        deciders = self.deciders()
        self_id = self.membership.self_id
        base: dict[str, Any] = {"from": self_id, "events": events}
        if demoted:
            base["demoted"] = [list(pair) for pair in demoted]
        plain = json.dumps(base).encode() if events or demoted else None
        with_uses = json.dumps({**base, "uses": uses}).encode()
        headers = {"Content-Type": "application/json"}

        async def one(peer_id: str) -> None:
            body = with_uses if uses and (deciders is None or peer_id in deciders) else plain
            if body is None:
                return
            # The pooled transport, as forwards: an owner publishes while its misses are in
            # flight, and httpx would spend the loop's time they wait on.
            try:
                reply = await asyncio.wait_for(
                    self.calls.pool(peer_id).post(EVENTS_PATH, body, headers), EVENTS_TIMEOUT_S
                )
                status: int | None = reply.status
                failure: object = None if reply.status == 200 else f"HTTP {reply.status}"
            except (NodeUnreachable, TimeoutError) as e:
                status, failure = None, e
            if failure is None:
                return
            if status == 400:  # it answered: refused what it cannot read, it is no dead peer
                logger.warning("peer %s refused residency events: %s", peer_id, failure)
            else:
                self.on_unreachable(peer_id, failure)
            if uses and body is with_uses:
                self.lost_requests(uses["requests"], failure)

        await asyncio.gather(*(one(p.id) for p in peers))
        self.counted.labels("published").inc(len(events) + len(demoted))

    # -- receiving ----------------------------------------------------------------------------

    def apply(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Note a peer's loads in this replica's directory; returns how many were new here."""
        applied = note_peer_loads(
            self.directory,
            events,
            known_size=self.known_size,
            victims_of_noted=self.victims_of_noted,
        )
        self.counted.labels("applied").inc(applied)
        return applied

    async def receive(self, read: Callable[[], Awaitable[bytes]]) -> Response:
        """``POST`` :data:`EVENTS_PATH`: apply a peer's residency events (its demotions, and
        its uses)."""
        try:
            body = json.loads(await read())
            listed = body["events"]
            if not isinstance(listed, list):
                raise TypeError("events must be a list")
            uses = body.get("uses")
            if uses is not None and not isinstance(uses, dict):
                raise TypeError("uses must be an object")
            demoted = _demotions(body.get("demoted"))
            # Demotions first: a load published after a demotion of its model is then noted
            # again, and the sender drops a load it still held when the model is demoted.
            dropped = note_peer_demotions(self.directory, demoted)
            self.counted.labels("applied").inc(dropped)
            applied = dropped + self.apply(listed)
            if uses:
                self.uses.apply(uses)
                self.settled()  # the answers of loads decided here for the peer
        except ProtocolError as e:
            return error_response(e.status_code, str(e), reason="InvalidEvents")
        except (ValueError, KeyError, TypeError) as e:
            return error_response(400, f"bad residency events: {e}", reason="InvalidEvents")
        return JSONResponse({"applied": applied})


def _demotions(listed: object) -> list[tuple[str, str]]:
    """A post's ``demoted`` field as ``(device, model)`` pairs; raises ``TypeError`` if it is
    not a list of two-string pairs (before anything is applied)."""
    if listed is None:
        return []
    if not isinstance(listed, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        for pair in listed
    ):
        raise TypeError("demoted must be a list of [device, model] pairs")
    return [(device, model) for device, model in listed]


def note_peer_demotions(directory: ClusterDirectory, demoted: Sequence[tuple[str, str]]) -> int:
    """Drop the models a peer demoted from ``directory``'s view of their devices; how many
    the view held (an unknown device, or a model already gone, is skipped)."""
    return sum(
        directory.note_evicted(device, model) for device, model in demoted if device in directory
    )


def note_peer_loads(
    directory: ClusterDirectory,
    events: Sequence[Mapping[str, Any]],
    *,
    known_size: Callable[[str], int | None],
    victims_of_noted: bool = False,
) -> int:
    """Note a peer's residency events (a load, with its victims) in ``directory``; how many
    were new here. Unknown devices are skipped, and so are loads already noted, unless
    ``victims_of_noted``: then such a load's victims still leave the view.

    That is for forwarding ``decision``. There, a replica notes a load the owner decided before
    the owner's event for it arrives: its own question's answer. When the owner's view already
    held the model (a load it had decided for another peer a moment before), the answer names
    the device and no victims. The event, which carries them, then found the load noted and was
    skipped: the view kept models the GPU manager had evicted, and sent their next requests as
    hits (stale hits: blind loads, whose own victims no view knows)."""
    applied = 0
    for event in events:
        device, model = str(event["device"]), str(event["model"])
        if device not in directory:
            continue
        victims = [str(v) for v in event.get("victims") or []]
        if directory.state(device, model) is not None:
            if victims_of_noted:
                for victim in victims:
                    if victim != model:
                        directory.note_evicted(device, victim)
            continue
        size = int(event.get("size") or 0)
        known = known_size(model)
        if known is not None and known <= directory.capacity_bytes(device):
            size = known  # the owner may only have had the spec's hint
        for victim in victims:  # gone, whatever our own LRU order says
            directory.note_evicted(device, victim)
        try:
            directory.note_dispatch(device, model, size_bytes=size)
        except InsufficientCapacity:
            # Our view of the device is fuller than the owner's: the model is there all
            # the same (its size comes with the next sync).
            with contextlib.suppress(InsufficientCapacity):
                directory.note_dispatch(device, model, size_bytes=0)
        applied += 1
    return applied
