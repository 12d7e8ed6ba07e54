"""Which path the direct channel's messages took, counted (fsd, nineteenth session): link
setups by outcome and messages by path (``core/hostlink.py`` ``LinkCounts``), on the node's
``/metrics`` (``gpu_manager/shards.py`` ``LinkCollector``). Before, a failed same-host link
setup and a message sent inline (the ring full) fell back without a trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.channels import (
    DirectChannel,
    Envelope,
    LocalChannel,
    Mailbox,
    ShardUnreachable,
    envelope_from_notice,
)
from gpufaas.core.channelservers import free_port
from gpufaas.core.hostlink import (
    HostLinks,
    LinkCounts,
    LinkEndpoint,
    LinkServer,
    host_identity,
)
from gpufaas.core.peerhttp import PeerPools
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.server import create_app
from gpufaas.gpu_manager.shards import LinkCollector


def _samples(text: str) -> dict[tuple[str, str], float]:
    """``(metric name, its one label's value)`` -> value, for the link metrics in ``text``."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("gpufaas_shard_link_setups", "gpufaas_shard_messages"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    (label,) = sample.labels.values()
                    found[(family.name, label)] = sample.value
    return found


async def test_a_real_link_counts_its_setup_and_each_message_by_the_path_it_took(
    tmp_path: Path,
) -> None:
    """One link set up (ok); messages that fit the ring count ``shm``, one over the ring's
    size ``inline``; a shard on this node ``local``; a peer with no link ``http`` (counted as
    sent, whatever it answers)."""
    mailbox = Mailbox()

    def deliver(notice: dict[str, object], values: np.ndarray) -> int:
        return 202 if mailbox.deliver(envelope_from_notice(notice), values) else 208

    server = LinkServer(deliver, directory=tmp_path)
    endpoint = await server.start()
    here = f"http://127.0.0.1:{free_port()}"  # nobody listens: HTTP to it fails at once

    async def endpoint_of(url: str) -> LinkEndpoint | None:
        return endpoint if url == "http://peer.invalid:1" else None  # the other: no endpoint

    counts = LinkCounts()
    links = HostLinks(endpoint_of=endpoint_of, ring_bytes=1 << 20, counts=counts)
    links.identity = host_identity(tmp_path)
    local = LocalChannel()
    await local.attach("net", 0, Mailbox())
    channel = DirectChannel(
        peers={("net", 1): "http://peer.invalid:1", ("net", 2): here}, local=local,
        pools=PeerPools(), links=links, counts=counts,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    try:
        for layer in range(3):
            values = rng.random((256, 64), dtype=np.float32)  # 64 KiB: fits the ring
            await channel.send(Envelope("net", "r1", layer, 0, 1), values, timeout_s=5)
        big = rng.random((8192, 64), dtype=np.float32)  # 2 MiB: over the ring, inline
        await channel.send(Envelope("net", "r1", 3, 0, 1), big, timeout_s=5)
        got = await mailbox.take("r1", 3, 0, timeout_s=1, channel="direct", set_name="net")
        np.testing.assert_array_equal(got, big)
        await channel.send(Envelope("net", "r1", 0, 1, 0), big[:4], timeout_s=5)  # to shard 0
        with pytest.raises(ShardUnreachable):  # nobody there: still sent over HTTP
            await channel.send(Envelope("net", "r1", 0, 0, 2), big[:4], timeout_s=5)
        assert counts.messages == {"shm": 3, "inline": 1, "http": 1, "local": 1}
        assert counts.setups == {"ok": 1, "failed": 0, "none": 1}
    finally:
        await links.close()
        await channel.pools.close()
        await server.close()


async def test_a_failed_setup_counts_failed_and_each_retry_counts_again(tmp_path: Path) -> None:
    """A setup that failed for a reason that may pass counts ``failed`` (the peer's messages
    then go over HTTP until a retry links it), a definitive no counts ``none``."""
    clock = [0.0]

    async def refused(url: str) -> LinkEndpoint | None:
        raise ConnectionRefusedError("no node there yet")

    links = HostLinks(endpoint_of=refused, ring_bytes=1 << 16, clock=lambda: clock[0])
    try:
        assert await links.find("http://peer:1") is None
        assert links.counts.setups == {"ok": 0, "failed": 1, "none": 0}
        assert await links.find("http://peer:1") is None  # backing off: not tried, not counted
        assert links.counts.setups["failed"] == 1
    finally:
        await links.close()

    async def elsewhere(url: str) -> LinkEndpoint | None:
        return LinkEndpoint("another-host", "/nowhere/link.sock")

    other = HostLinks(endpoint_of=elsewhere, ring_bytes=1 << 16)
    try:
        assert await other.find("http://peer:1") is None
        assert other.counts.setups == {"ok": 0, "failed": 0, "none": 1}
    finally:
        await other.close()


def test_the_collector_exports_every_label_from_zero_and_then_the_counts() -> None:
    counts = LinkCounts()
    registry = CollectorRegistry()
    registry.register(LinkCollector(counts))
    before = _samples(generate_latest(registry).decode())
    assert before == {
        **{("gpufaas_shard_link_setups", r): 0.0 for r in ("ok", "failed", "none")},
        **{("gpufaas_shard_messages", p): 0.0 for p in ("shm", "inline", "http", "local")},
    }
    counts.setups["ok"] += 2
    counts.messages["inline"] += 5
    after = _samples(generate_latest(registry).decode())
    assert after[("gpufaas_shard_link_setups", "ok")] == 2.0
    assert after[("gpufaas_shard_messages", "inline")] == 5.0
    assert after[("gpufaas_shard_messages", "shm")] == 0.0


def test_the_managers_metrics_carry_the_link_counts(tmp_path: Path) -> None:
    """The GPU manager's own ``/metrics`` (what ``bench/fsd.py`` reads before and after each
    cell) exports the shard host's link counts, without its token."""
    runtime = build_runtime(
        cpu_devices=1, device_memory_bytes=64 << 20, host_memory_bytes=64 << 20,
        artifact_dir=tmp_path / "artifacts", force_cpu=True,
    )  # fmt: skip
    with TestClient(create_app(runtime, token="t")) as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    found = _samples(answer.text)
    assert found[("gpufaas_shard_messages", "shm")] == 0.0
    assert found[("gpufaas_shard_link_setups", "failed")] == 0.0
