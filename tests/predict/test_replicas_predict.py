"""Prediction behind two gateway replicas (docs/prediction.md, "Several gateway replicas"): the
placement owner's driver observes every client request once, whichever replica took it; it
alone plans, so one predicted need gets one prefetch; planning follows the ring when membership
changes; a relay that cannot reach the owner is counted and logged, and nothing raises.

Two real gateways (``attach_replicas``, ``enable_prefetch``) over one real GPU manager in
process (ASGI), the real tiny-mlp. A forward to the owner goes over the owner's real
keyed-forward lane. The relays (each replica's use stream) are taken and delivered by the test,
in the wire's format, through the owner's own ``receive``: no flush loop runs, so nothing
depends on timing. The drivers' clock is the test's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import PredictivePolicy
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app as create_manager_app
from gpufaas.scheduler.forward_lane import LANE_PORT_KEY, ForwardListener
from gpufaas.scheduler.gateway import Gateway, GatewayConfig, NodeCall, create_app
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.peers import EVENTS_PATH, static_peers
from gpufaas.scheduler.prefetch import Action, PrefetchDriver, enable_prefetch
from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer
from gpufaas.scheduler.residency_events import ResidencyEvents

MODEL = "tiny-mlp"
PERIOD_S = 600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Door:
    """A replica's HTTP address for its peers: a heartbeat is answered 200 ``{}`` (a forward
    that takes a while on a loaded machine makes the sender probe it, and it must answer); a
    post of residency events goes to the replica's own ``receive``."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.url = ""
        self.events: ResidencyEvents | None = None
        self.received: list[dict[str, Any]] = []  # the load events posted here, in order
        self.posts: list[dict[str, Any]] = []  # every post of residency events, whole
        self.refuse = False  # answer every post of events 400 (a peer that cannot read it)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.url

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # a kept connection (the peers' pooled transport)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    (
                        int(line.split(":", 1)[1])
                        for line in head.split("\r\n")
                        if line.lower().startswith("content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                answer, status = b"{}", b"200 OK"
                posted = head.startswith(f"POST {EVENTS_PATH} ")
                if posted:
                    self.posts.append(json.loads(body))
                if posted and self.refuse:
                    answer, status = b'{"error": "bad residency events"}', b"400 Bad Request"
                elif posted and self.events is not None:

                    async def read(body: bytes = body) -> bytes:
                        return body

                    self.received += json.loads(body)["events"]
                    answer = bytes((await self.events.receive(read)).body)
                writer.write(
                    b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (status, len(answer), answer)
                )
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class CountingTransport(httpx.ASGITransport):
    """The manager's ASGI app, counting the prefetches each gateway sent it."""

    def __init__(self, app: Any, paths: list[str]) -> None:
        super().__init__(app=app)
        self.paths = paths

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await super().handle_async_request(request)


@dataclasses.dataclass
class Replica:
    url: str
    gateway: Gateway
    driver: PrefetchDriver
    client: httpx.AsyncClient  # the gateway's own HTTP app (its clients' requests)
    sent: list[str]  # paths this replica's gateway sent the manager
    door: Door


@dataclasses.dataclass
class Pair:
    owner: Replica
    peer: Replica
    runtime: NodeRuntime
    clock: Clock

    @property
    def device_key(self) -> str:
        return f"node-0/{next(iter(self.runtime.devices))}"


def _gateway(manager: Any, models_dir: Path, sent: list[str]) -> Gateway:
    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"],
        variables={"GPUFAAS_MODELS": str(models_dir)},
    )
    gateway = build_gateway(
        manager_urls={"node-0": "http://manager"},
        functions=functions,
        policy="lalb",
        config=GatewayConfig(transport="httpx"),  # the in-process manager is an ASGI app
    )
    node = gateway.cluster.nodes["node-0"]
    node.client = httpx.AsyncClient(
        transport=CountingTransport(manager, sent), base_url="http://manager"
    )
    return gateway


