"""The framed gateway -> GPU manager transport: its wire format, shared by both ends.

The gateway's inference calls to a GPU manager can skip HTTP: over a Unix domain socket when
both share a host, over TCP otherwise, each call is one frame and each answer one frame, on a
persistent connection that carries one call at a time (``docs/dataplane.md``). The HTTP route
stays for everyone else; both end in the node's one answer function.

A frame is a fixed 12-byte head, then ``meta`` (a few short text fields), then ``body`` (the
inference body exactly as the client sent it, or the node's answer exactly as it encoded it)::

    head = magic b"GF" | version u8 | kind u8 | meta length u32 | body length u32   (big-endian)

Kinds: :data:`HELLO` (gateway -> node, first on every connection: the bearer token),
:data:`INFER` (gateway -> node: :class:`InferHead`), :data:`ANSWER` (node -> gateway: status and
headers, :func:`encode_answer`). Both lengths are checked against bounds before a byte of the
frame is buffered (:class:`FrameReader`): a frame that claims more than the receiver accepts is
refused (:class:`FrameError`, 413) without copying anything.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ANSWER",
    "HELLO",
    "INFER",
    "MAX_META_BYTES",
    "Frame",
    "FrameError",
    "FrameReader",
    "FramedEndpoint",
    "InferHead",
    "answer_frame",
    "decode_answer_meta",
    "decode_answer_pairs",
    "encode_answer",
    "encode_hello",
    "parse_hello",
]

MAGIC = b"GF"
VERSION = 1
HELLO, INFER, ANSWER = 1, 2, 3
KINDS = frozenset((HELLO, INFER, ANSWER))
HEAD = struct.Struct("!2sBBII")
MAX_META_BYTES = 64 * 1024  # model, device, eviction hints / status and a few headers


class FramedEndpoint(BaseModel):
    """Where a GPU manager serves frames (in its ``NodeState``): a Unix socket path, for a
    gateway on the same host, and/or a TCP port on the node's own host."""

    model_config = ConfigDict(extra="ignore")

    unix_path: str | None = None
    tcp_port: int | None = None


class FrameError(Exception):
    """A frame the receiver refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Frame(NamedTuple):
    """One frame read: its kind, and views of its meta and body. A named tuple: one is built per
    frame read at each end, and a tuple is the cheapest to build."""

    kind: int
    meta: memoryview | bytes
    body: memoryview | bytes


def frame_head(kind: int, meta: bytes, body_length: int) -> bytes:
    """The head and meta of a frame whose body (``body_length`` bytes) follows them."""
    return HEAD.pack(MAGIC, VERSION, kind, len(meta), body_length) + meta


# -- HELLO --------------------------------------------------------------------------------------


def encode_hello(token: str | None) -> bytes:
    return frame_head(HELLO, (token or "").encode(), 0)


def parse_hello(frame: Frame) -> str:
    try:
        return bytes(frame.meta).decode()
    except UnicodeDecodeError:
        raise FrameError("the hello frame's token is not UTF-8") from None


# -- INFER --------------------------------------------------------------------------------------


class InferHead(NamedTuple):
    """An inference call's fields besides its body: what the HTTP route reads from the path
    (``model``) and the headers (device, ``Inference-Header-Content-Length``, eviction hints).
    A named tuple: one is built per call at each end, and a tuple is the cheapest to build."""

    model: str
    device: str | None = None
    header_length: int | None = None  # None: the body is all JSON
    evict_first: str = ""  # comma-separated, as the HTTP header; the node checks it alike
    request_key: str = ""  # scale-out (#16): a forwarded request's key; the node runs it once

    def encode(self, body_length: int) -> bytes:
        fields = (
            self.model,
            self.device or "",
            "" if self.header_length is None else str(self.header_length),
            self.evict_first,
            self.request_key,
        )
        return frame_head(INFER, "\n".join(fields).encode(), body_length)

    @classmethod
    def decode(cls, meta: memoryview | bytes) -> InferHead:
        try:
            lines = bytes(meta).decode().split("\n")
            model, device, length, evict, key = lines if len(lines) == 5 else (*lines, "")
        except (UnicodeDecodeError, ValueError):
            raise FrameError(
                "a malformed infer frame: its meta must be 4 UTF-8 lines "
                "(model, device, header length, evict-first), and a 5th: a request key, if any"
            ) from None
        if not model:
            raise FrameError("the infer frame names no model")
        if length and not (length.isascii() and length.isdigit()):
            raise FrameError(f"the infer frame's header length {length!r} is not an integer")
        return cls(
            model=model,
            device=device or None,
            header_length=int(length) if length else None,
            evict_first=evict,
            request_key=key,
        )


# -- ANSWER -------------------------------------------------------------------------------------


def encode_answer(status: int, headers: Iterable[tuple[bytes, bytes]], body_length: int) -> bytes:
    """The head of an answer frame: the status, then one line per header name and value."""
    return frame_head(ANSWER, answer_meta(status, headers), body_length)


def answer_frame(
    status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes | memoryview
) -> bytes:
    """A whole answer frame, head, meta and body in one join (one write, one copy)."""
    meta = answer_meta(status, headers)
    return b"".join((HEAD.pack(MAGIC, VERSION, ANSWER, len(meta), len(body)), meta, body))


def answer_meta(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An answer frame's meta: the status, then one line per header name and value."""
    lines = [b"%d" % status]
    for name, value in headers:
        lines += (name, value)
    return b"\n".join(lines)


