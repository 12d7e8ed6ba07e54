"""Layered networks that can be split across shards, and the shard artifact format.

A :class:`LayeredNet` is a stack of ``a_l = act(W_l a_{l-1} + b_l)`` layers whose weights may
be sparse (the Graph Challenge's sparse DNNs) or dense (an MLP). It is the unit FSD-Inference
splits: shard ``p`` computes the rows of every ``W_l`` that its partition gives it, and
exchanges with the other shards the activations their rows read.

:func:`radix_net` generates RadiX-Net-style sparse nets: the Kronecker product of a
radix-2 mixed-radix topology on ``n / 16`` "super-neurons" (layer ``l`` connects super-neuron
``a`` to ``a`` and ``a + 2^(l mod D)`` modulo ``n / 16``) with dense 16 x 16 blocks, so every
neuron reads exactly 32 others (the Graph Challenge's fan-in) and ``D = log2(n / 16)``
consecutive layers connect every input to every output. With ``weights="challenge"`` every
weight is 1/16 and the bias the challenge's (-0.3, -0.35, -0.4, -0.45 for 1,024 to 65,536
neurons), with activations clipped at 32 (the challenge's YMAX).

A :class:`ShardSpec` is what one shard needs and nothing more: for each layer, the rows it
owns, the weights of those rows split by where their inputs live (its own activations, or
each other shard's), the indices each other shard sends it, and the positions of its own
activations it must send on. :func:`save_shard` / :func:`load_shard` store it as safetensors
(tensors and JSON metadata, no pickled code).

:func:`save_net` / :func:`load_net` store a whole :class:`LayeredNet` the same way: the
artifact of a function with ``spec.parallelism``, which the gateway reads and splits. Layer
``i`` is ``l{i}.weight`` (dense, ``(n_out, n_in)``, as a torch ``Linear`` stores it) or
``l{i}.rows`` / ``l{i}.cols`` / ``l{i}.values`` (sparse, COO), plus ``l{i}.bias``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import load_file, save_file

__all__ = [
    "ACTIVATIONS",
    "Layer",
    "LayerShard",
    "LayeredNet",
    "ShardSpec",
    "TiledMatrix",
    "challenge_bias",
    "dense_mlp",
    "load_net",
    "load_shard",
    "product_matrix",
    "radix_net",
    "save_net",
    "save_shard",
    "tiled",
    "tiles_per_row",
    "tiles_whole",
]

ACTIVATIONS = ("relu", "none")
CHALLENGE_YMAX = 32.0
_BLOCK = 16  # the dense block of the Kronecker product: fan-in = 2 x 16 = 32
TILE = _BLOCK  # the tile of a shard's dense-tile products (TiledMatrix)
IntArray = NDArray[np.int64]


@dataclasses.dataclass(frozen=True)
class Layer:
    """``W`` as COO (``rows``, ``cols``, ``values``) of shape ``(n_out, n_in)``, plus a bias."""

    n_out: int
    n_in: int
    rows: IntArray
    cols: IntArray
    values: NDArray[np.float32]
    bias: NDArray[np.float32]
    activation: str = "relu"

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    def dense(self) -> NDArray[np.float32]:
        w = np.zeros((self.n_out, self.n_in), dtype=np.float32)
        w[self.rows, self.cols] = self.values
        return w


@dataclasses.dataclass(frozen=True)
class LayeredNet:
    layers: tuple[Layer, ...]
    ymax: float | None = None

    @property
    def widths(self) -> list[int]:
        return [self.layers[0].n_in, *(layer.n_out for layer in self.layers)]

    @property
    def weight_bytes(self) -> int:
        return sum(layer.nnz * 4 + layer.n_out * 4 for layer in self.layers)

    def forward(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """The unsharded reference: ``x`` is ``(batch, n_in)``, the result ``(batch, n_out)``."""
        a = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).T)
        for layer in self.layers:
            a = apply_activation(
                matrix(layer.rows, layer.cols, layer.values, (layer.n_out, layer.n_in)) @ a
                + torch.from_numpy(layer.bias)[:, None],
                layer.activation,
                self.ymax,
            )
        return np.ascontiguousarray(a.T.numpy())


def matrix(
    rows: IntArray, cols: IntArray, values: NDArray[np.float32], shape: tuple[int, int]
) -> torch.Tensor:
    """A torch matrix for ``W @ a``: CSR when sparse (under 20% filled), else dense."""
    size = shape[0] * shape[1]
    if size and rows.size / size < 0.2:
        coo = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])),
            torch.from_numpy(values),
            shape,
            check_invariants=False,  # built from in-range indices just above
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return coo.coalesce().to_sparse_csr()
    dense = torch.zeros(shape, dtype=torch.float32)
    if rows.size:
        dense[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(values)
    return dense


@dataclasses.dataclass(frozen=True)
class TiledMatrix:
    """``W`` as dense ``TILE x TILE`` tiles, ``k`` of them per row of tiles (rows with fewer
    padded with zero tiles; rows with none left out): ``W @ a`` gathers each tile row's ``k``
    input tiles side by side and multiplies them in one batched dense product
    (``torch.bmm``), so the arithmetic runs in dense micro-kernels instead of CSR's
    row-by-row loop. On one CPU thread this is 2.5-3x faster than CSR for a RadiX-Net shard
    whose 16 x 16 blocks stay whole (block and hypergraph splits; bench/RESULTS.md, "fsd,
    ninth session"). ``a``'s rows must be whole tiles: ``shape[1]`` is a multiple of
    ``TILE``."""

    tiles: torch.Tensor  # (tile rows kept, TILE, TILE * k)
    columns: torch.Tensor  # (tile rows kept * k,) the input tile each of them multiplies
    shape: tuple[int, int]
    kept: torch.Tensor | None = None  # the tile rows kept, where some have no tile at all

    @property
    def device(self) -> torch.device:
        return self.tiles.device

    def __matmul__(self, a: torch.Tensor) -> torch.Tensor:
        batch = a.shape[1]
        x = a.reshape(-1, TILE, batch).index_select(0, self.columns)
        y = torch.bmm(self.tiles, x.view(self.tiles.shape[0], self.tiles.shape[2], batch))
        if self.kept is None:
            return y.view(self.shape[0], batch)
        out = torch.zeros((self.shape[0] // TILE, TILE, batch), dtype=y.dtype, device=y.device)
        return out.index_copy_(0, self.kept, y).view(self.shape[0], batch)

    def to(self, device: torch.device) -> TiledMatrix:
        kept = self.kept.to(device) if self.kept is not None else None
        return TiledMatrix(self.tiles.to(device), self.columns.to(device), self.shape, kept)


def tiled(
    rows: IntArray, cols: IntArray, values: NDArray[np.float32], shape: tuple[int, int]
) -> TiledMatrix | None:
    """``W`` as a :class:`TiledMatrix` where that pays: both sides whole tiles, and at least
    half of the padded tiles' multiply-adds real ones (a partition that cuts the 16 x 16
    blocks, like a random one, leaves tiles mostly empty: CSR then). None otherwise."""
    if not rows.size or shape[0] % TILE or shape[1] % TILE:
        return None
    col_tiles = shape[1] // TILE
    pairs, slot = np.unique((rows // TILE) * col_tiles + cols // TILE, return_inverse=True)
    kept, per_row = np.unique(pairs // col_tiles, return_counts=True)
    k = int(per_row.max())
    if kept.size * k * TILE * TILE > 2 * rows.size:
        return None
    # each tile's place: its tile row among those kept, and its rank among that row's tiles
    # (pairs are sorted, so a row's tiles are consecutive)
    row_of = np.searchsorted(kept, pairs // col_tiles)
    rank = np.arange(pairs.size) - np.concatenate([[0], np.cumsum(per_row)[:-1]])[row_of]
    tiles = np.zeros((kept.size, TILE, TILE * k), dtype=np.float32)
    at = (row_of[slot], rows % TILE, rank[slot] * TILE + cols % TILE)
    np.add.at(tiles, at, values)
    columns = np.zeros((kept.size, k), dtype=np.int64)  # padding reads tile 0, times zeros
    columns[row_of, rank] = pairs % col_tiles
    every = kept.size == shape[0] // TILE
    return TiledMatrix(
        torch.from_numpy(tiles),
        torch.from_numpy(columns.reshape(-1)),
        shape,
        None if every else torch.from_numpy(kept.astype(np.int64)),
    )


# At most this many tiles per tile row run as tiles: RadiX-Net rows read 2 blocks; a dense
# layer (an MLP's) would gather its whole input once per tile row, so it stays dense.
MAX_TILES_PER_ROW = 4


def product_matrix(
    rows: IntArray, cols: IntArray, values: NDArray[np.float32], shape: tuple[int, int]
) -> torch.Tensor | TiledMatrix:
    """The fastest form of ``W`` for ``W @ a`` on a shard: dense tiles where they pay
    (:func:`tiled`) and a tile row reads at most ``MAX_TILES_PER_ROW`` tiles, else dense
    when over 20% filled, else CSR (:func:`matrix`)."""
    found = tiled(rows, cols, values, shape)
    if found is not None and found.tiles.shape[2] <= MAX_TILES_PER_ROW * TILE:
        return found
    return matrix(rows, cols, values, shape)


def tiles_per_row(layer: Layer) -> int:
    """The most ``TILE x TILE`` tiles one tile row of ``layer``'s weights reads (0 if its
    sides are not whole tiles): a shard's products of a layer run as tiles where its
    partition keeps the tiles whole (:func:`tiles_whole`) and this is at most
    ``MAX_TILES_PER_ROW`` (:func:`product_matrix`)."""
    if not layer.nnz or layer.n_out % TILE or layer.n_in % TILE:
        return 0
    pairs = np.unique((layer.rows // TILE) * (layer.n_in // TILE) + layer.cols // TILE)
    return int(np.bincount(pairs // (layer.n_in // TILE)).max())


def tiles_whole(owners: IntArray) -> bool:
    """Whether a partition of one activation keeps every ``TILE`` consecutive neurons on one
    shard: then a RadiX-Net row's input blocks stay whole in every product that reads it,
    which the cost model charges at the tiles' rate."""
    return owners.size % TILE == 0 and bool(
        (owners.reshape(-1, TILE) == owners.reshape(-1, TILE)[:, :1]).all()
    )


