"""A forward to the placement owner that fails or hangs: the request key, recovery from the
managers, the hung-owner bound, and a GPU manager that runs a key once.

The owner is an httpx mock transport here (what it does is the test's to decide); the real
processes are in ``test_replicas_e2e.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from gpufaas.cache import ClusterDirectory
from gpufaas.core.http import REQUEST_KEY_HEADER
from gpufaas.gpu_manager.admission import RequestOnce
from gpufaas.scheduler.gateway import NodeCall
from gpufaas.scheduler.peers import HEARTBEAT_PATH, Membership, static_peers
from gpufaas.scheduler.replicas import FORWARDED_HEADER, Replicas
from gpufaas.scheduler.transport import NodeReply

SELF, OWNER = "http://a", "http://b"
CALL = NodeCall("/v2/models/m/infer", b'{"id": "r1", "inputs": []}', {"content-type": "x"})
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def _replicas(
    owner: Handler,
    *,
    recover: Callable[[str], Awaitable[NodeReply | None]] | None = None,
) -> Replicas:
    directory = ClusterDirectory()
    directory.add_device("n/0", capacity_bytes=100, node="n")
    membership = Membership(self_url=SELF, discover=static_peers([SELF, OWNER]))
    membership.adopt([SELF, OWNER])
    peer = membership.peers[OWNER]
    peer.reachable = True
    peer.client = httpx.AsyncClient(base_url=OWNER, transport=httpx.MockTransport(owner))
    replicas = Replicas(
        membership=membership,
        directory=directory,
        registry=CollectorRegistry(),
        own_misses=lambda: 0.0,
        ownership="leader",
        recover=recover,
        forward_probe_s=0.05,
    )
    replicas.ring.set_members([SELF, OWNER])
    replicas.owner = lambda name: OWNER  # type: ignore[method-assign]  # the peer places
    return replicas


async def _place(replicas: Replicas) -> tuple[NodeReply | None, NodeCall]:
    # Bounded only so that a regression fails instead of hanging the suite.
    placed = await asyncio.wait_for(
        replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[]), timeout=30
    )
    return placed.reply, placed.call


async def test_a_forward_carries_a_fresh_request_key_and_the_owners_answer_comes_back() -> None:
    seen: list[httpx.Request] = []

    async def owner(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"answer", headers={"x-gpufaas-cache": "hit"})

    replicas = _replicas(owner)
    reply, _ = await _place(replicas)
    assert reply is not None and reply.status == 200 and reply.body == b"answer"
    (request,) = seen
    assert request.headers[FORWARDED_HEADER] == SELF
    assert len(request.headers[REQUEST_KEY_HEADER]) == 32
    await replicas.membership.close()


async def test_a_forward_that_never_reached_the_owner_is_placed_here_without_asking() -> None:
    asked: list[str] = []

    async def owner(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return None

    replicas = _replicas(owner, recover=recover)
    reply, call = await _place(replicas)
    assert reply is None and asked == []  # nothing can have run: no need to ask the managers
    assert call.path == CALL.path and REQUEST_KEY_HEADER in call.headers
    assert not replicas.membership.peers[OWNER].reachable
    await replicas.membership.close()


async def test_a_forward_cut_after_the_owner_may_have_dispatched_is_recovered_by_its_key() -> None:
    """The owner took the request (and may have sent it to a manager) and then its connection
    broke: the replica asks the managers for the key's answer instead of running it again, and
    if none has it, runs it here under the same key (the manager runs a key once)."""
    sent_keys: list[str] = []

    async def owner(request: httpx.Request) -> httpx.Response:
        sent_keys.append(request.headers[REQUEST_KEY_HEADER])
        raise httpx.RemoteProtocolError("peer closed connection mid-response", request=request)

    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return NodeReply(status=200, headers={}, body=b"ran once, at the manager")

    replicas = _replicas(owner, recover=recover)
    reply, _ = await _place(replicas)
    assert asked == sent_keys  # the managers were asked for the very key the owner got
    assert reply is not None and reply.body == b"ran once, at the manager"
    assert replicas.metrics.recovered._value.get() == 1
    await replicas.membership.close()

    async def nobody_has_it(key: str) -> NodeReply | None:
        return None

    replicas = _replicas(owner, recover=nobody_has_it)
    reply, call = await _place(replicas)
    assert reply is None
    assert call.headers[REQUEST_KEY_HEADER] == sent_keys[-1]  # run here under the same key
    await replicas.membership.close()


async def test_a_hung_owner_is_given_up_once_its_heartbeat_fails() -> None:
    """The owner holds the forward and stops answering (SIGSTOP): the replica gives up after
    the probe interval plus the heartbeat, recovers by key, and places the request here."""
    release = asyncio.Event()

    async def owner(request: httpx.Request) -> httpx.Response:
        if request.url.path == HEARTBEAT_PATH:
            raise httpx.ReadTimeout("no answer", request=request)
        await release.wait()  # never set: the owner hangs
        return httpx.Response(200)

    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return None

    replicas = _replicas(owner, recover=recover)
    reply, call = await _place(replicas)
    assert reply is None and len(asked) == 1
    assert call.headers[REQUEST_KEY_HEADER] == asked[0]
    assert not replicas.membership.peers[OWNER].reachable
    assert replicas.metrics.forward_failures._value.get() == 1
    await replicas.membership.close()


async def test_a_slow_owner_that_answers_heartbeats_is_waited_for() -> None:
    """A long load at the owner is not a hang: while its heartbeat answers, the forward waits
    (several probe intervals here) and the owner's answer is used."""
    probes = 0

    async def owner(request: httpx.Request) -> httpx.Response:
        nonlocal probes
        if request.url.path == HEARTBEAT_PATH:
            probes += 1
            return httpx.Response(200, json={"id": OWNER})
        while probes < 3:
            await asyncio.sleep(0.01)
        return httpx.Response(200, content=b"slow answer")

    replicas = _replicas(owner)
    reply, _ = await _place(replicas)
    assert reply is not None and reply.body == b"slow answer" and probes >= 3
    assert replicas.membership.peers[OWNER].reachable
    await replicas.membership.close()


