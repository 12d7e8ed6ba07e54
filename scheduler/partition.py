"""Partitioning a layered net across shards, and what each partition costs in communication.

A partition gives every activation ``a_l`` (``l = 0..L``) an owner per neuron. Shard ``p``
computes the rows of ``W_l`` it owns; each value of ``a_{l-1}`` goes, once, to every other
shard owning a row that reads it. So the values exchanged per sample are, summed over
layers and columns, ``lambda(i) - 1``: the number of shards among the column's owner and the
owners of the rows reading it, minus one. That is the *connectivity - 1* metric of the
hypergraph with one net per column (its pins: the column's neuron and the rows reading it),
which is what :func:`hypergraph_partition` minimises with Mt-KaHyPar (FSD-Inference's model).

Partitioners:

* ``hypergraph``: one assignment for all layers (nets from every layer's pattern, identical
  nets merged with summed weights, so 120 layers of a RadiX-Net cost as much as its 8 or 10
  distinct patterns), balanced to ``epsilon``;
* ``random``: a balanced random permutation, the same for every layer;
* ``block``: contiguous blocks of each activation;
* ``layer`` (the pipeline strategy): shard ``p`` owns layers ``[pL/N, (p+1)L/N)`` whole.

Everything here is pure computation: no I/O, no clocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpufaas.core.layered import Block, LayeredNet, LayerShard, ShardSpec

__all__ = [
    "PARTITIONERS",
    "Partition",
    "PartitionError",
    "Volume",
    "communication",
    "partition",
    "split",
]

PARTITIONERS = ("hypergraph", "random", "block", "layer")
IntArray = NDArray[np.int64]
_VALUE_BYTES = 4  # float32 activations
_mtkahypar_lock = threading.Lock()
_mtkahypar: list[object] = []  # the process's one Mt-KaHyPar initializer, made on first use


class PartitionError(ValueError):
    """A split the net does not allow; the message names the field to change."""


@dataclasses.dataclass(frozen=True)
class Partition:
    method: str
    shards: int
    owners: tuple[IntArray, ...]  # one per activation a_0..a_L: the shard owning each neuron

    def owned(self, shard: int, activation: int) -> IntArray:
        return np.flatnonzero(self.owners[activation] == shard).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Volume:
    """Communication per inference of one sample (values scale with the batch)."""

    values: int  # activations exchanged between shards, summed over layers
    messages: int  # (layer, sender, receiver) triples with something to send
    per_layer: tuple[int, ...]

    @property
    def bytes_per_sample(self) -> int:
        return self.values * _VALUE_BYTES


def partition(
    net: LayeredNet, shards: int, *, method: str, seed: int = 0, epsilon: float = 0.03
) -> Partition:
    """Split ``net`` over ``shards`` with ``method`` (one of :data:`PARTITIONERS`)."""
    check_splittable(net, shards, method=method)
    if method == "layer":
        return _layer_partition(net, shards)
    if method == "block":
        return Partition(method, shards, tuple(_blocks(n, shards) for n in net.widths))
    if method == "random":
        rng = np.random.default_rng(seed)
        return _shared(net, method, shards, rng.permutation(_blocks(net.widths[0], shards)))
    if method == "hypergraph":
        return _shared(net, method, shards, _hypergraph(net, shards, seed=seed, epsilon=epsilon))
    raise PartitionError(f"parallelism partitioner {method!r} is not one of {PARTITIONERS}")


def check_splittable(net: LayeredNet, shards: int, *, method: str) -> None:
    """Reject splits that cannot work, naming the field (``parallelism.shards``)."""
    if shards < 1:
        raise PartitionError(f"parallelism.shards must be at least 1, not {shards}")
    if method == "layer" and shards > len(net.layers):
        raise PartitionError(
            f"parallelism.shards={shards} exceeds the net's {len(net.layers)} layers "
            "(strategy 'layer' gives each shard at least one layer)"
        )
    if method != "layer" and shards > min(net.widths):
        raise PartitionError(
            f"parallelism.shards={shards} exceeds the narrowest layer's {min(net.widths)} "
            "neurons (strategy 'intra-layer' gives each shard at least one row per layer)"
        )
    if method in ("random", "hypergraph") and len(set(net.widths)) != 1:
        raise PartitionError(
            f"partitioner {method!r} needs layers of one width (this net has {net.widths}); "
            "use 'block'"
        )


def communication(net: LayeredNet, part: Partition) -> Volume:
    """Values and messages exchanged between shards per sample (scatter and gather excluded)."""
    per_layer = []
    messages = 0
    for index, layer in enumerate(net.layers):
        src = part.owners[index][layer.cols]
        dst = part.owners[index + 1][layer.rows]
        crossing = src != dst
        # One value per (column, receiving shard), however many of its rows read it.
        pairs = np.unique(layer.cols[crossing] * part.shards + dst[crossing])
        per_layer.append(int(pairs.size))
        links = np.unique(src[crossing] * part.shards + dst[crossing])
        messages += int(links.size)
    return Volume(values=sum(per_layer), messages=messages, per_layer=tuple(per_layer))


def split(net: LayeredNet, part: Partition) -> list[ShardSpec]:
    """Each shard's rows, weights and send/receive lists (see :class:`ShardSpec`)."""
    return [_shard_spec(net, part, p) for p in range(part.shards)]


# -------------------------------------------------------------------------------------------


def _blocks(n: int, shards: int) -> IntArray:
    return (np.arange(n, dtype=np.int64) * shards) // n


