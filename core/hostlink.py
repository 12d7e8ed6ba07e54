"""Shared-memory links between the shard nodes of one host: the direct channel's same-host path.

Over loopback HTTP a 512 KiB partial result costs 0.5-1.1 ms of CPU across its two ends
(request line and headers, the body read in pieces and joined, the answer; bench/RESULTS.md,
"Distributed inference"), most of it per byte. Two nodes that share a host (one kernel, one
``/dev/shm``) need none of that: the values can be written once into memory both map.

* Every node process runs a :class:`LinkServer`: a Unix socket in a private directory (mode
  0700, so only the node's own user can connect) under ``/dev/shm``. Its
  :class:`LinkEndpoint` (host identity and socket path) is advertised in the node's shard
  state (``GET /v2/gpufaas/shards``).
* A sender (:class:`HostLinks`, one per node, shared by its shards) asks a peer node for its
  endpoint once; where the identities match (same boot, same ``/dev/shm`` mount: a separate
  pod's ``/dev/shm`` differs) it connects to the socket, else the direct channel stays on
  HTTP for that peer. Such a no is remembered; a setup that failed for a reason that may pass
  (no endpoint in time, the peer's state answered 5xx, 408 or 429 or not at all, the socket
  refused or gone, the hello unanswered, ``/dev/shm`` full; :func:`endpoint_in_state` tells
  an answer from such a failure) is tried again in the background after a backoff (1 s, doubling up to 60 s), and the
  peer's messages go over HTTP meanwhile, never waiting for it.
* A :class:`HostLink` owns a **ring**: a file of ``ring_bytes`` in ``/dev/shm`` (mode 0600)
  that both map. The sender unlinks the file as soon as the receiver has answered a message
  that went through it (the receiver maps the ring before answering), so a ring outlives
  neither process; what a killed process left before that (a ring, a socket's directory) is
  swept by the next :class:`LinkServer` to start (:func:`sweep`). A message's values are copied into the next free span of the ring, and a
  small notice (the envelope as JSON with the request id, the shape, the span) goes over the
  socket. The receiver files a **view of the span** (no copy) in the shard's mailbox and
  answers the notice's sequence number with a status: 202 filed, 208 stale or a duplicate,
  404 no such shard here, as the HTTP route does. The shard's worker thread reads its part
  straight from the ring when it adds the part's product (session 8: before, the event loop
  copied every part out first). A span is marked free (a counter in the ring's first bytes
  that only the receiver writes; the sender only writes the data and its own position) when
  the last reference to its view is gone (:class:`_Spans`: used, dropped as stale, or its
  request ended), in ring order, so the sender never writes over values a shard still reads.
  A message that does not fit the free part of the ring travels inline, after its notice.
* Every send waits for its answer within its deadline (:class:`LinkBroken` on timeout or a
  closed socket), and a broken link is dropped, so the next send asks again (the peer may
  have restarted elsewhere).
* **Calls** (session 10): the coordinator's request to a shard goes over the same kind of link
  (:meth:`HostLink.call`) where the gateway shares the node's host, instead of an HTTP POST
  with the input rows in its body and the output rows in its answer. The input rows are
  written into the caller's ring like a message's values, and the caller also reserves the
  span the output rows will need: the node's ``serve`` runs the request and writes the output
  rows straight into that span, and its answer carries only the status (the values inline
  where the span did not fit; a JSON error naming the shard and channel on failure). The
  caller copies the output out when the answer arrives and only then frees the span (a
  caller-side hold: the receiver's released counter never frees a span the caller has not
  read), so a call cancelled or timed out on the caller's side never lets a late answer land
  in a span already reused.
* The receiver answers every notice it read in one pass in one write (the answers of a
  layer group's messages cost one syscall, not one each).
* **A version in the hello** (session 11): a link's first notice is a hello naming the
  sender's :data:`LINK_VERSION`. The receiver answers 200 with its own, or 426 with a JSON
  error naming both and closes (also for a first notice that is no hello: a sender of an
  older release). :class:`HostLinks` drops a link whose hello is not answered 200 with its
  version, at once, and the peer stays on HTTP, so two releases on one host never meet on a
  wire format one of them does not speak.

* **Counted** (nineteenth session): :class:`LinkCounts`, one per node, shared by its links
  and its direct channels, counts link setups by outcome (``ok``; ``failed``, a reason that
  may pass, so tried again; ``none``, a definitive no: another host, no endpoint, another
  release) and the direct channel's messages by the path they took (``shm``: values in the
  ring; ``inline``: the ring had no room, values after the notice on the socket; ``http``: no
  link to that peer; ``local``: a shard on the same node). The node exports them on
  ``/metrics`` (``gpu_manager/shards.py``), so a benchmark can record which path its
  messages took (before, a failed setup or a full ring fell back to HTTP or inline without
  a trace).

No pickled data crosses: notices are JSON, values raw float32.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "EndpointUnavailable",
    "HostLink",
    "HostLinks",
    "LinkBroken",
    "LinkCounts",
    "LinkEndpoint",
    "LinkRefused",
    "LinkServer",
    "Outcome",
    "Serve",
    "Staged",
    "endpoint_in_state",
    "host_identity",
    "retry_delay_s",
    "shared_directory",
]

logger = logging.getLogger(__name__)

Array = NDArray[np.float32]
_NOTICE = struct.Struct("<II")  # bytes after this prefix, of which header
_ANSWER = struct.Struct("<QHI")  # sequence number, status, bytes of body after it
_RING_HEAD = 64  # the receiver's released counter (int64) lives here, then the data
_ALIGN = 64
FILED, ALREADY, MISSING = 202, 208, 404
ANSWERED = 200  # a call's output is in its span (or inline, in the answer's body)
CALL = "call"  # a notice's ``kind`` for a call (else a message)
HELLO = "hello"  # the first notice on a link: the sender's LINK_VERSION
# The link's wire format. 1: answers ``<QH`` (sessions 6-9); 2: answers ``<QHI`` with a body,
# calls (session 10), no hello; 3: a hello first (session 11). Both ends must speak the same:
# a receiver answers a hello of another version, or a first notice that is no hello, 426
# with a JSON error naming both versions and closes; a sender drops a link whose hello is not
# answered 200 with its own version (the peer is on HTTP instead).
LINK_VERSION = 3
VERSION_MISMATCH = 426
_RING_PREFIX = "gpufaas-fsd-ring-"  # then the sender's pid
_DIR_PREFIX = "gpufaas-fsd-sock-"
_SETTLING_S = 10.0  # a socket folder younger than this is never swept
DEFAULT_RING_BYTES = 8 << 20  # per link; a message over the free part goes inline

# A call's outcome as ``serve`` returns it: the status and the output rows (200), or the
# status and a JSON error body.
Outcome = tuple[int, "NDArray[np.float32] | bytes"]
Serve = Callable[[dict[str, object], "NDArray[np.float32]"], Awaitable[Outcome]]


class LinkBroken(Exception):
    """The link could not carry a message (closed, timed out, or not answered)."""


class LinkRefused(LinkBroken):
    """The peer answered the link's hello, but not in this release's format (another release
    of gpufaas on this host): a definitive answer, unlike a hello that is not answered."""


@dataclass(frozen=True)
class Staged:
    """A message or call whose values are in the ring and whose notice is queued: its
    sequence number and the future its answer resolves (on the link's event loop)."""

    seq: int
    answer: asyncio.Future[tuple[int, bytes | NDArray[np.float32]]]
    inline: bool = False  # its values did not fit the ring's free part: after the notice


# What LinkCounts counts: a link setup's outcomes, and the paths a direct message can take.
SETUP_RESULTS = ("ok", "failed", "none")
MESSAGE_PATHS = ("shm", "inline", "http", "local")


@dataclass
class LinkCounts:
    """A node's link setups by outcome (:data:`SETUP_RESULTS`) and its direct channel's
    messages by path (:data:`MESSAGE_PATHS`): plain numbers, counted on the node's event loop
    and exported at scrape time (see the module docstring)."""

    setups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETUP_RESULTS, 0))
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESSAGE_PATHS, 0))


