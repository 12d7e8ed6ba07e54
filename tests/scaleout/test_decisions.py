"""Forwarding ``decision``: a replica asks the placement owner where a model goes and dispatches
the request itself (docs/scheduling.md, "Scale-out").

The owner is a raw HTTP/1.1 server on 127.0.0.1 here (what it answers is the test's to decide);
two real replicas are in ``test_replicas_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
from replica_support import SELF, close_replicas, replica_with_owner

from gpufaas.cache import Residency
from gpufaas.scheduler.gateway import NodeCall
from gpufaas.scheduler.misses import miss_cause
from gpufaas.scheduler.peers import HEARTBEAT_PATH, PLACE_PATH
from gpufaas.scheduler.policy import NoDevice
from gpufaas.scheduler.replicas import (
    FORWARD_MS_HEADER,
    OWNER_MS_HEADER,
    Forwarding,
    OwnerDecision,
    Placement,
    Replicas,
)
from gpufaas.scheduler.transport import NodeReply

BODY = b'{"id": "r1", "inputs": [{"name": "x", "data": [1, 2, 3]}]}'
CALL = NodeCall("/v2/models/m/infer", BODY, {"content-type": "application/json"})
Behaviour = Literal["decide", "holder", "refuse", "unknown-device", "hang"]


class Owner:
    """The placement owner: records each call's path and body, then answers with a decision
    (device ``n/1``, victim ``old``; ``old`` and ``older`` planned), the device its view already
    holds the model on (``holder``: ``n/1``, no victims), a 503, a device nobody knows, or never
    (``hang``; its heartbeat then fails too)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, bytes]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Owner:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.calls.append((head[0].split()[1], body))
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        answer = {"device": "n/1", "victims": ["old"], "planned": ["old", "older"]}
        status, answer = "200 OK", {**answer, "owner_ms": 0.25}
        if self.behaviour == "refuse":
            status, answer = "503 Service Unavailable", {"error": "no device"}
        elif self.behaviour == "holder":
            answer = {"device": "n/1", "victims": [], "planned": [], "owner_ms": 0.25}
        elif self.behaviour == "unknown-device":
            answer = {"device": "elsewhere/0", "victims": []}
        content = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(content)}\r\n\r\n".encode() + content
        )
        await writer.drain()

    async def heartbeat(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == HEARTBEAT_PATH
        if self.behaviour == "hang":
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json={"id": self.url})


def _replicas(owner: Owner | str, *, forwarding: Forwarding = "decision") -> Replicas:
    url = owner if isinstance(owner, str) else owner.url
    heartbeat = owner.heartbeat if isinstance(owner, Owner) else None
    return replica_with_owner(
        url, heartbeat=heartbeat, devices=("n/0", "n/1"), forwarding=forwarding
    )


async def _place(replicas: Replicas) -> Placement:
    # Bounded only so that a regression fails instead of hanging the suite.
    return await asyncio.wait_for(
        replicas.place(
            "m", "n/0", call=CALL, size_bytes=10, victims=["mine"], tried=frozenset({"n/2"})
        ),
        timeout=30,
    )


async def test_a_placement_asks_the_owner_and_the_request_stays_here() -> None:
    """Only the question travels (model, size, devices tried), never the request's body; the
    owner's device and victims come back, to dispatch here, and nothing is published here
    (the owner publishes its own decision). The answer then says what the question cost."""
    async with Owner("decide") as owner:
        replicas = _replicas(owner)

        async def one_request() -> tuple[Placement, NodeReply]:
            # Awaited in the request's own task, as the gateway does (the timing it keeps for
            # the answer lives in the task's context).
            placed = await replicas.place(
                "m", "n/0", call=CALL, size_bytes=10, victims=["mine"], tried=frozenset({"n/2"})
            )
            answer = {
                "x-gpufaas-cache": "miss",
                "x-gpufaas-model-bytes": "40",
                "x-gpufaas-load-ms": "3.5",
            }
            return placed, replicas.answered(NodeReply(200, answer, b"answer"))

        placed, reply = await asyncio.wait_for(one_request(), timeout=30)
        assert placed.reply is None and placed.call is CALL and not placed.forward_failed
        assert placed.decided == OwnerDecision("n/1", ("old",))
        ((path, question),) = owner.calls
        assert path == PLACE_PATH and BODY not in question
        assert json.loads(question) == {"from": SELF, "model": "m", "size": 10, "tried": ["n/2"]}
        assert replicas.events._outbox == []
        assert float(reply.headers[OWNER_MS_HEADER]) == 0.25
        assert float(reply.headers[FORWARD_MS_HEADER]) > 0
        # The load's answer goes back to the owner with the uses: it learns from it.
        assert replicas.events.uses.take()["loads"] == [["n/1", "m", 40, 3.5]]
        assert replicas.metrics.forwarded.labels(owner.url)._value.get() == 1
        await close_replicas(replicas)


