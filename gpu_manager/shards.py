"""Shards of a distributed model on one node: loading, per-layer execution, the node routes.

A shard (see :class:`gpufaas.core.layered.ShardSpec`) computes, for every layer, the rows
its partition owns. :class:`ShardExecutor` runs one request layer by layer:

1. ask the channel for every partial result this layer reads from other shards (in flight
   from the start of the layer);
2. meanwhile multiply the weights over the shard's *own* previous activations;
3. as each remote part arrives, add its product;
4. finish the *boundary* rows first (those some other shard reads next) and send each
   receiver its values at once, then finish the interior rows while those sends travel.

So computation overlaps communication on both sides. The arithmetic runs on one worker
thread per shard (torch releases the GIL), the waits and sends on the event loop. Every wait
has a deadline (``stall_s`` per message, ``timeout_s`` per request); a send or wait that
fails ends the request with the channel's error, which names the shard or channel.

:class:`ShardHost` keeps the node's shards in their devices' byte-bounded LRUs, one entry per
shard, and evicts a whole shard set at once (a shard without its set is useless). A set's
shards on one node go on distinct devices (:func:`device_for`), and a shard hands a part to
a shard on the same node through the device layer (``DeviceBackend.hand_over``: on CUDA a
peer copy, on CPU devices the tensor itself), filed in the receiver's mailbox under the same
request-id and deadline rules, with no channel message. Loads come as a tree: a node loads
its own shard while it forwards each child's load to that child's node.

Each shard's artifact is fetched (and verified) into the node's artifact store. The copy
stays while the shard is loaded or evicted (it may come back), and goes when the shard is
unloaded (``DELETE``: the coordinator's remove, or its clean-up after a failed launch), unless
another shard kept here uses the same blob (eighteenth session; before, every set's copies
stayed until someone emptied the store by hand). A node that stops or crashes with sets loaded
leaves its copies in its ledger on disk, and the next node to start on the store deletes them
(:func:`shard_host`, ``ArtifactStore.sweep_ledgers``; nineteenth session).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufaas.core import node
from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.channels import (
    Array,
    Channel,
    ChannelError,
    ChannelUnavailable,
    DirectChannel,
    Envelope,
    LocalChannel,
    Mailbox,
    NatsChannel,
    Part,
    S3Channel,
    ShardTimeout,
    ShardUnreachable,
    decode,
    encode,
    envelope_from_notice,
)
from gpufaas.core.hostlink import (
    HostLinks,
    LinkCounts,
    LinkEndpoint,
    LinkServer,
    Outcome,
    endpoint_in_state,
)
from gpufaas.core.http import error_response, match_fast_post
from gpufaas.core.layered import (
    Block,
    IntArray,
    ShardFormatError,
    ShardSpec,
    TiledMatrix,
    load_shard,
    product_matrix,
)
from gpufaas.core.peerhttp import PeerPools
from gpufaas.core.protocol import ProtocolError
from gpufaas.core.sharding import (
    REQUEST_ID_HEADER,
    SHARD_HEADER,
    SHARD_INFER_PATH,
    SHARD_PATH,
    TIMEOUT_HEADER,
    Handed,
    LaunchReport,
    ShardLoad,
)
from gpufaas.gpu_manager.chain import RuntimeFailure
from gpufaas.gpu_manager.device_memory import ShardResident
from gpufaas.gpu_manager.device_tier import DeviceTier
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.runtime import NodeRuntime

__all__ = [
    "ShardExecutor",
    "ShardFastPath",
    "ShardHost",
    "ShardNotLoaded",
    "device_for",
    "shard_host",
    "shard_router",
]

logger = logging.getLogger(__name__)
_MAX_FRAME_BYTES = 1 << 30
# Channels whose shards on one node exchange device to device (the in-node path); NATS and
# S3 carry every message, as the configuration asked.
IN_NODE_CHANNELS = ("direct", "local")


class ShardNotLoaded(Exception):
    def __init__(self, set_name: str, shard: int) -> None:
        self.set_name = set_name
        self.shard = shard
        super().__init__(f"shard {shard} of {set_name} is not loaded on this node")


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One row group (boundary or interior) of a layer: its rows ``start:stop`` of the layer's
    output (boundary rows first, so each group is a slice: no scatter) and its matrices."""

    start: int
    stop: int
    own: torch.Tensor | TiledMatrix
    remote: dict[int, torch.Tensor | TiledMatrix]
    bias: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _LayerOps:
    rows: int
    groups: tuple[_Rows, ...]  # boundary rows first
    sources: tuple[int, ...]  # shards this layer reads from
    activation: str
    send_next: dict[int, Rows]  # receiver -> rows of this layer's output it reads
    order: IntArray  # row r of this layer's output is owned neuron ``order[r]``


@dataclasses.dataclass(frozen=True)
class _Step:
    """Where a request stands between two worker trips: the activations ``a`` before layer
    ``index`` (which reads remote values), that layer's own partial products, per row group,
    and, once every layer is done, the output on the host."""

    a: torch.Tensor
    index: int
    partial: list[torch.Tensor]
    output: Array | None


Rows = torch.Tensor | slice  # rows of a layer's output: their positions, or one range of them
# A row group's sends: each receiver's values, and for a receiver on this node (the in-node
# path) the mailbox the device layer's hand-over is filed in (None: through the channel).
Parts = list[tuple[Envelope, Part, Mailbox | None]]
Handover = Callable[[Parts], None]  # from the worker to the loop


@dataclasses.dataclass(frozen=True)
class InNodePeer:
    """A shard loaded on this node, as a sender on this node sees it: where its parts are
    filed and the device they go to."""

    mailbox: Mailbox
    backend: DeviceBackend


InNode = Callable[[str, int], InNodePeer | None]  # (set, shard) -> the shard, if on this node