@dataclass(frozen=True)
class LinkEndpoint:
    host: str  # host_identity() of the listening node
    socket: str  # its Unix socket's path

    def as_json(self) -> dict[str, str]:
        return {"host": self.host, "socket": self.socket}


class EndpointUnavailable(Exception):
    """A peer's shard state could not be read this time (it answered 5xx, 408 or 429): no
    answer about its endpoint, so a failure that may pass (:class:`HostLinks` asks again after
    its backoff), never "no endpoint"."""


def endpoint_in_state(status: int, body: bytes) -> LinkEndpoint | None:
    """The link endpoint in a node's answer to ``GET /v2/gpufaas/shards`` (``status``,
    ``body``), the node's and the coordinator's lookup alike.

    None is a definitive no: a state whose ``link`` is null or absent (shared memory off, or
    an older node), another 3xx or 4xx answer (no such route: an older node), or a 200 whose
    body is not a node's state. A 5xx, 408 or 429 raises :class:`EndpointUnavailable`: the
    node may give its endpoint later (before the eighteenth session any non-200 was taken
    as "no endpoint", which kept the peer on HTTP until a restart)."""
    if status >= 500 or status in (408, 429):
        raise EndpointUnavailable(f"its shard state answered HTTP {status}")
    if status != 200:
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    link = state.get("link") if isinstance(state, dict) else None
    if not isinstance(link, dict):
        return None
    host, socket = link.get("host"), link.get("socket")
    if not isinstance(host, str) or not isinstance(socket, str):
        return None
    return LinkEndpoint(host, socket)


