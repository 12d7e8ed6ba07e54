"""The listening end of a framed lane: one connection protocol for every framed listener.

Two listeners speak :mod:`gpufaas.core.frames` calls: the GPU manager's inference listener
(``gpu_manager/framed.py``, the gateway's lane to a node) and a gateway replica's keyed-forward
listener (``scheduler/forward_lane.py``, scale-out). They differ only in how a call's meta is
decoded and answered; the stream handling and its protections are this module's, once:

- the first frame is the HELLO with the bearer token, checked in constant time where the
  listener has one; a call on a connection without it is answered 401;
- calls are answered one at a time, in order; while one runs, reading pauses once a second call
  is waiting, so a client that floods a connection holds at most one frame in memory;
- a frame that breaks the format (bad magic, a length over the bounds) is answered with a
  400/413 naming the problem, and the connection closed: the stream cannot be trusted after it;
- a frame begun and then stalled for ``frame_timeout_s`` closes the connection;
- an answer that raises is logged and answered 500 with a message, never a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar, cast

from gpufaas.core.colocated import Answer
from gpufaas.core.eager import start_eagerly
from gpufaas.core.frames import (
    HELLO,
    INFER,
    Frame,
    FrameError,
    FrameReader,
    answer_frame,
    encode_answer,
    parse_hello,
)

__all__ = ["CallListener", "error_answer"]

logger = logging.getLogger(__name__)

Head = TypeVar("Head")

_JSON = (b"content-type", b"application/json")
_JOIN_BELOW = 64 * 1024  # one write below this: a small join costs less than a second send


def error_answer(status: int, message: str, reason: str) -> Answer:
    body = json.dumps({"error": message}).encode()
    return status, [_JSON, (b"x-gpufaas-reason", reason.encode())], body


class CallListener(Generic[Head]):
    """The connections of one framed listener and what they share.

    ``decode`` turns a call's meta into its head (raising :class:`FrameError` on a malformed
    one); ``answer`` answers the head and body. With ``eager`` a call starts at once and
    becomes a task only if it waits (a warm small model's call never does); without it every
    call is a task of its own, so that context variables it sets stay with it.
    """

    def __init__(
        self,
        *,
        decode: Callable[[memoryview | bytes], Head],
        answer: Callable[[Head, memoryview | bytes], Awaitable[Answer]],
        token: str | None,
        max_body_bytes: int,
        frame_timeout_s: float,
        unauthorized: str,
        eager: bool,
    ) -> None:
        self.decode = decode
        self.answer = answer
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.frame_timeout_s = frame_timeout_s
        self.unauthorized = unauthorized
        self.eager = eager
        self.connections: set[CallConnection[Head]] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # calls running as tasks

    def connection(self) -> CallConnection[Head]:
        """A protocol factory for ``loop.create_server`` / ``create_unix_server``."""
        return CallConnection(self)

    def close_connections(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()

    def run_call(self, call: Coroutine[Any, Any, None]) -> None:
        task = start_eagerly(call) if self.eager else asyncio.get_running_loop().create_task(call)
        if task is not None:  # held until done: the loop keeps only weak references to tasks
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


class CallConnection(asyncio.Protocol, Generic[Head]):
    def __init__(self, listener: CallListener[Head]) -> None:
        self.listener = listener
        self.reader = FrameReader(max_body=listener.max_body_bytes)
        self.transport: asyncio.Transport | None = None
        self.authorized = listener.token is None
        self.waiting: collections.deque[Frame] = collections.deque()
        self.running = False
        self.paused = False  # reading paused while a second call waits
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
        if not self.running and not self.waiting:  # the usual read: one whole call, idle
            try:
                frame = self.reader.whole(data)
            except FrameError as e:
                self._refuse(e.status, str(e))
                return
            if frame is not None and frame.kind == INFER:  # nothing part read: no stall armed
                self.running = True
                self.listener.run_call(self._call(frame))
                return
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
        if len(self.waiting) > 1 and self.transport is not None and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def _watch_stall(self) -> None:
        """A frame begun must go on arriving: past ``frame_timeout_s`` without a byte of it,
        the connection is closed (a stalled or malicious sender holds no buffer for long)."""
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
        self._write(error_answer(status, message, "InvalidFrame"))
        self.closing = True
        self.waiting.clear()
        if self.transport is not None:
            self.transport.close()

    def _write(self, answer: Answer) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, headers, body = answer
        if len(body) <= _JOIN_BELOW:
            self.transport.write(answer_frame(status, headers, body))
        else:
            self.transport.writelines((encode_answer(status, headers, len(body)), body))

    def _next_if_idle(self) -> None:
        if self.waiting and not self.running and not self.closing:
            self._next()

    def _next(self) -> None:
        frame = self.waiting.popleft()
        self.running = True
        self.listener.run_call(self._call(frame))

    async def _call(self, frame: Frame) -> None:
        listener = self.listener
        try:
            if not self.authorized:
                answer = error_answer(401, listener.unauthorized, "Unauthorized")
            else:
                try:
                    head = listener.decode(frame.meta)
                except FrameError as e:
                    answer = error_answer(e.status, str(e), "InvalidFrame")
                else:
                    answer = await listener.answer(head, frame.body)
        except Exception as e:  # as the HTTP route: a message, never a traceback
            logger.exception("unhandled error on a framed call")
            answer = error_answer(500, f"internal error ({type(e).__name__})", "InternalError")
        self.running = False
        if self.closing:
            return
        self._write(answer)
        if self.waiting:  # the next in a later callback: answered at once, calls would recurse
            asyncio.get_running_loop().call_soon(self._next_if_idle)
        elif self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
