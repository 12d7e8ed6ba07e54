"""Channels that carry partial results between the shards of a distributed inference.

Every message is one :class:`Envelope` (shard set, request id, layer, sender, receiver,
chunk) followed by a float32 array, in one self-describing binary frame
(:func:`encode` / :func:`decode`), so all channels carry the same bytes:

* :class:`LocalChannel`: shards in one process, handed over in memory (frames' values: what
  the tests and the executor's own runs use). Shards of a set on one *node* exchange device
  to device instead, without any channel (``gpu_manager/shards.py``: the node's in-node path;
  the mailbox files the :class:`~gpufaas.core.sharding.Handed` tensor under the same request
  id, staleness and deadline rules).
* :class:`DirectChannel`: node-to-node HTTP POSTs to the receiving node's
  ``/v2/gpufaas/shards/{set}/{shard}/messages`` route over the node's pooled keep-alive
  connections (:mod:`gpufaas.core.peerhttp`); nodes on the same host exchange through shared
  memory (:mod:`gpufaas.core.hostlink`), and shards on the same node through the local path.
* :class:`NatsChannel`: NATS core pub/sub, one subject per shard
  (``gpufaas.fsd.<set>.<shard>``); with ``durable=True`` through a JetStream stream, so
  messages published before a server restart are still delivered after it (a work queue:
  the server deletes each message once its receiver has acknowledged it).
* :class:`S3Channel`: one object per message (``<prefix>/<set>/<request>/<layer>/<src>-<dst>``)
  that the receiver polls for, with back-off, and deletes once the request is done.

Push channels deliver into the receiving shard's :class:`Mailbox`. A mailbox keys every
message by request id, layer and sender, so partial results of an older request never mix
into a newer one: messages of a finished request are dropped, messages of a request the
shard has not heard of yet wait (for at most ``early_ttl_s``). Every wait has a deadline and
ends in :class:`ShardTimeout`, naming the silent shard; a channel that cannot be reached
raises :class:`ChannelUnavailable`, naming the channel.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import json
import logging
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpufaas.core.hostlink import (
    ALREADY,
    FILED,
    MISSING,
    HostLink,
    HostLinks,
    LinkBroken,
    LinkCounts,
)
from gpufaas.core.peerhttp import PeerPools, PeerUnreachable
from gpufaas.core.sharding import Handed

__all__ = [
    "CHANNELS",
    "Channel",
    "ChannelError",
    "ChannelUnavailable",
    "DirectChannel",
    "Envelope",
    "LocalChannel",
    "Mailbox",
    "NatsChannel",
    "Part",
    "S3Channel",
    "ShardMissing",
    "ShardTimeout",
    "ShardUnreachable",
    "decode",
    "encode",
    "envelope_from_notice",
    "message_path",
]

logger = logging.getLogger(__name__)

CHANNELS = ("direct", "nats", "s3")
Array = NDArray[np.float32]
# What a mailbox files: a message's values, or a shard's part handed over inside its node,
# device to device (core/sharding.py: Handed), which no channel carries.
Part = Array | Handed
_FRAME = struct.Struct("<I")
_NATS_SUBJECT = "gpufaas.fsd.{set}.{shard}"
_NATS_STREAM = "GPUFAAS_FSD"


def message_path(set_name: str, shard: int) -> str:
    """The receiving node's route for direct-channel messages."""
    from gpufaas.core.node import SHARD_MESSAGES

    return SHARD_MESSAGES.format(set_name=set_name, shard=shard)


# -------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------


class ChannelError(Exception):
    """A message that could not be sent or did not arrive; ``channel`` names the channel."""

    def __init__(self, channel: str, message: str) -> None:
        self.channel = channel
        super().__init__(message)


class ChannelUnavailable(ChannelError):
    """The channel's server (NATS, S3) cannot be reached."""

    def __init__(self, channel: str, where: str, detail: str) -> None:
        self.where = where
        super().__init__(channel, f"the {channel} channel at {where} is unreachable: {detail}")


