"""Unary gRPC over HTTP/2, served on the gateway's own event loop (an ``asyncio.Protocol``).

Why not grpcio's server: on this kind of machine ``grpc.aio`` costs ~320 µs of CPU per echo call
(its completion queue is polled on a thread of its own and every event is handed to the loop,
through several syscalls and GIL hand-offs), against ~90 µs for the HTTP front (uvicorn with
httptools). Parsing HTTP/2 frames here, with the ``hpack`` library for header blocks, costs
~70 µs per call (``docs/dataplane.md``, "gRPC"). Clients are unchanged: ``tritonclient.grpc``
and every other gRPC client speak to it as to any gRPC server.

What it implements (RFC 9113 and the gRPC-over-HTTP/2 protocol), and no more:

* the connection preface, SETTINGS (with their ACK), PING ACKs, GOAWAY, RST_STREAM, PRIORITY
  (ignored), padding, CONTINUATION, and flow control both ways (windows replenished as data is
  consumed; an answer larger than the peer's window waits for its WINDOW_UPDATE);
* unary calls: one length-prefixed message in, one out; ``grpc-timeout``; ``gzip``/``deflate``
  compressed requests (answers go uncompressed, as the protocol allows); trailers-only errors
  with ``grpc-status``, ``grpc-message`` (percent-encoded) and ``grpc-status-details-bin``;
  a successful answer's ``content-type`` and ``grpc-status: 0`` go into the client's HPACK
  table once and are one byte each after that (:class:`_AnswerFields`);
* limits: a message over ``max_message_bytes`` is RESOURCE_EXHAUSTED, and so is a call that
  would make the connection's unfinished requests hold more than
  :data:`UNFINISHED_MESSAGES` such messages; at most
  :data:`MAX_STREAMS` calls at once per connection (REFUSED_STREAM beyond), header lists over
  16 KiB end the connection. A peer that breaks the protocol gets a GOAWAY and loses its
  connection; every other connection keeps being served.

No TLS (the gateway's gRPC port is plaintext, as its HTTP port), no streaming methods, no server
push. The handler of a method is an ``async (message, metadata, timeout_s) -> bytes`` that raises
:class:`RpcError` to answer with a status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

import grpc
from hpack import Decoder, HPACKError
from hpack.hpack import encode_integer

from gpufaas.core.sockets import listening_socket

logger = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 256
UNFINISHED_MESSAGES = 2  # per connection: request bytes buffered before their calls end
MAX_HEADER_LIST = 16 * 1024
MAX_FRAME = 16_384  # ours: the protocol's default, so there is nothing to advertise
WINDOW = 16 * 2**20  # what a peer may send us before we acknowledge, per stream and connection
_JOIN_BELOW = 64 * 1024  # what we send is joined into one buffer up to this size

# frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x7, 0x8, 0x9

Metadata = Mapping[str, str]
UnaryHandler = Callable[[bytes, Metadata, "float | None"], Awaitable[bytes]]

_HIGH_BYTES = bytes(range(0x80, 0x100))
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class RpcError(Exception):
    """Answer the call with ``code``, ``message`` and, if given, ``details``: a serialized
    ``google.rpc.Status`` (the rich status, e.g. with RetryInfo)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, details: bytes | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# A frame's 9-byte header as (length << 8 | type, flags, stream): one unpack per frame
_FRAME_HEADER = struct.Struct(">IBI")


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEADER.pack(len(payload) << 8 | kind, flags, stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK "literal without indexing, new name" field: no dynamic table on our side, so
    the peer's SETTINGS_HEADER_TABLE_SIZE never matters to what we send."""
    return (
        b"\x00"
        + bytes(encode_integer(len(name), 7))
        + name
        + bytes(encode_integer(len(value), 7))
        + value
    )


# ":status: 200" is static-table entry 8; content-type is entry 31 (name only)
_RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes(encode_integer(16, 7)) + b"application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")
# The same two fields "with incremental indexing": the client's decoder keeps them, and every
# later answer names each with one byte (an index into its dynamic table; see _AnswerFields)
_CONTENT_TYPE_ADDED = b"\x5f" + bytes(encode_integer(16, 7)) + b"application/grpc"  # name: 31
_STATUS_OK_ADDED = b"\x40" + _OK_TRAILERS[1:]
_ANSWER_ENTRIES = (32 + 12 + 16) + (32 + 11 + 1)  # their size in that table (RFC 7541, 4.1)