def shared_directory() -> Path:
    """Where rings and sockets live: ``/dev/shm`` (memory) where there is one."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def host_identity(directory: Path | None = None) -> str:
    """This kernel's boot and the shared directory's mount: equal only where two processes
    can open each other's files there."""
    where = directory or shared_directory()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = os.uname().nodename
    st = os.stat(where)
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def sweep(directory: Path) -> int:
    """Remove what killed processes left in ``directory``: rings whose sender (named in the
    file name) is gone, and socket directories nobody listens on. Only this module's names
    and this user's files; returns how many were removed."""
    import socket

    removed = 0
    for ring in directory.glob(_RING_PREFIX + "*"):
        try:
            pid = int(ring.name[len(_RING_PREFIX) :].split("-", 1)[0])
            if ring.stat().st_uid != os.getuid() or _alive(pid):
                continue
            ring.unlink()
            removed += 1
        except (ValueError, OSError):
            continue
    for folder in directory.glob(_DIR_PREFIX + "*"):
        path = folder / "link.sock"
        try:
            status = folder.stat()
            # a folder made in the last seconds may be a starting server's, not yet bound
            # (removing it fails that server's start: seen with four nodes starting at once)
            if status.st_uid != os.getuid() or time.time() - status.st_mtime < _SETTLING_S:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.2)
                probe.connect(str(path))
            continue  # someone listens: in use
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()
                removed += 1
        except OSError:
            continue
    return removed


def _answer(seq: int, status: int, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return _ANSWER.pack(seq, status, len(data)) + data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -------------------------------------------------------------------------------------------
# Receiving
# -------------------------------------------------------------------------------------------


class LinkServer:
    """A node's receiving end: a Unix socket that accepts links from this host's nodes.

    ``deliver(notice, values)`` files one message (``notice`` is the sender's header, its
    envelope fields among them) and returns its status: 202, 208 or 404. ``serve(notice,
    values)`` runs one call (a notice of kind ``call``: the coordinator's request to a shard)
    and returns its outcome; without it, calls are answered 501.

    :meth:`start` listens once, however many callers start it at the same time (a node's
    shards start it as they load, several at once where a set has more than one shard on the
    node): each gets the one endpoint. Before the eighteenth session each start made a server
    of its own and dropped the one before it unclosed; under uvloop (the manager's loop) the
    collector closes a dropped server's socket twice, and the second close shut whatever file
    another thread had opened under that number in between (the host-link test's ``[4-2]``
    case lost a link that way, its CA bundle read failing in the peer lookup)."""

    def __init__(
        self,
        deliver: Callable[[dict[str, object], Array], int],
        *,
        serve: Serve | None = None,
        directory: Path | None = None,
    ) -> None:
        self._deliver = deliver
        self._serve = serve
        self._base = directory or shared_directory()
        self._dir: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._starting = asyncio.Lock()  # one start at a time: one server, one endpoint
        self._receivers: set[_Receiver] = set()  # open links, closed with the server
        self.endpoint: LinkEndpoint | None = None

    async def start(self) -> LinkEndpoint:
        async with self._starting:
            if self.endpoint is not None:
                return self.endpoint
            await asyncio.to_thread(sweep, self._base)
            self._dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=self._base))  # 0700
            path = self._dir / "link.sock"
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: _Receiver(self._deliver, self._serve, self._receivers), str(path)
            )
            self.endpoint = LinkEndpoint(host_identity(self._base), str(path))
            return self.endpoint

    async def close(self) -> None:
        async with self._starting:  # after a start under way: its server is closed too
            if self._server is not None:
                self._server.close()  # the listening socket only: the links' own go here
                self._server = None
            for receiver in list(self._receivers):
                receiver.close()
            if self._dir is not None:
                with contextlib.suppress(OSError):
                    (self._dir / "link.sock").unlink()
                    self._dir.rmdir()
                self._dir = None
            self.endpoint = None


