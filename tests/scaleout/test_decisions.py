"""Forwarding ``decision``: a replica asks the placement owner where a model goes and dispatches
the request itself (docs/scheduling.md, "Scale-out").

The owner is a raw HTTP/1.1 server on 127.0.0.1 here (what it answers is the test's to decide);
two real replicas are in ``test_replicas_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Literal

import httpx
import pytest
from replica_support import SELF, close_replicas, replica_with_owner

from gpufaas.cache import Residency
from gpufaas.scheduler.forwards import DEADLINE_MARGIN_S, DeadlinePassed
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
Behaviour = Literal["decide", "holder", "refuse", "unknown-device", "hang", "hold"]
HELD_S = 30.0  # how long a holding owner keeps a question; every test ends it sooner
LONG_S = 60.0  # a deadline no loaded box reaches


class Owner:
    """The placement owner: records each call's path and body, then answers with a decision
    (device ``n/1``, victim ``old``; ``old`` and ``older`` planned), the device its view already
    holds the model on (``holder``: ``n/1``, no victims), a 503, a device nobody knows, or never
    (``hang``; its heartbeat then fails too), or only once ``release`` is set (``hold``: alive,
    its heartbeat answers)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, bytes]] = []
        self.url = ""
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Owner:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self.release.set()
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # every question on a kept connection
                await self._answer(reader, writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.calls.append((head[0].split()[1], body))
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        if self.behaviour == "hold":
            await asyncio.wait_for(self.release.wait(), HELD_S)
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


async def _place(replicas: Replicas, *, deadline: float | None = None) -> Placement:
    # Bounded only so that a regression fails instead of hanging the suite.
    return await asyncio.wait_for(
        replicas.place(
            "m",
            "n/0",
            call=CALL,
            size_bytes=10,
            victims=["mine"],
            tried=frozenset({"n/2"}),
            deadline=deadline,
        ),
        timeout=HELD_S,
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


async def test_a_question_carries_no_more_than_the_clients_time_left() -> None:
    """The client's deadline goes with the question as its time left (``timeout_ms``), as it
    goes with a forwarded request; a request without one asks without it."""
    async with Owner("decide") as owner:
        replicas = _replicas(owner)
        await _place(replicas, deadline=time.monotonic() + LONG_S)
        await _place(replicas)
        await close_replicas(replicas)
    (_, with_deadline), (_, without) = owner.calls
    assert 0 < json.loads(with_deadline)["timeout_ms"] <= LONG_S * 1000
    assert "timeout_ms" not in json.loads(without)


async def test_a_question_whose_deadline_passes_first_is_given_up_and_the_owner_stays() -> None:
    """An owner that holds the question (alive: its heartbeat answers) past the client's
    deadline: the asker stops waiting at the deadline and its margin, with DeadlinePassed (the
    gateway's 504), not after the owner; the owner stays on the ring, no failure is counted,
    and nothing is placed or published here."""
    async with Owner("hold") as owner:
        replicas = _replicas(owner)
        started = time.monotonic()
        with pytest.raises(DeadlinePassed):
            await _place(replicas, deadline=started + 0.2)
        waited = time.monotonic() - started
        assert waited + 0.01 >= 0.2 + DEADLINE_MARGIN_S and waited < HELD_S / 2
        assert len(owner.calls) == 1  # it was asked, with the time left
        assert replicas.membership.peers[owner.url].reachable
        assert replicas.metrics.forward_failures._value.get() == 0
        assert replicas.events._outbox == []
        await close_replicas(replicas)


async def test_a_deadline_already_past_is_not_asked() -> None:
    async with Owner("decide") as owner:
        replicas = _replicas(owner)
        with pytest.raises(DeadlinePassed):
            await _place(replicas, deadline=time.monotonic() - 0.001)
        assert owner.calls == [] and replicas.events._outbox == []
        assert replicas.metrics.forwarded.labels(owner.url)._value.get() == 0
        await close_replicas(replicas)


def _owner_side() -> tuple[Replicas, list[frozenset[str]]]:
    """A placement owner whose policy puts every model on ``n/0`` evicting ``old``."""
    asked: list[frozenset[str]] = []

    def decide(name: str, tried: frozenset[str], size_bytes: int) -> OwnerDecision:
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
    replicas.answers.decide = lambda name, tried, size: OwnerDecision(
        "n/0", ()
    )  # no hint: LRU decides
    decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert decided.planned == ("old",)
    assert replicas.events._outbox[0]["victims"] == ["old"]
    await close_replicas(replicas)


async def test_the_owner_plans_a_peers_load_in_its_view_once() -> None:
    """Besides the policy's own choice, the owner's view plans the load's victims once (the
    list it notes, publishes and answers), not once to publish and again to note (nineteenth
    session: three plannings took 0.26-0.29 ms of a question's answer)."""
    replicas, _ = _owner_side()
    replicas.answers.decide = lambda name, tried, size: OwnerDecision("n/0", ())  # LRU decides
    plans: list[str] = []
    plan = replicas.directory.plan_dispatch

    def counted(device_id: str, model: str, **options: Any) -> list[str]:
        plans.append(model)
        return plan(device_id, model, **options)

    replicas.directory.plan_dispatch = counted  # type: ignore[method-assign]
    decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert plans == ["m"]
    assert decided.planned == ("old",) and replicas.events._outbox[0]["victims"] == ["old"]
    assert replicas.directory.state("n/0", "old") is None
    await close_replicas(replicas)


async def test_an_owner_plans_room_by_the_askers_size_of_a_model_it_never_sized() -> None:
    """An owner that never dispatched a model's load, nor saw it resident at a sync, knows no
    size for it. It takes the question's (the asker's) before it decides, so its policy plans
    room for the load (victims), and a peer's report of the load teaches it the size the GPU
    manager measured. Sized 0, the load was planned with no victims, and the manager evicted
    by its own LRU order what one gateway would have chosen by value (nineteenth session:
    the owner's loads with no hint on full devices, bench/RESULTS.md #16)."""
    from gpufaas.scheduler.cluster import Cluster, Device
    from gpufaas.scheduler.gateway import Gateway, GatewayConfig
    from gpufaas.scheduler.peers import static_peers
    from gpufaas.scheduler.policy import make_policy
    from gpufaas.scheduler.replica_setup import attach_replicas

    gateway = Gateway(
        cluster=Cluster(manager_urls={"n": "http://n"}),
        policy=make_policy("lalb"),
        config=GatewayConfig(),
    )
    node = gateway.cluster.nodes["n"]
    node.healthy = True
    node.devices["0"] = gateway.cluster.devices["n/0"] = Device("n/0", node, "0", 100)
    directory = gateway.cluster.directory
    directory.add_device("n/0", capacity_bytes=100, node="n")
    directory.note_loaded("n/0", "old", size_bytes=60)
    directory.note_loaded("n/0", "kept", size_bytes=30)
    gateway._track_health()
    replicas = attach_replicas(
        gateway,
        self_url="http://a",
        discover=static_peers(["http://a", "http://b"]),
        token=None,
        forwarding="decision",
        forward_lane_port=None,
    )
    assert "m" not in gateway.model_bytes
    decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert decided.device == "n/0" and decided.victims  # room planned for 50 bytes
    assert gateway.model_bytes["m"] == 50
    # A size known here is kept over a question's; the manager's report of the load replaces it.
    replicas.answers.decide_for_peer("m", size_bytes=70, tried=frozenset())
    assert gateway.model_bytes["m"] == 50
    replicas.events.uses.apply({"loads": [["n/0", "m", 55, 1.5]]})
    assert gateway.model_bytes["m"] == 55
    await replicas.membership.close()
    await gateway.cluster.close()


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
        timed = await client.post(PLACE_PATH, json={**question, "timeout_ms": 250.0}, headers=auth)
        assert timed.status_code == 200 and timed.json()["device"] == "n/0"
    assert asked == [frozenset(), frozenset({"n/0"}), frozenset()]
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


@pytest.mark.parametrize("left", ["soon", 0, -5, 1e999, True, [], {"ms": 5}])
async def test_a_question_with_a_time_left_that_is_not_a_positive_number_is_a_400(
    left: object,
) -> None:
    """The owner refuses a ``timeout_ms`` that is not a positive, finite number of milliseconds
    with a 400 naming it, before it decides anything (never a 500)."""
    replicas, asked = _owner_side()
    served = replicas.ingress(_no_app)
    question = {"from": "http://b", "model": "m", "size": 50, "tried": [], "timeout_ms": left}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served), base_url="http://a"
    ) as client:
        # json.dumps writes 1e999 as Infinity, which the owner's JSON reader takes as a float
        refused = await client.post(PLACE_PATH, content=json.dumps(question).encode())
    assert refused.status_code == 400, refused.text
    assert "timeout_ms" in refused.text
    assert asked == [] and replicas.events._outbox == []
    assert replicas.directory.state("n/0", "m") is None
    await close_replicas(replicas)


async def _no_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("a placement question is answered at the ingress")