def _percent_encode(message: str) -> bytes:
    data = message.encode("utf-8")[:4096]
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in data)


def _status_block(error: RpcError) -> bytes:
    block = _literal(b"grpc-status", str(error.code.value[0]).encode()) + _literal(
        b"grpc-message", _percent_encode(error.message)
    )
    if error.details is not None:
        block += _literal(b"grpc-status-details-bin", base64.b64encode(error.details).rstrip(b"="))
    return block


def parse_timeout(value: str) -> float | None:
    """``grpc-timeout`` (e.g. ``"100m"``) in seconds; None if absent or malformed."""
    match = _TIMEOUT.fullmatch(value.strip())
    return None if match is None else int(match[1]) * _TIMEOUT_UNITS[match[2]]


class _AnswerFields:
    """The header blocks of a connection's answers, and what they leave in the client's HPACK
    table. The first successful answer adds ``content-type`` and ``grpc-status: 0`` to it; every
    later one sends ``:status 200``, ``content-type`` and ``grpc-status`` as one byte each, which
    grpc's client decodes with less work than literals (``docs/dataplane.md``, "gRPC", sixth
    pass). Nothing else is ever added, so with a table of at least :data:`_ANSWER_ENTRIES` bytes
    nothing is evicted. When the client changes SETTINGS_HEADER_TABLE_SIZE, the next block opens
    with a table size update (RFC 7541, 4.2) that empties the table; below that size, literals."""

    __slots__ = ("entries", "limit", "resized", "steady")

    def __init__(self) -> None:
        self.limit = 4096  # the client's table size (SETTINGS_HEADER_TABLE_SIZE)
        self.entries: tuple[bytes, ...] = ()  # what we added, the newest (index 62) first
        self.resized = False
        # a successful answer's two blocks once they no longer change the client's table
        self.steady: tuple[bytes, bytes] | None = None

    def peer_table_size(self, size: int) -> None:
        if size != self.limit:
            self.limit, self.resized, self.steady = size, True, None

    def ok(self) -> tuple[bytes, bytes]:
        """A successful answer's headers and trailers (:meth:`headers`, :meth:`ok_trailers`):
        from the second answer on, the same bytes until the client's table size changes."""
        if self.steady is not None:
            return self.steady
        resized, before = self.resized, self.entries
        blocks = (self.headers(), self.ok_trailers())
        if not resized and self.entries == before:
            self.steady = blocks
        return blocks

    def headers(self) -> bytes:
        """``:status 200`` and ``content-type``."""
        start = self._start()
        return start + b"\x88" + self._field(_CONTENT_TYPE_ADDED, _RESPONSE_HEADERS[1:])

    def ok_trailers(self) -> bytes:
        """``grpc-status: 0``."""
        start = self._start()
        return start + self._field(_STATUS_OK_ADDED, _OK_TRAILERS)

    def error(self, error: RpcError) -> bytes:
        """A trailers-only answer: headers and status in one block, as literals."""
        return self._start() + _RESPONSE_HEADERS + _status_block(error)

    def _start(self) -> bytes:
        """A block's table size updates, if the client's size changed: to 0 (the table
        empties), then to its new size."""
        if not self.resized:
            return b""
        self.resized, self.entries = False, ()
        size = bytearray(encode_integer(self.limit, 5))
        size[0] |= 0x20
        return b"\x20" + bytes(size)

    def _field(self, added: bytes, literal: bytes) -> bytes:
        if added in self.entries:
            return bytes((0x80 | 62 + self.entries.index(added),))
        if self.limit < _ANSWER_ENTRIES:
            return literal
        self.entries = (added, *self.entries)
        return added