class _Spans:
    """The spans of one ring lent out as views, freed in ring order.

    The sender may write over everything before the ring's released counter, so the counter
    moves past a span only once that span's view and every earlier one are gone. A view is
    gone when its last reference is (the worker used it, the mailbox dropped it, its request
    ended): a ``weakref.finalize`` on it, which runs in whichever thread lets go of it, hence
    the lock."""

    def __init__(self, ring: mmap.mmap) -> None:
        self._released: NDArray[np.int64] | None = np.frombuffer(ring, dtype=np.int64, count=1)
        self._lent: collections.deque[list[int]] = collections.deque()  # [end, done] in order
        self._lock = threading.Lock()

    def lend(self, ring: mmap.mmap, at: int, count: int, end: int) -> Array:
        """A view of ``count`` float32 at ``at``; its span is freed when the view is gone."""
        view = np.frombuffer(ring, dtype=np.float32, count=count, offset=at)
        entry = [end, 0]
        with self._lock:
            self._lent.append(entry)
        weakref.finalize(view, self._give_back, entry)
        return view

    @property
    def lent(self) -> int:
        return len(self._lent)

    def _give_back(self, entry: list[int]) -> None:
        with self._lock:
            entry[1] = 1
            while self._lent and self._lent[0][1]:
                end = self._lent.popleft()[0]
                if self._released is not None:
                    self._released[0] = end

    def detach(self) -> None:
        """The link closed: views still held keep the mapping, nobody needs the counter."""
        with self._lock:
            self._released = None


