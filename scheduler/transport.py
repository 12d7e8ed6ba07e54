"""The gateway's hot path to a GPU manager: pooled keep-alive HTTP/1.1, parsed by httptools.

One :class:`NodePool` per GPU manager keeps persistent connections (as many idle ones as the
node's devices can run requests at once: ``size``); a request takes an idle connection or opens
one, sends the request line, headers and the body as they are (``writelines``: no joining
copy), and parses the answer with httptools (C) on an ``asyncio.Protocol``: no per-request
task, stream or pure-Python HTTP parser. Why this and not httpx: ``docs/dataplane.md``.

A connection the server closed while idle (keep-alive timeout) fails on its next request before
any byte of an answer arrives; the pool then retries once on a fresh connection, so only a
manager that is really unreachable raises :class:`NodeUnreachable`.

Other calls (state syncs, function pushes, loads) stay on httpx: they are rare.

:class:`FramedPool` is the faster lane for inference calls to a node that serves frames
(:mod:`gpufaas.core.frames`): over its Unix socket when the gateway shares its host, else over
its framed TCP port. One frame out, one frame back, no HTTP at either end.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from gpufaas.core.frames import (
    ANSWER,
    FrameError,
    FrameReader,
    InferHead,
    decode_answer_meta,
    encode_hello,
)

__all__ = ["FramedPool", "NodePool", "NodeReply", "NodeUnreachable"]


class NodeUnreachable(Exception):
    """The manager could not be reached, or the connection broke before its answer."""


@dataclass(frozen=True, slots=True)
class NodeReply:
    """A GPU manager's answer: status, headers (names lower-case), and the body as it came."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: NodePool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[NodeReply] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._header_name = b""
        self.got_bytes = False
        self.reusable = True
        self.closed = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # never asked for
            self._fail(NodeUnreachable("the GPU manager switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(NodeUnreachable(f"a malformed HTTP answer from the GPU manager: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        self._fail(NodeUnreachable(f"the connection closed before the answer ({exc or 'EOF'})"))

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        if name:
            self._header_name = name
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        else:  # a header value split across reads
            key = self._header_name.decode("latin-1").lower()
            self._headers[key] += value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        reply = NodeReply(
            status=self._parser.get_status_code(),
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
        )
        self.reusable = self._parser.should_keep_alive()
        self._headers, self._body = {}, []
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(reply)

    # -- use --
    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)

    async def request(self, head: bytes, body: bytes | memoryview, timeout_s: float) -> NodeReply:
        assert self._transport is not None
        self.got_bytes = False
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.writelines((head, body) if body else (head,))
        try:
            return await asyncio.wait_for(self._reply, timeout_s)
        except TimeoutError:
            self.close()
            raise NodeUnreachable(f"no answer within {timeout_s:.0f} s") from None
        finally:
            self._reply = None

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class NodePool:
    """Persistent connections to one GPU manager; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the pooled transport speaks plain http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        fixed = {"Host": parts.netloc, **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"<NodePool {where}: {len(self._idle)} idle, {len(self._open)} open>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def post(
        self, path: str, body: bytes | memoryview, headers: Mapping[str, str]
    ) -> NodeReply:
        """POST ``body`` to ``path``; the answer whatever its status. Raises
        :class:`NodeUnreachable` when the manager cannot be reached or the connection breaks."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        head = b"".join(
            (
                b"POST ",
                path.encode("ascii"),
                b" HTTP/1.1\r\n",
                self._fixed,
                extra,
                b"Content-Length: %d\r\n\r\n" % len(body),
            )
        )
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely timed out
            if connection.closed:
                continue
            try:
                reply = await connection.request(head, body, self.timeout_s)
            except NodeUnreachable:
                if connection.got_bytes:
                    raise  # it answered part: not a stale keep-alive connection
                continue  # closed by the server while idle: try another
            self._release(connection)
            return reply
        connection = await self._connect()
        reply = await connection.request(head, body, self.timeout_s)
        self._release(connection)
        return reply

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            connect = loop.create_connection(lambda: _Connection(self), self.host, self.port)
            _, connection = await asyncio.wait_for(connect, self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise NodeUnreachable(f"cannot connect to the GPU manager: {e}") from None
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and len(self._idle) < self.size:
            self._idle.append(connection)
        else:
            connection.close()

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        # A closed connection left in the deque is skipped (and dropped) by post().

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()


# -- the framed lane ---------------------------------------------------------------------------

# The node's kernel answers a call it never handed to the node's process with a reset (the
# process had closed the socket, or closed it with the call unread): such a call never ran.
_JOIN_BELOW = 64 * 1024
_NEVER_READ = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN))