@dataclass(frozen=True, slots=True)
class _Head:
    """A decoded header block, and what a call opened by it needs: its method's path, its
    metadata (read-only: one block's is shared by every call it opens) and, if gRPC cannot
    serve it, why."""

    headers: list[tuple[bytes, bytes]]
    path: str
    metadata: Mapping[str, str]
    refusal: str | None


def _head(headers: list[tuple[bytes, bytes]], handlers: Mapping[str, UnaryHandler]) -> _Head:
    path = ""
    method = content_type = b""
    metadata: dict[str, str] = {}
    for name, value in headers:
        if name == b":path":
            path = value.decode("latin-1")
        elif name == b":method":
            method = value
        elif name == b"content-type":
            content_type = value
        elif not name.startswith(b":"):
            metadata[name.decode("latin-1")] = value.decode("latin-1")
    refusal = None
    if method != b"POST" or not content_type.startswith(b"application/grpc"):
        refusal = "gRPC needs POST with content-type application/grpc"
    elif path not in handlers:
        refusal = f"method {path} is not implemented"
    return _Head(headers, path, MappingProxyType(metadata), refusal)


@dataclass(eq=False, slots=True)
class _Stream:
    id: int
    send_window: int
    path: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    unacked: int = 0
    remote_open: bool = True
    rejected: RpcError | None = None
    task: asyncio.Task[None] | None = None
    outbox: memoryview | None = None  # answer bytes waiting for the peer's window


class _HeaderBlocks:
    """A connection's HPACK decoder, with the heads of indexed-only blocks remembered."""

    __slots__ = ("decoder", "handlers", "known")

    def __init__(self, handlers: Mapping[str, UnaryHandler]) -> None:
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.handlers = handlers
        self.known: dict[bytes, _Head] = {}

    def decode(self, block: bytes) -> _Head:
        """The block, decoded. Decoded even for a stream we refuse: the decoder's table must
        follow the peer's. A block of only one-byte indexed fields (every byte >= 0x80: what a
        client sends once its headers are in the table) leaves the table as it is, so its head
        is remembered until a block that may change the table arrives; that skips the pure-Python
        decode (~18 µs) and the reading of the headers on nearly every call."""
        indexed_only = not block.translate(None, _HIGH_BYTES)
        if indexed_only and (known := self.known.get(block)) is not None:
            return known
        try:
            headers = cast(list[tuple[bytes, bytes]], self.decoder.decode(block, raw=True))
        except HPACKError as e:
            raise _ConnectionError(COMPRESSION_ERROR, f"a bad header block: {e}") from None
        head = _head(headers, self.handlers)
        if not indexed_only:
            self.known.clear()
        elif len(self.known) < 64:
            self.known[block] = head
        return head


def unary_message(body: bytes, *, encoding: str, max_bytes: int) -> bytes:
    """The one length-prefixed message of a unary call's request body, inflated if the call
    compressed it (``encoding``: its grpc-encoding); RpcError for anything else."""
    if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise RpcError(grpc.StatusCode.INTERNAL, "a unary call takes exactly one message")
    if not body[0]:
        return body[5:]
    if encoding not in ("gzip", "deflate"):
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {encoding!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        message = inflater.decompress(body[5:], max_bytes + 1)
    except zlib.error as e:
        raise RpcError(grpc.StatusCode.INTERNAL, f"a bad {encoding} message: {e}") from None
    if len(message) > max_bytes:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the message is larger than the limit of {max_bytes} bytes",
        )
    return message


