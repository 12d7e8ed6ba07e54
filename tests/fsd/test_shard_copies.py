"""A removed set's shard copies leave the nodes' artifact stores (mends, eighteenth session).

A node fetches each shard's artifact into its artifact store (verified against its sha256).
Before, those copies stayed after the set was removed, until someone emptied the store. Now
a shard's unload (``DELETE``, which the coordinator's remove sends) deletes the node's copy,
an evicted shard's too, unless another shard kept on the node uses the same blob.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from gpufaas.core.sharding import Parallelism, ShardLoad
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.shards import ShardHost
from gpufaas.scheduler.coordinator import Coordinator

TWO = Parallelism(shards=2, strategy="intra-layer", channel="direct")


def _blobs(node: Any) -> set[str]:
    return {p.name for p in (node.host.store.root / "blobs").iterdir()}


def _records(node: Any) -> set[str]:
    return {p.name for p in (node.host.store.root / "uris").glob("*.json")}


def _digests(coordinator: Coordinator, name: str, node: Any) -> set[str]:
    """The blobs of set ``name``'s shards placed on ``node``."""
    return {str(load.sha256) for load in coordinator.sets[name].loads if load.node == node.url}


async def test_a_removed_sets_copies_leave_each_node_unless_another_set_uses_the_blob(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    nodes = thread_nodes[:2]
    urls = [n.url for n in nodes]
    before = [(_blobs(n), _records(n)) for n in nodes]
    await coordinator.deploy("first", net, TWO, nodes=urls)
    await coordinator.deploy("twin", net, TWO, nodes=urls)  # the same split: the same bytes
    await coordinator.deploy("other", net, TWO, nodes=urls, method="random", seed=1)
    first = [_digests(coordinator, "first", n) for n in nodes]
    other = [_digests(coordinator, "other", n) for n in nodes]
    assert first == [_digests(coordinator, "twin", n) for n in nodes]
    for node, mine, theirs in zip(nodes, first, other, strict=True):
        assert mine and theirs and not mine & theirs
        assert mine | theirs <= _blobs(node)
    await coordinator.remove("first")
    for node, mine in zip(nodes, first, strict=True):
        assert mine <= _blobs(node)  # the twin set's shards use the same blobs: kept
    out = await coordinator.infer("twin", x)
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)
    await coordinator.remove("twin")
    for node, mine, theirs in zip(nodes, first, other, strict=True):
        assert not mine & _blobs(node)  # no set uses them now: gone
        assert theirs <= _blobs(node)  # another set's stay
    out = await coordinator.infer("other", x)
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)
    await coordinator.remove("other")
    assert [(_blobs(n), _records(n)) for n in nodes] == before  # nothing left behind
    assert not [p for n in nodes for p in n.host._ledger.folder.iterdir()]  # nor recorded


async def test_an_evicted_sets_copies_go_when_the_set_is_removed(
    thread_nodes: Any, coordinator: Coordinator, net: Any
) -> None:
    """A set evicted for another (its shards no longer loaded) keeps its copies, since it
    may come back; removing it deletes them all the same."""
    node = thread_nodes[0]
    node.shrink(int(net.weight_bytes * 1.2))
    await coordinator.deploy("a", net, TWO, nodes=[node.url])
    a = _digests(coordinator, "a", node)
    await coordinator.deploy("b", net, TWO, nodes=[node.url], method="random", seed=1)
    assert not any(key.startswith("a/") for key in node.host.shards)  # evicted
    assert a <= _blobs(node)  # its copies kept meanwhile
    await coordinator.remove("a")
    assert not a & _blobs(node)
    assert _digests(coordinator, "b", node) <= _blobs(node)


async def test_a_copy_a_load_is_fetching_or_a_kept_shard_uses_is_not_deleted(
    tmp_path: Any,
) -> None:
    """The rule itself, on one node's host: a copy goes only when no shard kept here and no
    load fetching now uses its blob (same sha256 under another URI, or the same URI)."""
    runtime = build_runtime(
        cpu_devices=1, device_memory_bytes=1 << 20, host_memory_bytes=1 << 20,
        artifact_dir=tmp_path / "node", disk_cache_bytes=0, force_cpu=True,
    )  # fmt: skip
    host = ShardHost(store=runtime.artifacts.store, devices=list(runtime.devices.values()))
    source = tmp_path / "a.safetensors"
    source.write_bytes(b"shard bytes")
    digest = hashlib.sha256(b"shard bytes").hexdigest()
    blob = host.store.fetch(source.as_uri(), sha256=digest)

    def load(set_name: str, uri: str, sha256: str | None) -> ShardLoad:
        return ShardLoad(set_name=set_name, shard=0, shards=1, artifact=uri, sha256=sha256,
                         node="http://n:1", peers={0: "http://n:1"})  # fmt: skip

    gone = load("gone", source.as_uri(), digest)
    try:
        host._fetching.append(load("coming", "s3://b/other-name", digest))
        await host._discard(gone)
        assert blob.is_file()  # a load fetching the same blob now
        host._fetching.clear()
        host._copies["kept/0"] = load("kept", source.as_uri(), None)
        await host._discard(gone)
        assert blob.is_file()  # a shard kept here from the same URI
        host._copies.clear()
        await host._discard(gone)
        assert not blob.is_file()
    finally:
        await host.close()
