"""Membership, discovery and the replica bookkeeping (peers and the API server stood in for on
loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.scheduler.peers import Membership, kubernetes_peers, peer_urls, static_peers
from gpufaas.scheduler.replicas import Replicas
from gpufaas.scheduler.ring import Ring


def test_peer_urls_are_one_per_ready_pod_address() -> None:
    slices = [
        {
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": True}},
                # two replicas on one node are two peers
                {"addresses": ["10.0.0.2"], "nodeName": "n1", "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                {"addresses": ["fd00::4"]},
            ],
        },
        {"ports": [{"name": "metrics", "port": 9090}], "endpoints": [{"addresses": ["10.0.0.9"]}]},
    ]
    assert peer_urls(slices) == [
        "http://10.0.0.1:8080",
        "http://10.0.0.2:8080",
        "http://[fd00::4]:8080",
    ]


async def test_modes_follow_reachability() -> None:
    alone = Membership(self_url="http://a", discover=static_peers([]))
    await alone.refresh()
    assert alone.mode == "single" and alone.live() == ["http://a"]

    membership = Membership(
        self_url="http://a/", discover=static_peers(["http://a", "http://b/", "http://c"])
    )
    membership.adopt(await membership.discover())
    assert membership.mode == "local"  # no heartbeat has answered yet: nothing is assumed
    for peer in membership.peers.values():  # as if their heartbeats answered
        peer.reachable = True
    assert membership.mode == "coordinated"
    assert sorted(membership.live()) == ["http://a", "http://b", "http://c"]
    assert membership.mark_unreachable("http://b", "test")
    assert not membership.mark_unreachable("http://b", "again")
    assert membership.mode == "degraded" and "http://b" not in membership.live()
    membership.mark_unreachable("http://c", "test")
    assert membership.mode == "local" and membership.live() == ["http://a"]
    health = membership.health()
    assert health["mode"] == "local" and health["peers"]["http://b"] == "unreachable"
    await membership.close()


async def test_a_heartbeat_that_fails_to_connect_makes_a_peer_unreachable() -> None:
    from gpufaas.scheduler.local import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    membership = Membership(self_url="http://127.0.0.1:1", discover=static_peers([dead]))
    await membership.refresh()
    assert membership.mode == "local" and membership.peers[dead].reachable is False
    await membership.close()


async def test_a_peer_that_refuses_the_token_is_off_the_ring_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat answered 401 or 403 (the peer refuses this replica's peer token): the peer
    is unreachable and off the ring, the health details say so, and a warning names the token,
    once per refusal (a peer that never answered would else leave nothing in the log); a 200
    puts it back."""
    status = [401]

    def heartbeat(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status[0], json={"id": "http://b"})

    membership = Membership(self_url="http://a", discover=static_peers(["http://b"]), token="t")
    membership.adopt(["http://b"])
    peer = membership.peers["http://b"]
    await peer.client.aclose()
    peer.client = httpx.AsyncClient(base_url="http://b", transport=httpx.MockTransport(heartbeat))
    refusals = []
    for answer in (401, 401, 200, 403):
        status[0] = answer
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpufaas.scheduler.peers"):
            await membership.probe("http://b")
        refusals.append([r.getMessage() for r in caplog.records if "peer token" in r.message])
        live = membership.live()
        assert ("http://b" in live) is (answer == 200)
        assert membership.health()["peers"]["http://b"] == (
            "reachable" if answer == 200 else "unreachable"
        )
    assert [len(r) for r in refusals] == [1, 0, 0, 1]
    assert "HTTP 401" in refusals[0][0] and "HTTP 403" in refusals[3][0]
    await membership.close()


def _replicas(
    self_url: str, peers: list[str], *, ownership: str = "function"
) -> tuple[Replicas, ClusterDirectory]:
    directory = ClusterDirectory()
    directory.add_device("n/0", capacity_bytes=100, node="n")
    membership = Membership(self_url=self_url, discover=static_peers(peers))
    membership.adopt(peers)
    for peer in membership.peers.values():  # as if their heartbeats answered
        peer.reachable = True
    replicas = Replicas(
        membership=membership,
        directory=directory,
        registry=CollectorRegistry(),
        own_misses=lambda: 3.0,
        ownership=ownership,  # type: ignore[arg-type]
    )
    return replicas, directory


async def test_a_peers_load_is_noted_with_its_victims() -> None:
    replicas, directory = _replicas("http://a", ["http://a", "http://b"])
    directory.note_loaded("n/0", "old", size_bytes=60)
    applied = replicas.events.apply(
        [
            {"device": "n/0", "model": "new", "size": 60, "victims": ["old"]},
            {"device": "n/0", "model": "new", "size": 60, "victims": []},  # already noted
            {"device": "gone/0", "model": "x", "size": 1, "victims": []},  # unknown device
        ]
    )
    assert applied == 1
    assert directory.state("n/0", "new") is Residency.LOADING
    assert directory.state("n/0", "old") is None
    await replicas.membership.close()


