"""Pooled keep-alive HTTP/1.1 between nodes, for the direct channel of sharded models.

Every direct-channel message is one small ``POST`` to a peer node. A general-purpose client
(httpx) costs ~0.7 ms of CPU per call on this machine's cores, more than the receiver's whole
work, and those milliseconds are taken from the shards' own compute (bench/RESULTS.md,
"Distributed inference", per-message cost). :class:`PeerPools` keeps, per peer node, a few
persistent connections, writes the request line, headers and body with one ``writelines``
and parses the answer with httptools (C) on an ``asyncio.Protocol``: no per-call task,
stream or pure-Python parser. One :class:`PeerPools` serves every shard of a node.

A connection the peer closed while idle (its keep-alive timeout) fails before any byte of an
answer arrives; the call is then retried once on a fresh connection, so only a peer that is
really unreachable raises :class:`PeerUnreachable`. Connections idle longer than
``idle_s`` (under uvicorn's 5 s keep-alive) are not reused at all.

The gateway's :mod:`gpufaas.scheduler.transport` ``NodePool`` is the same technique for the
gateway-to-node hop; ``core`` cannot import the gateway, so the node side has this one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["PeerPool", "PeerPools", "PeerReply", "PeerUnreachable"]


class PeerUnreachable(Exception):
    """The peer could not be reached, or the connection broke before its answer."""


@dataclass(frozen=True, slots=True)
class PeerReply:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one call on it at a time."""

    def __init__(self, pool: PeerPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[PeerReply] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._name = ""
        self.got_bytes = False
        self.reusable = True
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:  # HttpParserUpgrade included: never asked for
            self._fail(PeerUnreachable(f"a malformed HTTP answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._fail(PeerUnreachable(f"the connection closed before the answer ({exc or 'EOF'})"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name:
            self._name = name.decode("latin-1").lower()
            self._headers[self._name] = value.decode("latin-1")
        else:  # a value split across reads
            self._headers[self._name] += value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        reply = PeerReply(self._parser.get_status_code(), self._headers, b"".join(self._body))
        self.reusable = self._parser.should_keep_alive()
        self._headers, self._body = {}, []
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(reply)

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)

    async def call(self, head: bytes, body: bytes, timeout_s: float) -> PeerReply:
        assert self._transport is not None
        self.got_bytes = False
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.writelines((head, body))
        try:
            return await asyncio.wait_for(self._reply, timeout_s)
        except TimeoutError:
            self.close()
            raise PeerUnreachable(f"no answer within {timeout_s:.1f} s") from None
        except asyncio.CancelledError:
            self.close()  # its answer would be read as the next call's
            raise
        finally:
            self._reply = None

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class PeerPool:
    """Persistent connections to one peer (``http://host:port``)."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        size: int = 8,
        idle_s: float = 2.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"a peer is a plain http://host:port URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.size = size
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        fixed = {"Host": parts.netloc, **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self.connects = 0  # connections opened so far (a reused pool opens few)

    async def post(self, path: str, body: bytes, *, timeout_s: float) -> PeerReply:
        """POST ``body`` to ``path``: the answer whatever its status, or
        :class:`PeerUnreachable`."""
        head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
            path.encode("ascii"), self._fixed, len(body),
        )  # fmt: skip
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely closed
            if connection.closed or now - connection.idle_since > self.idle_s:
                connection.close()
                continue
            try:
                reply = await connection.call(head, body, timeout_s)
            except PeerUnreachable:
                if connection.got_bytes:
                    raise  # it answered in part: not a stale keep-alive connection
                continue  # closed by the peer while idle: another, or a fresh one
            self._release(connection)
            return reply
        connection = await self._connect()
        reply = await connection.call(head, body, timeout_s)
        self._release(connection)
        return reply

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            connect = loop.create_connection(lambda: _Connection(self), self.host, self.port)
            _, connection = await asyncio.wait_for(connect, self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"cannot connect: {e or type(e).__name__}") from None
        self.connects += 1
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and len(self._idle) < self.size:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()


class PeerPools:
    """One :class:`PeerPool` per peer URL, created on first use; shared by a node's shards."""

    def __init__(self, *, headers: Mapping[str, str] | None = None, size: int = 8) -> None:
        self.headers = dict(headers or {})
        self.size = size
        self._pools: dict[str, PeerPool] = {}

    def to(self, url: str) -> PeerPool:
        pool = self._pools.get(url)
        if pool is None:
            pool = PeerPool(url, headers=self.headers, size=self.size)
            self._pools[url] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
