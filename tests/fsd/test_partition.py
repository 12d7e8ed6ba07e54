"""Partitioners: balance, validation, and the communication volume each one costs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.core.layered import Layer, LayeredNet, dense_mlp, radix_net
from gpufaas.scheduler.partition import PartitionError, communication, partition, split


def test_hypergraph_sends_at_least_3x_fewer_bytes_than_random_on_the_4096_neuron_net() -> None:
    net = radix_net(4096, 120)
    for shards in (2, 4):
        hyper = communication(net, partition(net, shards, method="hypergraph"))
        rand = communication(net, partition(net, shards, method="random", seed=1))
        assert rand.bytes_per_sample >= 3 * hyper.bytes_per_sample, (shards, hyper, rand)


@pytest.mark.parametrize("method", ["hypergraph", "random", "block"])
def test_intra_layer_partitions_are_balanced(method: str) -> None:
    net = radix_net(1024, 12)
    part = partition(net, 4, method=method)
    for owners in part.owners:
        counts = np.bincount(owners, minlength=4)
        assert counts.max() <= 1.03 * 1024 / 4 + 1
        assert counts.min() > 0


def test_layer_strategy_gives_each_shard_whole_consecutive_layers() -> None:
    net = radix_net(256, 8)
    part = partition(net, 4, method="layer")
    owners_per_activation = [int(np.unique(o)[0]) for o in part.owners]
    assert all(len(np.unique(o)) == 1 for o in part.owners)
    assert owners_per_activation == sorted(owners_per_activation)
    # Only the 3 boundaries between shards move activations: one full vector each.
    assert communication(net, part).values == 3 * 256


def test_a_split_the_net_cannot_take_is_rejected_naming_the_field() -> None:
    mlp = dense_mlp([8, 4, 2])
    with pytest.raises(PartitionError, match=r"parallelism\.shards=3 exceeds the narrowest"):
        partition(mlp, 3, method="block")
    with pytest.raises(PartitionError, match=r"parallelism\.shards=3 exceeds the net's 2 layers"):
        partition(mlp, 3, method="layer")
    with pytest.raises(PartitionError, match="layers of one width"):
        partition(mlp, 2, method="hypergraph")


def _sent_values(net: LayeredNet, shards: int, method: str) -> int:
    """Values the shard specs actually send each other (per sample)."""
    total = 0
    for spec in split(net, partition(net, shards, method=method, seed=3)):
        total += sum(int(p.size) for layer in spec.layers for p in layer.send.values())
    return total


@pytest.mark.parametrize("method", ["hypergraph", "random", "block", "layer"])
def test_the_volume_reported_is_what_the_shards_send(method: str) -> None:
    net = radix_net(256, 10)
    part = partition(net, 4, method=method, seed=3)
    assert communication(net, part).values == _sent_values(net, 4, method)


@st.composite
def sparse_nets(draw: st.DrawFn) -> LayeredNet:
    width = draw(st.integers(4, 24))
    depth = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(depth):
        mask = rng.random((width, width)) < draw(st.floats(0.05, 0.6))
        rows, cols = np.nonzero(mask)
        layers.append(
            Layer(
                width, width, rows.astype(np.int64), cols.astype(np.int64),
                rng.uniform(-1, 1, rows.size).astype(np.float32),
                rng.uniform(-0.1, 0.1, width).astype(np.float32),
            )
        )  # fmt: skip
    return LayeredNet(tuple(layers))


@settings(max_examples=40, deadline=None)
@given(net=sparse_nets(), shards=st.integers(1, 4), method=st.sampled_from(["random", "block"]))
def test_volume_equals_sent_values_for_any_sparse_net(
    net: LayeredNet, shards: int, method: str
) -> None:
    part = partition(net, shards, method=method, seed=3)
    assert communication(net, part).values == _sent_values(net, shards, method)
