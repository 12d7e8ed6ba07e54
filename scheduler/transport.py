"""The gateway's hot path to a GPU manager: pooled keep-alive HTTP/1.1, parsed by httptools.

One :class:`NodePool` per GPU manager keeps persistent connections (as many idle ones as the
node's devices can run requests at once: ``size``). It is :mod:`gpufaas.core.peerhttp`'s one
pooled client (the nodes' shards use it too), under the gateway's names; how it sends, parses,
and when a call is sent once more: that module. Why this and not httpx: ``docs/dataplane.md``.

Other calls (state syncs, function pushes, loads) stay on httpx: they are rare.

:class:`FramedPool` is the faster lane for inference calls to a node that serves frames
(:mod:`gpufaas.core.frames`): over its Unix socket when the gateway shares its host, else over
its framed TCP port. One frame out, one frame back, no HTTP at either end.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine
from typing import Any

from gpufaas.core.frames import (
    ANSWER,
    FrameError,
    FrameReader,
    InferHead,
    decode_answer_pairs,
    encode_hello,
)
from gpufaas.core.peerhttp import (
    KeepAliveConnection,
    KeepAlivePool,
    PeerPool,
    PeerReply,
    PeerUnreachable,
    RawHeaders,
)

__all__ = ["FramedPool", "NodePool", "NodeReply", "NodeUnreachable"]

NodeUnreachable = PeerUnreachable
NodeReply = PeerReply


class NodePool(PeerPool):
    """Persistent HTTP/1.1 connections to one GPU manager (or gateway replica): the one pooled
    client of :mod:`gpufaas.core.peerhttp`, named for the gateway's side."""


# -- the framed lane ---------------------------------------------------------------------------

# The node's kernel answers a call it never handed to the node's process with a reset (the
# process had closed the socket, or closed it with the call unread): such a call never ran.
_JOIN_BELOW = 64 * 1024
_NEVER_READ = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN))


class _FramedConnection(KeepAliveConnection):
    """One connection to a node's framed listener; one call on it at a time."""

    def __init__(self, pool: FramedPool) -> None:
        super().__init__(pool)
        self._hello = pool.hello
        self._reader = FrameReader(max_body=pool.max_answer_bytes)
        self.never_read = False  # closed by a reset: the node did not read the call (see above)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._transport is not None
        self._transport.write(self._hello)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            frame = self._reader.whole(data)  # the usual read: one whole answer
            frames = self._reader.feed(data) if frame is None else (frame,)
            for frame in frames:
                if frame.kind != ANSWER:
                    raise FrameError(f"the GPU manager sent a frame of kind {frame.kind}")
                status, pairs = decode_answer_pairs(frame.meta)
                if self._reply is None or self._reply.done():
                    raise FrameError("the GPU manager answered a call it was not sent")
                self._reply.set_result(NodeReply(status, RawHeaders(pairs), bytes(frame.body)))
        except FrameError as e:
            self._fail(NodeUnreachable(f"a malformed answer frame from the GPU manager: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.never_read = isinstance(exc, OSError) and exc.errno in _NEVER_READ
        super().connection_lost(exc)

    def may_resend(self) -> bool:
        # A clean close after the call went out may have come after the node started it.
        return self.never_read and not self.got_bytes

    def _send(self, head: bytes, body: bytes | memoryview) -> None:
        assert self._transport is not None
        if len(body) <= _JOIN_BELOW:  # one write: a small join costs less than a second send
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))


class FramedPool(KeepAlivePool[_FramedConnection]):
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
        # The node's framed listener keeps connections open however long idle: no idle bound.
        super().__init__(size=size, idle_s=None, connect_timeout_s=connect_timeout_s)
        self.unix_path, self.host, self.port = unix_path, host, port
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.hello = encode_hello(token)

    def infer(self, call: InferHead, body: bytes | memoryview) -> Coroutine[Any, Any, NodeReply]:
        """Send one inference call: awaited, the node's answer whatever its status, or
        :class:`NodeUnreachable` (see the class docstring for when a call is sent again)."""
        return self._exchange(call.encode(len(body)), body, self.timeout_s)

    def _where(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"

    def _dial(self) -> Coroutine[Any, Any, tuple[asyncio.BaseTransport, _FramedConnection]]:
        loop = asyncio.get_running_loop()
        if self.unix_path is not None:
            return loop.create_unix_connection(lambda: _FramedConnection(self), self.unix_path)
        assert self.host is not None and self.port is not None  # checked at __init__
        return loop.create_connection(lambda: _FramedConnection(self), self.host, self.port)