def _shared(net: LayeredNet, method: str, shards: int, owners: IntArray) -> Partition:
    return Partition(method, shards, tuple(owners for _ in net.widths))


def _layer_partition(net: LayeredNet, shards: int) -> Partition:
    layers = len(net.layers)
    owner_of_layer = [(index * shards) // layers for index in range(layers)]
    # a_0 lives with the first layer's shard; a_l with the shard that computes it.
    owners = [np.full(net.widths[0], owner_of_layer[0], dtype=np.int64)]
    owners += [np.full(n, owner_of_layer[i], dtype=np.int64) for i, n in enumerate(net.widths[1:])]
    return Partition("layer", shards, tuple(owners))


def _nets(net: LayeredNet) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct nets over the shared neurons, each with how often it occurs."""
    patterns: dict[bytes, int] = {}
    first: dict[bytes, int] = {}
    for index, layer in enumerate(net.layers):
        key = hashlib.blake2b(layer.rows.tobytes() + layer.cols.tobytes()).digest()
        patterns[key] = patterns.get(key, 0) + 1
        first.setdefault(key, index)
    weights: dict[tuple[int, ...], int] = {}
    for key, count in patterns.items():
        layer = net.layers[first[key]]
        order = np.argsort(layer.cols, kind="stable")
        cols, rows = layer.cols[order], layer.rows[order]
        starts = np.searchsorted(cols, np.arange(layer.n_in + 1))
        for i in range(layer.n_in):
            readers = rows[starts[i] : starts[i + 1]]
            if readers.size == 0:
                continue
            pins = tuple(np.union1d(readers, [i]).tolist())
            if len(pins) > 1:
                weights[pins] = weights.get(pins, 0) + count
    return list(weights), list(weights.values())


def _hypergraph(net: LayeredNet, shards: int, *, seed: int, epsilon: float) -> IntArray:
    n = net.widths[0]
    if shards == 1:
        return np.zeros(n, dtype=np.int64)
    try:
        import mtkahypar
    except ImportError:
        raise PartitionError(
            "partitioner 'hypergraph' needs the mtkahypar package (pip install mtkahypar); "
            "or use 'block'"
        ) from None

    with _mtkahypar_lock:
        if not _mtkahypar:
            # One thread: the partitioner runs beside serving work on shared cores.
            _mtkahypar.append(mtkahypar.initialize(1))
        initializer: Any = _mtkahypar[0]
        nets, weights = _nets(net)
        context = initializer.context_from_preset(mtkahypar.PresetType.DEFAULT)
        context.set_partitioning_parameters(shards, epsilon, mtkahypar.Objective.KM1)
        context.logging = False
        mtkahypar.set_seed(seed)
        graph = initializer.create_hypergraph(context, n, len(nets), nets, [1] * n, weights)
        result = graph.partition(context)
        return np.array([result.block_id(v) for v in range(n)], dtype=np.int64)


def _coo_block(
    rows: IntArray, cols: IntArray, values: NDArray[np.float32], shape: tuple[int, int]
) -> Block:
    return Block(rows.astype(np.int64), cols.astype(np.int64), values.astype(np.float32), shape)


def _positions(owned: IntArray, n: int) -> IntArray:
    """Map global index -> position in ``owned`` (-1 where not owned)."""
    where = np.full(n, -1, dtype=np.int64)
    where[owned] = np.arange(owned.size, dtype=np.int64)
    return where


def _shard_spec(net: LayeredNet, part: Partition, p: int) -> ShardSpec:
    layers = []
    for index, layer in enumerate(net.layers):
        before, after = part.owners[index], part.owners[index + 1]
        owned_in, owned_out = part.owned(p, index), part.owned(p, index + 1)
        row_pos = _positions(owned_out, layer.n_out)
        in_pos = _positions(owned_in, layer.n_in)
        mine = after[layer.rows] == p
        rows, cols, values = layer.rows[mine], layer.cols[mine], layer.values[mine]
        src = before[cols]
        local = src == p
        own = _coo_block(
            row_pos[rows[local]], in_pos[cols[local]], values[local],
            (owned_out.size, owned_in.size),
        )  # fmt: skip
        remote: dict[int, Block] = {}
        for q in np.unique(src[~local]).tolist():
            from_q = src == q
            needed = np.unique(cols[from_q])  # the message from q: these a_{l-1}, in order
            remote[q] = _coo_block(
                row_pos[rows[from_q]], np.searchsorted(needed, cols[from_q]), values[from_q],
                (owned_out.size, needed.size),
            )  # fmt: skip
        send: dict[int, IntArray] = {}
        reads_mine = before[layer.cols] == p
        for q in range(part.shards):
            if q == p:
                continue
            wanted = reads_mine & (after[layer.rows] == q)
            if wanted.any():
                send[q] = in_pos[np.unique(layer.cols[wanted])]
        layers.append(
            LayerShard(
                owned=owned_out,
                bias=layer.bias[owned_out].astype(np.float32),
                activation=layer.activation,
                own=own,
                remote=remote,
                send=send,
            )
        )
    return ShardSpec(
        shard=p,
        shards=part.shards,
        inputs=part.owned(p, 0),
        layers=tuple(layers),
        ymax=net.ymax,
        widths=tuple(net.widths),
    )


def shard_sizes(specs: Sequence[ShardSpec]) -> list[int]:
    return [spec.weight_bytes for spec in specs]