@contextlib.asynccontextmanager
async def two_replicas(
    tmp_path: Path,
    models_dir: Path,
    *,
    ownership: str = "leader",
    policy: Callable[[], PredictivePolicy] = PredictivePolicy,
) -> AsyncIterator[Pair]:
    """Two replicas of one gateway over one manager; ``owner`` is the one that places
    :data:`MODEL` (the leader, or with ``ownership="function"`` the function's owner)."""
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    manager = create_manager_app(runtime)
    doors = [Door(), Door()]
    urls = [await door.start() for door in doors]
    clock = Clock()
    replicas: list[Replica] = []
    lanes: list[ForwardListener] = []
    try:
        for url, door in zip(urls, doors, strict=True):
            sent: list[str] = []
            gateway = _gateway(manager, models_dir, sent)
            attach_replicas(
                gateway,
                self_url=url,
                discover=static_peers(urls),
                token=None,
                ownership=ownership,  # type: ignore[arg-type]
                forward_lane_port=None,  # its lane is started below, on a known port
            )
            driver = enable_prefetch(gateway, policy=policy())
            driver.clock = clock
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gw"
            )
            door.events = gateway.replicas.events  # type: ignore[union-attr]
            replicas.append(Replica(url, gateway, driver, client, sent, door))
        for replica in replicas:  # each one's keyed-forward lane, as attach_replicas serves it
            lane = ForwardListener(lane_answer(replica.gateway), token=None, max_body_bytes=1 << 20)
            await lane.start(host="127.0.0.1")
            lanes.append(lane)
        for replica in replicas:  # both reachable, as after a heartbeat round
            membership = replica.gateway.replicas.membership  # type: ignore[union-attr]
            membership.adopt(urls)
            for other, lane in zip(replicas, lanes, strict=True):
                if other is not replica:
                    membership.peers[other.url].reachable = True
                    membership.peers[other.url].report = {LANE_PORT_KEY: lane.port}
            replica.gateway.replicas._update_ring()  # type: ignore[union-attr]
        for replica in replicas:
            await replica.gateway.sync()
        first = replicas[0].gateway.replicas
        assert first is not None
        key = MODEL if ownership == "function" else ""
        owner = next(r for r in replicas if r.url == first.owner(key))
        peer = next(r for r in replicas if r is not owner)
        yield Pair(owner=owner, peer=peer, runtime=runtime, clock=clock)
    finally:
        for replica in replicas:
            await replica.client.aclose()
            if replica.gateway.replicas is not None:
                await replica.gateway.replicas.calls.close()
            await replica.gateway.cluster.close()
        for lane in lanes:
            await lane.close()
        for door in doors:
            await door.close()
        await runtime.settle()


_CONTENT, _HEADERS = encode_request({"x": (np.ones((1, 16), dtype=np.float32), "FP32")})


async def request(replica: Replica) -> httpx.Response:
    """A client's request, to this replica's HTTP app."""
    response = await replica.client.post(
        f"/v2/models/{MODEL}/infer", content=_CONTENT, headers=_HEADERS
    )
    assert response.status_code == 200, response.text
    return response


async def relay(sender: Replica, to: Replica) -> dict[str, Any]:
    """Deliver ``sender``'s use stream (its batch, as its flush loop would post it) to ``to``."""
    events = sender.gateway.replicas.events  # type: ignore[union-attr]
    batch = events.uses.take()
    body = json.dumps({"from": sender.url, "events": [], "uses": batch}).encode()

    async def read() -> bytes:
        return body

    receiver = to.gateway.replicas.events  # type: ignore[union-attr]
    answer = await receiver.receive(read)
    assert answer.status_code == 200
    return batch


@contextlib.asynccontextmanager
async def flushing(replica: Replica) -> AsyncIterator[None]:
    """The replica's flush loop (its posts of load events and uses to the peers) runs."""
    events = replica.gateway.replicas.events  # type: ignore[union-attr]
    task = asyncio.create_task(events.flush_forever())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(condition: Callable[[], bool], *, limit_s: float = 60.0) -> None:
    """Wait for ``condition`` (an outcome, not a duration: the limit only stops a hang)."""
    async with asyncio.timeout(limit_s):
        while not condition():
            await asyncio.sleep(0.005)


