"""The keyed-forward lane between gateway replicas (scale-out, #16; docs/scheduling.md).

A replica that is not the placement owner forwards a request whose placement changes
residency to the owner, under a request key (:mod:`gpufaas.scheduler.forwards`). Over HTTP
that hop cost about 0.6 ms on the 2-core dev box: an HTTP request written and parsed at both
ends, and the owner's HTTP front. This lane sends it as one frame of
:mod:`gpufaas.core.frames` on a persistent connection instead, as the gateway's framed lane to a
GPU manager does, and the answer comes back as one answer frame.

- **Sender**: :class:`ForwardPool`, a :class:`~gpufaas.scheduler.transport.FramedPool` (the
  HELLO with the peer token on every new connection, one call per connection at a time, the
  same resend rule) whose calls are :class:`ForwardHead` frames.
- **Owner**: :class:`ForwardListener`, a TCP listener on the replica's host (an ephemeral port
  unless one is given), advertised in the replica's heartbeat (:data:`LANE_PORT_KEY`). Each
  frame is answered by the gateway's own HTTP inference path (``answer_infer``: inspection, the
  signature check, the policy, the dispatcher), inside a task where the request is admitted as
  forwarded with its key (``Replicas.admit``), so the owner decides it as it would over HTTP:
  it never forwards it again, and its key goes on to the GPU manager.

The frame is of kind ``INFER`` on this lane's own port; its meta is this module's
(:class:`ForwardHead`: model, header length, request key, sender), not the GPU manager's
``InferHead``. A peer that advertises no lane (an older replica, or one started without it)
is forwarded to over HTTP as before; a lane that fails is handled as a failed HTTP forward
(the owner is taken off the ring and the key's answer recovered at the managers).

Protections at the listener, as the GPU manager's framed listener has them: a token checked in
constant time (calls on a connection without it are answered 401); a frame over the body limit
or malformed is answered 400/413 and the connection closed; a frame begun and stalled for
``frame_timeout_s`` closes the connection; calls on a connection are answered one at a time,
in order, and reading pauses while a second one waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, NamedTuple, cast

from gpufaas.core.frames import (
    HELLO,
    INFER,
    Frame,
    FrameError,
    FrameReader,
    encode_answer,
    frame_head,
    parse_hello,
)
from gpufaas.core.protocol import HEADER_LENGTH
from gpufaas.scheduler.transport import FramedPool, NodeReply

__all__ = [
    "LANE_PORT_KEY",
    "ForwardAnswer",
    "ForwardHead",
    "ForwardListener",
    "ForwardPool",
    "LaneAnswer",
    "lane_headers",
]

logger = logging.getLogger(__name__)

# The heartbeat field with this replica's lane port (peers.py Membership.heartbeat).
LANE_PORT_KEY = "forward_lane_port"

# status, raw header pairs (names lower-case), body: what the gateway's HTTP path answers
LaneAnswer = tuple[int, list[tuple[bytes, bytes]], bytes]
# The owner's answer to one forwarded call, run in the call's own task
ForwardAnswer = Callable[["ForwardHead", bytes], Awaitable[LaneAnswer]]

_JSON = (b"content-type", b"application/json")
_JOIN_BELOW = 64 * 1024
_HEADER_LENGTH = HEADER_LENGTH.lower()


class ForwardHead(NamedTuple):
    """A forwarded inference call's fields besides its body: the model, the body's JSON header
    length (None: all JSON), the request key the GPU manager runs once, and the sender's id."""

    model: str
    key: str
    sender: str
    header_length: int | None = None

    def encode(self, body_length: int) -> bytes:
        length = "" if self.header_length is None else str(self.header_length)
        meta = "\n".join((self.model, length, self.key, self.sender)).encode()
        return frame_head(INFER, meta, body_length)

    @classmethod
    def decode(cls, meta: memoryview | bytes) -> ForwardHead:
        try:
            model, length, key, sender = bytes(meta).decode().split("\n")
        except (UnicodeDecodeError, ValueError):
            raise FrameError(
                "a malformed forward frame: its meta must be 4 UTF-8 lines "
                "(model, header length, request key, sender)"
            ) from None
        if not model or not key or not sender:
            raise FrameError("the forward frame names no model, request key or sender")
        if length and not (length.isascii() and length.isdigit()):
            raise FrameError(f"the forward frame's header length {length!r} is not an integer")
        return cls(model, key, sender, int(length) if length else None)