@dataclasses.dataclass
class _Run:
    """One request's trips on the worker thread: the step the last trip left (only the
    worker reads and writes it, one trip after another) and the future the last trip, or a
    failed one, resolves on the event loop."""

    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Array]
    step: _Step | None = None
    over: bool = False  # the request ended (failed, cancelled): trips still queued do nothing


def _positions(positions: IntArray, device: torch.device) -> Rows:
    """``positions`` as a range where they are one (the usual case: a hypergraph split's
    boundary rows come first, in order), so the hand-over takes a view instead of a copy."""
    if positions.size and np.array_equal(
        positions, np.arange(positions[0], positions[0] + positions.size)
    ):
        return slice(int(positions[0]), int(positions[0]) + int(positions.size))
    return torch.from_numpy(positions).to(device)


def _rows_block(block: Block, keep: IntArray) -> torch.Tensor | TiledMatrix:
    """The rows ``keep`` (positions) of a COO block, in the fastest form for its products
    (dense tiles where the 16 x 16 blocks stay whole, else CSR: ``product_matrix``)."""
    where = np.full(block.shape[0], -1, dtype=np.int64)
    where[keep] = np.arange(keep.size, dtype=np.int64)
    mask = where[block.rows] >= 0
    return product_matrix(
        where[block.rows[mask]], block.cols[mask], block.values[mask], (keep.size, block.shape[1])
    )


def prepare(spec: ShardSpec, device: torch.device) -> list[_LayerOps]:
    """Each layer's row groups, matrices and send positions, on ``device``.

    A layer's output rows are kept boundary rows first, then interior rows, so each group
    writes one slice; the next layer's own columns and the send positions follow that order.
    The last layer has no boundary rows: its output is in the owned order."""
    ops = []
    previous: IntArray | None = None  # where each owned neuron of a_{l-1} sits in the rows
    for index, layer in enumerate(spec.layers):
        after = spec.layers[index + 1].send if index + 1 < len(spec.layers) else {}
        boundary = np.unique(np.concatenate([np.asarray(p) for p in after.values()])) if after \
            else np.zeros(0, dtype=np.int64)  # fmt: skip
        interior = np.setdiff1d(np.arange(layer.owned.size, dtype=np.int64), boundary)
        order = np.concatenate([boundary, interior]).astype(np.int64)
        where = np.empty_like(order)
        where[order] = np.arange(order.size, dtype=np.int64)
        own = layer.own
        if previous is not None:
            own = Block(own.rows, previous[own.cols], own.values, own.shape)
        groups = []
        start = 0
        for keep in (boundary, interior):
            if keep.size == 0:
                continue
            groups.append(
                _Rows(
                    start=start,
                    stop=start + int(keep.size),
                    own=_rows_block(own, keep).to(device),
                    remote={q: _rows_block(b, keep).to(device) for q, b in layer.remote.items()},
                    bias=torch.from_numpy(layer.bias[keep])[:, None].to(device),
                )
            )
            start += int(keep.size)
        ops.append(
            _LayerOps(
                rows=int(layer.owned.size),
                groups=tuple(groups),
                sources=tuple(sorted(layer.remote)),
                activation=layer.activation,
                send_next={
                    q: _positions(where[np.asarray(p, dtype=np.int64)], device)
                    for q, p in after.items()
                },
                order=order,
            )
        )
        previous = where
    return ops