def counted(replica: Replica, name: str, labels: dict[str, str] | None = None) -> float:
    value = replica.gateway.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def prefetches(replica: Replica) -> int:
    return sum(path.endswith("/prefetch") for path in replica.sent)


async def demote_everywhere(pair: Pair) -> None:
    """Take the model off the device (host copy kept) and let both views see it."""
    await pair.owner.driver.send(Action("demote", MODEL, pair.device_key))
    for replica in (pair.owner, pair.peer):
        await replica.gateway.sync()
        assert not replica.gateway.cluster.directory.holders(MODEL)


async def alternate(pair: Pair, *, arrivals: int) -> None:
    """``arrivals`` requests one period apart, alternating owner and peer, each peer request
    relayed to the owner before the next one: the stream one gateway would see."""
    for i in range(arrivals):
        pair.clock.now += PERIOD_S
        replica = pair.owner if i % 2 == 0 else pair.peer
        await request(replica)
        await relay(pair.peer, pair.owner)


@pytest.mark.parametrize("ownership", ["leader", "function"])
async def test_the_owner_observes_every_arrival_and_alone_prefetches_once(
    tmp_path: Path, example_models_dir: Path, ownership: str
) -> None:
    async with two_replicas(tmp_path, example_models_dir, ownership=ownership) as pair:
        owner, peer = pair.owner, pair.peer
        await alternate(pair, arrivals=12)
        async with flushing(owner):  # the owner's event for its first load reaches the peer
            await until(lambda: len(peer.door.received) == 1)
        # every request reached the owner's model once: 6 its own, 6 relayed by the peer
        assert counted(owner, "gpufaas_prediction_requests_total") == 6
        assert counted(owner, "gpufaas_prediction_relayed_requests_total") == 6
        assert owner.driver.policy.arrivals.periodic(MODEL) == pytest.approx(PERIOD_S)  # type: ignore[attr-defined]
        assert counted(peer, "gpufaas_prediction_requests_total") == 6

        await demote_everywhere(pair)
        pair.clock.now += PERIOD_S - 10  # the next request is due in 10 s
        mine, theirs = await owner.driver.tick(), await peer.driver.tick()
        assert mine == [Action("prefetch", MODEL, pair.device_key)]
        assert theirs == []  # the peer plans nothing for a function it does not own
        assert prefetches(owner) == 1 and prefetches(peer) == 0
        # published: the owner's event reaches the peer, whose view holds it too (loading)
        async with flushing(owner):
            await until(lambda: len(peer.door.received) == 2)
        assert peer.door.received[-1]["model"] == MODEL and not peer.door.received[-1]["victims"]
        assert list(peer.gateway.cluster.directory.holders(MODEL)) == [pair.device_key]


async def test_only_the_owner_demotes(tmp_path: Path, example_models_dir: Path) -> None:
    """A model both views hold resident, which the policy would demote (nothing is worth its
    memory at this price): the owner demotes it, the peer leaves it to the owner."""

    def dear() -> PredictivePolicy:
        return PredictivePolicy(device_price=1e15)

    async with two_replicas(tmp_path, example_models_dir, policy=dear) as pair:
        await alternate(pair, arrivals=4)
        for replica in (pair.owner, pair.peer):
            await replica.gateway.sync()
            assert replica.gateway.cluster.directory.holders(MODEL)
        pair.clock.now += 60.0  # idle a minute: past its break-even at this price
        assert await pair.peer.driver.tick() == []
        assert await pair.owner.driver.tick() == [Action("demote", MODEL, pair.device_key)]
        assert not any(path.endswith("/demote") for path in pair.peer.sent)


def _dear() -> PredictivePolicy:
    return PredictivePolicy(device_price=1e15)  # nothing is worth its device memory


async def _held_by_both(pair: Pair) -> None:
    """Requests at both replicas until both views hold the model resident."""
    await alternate(pair, arrivals=4)
    for replica in (pair.owner, pair.peer):
        await replica.gateway.sync()
        assert replica.gateway.cluster.directory.holders(MODEL)


