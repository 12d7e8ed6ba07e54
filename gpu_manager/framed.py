"""The GPU manager's framed inference listener: the gateway's fast lane, no HTTP per request.

Serves :mod:`gpufaas.core.frames` on a Unix domain socket (a gateway on the same host) and/or a
TCP port, from the manager's own event loop, with an ``asyncio.Protocol`` per connection: no HTTP
parser, no ASGI scope, no Request object per call. Every call ends in the same answer function
as ``POST /v2/models/{name}/infer`` (``server.answer_infer``), so status codes, headers, metrics
and error bodies are the HTTP route's.

Per connection: the first frame is the HELLO with the bearer token (checked in constant time
when the manager has one; a call on a connection without it is answered 401). Calls are answered
one at a time, in order; while one runs, reading pauses once a second call is waiting, so a
client that floods a connection holds at most one frame in memory. A frame that breaks the
format (bad magic, a length over the bounds) is answered with a 400/413 naming the problem, and
the connection is closed: the stream cannot be trusted after it. A connection that closes in the
middle of a frame is dropped with its partial bytes; nothing of it runs; one that stops
sending in the middle of a frame for ``frame_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

from gpufaas.core.colocated import Answer  # the contract an in-process caller shares
from gpufaas.core.eager import start_eagerly
from gpufaas.core.frames import (
    HELLO,
    INFER,
    Frame,
    FramedEndpoint,
    FrameError,
    FrameReader,
    InferHead,
    encode_answer,
    parse_hello,
)

logger = logging.getLogger(__name__)

__all__ = ["Answer", "FramedAnswer", "FramedServer"]

FramedAnswer = Callable[[InferHead, memoryview | bytes], Awaitable[Answer]]

_JSON = (b"content-type", b"application/json")
_JOIN_BELOW = 64 * 1024


def error_answer(status: int, message: str, reason: str) -> Answer:
    body = json.dumps({"error": message}).encode()
    return status, [_JSON, (b"x-gpufaas-reason", reason.encode())], body


class _Connection(asyncio.Protocol):
    def __init__(self, server: FramedServer) -> None:
        self.server = server
        self.reader = FrameReader(max_body=server.max_body_bytes)
        self.transport: asyncio.Transport | None = None
        self.authorized = server.token is None
        self.waiting: collections.deque[Frame] = collections.deque()
        self.running = False
        self.closing = False
        self.stall: asyncio.TimerHandle | None = None  # armed while a frame is half read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.waiting.clear()
        self.server.connections.discard(self)
        if self.stall is not None:
            self.stall.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameError as e:
            self._refuse(e.status, str(e))
            return
        self._watch_stall()
        for frame in frames:
            if frame.kind == HELLO:
                self._hello(frame)
            elif frame.kind == INFER:
                self.waiting.append(frame)
            else:
                self._refuse(400, f"a frame of kind {frame.kind} is not a call")
                return
        if self.waiting and not self.running:
            self._next()
        if len(self.waiting) > 1 and self.transport is not None:
            self.transport.pause_reading()

    def _watch_stall(self) -> None:
        """A frame begun must go on arriving: past ``frame_timeout_s`` without a byte of it,
        the connection is closed (a stalled or malicious sender holds no buffer for long)."""
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        if self.reader.partial and self.transport is not None:
            self.stall = asyncio.get_running_loop().call_later(
                self.server.frame_timeout_s, self.transport.close
            )

    def _hello(self, frame: Frame) -> None:
        try:
            token = parse_hello(frame)
        except FrameError:
            token = ""
        expected = self.server.token
        self.authorized = expected is None or hmac.compare_digest(token, expected)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a broken stream's error, then close: nothing after it can be framed."""
        self._write(error_answer(status, message, "InvalidFrame"))
        self.closing = True
        self.waiting.clear()
        if self.transport is not None:
            self.transport.close()

    def _write(self, answer: Answer) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, headers, body = answer
        head = encode_answer(status, headers, len(body))
        if len(body) <= _JOIN_BELOW:  # one write: a small join costs less than a second send
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def _next_if_idle(self) -> None:
        if self.waiting and not self.running and not self.closing:
            self._next()

    def _next(self) -> None:
        frame = self.waiting.popleft()
        self.running = True
        # At once, and a task only if it waits: a warm small model's call never does.
        task = start_eagerly(self._call(frame))
        if task is not None:  # held until done: the loop keeps only weak references to tasks
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    async def _call(self, frame: Frame) -> None:
        try:
            if not self.authorized:
                answer = error_answer(
                    401, "the GPU manager requires a bearer token", "Unauthorized"
                )
            else:
                try:
                    head = InferHead.decode(frame.meta)
                except FrameError as e:
                    answer = error_answer(e.status, str(e), "InvalidFrame")
                else:
                    answer = await self.server.answer(head, frame.body)
        except Exception as e:  # as the HTTP route: a message, never a traceback
            logger.exception("unhandled error on a framed call")
            answer = error_answer(500, f"internal error ({type(e).__name__})", "InternalError")
        self.running = False
        if self.closing:
            return
        self._write(answer)
        if self.waiting:  # the next in a later callback: answered at once, calls would recurse
            asyncio.get_running_loop().call_soon(self._next_if_idle)
        elif self.transport is not None:
            self.transport.resume_reading()


class FramedServer:
    """The listeners and their connections; ``start`` on the serving loop, ``close`` at exit."""

    def __init__(
        self,
        answer: FramedAnswer,
        *,
        token: str | None,
        max_body_bytes: int,
        frame_timeout_s: float = 30.0,
    ) -> None:
        self.answer = answer
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.frame_timeout_s = frame_timeout_s
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # calls that had to wait
        self._servers: list[asyncio.AbstractServer] = []
        self.endpoint = FramedEndpoint()

    async def start(
        self, *, unix_path: Path | None = None, host: str | None = None, port: int | None = None
    ) -> FramedEndpoint:
        loop = asyncio.get_running_loop()
        unix = tcp = None
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                unix_path.unlink()  # a stale socket of an earlier run
            server = await loop.create_unix_server(lambda: _Connection(self), str(unix_path))
            os.chmod(unix_path, 0o600)  # only this user's processes; the token is checked too
            self._servers.append(server)
            unix = str(unix_path)
        if port is not None:
            server = await loop.create_server(lambda: _Connection(self), host, port)
            self._servers.append(server)
            tcp = int(server.sockets[0].getsockname()[1])
        self.endpoint = FramedEndpoint(unix_path=unix, tcp_port=tcp)
        return self.endpoint

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.endpoint.unix_path:
            with contextlib.suppress(FileNotFoundError):
                Path(self.endpoint.unix_path).unlink()
        self._servers.clear()