class ShardTimeout(ChannelError):
    """A shard sent nothing before the deadline (its node may be gone)."""

    def __init__(self, channel: str, *, set_name: str, shard: int, layer: int, waited_s: float):
        self.set_name = set_name
        self.shard = shard
        self.layer = layer
        super().__init__(
            channel,
            f"shard {shard} of {set_name} sent no layer-{layer} activations within "
            f"{waited_s:.1f} s over the {channel} channel",
        )


class ShardUnreachable(ChannelError):
    """A direct send to a shard's node failed (refused, reset, or the shard is not there)."""

    def __init__(self, channel: str, *, set_name: str, shard: int, where: str, detail: str):
        self.set_name = set_name
        self.shard = shard
        super().__init__(
            channel, f"shard {shard} of {set_name} at {where} is unreachable: {detail}"
        )


class ShardMissing(ShardUnreachable):
    """The node answered, without the shard (evicted, restarted): relaunching the set helps."""


# -------------------------------------------------------------------------------------------
# Frames
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Envelope:
    set_name: str
    request_id: str
    layer: int  # the message carries a_{layer-1} values read by layer `layer`
    src: int
    dst: int
    chunk: int = 0
    chunks: int = 1

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.request_id, self.layer, self.src)


def encode(envelope: Envelope, values: Array) -> memoryview:
    """One frame: header length, JSON header (envelope, shape), raw float32 values. The values
    are copied once, straight into the frame (a partial result can be a MiB per message)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    header = json.dumps(
        {
            "set_name": envelope.set_name,
            "request_id": envelope.request_id,
            "layer": envelope.layer,
            "src": envelope.src,
            "dst": envelope.dst,
            "chunk": envelope.chunk,
            "chunks": envelope.chunks,
            "shape": list(values.shape),
        },
        separators=(",", ":"),
    ).encode()
    start = _FRAME.size + len(header)
    frame = bytearray(start + values.nbytes)
    _FRAME.pack_into(frame, 0, len(header))
    frame[_FRAME.size : start] = header
    np.frombuffer(frame, dtype=np.float32, offset=start)[:] = values.reshape(-1)
    return memoryview(frame)


def decode(frame: bytes | memoryview) -> tuple[Envelope, Array]:
    view = memoryview(frame)
    if len(view) < _FRAME.size:
        raise ValueError("frame shorter than its header length")
    (size,) = _FRAME.unpack_from(view)
    header = json.loads(bytes(view[_FRAME.size : _FRAME.size + size]))
    shape = tuple(int(d) for d in header.pop("shape"))
    values = np.frombuffer(view[_FRAME.size + size :], dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"frame holds {values.size} values, its header says {shape}")
    return Envelope(**header), values.reshape(shape)


def envelope_from_notice(notice: Mapping[str, Any]) -> Envelope:
    """The envelope a host-link notice carries (:class:`DirectChannel`'s same-host path)."""
    return Envelope(
        str(notice["set_name"]), str(notice["request_id"]), int(notice["layer"]),
        int(notice["src"]), int(notice["dst"]),
    )  # fmt: skip


def _notice(envelope: Envelope) -> dict[str, object]:
    """A host-link notice's envelope fields (not dataclasses.asdict: it deep-copies, ~10 us)."""
    return {
        "set_name": envelope.set_name, "request_id": envelope.request_id,
        "layer": envelope.layer, "src": envelope.src, "dst": envelope.dst,
    }  # fmt: skip


def chunked(envelope: Envelope, values: Array, max_bytes: int) -> list[tuple[Envelope, Array]]:
    """Split along the first axis so that every chunk's values fit ``max_bytes``."""
    row_bytes = max(1, values[0:1].nbytes)
    per_chunk = max(1, max_bytes // row_bytes)
    count = max(1, -(-values.shape[0] // per_chunk))
    return [
        (
            dataclasses.replace(envelope, chunk=i, chunks=count),
            values[i * per_chunk : (i + 1) * per_chunk],
        )
        for i in range(count)
    ]


# -------------------------------------------------------------------------------------------
# Mailbox
# -------------------------------------------------------------------------------------------


class Mailbox:
    """Messages addressed to one shard, by (request id, layer, sender). One event loop only."""

    def __init__(self, *, early_ttl_s: float = 30.0, remember_closed: int = 4096) -> None:
        self.early_ttl_s = early_ttl_s
        self._slots: dict[tuple[str, int, int], asyncio.Future[Part]] = {}
        self._chunks: dict[tuple[str, int, int], dict[int, Array]] = {}
        self._by_request: dict[str, set[tuple[str, int, int]]] = collections.defaultdict(set)
        self._open: set[str] = set()
        self._taken: set[tuple[str, int, int]] = set()  # taken already: a repeat is a duplicate
        self._early: dict[str, float] = {}  # request ids heard of before open, first arrival
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember_closed = remember_closed
        self.dropped_stale = 0

    def open(self, request_id: str) -> None:
        self._open.add(request_id)
        self._early.pop(request_id, None)

    def close(self, request_id: str) -> None:
        """Forget ``request_id``: later messages for it are stale and dropped."""
        self._open.discard(request_id)
        self._early.pop(request_id, None)
        for key in self._by_request.pop(request_id, set()):
            self._taken.discard(key)
            slot = self._slots.pop(key, None)
            if slot is not None and not slot.done():
                slot.cancel()
            self._chunks.pop(key, None)
        self._closed[request_id] = None
        while len(self._closed) > self._remember_closed:
            self._closed.popitem(last=False)

    def deliver(self, envelope: Envelope, values: Part) -> bool:
        """File a message (or an in-node hand-over); False when it is stale (its request is
        finished) or a duplicate."""
        rid = envelope.request_id
        if rid in self._closed:
            self.dropped_stale += 1
            return False
        now = asyncio.get_running_loop().time()
        self._expire_early(now)
        if rid not in self._open:
            self._early.setdefault(rid, now)
        key = envelope.key
        if key in self._taken:
            return False
        slot = self._slot(key)
        if slot.done():
            return False
        if envelope.chunks > 1 and not isinstance(values, Handed):  # only frames are chunked
            parts = self._chunks.setdefault(key, {})
            parts[envelope.chunk] = values
            if len(parts) < envelope.chunks:
                return True
            values = np.concatenate([parts[i] for i in range(envelope.chunks)])
            del self._chunks[key]
        slot.set_result(values)
        return True

    async def take(
        self, request_id: str, layer: int, src: int, *, timeout_s: float, channel: str,
        set_name: str,
    ) -> Part:  # fmt: skip
        """The message from ``src`` for ``layer``; :class:`ShardTimeout` after ``timeout_s``."""
        (values,) = await self.take_all(request_id, layer, (src,), timeout_s=timeout_s,
                                        channel=channel, set_name=set_name)  # fmt: skip
        return values

    async def take_all(
        self, request_id: str, layer: int, sources: tuple[int, ...], *, timeout_s: float,
        channel: str, set_name: str,
    ) -> list[Part]:  # fmt: skip
        """The messages from every shard in ``sources`` for ``layer``, waiting once for all of
        them (not once per part); :class:`ShardTimeout` naming the first still missing after
        ``timeout_s``.

        Taking them lets go of them here (the caller holds them now): a value that is a view
        of a shared-memory ring (core/hostlink.py) frees its span once the caller is done, not
        when the request ends."""
        keys = [(request_id, layer, src) for src in sources]
        slots = [self._slot(key) for key in keys]
        waiting = [slot for slot in slots if not slot.done()]
        if waiting:  # the slots are not cancelled on a timeout: a late part is still filed
            await asyncio.wait(waiting, timeout=max(0.0, timeout_s))
            late = next((src for src, slot in zip(sources, slots, strict=True)
                         if not slot.done()), None)  # fmt: skip
            if late is not None:
                raise ShardTimeout(
                    channel, set_name=set_name, shard=late, layer=layer, waited_s=timeout_s
                )
        values = [slot.result() for slot in slots]  # cancelled: the request was closed
        for key, slot in zip(keys, slots, strict=True):
            if self._slots.get(key) is slot:
                del self._slots[key]
                self._taken.add(key)
        return values

    def _slot(self, key: tuple[str, int, int]) -> asyncio.Future[Part]:
        slot = self._slots.get(key)
        if slot is None:
            slot = asyncio.get_running_loop().create_future()
            self._slots[key] = slot
            self._by_request[key[0]].add(key)
        return slot

    def _expire_early(self, now: float) -> None:
        expired = [rid for rid, t in self._early.items() if now - t > self.early_ttl_s]
        for rid in expired:
            self.close(rid)  # a request this shard never got: its coordinator gave up

    @property
    def pending(self) -> int:
        return len(self._slots)


# -------------------------------------------------------------------------------------------
# Channels
# -------------------------------------------------------------------------------------------


class Channel(abc.ABC):
    """Sends a shard's partial results and waits for the ones it needs."""

    name: str = "local"

    async def start(self) -> None:  # noqa: B027 (a hook: most channels need nothing here)
        """Connect; raises :class:`ChannelUnavailable` when the server cannot be reached."""

    async def close(self) -> None:  # noqa: B027 (a hook: most channels need nothing here)
        """Disconnect and release what :meth:`start` opened."""

    async def attach(self, set_name: str, shard: int, mailbox: Mailbox) -> None:  # noqa: B027 (a hook: most channels need nothing here)
        """Deliver messages addressed to ``shard`` into ``mailbox`` from now on."""

    async def detach(self, set_name: str, shard: int) -> None:  # noqa: B027 (a hook: most channels need nothing here)
        """Stop delivering to ``shard``."""

    @abc.abstractmethod
    async def send(self, envelope: Envelope, values: Array, *, timeout_s: float) -> None: ...

    async def receive(self, mailbox: Mailbox, envelope: Envelope, *, timeout_s: float) -> Part:
        """The message ``envelope`` names (its chunk fields are ignored)."""
        return await mailbox.take(
            envelope.request_id, envelope.layer, envelope.src, timeout_s=timeout_s,
            channel=self.name, set_name=envelope.set_name,
        )  # fmt: skip

    async def receive_all(
        self, mailbox: Mailbox, envelope: Envelope, sources: tuple[int, ...], *, timeout_s: float
    ) -> list[Part]:
        """The messages of every shard in ``sources`` for ``envelope``'s layer (its ``src``
        is ignored), with one wait for them all (push channels file them into ``mailbox``;
        a pull channel overrides this)."""
        return await mailbox.take_all(
            envelope.request_id, envelope.layer, sources, timeout_s=timeout_s,
            channel=self.name, set_name=envelope.set_name,
        )  # fmt: skip

    async def finish(self, set_name: str, request_id: str, shard: int) -> None:  # noqa: B027 (a hook: most channels need nothing here)
        """The request is over on ``shard``: drop what the channel still holds for it."""


class LocalChannel(Channel):
    """In-process delivery between shards that share a node (and an event loop)."""

    name = "local"

    def __init__(self) -> None:
        self.mailboxes: dict[tuple[str, int], Mailbox] = {}

    async def attach(self, set_name: str, shard: int, mailbox: Mailbox) -> None:
        self.mailboxes[(set_name, shard)] = mailbox

    async def detach(self, set_name: str, shard: int) -> None:
        self.mailboxes.pop((set_name, shard), None)

    def has(self, set_name: str, shard: int) -> bool:
        return (set_name, shard) in self.mailboxes

    async def send(self, envelope: Envelope, values: Array, *, timeout_s: float) -> None:
        mailbox = self.mailboxes.get((envelope.set_name, envelope.dst))
        if mailbox is None:
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where="this node",
                detail="the shard is not loaded here",
            )  # fmt: skip
        mailbox.deliver(envelope, values)


class DirectChannel(Channel):
    """Node-to-node HTTP over the node's pooled connections (:mod:`gpufaas.core.peerhttp`);
    to a node on this host through shared memory where ``links`` finds one
    (:mod:`gpufaas.core.hostlink`); shards on this node go through ``local`` without a copy.
    Each message is counted by the path it took in ``counts.messages`` (the node's
    :class:`~gpufaas.core.hostlink.LinkCounts`, exported on its ``/metrics``)."""

    name = "direct"

    def __init__(
        self,
        *,
        peers: Mapping[tuple[str, int], str],
        local: LocalChannel,
        pools: PeerPools,
        links: HostLinks | None = None,
        counts: LinkCounts | None = None,
    ) -> None:
        self.peers = {k: v.rstrip("/") for k, v in peers.items()}  # (set, shard) -> node URL
        self.local = local
        self.pools = pools  # the node's, shared by its shards; the node closes it
        self.links = links  # the node's same-host links (None: HTTP only); the node closes it
        self.counts = counts if counts is not None else LinkCounts()  # messages by path

    async def attach(self, set_name: str, shard: int, mailbox: Mailbox) -> None:
        await self.local.attach(set_name, shard, mailbox)

    async def detach(self, set_name: str, shard: int) -> None:
        await self.local.detach(set_name, shard)

    async def send(self, envelope: Envelope, values: Array, *, timeout_s: float) -> None:
        if self.local.has(envelope.set_name, envelope.dst):
            self.counts.messages["local"] += 1
            await self.local.send(envelope, values, timeout_s=timeout_s)
            return
        where = self.peers.get((envelope.set_name, envelope.dst))
        if where is None:
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst,
                where="(no address)", detail="the shard set has no address for it",
            )  # fmt: skip
        link = await self.links.find(where) if self.links is not None else None
        if link is not None:
            await self._send_on_host(link, where, envelope, values, timeout_s=timeout_s)
            return
        self.counts.messages["http"] += 1
        try:
            reply = await self.pools.to(where).post(
                message_path(envelope.set_name, envelope.dst),
                encode(envelope, values),
                timeout_s=max(0.1, timeout_s),
            )
        except (PeerUnreachable, ValueError) as e:
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail=str(e),
            ) from None  # fmt: skip
        if reply.status == 404:
            raise ShardMissing(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail="the shard is not loaded there",
            )  # fmt: skip
        if reply.status >= 300:
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail=f"HTTP {reply.status}: {reply.body[:200].decode('utf-8', 'replace')}",
            )  # fmt: skip

    async def _send_on_host(
        self, link: HostLink, where: str, envelope: Envelope, values: Array, *, timeout_s: float
    ) -> None:
        try:
            staged = link.stage(_notice(envelope), values)
            self.counts.messages["inline" if staged.inline else "shm"] += 1
            status, _ = await link.answer(staged, timeout_s=max(0.1, timeout_s))
        except LinkBroken as e:
            assert self.links is not None
            self.links.forget(where, link)
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail=f"shared memory: {e}",
            ) from None  # fmt: skip
        if status == MISSING:
            raise ShardMissing(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail="the shard is not loaded there",
            )  # fmt: skip
        if status not in (FILED, ALREADY):
            raise ShardUnreachable(
                self.name, set_name=envelope.set_name, shard=envelope.dst, where=where,
                detail=f"shared memory: status {status}",
            )  # fmt: skip


