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
  HTTP for that peer.
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

No pickled data crosses: notices are JSON, values raw float32.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "HostLink",
    "HostLinks",
    "LinkBroken",
    "LinkEndpoint",
    "LinkServer",
    "host_identity",
    "shared_directory",
]

logger = logging.getLogger(__name__)

Array = NDArray[np.float32]
_NOTICE = struct.Struct("<II")  # bytes after this prefix, of which header
_ANSWER = struct.Struct("<QH")  # sequence number, status
_RING_HEAD = 64  # the receiver's released counter (int64) lives here, then the data
_ALIGN = 64
FILED, ALREADY, MISSING = 202, 208, 404
_RING_PREFIX = "gpufaas-fsd-ring-"  # then the sender's pid
_DIR_PREFIX = "gpufaas-fsd-sock-"
_SETTLING_S = 10.0  # a socket folder younger than this is never swept
DEFAULT_RING_BYTES = 8 << 20  # per link; a message over the free part goes inline


class LinkBroken(Exception):
    """The link could not carry a message (closed, timed out, or not answered)."""


@dataclass(frozen=True)
class LinkEndpoint:
    host: str  # host_identity() of the listening node
    socket: str  # its Unix socket's path

    def as_json(self) -> dict[str, str]:
        return {"host": self.host, "socket": self.socket}


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
    envelope fields among them) and returns its status: 202, 208 or 404."""

    def __init__(
        self, deliver: Callable[[dict[str, object], Array], int], *, directory: Path | None = None
    ) -> None:
        self._deliver = deliver
        self._base = directory or shared_directory()
        self._dir: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self.endpoint: LinkEndpoint | None = None

    async def start(self) -> LinkEndpoint:
        if self.endpoint is not None:
            return self.endpoint
        await asyncio.to_thread(sweep, self._base)
        self._dir = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=self._base))  # 0700
        path = self._dir / "link.sock"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Receiver(self._deliver), str(path))
        self.endpoint = LinkEndpoint(host_identity(self._base), str(path))
        return self.endpoint

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
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

    def __init__(self, deliver: Callable[[dict[str, object], Array], int]) -> None:
        self._deliver = deliver
        self._buffer = bytearray()
        self._rings: dict[str, tuple[mmap.mmap, _Spans]] = {}
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for ring, spans in self._rings.values():
            spans.detach()
            with contextlib.suppress(BufferError):  # views still held: unmapped when they go
                ring.close()
        self._rings.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _NOTICE.size:
            size, header_size = _NOTICE.unpack_from(buffer, start)
            end = start + _NOTICE.size + size
            if len(buffer) < end:
                break
            body = start + _NOTICE.size
            seq, status = self._file(bytes(buffer[body : body + header_size]),
                                     memoryview(buffer)[body + header_size : end])  # fmt: skip
            if self._transport is not None:
                self._transport.write(_ANSWER.pack(seq, status))
            start = end
        del buffer[:start]

    def _file(self, head: bytes, inline: memoryview) -> tuple[int, int]:
        """One notice: its sequence number and the status filing it gave."""
        seq = 0
        try:
            header = json.loads(head)
            seq = int(header["seq"])
            return seq, self._deliver(header, self._values(header, inline))
        except (ValueError, KeyError, TypeError, OSError) as e:
            logger.warning("dropped a malformed host-link notice: %s", e)
            return seq, 400
        finally:
            inline.release()

    def _values(self, header: dict[str, object], inline: memoryview) -> Array:
        shape = tuple(int(d) for d in cast(list[int], header["shape"]))
        count = int(np.prod(shape))
        ring_path = header.get("ring")
        if ring_path is None:  # inline: copied out of the buffer (which is reused)
            return np.frombuffer(inline, dtype=np.float32, count=count).copy().reshape(shape)
        ring, spans = self._ring(str(ring_path))
        at, end = int(cast(int, header["at"])), int(cast(int, header["end"]))
        return spans.lend(ring, at, count, end).reshape(shape)  # read where it lies

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
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._answers = bytearray()
        self._transport: asyncio.Transport | None = None
        self.broken: str | None = None
        self.inline = 0  # messages that did not fit the ring's free part
        self._first_in_ring: int | None = None  # answered: the receiver has mapped the ring
        self.unlinked = False

    # -- protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(f"the link closed ({exc or 'EOF'})")

    def data_received(self, data: bytes) -> None:
        self._answers += data
        usable = len(self._answers) - len(self._answers) % _ANSWER.size
        for seq, status in _ANSWER.iter_unpack(bytes(self._answers[:usable])):
            if self._first_in_ring is not None and seq >= self._first_in_ring:
                self._unlink()  # both ends map it now: the file itself can go
            waiter = self._waiting.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
        del self._answers[:usable]

    # -- sending ----------------------------------------------------------------------------

    async def send(self, header: dict[str, object], values: Array, *, timeout_s: float) -> int:
        """Carry one message; its status (202 filed, 208 already, 404 no such shard)."""
        if self.broken is not None or self._transport is None or self._transport.is_closing():
            raise LinkBroken(self.broken or "the link is closed")
        values = np.ascontiguousarray(values, dtype=np.float32)
        self._seq += 1
        seq = self._seq
        notice = {**header, "seq": seq, "shape": list(values.shape)}
        inline = self._place(values, notice)
        head = json.dumps(notice, separators=(",", ":")).encode()
        size = len(head) + (values.nbytes if inline else 0)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[seq] = waiter
        self._transport.write(_NOTICE.pack(size, len(head)) + head)
        if inline:
            self._transport.write(values.data.cast("B"))
        try:
            return await asyncio.wait_for(waiter, timeout=max(0.0, timeout_s))
        except TimeoutError:
            raise LinkBroken(f"no answer within {timeout_s:.1f} s") from None
        finally:
            self._waiting.pop(seq, None)

    def _place(self, values: Array, notice: dict[str, object]) -> bool:
        """Copy ``values`` into the ring's next free span and name it in ``notice``; True
        when it does not fit (the values go inline)."""
        need = -(-values.nbytes // _ALIGN) * _ALIGN
        at = self._written % self.ring_bytes
        skip = self.ring_bytes - at if at + need > self.ring_bytes else 0  # no wrapping span
        if need > self.ring_bytes or self._written + skip + need - int(self._released[0]) > (
            self.ring_bytes
        ):
            self.inline += 1
            return True
        at = (at + skip) % self.ring_bytes
        start = _RING_HEAD + at
        np.frombuffer(self._ring, dtype=np.float32, count=values.size, offset=start)[:] = (
            values.reshape(-1)
        )
        self._written += skip + need
        notice.update(ring=self.ring_path, at=start, end=self._written)
        if self._first_in_ring is None:
            self._first_in_ring = int(cast(int, notice["seq"]))
        return False

    def _unlink(self) -> None:
        if not self.unlinked:
            self.unlinked = True
            with contextlib.suppress(OSError):
                os.unlink(self.ring_path)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkBroken(reason))
        self._waiting.clear()

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


class HostLinks:
    """A node's links to the peer nodes that share its host, by peer URL; ``find`` asks a
    peer for its endpoint (once, remembered) and connects where the hosts match."""

    def __init__(
        self,
        *,
        endpoint_of: Callable[[str], Awaitable[LinkEndpoint | None]],
        ring_bytes: int = DEFAULT_RING_BYTES,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self._endpoint_of = endpoint_of
        self.ring_bytes = ring_bytes
        self.connect_timeout_s = connect_timeout_s
        self.identity = host_identity()
        self._links: dict[str, asyncio.Future[HostLink | None]] = {}

    async def find(self, url: str) -> HostLink | None:
        """The link to ``url``'s node, or None where it is on another host (or has none)."""
        found = self._links.get(url)
        if found is None:
            found = asyncio.ensure_future(self._open(url))
            self._links[url] = found
        link = await asyncio.shield(found)
        if link is not None and link.broken is not None:  # ask again, once
            self.forget(url, link)
            found = asyncio.ensure_future(self._open(url))
            self._links[url] = found
            link = await asyncio.shield(found)
        return link

    def forget(self, url: str, link: HostLink) -> None:
        """Drop a broken link: the next send asks the peer again."""
        found = self._links.get(url)
        if found is not None and found.done() and found.result() is link:
            del self._links[url]
        link.close()

    async def _open(self, url: str) -> HostLink | None:
        try:
            endpoint = await asyncio.wait_for(self._endpoint_of(url), self.connect_timeout_s)
        except Exception as e:  # an old node, or none there: HTTP it is
            logger.debug("no host link to %s: %s", url, e)
            return None
        if endpoint is None or endpoint.host != self.identity:
            return None
        try:
            link = HostLink(ring_bytes=self.ring_bytes)
        except OSError as e:  # no room in /dev/shm: HTTP it is
            logger.warning("no shared-memory ring for %s: %s", url, e)
            return None
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().create_unix_connection(lambda: link, endpoint.socket),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as e:
            logger.debug("host link to %s (%s) failed: %s", url, endpoint.socket, e)
            link.close()
            return None
        return link

    async def close(self) -> None:
        for found in self._links.values():
            if found.done() and not found.cancelled() and found.result() is not None:
                cast(HostLink, found.result()).close()
            else:
                found.cancel()
        self._links.clear()
