"""A peer's link endpoint lookup (core/hostlink.py, ``endpoint_in_state``; the node's and the
coordinator's ``_endpoint_of``): an answer is remembered, a 5xx or no answer is a failure that
may pass, which the host links try again after their backoff. Before, any non-200 was "no
endpoint", remembered until the node restarted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufaas.core.hostlink import (
    EndpointUnavailable,
    HostLinks,
    LinkEndpoint,
    LinkServer,
    endpoint_in_state,
    host_identity,
)
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.shards import ShardHost
from gpufaas.scheduler.coordinator import Coordinator

_LINK = {"host": "boot:1:2", "socket": "/dev/shm/gpufaas-fsd-sock-x/link.sock"}
_STATE = {"device": "cpu:0", "shards": {}, "link": _LINK}

Lookup = Callable[[str], Awaitable[LinkEndpoint | None]]


def test_a_state_with_a_link_gives_it_and_one_without_says_none() -> None:
    assert endpoint_in_state(200, json.dumps(_STATE).encode()) == LinkEndpoint(**_LINK)
    assert endpoint_in_state(200, json.dumps({**_STATE, "link": None}).encode()) is None
    assert endpoint_in_state(200, json.dumps({"shards": {}}).encode()) is None  # older node


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"link": "x"}', b'{"link": {"host": "h"}}',
             b'{"link": {"host": 1, "socket": 2}}'],
)  # fmt: skip
def test_a_200_that_is_no_nodes_state_is_an_answer_without_an_endpoint(body: bytes) -> None:
    assert endpoint_in_state(200, body) is None


@given(status=st.integers(500, 599), body=st.binary(max_size=64))
def test_a_5xx_is_a_failure_that_may_pass_never_no_endpoint(status: int, body: bytes) -> None:
    with pytest.raises(EndpointUnavailable, match=f"HTTP {status}"):
        endpoint_in_state(status, body)


@given(status=st.sampled_from([408, 429]))
def test_a_timeout_or_too_many_requests_is_a_failure_that_may_pass(status: int) -> None:
    with pytest.raises(EndpointUnavailable):
        endpoint_in_state(status, json.dumps(_STATE).encode())


@given(status=st.integers(201, 499).filter(lambda s: s not in (408, 429)))
def test_any_other_answer_is_a_definitive_no(status: int) -> None:
    assert endpoint_in_state(status, json.dumps(_STATE).encode()) is None


class _Peer:
    """A peer node's shard-state route over real HTTP: the answers lined up, in order, then
    ``then`` (each a status and a JSON body)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, object]] = []
        self.then: tuple[int, object] = (200, _STATE)
        self.asked = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.asked += 1
            status, body = self.answers.pop(0) if self.answers else self.then
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} Answer\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[_Peer]:
    node = _Peer()
    server = await asyncio.start_server(node.handle, "127.0.0.1", 0)
    node.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield node
    finally:
        server.close()


@pytest.fixture(params=["node", "coordinator"])
async def lookup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lookup]:
    """A node's lookup of a peer node (its shard host's), or the coordinator's of a node."""
    if request.param == "node":
        runtime = build_runtime(
            cpu_devices=1, device_memory_bytes=1 << 20, host_memory_bytes=1 << 20,
            artifact_dir=tmp_path / "node", disk_cache_bytes=0, force_cpu=True,
        )  # fmt: skip
        host = ShardHost(store=runtime.artifacts.store, devices=list(runtime.devices.values()))
        yield host._endpoint_of
        await host.close()
    else:
        coordinator = Coordinator(artifact_base=str(tmp_path / "shards"))
        yield coordinator._endpoint_of
        await coordinator.close()


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_peer_answering_5xx_is_unavailable_not_without_an_endpoint(
    lookup: Lookup, peer: _Peer, status: int
) -> None:
    peer.answers = [(status, {"error": "starting"})]
    with pytest.raises(EndpointUnavailable, match=f"HTTP {status}"):
        await lookup(peer.url)
    assert await lookup(peer.url) == LinkEndpoint(**_LINK)  # the next answer is read


async def test_answers_are_read_as_the_peer_gave_them(lookup: Lookup, peer: _Peer) -> None:
    peer.answers = [(200, {**_STATE, "link": None}), (404, {"detail": "Not Found"})]
    assert await lookup(peer.url) is None  # shared memory off there
    assert await lookup(peer.url) is None  # no shard-state route: an older node
    assert await lookup(peer.url) == LinkEndpoint(**_LINK)


async def test_a_peer_not_listening_raises_for_a_retry(lookup: Lookup, peer: _Peer) -> None:
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await lookup(url)


async def test_a_node_whose_peer_answered_5xx_links_once_the_backoff_is_over(
    lookup: Lookup, peer: _Peer, tmp_path: Path
) -> None:
    """End to end with the host links: the peer's 503 keeps it on HTTP for the backoff only;
    then it is asked again, and the link is made (before: "no endpoint" for good)."""
    server = LinkServer(lambda notice, values: 202, directory=tmp_path)
    endpoint = await server.start()
    peer.answers = [(503, {"error": "starting"})]
    peer.then = (200, {**_STATE, "link": endpoint.as_json()})
    now = [0.0]
    links = HostLinks(endpoint_of=lookup, ring_bytes=1 << 16, connect_timeout_s=30.0,
                      retry_first_s=1.0, retry_most_s=8.0, clock=lambda: now[0])  # fmt: skip
    links.identity = host_identity(tmp_path)
    try:
        assert await links.find(peer.url) is None  # 503: HTTP for now
        assert peer.asked == 1 and not links._links  # not remembered as an answer
        now[0] = 0.5
        assert await links.find(peer.url) is None and peer.asked == 1  # backing off
        now[0] = 1.0
        assert await links.find(peer.url) is None  # asked again, in the background
        retry = links._links[peer.url]
        link = await asyncio.wait_for(asyncio.shield(retry), 30)
        assert link is not None and await links.find(peer.url) is link
        assert peer.asked == 2
    finally:
        await links.close()
        await server.close()