async def test_the_asker_drops_every_victim_the_owner_planned_from_its_view() -> None:
    """The owner publishes every victim it predicts for the load; the asker notes the load in
    its own view the same way before it dispatches, even where its view had room, so that it
    keeps no model the manager may have evicted (a stale hit later)."""
    async with Owner("decide") as owner:
        replicas = _replicas(owner)
        directory = replicas.directory
        for model in ("old", "older", "kept"):
            directory.note_loaded("n/1", model, size_bytes=10)
        placed = await _place(replicas)
        assert placed.decided is not None and placed.decided.planned == ("old", "older")
        # The gateway then notes the dispatch, with the hint (as for any request).
        directory.note_dispatch("n/1", "m", size_bytes=10, prefer=placed.decided.victims)
        assert directory.state("n/1", "old") is None
        assert directory.state("n/1", "older") is None
        assert directory.state("n/1", "kept") is Residency.RESIDENT
        assert directory.state("n/1", "m") is Residency.LOADING
        await close_replicas(replicas)


async def test_the_owners_event_takes_its_victims_from_a_view_that_noted_the_load_first() -> None:
    """The owner's view already held the model (a load it decided for another peer a moment
    before), so its answer names the device and no victims; the asker notes the load. The
    owner's event for that load, which carries the victims, arrives after: it must still take
    them out of the asker's view, which otherwise keeps a model the manager evicted (sent as a
    hit later: a stale hit, a blind load)."""
    async with Owner("holder") as owner:
        replicas = _replicas(owner)
        directory = replicas.directory
        for model in ("old", "kept"):
            directory.note_loaded("n/1", model, size_bytes=10)
        placed = await _place(replicas)
        assert placed.decided is not None and placed.decided.device == "n/1"
        assert placed.decided.planned == ()
        assert directory.state("n/1", "m") is Residency.LOADING
        assert directory.state("n/1", "old") is Residency.RESIDENT  # nothing said otherwise yet
        event = {"device": "n/1", "model": "m", "size": 10, "victims": ["old"]}
        assert replicas.events.apply([event]) == 0  # the load itself was noted already
        assert directory.state("n/1", "old") is None
        assert directory.state("n/1", "kept") is Residency.RESIDENT
        assert directory.state("n/1", "m") is Residency.LOADING
        await close_replicas(replicas)


async def test_an_unusable_decision_is_placed_here_and_published() -> None:
    """An owner that answers with an error, or names a device this replica does not know:
    the request is placed here, as when the owner cannot be reached, and the load published."""
    for behaviour in ("refuse", "unknown-device"):
        async with Owner(behaviour) as owner:
            replicas = _replicas(owner)
            placed = await _place(replicas)
            assert placed.decided is None and placed.forward_failed, behaviour
            assert [e["model"] for e in replicas.events._outbox] == ["m"]
            assert replicas.events._outbox[0]["device"] == "n/0"
            assert replicas.membership.peers[owner.url].reachable  # it answered
            await close_replicas(replicas)


async def test_a_dead_or_hung_owner_is_placed_here_in_either_forwarding() -> None:
    from gpufaas.scheduler.local import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for forwarding in ("decision", "request"):
        replicas = _replicas(dead, forwarding=forwarding)
        placed = await _place(replicas)
        # The miss's cause follows (placed_after_failed_forward), in both forwardings.
        assert placed.reply is None and placed.decided is None and placed.forward_failed
        assert not replicas.membership.peers[dead].reachable
        await close_replicas(replicas)
    async with Owner("hang") as owner:
        replicas = _replicas(owner)
        placed = await _place(replicas)
        assert placed.decided is None and placed.forward_failed
        assert not replicas.membership.peers[owner.url].reachable
        assert replicas.metrics.forward_failures._value.get() == 1
        await close_replicas(replicas)