class _Receiver(asyncio.Protocol):
    """One link's receiving end: notices in, views of the sender's ring out, answers back."""

    def __init__(
        self,
        deliver: Callable[[dict[str, object], Array], int],
        serve: Serve | None,
        receivers: set[_Receiver],
    ) -> None:
        self._deliver = deliver
        self._serve = serve
        self._receivers = receivers  # the server's open links, this one while it is open
        self._buffer = bytearray()
        self._rings: dict[str, tuple[mmap.mmap, _Spans]] = {}
        self._transport: asyncio.Transport | None = None
        self._calls: set[asyncio.Task[None]] = set()  # running calls (kept referenced)
        self._greeted = False  # the sender's hello named this LINK_VERSION

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._receivers.add(self)

    def close(self) -> None:
        """The server is closing: close this link's socket (its rings go as it is lost)."""
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None  # calls still running answer nobody
        self._receivers.discard(self)
        for ring, spans in self._rings.values():
            spans.detach()
            with contextlib.suppress(BufferError):  # views still held: unmapped when they go
                ring.close()
        self._rings.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        answers: list[bytes] = []
        while len(buffer) - start >= _NOTICE.size:
            size, header_size = _NOTICE.unpack_from(buffer, start)
            end = start + _NOTICE.size + size
            if len(buffer) < end:
                break
            body = start + _NOTICE.size
            if not self._greeted:
                if not self._greet(bytes(buffer[body : body + header_size]), answers):
                    self._refuse(answers)
                    return
            else:
                answer = self._file(bytes(buffer[body : body + header_size]),
                                    memoryview(buffer)[body + header_size : end])  # fmt: skip
                if answer is not None:
                    answers.append(_ANSWER.pack(*answer, 0))
            start = end
        del buffer[:start]
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))  # every notice of this read: one write

    def _greet(self, head: bytes, answers: list[bytes]) -> bool:
        """The link's first notice: a hello naming this :data:`LINK_VERSION` is answered 200
        (with the version); anything else 426 with an error naming both versions."""
        try:
            header = json.loads(head)
            seq = int(header.get("seq", 0))
        except (ValueError, TypeError, AttributeError):
            header, seq = {}, 0
        theirs = header.get("version") if header.get("kind") == HELLO else None
        if theirs == LINK_VERSION:
            self._greeted = True
            answers.append(_answer(seq, ANSWERED, {"version": LINK_VERSION}))
            return True
        spoken = f"version {theirs}" if theirs is not None else "no hello (a release before 3)"
        error = (
            f"host-link version mismatch: this node speaks version {LINK_VERSION}, the sender "
            f"{spoken}; run one gpufaas release on a host (or turn shared memory off)"
        )
        logger.warning("refused a host link: %s", error)
        answers.append(_answer(seq, VERSION_MISMATCH, {"error": error, "version": LINK_VERSION}))
        return False

    def _refuse(self, answers: list[bytes]) -> None:
        """Answer what was read and close: the sender speaks another version."""
        self._buffer.clear()
        if self._transport is not None:
            self._transport.write(b"".join(answers))
            self._transport.close()

    def _file(self, head: bytes, inline: memoryview) -> tuple[int, int] | None:
        """One notice: its sequence number and the status filing it gave (None for a call,
        answered when it ends)."""
        seq = 0
        try:
            header = json.loads(head)
            seq = int(header["seq"])
            values = self._values(header, inline)
            if header.get("kind") == CALL:
                self._start_call(seq, header, values)
                return None
            return seq, self._deliver(header, values)
        except (ValueError, KeyError, TypeError, OSError) as e:
            logger.warning("dropped a malformed host-link notice: %s", e)
            return seq, 400
        finally:
            inline.release()

    def _start_call(self, seq: int, header: dict[str, object], values: Array) -> None:
        task = asyncio.get_running_loop().create_task(self._call(seq, header, values))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, seq: int, header: dict[str, object], values: Array) -> None:
        """Run one call and answer it: the output into the span the caller reserved, else
        inline; an error as its JSON body."""
        result: bytes | Array
        if self._serve is None:
            status, result = 501, b'{"error":"this node serves no calls over its link"}'
        else:
            running = self._serve(header, values)
            del values  # the call holds its input as long as it needs it, no longer
            try:
                status, result = await running
            except Exception as e:  # answered, never left hanging: the caller waits on it
                logger.exception("a host-link call failed")
                status, result = 500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        if self._transport is None or self._transport.is_closing():
            return  # the caller is gone
        try:
            body = result if isinstance(result, bytes) else self._output(header, result)
        except ValueError as e:
            status, body = 400, json.dumps({"error": str(e)}).encode()
        self._transport.write(_ANSWER.pack(seq, status, len(body)) + body)

    def _output(self, header: dict[str, object], output: Array) -> bytes:
        """Write ``output`` into the span the caller reserved for it; its bytes to send
        inline where it has none or the output does not fit it."""
        output = np.ascontiguousarray(output, dtype=np.float32)
        span = header.get("out_at")
        ring = self._rings.get(str(header.get("ring", "")))
        if span is None or ring is None or output.nbytes > int(cast(int, header["out_bytes"])):
            return output.tobytes()  # inline (a rare path: a ring without room)
        at = int(cast(int, span))
        if at < _RING_HEAD or at + output.nbytes > len(ring[0]):
            raise ValueError(f"a call's output span {at} lies outside its ring")
        with contextlib.suppress(ValueError):  # the link closed meanwhile: nobody reads it
            np.frombuffer(ring[0], np.float32, count=output.size, offset=at)[:] = output.ravel()
        return b""

    def _values(self, header: dict[str, object], inline: memoryview) -> Array:
        shape = tuple(int(d) for d in cast(list[int], header["shape"]))
        count = math.prod(shape)  # not np.prod: ~5 us a notice
        ring_path = header.get("ring")
        if ring_path is not None and header.get("at") is not None:
            ring, spans = self._ring(str(ring_path))
            at, end = int(cast(int, header["at"])), int(cast(int, header["end"]))
            return spans.lend(ring, at, count, end).reshape(shape)  # read where it lies
        if ring_path is not None:
            self._ring(str(ring_path))  # a call's output span may be there all the same
        # inline: copied out of the buffer (which is reused)
        return np.frombuffer(inline, dtype=np.float32, count=count).copy().reshape(shape)

    def _ring(self, path: str) -> tuple[mmap.mmap, _Spans]:
        found = self._rings.get(path)
        if found is None:
            fd = os.open(path, os.O_RDWR)
            try:
                ring = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            found = self._rings[path] = (ring, _Spans(ring))
        return found


# -------------------------------------------------------------------------------------------
# Sending
# -------------------------------------------------------------------------------------------