async def test_admit_counts_owned_requests_and_a_forwarded_one_is_placed_here() -> None:
    import asyncio

    from gpufaas.scheduler.replicas import _FORWARDED_IN

    replicas, _ = _replicas("http://a", ["http://a", "http://b"])
    ring = Ring(["http://a", "http://b"])
    mine = next(f"f{i}" for i in range(100) if ring.owner(f"f{i}") == "http://a")
    theirs = next(f"f{i}" for i in range(100) if ring.owner(f"f{i}") == "http://b")
    assert replicas.owner(mine) == "http://a" and replicas.owner(theirs) == "http://b"

    async def ingress(name: str, forwarded_by: str | None) -> str | None:
        # Each request runs in its own task, as under uvicorn.
        replicas.admit(name, forwarded_by=forwarded_by)
        # The gateway counts popularity only for requests no peer forwarded (counted there).
        assert replicas.forwarded_in() == (forwarded_by is not None)
        return replicas._owner_elsewhere(name)

    assert await asyncio.create_task(ingress(theirs, None)) == "http://b"
    # A forwarded request is placed here whatever the ring says: no forwarding loops.
    assert await asyncio.create_task(ingress(theirs, "http://b")) is None
    assert await asyncio.create_task(ingress(mine, None)) is None
    assert not _FORWARDED_IN.get()  # the marker stayed in the forwarded request's task
    assert replicas.metrics.owned._value.get() == 2  # the forwarded one and the own one
    assert replicas.metrics.forwarded_in._value.get() == 1
    assert replicas.cluster_misses() == 3.0
    await replicas.membership.close()


async def test_with_a_leader_one_replica_places_every_function() -> None:
    urls = ["http://a", "http://b", "http://c"]
    views = [_replicas(url, urls, ownership="leader")[0] for url in urls]
    leaders = {r.owner(f"f{i}") for r in views for i in range(50)}
    assert len(leaders) == 1
    leader = leaders.pop()
    view = next(r for r in views if r.self_id != leader)
    view.membership.mark_unreachable(leader, "test")
    view._update_ring()
    assert view.owner("f1") != leader  # the next one takes over
    for r in views:
        await r.membership.close()


async def test_uses_go_to_the_leader_alone_and_load_events_to_every_peer() -> None:
    """With one leader only it decides evictions: the others send it their requests and hits
    (the merged stream), and every peer their loads; the leader itself sends no uses."""
    import json

    from gpufaas.scheduler.lanes import NodeCall
    from gpufaas.scheduler.transport import NodeReply

    urls = ["http://a", "http://b", "http://c"]
    views = {url: _replicas(url, urls, ownership="leader")[0] for url in urls}
    leader = views["http://a"].owner("")
    sender = next(r for url, r in views.items() if url != leader)
    posted: dict[str, dict[str, object]] = {}

    class Pool:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        async def post(self, path: str, body: bytes, headers: object) -> NodeReply:
            posted[self.peer] = json.loads(body)
            return NodeReply(status=200, headers={}, body=b"")

    for r in views.values():
        for peer in r.membership.peers.values():
            peer.reachable = True
        r.calls.pool = Pool  # type: ignore[assignment,method-assign]
    sender.begin("m", NodeCall("/v2/models/m/infer", b"", {}))
    sender.touched("n/0", "m")
    assert sender.events.uses
    events = [{"device": "n/0", "model": "x", "size": 1, "victims": []}]
    await sender.events._send(events, sender.events.uses.take())
    assert posted[leader]["uses"] == {"requests": {"m": 1}, "touches": [["n/0", "m"]]}
    others = [url for url in urls if url not in (leader, sender.self_id)]
    assert all("uses" not in posted[url] and posted[url]["events"] == events for url in others)
    posted.clear()
    await sender.events._send(
        [], {"requests": {"m": 1}, "touches": []}
    )  # uses alone: the leader only
    assert list(posted) == [leader]
    views[leader].begin("m", NodeCall("/v2/models/m/infer", b"", {}))
    views[leader].touched("n/0", "m")
    assert not views[leader].events.uses  # it decides: nobody needs its uses
    for r in views.values():
        await r.membership.close()


