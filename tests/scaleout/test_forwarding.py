"""A forward to the placement owner that fails or hangs: the request key, recovery from the
managers, the hung-owner bound, and a GPU manager that runs a key once.

The owner is an httpx mock transport here (what it does is the test's to decide); the real
processes are in ``test_replicas_e2e.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
from replica_support import SELF, close_replicas, replica_with_owner

from gpufaas.core.http import REQUEST_KEY_HEADER
from gpufaas.gpu_manager.admission import RequestOnce
from gpufaas.gpu_manager.framed import Answer
from gpufaas.scheduler.gateway import NodeCall
from gpufaas.scheduler.peers import HEARTBEAT_PATH, static_peers
from gpufaas.scheduler.replicas import FORWARDED_HEADER, Replicas
from gpufaas.scheduler.transport import NodeReply

CALL = NodeCall("/v2/models/m/infer", b'{"id": "r1", "inputs": []}', {"content-type": "x"})
Behaviour = Literal["answer", "reset", "hang", "slow"]


class Owner:
    """The placement owner as a raw HTTP/1.1 server on 127.0.0.1: it records each forward's
    headers and then answers, resets the connection, hangs, or answers once its heartbeat has
    been probed three times (``slow``). Heartbeats go to an httpx mock of the same peer."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.forwards: list[dict[str, str]] = []
        self.probes = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Owner:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        await reader.readexactly(int(headers.get("content-length", "0")))
        self.forwards.append(headers)
        if self.behaviour == "reset":  # took it (and may have dispatched it), then died
            writer.transport.abort()
            return
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        while self.behaviour == "slow" and self.probes < 3:
            await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nx-gpufaas-cache: hit\r\n\r\nanswer")
        await writer.drain()

    async def heartbeat(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == HEARTBEAT_PATH
        self.probes += 1
        if self.behaviour == "hang":
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json={"id": self.url})


def _replicas(
    owner: Owner | str,
    *,
    recover: Callable[[str], Awaitable[NodeReply | None]] | None = None,
) -> Replicas:
    url = owner if isinstance(owner, str) else owner.url
    heartbeat = owner.heartbeat if isinstance(owner, Owner) else None
    return replica_with_owner(url, heartbeat=heartbeat, ownership="leader", recover=recover)


async def _place(replicas: Replicas) -> tuple[NodeReply | None, NodeCall]:
    # Bounded only so that a regression fails instead of hanging the suite.
    placed = await asyncio.wait_for(
        replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[]), timeout=30
    )
    return placed.reply, placed.call


async def test_a_forward_carries_a_fresh_request_key_and_the_owners_answer_comes_back() -> None:
    async with Owner("answer") as owner:
        replicas = _replicas(owner)
        reply, _ = await _place(replicas)
        assert reply is not None and reply.status == 200 and reply.body == b"answer"
        assert reply.headers["x-gpufaas-cache"] == "hit"
        (headers,) = owner.forwards
        assert headers[FORWARDED_HEADER] == SELF
        assert len(headers[REQUEST_KEY_HEADER]) == 32
        await close_replicas(replicas)


async def test_a_forward_that_fails_to_connect_is_placed_here_under_its_key() -> None:
    from gpufaas.scheduler.local import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return None  # no manager has it

    replicas = _replicas(dead, recover=recover)
    reply, call = await _place(replicas)
    assert reply is None and call.path == CALL.path
    assert call.headers[REQUEST_KEY_HEADER] == asked[0]
    assert not replicas.membership.peers[dead].reachable
    await close_replicas(replicas)


async def test_a_forward_cut_after_the_owner_may_have_dispatched_is_recovered_by_its_key() -> None:
    """The owner took the request (and may have sent it to a manager) and then its connection
    broke: the replica asks the managers for the key's answer instead of running it again, and
    if none has it, runs it here under the same key (the manager runs a key once)."""
    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return NodeReply(status=200, headers={}, body=b"ran once, at the manager")

    async with Owner("reset") as owner:
        replicas = _replicas(owner, recover=recover)
        reply, _ = await _place(replicas)
        assert asked == [owner.forwards[0][REQUEST_KEY_HEADER]]  # the very key the owner got
        assert reply is not None and reply.body == b"ran once, at the manager"
        assert replicas.metrics.recovered._value.get() == 1
        await close_replicas(replicas)

    async def nobody_has_it(key: str) -> NodeReply | None:
        return None

    async with Owner("reset") as owner:
        replicas = _replicas(owner, recover=nobody_has_it)
        reply, call = await _place(replicas)
        assert reply is None
        assert call.headers[REQUEST_KEY_HEADER] == owner.forwards[0][REQUEST_KEY_HEADER]
        await close_replicas(replicas)