def apply_activation(z: torch.Tensor, activation: str, ymax: float | None) -> torch.Tensor:
    if activation == "relu":
        z = torch.relu(z)
    if ymax is not None:
        z = torch.clamp(z, max=ymax)
    return z


def challenge_bias(neurons: int) -> float:
    """The Graph Challenge's bias for its 1,024 / 4,096 / 16,384 / 65,536-neuron nets."""
    return {1024: -0.3, 4096: -0.35, 16384: -0.4, 65536: -0.45}.get(neurons, -0.3)


def radix_net(
    neurons: int,
    layers: int,
    *,
    weights: str = "challenge",
    seed: int = 0,
    stride: int | None = None,
) -> LayeredNet:
    """A RadiX-Net-style sparse net (see the module docstring); ``neurons`` a power of two >= 64.

    ``weights="random"`` draws weights in [-1, 1) / 16 and biases in [-0.1, 0.1) instead of the
    challenge's constants, so that a wrong index anywhere changes the output (used to check
    sharded execution).

    ``stride`` gives every layer the same stride (a power of two below ``neurons / 16``)
    instead of the RadiX pattern's ``2^(l mod D)``: the cost model's message split
    (``scheduler/costmodel.message_split``), where a block split's traffic per layer is set
    by the stride alone and the weights per layer stay the same.
    """
    supers = neurons // _BLOCK
    if neurons < 4 * _BLOCK or neurons & (neurons - 1):
        raise ValueError(f"neurons must be a power of two >= {4 * _BLOCK}, not {neurons}")
    if stride is not None and (stride < 1 or stride >= supers or stride & (stride - 1)):
        raise ValueError(f"stride must be a power of two below {supers}, not {stride}")
    digits = int(math.log2(supers))
    rng = np.random.default_rng(seed)
    j = np.arange(neurons, dtype=np.int64)
    built = []
    for index in range(layers):
        step = stride if stride is not None else 1 << (index % digits)
        # Row j (super a, offset d) reads supers a and a + stride, all 16 neurons of each.
        a = j // _BLOCK
        reads = np.stack([a, (a + step) % supers])  # (2, n)
        cols = (reads[:, :, None] * _BLOCK + np.arange(_BLOCK)[None, None, :]).transpose(1, 0, 2)
        cols = cols.reshape(neurons, 2 * _BLOCK)
        rows = np.repeat(j, 2 * _BLOCK)
        if weights == "challenge":
            values = np.full(rows.size, 1 / 16, dtype=np.float32)
            bias = np.full(neurons, challenge_bias(neurons), dtype=np.float32)
        else:
            values = (rng.uniform(-1, 1, rows.size) / 16).astype(np.float32)
            bias = rng.uniform(-0.1, 0.1, neurons).astype(np.float32)
        built.append(Layer(neurons, neurons, rows, cols.reshape(-1), values, bias))
    return LayeredNet(tuple(built), ymax=CHALLENGE_YMAX if weights == "challenge" else None)