class NatsChannel(Channel):
    """NATS pub/sub, one subject per shard; ``durable`` publishes through JetStream."""

    name = "nats"

    def __init__(
        self,
        url: str,
        *,
        durable: bool = False,
        connect_timeout_s: float = 2.0,
        redeliver_s: float = 2.0,
    ) -> None:
        self.url = url
        self.durable = durable
        self.connect_timeout_s = connect_timeout_s
        # JetStream redelivers a message that was delivered but never acknowledged (to a
        # receiver that went away, or to the push inbox of a consumer whose subscriber had
        # just closed) only after the consumer's ack wait: 30 s by default, longer than any
        # request's deadline. Messages here are acknowledged as soon as they are filed, so a
        # short wait costs nothing and a restarted receiver gets them within seconds.
        self.redeliver_s = redeliver_s
        self._nc: Any = None
        self._js: Any = None
        self._subs: dict[tuple[str, int], Any] = {}

    async def start(self) -> None:
        import nats
        from nats.errors import Error as NatsError

        async def quiet(error: Exception) -> None:
            logger.debug("NATS %s: %s", self.url, error)

        try:
            # An unreachable server fails the start within the budget (no endless retries);
            # once connected, the client reconnects on its own through an outage.
            self._nc = await asyncio.wait_for(
                nats.connect(
                    self.url,
                    connect_timeout=self.connect_timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,
                    error_cb=quiet,
                ),
                timeout=2 * self.connect_timeout_s,
            )
        except (OSError, NatsError, TimeoutError) as e:
            raise ChannelUnavailable(self.name, self.url, str(e) or type(e).__name__) from None
        if self.durable:
            from nats.js.api import RetentionPolicy

            self._js = self._nc.jetstream()
            try:
                # A work queue: the server deletes a message once its receiver acknowledges
                # it (each shard's consumer has a subject of its own). The default (limits)
                # kept every message for ``max_age`` after it was read: at 1.5 GB a request
                # (RadiX-Net 16,384 x 120, N = 4, random) five minutes of traffic on disk.
                await self._js.add_stream(
                    name=_NATS_STREAM, subjects=["gpufaas.fsd.>"], max_age=300.0,
                    retention=RetentionPolicy.WORK_QUEUE,
                )  # fmt: skip
            except (NatsError, TimeoutError) as e:
                raise ChannelUnavailable(self.name, self.url, f"JetStream: {e}") from None

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.close(), timeout=2.0)
            except (TimeoutError, Exception):  # closing a broken connection: nothing to keep
                logger.debug("NATS close failed", exc_info=True)
            self._nc = None

    async def attach(self, set_name: str, shard: int, mailbox: Mailbox) -> None:
        subject = _NATS_SUBJECT.format(set=set_name, shard=shard)

        async def on_message(msg: Any) -> None:
            try:
                envelope, values = decode(msg.data)
            except ValueError:
                logger.warning("dropped a malformed message on %s", subject)
                return
            mailbox.deliver(envelope, values)
            if self.durable:
                await msg.ack()

        try:
            if self.durable:
                from nats.js.api import ConsumerConfig

                durable = f"fsd-{set_name}-{shard}".replace(".", "-")
                sub = await self._js.subscribe(
                    subject, cb=on_message, durable=durable, manual_ack=True,
                    config=ConsumerConfig(ack_wait=self.redeliver_s),
                )  # fmt: skip
            else:
                sub = await self._nc.subscribe(subject, cb=on_message)
            await self._nc.flush(timeout=self.connect_timeout_s)
        except Exception as e:
            raise ChannelUnavailable(self.name, self.url, f"subscribe: {e}") from None
        self._subs[(set_name, shard)] = sub

    async def detach(self, set_name: str, shard: int) -> None:
        sub = self._subs.pop((set_name, shard), None)
        if sub is not None and self._nc is not None and self._nc.is_connected:
            await sub.unsubscribe()

    async def send(self, envelope: Envelope, values: Array, *, timeout_s: float) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise ChannelUnavailable(self.name, self.url, "not connected")
        subject = _NATS_SUBJECT.format(set=envelope.set_name, shard=envelope.dst)
        room = int(self._nc.max_payload) - 512  # the frame header
        try:
            for part, chunk in chunked(envelope, values, room):
                if self.durable:
                    await self._js.publish(subject, encode(part, chunk), timeout=timeout_s)
                else:
                    await self._nc.publish(subject, encode(part, chunk))
        except Exception as e:
            raise ChannelUnavailable(self.name, self.url, f"publish: {e}") from None