class HostLink(asyncio.Protocol):
    """This node's link to one peer node on the same host: its ring and its socket."""

    def __init__(self, *, ring_bytes: int = DEFAULT_RING_BYTES, directory: Path | None = None):
        self.ring_bytes = ring_bytes
        fd, self.ring_path = tempfile.mkstemp(
            prefix=f"{_RING_PREFIX}{os.getpid()}-", dir=directory or shared_directory()
        )
        try:
            # Reserved now, not on first touch: a full /dev/shm fails here (OSError, and the
            # channel stays on HTTP), never as a SIGBUS on a write into the mapping.
            os.posix_fallocate(fd, 0, _RING_HEAD + ring_bytes)
            self._ring = mmap.mmap(fd, _RING_HEAD + ring_bytes)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.ring_path)
            raise
        else:
            os.close(fd)
        self._released = np.frombuffer(self._ring, dtype=np.int64, count=1)
        self._written = 0  # bytes of the ring ever taken (sender's position)
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[tuple[int, bytes | Array]]] = {}
        self._outbox: list[bytes] = []  # notices staged, not written yet, in ring order
        self._loop: asyncio.AbstractEventLoop | None = None
        # Calls' output spans not read yet, in ring order, by seq: [the sender's position
        # before the span, its offset, its float32 count, read yet].
        self._holds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._answers = bytearray()
        self._transport: asyncio.Transport | None = None
        self.broken: str | None = None
        self.inline = 0  # messages that did not fit the ring's free part
        self._first_in_ring: int | None = None  # answered: the receiver has mapped the ring
        self.unlinked = False

    # -- protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(f"the link closed ({exc or 'EOF'})")

    def data_received(self, data: bytes) -> None:
        answers = self._answers
        answers += data
        start = 0
        while len(answers) - start >= _ANSWER.size:
            seq, status, size = _ANSWER.unpack_from(answers, start)
            end = start + _ANSWER.size + size
            if len(answers) < end:
                break
            if self._first_in_ring is not None and seq >= self._first_in_ring:
                self._unlink()  # both ends map it now: the file itself can go
            result: bytes | Array = bytes(answers[start + _ANSWER.size : end])
            hold = self._holds.get(seq)
            if hold is not None:  # a call's answer: read its span now, then let it go
                if status == ANSWERED and not size:
                    result = np.frombuffer(
                        self._ring, dtype=np.float32, count=hold[2], offset=hold[1]
                    ).copy()
                self._let_go(seq)
            waiter = self._waiting.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((status, result))
            start = end
        del answers[:start]

    # -- sending ----------------------------------------------------------------------------

    async def send(self, header: dict[str, object], values: Array, *, timeout_s: float) -> int:
        """Carry one message; its status (202 filed, 208 already, 404 no such shard)."""
        status, _ = await self.answer(self.stage(header, values), timeout_s=timeout_s)
        return status

    async def call(
        self, header: dict[str, object], values: Array, *, out_count: int, timeout_s: float
    ) -> tuple[int, bytes | Array]:
        """One call (the peer's ``serve``): ``values`` go like a message's, and a span of
        ``out_count`` float32 is reserved for the answer. Returns the status and, for 200,
        the output values (flat: the caller knows their shape), else the error body."""
        staged = self.stage({**header, "kind": CALL}, values, out_count=out_count)
        status, result = await self.answer(staged, timeout_s=timeout_s)
        if status == ANSWERED and isinstance(result, bytes):  # inline: the ring had no room
            return status, np.frombuffer(result, dtype=np.float32)
        return status, result

    def stage(
        self, header: dict[str, object], values: Array, *, out_count: int | None = None
    ) -> Staged:
        """Copy ``values`` into the ring and queue their notice (on the event loop, so notices
        leave in ring order: the receiver frees spans in the order it is told of them). The
        notice leaves at the next :meth:`flush`; its answer resolves ``Staged.answer``."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        loop = self._loop
        if self.broken is not None or loop is None:
            raise LinkBroken(self.broken or "the link is not connected")
        self._seq += 1
        seq = self._seq
        notice = {**header, "seq": seq, "shape": list(values.shape)}
        inline = self._place(values, notice)
        spilled = inline and values.size > 0  # no room in the ring (not an empty hello)
        if out_count:
            self._reserve(seq, out_count, notice)
        head = json.dumps(notice, separators=(",", ":")).encode()
        size = len(head) + (values.nbytes if inline else 0)
        waiter: asyncio.Future[tuple[int, bytes | Array]] = loop.create_future()
        self._waiting[seq] = waiter
        self._outbox.append(_NOTICE.pack(size, len(head)) + head)
        if inline:
            self._outbox.append(values.tobytes())
        return Staged(seq, waiter, inline=spilled)

    async def greet(self, *, timeout_s: float) -> None:
        """Send the link's hello and check the answer names this :data:`LINK_VERSION`;
        :class:`LinkRefused` naming both versions where it does not (another release of
        gpufaas on this host), :class:`LinkBroken` where no answer comes within ``timeout_s``
        or the link closes."""
        hello = self.stage({"kind": HELLO, "version": LINK_VERSION}, np.empty(0, np.float32))
        status, body = await self.answer(hello, timeout_s=timeout_s)
        try:
            answer = json.loads(body) if isinstance(body, bytes) and body else {}
        except ValueError:
            answer = {}
        if status == ANSWERED and answer.get("version") == LINK_VERSION:
            return
        if status == VERSION_MISMATCH and "error" in answer:
            raise LinkRefused(str(answer["error"]))
        raise LinkRefused(
            f"host-link version mismatch: this process speaks version {LINK_VERSION}, the node "
            f"answered its hello {status} (a release before 3); run one gpufaas release on a "
            "host (or turn shared memory off)"
        )

    def flush(self) -> None:
        """Write every notice staged so far, in order, in one call (event loop)."""
        out, self._outbox = self._outbox, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    async def answer(self, staged: Staged, *, timeout_s: float) -> tuple[int, bytes | Array]:
        """Flush, then wait for ``staged``'s answer within ``timeout_s`` (:class:`LinkBroken`
        when none comes, or the link closes)."""
        self.flush()
        try:
            return await asyncio.wait_for(staged.answer, timeout=max(0.0, timeout_s))
        except TimeoutError:
            raise LinkBroken(f"no answer within {timeout_s:.1f} s") from None
        finally:
            self._waiting.pop(staged.seq, None)

    def _place(self, values: Array, notice: dict[str, object]) -> bool:
        """Copy ``values`` into the ring's next free span and name it in ``notice``; True
        when it does not fit (the values go inline)."""
        if not values.size:  # nothing to place (a hello): no span, and the ring stays unnamed
            return True
        start = self._take(values.nbytes)
        if start is None:
            self.inline += 1
            return True
        np.frombuffer(self._ring, dtype=np.float32, count=values.size, offset=start)[:] = (
            values.reshape(-1)
        )
        notice.update(ring=self.ring_path, at=start, end=self._written)
        if self._first_in_ring is None:
            self._first_in_ring = int(cast(int, notice["seq"]))
        return False

    def _reserve(self, seq: int, count: int, notice: dict[str, object]) -> None:
        """Reserve a span for a call's ``count`` output values, held until its answer is read
        (none where the ring has no room: the output then comes inline)."""
        before = self._written
        start = self._take(count * 4)
        if start is None:
            return
        self._holds[seq] = [before, start, count, 0]
        notice.update(ring=self.ring_path, out_at=start, out_bytes=count * 4)
        if self._first_in_ring is None:
            self._first_in_ring = seq

    def _take(self, nbytes: int) -> int | None:
        """The offset of the ring's next free span of ``nbytes`` (moving the sender's
        position past it), or None when it has no room. Free is what the receiver released
        and, before the oldest output span not read yet, nothing after it."""
        need = -(-nbytes // _ALIGN) * _ALIGN
        at = self._written % self.ring_bytes
        skip = self.ring_bytes - at if at + need > self.ring_bytes else 0  # no wrapping span
        free_from = int(self._released[0])
        if self._holds:  # the receiver may have released past an output span not read yet
            free_from = min(free_from, next(iter(self._holds.values()))[0])
        if need > self.ring_bytes or self._written + skip + need - free_from > self.ring_bytes:
            return None
        self._written += skip + need
        return _RING_HEAD + (at + skip) % self.ring_bytes

    def _let_go(self, seq: int) -> None:
        """A call's output span is read: free it, and every read one before it, in order."""
        self._holds[seq][3] = 1
        while self._holds and next(iter(self._holds.values()))[3]:
            self._holds.popitem(last=False)

    def _unlink(self) -> None:
        if not self.unlinked:
            self.unlinked = True
            with contextlib.suppress(OSError):
                os.unlink(self.ring_path)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        waiting = list(self._waiting.values())
        self._waiting.clear()
        self._outbox.clear()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(LinkBroken(reason))

    def close(self) -> None:
        """Idempotent: several sends may find the same link broken."""
        self._break("closed")
        if self._transport is not None:
            self._transport.close()
        self._unlink()
        if not self._ring.closed:
            del self._released
            with contextlib.suppress(BufferError):
                self._ring.close()


