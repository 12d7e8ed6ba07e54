"""Shards of one set on one node: placed on distinct devices, exchanging device to device.

A node with several devices puts a set's shards on distinct devices (``device_for``), and a
shard hands a partial result to a shard on its own node through the device layer
(``DeviceBackend.hand_over`` / ``take_over``: on CPU devices the tensor itself), filed in
the receiver's mailbox under the same request-id, staleness and deadline rules as a channel
message, with no channel message at all. The CUDA peer copy behind the same two calls is not
run here (no GPU).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gpufaas.core import node
from gpufaas.core.channels import DirectChannel, Envelope, LocalChannel, Mailbox, ShardTimeout
from gpufaas.core.sharding import Handed, Parallelism, ShardLoad
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.shards import InNodePeer, ShardExecutor, device_for
from gpufaas.scheduler.coordinator import Coordinator
from gpufaas.scheduler.partition import partition, split


def _load(shard: int, peers: dict[int, str], node_url: str) -> ShardLoad:
    return ShardLoad(
        set_name="s", shard=shard, shards=len(peers), artifact="file:///x", node=node_url,
        peers=peers,
    )  # fmt: skip


def test_a_sets_shards_on_one_node_take_distinct_devices_in_rank_order() -> None:
    a, b = "http://a", "http://b"
    peers = {0: a, 1: b, 2: a, 3: b, 4: a}  # p mod 2, as the coordinator places them
    assert [device_for(_load(p, peers, peers[p]), 2) for p in range(5)] == [0, 0, 1, 1, 0]
    assert [device_for(_load(p, peers, peers[p]), 4) for p in range(5)] == [0, 0, 1, 1, 2]
    assert device_for(_load(0, {0: a, 1: b}, a), 3) == 0  # alone on its node: the largest


class _Spy:
    """Every channel message the direct channel sends and every in-node hand-over, as
    (sender, receiver) pairs, from whichever node thread makes them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[int, int]] = []
        self.handed: list[tuple[int, int, str, str]] = []
        self._lock = threading.Lock()
        send, hand_over = DirectChannel.send, CpuBackend.hand_over
        spy = self

        async def counted_send(
            self: DirectChannel, envelope: Envelope, values: Any, **kw: Any
        ) -> None:
            with spy._lock:
                spy.sent.append((envelope.src, envelope.dst))
            await send(self, envelope, values, **kw)

        def counted_hand_over(self: CpuBackend, values: torch.Tensor, *, to: Any) -> Handed:
            handed = hand_over(self, values, to=to)
            with spy._lock:  # no copy on CPU devices: the receiver reads the sender's tensor
                spy.handed.append((values.data_ptr(), handed.values.data_ptr(), self.info.id,
                                   to.info.id))  # fmt: skip
            return handed

        monkeypatch.setattr(DirectChannel, "send", counted_send)
        monkeypatch.setattr(CpuBackend, "hand_over", counted_hand_over)