async def test_a_hung_owner_is_given_up_once_its_heartbeat_fails() -> None:
    """The owner holds the forward and stops answering (SIGSTOP): the replica gives up after
    the probe interval plus the heartbeat, recovers by key, and places the request here."""
    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return None

    async with Owner("hang") as owner:
        replicas = _replicas(owner, recover=recover)
        reply, call = await _place(replicas)
        assert reply is None and len(asked) == 1 and owner.probes == 1
        assert call.headers[REQUEST_KEY_HEADER] == asked[0]
        assert not replicas.membership.peers[owner.url].reachable
        assert replicas.metrics.forward_failures._value.get() == 1
        await close_replicas(replicas)


async def test_a_slow_owner_that_answers_heartbeats_is_waited_for() -> None:
    """A long load at the owner is not a hang: while its heartbeat answers, the forward waits
    (several probe intervals here) and the owner's answer is used."""
    async with Owner("slow") as owner:
        replicas = _replicas(owner)
        reply, _ = await _place(replicas)
        assert reply is not None and reply.body == b"answer" and owner.probes >= 3
        assert replicas.membership.peers[owner.url].reachable
        await close_replicas(replicas)


async def test_the_owner_passes_a_forwarded_requests_key_on_to_the_manager() -> None:
    replicas = _replicas("http://b")

    async def at_the_owner(key: str | None) -> NodeCall:
        replicas.admit("m", forwarded_by=SELF if key else None, request_key=key)
        return replicas.begin("m", CALL)

    keyed = await asyncio.create_task(at_the_owner("k1"))
    assert keyed.headers[REQUEST_KEY_HEADER] == "k1" and keyed.body == CALL.body
    plain = await asyncio.create_task(at_the_owner(None))
    assert REQUEST_KEY_HEADER not in plain.headers
    await replicas.membership.close()


# -- the GPU manager's side -----------------------------------------------------------------------


async def test_a_manager_runs_a_key_once_and_a_lookup_joins_the_run() -> None:
    once = RequestOnce()
    runs = 0
    go = asyncio.Event()

    async def compute() -> Answer:
        nonlocal runs
        runs += 1
        await go.wait()
        return 200, [], b"out"

    first = asyncio.create_task(once.run("k", compute))
    await asyncio.sleep(0)
    second = asyncio.create_task(once.run("k", compute))  # the failed forward's retry
    looked = asyncio.create_task(once.lookup("k", wait_s=30))
    await asyncio.sleep(0)
    go.set()
    answers = await asyncio.gather(first, second, looked)
    assert runs == 1 and all(a is not None and a[2] == b"out" for a in answers)
    again = await once.run("k", compute)  # after it finished: the kept answer
    assert runs == 1 and again[2] == b"out"
    assert await once.lookup("other", wait_s=1) is None
    plain = [await once.run(None, compute) for _ in range(2)]  # no key: every call runs
    assert runs == 3 and len(plain) == 2


async def test_a_failed_run_is_not_kept_so_a_retry_runs() -> None:
    once = RequestOnce()
    statuses = iter([429, 200])

    async def compute() -> Answer:
        return next(statuses), [], b""

    assert (await once.run("k", compute))[0] == 429
    assert await once.lookup("k", wait_s=1) is None
    assert (await once.run("k", compute))[0] == 200
    assert (await once.lookup("k", wait_s=1)) is not None


def test_kept_answers_are_bounded_in_bytes_and_time() -> None:
    now = [0.0]
    once = RequestOnce(keep_s=10, max_bytes=10, clock=lambda: now[0])

    async def scenario() -> None:
        for key in ("a", "b", "c"):
            body = key.encode() * 4

            async def compute(body: bytes = body) -> Answer:
                return 200, [], body

            await once.run(key, compute)
        assert await once.lookup("a", wait_s=1) is None  # 12 bytes > 10: the oldest went
        assert await once.lookup("c", wait_s=1) is not None
        now[0] = 11.0
        assert await once.lookup("c", wait_s=1) is None  # past keep_s

    asyncio.run(scenario())


# -- a replica's share of a device's slots ---------------------------------------------------------