async def _heartbeat_server(
    port: int = 0, *, report: bytes = b"{}", heads: list[bytes] | None = None
) -> tuple[asyncio.Server, int]:
    """A peer that answers every request (its heartbeat) with ``report`` and closes; each
    request's head goes to ``heads``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(report), report)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    return server, server.sockets[0].getsockname()[1]


async def _seconds_until(condition: Callable[[], bool], *, limit_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit_s, f"not within {limit_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_membership_changes_move_the_ring_within_one_sync_interval() -> None:
    """#16: a replica added, killed, back, and removed from discovery moves the owners within
    one sync interval (the next heartbeat round; a peer's heartbeat fails to connect at once
    here). The slack covers the round's own probe and this loop's polling."""
    interval_s, slack_s = 1.0, 0.3
    server, port = await _heartbeat_server()
    a, b = "http://127.0.0.1:1", f"http://127.0.0.1:{port}"
    listed = [a]

    async def discover() -> list[str]:
        return list(listed)

    replicas = Replicas(
        membership=Membership(self_url=a, discover=discover),
        directory=ClusterDirectory(),
        registry=CollectorRegistry(),
        own_misses=lambda: 0.0,
        ownership="function",
    )
    key = next(f"f{i}" for i in range(100) if Ring([a, b]).owner(f"f{i}") == b)
    stop = asyncio.Event()
    running = asyncio.create_task(replicas.run(stop, interval_s=interval_s))
    try:
        await asyncio.sleep(0.1)  # the first heartbeat round: alone
        assert replicas.owner(key) == a and replicas.membership.mode == "single"
        limit = interval_s + slack_s

        listed.append(b)  # scale up: discovery lists it, its heartbeat answers
        await _seconds_until(lambda: replicas.owner(key) == b, limit_s=limit)
        assert replicas.membership.mode == "coordinated"

        server.close()  # killed: its heartbeat fails to connect
        await server.wait_closed()
        await _seconds_until(lambda: replicas.owner(key) == a, limit_s=limit)
        assert replicas.membership.mode == "local"

        server, _ = await _heartbeat_server(port)  # back on its address
        await _seconds_until(lambda: replicas.owner(key) == b, limit_s=limit)

        listed.remove(b)  # scale down: discovery no longer lists it
        await _seconds_until(lambda: replicas.owner(key) == a, limit_s=limit)
        assert replicas.membership.live() == [a]
    finally:
        stop.set()
        await running
        server.close()
        await server.wait_closed()


async def test_the_cluster_wide_misses_add_each_peers_last_heartbeat() -> None:
    """``gpufaas_replica_cluster_misses``: this replica's misses plus what each peer reported
    in its last heartbeat."""
    server, port = await _heartbeat_server(report=b'{"misses": 5}')
    a, b = "http://127.0.0.1:1", f"http://127.0.0.1:{port}"
    registry = CollectorRegistry()
    replicas = Replicas(
        membership=Membership(self_url=a, discover=static_peers([a, b])),
        directory=ClusterDirectory(),
        registry=registry,
        own_misses=lambda: 3.0,
    )
    try:
        assert registry.get_sample_value("gpufaas_replica_cluster_misses") == 3.0
        await replicas.membership.refresh()  # b's heartbeat answers
        assert registry.get_sample_value("gpufaas_replica_cluster_misses") == 8.0
    finally:
        await replicas.membership.close()
        server.close()
        await server.wait_closed()


async def test_kubernetes_peers_are_the_ready_endpoints_of_the_headless_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In Kubernetes a replica lists the EndpointSlices of the gateway's headless Service from
    the API server (here a stand-in, through ``$KUBECONFIG``): its ready pod addresses on the
    ``http`` port, one peer each; a slice of another Service is ignored even if the server
    ignores the label selector."""
    slices = {
        "items": [
            {
                "metadata": {"labels": {"kubernetes.io/service-name": "gw-peers"}},
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                    {"addresses": ["10.0.0.3"]},
                ],
            },
            {
                "metadata": {"labels": {"kubernetes.io/service-name": "other"}},
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.9.9.9"], "conditions": {"ready": True}}],
            },
        ]
    }
    heads: list[bytes] = []
    server, port = await _heartbeat_server(report=json.dumps(slices).encode(), heads=heads)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "peer-test"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        discover = kubernetes_peers(namespace="serving", service="gw-peers")
        assert await discover() == ["http://10.0.0.1:8080", "http://10.0.0.3:8080"]
    finally:
        server.close()
        await server.wait_closed()
    method, target, _ = heads[0].decode().split("\r\n", 1)[0].split(" ")
    url = urlsplit(target)
    assert (method, url.path) == (
        "GET",
        "/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices",
    )
    assert parse_qs(url.query) == {"labelSelector": ["kubernetes.io/service-name=gw-peers"]}
    assert "authorization: bearer peer-test" in heads[0].decode().lower()
