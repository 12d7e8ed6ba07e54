"""Pooled keep-alive connections: the one HTTP/1.1 client of every hot hop between components.

A general-purpose client (httpx) costs ~0.7 ms of CPU per call on this machine's cores, more
than the receiver's whole work (bench/RESULTS.md, "Distributed inference", per-message cost;
``docs/dataplane.md``). :class:`PeerPool` keeps, per peer (``http://host:port``), up to ``size``
persistent connections, writes the request line, headers and body as they are (``writelines``:
no joining copy; ``memoryview`` bodies too) and parses the answer with httptools (C) on an
``asyncio.Protocol``: no per-call task, stream or pure-Python parser. Its users: the gateway to
the GPU managers and to its replicas (:mod:`gpufaas.scheduler.transport` ``NodePool``), the
sharded-model coordinator, and the direct channel between nodes' shards (:class:`PeerPools`).

A connection the peer closed while idle (its keep-alive timeout) breaks before any byte of an
answer arrives; the call is then sent once more, on a fresh connection, so only a peer that is
really unreachable raises :class:`PeerUnreachable`. A timeout, a cancelled call or a partial
answer is never sent again (the peer may be running it). Connections idle longer than
``idle_s`` (under uvicorn's 5 s keep-alive) are not reused at all.

:class:`KeepAlivePool` is the bookkeeping every such pool shares (take the most recently used
idle connection or connect, release within ``size``, forget the closed, close); the gateway's
framed lane (``FramedPool``) is the other kind.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "KeepAliveConnection",
    "KeepAlivePool",
    "PeerPool",
    "PeerPools",
    "PeerReply",
    "PeerUnreachable",
    "RawHeaders",
    "header_pairs",
]


class PeerUnreachable(Exception):
    """The peer could not be reached, or the connection broke before its answer."""


class RawHeaders(Mapping[str, str]):
    """Answer headers as the peer wrote them: ``raw``, ``(name, value)`` byte pairs, names
    lower-case. The hot path reads and passes them on as bytes (:func:`header_pairs`); whoever
    reads them as a mapping of str gets them decoded once, on first use."""

    __slots__ = ("_decoded", "raw")

    def __init__(self, raw: Sequence[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._decoded: dict[str, str] | None = None

    def _mapping(self) -> dict[str, str]:
        if self._decoded is None:
            self._decoded = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.raw}
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._mapping()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())

    def __repr__(self) -> str:
        return f"RawHeaders({self.raw!r})"


def header_pairs(headers: Mapping[str, str]) -> Sequence[tuple[bytes, bytes]]:
    """``headers`` as raw pairs with lower-case names: as they came, for :class:`RawHeaders`."""
    if isinstance(headers, RawHeaders):
        return headers.raw
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


@dataclass(frozen=True, slots=True)
class PeerReply:
    """A peer's answer: status, headers (names lower-case; a :class:`RawHeaders` where the
    lane kept them as bytes), and the body as it came."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class KeepAliveConnection(asyncio.Protocol):
    """One pooled connection; at most one call on it at a time. Subclasses write the call
    (:meth:`_send`) and complete ``_reply`` from what they read."""

    def __init__(self, pool: KeepAlivePool[Any]) -> None:
        self._pool = pool
        # Made on the loop it serves. Kept: asyncio.get_running_loop() costs a getpid() system
        # call on Python 3.11, once per call otherwise.
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reply: asyncio.Future[PeerReply] | None = None
        # The time limit of the call on it: one watch per connection (see call)
        self._timeout_s = 0.0
        self._deadline = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self.got_bytes = False
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._pool.forget(self)
        self._fail(PeerUnreachable(f"the connection closed before the answer ({exc or 'EOF'})"))

    def usable(self) -> bool:
        """Open, with no close on its way (an end of stream read, not yet reported)."""
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    def may_resend(self) -> bool:
        """After a failed call: whether the peer surely never ran it (a connection it had closed
        while idle, no byte of an answer). A timeout closes it only later: never resent."""
        return self.closed and not self.got_bytes

    def _send(self, head: bytes, body: bytes | memoryview) -> None:
        raise NotImplementedError

    def _fail(self, error: Exception) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)

    async def call(self, head: bytes, body: bytes | memoryview, timeout_s: float) -> PeerReply:
        assert self._transport is not None
        loop = self._loop
        self.got_bytes = False
        reply: asyncio.Future[PeerReply] = loop.create_future()
        self._reply = reply
        self._send(head, body)
        # The time limit: a deadline, and one watch per connection that stays armed across
        # calls (re-armed only when it fires at an earlier call's deadline, or for a call with
        # a nearer one). A call costs a clock read, not a timer armed and cancelled, nor
        # asyncio.wait_for's second future, callback and handle.
        self._timeout_s = timeout_s
        self._deadline = deadline = loop.time() + timeout_s
        if self._watch is None or deadline < self._watch_at:
            self._arm(deadline)
        try:
            return await reply
        except asyncio.CancelledError:
            self.close()  # its answer would be read as the next call's
            raise
        finally:
            self._reply = None

    def _arm(self, at: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch = self._loop.call_at(at, self._check_deadline)
        self._watch_at = at

    def _check_deadline(self) -> None:
        """The watch: the call on the connection now, if any, fails once past its deadline."""
        self._watch = None
        reply = self._reply
        if reply is None or reply.done() or self.closed:
            return  # idle: the next call arms it again
        if self._watch_at < self._deadline:
            self._arm(self._deadline)  # armed for an earlier call: watch this one's deadline
            return
        reply.set_exception(PeerUnreachable(f"no answer within {self._timeout_s:.1f} s"))
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


C = TypeVar("C", bound=KeepAliveConnection)


class KeepAlivePool(Generic[C]):
    """A bounded pool of keep-alive connections to one place; subclasses dial (:meth:`_dial`)
    and say where (:meth:`_where`). ``idle_s`` None: idle connections are reused however old."""

    def __init__(self, *, size: int, idle_s: float | None, connect_timeout_s: float) -> None:
        self.size = max(1, size)
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        self.connects = 0  # connections opened so far (a reused pool opens few)
        self._idle: collections.deque[C] = collections.deque()
        self._open: set[C] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._where()}: {len(self._idle)} idle, {len(self._open)} open>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _where(self) -> str:
        raise NotImplementedError

    def _dial(self) -> Coroutine[Any, Any, tuple[asyncio.BaseTransport, C]]:
        raise NotImplementedError

    async def _exchange(self, head: bytes, body: bytes | memoryview, timeout_s: float) -> PeerReply:
        """One call on the most recently used idle connection (least likely closed), sent once
        more on a fresh one only if that one had been closed unread (:meth:`may_resend`)."""
        connection = self._take_idle()
        if connection is not None:
            try:
                reply = await connection.call(head, body, timeout_s)
            except PeerUnreachable:
                if not connection.may_resend():
                    raise
            else:
                self._release(connection)
                return reply
        connection = await self._connect()
        reply = await connection.call(head, body, timeout_s)
        self._release(connection)
        return reply

    def _take_idle(self) -> C | None:
        idle = self._idle
        now = time.monotonic() if idle and self.idle_s is not None else 0.0
        while idle:
            connection = idle.pop()
            if not connection.usable():  # its close arrived while idle
                continue
            if self.idle_s is not None and now - connection.idle_since > self.idle_s:
                connection.close()  # the peer may close it as we write: don't race it
                continue
            return connection
        return None

    async def _connect(self) -> C:
        try:
            _, connection = await asyncio.wait_for(self._dial(), self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(
                f"cannot connect to {self._where()}: {e or type(e).__name__}"
            ) from None
        self.connects += 1
        self._open.add(connection)
        return connection

    def _release(self, connection: C) -> None:
        if connection.usable() and len(self._idle) < self.size:
            if self.idle_s is not None:
                connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: KeepAliveConnection) -> None:
        self._open.discard(cast(C, connection))

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()