class _FramedConnection(asyncio.Protocol):
    """One connection to a node's framed listener; one call on it at a time."""

    def __init__(self, pool: FramedPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(max_body=pool.max_answer_bytes)
        self._reply: asyncio.Future[NodeReply] | None = None
        self.got_bytes = False
        self.closed = False
        self.never_read = False  # closed by a reset: the node did not read the call (see above)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._pool.hello)

    @property
    def usable(self) -> bool:
        """Open, with no close on its way (an end of stream read, not yet reported)."""
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            frames = self._reader.feed(data)
            for frame in frames:
                if frame.kind != ANSWER:
                    raise FrameError(f"the GPU manager sent a frame of kind {frame.kind}")
                status, headers = decode_answer_meta(frame.meta)
                if self._reply is None or self._reply.done():
                    raise FrameError("the GPU manager answered a call it was not sent")
                self._reply.set_result(NodeReply(status, headers, bytes(frame.body)))
        except FrameError as e:
            self._fail(NodeUnreachable(f"a malformed answer frame from the GPU manager: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.never_read = isinstance(exc, OSError) and exc.errno in _NEVER_READ
        self._pool._forget(self)
        self._fail(NodeUnreachable(f"the connection closed before the answer ({exc or 'EOF'})"))

    def _fail(self, error: Exception) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)

    async def call(self, head: bytes, body: bytes | memoryview, timeout_s: float) -> NodeReply:
        assert self._transport is not None
        self.got_bytes = False
        self._reply = asyncio.get_running_loop().create_future()
        if len(body) <= _JOIN_BELOW:  # one write: a small join costs less than a second send
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))
        try:
            return await asyncio.wait_for(self._reply, timeout_s)
        except TimeoutError:
            self.close()
            raise NodeUnreachable(f"no answer within {timeout_s:.0f} s") from None
        finally:
            self._reply = None

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class FramedPool:
    """Persistent framed connections to one node: a Unix socket path, or TCP host and port.

    A call takes the most recently used idle connection (those the node closed while idle are
    dropped as their close arrives) or opens one. If the node resets a reused connection before
    answering, the call was never read there (a node that restarted): it is sent once more on a
    fresh connection. Any other break before the answer (a clean close after the call went out,
    a timeout) may have come after the node started running it, so it is never sent again here:
    :class:`NodeUnreachable`, and the gateway's policy decides what happens next.
    """

    def __init__(
        self,
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        size: int,
        token: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_answer_bytes: int = 1 << 30,
    ) -> None:
        if unix_path is None and (host is None or port is None):
            raise ValueError("a framed pool needs a Unix socket path, or a host and a port")
        self.unix_path, self.host, self.port = unix_path, host, port
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.hello = encode_hello(token)
        self._idle: collections.deque[_FramedConnection] = collections.deque()
        self._open: set[_FramedConnection] = set()

    def __repr__(self) -> str:
        where = self.unix_path or f"{self.host}:{self.port}"
        return f"<FramedPool {where}: {len(self._idle)} idle, {len(self._open)} open>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def infer(self, call: InferHead, body: bytes | memoryview) -> NodeReply:
        """Send one inference call; the node's answer whatever its status. Raises
        :class:`NodeUnreachable` (see the class docstring for when a call is sent again)."""
        head = call.encode(len(body))
        while self._idle:
            connection = self._idle.pop()  # the most recently used
            if not connection.usable:  # its close arrived while idle
                continue
            try:
                reply = await connection.call(head, body, self.timeout_s)
            except NodeUnreachable:
                if connection.got_bytes or not connection.never_read:
                    raise  # it may have started there: never run a call twice
                break  # the node had closed it unread (a restart): once more, on a fresh one
            self._release(connection)
            return reply
        connection = await self._connect()
        reply = await connection.call(head, body, self.timeout_s)
        self._release(connection)
        return reply

    async def _connect(self) -> _FramedConnection:
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                connect = loop.create_unix_connection(lambda: _FramedConnection(self), self.unix_path)
            else:
                assert self.host is not None and self.port is not None  # checked at __init__
                connect = loop.create_connection(
                    lambda: _FramedConnection(self), self.host, self.port
                )
            _, connection = await asyncio.wait_for(connect, self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise NodeUnreachable(f"cannot connect to the GPU manager's frames: {e}") from None
        self._open.add(connection)
        return connection

    def _release(self, connection: _FramedConnection) -> None:
        if connection.usable and len(self._idle) < self.size:
            self._idle.append(connection)
        else:
            connection.close()

    def _forget(self, connection: _FramedConnection) -> None:
        self._open.discard(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()