class ShardExecutor:
    """Runs requests through one shard; see the module docstring for the order of work.

    The weights live on ``backend``'s device and every multiply runs in its compute context
    (its own stream on CUDA; gpu_manager/devices.py). Values cross to the host only where
    they leave the shard (a send, the output) and arrive from it (a receive, the input),
    always in the worker thread: a device copy never blocks the event loop."""

    def __init__(
        self,
        spec: ShardSpec,
        *,
        set_name: str,
        channel: Channel,
        mailbox: Mailbox,
        backend: DeviceBackend | None = None,
        in_node: InNode | None = None,
    ) -> None:
        self.spec = spec
        self.set_name = set_name
        self.channel = channel
        self.mailbox = mailbox
        self.backend = backend  # None: this process's CPU, no device context
        # Receivers on this node (needs a backend): device to device, no channel message.
        self.in_node = in_node if backend is not None else None
        self.device = backend.device if backend is not None else torch.device("cpu")
        self.ops = prepare(spec, self.device)
        # the layers that read remote values, in order: one trip of the worker ends at each
        self.remote_layers = tuple(i for i, op in enumerate(self.ops) if op.sources)
        self.first_sends = {
            q: _positions(np.asarray(p, dtype=np.int64), self.device)
            for q, p in spec.layers[0].send.items()
        }
        # The worker multiplies with the process's intra-op thread count (the manager's 1).
        # OpenMP's count and MKL's are per thread: a new thread starts at one per core, and
        # MKL's sparse (CSR) products do not ask torch first, so each shard's products ran as
        # a team of two whose barrier spun while its partner waited for a core (4 shards on 2
        # cores: one 1,024 x 120 request took 7-16 s, bench/RESULTS.md, "fsd, sixteenth
        # session").
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"shard-{set_name}-{spec.shard}",
            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),),
        )  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(
        self, request_id: str, inputs: Array, *, timeout_s: float, stall_s: float = 5.0
    ) -> Array:
        """This shard's output rows for ``inputs`` (its input rows, ``(rows, batch)``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.mailbox.open(request_id)
        try:
            async with asyncio.TaskGroup() as sends:
                body = sends.create_task(
                    self._layers(request_id, inputs, sends, deadline=deadline, stall_s=stall_s)
                )
            return body.result()
        except* ChannelError as group:
            raise group.exceptions[0] from None
        finally:
            self.mailbox.close(request_id)
            await self.channel.finish(self.set_name, request_id, self.spec.shard)

    def _trip(self, run: _Run, fn: Callable[[_Step | None], _Step]) -> None:
        """Queue one trip of ``run`` on the worker thread (FIFO, one thread: a request's trips
        run in the order queued, each after the one before). The loop does not wait for it."""
        queued = self._pool.submit(self._on_worker, run, fn)
        queued.add_done_callback(functools.partial(_dropped, run))

    def _on_worker(self, run: _Run, fn: Callable[[_Step | None], _Step]) -> None:
        if run.over:
            return
        try:
            with self.backend.compute() if self.backend is not None else contextlib.nullcontext():
                run.step = step = fn(run.step)
        except BaseException as e:  # the request fails with it, on the loop
            run.over = True
            run.loop.call_soon_threadsafe(_settle, run.done, None, e)
            return
        if step.output is not None:
            run.loop.call_soon_threadsafe(_settle, run.done, step.output, None)

    def _hand_over(
        self, request_id: str, layer: int, values: torch.Tensor, targets: dict[int, Rows]
    ) -> Parts:
        """Each receiver's part of ``values`` (worker thread): a view where its rows are one
        range (those rows are final, nothing writes them again), else gathered. A receiver
        on this node gets it device to device (the device layer's hand-over: on the CPU the
        tensor itself, on CUDA a peer copy), every other one on the host, for the channel."""
        parts: Parts = []
        for q, positions in targets.items():
            envelope = Envelope(self.set_name, request_id, layer, self.spec.shard, q)
            rows = values[positions] if isinstance(positions, slice) else values.index_select(
                0, positions)  # fmt: skip
            peer = self.in_node(self.set_name, q) if self.in_node is not None else None
            if peer is not None and self.backend is not None:
                parts.append((envelope, self.backend.hand_over(rows, to=peer.backend),
                              peer.mailbox))  # fmt: skip
            else:
                parts.append((envelope, rows.cpu().numpy(), None))
        return parts

    def _send(self, parts: Parts, sends: asyncio.TaskGroup, deadline: float) -> None:
        timeout_s = deadline - asyncio.get_running_loop().time()
        for envelope, part, mailbox in parts:
            if mailbox is not None:  # on this node: filed as it is (request id rules apply)
                mailbox.deliver(envelope, part)
                continue
            assert not isinstance(part, Handed)
            send = self.channel.send(envelope, part, timeout_s=timeout_s)
            try:
                sends.create_task(send)
            except RuntimeError:  # the run is already failing (its group is shutting down)
                send.close()
                return

    async def _layers(
        self,
        request_id: str,
        inputs: Array,
        sends: asyncio.TaskGroup,
        *,
        deadline: float,
        stall_s: float,
    ) -> Array:
        """One trip to the worker thread per layer that reads remote values, plus one: each
        trip finishes such a layer, runs every following layer that reads nothing remote, and
        computes the own part of the next layer that does, so that part overlaps the remote
        parts' travel. Sends leave from the worker the moment their rows are done.

        The loop queues each trip the moment its remote parts are all there (the first at
        once) and never waits for one to end: the worker runs a request's trips in order,
        carrying its step from one to the next, and resolves ``run.done`` from the last (one
        wake-up of the loop per request instead of one per trip). A trip that fails resolves
        it with its error; the receives run as a task beside it, each under its deadline."""
        loop = asyncio.get_running_loop()
        run = _Run(loop, loop.create_future())

        def boundary_ready(parts: Parts) -> None:
            loop.call_soon_threadsafe(self._send, parts, sends, deadline)

        self._trip(run, lambda _: self._first_step(request_id, inputs, boundary_ready))
        feed = sends.create_task(
            self._feed(run, request_id, boundary_ready, deadline=deadline, stall_s=stall_s)
        )
        try:
            return await run.done
        finally:
            run.over = True
            feed.cancel()

    async def _feed(
        self,
        run: _Run,
        request_id: str,
        boundary_ready: Handover,
        *,
        deadline: float,
        stall_s: float,
    ) -> None:
        """Wait for each remote layer's parts in order and queue its trip (event loop)."""
        loop = asyncio.get_running_loop()
        for index in self.remote_layers:  # all of a layer's parts, with one wait
            sources = self.ops[index].sources
            envelope = Envelope(self.set_name, request_id, index, -1, self.spec.shard)
            parts = await self.channel.receive_all(
                self.mailbox, envelope, sources, timeout_s=min(stall_s, deadline - loop.time())
            )
            arrived = list(zip(sources, parts, strict=True))
            self._trip(run, functools.partial(self._next_step, request_id, arrived,
                                              boundary_ready))  # fmt: skip

    def _next_step(
        self,
        request_id: str,
        arrived: list[tuple[int, Part]],
        boundary_ready: Handover,
        step: _Step | None,
    ) -> _Step:
        assert step is not None and step.output is None  # trips run in the order queued
        return self._step(request_id, step, arrived, boundary_ready)

    def _first_step(
        self,
        request_id: str,
        inputs: Array,
        boundary_ready: Handover,
    ) -> _Step:
        """Upload the input rows, send the ones other shards read, then go on (worker)."""
        host = torch.from_numpy(np.array(inputs, dtype=np.float32, order="C"))  # writable
        if self.first_sends:
            boundary_ready(self._hand_over(request_id, 0, host, self.first_sends))
        return self._run_local(request_id, host.to(self.device), 0, boundary_ready)

    def _step(
        self,
        request_id: str,
        step: _Step,
        arrived: list[tuple[int, Part]],
        boundary_ready: Handover,
    ) -> _Step:
        """Finish layer ``step.index`` with the remote parts that arrived (worker)."""
        op = self.ops[step.index]
        remote = [(q, self._to_device(x)) for q, x in arrived]
        out = torch.empty((op.rows, step.a.shape[1]), dtype=torch.float32, device=self.device)
        for position, (g, z) in enumerate(zip(op.groups, step.partial, strict=True)):
            for q, x in remote:
                z.add_(g.remote[q] @ x)
            self._finish(out, g, z, op.activation)
            if position == 0 and op.send_next:  # boundary rows first: they leave now
                boundary_ready(self._hand_over(request_id, step.index + 1, out, op.send_next))
        if not op.groups and op.send_next:
            boundary_ready(self._hand_over(request_id, step.index + 1, out, op.send_next))
        return self._run_local(request_id, out, step.index + 1, boundary_ready)

    def _run_local(
        self,
        request_id: str,
        a: torch.Tensor,
        start: int,
        boundary_ready: Handover,
    ) -> _Step:
        """Every layer from ``start`` that reads nothing remote, then the own part of the next
        one that does (or the output, at the end) (worker)."""
        end = next((i for i in range(start, len(self.ops)) if self.ops[i].sources), len(self.ops))

        def ready(out: torch.Tensor, layer: int) -> None:
            boundary_ready(self._hand_over(request_id, layer, out, self.ops[layer - 1].send_next))

        a = self._local_layers(a, start, end, ready)
        if end == len(self.ops):
            return _Step(a, end, [], a.cpu().numpy())
        return _Step(a, end, [g.own @ a for g in self.ops[end].groups], None)

    def _to_device(self, values: Part) -> torch.Tensor:
        if isinstance(values, Handed):  # from a shard on this node, device to device
            assert self.backend is not None  # only a shard with a device is handed to
            return self.backend.take_over(values)
        if self.device.type == "cpu":  # the frame's values, as they are
            with warnings.catch_warnings():  # frames decode read-only; they are only read
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                return torch.from_numpy(np.ascontiguousarray(values))
        return torch.from_numpy(np.array(values, dtype=np.float32)).to(self.device)

    def _local_layers(
        self,
        a: torch.Tensor,
        start: int,
        end: int,
        boundary_ready: Callable[[torch.Tensor, int], None],
    ) -> torch.Tensor:
        """Layers ``start..end-1``, none of which reads a remote value (worker thread)."""
        for index in range(start, end):
            op = self.ops[index]
            out = torch.empty((op.rows, a.shape[1]), dtype=torch.float32, device=self.device)
            for position, g in enumerate(op.groups):
                self._finish(out, g, g.own @ a, op.activation)
                if position == 0 and op.send_next:
                    boundary_ready(out, index + 1)  # boundary rows first: they leave now
            if not op.groups and op.send_next:
                boundary_ready(out, index + 1)
            a = out
        return a

    def _finish(
        self, out: torch.Tensor, g: _Rows, z: torch.Tensor, activation: str
    ) -> torch.Tensor:
        rows = torch.add(z, g.bias, out=out[g.start : g.stop])
        if activation == "relu":
            rows.relu_()
        if self.spec.ymax is not None:
            rows.clamp_(max=self.spec.ymax)
        return out


