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
(:class:`ForwardHead`: model, header length, request key, sender, and optionally the client's
time left), not the GPU manager's ``InferHead``. A peer that advertises no lane (an older
replica, or one started without it) is forwarded to over HTTP as before; a lane that fails is
handled as a failed HTTP forward (the owner is taken off the ring and the key's answer recovered
at the managers).

**The client's deadline over the lane** (docs/scheduling.md, "The client's deadline over a
forward"): the head's optional fifth line is the time the client had left, in milliseconds,
when the forward was written (the replicas' monotonic clocks are not comparable, so a time left
travels, not an instant). The owner turns it into the same ``X-Gpufaas-Timeout-Ms`` header as
over HTTP (:func:`lane_headers`), so its inference path needs nothing new. An owner of before
this line reads exactly four lines and refuses a fifth with a 400, so a replica advertises
:data:`LANE_DEADLINE_KEY` in its heartbeat, and a sender writes the fifth line only to an owner
whose last heartbeat did.

Protections at the listener are :mod:`gpufaas.core.framelisten`'s, shared with the GPU
manager's framed listener: a token checked in constant time (calls on a connection without it
are answered 401); a frame over the body limit or malformed is answered 400/413 and the
connection closed; a frame begun and stalled for ``frame_timeout_s`` closes the connection;
calls on a connection are answered one at a time, in order, and reading pauses while a second
one waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, NamedTuple

from gpufaas.core.framelisten import CallListener
from gpufaas.core.frames import INFER, FrameError, frame_head
from gpufaas.core.http import TIMEOUT_HEADER
from gpufaas.core.protocol import HEADER_LENGTH
from gpufaas.scheduler.transport import FramedPool, NodeReply

__all__ = [
    "LANE_DEADLINE_KEY",
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
# The heartbeat field that says this replica's lane reads a head's fifth line (the time left).
LANE_DEADLINE_KEY = "forward_lane_deadline"

# status, raw header pairs (names lower-case), body: what the gateway's HTTP path answers
LaneAnswer = tuple[int, list[tuple[bytes, bytes]], bytes]
# The owner's answer to one forwarded call, run in the call's own task
ForwardAnswer = Callable[["ForwardHead", bytes], Awaitable[LaneAnswer]]

_HEADER_LENGTH = HEADER_LENGTH.lower()


class ForwardHead(NamedTuple):
    """A forwarded inference call's fields besides its body: the model, the body's JSON header
    length (None: all JSON), the request key the GPU manager runs once, the sender's id, and
    the client's time left in milliseconds (None: no deadline, or not sent: four lines)."""

    model: str
    key: str
    sender: str
    header_length: int | None = None
    timeout_ms: float | None = None

    def encode(self, body_length: int) -> bytes:
        length = "" if self.header_length is None else str(self.header_length)
        lines = [self.model, length, self.key, self.sender]
        if self.timeout_ms is not None:  # only to an owner that reads it (LANE_DEADLINE_KEY)
            lines.append(repr(float(self.timeout_ms)))
        return frame_head(INFER, "\n".join(lines).encode(), body_length)

    @classmethod
    def decode(cls, meta: memoryview | bytes) -> ForwardHead:
        try:
            lines = bytes(meta).decode().split("\n")
        except UnicodeDecodeError:
            lines = []
        if len(lines) not in (4, 5):
            raise FrameError(
                "a malformed forward frame: its meta must be 4 or 5 UTF-8 lines "
                "(model, header length, request key, sender[, timeout_ms])"
            )
        model, length, key, sender = lines[:4]
        if not model or not key or not sender:
            raise FrameError("a malformed forward frame: it names no model, request key or sender")
        if length and not (length.isascii() and length.isdigit()):
            raise FrameError(f"the forward frame's header length {length!r} is not an integer")
        timeout_ms = _time_left(lines[4]) if len(lines) == 5 else None
        return cls(model, key, sender, int(length) if length else None, timeout_ms)


def _time_left(line: str) -> float:
    """A head's fifth line: a positive, finite number of milliseconds, or a 400 naming it."""
    try:
        value = float(line)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise FrameError(
            f"the forward frame's timeout_ms {line[:40]!r} is not a positive number of milliseconds"
        )
    return value


def lane_headers(head: ForwardHead) -> Mapping[str, str]:
    """The HTTP headers the owner's inference path reads for a forwarded call: the header
    length, and the client's time left as the deadline header it reads over HTTP."""
    headers: dict[str, str] = {}
    if head.header_length is not None:
        headers[_HEADER_LENGTH] = str(head.header_length)
    if head.timeout_ms is not None:
        headers[TIMEOUT_HEADER] = repr(head.timeout_ms)
    return headers


class ForwardPool(FramedPool):
    """Persistent lane connections to one owner (its host and advertised port)."""

    def forward(
        self, head: ForwardHead, body: bytes | memoryview
    ) -> Coroutine[Any, Any, NodeReply]:
        """Send one forwarded call: awaited, the owner's answer whatever its status, or
        ``NodeUnreachable`` (sent once more only on a reset of a reused connection, which
        the owner never read)."""
        return self._exchange(head.encode(len(body)), body, self.timeout_s)


class ForwardListener(CallListener[ForwardHead]):
    """The owner's end of the lane: ``start`` on the gateway's loop, ``close`` at exit.

    Each call is a task of its own (not started eagerly): its context is the request's, where
    ``Replicas.admit`` marks it forwarded with its key."""

    def __init__(
        self,
        answer: ForwardAnswer,
        *,
        token: str | None,
        max_body_bytes: int,
        frame_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            decode=ForwardHead.decode,
            answer=lambda head, body: answer(head, bytes(body)),
            token=token,
            max_body_bytes=max_body_bytes,
            frame_timeout_s=frame_timeout_s,
            unauthorized="the gateway's peer lane requires the peer token",
            eager=False,
        )
        self.port: int | None = None  # once listening
        self._server: asyncio.AbstractServer | None = None

    async def start(self, *, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.connection, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def serve(self, stop: asyncio.Event, *, host: str, port: int = 0) -> None:
        """Listen until ``stop`` is set (a gateway background task). A port it cannot listen on
        leaves this replica without a lane, said once in the log: it advertises none, so peers
        forward to it over HTTP, and it serves on."""
        try:
            await self.start(host=host, port=port)
        except OSError as e:
            logger.error(
                "the keyed-forward lane cannot listen on %s:%d (%s): peers forward to this "
                "replica over HTTP",
                host,
                port,
                e.strerror or e,
            )
            return
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        self.port = None
        if self._server is not None:
            self._server.close()
        self.close_connections()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