async def test_a_demotion_is_published_and_the_peer_forwards_instead_of_a_stale_hit(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The owner demotes a model both views hold: its post tells the peer, whose view drops
    it before any sync, so the peer's next request for it goes to the owner (which loads it
    back from the host tier), not to the device as a hit."""
    async with two_replicas(tmp_path, example_models_dir, policy=_dear) as pair:
        owner, peer = pair.owner, pair.peer
        await _held_by_both(pair)
        pair.clock.now += 60.0  # idle a minute: past its break-even at this price
        assert await owner.driver.tick() == [Action("demote", MODEL, pair.device_key)]
        directory = peer.gateway.cluster.directory
        assert directory.holders(MODEL)  # not yet: the peer has not heard
        async with flushing(owner):
            await until(lambda: not directory.holders(MODEL))
        assert peer.door.posts[-1]["demoted"] == [[pair.device_key, MODEL]]
        assert (
            counted(peer, "gpufaas_replica_residency_events_total", {"direction": "applied"}) >= 1
        )
        forwarded = counted(owner, "gpufaas_replica_forwarded_in_requests_total")
        await request(peer)
        assert counted(owner, "gpufaas_replica_forwarded_in_requests_total") == forwarded + 1


async def test_a_peer_that_refuses_a_post_with_a_400_stays_in_the_ring(
    tmp_path: Path, example_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that answers the owner's post 400 (one that cannot read it) answered: the
    owner logs it and keeps the peer in the ring (a dead peer is one that does not answer)."""
    async with two_replicas(tmp_path, example_models_dir, policy=_dear) as pair:
        owner, peer = pair.owner, pair.peer
        await _held_by_both(pair)
        pair.clock.now += 60.0
        assert await owner.driver.tick() == [Action("demote", MODEL, pair.device_key)]
        peer.door.refuse = True
        membership = owner.gateway.replicas.membership  # type: ignore[union-attr]
        with caplog.at_level(logging.WARNING):
            async with flushing(owner):
                await until(lambda: bool(peer.door.posts))
                await until(lambda: "refused residency events" in caplog.text)
        assert membership.peers[peer.url].reachable
        assert owner.gateway.replicas.owner(MODEL) == owner.url  # type: ignore[union-attr]
        assert len(owner.gateway.replicas.membership.live()) == 2  # type: ignore[union-attr]