def decode_answer_meta(meta: memoryview | bytes) -> tuple[int, Mapping[str, str]]:
    """Status and headers of an answer frame (names as the node wrote them: lower-case)."""
    status, pairs = decode_answer_pairs(meta)
    return status, {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs}


def decode_answer_pairs(meta: memoryview | bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Status and headers of an answer frame, the headers as the node wrote them: raw
    ``(name, value)`` pairs, names lower-case (nothing decoded)."""
    fields = bytes(meta).split(b"\n")
    if not len(fields) % 2 or not fields[0].isdigit():
        raise FrameError("a malformed answer frame")
    rest = iter(fields)
    status = int(next(rest))
    return status, list(zip(rest, rest, strict=False))  # name, value pairs: an even count


# -- reading frames from a stream ---------------------------------------------------------------


class FrameReader:
    """Splits a byte stream into frames, checking every head before buffering its frame.

    A frame that arrives whole inside one read is handed out as views of that read (no copy);
    a frame spread over reads is assembled once into a buffer of exactly its size. At most one
    partial frame is held, of at most ``max_meta + max_body`` bytes: a head that claims more is
    refused at once (:class:`FrameError`), as is one with a wrong magic, version or kind.
    """

    def __init__(self, *, max_body: int, max_meta: int = MAX_META_BYTES) -> None:
        self.max_body = max_body
        self.max_meta = max_meta
        self._head = bytearray()
        self._frame: bytearray | None = None
        self._filled = 0
        self._kind = 0
        self._meta_length = 0

    @property
    def partial(self) -> bool:
        """Whether part of a frame has been read and the rest has not."""
        return bool(self._head) or self._frame is not None

    def _check(self, head: bytes | bytearray | memoryview, at: int = 0) -> tuple[int, int, int]:
        magic, version, kind, meta_length, body_length = HEAD.unpack_from(head, at)
        if magic != MAGIC:
            raise FrameError("not a gpufaas frame (bad magic): this port speaks framed inference")
        if version != VERSION:
            raise FrameError(
                f"frame version {version} is not supported (this end speaks {VERSION})"
            )
        if kind not in KINDS:
            raise FrameError(f"unknown frame kind {kind}")
        if meta_length > self.max_meta:
            raise FrameError(
                f"the frame's meta claims {meta_length} bytes, more than {self.max_meta}",
                status=413,
            )
        if body_length > self.max_body:
            raise FrameError(
                f"the frame's body claims {body_length} bytes, more than the limit of "
                f"{self.max_body}",
                status=413,
            )
        return kind, meta_length, body_length

    def whole(self, data: bytes) -> Frame | None:
        """``data`` as one frame when it is exactly one whole frame and nothing is part read (the
        usual read of a call or an answer on a connection that carries one at a time): the same
        checks as :meth:`feed`, without its bookkeeping. None when it is not such a read, with
        nothing consumed: then :meth:`feed` takes it. Raises :class:`FrameError`."""
        start = HEAD.size
        if self._head or self._frame is not None or len(data) < start:
            return None
        magic, version, kind, meta_length, body_length = HEAD.unpack_from(data)
        if (
            magic != MAGIC
            or version != VERSION
            or kind not in KINDS
            or meta_length > self.max_meta
            or body_length > self.max_body
        ):
            self._check(data)  # raises, naming what is wrong
        if len(data) != start + meta_length + body_length:
            return None
        view = memoryview(data)
        return Frame(kind, view[start : start + meta_length], view[start + meta_length :])

    def feed(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completes, in order. Raises :class:`FrameError`."""
        frames: list[Frame] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        size = HEAD.size
        while pos < end:
            if self._frame is not None:  # filling a frame spread over reads
                take = min(len(self._frame) - self._filled, end - pos)
                self._frame[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(self._frame):
                    whole = memoryview(self._frame)
                    frames.append(
                        Frame(self._kind, whole[: self._meta_length], whole[self._meta_length :])
                    )
                    self._frame = None
                continue
            if not self._head and end - pos >= size:
                kind, meta_length, body_length = self._check(data, pos)
                pos += size
            else:  # a head split across reads
                take = min(size - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < size:
                    break
                kind, meta_length, body_length = self._check(self._head)
                self._head = bytearray()
            total = meta_length + body_length
            if end - pos >= total:  # the whole frame is in this read: views, no copy
                frames.append(
                    Frame(
                        kind, view[pos : pos + meta_length], view[pos + meta_length : pos + total]
                    )
                )
                pos += total
                continue
            self._frame, self._filled = bytearray(total), 0
            self._kind, self._meta_length = kind, meta_length
        return frames