def _owner_side() -> tuple[Replicas, list[frozenset[str]]]:
    """A placement owner whose policy puts every model on ``n/0`` evicting ``old``."""
    asked: list[frozenset[str]] = []

    def decide(name: str, tried: frozenset[str]) -> OwnerDecision:
        asked.append(tried)
        if "n/0" in tried:
            raise NoDevice("nothing left")
        return OwnerDecision("n/0", ("old",))

    replicas = _replicas("http://b")
    replicas.answers.decide = decide
    replicas.directory.note_loaded("n/0", "old", size_bytes=60)
    replicas.directory.note_loaded("n/0", "kept", size_bytes=30)
    return replicas, asked


async def test_the_owner_notes_and_publishes_a_peers_placement_once() -> None:
    replicas, asked = _owner_side()
    assert replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset()) == OwnerDecision(
        "n/0", ("old",)
    )
    # In the owner's view at once (its next decision sees the load), the victim gone.
    assert replicas.directory.state("n/0", "m") is Residency.LOADING
    assert replicas.directory.state("n/0", "old") is None
    assert replicas.directory.state("n/0", "kept") is Residency.RESIDENT
    assert replicas.events._outbox == [
        {"device": "n/0", "model": "m", "size": 50, "victims": ["old"]}
    ]
    # Asked again (a peer's view was behind): the same device, and no second load published.
    assert replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset()).device == "n/0"
    assert len(replicas.events._outbox) == 1 and asked == [frozenset(), frozenset()]
    await close_replicas(replicas)


async def test_the_owner_answers_with_every_victim_it_planned_and_published() -> None:
    replicas, _ = _owner_side()
    replicas.answers.decide = lambda name, tried: OwnerDecision("n/0", ())  # no hint: LRU decides
    decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert decided.planned == ("old",)
    assert replicas.events._outbox[0]["victims"] == ["old"]
    await close_replicas(replicas)


async def test_placement_questions_are_taken_at_the_ingress_and_need_the_peer_token() -> None:
    from fastapi import FastAPI

    replicas, asked = _owner_side()
    replicas.token = "peer-secret"
    app = FastAPI()
    replicas.install(app)
    served = replicas.ingress(app)
    question = {"from": "http://b", "model": "m", "size": 50, "tried": []}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served), base_url="http://a"
    ) as client:
        assert (await client.post(PLACE_PATH, json=question)).status_code == 401
        auth = {"Authorization": "Bearer peer-secret"}
        response = await client.post(PLACE_PATH, json=question, headers=auth)
        assert response.status_code == 200
        answer = response.json()
        assert answer["device"] == "n/0" and answer["victims"] == ["old"]
        assert answer["owner_ms"] >= 0
        assert replicas.metrics.forwarded_in._value.get() == 1
        # No device left for the peer: 503, which it takes as "place it yourself".
        refused = await client.post(PLACE_PATH, json={**question, "tried": ["n/0"]}, headers=auth)
        assert refused.status_code == 503 and "no placement" in refused.text
        bad = await client.post(PLACE_PATH, content=b"{", headers=auth)
        assert bad.status_code == 400 and "bad placement question" in bad.text
    assert asked == [frozenset(), frozenset({"n/0"})]
    await close_replicas(replicas)


async def test_the_owner_learns_from_the_answers_of_loads_it_decided_for_peers() -> None:
    """The owner never sees the answer of a load it decided for a peer: the peer sends it with
    its uses, and the owner marks the model resident and learns its load time, as it would from
    a load it had dispatched itself."""
    replicas, _ = _owner_side()
    learnt: list[tuple[str, int, float]] = []
    replicas.events.uses.observe_load = lambda model, size, load_ms: learnt.append(
        (model, size, load_ms)
    )
    replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert replicas.directory.state("n/0", "m") is Residency.LOADING
    replicas.events.uses.apply({"loads": [["n/0", "m", 40, 3.5]]})
    assert replicas.directory.state("n/0", "m") is Residency.RESIDENT
    assert learnt == [("m", 40, 3.5)]
    await close_replicas(replicas)


def test_a_miss_placed_where_the_owner_decided_is_counted_as_such() -> None:
    assert (
        miss_cause(
            view=None, held_elsewhere=False, forwarded_in=False, forward_failed=False, by_owner=True
        )
        == "placed_by_owner"
    )
    assert (
        miss_cause(view=None, held_elsewhere=False, forwarded_in=False, forward_failed=True)
        == "placed_after_failed_forward"
    )