async def test_uses_held_for_an_old_leader_are_not_observed_twice_by_the_new_one(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The peer's uses wait for the leader; the leader goes and the peer leads. Its driver
    observed those requests at its own ingress already, so the held batch is dropped, not fed
    to it again as relayed (which would count each of them twice), and none is counted lost."""
    async with two_replicas(tmp_path, example_models_dir) as pair:
        owner, peer = pair.owner, pair.peer
        await request(owner)
        await peer.gateway.sync()
        for _ in range(3):
            await request(peer)  # hits at the peer, held for the leader
        events = peer.gateway.replicas.events  # type: ignore[union-attr]
        assert events.uses
        peer.gateway.replicas._unreachable(owner.url, "killed")  # type: ignore[union-attr]
        assert peer.gateway.replicas.owner("") == peer.url  # type: ignore[union-attr]
        async with flushing(peer):
            await until(lambda: not events.uses)
        assert counted(peer, "gpufaas_prediction_requests_total") == 3
        assert counted(peer, "gpufaas_prediction_relayed_requests_total") == 0
        assert counted(peer, "gpufaas_prediction_relay_lost_requests_total") == 0


async def test_a_request_forwarded_to_the_owner_is_counted_once(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The peer's view lacks the model, so it forwards the request to the owner over the
    owner's lane; the owner serves it without observing it, and the peer's relay carries it."""
    async with two_replicas(tmp_path, example_models_dir) as pair:
        owner, peer = pair.owner, pair.peer
        await request(owner)  # loaded at the owner
        assert not peer.gateway.cluster.directory.holders(MODEL)  # no event, no sync since
        forwarded = counted(owner, "gpufaas_replica_forwarded_in_requests_total")
        await request(peer)
        assert counted(owner, "gpufaas_replica_forwarded_in_requests_total") == forwarded + 1
        assert counted(owner, "gpufaas_prediction_requests_total") == 1  # its own only
        batch = await relay(peer, owner)
        assert batch["requests"] == {MODEL: 1}
        assert counted(owner, "gpufaas_prediction_relayed_requests_total") == 1


async def test_when_the_owner_leaves_the_other_replica_plans_at_its_next_tick(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The ring moves within one sync interval (tests/scaleout/test_peers.py); the new owner's
    next tick plans for the functions it now owns. With function ownership the new owner
    heard every relay, so what it learned is whole."""
    async with two_replicas(tmp_path, example_models_dir, ownership="function") as pair:
        owner, peer = pair.owner, pair.peer
        await alternate(pair, arrivals=12)
        await relay(pair.owner, pair.peer)  # the owner's relays reach the peer too
        await demote_everywhere(pair)
        pair.clock.now += PERIOD_S - 10
        replicas = peer.gateway.replicas
        assert replicas is not None
        assert await peer.driver.tick() == []  # not its function yet
        replicas._unreachable(owner.url, "killed")  # its heartbeat failed: the ring moves
        assert replicas.owner(MODEL) == peer.url
        assert await peer.driver.tick() == [Action("prefetch", MODEL, pair.device_key)]
        assert prefetches(peer) == 1


async def test_a_relay_that_cannot_reach_the_owner_is_counted_and_logged(
    tmp_path: Path, example_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer's post of its uses fails to connect (the owner is gone): its requests are
    counted as lost and logged, the owner is taken off the ring, and nothing raises."""
    async with two_replicas(tmp_path, example_models_dir) as pair:
        owner, peer = pair.owner, pair.peer
        await request(owner)
        await peer.gateway.sync()
        for _ in range(3):
            await request(peer)  # hits: served at the peer, relayed later
        await owner.door.close()  # the owner is gone: the peer's post fails to connect
        membership = peer.gateway.replicas.membership  # type: ignore[union-attr]
        with caplog.at_level(logging.WARNING):
            async with flushing(peer):
                await until(lambda: not membership.peers[owner.url].reachable)
        assert counted(peer, "gpufaas_prediction_relay_lost_requests_total") == 3
        assert "a relay of 3 requests to the placement owner was lost" in caplog.text
        assert not membership.peers[owner.url].reachable
        assert counted(owner, "gpufaas_prediction_relayed_requests_total") == 0
        assert not peer.gateway.replicas.events.uses  # type: ignore[union-attr]  # taken, gone
        # the peer serves on, alone, and plans for everything now
        await request(peer)
        assert peer.gateway.replicas.owner(MODEL) == peer.url  # type: ignore[union-attr]


async def test_relayed_events_are_refused_with_a_400_not_a_500(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """A malformed relay (a negative count) is a 400 that says why, and teaches nothing."""
    async with two_replicas(tmp_path, example_models_dir) as pair:
        owner = pair.owner
        bad = {"from": pair.peer.url, "events": [], "uses": {"requests": {MODEL: -1}}}
        response = await owner.client.post(EVENTS_PATH, json=bad)
        assert response.status_code == 400 and "bad residency events" in response.text
        assert counted(owner, "gpufaas_prediction_relayed_requests_total") == 0
        # a malformed list of demotions: refused before the load event beside it is applied
        load = {"device": pair.device_key, "model": MODEL, "size": 1, "victims": []}
        bad = {"from": pair.peer.url, "events": [load], "demoted": [[pair.device_key]]}
        response = await owner.client.post(EVENTS_PATH, json=bad)
        assert response.status_code == 400 and "demoted must be a list" in response.text
        assert not owner.gateway.cluster.directory.holders(MODEL)


# -- the merge invariant: no arrival counted twice or lost across relays ---------------------------


class CountingPolicy(PredictivePolicy):
    """Ours, counting each function's observed arrivals."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()

    def observe(self, function: str, now_s: float) -> None:
        self.seen[function] += 1
        super().observe(function, now_s)


def _bare_replicas(count: int, ownership: str) -> list[Gateway]:
    """``count`` gateways made replicas of one another, all reachable (no sockets are used:
    the test delivers every relay itself)."""
    urls = [f"http://r{i}" for i in range(count)]
    gateways = []
    for url in urls:
        gateway = build_gateway(manager_urls={}, functions=[], policy="lalb")
        attach_replicas(
            gateway,
            self_url=url,
            discover=static_peers(urls),
            token=None,
            ownership=ownership,  # type: ignore[arg-type]
            forward_lane_port=None,
        )
        enable_prefetch(gateway, policy=CountingPolicy())
        replicas = gateway.replicas
        assert replicas is not None
        replicas.membership.adopt(urls)
        for peer in replicas.membership.peers.values():
            peer.reachable = True
        replicas._update_ring()
        gateways.append(gateway)
    return gateways


async def _client_request(sender: Gateway, owner: Gateway | None, name: str) -> None:
    """One client request at ``sender``, as the gateway's path sees it: observed at ingress
    and counted for the peers (``Replicas.begin``); with ``owner``, a miss forwarded to it,
    whose own path runs again there as a forwarded-in request."""

    async def at(gateway: Gateway, *, forwarded_by: str | None) -> None:
        replicas = gateway.replicas
        assert replicas is not None and gateway.prefetch is not None
        replicas.admit(name, forwarded_by=forwarded_by)
        gateway.prefetch.observe(name)  # Gateway.infer
        replicas.begin(name, _CALL)  # Gateway.forward

    await asyncio.create_task(at(sender, forwarded_by=None))  # each request its own task
    if owner is not None and owner is not sender:
        await asyncio.create_task(at(owner, forwarded_by=sender.replicas.self_id))  # type: ignore[union-attr]


async def _deliver(sender: Gateway, gateways: list[Gateway]) -> None:
    """``sender``'s uses batch to whoever decides evictions, as its flush loop posts it."""
    events = sender.replicas.events  # type: ignore[union-attr]
    if not events.uses:
        return
    batch = events.uses.take()
    body = json.dumps({"from": sender.replicas.self_id, "events": [], "uses": batch}).encode()  # type: ignore[union-attr]
    deciders = events.deciders()

    async def read() -> bytes:
        return body

    for gateway in gateways:
        replicas = gateway.replicas
        assert replicas is not None
        if gateway is sender or (deciders is not None and replicas.self_id not in deciders):
            continue
        assert (await replicas.events.receive(read)).status_code == 200


_CALL = NodeCall(f"/v2/models/{MODEL}/infer", b"", {})
_OPS = st.lists(
    st.one_of(
        # a client request: at which replica, for which function, forwarded to its owner?
        st.tuples(st.just("request"), st.integers(0, 2), st.sampled_from("fgh"), st.booleans()),
        st.tuples(st.just("relay"), st.integers(0, 2), st.just(""), st.just(False)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, count=st.integers(2, 3), ownership=st.sampled_from(["leader", "function"]))
def test_no_arrival_is_counted_twice_or_lost_across_relays(
    ops: list[tuple[str, int, str, bool]], count: int, ownership: str
) -> None:
    """Whatever the interleaving of requests (some forwarded to the owner) and relay batches,
    once every batch is delivered, each function's planner (its owner) has observed each client
    request exactly once; with function ownership every replica has (a move loses nothing)."""

    async def run() -> None:
        gateways = _bare_replicas(count, ownership)
        sent: collections.Counter[str] = collections.Counter()
        for op, index, name, forwarded in ops:
            gateway = gateways[index % count]
            if op == "relay":
                await _deliver(gateway, gateways)
                continue
            owner_id = gateway.replicas.owner(name)  # type: ignore[union-attr]
            owner = next(g for g in gateways if g.replicas.self_id == owner_id)  # type: ignore[union-attr]
            await _client_request(gateway, owner if forwarded else None, name)
            sent[name] += 1
        for gateway in gateways:
            await _deliver(gateway, gateways)
        for gateway in gateways:
            replicas, driver = gateway.replicas, gateway.prefetch
            assert replicas is not None and driver is not None
            seen = driver.policy.seen  # type: ignore[attr-defined]
            planned_here = {name for name in sent if replicas.owner(name) == replicas.self_id}
            hears_all = ownership == "function"
            for name in sent:
                if hears_all or name in planned_here:
                    assert seen[name] == sent[name], (name, replicas.self_id)
                else:  # a non-leader: its own clients' requests only, none twice
                    assert seen[name] <= sent[name]
        for gateway in gateways:
            await gateway.replicas.calls.close()  # type: ignore[union-attr]

    asyncio.run(run())


def test_gpufaas_up_passes_the_prefetch_options_to_each_gateway_replica(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``gpufaas up --gateways N --prefetch ...``: each gateway process gets the same options
    (they were dropped before: N replicas ran with no prediction at all); a state file, which
    N replicas would share, is refused."""
    from gpufaas.scheduler import cli

    flags = ["--prefetch", "predictive", "--prefetch-time-scale", "30"]
    flags += ["--prefetch-param", "device_price=3e4", "--prefetch-param", "lru_veto=0"]
    up = cli._up_parser().parse_args(["--gateways", "2", *flags, "--prefetch-demote-only"])
    passed = cli._gateway_args(up)
    gateway = cli._gateway_parser().parse_args(["--managers", "n=http://m", *passed])
    assert gateway.prefetch == "predictive" and gateway.prefetch_time_scale == 30.0
    assert gateway.prefetch_param == ["device_price=3e4", "lru_veto=0"]
    assert gateway.prefetch_demote_only
    off = cli._up_parser().parse_args(["--gateways", "2"])
    assert "--prefetch" not in cli._gateway_args(off)
    # (no functions to load: without the check it stops at the manifests, with another error)
    shared = ["--prefetch-state", "/nonexistent/s.json", "--functions", "/nonexistent/fns"]
    assert cli.up_command(["--gateways", "2", *shared]) == 2
    assert "--prefetch-state needs --gateways 1" in capsys.readouterr().err


# -- demotions and loads in one post: the peer ends where the owner's order would take it ---------

_PUBLISHED = st.lists(st.tuples(st.sampled_from(["load", "demote"]), st.sampled_from("abc")))


@settings(max_examples=100, deadline=None)
@given(ops=_PUBLISHED, held=st.sets(st.sampled_from("abc")))
def test_a_post_of_demotions_and_loads_leaves_the_peer_as_their_order_would(
    ops: list[tuple[str, str]], held: set[str]
) -> None:
    """Loads (prefetches: no victims) and demotions published in any order, then posted at
    once: the receiver applies the post's demotions before its loads, and ends holding
    exactly the models the same calls applied one by one, in order, leave held."""
    from gpufaas.cache import ClusterDirectory
    from gpufaas.scheduler.residency_events import note_peer_demotions, note_peer_loads

    sender = _bare_replicas(2, "leader")[0].replicas
    assert sender is not None
    events = sender.events

    def view() -> ClusterDirectory:
        directory = ClusterDirectory()
        directory.add_device("n/0", capacity_bytes=1 << 20)
        for model in sorted(held):
            directory.note_loaded("n/0", model, size_bytes=1)
        return directory

    expected, got = view(), view()
    for kind, model in ops:
        if kind == "load":
            events.publish("n/0", model, size_bytes=1, victims=())
            load = {"device": "n/0", "model": model, "size": 1, "victims": []}
            note_peer_loads(expected, [load], known_size=lambda m: None)
        else:
            events.publish_demotion("n/0", model)
            note_peer_demotions(expected, [("n/0", model)])
    note_peer_demotions(got, events._demoted)  # as receive applies a post: demotions first
    note_peer_loads(got, events._outbox, known_size=lambda m: None)
    assert set(got.models()) == set(expected.models())