def dense_mlp(widths: Sequence[int], *, seed: int = 0) -> LayeredNet:
    """A dense MLP with ReLU between layers and none after the last."""
    rng = np.random.default_rng(seed)
    built = []
    for index, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        rows = np.repeat(np.arange(n_out, dtype=np.int64), n_in)
        cols = np.tile(np.arange(n_in, dtype=np.int64), n_out)
        scale = 1 / math.sqrt(n_in)
        values = rng.uniform(-scale, scale, rows.size).astype(np.float32)
        bias = rng.uniform(-0.1, 0.1, n_out).astype(np.float32)
        last = index == len(widths) - 2
        built.append(Layer(n_out, n_in, rows, cols, values, bias, "none" if last else "relu"))
    return LayeredNet(tuple(built))


# -------------------------------------------------------------------------------------------
# What one shard holds
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """A weight block in COO with local row and column indices."""

    rows: IntArray
    cols: IntArray
    values: NDArray[np.float32]
    shape: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class LayerShard:
    """Shard ``p``'s part of layer ``l``.

    ``own``: weights of its rows over its own ``a_{l-1}`` (columns are positions in the
    shard's owned ``a_{l-1}`` indices). ``remote[q]``: weights over the values shard ``q``
    sends (columns are positions in that message). ``send[q]``: positions of the shard's own
    ``a_{l-1}`` that ``q`` needs for this layer, in the order ``q`` expects them.
    """

    owned: IntArray  # global indices of a_l this shard computes
    bias: NDArray[np.float32]
    activation: str
    own: Block
    remote: Mapping[int, Block]
    send: Mapping[int, IntArray]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    shard: int
    shards: int
    inputs: IntArray  # global indices of a_0 this shard receives from the caller
    layers: tuple[LayerShard, ...]
    ymax: float | None
    widths: tuple[int, ...]

    @property
    def outputs(self) -> IntArray:
        return self.layers[-1].owned

    @property
    def weight_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.own.values.nbytes + layer.bias.nbytes
            total += sum(b.values.nbytes for b in layer.remote.values())
        return total


