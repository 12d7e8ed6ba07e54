"""The direct channel's pools (core/peerhttp.py PeerPools: one pool per peer, shared by a node's
shards) and the node's fast path for shard messages (gpu_manager/shards.py ShardFastPath),
against real shard nodes on loopback. The pooled client itself: tests/scheduler/test_transport.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.core.channels import Envelope, encode, message_path
from gpufaas.core.layered import radix_net
from gpufaas.core.peerhttp import PeerPool, PeerPools
from gpufaas.core.sharding import Parallelism
from gpufaas.scheduler.coordinator import Coordinator


@pytest.fixture
async def loaded(thread_nodes: Any, tmp_path: Path) -> Any:
    """A 2-shard set on two nodes; yields (nodes, coordinator)."""
    coordinator = Coordinator(artifact_base=str(tmp_path / "shards"), timeout_s=20)
    net = radix_net(256, 4, weights="random", seed=1)
    await coordinator.deploy(
        "s", net, Parallelism(shards=2, strategy="intra-layer", channel="direct"),
        nodes=[n.url for n in thread_nodes[:2]],
    )  # fmt: skip
    yield thread_nodes, coordinator, net
    await coordinator.close()


def _frame(request: str, dst: int = 1) -> bytes:
    return encode(Envelope("s", request, 1, 0, dst), np.ones((4, 2), np.float32))


async def test_messages_to_a_peer_reuse_one_connection(loaded: Any) -> None:
    nodes, _, _ = loaded
    pools = PeerPools()
    try:
        for i in range(20):
            reply = await pools.to(nodes[1].url).post(
                message_path("s", 1), _frame(f"r{i}"), timeout_s=5
            )
            assert reply.status == 202
        assert pools.to(nodes[1].url).connects == 1  # kept alive, not one per message
    finally:
        await pools.close()


async def test_the_fast_path_files_messages_and_refuses_bad_ones(loaded: Any) -> None:
    nodes, _, _ = loaded
    pool = PeerPool(nodes[1].url)
    try:
        path = message_path("s", 1)
        assert (await pool.post(path, _frame("r"), timeout_s=5)).status == 202
        assert (await pool.post(path, _frame("r"), timeout_s=5)).status == 208  # a duplicate
        bad = await pool.post(path, b"\x01", timeout_s=5)
        assert bad.status == 400 and b"frame" in bad.body
        misrouted = await pool.post(path, _frame("r", dst=0), timeout_s=5)
        assert misrouted.status == 400 and misrouted.headers["x-gpufaas-reason"] == "Misrouted"
        missing = await pool.post(message_path("s", 7), _frame("r", dst=7), timeout_s=5)
        assert missing.status == 404
    finally:
        await pool.close()


async def test_shard_requests_through_the_fast_path_match_the_reference(loaded: Any) -> None:
    _, coordinator, net = loaded
    x = np.random.default_rng(3).random((3, 256)).astype(np.float32)
    np.testing.assert_allclose(
        await coordinator.infer("s", x), net.forward(x), rtol=1e-5, atol=1e-5
    )