class _HttpConnection(KeepAliveConnection):
    """HTTP/1.1 on one connection, the answer parsed by httptools."""

    def __init__(self, pool: PeerPool) -> None:
        super().__init__(pool)
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._name = ""
        self.keep_alive = True

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # never asked for
            self._fail(PeerUnreachable("the peer switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(PeerUnreachable(f"a malformed HTTP answer: {e}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name:
            self._name = name.decode("latin-1").lower()
            self._headers[self._name] = value.decode("latin-1")
        else:  # a value split across reads
            self._headers[self._name] += value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        reply = PeerReply(self._parser.get_status_code(), self._headers, body)
        self.keep_alive = self._parser.should_keep_alive()
        self._headers, self._body = {}, []
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(reply)

    def _fail(self, error: Exception) -> None:
        self.keep_alive = False  # what is left of a broken answer would be read as the next
        super()._fail(error)

    def usable(self) -> bool:
        return self.keep_alive and super().usable()

    def _send(self, head: bytes, body: bytes | memoryview) -> None:
        assert self._transport is not None
        self._transport.writelines((head, body) if body else (head,))


class PeerPool(KeepAlivePool[_HttpConnection]):
    """Persistent HTTP/1.1 connections to one peer (``http://host:port``); see the module
    docstring. ``headers`` go with every call (a bearer token); ``timeout_s`` is the default
    per-call limit."""

    def __init__(
        self,
        url: str,
        *,
        size: int = 8,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
        idle_s: float = 2.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(size=size, idle_s=idle_s, connect_timeout_s=connect_timeout_s)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the pooled transport speaks plain http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        fixed = {"Host": parts.netloc, **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")

    def post(
        self,
        path: str,
        body: bytes | memoryview,
        headers: Mapping[str, str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Coroutine[Any, Any, PeerReply]:
        """POST ``body`` to ``path`` (with ``headers`` besides the pool's): awaited, the answer
        whatever its status, or :class:`PeerUnreachable`. A plain function returning the call's
        coroutine: no second coroutine per call."""
        extra = (
            "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
            if headers
            else b""
        )
        head = b"POST %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            path.encode("ascii"), self._fixed, extra, len(body),
        )  # fmt: skip
        return self._exchange(head, body, self.timeout_s if timeout_s is None else timeout_s)

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _dial(self) -> Coroutine[Any, Any, tuple[asyncio.BaseTransport, _HttpConnection]]:
        loop = asyncio.get_running_loop()
        return loop.create_connection(lambda: _HttpConnection(self), self.host, self.port)


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

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