def lane_headers(head: ForwardHead) -> Mapping[str, str]:
    """The HTTP headers the owner's inference path reads for a forwarded call."""
    return {} if head.header_length is None else {_HEADER_LENGTH: str(head.header_length)}


class ForwardPool(FramedPool):
    """Persistent lane connections to one owner (its host and advertised port)."""

    def forward(
        self, head: ForwardHead, body: bytes | memoryview
    ) -> Coroutine[Any, Any, NodeReply]:
        """Send one forwarded call: awaited, the owner's answer whatever its status, or
        ``NodeUnreachable`` (sent once more only on a reset of a reused connection, which
        the owner never read)."""
        return self._exchange(head.encode(len(body)), body, self.timeout_s)


def _error(status: int, message: str, reason: str) -> LaneAnswer:
    body = json.dumps({"error": message}).encode()
    return status, [_JSON, (b"x-gpufaas-reason", reason.encode())], body


class _LaneConnection(asyncio.Protocol):
    def __init__(self, listener: ForwardListener) -> None:
        self.listener = listener
        self.reader = FrameReader(max_body=listener.max_body_bytes)
        self.transport: asyncio.Transport | None = None
        self.authorized = listener.token is None
        self.waiting: collections.deque[Frame] = collections.deque()
        self.running = False
        self.closing = False
        self.stall: asyncio.TimerHandle | None = None  # armed while a frame is half read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.waiting.clear()
        self.listener.connections.discard(self)
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
                self._refuse(400, f"a frame of kind {frame.kind} is not a forwarded call")
                return
        if self.waiting and not self.running:
            self._next()
        if len(self.waiting) > 1 and self.transport is not None:
            self.transport.pause_reading()

    def _watch_stall(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        if self.reader.partial and self.transport is not None:
            self.stall = asyncio.get_running_loop().call_later(
                self.listener.frame_timeout_s, self.transport.close
            )

    def _hello(self, frame: Frame) -> None:
        try:
            token = parse_hello(frame)
        except FrameError:
            token = ""
        expected = self.listener.token
        self.authorized = expected is None or hmac.compare_digest(token, expected)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a broken stream's error, then close: nothing after it can be framed."""
        self._write(_error(status, message, "InvalidFrame"))
        self.closing = True
        self.waiting.clear()
        if self.transport is not None:
            self.transport.close()

    def _write(self, answer: LaneAnswer) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, headers, body = answer
        head = encode_answer(status, headers, len(body))
        if len(body) <= _JOIN_BELOW:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def _next(self) -> None:
        frame = self.waiting.popleft()
        self.running = True
        # A task per call: its context is the request's (Replicas.admit sets it there).
        task = asyncio.get_running_loop().create_task(self._call(frame))
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)

    async def _call(self, frame: Frame) -> None:
        try:
            if not self.authorized:
                answer = _error(
                    401, "the gateway's peer lane requires the peer token", "Unauthorized"
                )
            else:
                try:
                    head = ForwardHead.decode(frame.meta)
                except FrameError as e:
                    answer = _error(e.status, str(e), "InvalidFrame")
                else:
                    answer = await self.listener.answer(head, bytes(frame.body))
        except Exception as e:  # as the HTTP route: a message, never a traceback
            logger.exception("unhandled error on a forwarded call")
            answer = _error(500, f"internal error ({type(e).__name__})", "InternalError")
        self.running = False
        if self.closing:
            return
        self._write(answer)
        if self.waiting:  # the next in a later callback: calls answered at once would recurse
            asyncio.get_running_loop().call_soon(self._next_if_idle)
        elif self.transport is not None:
            self.transport.resume_reading()

    def _next_if_idle(self) -> None:
        if self.waiting and not self.running and not self.closing:
            self._next()


class ForwardListener:
    """The owner's end of the lane: ``start`` on the gateway's loop, ``close`` at exit."""

    def __init__(
        self,
        answer: ForwardAnswer,
        *,
        token: str | None,
        max_body_bytes: int,
        frame_timeout_s: float = 30.0,
    ) -> None:
        self.answer = answer
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.frame_timeout_s = frame_timeout_s
        self.connections: set[_LaneConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.port: int | None = None  # once listening
        self._server: asyncio.AbstractServer | None = None

    async def start(self, *, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _LaneConnection(self), host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def serve(self, stop: asyncio.Event, *, host: str, port: int = 0) -> None:
        """Listen until ``stop`` is set (a gateway background task)."""
        await self.start(host=host, port=port)
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        self.port = None
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
