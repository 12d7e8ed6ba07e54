"""The gateway's HTTP/1.1 front: inference answered straight from the parser, the rest over ASGI.

One ``asyncio.Protocol`` per connection parses requests with httptools (llhttp, in C), as the
GPU manager's framed lane does with its frames (``gpu_manager/framed.py``):

* ``POST /v2/models/{name}[/versions/{v}]/infer`` is answered without an ASGI cycle: no scope,
  no receive/send events, one write per answer. It calls :func:`~gpufaas.scheduler.gateway.
  answer_infer`, so the request takes the gateway's one path (``Gateway.infer``: inspection,
  the routing policy, the dispatcher) and gets the same answers and errors as over ASGI;
* every other request (health, metadata, the index, load and unload, metrics, the scale-out
  peer routes at the ingress, handlers) goes to the gateway's ASGI app (:func:`create_app`)
  through a minimal bridge: one ``http.request`` event with the whole (bounded) body, the
  response buffered and sent with its length. Lifespan (the gateway's start and stop) is run by
  uvicorn's own lifespan driver.

Protections, each answered with the gateway's ``{"error": ...}`` body and then the connection
closed (the stream cannot be trusted after them): a Content-Length over ``max_body_bytes`` is 413
before a byte of the body is read (so is a chunked body once it passes the limit); a malformed
request, or a bad Content-Length, 400; an infer ``POST`` with neither Content-Length nor chunked
body, 411; headers over ``max_header_bytes``, 431; an ``Expect`` other than ``100-continue``,
417. ``Expect: 100-continue`` is answered when the request is next in line. Connections beyond
``max_connections`` are answered 503 (``Retry-After: 1``) and closed, never left waiting.
Keep-alive is what the client asked for: HTTP/1.1 unless ``Connection: close``, HTTP/1.0 only
with ``Connection: keep-alive`` (answered with the same header). Deadlines: a
request's headers must arrive within ``header_timeout_s`` of its first byte (slow-loris); a
begun body must not stall for ``body_timeout_s``; either gets 408 and the connection closed. An
idle keep-alive connection is closed after ``keep_alive_s``.

Requests on a connection are answered one at a time, in order (pipelining is safe); while one
runs, reading pauses once another is complete and waiting, so a connection holds at most two
requests' bodies. A client that goes away mid-body loses its partial request: nothing of it
runs. A request already running is answered into the void (inference is idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, cast

import httptools
import uvicorn
from starlette.types import ASGIApp, Message
from uvicorn.lifespan.on import LifespanOn

from gpufaas.core.eager import start_eagerly
from gpufaas.core.http import REQUEST_KEY_HEADER, check_content_encoding, check_declared_length
from gpufaas.core.protocol import ProtocolError
from gpufaas.scheduler.gateway import INFER_PATH, Answer, Gateway, answer_infer, error_answer
from gpufaas.scheduler.replicas import FORWARDED_HEADER

logger = logging.getLogger(__name__)

__all__ = ["FrontSettings", "HttpFront"]

_JOIN_BELOW = 64 * 1024  # one write: a small join costs less than a second send
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PHRASES = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_LINGER_S = 1.0


@dataclass(frozen=True, kw_only=True)
class FrontSettings:
    max_body_bytes: int
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 30.0  # longest silence inside a begun body
    keep_alive_s: float = 5.0  # an idle connection's life (peers' pools drop theirs at 2 s)
    shutdown_grace_s: float = 5.0  # for requests running when the server stops
    # Open client connections at most; one more is answered 503 and closed (each holds a file
    # descriptor and up to two requests' bodies). None: no cap.
    max_connections: int | None = 2048


class _Refused(Exception):
    """A request the front answers itself with an error, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Request:
    __slots__ = (
        "chunks", "expect", "headers", "http10", "keep_alive", "method", "refusal", "size", "url",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # names lower-case, as ASGI wants them
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.http10 = False  # an HTTP/1.0 client: keep-alive only when it asked, and said so
        self.refusal: _Refused | None = None
        self.expect = False  # Expect: 100-continue, not answered yet

    def body(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Connection(asyncio.Protocol):
    def __init__(self, front: HttpFront) -> None:
        # Made on the loop it serves. Kept: asyncio.get_running_loop() costs a getpid() system
        # call on Python 3.11, once per request otherwise.
        self.loop = asyncio.get_running_loop()
        self.front = front
        self.settings = front.settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: _Request | None = None  # being parsed
        self.waiting: collections.deque[_Request] = collections.deque()  # complete, in order
        self.busy = False  # a request is being answered
        self.broken = False  # nothing more is parsed (an error, or an upgrade)
        self.refusal: _Refused | None = None  # raised from a parser callback
        self.header_bytes = 0
        self.deadline = 0.0  # monotonic; 0: none (a request is running)
        self.timeout_status = 0  # 408 when a read deadline passes, 0 when idle
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused
        self.http10 = False  # the request being answered came as HTTP/1.0

    # -- the transport's events ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        front = self.front
        cap = self.settings.max_connections
        if cap is not None and len(front.connections) >= cap:
            # Over the cap: a 503 at once, then the usual lingering close (so that a client
            # already sending its request reads the answer instead of a reset). It is kept
            # apart, so it never counts against the cap itself.
            front.turned_away.add(self)
            self._refuse(
                _Refused(
                    503,
                    f"the gateway has {len(front.connections)} open connections (the limit is "
                    f"{cap}); retry shortly or reuse a kept-alive connection",
                )
            )
            return
        front.connections.add(self)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.front.turned_away.discard(self)
        self.broken = True
        self.current = None
        self.waiting.clear()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self._refuse(self.refusal or _Refused(500, "the request could not be read"))
        except httptools.HttpParserUpgrade:
            self.broken = True  # no protocol switch here: answer what was parsed, then close
            if self.waiting:
                self.waiting[-1].keep_alive = False
        except httptools.HttpParserError as e:
            self._refuse(_Refused(400, f"malformed HTTP request: {e}"))
        if self.waiting and not self.busy:
            self._next()
        if self.waiting and self.transport is not None:
            self.transport.pause_reading()

    # -- the parser's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.header_bytes = 0
        self._read_deadline(self.settings.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.lower(), value))
        self._count_header(len(name) + len(value))

    def _count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > self.settings.max_header_bytes:
            self._raise(431, f"request headers exceed {self.settings.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        request.method = self.parser.get_method()
        declared = request.header(b"content-length")
        try:
            check_declared_length(
                None if declared is None else declared.decode("latin-1"),
                max_bytes=self.settings.max_body_bytes,
            )
        except ProtocolError as e:
            self._raise(e.status_code, str(e))
        if (
            declared is None
            and request.method == b"POST"
            and request.header(b"transfer-encoding") is None
            and INFER_PATH.match(_path(request.url))
        ):
            self._raise(411, "an inference request needs a Content-Length (or a chunked body)")
        expect = request.header(b"expect")
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                self._raise(417, f"unsupported expectation {expect[:64].decode('latin-1')!r}")
            request.expect = True
            self._continue_if_next()
        self._read_deadline(self.settings.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None
        request.size += len(body)
        if request.size > self.settings.max_body_bytes:
            self._raise(
                413,
                f"request body exceeds the limit of {self.settings.max_body_bytes} bytes",
            )
        request.chunks.append(body)
        self._read_deadline(self.settings.body_timeout_s)

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        request.keep_alive = self.parser.should_keep_alive()  # 1.0: only with keep-alive asked
        request.http10 = self.parser.get_http_version() == "1.0"
        self.current = None
        self.deadline = 0.0
        self.waiting.append(request)

    def _raise(self, status: int, message: str) -> None:
        self.refusal = _Refused(status, message)
        raise self.refusal

    # -- deadlines (checked by the front's ticker) -------------------------------------------

    def _read_deadline(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.timeout_status = 408

    def _idle(self) -> None:
        self.deadline = time.monotonic() + self.settings.keep_alive_s
        self.timeout_status = 0

    def expire(self) -> None:
        """The deadline passed: a request half read gets 408; an idle connection just closes."""
        self.deadline = 0.0
        if self.timeout_status and self.current is not None and not self.busy:
            phase = "headers" if not self.current.method else "body"
            self._refuse(_Refused(408, f"the request's {phase} did not arrive in time"))
        elif self.transport is not None and not self.busy:
            self.transport.close()

    # -- answering, one request at a time --------------------------------------------------

    def _refuse(self, refusal: _Refused) -> None:
        """Answer ``refusal`` after the requests before it, then close; parse nothing more."""
        self.broken = True
        self.current = None
        request = _Request()
        request.refusal = refusal
        request.keep_alive = False
        self.waiting.append(request)
        if not self.busy:
            self._next()

    def _next(self) -> None:
        request = self.waiting.popleft()
        self.busy = True
        self.http10 = request.http10
        self.deadline = 0.0
        if request.refusal is not None:
            refusal = request.refusal
            if refusal.status == 503:
                answer = error_answer(503, str(refusal), "Overloaded", [("retry-after", "1")])
            else:
                answer = error_answer(refusal.status, str(refusal), "InvalidRequest", [])
            self._answer(answer, False)
            return
        path = _path(request.url)
        match = INFER_PATH.match(path) if request.method == b"POST" else None
        if match and self.front.eager:
            self._infer_eagerly(request, match["name"])
            return
        answering = self._infer(request, match["name"]) if match else self._asgi(request, path)
        # A task: a request sent over a lane always waits for its node, and the routes behind
        # the bridge (httpx, anyio, sniffio) need a current task.
        task = self.loop.create_task(answering)  # its own context: see _infer
        self.front.tasks.add(task)
        task.add_done_callback(self._answered)

    def _infer_eagerly(self, request: _Request, name: str) -> None:
        """An inference on a gateway with its node in the gateway's own process: started at
        once, a task only if it waits (``core/eager.py``). A warm small model's request never
        waits (its node answers in-process, inline), so there is no task, no ``call_soon`` hop
        and no loop iteration for its step or its end. Its first step needs no current task: the
        gateway's path (inspection, the policy, the dispatcher) and the node's answer use none
        of ``asyncio.timeout``, TaskGroups, anyio or sniffio (``tests/scheduler/
        test_front_eager.py`` checks that warm requests reach ``Gateway.infer`` with no current
        task and are answered)."""
        try:
            task = start_eagerly(self._infer(request, name))
        except Exception:  # as _answered: answer_infer answers every error; a bug of the front
            logger.exception("the HTTP front failed a request")
            self._close()
            return
        if task is not None:
            self.front.tasks.add(task)
            task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self.front.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # answer_infer and the bridge answer every error; this is a bug of the front itself
        logger.error("the HTTP front failed a request", exc_info=task.exception())
        self._close()

    async def _infer(self, request: _Request, name: str) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        replicas = self.front.gateway.replicas
        if replicas is not None:  # the scale-out ingress (replicas.py), in this request's task
            replicas.admit(
                name,
                forwarded_by=headers.get(FORWARDED_HEADER) or None,
                request_key=headers.get(REQUEST_KEY_HEADER) or None,
            )
        body = request.body()

        async def read() -> bytes:
            check_content_encoding(headers.get("content-encoding"))
            return body

        status, answer_headers, content = await answer_infer(
            self.front.gateway, name, read, headers
        )
        # headers as bytes, as the node wrote them; written here, no coroutine layer between
        self._write(status, answer_headers, content, request.keep_alive, head=False)
        if self.drained is not None:  # the client is not reading: wait before the next answer
            await self.drained
        self._done(request.keep_alive)

    async def _asgi(self, request: _Request, path: str) -> None:
        """The bridge: ``request`` as one ASGI HTTP cycle of the gateway's app."""
        scope = _asgi_scope(
            request,
            path,
            http_version=self.parser.get_http_version(),
            transport=self.transport,
            state=self.front.state,
        )
        answer = await _asgi_cycle(self.front.app, scope, request.body())
        if answer is None:  # the app failed after starting its answer: part of it may be out
            self._close()
            return
        await self._finish_raw(
            answer.status,
            answer.headers,
            answer.content,
            request.keep_alive and answer.from_app,
            head=answer.from_app and request.method == b"HEAD",
        )

    async def _finish_raw(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        content: bytes,
        keep_alive: bool,
        *,
        head: bool,
    ) -> None:
        self._write(status, headers, content, keep_alive, head=head)
        if self.drained is not None:  # the client is not reading: wait before the next answer
            await self.drained
        self._done(keep_alive)

    def _answer(self, answer: Answer, keep_alive: bool) -> None:
        """A refusal's answer, written at once (no request ran)."""
        status, headers, content = answer
        self._write(status, headers, content, keep_alive, head=False)
        self._done(keep_alive)

    def _write(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        content: bytes,
        keep_alive: bool,
        *,
        head: bool,
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Unknown"))]
        length = False
        for key, value in headers:
            if key == b"content-length":
                length = True
            elif key in (b"connection", b"transfer-encoding", b"date"):
                continue  # the front's own
            lines.append(b"%s: %s\r\n" % (key, value))
        if not length:
            lines.append(b"content-length: %d\r\n" % len(content))
        lines.append(self.front.date_line)
        if not keep_alive or self.front.stopping:
            lines.append(b"connection: close\r\n")
        elif self.http10:  # an HTTP/1.0 client closes unless told the connection stays
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        if head:
            content = b""
        if len(content) <= _JOIN_BELOW:
            lines.append(content)
            transport.write(b"".join(lines))
        else:
            transport.writelines((b"".join(lines), content))

    def _done(self, keep_alive: bool) -> None:
        self.busy = False
        if not keep_alive or self.front.stopping:
            self._close()
            return
        if self.waiting:
            if self.front.eager:  # the next in a later callback: answered at once, they'd recurse
                asyncio.get_running_loop().call_soon(self._next_if_idle)
            else:
                self._next()
            return
        if self.transport is not None:
            self.transport.resume_reading()
        if self.current is None:
            self._idle()
        else:
            self._continue_if_next()
            self._read_deadline(self.settings.body_timeout_s)

    def _next_if_idle(self) -> None:
        if self.waiting and not self.busy:
            self._next()

    def _continue_if_next(self) -> None:
        """``100 Continue`` for the request being read, once the answers before it are out."""
        request = self.current
        if request is None or not request.expect or self.busy or self.waiting:
            return
        request.expect = False
        if self.transport is not None:
            self.transport.write(_CONTINUE)

    def _close(self) -> None:
        """Close after what was written. Half-close first, and read (and drop) what the client
        still sends for ``_LINGER_S``: closing with its unread bytes would reset the connection
        and could destroy our answer (a 413, say) before the client read it."""
        self.broken = True
        self.waiting.clear()
        transport = self.transport
        if transport is None:
            return
        if self.front.stopping or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self.deadline = time.monotonic() + _LINGER_S
        self.timeout_status = 0


def _path(url: bytes) -> str:
    raw = url.split(b"?", 1)[0]
    path = raw.decode("latin-1")
    return urllib.parse.unquote(path) if "%" in path else path


def _address(transport: asyncio.Transport | None, what: str) -> tuple[str, int] | None:
    found = None if transport is None else transport.get_extra_info(what)
    if isinstance(found, tuple) and len(found) >= 2:
        return str(found[0]), int(found[1])
    return None


@dataclass(frozen=True, slots=True)
class _AppAnswer:
    """What one ASGI cycle answered: the app's own answer, or our error answer for an app that
    failed before starting one (``from_app`` False: the connection closes after it)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes
    from_app: bool


def _error(status: int, message: str) -> _AppAnswer:
    code, out, content = error_answer(status, message, "InternalError", [])
    return _AppAnswer(code, out, content, from_app=False)


def _asgi_scope(
    request: _Request,
    path: str,
    *,
    http_version: str,
    transport: asyncio.Transport | None,
    state: Mapping[str, Any],
) -> dict[str, Any]:
    raw_path, _, query = request.url.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": request.method.decode("ascii", "replace"),
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": request.headers,
        "client": _address(transport, "peername"),
        "server": _address(transport, "sockname"),
        "state": dict(state),
    }


async def _asgi_cycle(app: ASGIApp, scope: dict[str, Any], body: bytes) -> _AppAnswer | None:
    """Run one ASGI HTTP cycle of ``app`` with the whole ``body``; its answer, or None when the
    app failed after it had started one."""
    pending: bytes | None = body
    done = asyncio.get_running_loop().create_future()
    started: list[Message] = []
    sent: list[bytes] = []

    async def receive() -> Message:
        nonlocal pending
        if pending is not None:
            message = {"type": "http.request", "body": pending, "more_body": False}
            pending = None
            return message
        await done  # after the body: nothing more comes until the cycle ends
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.append(message)
        elif message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if not message.get("more_body", False) and not done.done():
                done.set_result(None)

    try:
        await app(scope, receive, send)
    except Exception as e:  # as FastAPI's handlers do: a message, never a traceback
        logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
        if started:
            return None
        return _error(500, f"internal error ({type(e).__name__}); see the server log")
    finally:
        if not done.done():
            done.set_result(None)
    if not started:
        return _error(500, "the app sent no response")
    start = started[0]
    headers = [(bytes(k).lower(), bytes(v)) for k, v in start.get("headers", ())]
    return _AppAnswer(int(start["status"]), headers, b"".join(sent), from_app=True)


class HttpFront:
    """The listeners, their connections, the app's lifespan and the deadline ticker."""

    def __init__(self, app: ASGIApp, *, gateway: Gateway, settings: FrontSettings) -> None:
        self.app = app
        self.gateway = gateway
        self.settings = settings
        self.connections: set[_Connection] = set()
        self.turned_away: set[_Connection] = set()  # over max_connections: 503, then closing
        self.state: dict[str, Any] = {}
        self.stopping = False
        self.date_line = b""
        self.tasks: set[asyncio.Task[None]] = set()  # requests being answered
        # Inference started eagerly, a task only if it waits: where the node is in this process
        # (--node-transport inprocess). Python 3.11 only: from 3.12 ``asyncio.wait_for`` (which
        # the lanes and the shard coordinator use once a call waits) needs a current task; there
        # 3.12's eager task factory would do the same, and is not wired yet.
        self.eager = gateway.config.transport == "inprocess" and sys.version_info < (3, 12)
        self._servers: list[asyncio.AbstractServer] = []
        self._lifespan: LifespanOn | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_s = min(
            1.0,
            settings.header_timeout_s / 4,
            settings.body_timeout_s / 4,
            settings.keep_alive_s / 4,
        )

    @property
    def ports(self) -> list[int]:
        servers = cast(list[asyncio.Server], self._servers)  # AbstractServer lacks ``sockets``
        return [int(s.getsockname()[1]) for server in servers for s in server.sockets]

    async def start(
        self,
        *,
        sockets: Sequence[socket.socket] = (),
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        """Run the app's lifespan startup, then listen on ``sockets`` and/or ``host:port``."""
        config = uvicorn.Config(self.app, lifespan="on", log_level="warning", proxy_headers=False)
        lifespan = self._lifespan = LifespanOn(config)
        await lifespan.startup()
        if lifespan.should_exit:
            raise RuntimeError("the gateway's startup failed; see the log")
        self.state = lifespan.state
        self._tick()
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock))
        if port is not None:
            self._servers.append(await loop.create_server(lambda: _Connection(self), host, port))

    def _tick(self) -> None:
        """Once per tick: the Date header, and connections whose deadline has passed."""
        self.date_line = b"date: %s\r\n" % formatdate(usegmt=True).encode()
        now = time.monotonic()
        for connections in (self.connections, self.turned_away):
            for connection in [c for c in connections if 0 < c.deadline <= now]:
                connection.expire()
        self._ticker = asyncio.get_running_loop().call_later(self._tick_s, self._tick)

    async def close(self) -> None:
        """Stop listening, let running requests finish (``shutdown_grace_s``), close every
        connection, then run the app's lifespan shutdown."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for connection in [*self.connections, *self.turned_away]:
            if not connection.busy and connection.transport is not None:
                connection.transport.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=self.settings.shutdown_grace_s)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        closing = [asyncio.wait_for(server.wait_closed(), 1.0) for server in self._servers]
        await asyncio.gather(*closing, return_exceptions=True)  # each bounded; none may fail it
        self._servers.clear()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._lifespan is not None:
            await self._lifespan.shutdown()
            self._lifespan = None
