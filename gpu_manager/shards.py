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

:class:`ShardHost` keeps the node's shards in a byte-bounded LRU, one entry per shard, and
evicts a whole shard set at once (a shard without its set is useless). Loads come as a tree:
a node loads its own shard while it forwards each child's load to that child's node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gpufaas.cache.lru import ByteLRU, CacheError
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
    S3Channel,
    ShardTimeout,
    ShardUnreachable,
    decode,
    encode,
)
from gpufaas.core.http import error_response
from gpufaas.core.layered import ShardFormatError, ShardSpec, apply_activation, load_shard, matrix
from gpufaas.core.sharding import (
    REQUEST_ID_HEADER,
    SHARD_HEADER,
    SHARD_INFER_PATH,
    SHARD_PATH,
    TIMEOUT_HEADER,
    ChannelConfig,
    LaunchReport,
    ShardLoad,
)

__all__ = ["ShardExecutor", "ShardHost", "ShardNotLoaded", "shard_router"]

logger = logging.getLogger(__name__)
_MAX_FRAME_BYTES = 1 << 30


class ShardNotLoaded(Exception):
    def __init__(self, set_name: str, shard: int) -> None:
        self.set_name = set_name
        self.shard = shard
        super().__init__(f"shard {shard} of {set_name} is not loaded on this node")


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One row group (boundary or interior) of a layer: its positions and its matrices."""

    positions: torch.Tensor
    own: torch.Tensor
    remote: dict[int, torch.Tensor]
    bias: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _LayerOps:
    rows: int
    groups: tuple[_Rows, ...]  # boundary rows first
    sources: tuple[int, ...]  # shards this layer reads from
    activation: str
    send_next: dict[int, torch.Tensor]  # receiver -> positions of this layer's output


def _rows_block(block: Any, keep: np.ndarray) -> torch.Tensor:
    """The rows ``keep`` (positions) of a COO block, as a torch matrix."""
    where = np.full(block.shape[0], -1, dtype=np.int64)
    where[keep] = np.arange(keep.size, dtype=np.int64)
    mask = where[block.rows] >= 0
    return matrix(
        where[block.rows[mask]], block.cols[mask], block.values[mask], (keep.size, block.shape[1])
    )


def prepare(spec: ShardSpec) -> list[_LayerOps]:
    ops = []
    for index, layer in enumerate(spec.layers):
        after = spec.layers[index + 1].send if index + 1 < len(spec.layers) else {}
        boundary = np.unique(np.concatenate([np.asarray(p) for p in after.values()])) if after \
            else np.zeros(0, dtype=np.int64)  # fmt: skip
        interior = np.setdiff1d(np.arange(layer.owned.size, dtype=np.int64), boundary)
        groups = []
        for keep in (boundary, interior):
            if keep.size == 0:
                continue
            groups.append(
                _Rows(
                    positions=torch.from_numpy(keep),
                    own=_rows_block(layer.own, keep),
                    remote={q: _rows_block(b, keep) for q, b in layer.remote.items()},
                    bias=torch.from_numpy(layer.bias[keep])[:, None],
                )
            )
        ops.append(
            _LayerOps(
                rows=int(layer.owned.size),
                groups=tuple(groups),
                sources=tuple(sorted(layer.remote)),
                activation=layer.activation,
                send_next={q: torch.from_numpy(np.asarray(p)) for q, p in after.items()},
            )
        )
    return ops


class ShardExecutor:
    """Runs requests through one shard; see the module docstring for the order of work."""

    def __init__(
        self, spec: ShardSpec, *, set_name: str, channel: Channel, mailbox: Mailbox
    ) -> None:
        self.spec = spec
        self.set_name = set_name
        self.channel = channel
        self.mailbox = mailbox
        self.ops = prepare(spec)
        self.first_sends = {q: torch.from_numpy(np.asarray(p)) for q, p in spec.layers[0].send.items()}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"shard-{set_name}-{spec.shard}"
        )

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

    async def _compute(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _send_all(
        self,
        request_id: str,
        layer: int,
        values: torch.Tensor,
        targets: dict[int, torch.Tensor],
        sends: asyncio.TaskGroup,
        timeout_s: float,
    ) -> None:
        for q, positions in targets.items():
            envelope = Envelope(self.set_name, request_id, layer, self.spec.shard, q)
            part = values.index_select(0, positions).numpy()
            sends.create_task(self.channel.send(envelope, part, timeout_s=timeout_s))

    async def _layers(
        self,
        request_id: str,
        inputs: Array,
        sends: asyncio.TaskGroup,
        *,
        deadline: float,
        stall_s: float,
    ) -> Array:
        loop = asyncio.get_running_loop()
        a = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self._send_all(request_id, 0, a, self.first_sends, sends, deadline - loop.time())
        for index, op in enumerate(self.ops):
            wait = min(stall_s, deadline - loop.time())
            incoming = [
                asyncio.ensure_future(self._receive(request_id, index, q, wait))
                for q in op.sources
            ]
            try:

                def send_boundary(out: torch.Tensor, layer: int = index + 1) -> None:
                    self._send_all(
                        request_id, layer, out, op.send_next, sends, deadline - loop.time()
                    )

                a = await self._layer(op, a, incoming, send_boundary)
            finally:
                for task in incoming:
                    task.cancel()
        return a.numpy()

    async def _receive(
        self, request_id: str, layer: int, src: int, timeout_s: float
    ) -> tuple[int, torch.Tensor]:
        envelope = Envelope(self.set_name, request_id, layer, src, self.spec.shard)
        values = await self.channel.receive(self.mailbox, envelope, timeout_s=timeout_s)
        return src, torch.from_numpy(np.ascontiguousarray(values))

    async def _layer(
        self,
        op: _LayerOps,
        a_prev: torch.Tensor,
        incoming: list[asyncio.Future[tuple[int, torch.Tensor]]],
        send_boundary: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        out = torch.empty((op.rows, a_prev.shape[1]), dtype=torch.float32)
        if op.rows == 0:
            for task in incoming:
                await task
            if op.send_next:
                send_boundary(out)
            return out
        # Own contributions first: they need nothing from the channel.
        partial = [await self._compute(lambda g=g: g.own @ a_prev) for g in op.groups]
        first, rest = op.groups[0], list(zip(op.groups[1:], partial[1:], strict=True))
        arrived = []
        for next_arrival in asyncio.as_completed(incoming):
            q, x = await next_arrival
            arrived.append((q, x))
            await self._compute(lambda q=q, x=x: partial[0].add_(first.remote[q] @ x))
        await self._compute(lambda: self._finish(out, first, partial[0], op.activation))
        if op.send_next:
            send_boundary(out)  # the rows other shards read next leave before the rest is done
        for g, z in rest:

            def complete(g: _Rows = g, z: torch.Tensor = z) -> torch.Tensor:
                for q, x in arrived:
                    z.add_(g.remote[q] @ x)
                return self._finish(out, g, z, op.activation)

            await self._compute(complete)
        return out

    def _finish(self, out: torch.Tensor, g: _Rows, z: torch.Tensor, activation: str) -> torch.Tensor:
        out[g.positions] = apply_activation(z + g.bias, activation, self.spec.ymax)
        return out