# -------------------------------------------------------------------------------------------
# The node's shards
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    load: ShardLoad
    executor: ShardExecutor
    channel: Channel
    mailbox: Mailbox
    nbytes: int
    tier: DeviceTier  # the device it runs on (device_for)
    resident: ShardResident  # its bytes in that device's tier
    running: int = 0  # requests on this shard now
    dropped: bool = False  # unloaded while running: release after the last request


def device_for(load: ShardLoad, devices: int) -> int:
    """Which of a node's ``devices`` (largest first) shard ``load.shard`` runs on: its rank
    among the set's shards placed on this node, modulo the devices. So a set's shards on one
    node take distinct devices while there are as many devices as shards (and exchange device
    to device); one shard per node runs on the largest device, as before."""
    here = sorted({q for q, url in load.peers.items() if url == load.node} | {load.shard})
    return here.index(load.shard) % devices


class ShardHost:
    """The shards on one node: residents of their device's tier beside its models (one byte
    budget, one LRU per device); evicting any shard of a set drops the whole set here."""

    def __init__(
        self,
        *,
        store: ArtifactStore,
        devices: list[DeviceTier],
        token: str | None = None,
        stall_s: float = 15.0,
        forward: Callable[[ShardLoad], Awaitable[LaunchReport]] | None = None,
    ) -> None:
        if not devices:
            raise ValueError("a shard host needs at least one device")
        self.store = store
        self.devices = devices  # largest first: device_for's order
        self.shards: dict[str, _Loaded] = {}  # key -> the loaded shard
        self.token = token
        self.stall_s = stall_s
        self.local = LocalChannel()
        # Direct-channel connections to peer nodes, shared by every shard here.
        self.peers = PeerPools(headers={"Authorization": f"Bearer {token}"} if token else {})
        # Peers on this host: shared memory instead of HTTP (core/hostlink.py).
        self.link_server = LinkServer(self._deliver_notice, serve=self._serve_call)
        # What the links and direct channels did (setups, messages by path): on /metrics
        self.link_counts = LinkCounts()
        self.links = HostLinks(endpoint_of=self._endpoint_of, counts=self.link_counts)
        self._shared: dict[tuple[str, ...], Channel] = {}  # NATS/S3 connections, per server
        self._forward = forward or self._put_remote
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # cleanups after an eviction
        # The shards whose verified copy is in the store, by key (an evicted one's too: it may
        # come back), and the loads fetching theirs now: a copy goes when its shard is
        # unloaded, unless one of these uses the same blob (_discard).
        self._copies: dict[str, ShardLoad] = {}
        self._fetching: list[ShardLoad] = []
        # The same copies on disk, for the sweep after this process is gone (shard_host).
        self._ledger = store.ledger()

    @staticmethod
    def key(set_name: str, shard: int) -> str:
        return f"{set_name}/{shard}"

    # -- launch ---------------------------------------------------------------------------

    async def launch(self, load: ShardLoad) -> LaunchReport:
        """Load ``load``'s shard while its children load theirs (each on its own node)."""
        children = [asyncio.ensure_future(self._child(load, child)) for child in load.children]
        report = LaunchReport(depth=1)
        started = time.perf_counter()
        try:
            nbytes = await self._load(load)
            report.loaded[load.shard] = nbytes
        except (ArtifactError, ShardFormatError, ChannelError, RuntimeFailure, OSError) as e:
            report.errors[load.shard] = str(e)
        report.seconds[load.shard] = time.perf_counter() - started
        for sub in await asyncio.gather(*children):
            report.loaded.update(sub.loaded)
            report.seconds.update(sub.seconds)
            report.errors.update(sub.errors)
            report.depth = max(report.depth, sub.depth + 1)
        return report

    async def _child(self, parent: ShardLoad, child: ShardLoad) -> LaunchReport:
        if child.node == parent.node:
            return await self.launch(child)
        try:
            return await self._forward(child)
        except Exception as e:  # any failure to reach the child is reported for its subtree
            return LaunchReport(errors=dict.fromkeys(_subtree(child), f"{child.node}: {e}"))

    async def _put_remote(self, load: ShardLoad) -> LaunchReport:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        path = SHARD_PATH.format(set_name=load.set_name, shard=load.shard)
        async with httpx.AsyncClient(headers=headers, timeout=120) as client:
            response = await client.put(load.node.rstrip("/") + path, json=load.model_dump())
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return LaunchReport.model_validate(response.json())

    async def _load(self, load: ShardLoad) -> int:
        key = self.key(load.set_name, load.shard)
        self._fetching.append(load)
        try:
            path = await asyncio.to_thread(self._fetch, load)
        except BaseException:
            self._fetching.remove(load)
            self._unrecord(load)
            raise
        self._fetching.remove(load)
        replaced, self._copies[key] = self._copies.get(key), load
        if replaced is not None:  # the shard comes again, maybe from another artifact
            await self._discard(replaced)
        spec = await asyncio.to_thread(load_shard, Path(path))
        if spec.shard != load.shard or spec.shards != load.shards:
            raise ShardFormatError(
                f"{load.artifact} holds shard {spec.shard} of {spec.shards}, "
                f"not {load.shard} of {load.shards}"
            )
        channel = await self._channel(load)
        mailbox = Mailbox()
        tier = self.devices[device_for(load, len(self.devices))]
        in_node = self._in_node if load.channel.kind in IN_NODE_CHANNELS else None
        executor = await asyncio.to_thread(
            ShardExecutor, spec, set_name=load.set_name, channel=channel, mailbox=mailbox,
            backend=tier.backend, in_node=in_node,
        )  # fmt: skip
        try:
            async with self._lock:
                if key in self.shards:
                    await self._drop(key)
                resident = tier.shards.place(
                    key, spec.weight_bytes, evicted=functools.partial(self._evicted, key)
                )
                self.shards[key] = _Loaded(
                    load, executor, channel, mailbox, spec.weight_bytes, tier, resident
                )
        except BaseException:
            executor.close()
            raise
        await channel.attach(load.set_name, load.shard, mailbox)
        return spec.weight_bytes

    def _fetch(self, load: ShardLoad) -> Path:
        """The shard's verified copy in the store, recorded in this node's ledger first, so a
        copy is never on disk unrecorded, and with no start-up sweep of another node on this
        store between the record and the fetch (worker thread)."""
        with self._ledger.recording(load.artifact, sha256=load.sha256):
            return self.store.fetch(load.artifact, sha256=load.sha256)

    def _unrecord(self, load: ShardLoad) -> None:
        """Take ``load``'s copy out of the ledger unless another shard kept or fetching here
        has the same record (URI and sha256)."""
        others = (*self._copies.values(), *self._fetching)
        if not any(_same_record(other, load) for other in others):
            self._ledger.forget(load.artifact, sha256=load.sha256)

    async def _channel(self, load: ShardLoad) -> Channel:
        config = load.channel
        if config.shared_memory:  # peers' messages, and the coordinator's calls on this host
            await self.link_server.start()
        if config.kind == "local":
            return self.local
        if config.kind == "direct":
            return DirectChannel(
                peers={(load.set_name, q): url for q, url in load.peers.items()},
                local=self.local,
                pools=self.peers,
                links=self.links if config.shared_memory else None,
                counts=self.link_counts,
            )
        ident = (config.kind, config.nats_url or "", str(config.durable), config.s3_endpoint or "",
                 config.s3_bucket or "")  # fmt: skip
        shared = self._shared.get(ident)
        if shared is None:
            if config.kind == "nats":
                if not config.nats_url:
                    raise ChannelUnavailable("nats", "(unset)", "no NATS URL configured")
                shared = NatsChannel(config.nats_url, durable=config.durable)
            else:
                if not (config.s3_endpoint and config.s3_bucket):
                    raise ChannelUnavailable("s3", "(unset)", "no S3 endpoint/bucket configured")
                shared = S3Channel(
                    endpoint_url=config.s3_endpoint, bucket=config.s3_bucket,
                    key=config.s3_key, secret=config.s3_secret,
                )  # fmt: skip
            await shared.start()
            self._shared[ident] = shared
        return shared

    # -- serving --------------------------------------------------------------------------

    def _in_node(self, set_name: str, shard: int) -> InNodePeer | None:
        """Shard ``shard`` of ``set_name`` if it is loaded on this node (any thread: one dict
        read). Its parts are filed in its mailbox, on its device."""
        found = self.shards.get(self.key(set_name, shard))
        if found is None or found.load.channel.kind not in IN_NODE_CHANNELS:
            return None
        return InNodePeer(found.mailbox, found.tier.backend)

    def loaded(self, set_name: str, shard: int) -> _Loaded:
        found = self.shards.get(self.key(set_name, shard))
        if found is None:
            raise ShardNotLoaded(set_name, shard)
        return found

    async def infer(
        self, set_name: str, shard: int, request_id: str, inputs: Array, *, timeout_s: float
    ) -> Array:
        key = self.key(set_name, shard)
        shard_state = self.loaded(set_name, shard)
        if not shard_state.tier.shards.hold(key, shard_state.resident):
            raise ShardNotLoaded(set_name, shard)
        shard_state.running += 1
        try:
            return await shard_state.executor.run(
                request_id, inputs, timeout_s=timeout_s, stall_s=min(self.stall_s, timeout_s)
            )
        except ChannelError:
            if shard_state.dropped:  # unloaded mid-request: its peers' sends were refused, so
                raise ShardNotLoaded(set_name, shard) from None  # the set must be relaunched
            raise
        finally:
            shard_state.running -= 1
            shard_state.tier.shards.unhold(key, shard_state.resident)
            if shard_state.dropped and shard_state.running == 0:
                await self._release(shard_state)

    def deliver(self, envelope: Envelope, values: Array) -> bool:
        """A direct-channel message for a shard on this node."""
        mailbox = self.local.mailboxes.get((envelope.set_name, envelope.dst))
        if mailbox is None:
            raise ShardNotLoaded(envelope.set_name, envelope.dst)
        return mailbox.deliver(envelope, values)

    def _deliver_notice(self, notice: dict[str, object], values: Array) -> int:
        """A message over a same-host link: 202 filed, 208 stale or a duplicate, 404."""
        envelope = envelope_from_notice(notice)
        try:
            return 202 if self.deliver(envelope, values) else 208
        except ShardNotLoaded:
            return 404

    async def _serve_call(self, notice: dict[str, object], inputs: Array) -> Outcome:
        """The coordinator's request to a shard over a same-host link (``kind: call``): the
        outcome the HTTP route answers, as the link carries it."""
        try:
            set_name, shard = str(notice["set_name"]), int(cast(int, notice["dst"]))
            request_id = str(notice["request_id"])
            timeout_s = float(cast(float, notice["timeout_s"]))
        except (KeyError, TypeError, ValueError) as e:
            return 400, json.dumps({"error": f"bad shard call: {e}"}).encode()
        try:
            return 200, await self.infer(set_name, shard, request_id, inputs, timeout_s=timeout_s)
        except ShardNotLoaded as e:
            return 404, json.dumps({"error": str(e), "reason": "ShardNotLoaded"}).encode()
        except ChannelError as e:
            headers = failure_headers(e)
            return 503, json.dumps({
                "error": str(e), "reason": type(e).__name__, "channel": e.channel,
                "shard": int(headers.get(SHARD_HEADER, shard)),
            }).encode()  # fmt: skip

    async def _endpoint_of(self, url: str) -> LinkEndpoint | None:
        """A peer node's same-host link endpoint, from its shard state (None: it answered that
        it has none). A 5xx or no answer raises (:func:`endpoint_in_state`): a failure that
        may pass, which the links try again. Bounded by the links' ``connect_timeout_s``, not
        a shorter bound of its own (a fixed 2 s here once undercut a longer setup bound)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(headers=headers, timeout=None) as client:
            response = await client.get(url.rstrip("/") + node.SHARDS)
        return endpoint_in_state(response.status_code, response.content)

    async def evict_set(self, set_name: str) -> list[int]:
        """Drop every shard of ``set_name`` on this node (a partial set serves nothing).

        A shard serving a request stays until a later eviction: its request finishes.
        """
        keys = [
            key
            for key, loaded in self.shards.items()
            if key.split("/", 1)[0] == set_name and loaded.running == 0
        ]
        for key in keys:
            await self._drop(key)
        return [int(k.split("/", 1)[1]) for k in keys]

    async def unload(self, set_name: str, shard: int) -> bool:
        """Drop the shard (False: it was not loaded) and delete this node's copy of its
        artifact, loaded or not (an evicted shard's, or a launch's that failed after its
        fetch), unless another shard uses the same blob (:meth:`_discard`)."""
        key = self.key(set_name, shard)
        loaded = key in self.shards
        if loaded:
            await self._drop(key)
        copy = self._copies.pop(key, None)
        if copy is not None:
            await self._discard(copy)
        return loaded

    async def _discard(self, load: ShardLoad) -> None:
        """Delete the store's copy of ``load``'s artifact and its URI's record, unless a shard
        kept here or a load fetching now uses the same URI (both stay) or the same blob by
        its sha256 under another URI (the blob stays). The check and the claim (the record's
        deletion and the blob's rename out of the cache, ``ArtifactStore.claim``) run on the
        event loop with no suspension between them, so no load here starts its fetch in
        between; a fetch under way in another thread (a model of the same bytes) keeps the
        blob too. Only the claimed file's deletion, which may take a while for a large blob,
        runs in a thread: by then no fetch can find it."""
        others = (*self._copies.values(), *self._fetching)
        if any(other.artifact == load.artifact for other in others):
            self._unrecord(load)
            return
        digest = load.sha256.lower() if load.sha256 is not None else None
        shared = digest is not None and any(
            other.sha256 is not None and other.sha256.lower() == digest for other in others
        )
        try:
            claimed = self.store.claim(load.artifact, sha256=load.sha256, blob=not shared)
        except OSError as e:  # a copy that cannot be deleted stays (and stays recorded)
            logger.warning("could not delete the copy of %s: %s", load.artifact, e)
            return
        self._unrecord(load)  # nothing of it is left in the cache
        if claimed is not None:
            try:
                await asyncio.to_thread(claimed.unlink, missing_ok=True)
            except OSError as e:  # the next store opened on this root deletes it
                logger.warning("could not delete the claimed copy %s: %s", claimed, e)

    def _evicted(self, key: str, resident: ShardResident) -> None:
        """The device tier evicted shard ``key`` (room for a model or another set): release
        it, and drop the rest of its set, which is useless without it."""
        loaded = self.shards.get(key)
        if loaded is None or loaded.resident is not resident:
            return  # we dropped it ourselves (or it was replaced): nothing more to do
        self.shards.pop(key)
        set_name = key.split("/", 1)[0]
        task = asyncio.get_running_loop().create_task(self._after_eviction(loaded, set_name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_eviction(self, loaded: _Loaded, set_name: str) -> None:
        try:
            await loaded.channel.detach(loaded.load.set_name, loaded.load.shard)
            loaded.dropped = True
            if loaded.running == 0:
                await self._release(loaded)
            await self.evict_set(set_name)
        except Exception as e:  # nobody awaits this task: say so here, not at garbage collection
            logger.warning("the cleanup after shard set %s was evicted failed: %s", set_name, e)

    async def _drop(self, key: str) -> None:
        loaded = self.shards.pop(key, None)
        if loaded is None:
            return
        loaded.tier.shards.drop(key)
        await loaded.channel.detach(loaded.load.set_name, loaded.load.shard)
        loaded.dropped = True
        if loaded.running == 0:  # else the last request on it releases it
            await self._release(loaded)

    async def _release(self, loaded: _Loaded) -> None:
        loaded.executor.close()

    async def close(self) -> None:
        await self._finish_cleanups()
        for key in list(self.shards):
            await self._drop(key)
        for channel in self._shared.values():
            await channel.close()
        self._shared.clear()
        await self.peers.close()
        await self.links.close()
        await self.link_server.close()
        self._ledger.close()  # its copies stay on disk until the next start sweeps them

    async def _finish_cleanups(self, *, timeout_s: float = 10.0) -> None:
        """Let the cleanups after an eviction still under way end before anything closes:
        they detach and release what the device tier evicted, and would otherwise run on
        closed channels after the host has gone. One that has not ended in ``timeout_s`` (a
        channel that does not answer) is cancelled: a shutdown never hangs on it."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()

    def state(self) -> dict[str, Any]:
        return {
            "device": self.devices[0].info.id,  # the largest
            "capacity_bytes": self.devices[0].tier.lru.capacity_bytes,  # models and shards
            "devices": {d.info.id: d.tier.lru.capacity_bytes for d in self.devices},
            "used_bytes": sum(loaded.nbytes for loaded in self.shards.values()),
            "shards": {
                k: {
                    "bytes": loaded.nbytes,
                    "running": loaded.running,
                    "device": loaded.tier.info.id,
                }
                for k, loaded in self.shards.items()
            },
            "link": endpoint.as_json() if (endpoint := self.link_server.endpoint) else None,
        }


def _settle(done: asyncio.Future[Array], output: Array | None, error: BaseException | None) -> None:
    """Resolve a request's future from its worker (event loop; it may have gone already)."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(cast(Array, output))


def _dropped(run: _Run, queued: concurrent.futures.Future[None]) -> None:
    """A trip the closing executor dropped unrun: its request fails (never waits forever)."""
    if queued.cancelled():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            run.loop.call_soon_threadsafe(
                _settle, run.done, None, RuntimeError("the shard closed before its request ended")
            )


def _same_record(a: ShardLoad, b: ShardLoad) -> bool:
    """Whether two loads' copies are one ledger record (the same URI and sha256)."""
    return a.artifact == b.artifact and (a.sha256 or "").lower() == (b.sha256 or "").lower()


def _subtree(load: ShardLoad) -> list[int]:
    return [load.shard, *(s for child in load.children for s in _subtree(child))]


def failure_headers(error: ChannelError) -> dict[str, str]:
    """The channel at fault and, where the error names one, the shard."""
    headers = {"X-Gpufaas-Channel": error.channel}
    if isinstance(error, ShardTimeout | ShardUnreachable):
        headers[SHARD_HEADER] = str(error.shard)
    return headers


def channel_failure(error: ChannelError) -> Response:
    return error_response(
        503, str(error), reason=type(error).__name__, headers=failure_headers(error)
    )


async def answer_infer(
    host: ShardHost, set_name: str, shard: int, body: bytes, headers: Mapping[str, str]
) -> Response:
    """One request on one shard; ``headers`` by lower-case name."""
    try:
        envelope, values = decode(body)
        timeout_s = float(headers.get(TIMEOUT_HEADER, "30"))
    except ValueError as e:
        return error_response(400, f"bad shard input: {e}", reason="InvalidRequest")
    request_id = headers.get(REQUEST_ID_HEADER) or envelope.request_id
    try:
        out = await host.infer(set_name, shard, request_id, values, timeout_s=timeout_s)
    except ShardNotLoaded as e:
        return error_response(404, str(e), reason="ShardNotLoaded")
    except ChannelError as e:
        return channel_failure(e)
    layers = len(host.loaded(set_name, shard).executor.ops)
    reply = Envelope(set_name, request_id, layers, shard, -1)
    return Response(encode(reply, out), media_type="application/octet-stream")


def answer_message(host: ShardHost, set_name: str, shard: int, body: bytes) -> Response:
    """A direct-channel message: 202 filed, 208 stale or a duplicate, 404 no such shard."""
    try:
        envelope, values = decode(body)
    except ValueError as e:
        return error_response(400, f"bad message frame: {e}", reason="InvalidRequest")
    if envelope.set_name != set_name or envelope.dst != shard:
        return error_response(400, "the frame is addressed elsewhere", reason="Misrouted")
    try:
        accepted = host.deliver(envelope, values)
    except ShardNotLoaded as e:
        return error_response(404, str(e), reason="ShardNotLoaded")
    return _ACCEPTED if accepted else _ALREADY


_ACCEPTED = Response(status_code=202)
_ALREADY = Response(status_code=208)


def shard_router(host: ShardHost) -> APIRouter:
    """The node's shard routes (see :mod:`gpufaas.core.sharding`); the two hot ones, messages
    and infer, are answered ahead of FastAPI by :class:`ShardFastPath` when it is installed."""
    router = APIRouter()

    @router.put(SHARD_PATH)
    async def launch(set_name: str, shard: int, load: ShardLoad) -> Response:
        if load.set_name != set_name or load.shard != shard:
            return error_response(
                400, f"the body loads {load.set_name}/{load.shard}, the path names "
                f"{set_name}/{shard}", reason="InvalidShardLoad",
            )  # fmt: skip
        report = await host.launch(load)
        return JSONResponse(report.model_dump())

    @router.delete(SHARD_PATH)
    async def unload(set_name: str, shard: int) -> Response:
        await host.unload(set_name, shard)
        return Response(status_code=204)

    @router.post(SHARD_INFER_PATH)
    async def infer(set_name: str, shard: int, request: Request) -> Response:
        try:
            body = await _body(request)
        except ValueError as e:
            return error_response(400, f"bad shard input: {e}", reason="InvalidRequest")
        return await answer_infer(host, set_name, shard, body, request.headers)

    @router.post(node.SHARD_MESSAGES)
    async def message(set_name: str, shard: int, request: Request) -> Response:
        try:
            body = await _body(request)
        except ValueError as e:
            return error_response(400, f"bad message frame: {e}", reason="InvalidRequest")
        return answer_message(host, set_name, shard, body)

    @router.get(node.SHARDS)
    async def state() -> JSONResponse:
        return JSONResponse(host.state())

    return router


_HOT_PATH = re.compile(
    "^" + node.SHARD.format(set_name="(?P<set_name>[^/]+)", shard="(?P<shard>[0-9]+)")
    + "/(?P<verb>messages|infer)$"
)  # fmt: skip


class ShardFastPath:
    """The shards' hot routes as a bare ASGI app in front of the node's FastAPI app: a
    direct-channel message or a shard request is answered without FastAPI's routing,
    dependency solving or Request object (each message costs the receiver ~0.35 ms of CPU
    through FastAPI here; bench/RESULTS.md). Everything else goes on to ``app``."""

    def __init__(self, app: ASGIApp, host: ShardHost) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = match_fast_post(scope, receive, path=_HOT_PATH, max_bytes=_MAX_FRAME_BYTES)
        if post is None:
            await self.app(scope, receive, send)
            return
        set_name, shard = post.match["set_name"], int(post.match["shard"])
        response: Response
        try:
            body = await post.read()
        except ProtocolError as e:
            response = error_response(e.status_code, str(e), reason="InvalidRequest")
        else:
            if post.match["verb"] == "messages":
                response = answer_message(self.host, set_name, shard, body)
            else:
                response = await answer_infer(self.host, set_name, shard, body, post.headers)
        await response(scope, receive, send)


async def _body(request: Request) -> bytes:
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ValueError("the sender went away mid-message") from None
    if len(body) > _MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds {_MAX_FRAME_BYTES}")
    return body


class LinkCollector(Collector):
    """A node's :class:`~gpufaas.core.hostlink.LinkCounts` on ``/metrics``, read at scrape
    time: ``gpufaas_shard_link_setups_total{result}`` (ok, failed, none) and
    ``gpufaas_shard_messages_total{path}`` (shm, inline, http, local: the direct channel's
    messages this node sent, by the path each took). Every label is exported from the start,
    at 0, so a reader's before-and-after difference needs no missing-label rule."""

    def __init__(self, counts: LinkCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield _counted(
            "gpufaas_shard_link_setups",
            "Same-host link setups to peer nodes, by outcome (failed: tried again later; none: "
            "another host, no endpoint or another release, so HTTP)",
            "result",
            self.counts.setups,
        )
        yield _counted(
            "gpufaas_shard_messages",
            "Direct-channel messages sent, by path (shm: values in the shared ring; inline: "
            "the ring was full, values on the link's socket; http; local: same node)",
            "path",
            self.counts.messages,
        )


def _counted(
    name: str, documentation: str, label: str, counts: dict[str, int]
) -> CounterMetricFamily:
    """One counter family, a sample per key of ``counts`` (read from a copy: the event loop
    may count meanwhile)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in list(counts.items()):
        family.add_metric([value], count)
    return family


def shard_host(
    runtime: NodeRuntime, *, token: str | None, registry: CollectorRegistry | None = None
) -> ShardHost:
    """A node's shard host: the runtime's artifact store; each shard lives in the tier of the
    device :func:`device_for` gives it (a shard runs on one device), beside its models. With
    ``registry``, its link counts are exported there (:class:`LinkCollector`)."""
    devices = sorted(runtime.devices.values(), key=lambda d: (-d.info.capacity_bytes, d.info.index))
    store = runtime.artifacts.store
    # A node that restarts has no record of the shard copies its last process kept: those
    # processes' ledgers do (ArtifactStore.sweep_ledgers). Before this node fetches anything.
    try:
        swept = store.sweep_ledgers()
    except OSError as e:  # the node serves all the same; the next start tries again
        logger.warning("could not delete the shard copies of nodes now gone: %s", e)
    else:
        if swept:
            logger.info("deleted %d shard copies that no running node keeps", len(swept))
    host = ShardHost(store=store, devices=devices, token=token)
    if registry is not None:
        registry.register(LinkCollector(host.link_counts))
    return host