def save_shard(path: Path, spec: ShardSpec) -> None:
    """Write ``spec`` as one safetensors file (tensors plus JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {"inputs": torch.from_numpy(spec.inputs)}
    layers_meta = []
    for index, layer in enumerate(spec.layers):
        prefix = f"l{index}"
        tensors[f"{prefix}.owned"] = torch.from_numpy(layer.owned)
        tensors[f"{prefix}.bias"] = torch.from_numpy(layer.bias)
        blocks = {"own": layer.own, **{f"from{q}": b for q, b in layer.remote.items()}}
        for name, block in blocks.items():
            tensors[f"{prefix}.{name}.rows"] = torch.from_numpy(block.rows)
            tensors[f"{prefix}.{name}.cols"] = torch.from_numpy(block.cols)
            tensors[f"{prefix}.{name}.values"] = torch.from_numpy(block.values)
        for q, positions in layer.send.items():
            tensors[f"{prefix}.to{q}"] = torch.from_numpy(positions)
        layers_meta.append(
            {
                "activation": layer.activation,
                "own_shape": list(layer.own.shape),
                "remote": {str(q): list(b.shape) for q, b in layer.remote.items()},
                "send": sorted(layer.send),
            }
        )
    metadata = {
        "format": "gpufaas.shard/v1",
        "shard": spec.shard,
        "shards": spec.shards,
        "ymax": spec.ymax,
        "widths": list(spec.widths),
        "layers": layers_meta,
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"gpufaas": json.dumps(metadata)},
    )


class ShardFormatError(ValueError):
    """A file that is not a shard artifact this version can read."""


def load_shard(path: Path) -> ShardSpec:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("gpufaas")
    if raw is None:
        raise ShardFormatError(f"{path} has no gpufaas shard metadata")
    meta = json.loads(raw)
    if meta.get("format") != "gpufaas.shard/v1":
        raise ShardFormatError(f"{path}: unknown shard format {meta.get('format')!r}")
    t = {k: v.numpy() for k, v in load_file(str(path)).items()}

    def block(prefix: str, shape: Sequence[int]) -> Block:
        return Block(
            t[f"{prefix}.rows"], t[f"{prefix}.cols"], t[f"{prefix}.values"], (shape[0], shape[1])
        )

    layers = []
    for index, lm in enumerate(meta["layers"]):
        prefix = f"l{index}"
        layers.append(
            LayerShard(
                owned=t[f"{prefix}.owned"],
                bias=t[f"{prefix}.bias"],
                activation=lm["activation"],
                own=block(f"{prefix}.own", lm["own_shape"]),
                remote={int(q): block(f"{prefix}.from{q}", s) for q, s in lm["remote"].items()},
                send={int(q): t[f"{prefix}.to{q}"] for q in lm["send"]},
            )
        )
    return ShardSpec(
        shard=int(meta["shard"]),
        shards=int(meta["shards"]),
        inputs=t["inputs"],
        layers=tuple(layers),
        ymax=meta["ymax"],
        widths=tuple(meta["widths"]),
    )


# -------------------------------------------------------------------------------------------
# A whole net as an artifact (what a sharded function's spec.model.uri points at)
# -------------------------------------------------------------------------------------------

NET_FORMAT = "gpufaas.layered/v1"


def save_net(path: Path, net: LayeredNet) -> None:
    """Write ``net`` as one safetensors file: sparse layers as COO, full ones as ``weight``."""
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = []
    for index, layer in enumerate(net.layers):
        prefix = f"l{index}"
        if layer.nnz == layer.n_out * layer.n_in:
            tensors[f"{prefix}.weight"] = torch.from_numpy(layer.dense())
        else:
            tensors[f"{prefix}.rows"] = torch.from_numpy(layer.rows)
            tensors[f"{prefix}.cols"] = torch.from_numpy(layer.cols)
            tensors[f"{prefix}.values"] = torch.from_numpy(layer.values)
        tensors[f"{prefix}.bias"] = torch.from_numpy(layer.bias)
        layers_meta.append(
            {"n_out": layer.n_out, "n_in": layer.n_in, "activation": layer.activation}
        )
    metadata = {"format": NET_FORMAT, "ymax": net.ymax, "layers": layers_meta}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"gpufaas": json.dumps(metadata)},
    )


def load_net(path: Path) -> LayeredNet:
    """Read a net :func:`save_net` wrote; :class:`ShardFormatError` names what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("gpufaas")
        t = {k: v.numpy() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise ShardFormatError(f"{path.name} is not a safetensors file: {e}") from None
    if raw is None:
        raise ShardFormatError(
            f"{path.name} has no gpufaas metadata: a sharded function's artifact is a "
            f"{NET_FORMAT} safetensors file (gpufaas.core.layered.save_net)"
        )
    meta = json.loads(raw)
    if meta.get("format") != NET_FORMAT:
        raise ShardFormatError(f"{path.name}: format {meta.get('format')!r}, not {NET_FORMAT}")
    layers = []
    for index, lm in enumerate(meta["layers"]):
        prefix = f"l{index}"
        n_out, n_in = int(lm["n_out"]), int(lm["n_in"])
        try:
            bias = t[f"{prefix}.bias"].astype(np.float32)
            if f"{prefix}.weight" in t:
                weight = t[f"{prefix}.weight"].astype(np.float32)
                if weight.shape != (n_out, n_in):
                    raise ShardFormatError(
                        f"{path.name}: {prefix}.weight is {list(weight.shape)}, not {[n_out, n_in]}"
                    )
                rows = np.repeat(np.arange(n_out, dtype=np.int64), n_in)
                cols = np.tile(np.arange(n_in, dtype=np.int64), n_out)
                values = weight.reshape(-1)
            else:
                rows = t[f"{prefix}.rows"].astype(np.int64)
                cols = t[f"{prefix}.cols"].astype(np.int64)
                values = t[f"{prefix}.values"].astype(np.float32)
        except KeyError as e:
            raise ShardFormatError(f"{path.name}: layer {index} has no tensor {e}") from None
        if bias.shape != (n_out,) or not (rows.shape == cols.shape == values.shape):
            raise ShardFormatError(f"{path.name}: layer {index}'s tensors disagree in shape")
        if rows.size and (rows.min() < 0 or rows.max() >= n_out or cols.min() < 0
                          or cols.max() >= n_in):  # fmt: skip
            raise ShardFormatError(f"{path.name}: layer {index} indexes outside its shape")
        if lm["activation"] not in ACTIVATIONS:
            raise ShardFormatError(f"{path.name}: unknown activation {lm['activation']!r}")
        layers.append(Layer(n_out, n_in, rows, cols, values, bias, lm["activation"]))
    if not layers or any(a.n_out != b.n_in for a, b in itertools.pairwise(layers)):
        raise ShardFormatError(f"{path.name}: layer widths do not chain")
    return LayeredNet(tuple(layers), ymax=meta.get("ymax"))