@pytest.mark.parametrize(("shards", "nodes"), [(2, 1), (4, 1), (4, 2)])
async def test_shards_on_one_node_exchange_device_to_device_and_match_the_reference(
    two_device_nodes: Any,
    coordinator: Coordinator,
    net: Any,
    x: np.ndarray,
    shards: int,
    nodes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--cpu-devices 2``: N = 2 and N = 4 on one node and N = 4 on two. The in-node pairs
    send no channel message (their parts go through the device layer, between distinct
    devices where the node has them), the pairs across nodes do; the output is the
    unsharded reference's. With the in-node path removed, every pair is a channel message."""
    spy = _Spy(monkeypatch)
    urls = [n.url for n in two_device_nodes[:nodes]]
    await coordinator.deploy(
        "radix", net, Parallelism(shards=shards, strategy="intra-layer", channel="direct"),
        nodes=urls, method="block",
    )  # fmt: skip
    for _ in range(2):  # a second request: fresh request id, the same path
        np.testing.assert_allclose(
            await coordinator.infer("radix", x), net.forward(x), rtol=1e-5, atol=1e-5
        )
    async with httpx.AsyncClient(timeout=10) as client:
        states = [(await client.get(url + node.SHARDS)).json() for url in urls]
    placed = {
        int(key.split("/")[1]): (where, shard["device"])
        for where, state in enumerate(states)
        for key, shard in state["shards"].items()
    }
    # p on node p mod M, then the node's devices in rank order: distinct while there are two
    assert placed == {p: (p % nodes, f"cpu:{(p // nodes) % 2}") for p in range(shards)}
    same_node = {(p, q) for p in range(shards) for q in range(shards)
                 if p != q and p % nodes == q % nodes}  # fmt: skip
    assert not same_node & set(spy.sent), "an in-node pair went through the channel"
    assert bool(spy.sent) == (nodes > 1)  # across nodes: the channel, as before
    handed_pairs = {(placed_on, to) for _, _, placed_on, to in spy.handed}
    assert handed_pairs & {("cpu:0", "cpu:1"), ("cpu:1", "cpu:0")}  # between distinct devices
    assert handed_pairs <= {(placed[p][1], placed[q][1]) for p, q in same_node}
    assert all(src == dst for src, dst, _, _ in spy.handed)  # the tensor itself: no copy


def _pair(net: Any) -> tuple[list[Any], list[Mailbox], list[ShardExecutor]]:
    """Two shards of ``net`` on two CPU devices of one node, wired by the in-node path only
    (a channel with no receivers: any channel message would fail)."""
    specs = split(net, partition(net, 2, method="block"))
    backends = [CpuBackend(info) for info in cpu_devices(2, device_memory=1 << 30)]
    mailboxes = [Mailbox(), Mailbox()]
    peers = {
        ("net", p): InNodePeer(mailboxes[p], backends[p]) for p in range(2)
    }  # fmt: skip
    executors = [
        ShardExecutor(
            spec,
            set_name="net",
            channel=LocalChannel(),
            mailbox=mailboxes[spec.shard],
            backend=backends[spec.shard],
            in_node=lambda s, q: peers.get((s, q)),
        )
        for spec in specs
    ]
    return specs, mailboxes, executors


async def test_in_node_parts_keep_the_request_id_rules_stale_ones_are_dropped(net: Any) -> None:
    """Two requests in a row on one node's two devices: each matches the reference, and a
    part handed over for the finished first request is dropped as stale by the receiver's
    mailbox (never mixed into the second)."""
    specs, mailboxes, executors = _pair(net)
    rng = np.random.default_rng(3)
    try:
        for request in ("r1", "r2"):
            xs = rng.random((3, 512)).astype(np.float32)
            outs = await asyncio.gather(*(
                e.run(request, xs.T[s.inputs], timeout_s=10)
                for e, s in zip(executors, specs, strict=True)
            ))  # fmt: skip
            y = np.zeros((512, 3), dtype=np.float32)
            for spec, out in zip(specs, outs, strict=True):
                y[spec.outputs] = out
            np.testing.assert_allclose(y.T, net.forward(xs), rtol=1e-5, atol=1e-5)
        stale = Handed(torch.full((4, 3), 1e6))
        assert not mailboxes[1].deliver(Envelope("net", "r1", 1, 0, 1), stale)
        assert mailboxes[1].dropped_stale == 1 and mailboxes[1].pending == 0
    finally:
        for e in executors:
            e.close()


async def test_an_in_node_sender_that_hands_nothing_over_fails_the_receiver_at_its_deadline(
    net: Any,
) -> None:
    """Only shard 1 runs: its wait for shard 0's in-node part ends in ShardTimeout naming
    shard 0 within its stall limit (every wait has a deadline), never a hang."""
    specs, _, executors = _pair(net)
    xs = np.random.default_rng(4).random((2, 512)).astype(np.float32)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(ShardTimeout, match="shard 0 of net") as caught:
            await executors[1].run("r", xs.T[specs[1].inputs], timeout_s=10, stall_s=0.3)
    finally:
        for e in executors:
            e.close()
    assert caught.value.channel == "local" and loop.time() - started < 2.0