class S3Channel(Channel):
    """One object per message in ``bucket``; the receiver polls with capped back-off."""

    name = "s3"

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        prefix: str = "fsd",
        key: str | None = None,
        secret: str | None = None,
        poll_s: tuple[float, float] = (0.001, 0.02),
    ) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix
        self.key = key
        self.secret = secret
        self.poll_s = poll_s
        self._fs: Any = None
        self._read: dict[tuple[str, str, int], list[str]] = collections.defaultdict(list)

    def _path(self, envelope: Envelope) -> str:
        return (
            f"{self.bucket}/{self.prefix}/{envelope.set_name}/{envelope.request_id}/"
            f"{envelope.layer}/{envelope.src}-{envelope.dst}"
        )

    async def start(self) -> None:
        import s3fs

        self._fs = s3fs.S3FileSystem(
            asynchronous=True,
            endpoint_url=self.endpoint_url,
            key=self.key,
            secret=self.secret,
            skip_instance_cache=True,
            config_kwargs={
                "connect_timeout": 2,
                "read_timeout": 10,
                "retries": {"max_attempts": 1},
            },
        )
        self._fs.retries = 1
        try:
            await self._fs.set_session()
            await asyncio.wait_for(self._fs._ls(self.bucket, refresh=True), timeout=5)
        except (Exception, TimeoutError) as e:
            await self.close()
            raise ChannelUnavailable(self.name, self.endpoint_url, _brief(e)) from None

    async def close(self) -> None:
        client = getattr(self._fs, "_s3", None)
        self._fs = None
        if client is not None:
            try:
                await client.close()
            except Exception:  # a session that never connected: nothing to release
                logger.debug("closing the S3 session failed", exc_info=True)

    async def send(self, envelope: Envelope, values: Array, *, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(
                self._fs._pipe_file(
                    self._path(envelope), bytes(encode(envelope, values))
                ),  # S3 takes bytes
                timeout=timeout_s,
            )
        except (Exception, TimeoutError) as e:
            raise ChannelUnavailable(self.name, self.endpoint_url, _brief(e)) from None

    async def receive(self, mailbox: Mailbox, envelope: Envelope, *, timeout_s: float) -> Array:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        path = self._path(envelope)
        wait, most = self.poll_s
        while True:
            try:
                frame = await asyncio.wait_for(
                    self._fs._cat_file(path), timeout=max(0.05, deadline - loop.time())
                )
            except FileNotFoundError:
                frame = None
            except (Exception, TimeoutError) as e:
                if loop.time() >= deadline:
                    break
                raise ChannelUnavailable(self.name, self.endpoint_url, _brief(e)) from None
            if frame is not None:
                got, values = decode(frame)
                if got.request_id != envelope.request_id:  # cannot happen: keyed by request
                    raise ChannelError(self.name, f"{path} holds request {got.request_id}")
                self._read[(envelope.set_name, envelope.request_id, envelope.dst)].append(path)
                return values
            if loop.time() + wait > deadline:
                break
            await asyncio.sleep(wait)  # object storage has no push: poll, backing off
            wait = min(most, wait * 2)
        raise ShardTimeout(
            self.name, set_name=envelope.set_name, shard=envelope.src, layer=envelope.layer,
            waited_s=timeout_s,
        )  # fmt: skip

    async def receive_all(
        self, mailbox: Mailbox, envelope: Envelope, sources: tuple[int, ...], *, timeout_s: float
    ) -> list[Part]:
        """Object storage has no push: each part polled for in turn, within one deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        return [
            await self.receive(
                mailbox, dataclasses.replace(envelope, src=src), timeout_s=deadline - loop.time()
            )
            for src in sources
        ]

    async def finish(self, set_name: str, request_id: str, shard: int) -> None:
        paths = self._read.pop((set_name, request_id, shard), [])
        if paths and self._fs is not None:
            try:
                await asyncio.wait_for(self._fs._rm(paths), timeout=5)
            except (Exception, TimeoutError):  # leftovers expire with the bucket's lifecycle
                logger.debug("could not delete %d message objects", len(paths), exc_info=True)


def _brief(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