class _Transient(Exception):
    """A link's setup failed for a reason that may pass (no answer in time, the socket
    refused or gone, no room in ``/dev/shm``): asked again after a backoff."""


def retry_delay_s(failures: int, *, first_s: float, most_s: float) -> float:
    """How long a peer whose link setup failed ``failures`` times in a row (for a reason that
    may pass) waits before it is asked again: ``first_s``, doubled at each failure, at most
    ``most_s``."""
    if failures < 1:
        return 0.0
    return min(most_s, first_s * 2.0 ** min(failures - 1, 62))


class HostLinks:
    """A node's links to the peer nodes that share its host, by peer URL; ``find`` asks a
    peer for its endpoint and connects where the hosts match.

    A definitive answer is remembered until the link breaks: a link, or none (another host, a
    node with no endpoint, a link server of another release). A setup that failed for a
    reason that may pass (the endpoint not given in time, the socket refused, the hello not
    answered, ``/dev/shm`` full) is tried again after :func:`retry_delay_s` (``retry_first_s``
    doubling up to ``retry_most_s``, on ``clock``), in the background: until it succeeds,
    ``find`` answers None at once (the peer's messages go over HTTP), never waiting for it."""

    def __init__(
        self,
        *,
        endpoint_of: Callable[[str], Awaitable[LinkEndpoint | None]],
        ring_bytes: int = DEFAULT_RING_BYTES,
        connect_timeout_s: float = 2.0,
        retry_first_s: float = 1.0,
        retry_most_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        counts: LinkCounts | None = None,
    ) -> None:
        self._endpoint_of = endpoint_of
        self.counts = counts if counts is not None else LinkCounts()  # setups by outcome
        self.ring_bytes = ring_bytes
        self.connect_timeout_s = connect_timeout_s
        self.retry_first_s = retry_first_s
        self.retry_most_s = retry_most_s
        self._clock = clock
        self.identity = host_identity()
        self._links: dict[str, asyncio.Future[HostLink | None]] = {}
        # peers whose last setup failed for a reason that may pass: (failures in a row, the
        # clock's time from which it is tried again)
        self._failed: dict[str, tuple[int, float]] = {}

    async def find(self, url: str) -> HostLink | None:
        """The link to ``url``'s node, or None where it is on another host (or has none), or
        its setup failed lately (a retry is due later, or runs now in the background)."""
        found = self._links.get(url)
        if found is None:
            failed = self._failed.get(url)
            if failed is not None and self._clock() < failed[1]:
                return None  # backing off: HTTP meanwhile
            found = self._links[url] = asyncio.ensure_future(self._setup(url))
            if failed is not None:
                return None  # the retry runs in the background: HTTP meanwhile
        elif not found.done() and url in self._failed:
            return None  # a retry under way
        link = await asyncio.shield(found)
        if link is not None and link.broken is not None:  # ask again, once
            self.forget(url, link)
            found = self._links[url] = asyncio.ensure_future(self._setup(url))
            link = await asyncio.shield(found)
        return link

    def forget(self, url: str, link: HostLink) -> None:
        """Drop a broken link: the next send asks the peer again."""
        found = self._links.get(url)
        if found is not None and found.done() and found.result() is link:
            del self._links[url]
        link.close()

    async def _setup(self, url: str) -> HostLink | None:
        """:meth:`_open`, remembering a failure that may pass (and forgetting it once the peer
        answers) so that the next try waits for its backoff."""
        try:
            link = await self._open(url)
        except _Transient as e:
            self.counts.setups["failed"] += 1
            failures = self._failed.get(url, (0, 0.0))[0] + 1
            delay = retry_delay_s(failures, first_s=self.retry_first_s, most_s=self.retry_most_s)
            self._failed[url] = (failures, self._clock() + delay)
            if self._links.get(url) is asyncio.current_task():
                del self._links[url]  # asked again after the backoff
            logger.info(
                "no host link to %s (failure %d in a row), HTTP for %.0f s: %s",
                url,
                failures,
                delay,
                e,
            )
            return None
        self.counts.setups["ok" if link is not None else "none"] += 1
        self._failed.pop(url, None)
        return link

    async def _open(self, url: str) -> HostLink | None:
        """The link to ``url``'s node, or None for a definitive no; :class:`_Transient` for a
        failure that may pass."""
        try:
            endpoint = await asyncio.wait_for(self._endpoint_of(url), self.connect_timeout_s)
        except Exception as e:  # not asked in time, refused, or no answer we can read
            raise _Transient(f"its endpoint: {type(e).__name__}: {e}") from None
        if endpoint is None or endpoint.host != self.identity:
            return None  # a node with no endpoint (an older release), or another host
        try:
            link = HostLink(ring_bytes=self.ring_bytes)
        except OSError as e:  # no room in /dev/shm: HTTP for now
            logger.warning("no shared-memory ring for %s: %s", url, e)
            raise _Transient(f"no ring: {e}") from None
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_unix_connection(lambda: link, endpoint.socket),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as e:
            link.close()
            raise _Transient(f"{endpoint.socket}: {type(e).__name__}: {e}") from None
        try:
            await link.greet(timeout_s=self.connect_timeout_s)
        except LinkRefused as e:  # another release on this host: HTTP it is, said once
            logger.warning("no host link to %s, HTTP instead: %s", url, e)
            link.close()
            return None
        except LinkBroken as e:  # the hello not answered in time, or the link closed
            link.close()
            raise _Transient(f"its hello: {e}") from None
        return link

    async def close(self) -> None:
        for found in self._links.values():
            if found.done() and not found.cancelled() and found.result() is not None:
                cast(HostLink, found.result()).close()
            else:
                found.cancel()
        self._links.clear()
        self._failed.clear()