class _Connection(asyncio.Protocol):
    """One client connection: parses frames as they arrive, runs a task per call."""

    def __init__(self, server: GrpcH2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.header_blocks = _HeaderBlocks(server.handlers)
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # answers waiting for the peer's window, in order
        self.last_stream = 0
        self.continuation: tuple[int, int, list[bytes]] | None = None
        self.peer_window = 65_535  # the connection's send window
        self.peer_initial = 65_535  # a new stream's send window (SETTINGS_INITIAL_WINDOW_SIZE)
        self.peer_max_frame = 16_384
        self.unacked = 0
        self.draining = False
        self.out: list[bytes] = []  # frames to send at the end of this turn of the loop
        self.answer_fields = _AnswerFields()

    # -- connection events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        settings = (
            (3).to_bytes(2, "big") + MAX_STREAMS.to_bytes(4, "big")
            + (4).to_bytes(2, "big") + WINDOW.to_bytes(4, "big")
            + (6).to_bytes(2, "big") + MAX_HEADER_LIST.to_bytes(4, "big")
        )  # fmt: skip
        self.transport.write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, (WINDOW - 65_535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self.blocked.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            if self.buffer or not self.preface:
                self.buffer += data
                self._parse_buffer()
            else:  # the usual read: whole frames, nothing left over from the last one
                done = self._parse(data)
                if done < len(data):
                    self.buffer += memoryview(data)[done:]
        except _ConnectionError as e:
            self._fail(e.code, str(e))
        self._drain()

    # -- frames in ---------------------------------------------------------------------------

    def _parse_buffer(self) -> None:
        buffer = self.buffer
        if not self.preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(buffer)):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if bytes(buffer[: len(PREFACE)]) != PREFACE:
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del buffer[: len(PREFACE)]
            self.preface = True
        del buffer[: self._parse(buffer)]

    def _parse(self, data: bytes | bytearray) -> int:
        """Handle the whole frames at the start of ``data``; how many bytes they took. Each
        payload is one copy when ``data`` is ``bytes`` (read straight from the socket), as
        slicing bytes copies once (``bytes()`` of bytes is the same object)."""
        offset, size = 0, len(data)
        while size - offset >= 9 and self.transport is not None:
            word, flags, stream = _FRAME_HEADER.unpack_from(data, offset)
            length = word >> 8
            if length > MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            end = offset + 9 + length
            if size < end:
                break
            payload = bytes(data[offset + 9 : end])
            offset = end
            self._frame_in(word & 0xFF, flags, stream & 0x7FFF_FFFF, payload)
        return offset

    def _frame_in(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream, payload)
        elif kind == HEADERS:
            self._headers(flags, stream, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self.continuation[2].append(payload)
            if sum(map(len, self.continuation[2])) > MAX_HEADER_LIST:
                raise _ConnectionError(COMPRESSION_ERROR, "a header block over 16 KiB")
            if flags & END_HEADERS:
                sid, header_flags, fragments = self.continuation
                self.continuation = None
                self._header_block(sid, header_flags, b"".join(fragments))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a PING must carry 8 bytes")
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            gone = self.streams.pop(stream, None)
            self.blocked.pop(stream, None)
            if gone is not None and gone.task is not None:
                gone.task.cancel()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY, GOAWAY (the peer closes when it is done) and unknown types: nothing to do

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a SETTINGS frame of a bad length")
        for at in range(0, len(payload), 6):
            key = int.from_bytes(payload[at : at + 2], "big")
            value = int.from_bytes(payload[at + 2 : at + 6], "big")
            if key == 1:
                self.answer_fields.peer_table_size(value)
            elif key == 4:
                if value > 0x7FFF_FFFF:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                for stream in self.streams.values():
                    stream.send_window += value - self.peer_initial
                self.peer_initial = value
            elif key == 5:
                if not 16_384 <= value < 2**24:
                    raise _ConnectionError(PROTOCOL_ERROR, "a bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self._write(_frame(SETTINGS, ACK, 0))
        self._flush()

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a WINDOW_UPDATE must carry 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
        if increment == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        if stream == 0:
            self.peer_window += increment
        elif (target := self.streams.get(stream)) is not None:
            target.send_window += increment
        if self.blocked:
            self._flush()

    def _headers(self, flags: int, stream: int, payload: bytes) -> None:
        if stream == 0 or stream % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {stream}")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream, flags, block)
        else:
            self.continuation = (stream, flags, [block])

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        head = self.header_blocks.decode(block)
        stream = self.streams.get(sid)
        if stream is None:
            if sid <= self.last_stream:
                return  # trailers of a stream already answered or reset
            self.last_stream = sid
            stream = self._open(sid, head, ended=bool(flags & END_STREAM))
            if stream is None:
                return
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _open(self, sid: int, head: _Head, *, ended: bool) -> _Stream | None:
        if self.draining or len(self.streams) >= MAX_STREAMS:
            self._write(_frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return None
        stream = _Stream(sid, self.peer_initial, head.path, head.metadata, remote_open=not ended)
        self.streams[sid] = stream
        if head.refusal is not None:
            stream.rejected = RpcError(grpc.StatusCode.UNIMPLEMENTED, head.refusal)
            self._answer(stream, error=stream.rejected)
        return stream

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        self.unacked += len(payload)
        if self.unacked >= WINDOW // 2:
            self._write(_frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big")))
            self.unacked = 0
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            return  # data of a stream already answered, reset or refused: counted, dropped
        data = self._unpad(flags, payload)
        if stream.rejected is None:
            stream.size += len(data)
            if stream.size > self.server.max_message_bytes + 5:
                stream.rejected = RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the message is larger than the limit of {self.server.max_message_bytes} bytes",
                )
                stream.chunks.clear()
                self._answer(stream, error=stream.rejected)
            elif not flags & END_STREAM and self._unfinished_bytes() > UNFINISHED_MESSAGES * (
                self.server.max_message_bytes + 5
            ):
                # Many calls each short of the limit, none finished: without this bound one
                # connection could hold MAX_STREAMS messages of the limit's size in memory. (A
                # message that ends in this frame is finished: it goes to its call now.)
                stream.rejected = RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this connection's unfinished calls hold more than {UNFINISHED_MESSAGES}"
                    " messages of the size limit; finish or cancel some before starting more",
                )
                stream.chunks.clear()
                self._answer(stream, error=stream.rejected)
            else:
                stream.chunks.append(data)
            stream.unacked += len(payload)
            if stream.unacked >= WINDOW // 2 and not flags & END_STREAM:
                self._write(_frame(WINDOW_UPDATE, 0, sid, stream.unacked.to_bytes(4, "big")))
                stream.unacked = 0
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _unfinished_bytes(self) -> int:
        """Bytes buffered for calls whose request has not ended yet (a few streams at most)."""
        return sum(s.size for s in self.streams.values() if s.remote_open and s.rejected is None)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "padding longer than its frame")
        return payload[1 : len(payload) - payload[0]]

    # -- calls -------------------------------------------------------------------------------

    def _end_of_request(self, stream: _Stream) -> None:
        stream.remote_open = False
        if stream.rejected is not None:
            return  # answered already
        try:
            body = b"".join(stream.chunks)
            stream.chunks.clear()
            message = unary_message(
                body,
                encoding=stream.metadata.get("grpc-encoding", "identity"),
                max_bytes=self.server.max_message_bytes,
            )
        except RpcError as e:
            self._answer(stream, error=e)
            return
        handler = self.server.handlers[stream.path]
        stream.task = asyncio.get_running_loop().create_task(self._call(stream, handler, message))

    async def _call(self, stream: _Stream, handler: UnaryHandler, message: bytes) -> None:
        timeout = stream.metadata.get("grpc-timeout")
        timeout_s = None if timeout is None else parse_timeout(timeout)
        try:
            answer = await handler(message, stream.metadata, timeout_s)
        except RpcError as e:
            self._answer(stream, error=e)
        except asyncio.CancelledError:
            self.streams.pop(stream.id, None)
            self.blocked.pop(stream.id, None)
            raise
        except Exception:
            logger.exception("unhandled error in gRPC call %s", stream.path)
            self._answer(stream, error=RpcError(grpc.StatusCode.INTERNAL, "internal error"))
        else:
            self._answer(stream, message=answer)
        self._drain()

    # -- frames out --------------------------------------------------------------------------

    def _answer(
        self, stream: _Stream, *, message: bytes | None = None, error: RpcError | None = None
    ) -> None:
        if self.transport is None or self.streams.get(stream.id) is not stream:
            return  # reset meanwhile, or the connection is gone
        sid = stream.id
        if error is not None:  # trailers only
            block = self.answer_fields.error(error)
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
            self._finish(stream)
            return
        assert message is not None
        size = len(message) + 5
        if size <= min(stream.send_window, self.peer_window, self.peer_max_frame):
            # the usual answer: headers, the message in one DATA frame, trailers
            stream.send_window -= size
            self.peer_window -= size
            headers, trailers = self.answer_fields.ok()
            self.out += (
                _FRAME_HEADER.pack(len(headers) << 8 | HEADERS, END_HEADERS, sid),
                headers,
                _FRAME_HEADER.pack(size << 8 | DATA, 0, sid),
                b"\x00" + len(message).to_bytes(4, "big"),
                message,
                _FRAME_HEADER.pack(len(trailers) << 8 | HEADERS, END_HEADERS | END_STREAM, sid),
                trailers,
            )
            self._finish(stream)
            return
        self._write(_frame(HEADERS, END_HEADERS, sid, self.answer_fields.headers()))
        stream.outbox = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
        self._send_outbox(stream)

    def _send_outbox(self, stream: _Stream) -> None:
        outbox = stream.outbox
        assert outbox is not None
        frames: list[bytes] = []
        while outbox and (room := min(stream.send_window, self.peer_window)) > 0:
            chunk = outbox[: min(room, self.peer_max_frame)]
            frames.append(_frame(DATA, 0, stream.id, bytes(chunk)))
            stream.send_window -= len(chunk)
            self.peer_window -= len(chunk)
            outbox = outbox[len(chunk) :]
        if not outbox:
            trailers = self.answer_fields.ok_trailers()
            frames.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))
        self.out.extend(frames)
        if outbox:
            stream.outbox = outbox
            self.blocked[stream.id] = stream
        else:
            stream.outbox = None
            self.blocked.pop(stream.id, None)
            self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        """Our side is closed; if the peer's is still open, tell it to stop sending."""
        if stream.remote_open:
            self._write(_frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))
            stream.remote_open = False
        self.streams.pop(stream.id, None)

    def _flush(self) -> None:
        """Send what the peer's windows now allow of the answers waiting for them."""
        for stream in list(self.blocked.values()):
            self._send_outbox(stream)

    def _write(self, frame: bytes) -> None:
        self.out.append(frame)

    def _drain(self) -> None:
        """Send what is queued in one write: a whole answer (headers, data, trailers) is one
        syscall, as are the acknowledgements a batch of incoming frames asks for."""
        out = self.out
        if out:
            if self.transport is not None:
                if sum(map(len, out)) <= _JOIN_BELOW:
                    self.transport.write(b"".join(out))  # uvloop's fastest path: one buffer
                else:
                    self.transport.writelines(out)  # no copy of a large answer
            self.out = []

    def _fail(self, code: int, reason: str) -> None:
        logger.info("closing a gRPC connection: %s", reason)
        if self.transport is not None:
            self._write(
                _frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + code.to_bytes(4, "big")
                       + reason.encode()[:256])
            )  # fmt: skip
            self._drain()
            self.transport.close()

    def goaway(self) -> None:
        """Refuse new calls; those in flight finish."""
        self.draining = True
        self._write(
            _frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big"))
        )
        self._drain()

    def calls_in_flight(self) -> list[asyncio.Task[None]]:
        return [s.task for s in self.streams.values() if s.task is not None and not s.task.done()]


class GrpcH2Server:
    """The gRPC server: ``handlers`` maps ``/package.Service/Method`` to a unary handler.
    Binds at construction (a port in use is an error at once), or serves ``sock``, a socket
    already listening (``gpufaas up`` passes each replica's down); serves from :meth:`start`."""

    def __init__(
        self,
        handlers: Mapping[str, UnaryHandler],
        *,
        host: str,
        port: int,
        max_message_bytes: int,
        sock: socket.socket | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self.socket = sock if sock is not None else listening_socket(host, port, shared=False)
        self.port: int = self.socket.getsockname()[1]
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # (asyncio and uvloop set TCP_NODELAY on every accepted socket themselves)
        self._server = await loop.create_server(lambda: _Connection(self), sock=self.socket)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let calls in flight finish for up to ``grace`` seconds, then close."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.goaway()
        in_flight = [task for c in self.connections for task in c.calls_in_flight()]
        if in_flight and grace:
            await asyncio.wait(in_flight, timeout=grace)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self.socket.close()