async def test_with_full_slots_each_replica_may_use_all_of_a_devices_slots() -> None:
    """--replica-slots full (the default): a replica of four runs as many requests on a device
    as one gateway would (the GPU manager bounds them cluster-wide), so it does not queue its
    hits behind its own loads while the device has free slots; 'share' splits the slots."""
    from gpufaas.scheduler.cluster import Cluster
    from gpufaas.scheduler.gateway import Gateway, GatewayConfig
    from gpufaas.scheduler.policy import make_policy
    from gpufaas.scheduler.replica_setup import attach_replicas

    urls = ["http://a", "http://b", "http://c", "http://d"]
    for slots, expected in (("full", 4), ("share", 1)):
        gateway = Gateway(
            cluster=Cluster(manager_urls={}),
            policy=make_policy("lalb"),
            config=GatewayConfig(device_concurrency=4, max_queue_per_device=100),
        )
        replicas = attach_replicas(
            gateway,
            self_url=urls[0],
            discover=static_peers(urls),
            token=None,
            slots=slots,  # type: ignore[arg-type]
        )
        replicas.membership.adopt(urls)
        for peer in replicas.membership.peers.values():
            peer.reachable = True
        replicas._update_ring()
        assert gateway.dispatcher.concurrency == expected
        assert gateway.dispatcher.max_queue == 25  # the queue bound is shared either way
        await replicas.membership.close()


# -- the merged stream: popularity and LRU order across replicas ------------------------------------


async def test_the_owner_ranks_victims_on_every_replicas_requests_and_hits() -> None:
    """Each replica sends its peers its clients' requests (not forwarded ones: the sender
    counted those) and the hits it dispatched; the owner feeds the requests into its
    popularity estimates, once, and its LRU order follows the hits. Without it the placement
    owner ranks eviction victims on 1/N of the stream, and evicts what another replica's
    clients use most (the extra misses measured with replicas were all the owner's
    placements)."""
    from gpufaas.scheduler.estimates import Estimates
    from gpufaas.scheduler.peers import EVENTS_PATH

    sender = _replicas("http://b")

    async def requests(name: str, count: int, *, forwarded: bool = False) -> None:
        for _ in range(count):
            sender.admit(name, forwarded_by="http://c" if forwarded else None)
            sender.begin(name, CALL)

    for name, count in (("popular", 30), ("rare", 2)):
        await asyncio.create_task(requests(name, count))
    await asyncio.create_task(requests("rare", 50, forwarded=True))  # counted at their sender
    sender.touched("n/0", "m0")
    batch = sender.events.uses.take()
    assert batch == {"requests": {"popular": 30, "rare": 2}, "touches": [["n/0", "m0"]]}
    assert not sender.events.uses  # sent once

    estimates = Estimates()
    owner = _replicas("http://b")

    def observe(model: str, count: int) -> None:
        for _ in range(count):
            estimates.observe_request(model)

    owner.events.uses.observe_requests = observe
    directory = owner.directory
    for i in range(10):  # full: m0 least recently used
        directory.note_loaded("n/0", f"m{i}", size_bytes=10)
    assert directory.plan_dispatch("n/0", "new", size_bytes=10) == ["m0"]
    body = {"from": "http://b", "events": [], "uses": batch}
    served = owner.ingress(lambda scope, receive, send: None)  # type: ignore[arg-type,return-value]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served), base_url="http://a"
    ) as client:
        assert (await client.post(EVENTS_PATH, json=body)).status_code == 200
        assert estimates.share("popular") > 10 * estimates.share("rare") > 0
        # the sender's hit on m0 makes it recent here too: m1 is the LRU victim now
        assert directory.plan_dispatch("n/0", "new", size_bytes=10) == ["m1"]
        bad = {**body, "uses": {"requests": {"x": -1}, "touches": []}}
        response = await client.post(EVENTS_PATH, json=bad)
        assert response.status_code == 400 and "bad residency events" in response.text
    await close_replicas(sender)
    await close_replicas(owner)


async def test_residency_events_are_taken_at_the_ingress_and_need_the_peer_token() -> None:
    """Peers' events are answered by the ingress layer (no FastAPI on the owner's hot
    moments), behind the peer token; bad ones are a 400 that says why."""
    from fastapi import FastAPI

    from gpufaas.cache import Residency
    from gpufaas.scheduler.peers import EVENTS_PATH

    replicas = _replicas("http://b")
    replicas.token = "peer-secret"
    app = FastAPI()
    replicas.install(app)
    served = replicas.ingress(app)
    event = {"from": "http://b", "events": [{"device": "n/0", "model": "m", "size": 10}]}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served), base_url="http://a"
    ) as client:
        assert (await client.post(EVENTS_PATH, json=event)).status_code == 401
        auth = {"Authorization": "Bearer peer-secret"}
        response = await client.post(EVENTS_PATH, json=event, headers=auth)
        assert response.status_code == 200 and response.json() == {"applied": 1}
        assert replicas.directory.state("n/0", "m") is Residency.LOADING
        bad = await client.post(EVENTS_PATH, content=b"{", headers=auth)
        assert bad.status_code == 400 and "bad residency events" in bad.text
    await close_replicas(replicas)
