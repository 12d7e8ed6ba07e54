"""The gateway's HTTP front (scheduler/front.py) over real sockets, against a real GPU manager.

Inference is answered straight from the parser and every other route through the ASGI app;
these tests speak raw HTTP/1.1 so that keep-alive, pipelining, refusals before the body and the
read deadlines are seen as a client sees them.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import pytest
from tiny_manager import tiny_mlp_manager

from gpufaas.core.protocol import encode_request
from gpufaas.scheduler.front import FrontSettings, HttpFront
from gpufaas.scheduler.gateway import Gateway, create_app
from gpufaas.scheduler.main import build_gateway

TIMEOUT = 30  # a bound on every read: a missing answer fails the test instead of hanging it
MAX_BODY = 1 << 16
INFER = "/v2/models/tiny-mlp/infer"
JSON_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
).encode()


@dataclass
class Front:
    gateway: Gateway
    front: HttpFront
    port: int

    async def connect(self) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return Connection(reader, writer)

    def requests(self, code: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(
            "gpufaas_requests_total", {"model": "tiny-mlp", "code": code}
        )
        return value or 0.0


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def error(self) -> str:
        found = json.loads(self.body)["error"]
        assert isinstance(found, str)
        return found


class Connection:
    """A raw HTTP/1.1 client connection: write bytes, read answers in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = httptools.HttpResponseParser(self)
        self.replies: collections.deque[Reply] = collections.deque()
        self._headers: dict[bytes, bytes] = {}
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._headers, self._body = {}, bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.replies.append(Reply(status, self._headers, bytes(self._body)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> Reply:
        while not self.replies:
            data = await asyncio.wait_for(self.reader.read(1 << 16), TIMEOUT)
            if not data:
                raise EOFError("the server closed the connection")
            self.parser.feed_data(data)
        return self.replies.popleft()

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF) with nothing more to read."""
        rest = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with_suppressed = asyncio.gather(self.writer.wait_closed(), return_exceptions=True)
        await with_suppressed


def post(path: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()


@pytest.fixture
def max_connections() -> int | None:
    return None  # a test that needs a cap overrides this fixture


@pytest.fixture
async def system(
    tmp_path: Path, example_models_dir: Path, max_connections: int | None
) -> AsyncIterator[Front]:
    async with tiny_mlp_manager(tmp_path, example_models_dir) as (url, functions):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        settings = FrontSettings(
            max_body_bytes=MAX_BODY,
            header_timeout_s=0.5,
            body_timeout_s=0.5,
            keep_alive_s=5.0,
            max_connections=max_connections,
        )
        front = HttpFront(create_app(gateway), gateway=gateway, settings=settings)
        await front.start(host="127.0.0.1", port=0)  # the lifespan starts the gateway
        try:
            yield Front(gateway, front, front.ports[0])
        finally:
            await front.close()  # ... and stops it


async def test_many_requests_on_one_keep_alive_connection(system: Front) -> None:
    binary, headers = encode_request({"x": (np.ones((1, 16), np.float32), "FP32")})
    conn = await system.connect()
    outputs = []
    for i in range(40):
        if i % 2:
            await conn.send(post(INFER, JSON_BODY))
        else:
            await conn.send(post(INFER, binary, **headers))
        reply = await conn.reply()
        assert reply.status == 200, reply.body
        assert b"connection" not in reply.headers
        outputs.append(reply.body)
    assert len(system.front.connections) == 1
    assert system.requests("200") == 40
    await conn.close()


async def test_pipelined_requests_are_answered_in_order(system: Front) -> None:
    conn = await system.connect()
    warm = post(INFER, JSON_BODY)
    await conn.send(warm)
    assert (await conn.reply()).status == 200
    batch = [
        post(INFER, JSON_BODY),
        get("/v2/health/live"),
        post("/v2/models/absent/infer", JSON_BODY),
        post(INFER, b'{"inputs": []}'),
        get("/v2/models/tiny-mlp"),
        post(INFER, JSON_BODY),
    ]
    await conn.send(b"".join(batch))  # one write: the server sees them back to back
    replies = [await conn.reply() for _ in batch]
    assert [r.status for r in replies] == [200, 200, 404, 400, 200, 200]
    assert json.loads(replies[1].body) == {"live": True}
    assert "absent" in replies[2].error()
    assert json.loads(replies[4].body)["name"] == "tiny-mlp"
    assert replies[0].body == replies[5].body
    await conn.close()


async def test_thousands_of_pipelined_requests_answered_at_once_do_not_recurse(
    system: Front,
) -> None:
    """Each of these is answered without waiting (an unknown model: 404), so the next one
    starts from the answer of the one before; that must not nest call in call."""
    conn = await system.connect()
    count = 3000
    await conn.send(post("/v2/models/absent/infer", JSON_BODY) * count)
    statuses = [(await conn.reply()).status for _ in range(count)]
    assert statuses == [404] * count
    await conn.send(post(INFER, JSON_BODY))  # and the connection serves on
    assert (await conn.reply()).status == 200
    await conn.close()


async def test_an_oversized_content_length_is_413_before_the_body_is_read(system: Front) -> None:
    conn = await system.connect()
    head = f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    await conn.send(head.encode())  # and no body at all: the answer may not wait for it
    reply = await conn.reply()
    assert reply.status == 413
    assert f"limit of {MAX_BODY} bytes" in reply.error()
    assert reply.headers[b"x-gpufaas-reason"] == b"InvalidRequest"
    assert reply.headers[b"connection"] == b"close"
    assert await conn.closed()
    assert system.requests("200") == 0


async def test_a_refusal_reaches_a_client_still_sending_its_body(system: Front) -> None:
    """No Expect: the client sends a body over the limit at once. The 413 must reach it: a
    plain close with its bytes unread would reset the connection under the answer."""
    conn = await system.connect()
    body = b"x" * (16 * MAX_BODY)
    conn.writer.write(post(INFER, body))  # the server refuses after the headers
    reply = await conn.reply()
    assert reply.status == 413
    await conn.close()


async def test_a_chunked_body_is_served_and_bounded(system: Front) -> None:
    def chunked(body: bytes, size: int) -> bytes:
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"

    head = f"POST {INFER} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    conn = await system.connect()
    await conn.send(head + chunked(JSON_BODY, 50))
    assert (await conn.reply()).status == 200
    await conn.send(head + chunked(b" " * (MAX_BODY + 10), 4096))
    reply = await conn.reply()
    assert reply.status == 413
    assert await conn.closed()


@pytest.mark.parametrize(
    ("head", "status", "needle"),
    [
        (f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
        (f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
        (f"POST {INFER} HTTP/1.1\r\nHost: g\r\n\r\n", 411, "Content-Length"),
        (
            f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
            "\r\n\r\n",
            400,
            "Transfer-Encoding",
        ),
        (f"POST {INFER} HTTP/1.1\r\nHost: g\r\nX-Big: {'a' * 70_000}\r\n\r\n", 431, "headers"),
        (
            f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nExpect: magic\r\n\r\n",
            417,
            "expectation",
        ),
        ("GARBAGE\r\n\r\n", 400, "malformed"),
    ],
    ids=["not-a-number", "negative", "missing", "both-lengths", "huge-headers", "expect", "junk"],
)
async def test_bad_framing_is_a_clear_error_and_the_server_keeps_serving(
    system: Front, head: str, status: int, needle: str
) -> None:
    conn = await system.connect()
    await conn.send(head.encode())
    reply = await conn.reply()
    assert reply.status == status
    assert needle in reply.error()
    assert "Traceback" not in reply.error()
    assert await conn.closed()
    fresh = await system.connect()
    await fresh.send(post(INFER, JSON_BODY))
    assert (await fresh.reply()).status == 200
    await fresh.close()


async def test_expect_100_continue_is_answered_before_the_body(system: Front) -> None:
    conn = await system.connect()
    head = f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: {len(JSON_BODY)}\r\n"
    await conn.send((head + "Expect: 100-continue\r\n\r\n").encode())
    assert (await conn.reply()).status == 100  # curl waits for this before a big body
    await conn.send(JSON_BODY)
    assert (await conn.reply()).status == 200
    # too big: refused at once, no 100, no body read
    head = f"POST {INFER} HTTP/1.1\r\nHost: g\r\nContent-Length: {MAX_BODY + 1}\r\n"
    await conn.send((head + "Expect: 100-continue\r\n\r\n").encode())
    assert (await conn.reply()).status == 413
    await conn.close()


async def test_a_client_gone_mid_body_runs_nothing_and_leaves_nothing(system: Front) -> None:
    conn = await system.connect()
    await conn.send(post(INFER, JSON_BODY)[:-10])  # all but the last 10 bytes of the body
    await conn.close()
    for _ in range(100):  # the server sees the close on its next loop turns
        if not system.front.connections:
            break
        await asyncio.sleep(0.01)
    assert system.front.connections == set()
    assert system.requests("200") == 0 and system.requests("400") == 0
    fresh = await system.connect()
    await fresh.send(post(INFER, JSON_BODY))
    assert (await fresh.reply()).status == 200
    await fresh.close()


async def test_slow_headers_are_cut_off_with_408(system: Front) -> None:
    """Slow-loris: one header line at a time, each well within any per-read timeout; the
    headers' deadline (0.5 s here) counts from the request's first byte."""
    conn = await system.connect()
    await conn.send(f"POST {INFER} HTTP/1.1\r\nHost: g\r\n".encode())

    async def dribble() -> None:
        for i in range(TIMEOUT * 20):  # longer than a read waits
            await conn.send(b"X-%d: a\r\n" % i)
            await asyncio.sleep(0.1)

    dribbling = asyncio.create_task(dribble())
    try:
        reply = await conn.reply()
    finally:
        dribbling.cancel()
        await asyncio.gather(dribbling, return_exceptions=True)
    assert reply.status == 408
    assert "headers" in reply.error()


async def test_a_stalled_body_is_cut_off_with_408(system: Front) -> None:
    conn = await system.connect()
    await conn.send(post(INFER, JSON_BODY)[:-10])
    reply = await conn.reply()
    assert reply.status == 408
    assert "body" in reply.error()
    assert await conn.closed()
    assert system.requests("200") == 0


async def test_other_routes_go_through_the_app(system: Front) -> None:
    conn = await system.connect()
    expected: list[tuple[bytes, int, Any]] = [
        (get("/v2/health/ready"), 200, {"ready": True}),
        (get("/v2"), 200, None),
        (get("/v2/models/tiny-mlp/ready"), 200, {"name": "tiny-mlp", "ready": True}),
        (post("/v2/repository/index", b""), 200, None),
        (get("/v2/models/absent"), 404, None),
        (get("/v2/no/such/route"), 404, None),
        (get(INFER), 405, None),  # only POST is inference
        (get("/metrics"), 200, None),
    ]
    for request, status, body in expected:
        await conn.send(request)
        reply = await conn.reply()
        assert reply.status == status, (request, reply.body)
        if body is not None:
            assert json.loads(reply.body) == body
        if status >= 400:
            assert "error" in json.loads(reply.body)
    await conn.close()
    head = await system.connect()  # read raw: a response parser cannot know it answers a HEAD
    await head.send(b"HEAD /v2/health/live HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(head.reader.read(), TIMEOUT)
    top, _, after = raw.partition(b"\r\n\r\n")
    # the app's 405 (GET only), its length kept and its body left out, as HEAD wants
    assert top.startswith(b"HTTP/1.1 405 ") and b"content-length: 30" in top.lower()
    assert after == b""


def post10(path: str, body: bytes, *, connection: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.0", f"Content-Length: {len(body)}"]
    lines += [f"Connection: {connection}"] if connection else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_an_http10_client_keeps_its_connection_only_when_it_asks(system: Front) -> None:
    """HTTP/1.0 closes after each answer unless the client sends ``Connection: keep-alive``;
    then the answer must say ``keep-alive`` too, or the client waits for a close that never
    comes (ab -k, old proxies)."""
    kept = await system.connect()
    for _ in range(3):
        await kept.send(post10(INFER, JSON_BODY, connection="keep-alive"))
        reply = await kept.reply()
        assert reply.status == 200, reply.body
        assert reply.headers[b"connection"].lower() == b"keep-alive"
    assert len(system.front.connections) == 1
    await kept.send(post10("/v2/models/absent/infer", JSON_BODY, connection="Keep-Alive"))
    reply = await kept.reply()  # an error answer keeps the connection too, and says so
    assert reply.status == 404
    assert reply.headers[b"connection"].lower() == b"keep-alive"
    await kept.close()
    plain = await system.connect()
    await plain.send(post10(INFER, JSON_BODY))
    reply = await plain.reply()
    assert reply.status == 200
    assert reply.headers[b"connection"] == b"close"
    assert await plain.closed()


async def test_connection_close_is_honoured(system: Front) -> None:
    conn = await system.connect()
    await conn.send(post(INFER, JSON_BODY, Connection="close"))
    reply = await conn.reply()
    assert reply.status == 200
    assert reply.headers[b"connection"] == b"close"
    assert await conn.closed()
    routed = await system.connect()  # the same through the ASGI bridge
    await routed.send(b"GET /v2/health/live HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    reply = await routed.reply()
    assert reply.status == 200
    assert reply.headers[b"connection"] == b"close"
    assert await routed.closed()


@pytest.mark.parametrize("max_connections", [2])
async def test_connections_over_the_cap_are_refused_with_503_and_closed(system: Front) -> None:
    held = [await system.connect() for _ in range(2)]
    for conn in held:  # both served: under the cap
        await conn.send(post(INFER, JSON_BODY))
        assert (await conn.reply()).status == 200
    extra = await system.connect()
    await extra.send(post(INFER, JSON_BODY))
    reply = await extra.reply()  # answered at once, never left waiting
    assert reply.status == 503
    assert reply.headers[b"retry-after"] == b"1"
    assert reply.headers[b"x-gpufaas-reason"] == b"Overloaded"
    assert "the limit is 2" in reply.error()
    assert await extra.closed()
    assert system.requests("200") == 2  # the refused request ran nowhere
    for conn in held:  # the held ones are served on
        await conn.send(post(INFER, JSON_BODY))
        assert (await conn.reply()).status == 200
    await held[0].close()
    for _ in range(100):  # its close reaches the server
        if len(system.front.connections) < 2:
            break
        await asyncio.sleep(0.01)
    again = await system.connect()  # room again: served
    await again.send(post(INFER, JSON_BODY))
    assert (await again.reply()).status == 200
    await again.close()
    await held[1].close()