async def test_the_owner_passes_a_forwarded_requests_key_on_to_the_manager() -> None:
    replicas = _replicas(lambda request: None)  # type: ignore[arg-type,return-value]

    async def at_the_owner(key: str | None) -> NodeCall:
        replicas.admit("m", forwarded_by=SELF if key else None, request_key=key)
        return replicas.keyed(CALL)

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

    async def compute() -> Response:
        nonlocal runs
        runs += 1
        await go.wait()
        return Response(b"out", status_code=200)

    first = asyncio.create_task(once.run("k", compute))
    await asyncio.sleep(0)
    second = asyncio.create_task(once.run("k", compute))  # the failed forward's retry
    looked = asyncio.create_task(once.lookup("k", wait_s=30))
    await asyncio.sleep(0)
    go.set()
    answers = await asyncio.gather(first, second, looked)
    assert runs == 1 and all(a is not None and a.body == b"out" for a in answers)
    again = await once.run("k", compute)  # after it finished: the kept answer
    assert runs == 1 and again.body == b"out"
    assert await once.lookup("other", wait_s=1) is None
    plain = [await once.run(None, compute) for _ in range(2)]  # no key: every call runs
    assert runs == 3 and len(plain) == 2


async def test_a_failed_run_is_not_kept_so_a_retry_runs() -> None:
    once = RequestOnce()
    statuses = iter([429, 200])

    async def compute() -> Response:
        return Response(b"", status_code=next(statuses))

    assert (await once.run("k", compute)).status_code == 429
    assert await once.lookup("k", wait_s=1) is None
    assert (await once.run("k", compute)).status_code == 200
    assert (await once.lookup("k", wait_s=1)) is not None


def test_kept_answers_are_bounded_in_bytes_and_time() -> None:
    now = [0.0]
    once = RequestOnce(keep_s=10, max_bytes=10, clock=lambda: now[0])

    async def scenario() -> None:
        for key in ("a", "b", "c"):
            body = key.encode() * 4

            async def compute(body: bytes = body) -> Response:
                return Response(body)

            await once.run(key, compute)
        assert await once.lookup("a", wait_s=1) is None  # 12 bytes > 10: the oldest went
        assert await once.lookup("c", wait_s=1) is not None
        now[0] = 11.0
        assert await once.lookup("c", wait_s=1) is None  # past keep_s

    asyncio.run(scenario())
