"""The one pooled keep-alive HTTP client (core/peerhttp.py PeerPool; the gateway's NodePool
and the nodes' direct channel both use it) against small real servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gpufaas.scheduler.local import free_port
from gpufaas.scheduler.transport import NodePool, NodeUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    port: int
    connections: int = 0
    requests: int = 0
    heads: list[bytes] = field(default_factory=list)


async def read_request(
    reader: asyncio.StreamReader, heads: list[bytes] | None = None
) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if heads is not None:
        heads.append(head)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Echo: yes\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.base_events.Server] = []

    async def start(handler: Handler) -> Server:
        state = Server(port=free_port())

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(reader, writer, state)
            finally:
                writer.close()

        servers.append(await asyncio.start_server(on_connect, "127.0.0.1", state.port))
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def echo_keep_alive(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
) -> None:
    while (body := await read_request(reader, state.heads)) is not None:
        state.requests += 1
        writer.write(answer(body))
        await writer.drain()


async def echo_then_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
) -> None:
    """Answers one request, then closes the connection without saying so (as a server whose
    keep-alive timeout passed does): the client's next request on it finds it dead."""
    body = await read_request(reader)
    if body is not None:
        state.requests += 1
        writer.write(answer(body))
        await writer.drain()


async def test_sequential_requests_share_one_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(echo_keep_alive)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=4)
    for i in range(5):
        reply = await pool.post("/x", b"body-%d" % i, {"A": "b"})
        assert (reply.status, reply.body, reply.headers["x-echo"]) == (200, b"body-%d" % i, "yes")
    assert server.connections == 1 and pool.idle == 1
    await pool.close()


async def test_concurrent_requests_open_at_most_what_they_need_and_keep_size(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(echo_keep_alive)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=2)
    replies = await asyncio.gather(*(pool.post("/x", b"%d" % i, {}) for i in range(6)))
    assert sorted(r.body for r in replies) == sorted(b"%d" % i for i in range(6))
    assert server.connections == 6 and pool.idle == 2  # the rest closed, not hoarded
    await pool.post("/x", b"again", {})
    assert server.connections == 6
    await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_retried_on_a_fresh_one(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(echo_then_close)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=4)
    for i in range(3):
        reply = await pool.post("/x", b"%d" % i, {})
        assert reply.body == b"%d" % i
        await asyncio.sleep(0.05)  # the server's close arrives while the connection is idle
    assert server.requests == 3
    await pool.close()


async def test_a_server_that_drops_the_request_is_unreachable(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        await read_request(reader)

    server = await serve(drop)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=1)
    with pytest.raises(NodeUnreachable, match="closed before the answer"):
        await pool.post("/x", b"x", {})
    await pool.close()


async def test_no_server_is_unreachable_and_a_slow_one_times_out(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    pool = NodePool(f"http://127.0.0.1:{free_port()}", size=1)
    with pytest.raises(NodeUnreachable, match="cannot connect"):
        await pool.post("/x", b"x", {})

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    server = await serve(silent)
    slow = NodePool(f"http://127.0.0.1:{server.port}", size=1, timeout_s=0.2)
    with pytest.raises(NodeUnreachable, match="no answer"):
        await slow.post("/x", b"x", {})
    await slow.close()


async def test_a_malformed_answer_is_unreachable(serve: Callable[..., Awaitable[Server]]) -> None:
    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    server = await serve(garbage)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=1)
    with pytest.raises(NodeUnreachable, match="malformed"):
        await pool.post("/x", b"x", {})
    await pool.close()


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="plain http"):
        NodePool("https://node:8090", size=1)


async def test_the_pools_and_the_calls_headers_and_a_memoryview_body_go_out(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(echo_keep_alive)
    pool = NodePool(
        f"http://127.0.0.1:{server.port}", size=1, headers={"Authorization": "Bearer t0k"}
    )
    reply = await pool.post("/x", memoryview(b"0123456789")[2:5], {"X-Call": "c"})
    assert reply.body == b"234"
    head = server.heads[0].lower()
    assert b"authorization: bearer t0k\r\n" in head and b"x-call: c\r\n" in head
    await pool.close()


async def test_a_connection_idle_longer_than_idle_s_is_not_reused(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """The server may close it just as the next call goes out; a fresh one avoids the race."""
    server = await serve(echo_keep_alive)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=2, idle_s=0.02)
    await pool.post("/x", b"a")
    await asyncio.sleep(0.1)
    await pool.post("/x", b"b")
    assert server.connections == 2 and pool.connects == 2
    await pool.close()


async def test_a_timed_out_call_is_not_sent_again(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """No byte of an answer, but the peer read it and may be running it: only a connection the
    peer had closed while idle is a reason to send a call once more."""

    async def answer_once_then_silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        while (body := await read_request(reader)) is not None:
            state.requests += 1
            if state.requests == 1:
                writer.write(answer(body))
                await writer.drain()

    server = await serve(answer_once_then_silent)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=1)
    await pool.post("/x", b"warm")  # a reused connection next
    with pytest.raises(NodeUnreachable, match="no answer"):
        await pool.post("/x", b"slow", timeout_s=0.2)  # the call's own limit, not the pool's
    await asyncio.sleep(0.1)
    assert server.requests == 2
    await pool.close()


async def test_each_call_is_held_to_its_own_time_limit_on_a_reused_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """A connection watches its calls' limits with one timer that outlives a call: one armed
    for an earlier call must neither fail a later call still within its own limit, nor let a
    later call with a nearer limit wait past it."""

    async def late_second_silent_third(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        while (body := await read_request(reader)) is not None:
            state.requests += 1
            if state.requests == 2:
                await asyncio.sleep(0.4)  # past the first call's limit, within its own
            if state.requests < 3:
                writer.write(answer(body))
                await writer.drain()

    server = await serve(late_second_silent_third)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=1)
    assert (await pool.post("/x", b"first", timeout_s=0.2)).body == b"first"
    assert (await pool.post("/x", b"second", timeout_s=5.0)).body == b"second"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NodeUnreachable, match=r"no answer within 0\.2 s"):
        await asyncio.wait_for(pool.post("/x", b"third", timeout_s=0.2), 3.0)
    assert loop.time() - started < 1.5  # its own 0.2 s, not the second call's 5 s
    assert pool.connects == 1 and server.requests == 3
    await pool.close()


async def test_a_cancelled_call_closes_its_connection(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """Its late answer would otherwise be read as the next call's."""

    async def echo_late(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Server
    ) -> None:
        while (body := await read_request(reader)) is not None:
            await asyncio.sleep(0.2)
            writer.write(answer(body))
            await writer.drain()

    server = await serve(echo_late)
    pool = NodePool(f"http://127.0.0.1:{server.port}", size=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.post("/x", b"first"), 0.05)
    await asyncio.sleep(0.05)
    assert repr(pool) == f"<NodePool 127.0.0.1:{server.port}: 0 idle, 0 open>"
    assert (await pool.post("/x", b"second")).body == b"second"
    await pool.close()
