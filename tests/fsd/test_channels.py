"""Sharded execution over real channels: NATS (nats-server), S3 (SeaweedFS), direct HTTP.

Each test starts what it needs (the servers via fixtures in conftest.py) and checks the
sharded output against the unsharded reference, or that an unreachable server gives an
error naming the channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.core.channels import (
    ChannelUnavailable,
    Envelope,
    Mailbox,
    NatsChannel,
    S3Channel,
)
from gpufaas.core.channelservers import NatsServer, S3Server, free_port, run_nats
from gpufaas.core.layered import radix_net

RunSplit = Callable[..., Awaitable[np.ndarray]]


@pytest.fixture(scope="module")
def net() -> Any:
    return radix_net(256, 8, weights="random", seed=4)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(2).random((3, 256)).astype(np.float32)


@pytest.mark.parametrize("shards", [2, 4])
async def test_nats_channel_matches_the_reference(
    nats_server: NatsServer, net: Any, x: np.ndarray, shards: int, run_split: RunSplit
) -> None:
    channel = NatsChannel(nats_server.url)
    await channel.start()
    try:
        out = await run_split(net, shards, "hypergraph", x, channel=channel)
    finally:
        await channel.close()
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)


async def test_nats_messages_over_max_payload_are_chunked(
    tmp_path: Path, run_split: RunSplit
) -> None:
    wide = radix_net(1024, 2, weights="random", seed=5)
    batch = np.random.default_rng(3).random((200, 1024)).astype(np.float32)
    with run_nats(tmp_path / "small", max_payload=64 << 10) as server:
        channel = NatsChannel(server.url)
        await channel.start()
        try:
            assert channel._nc.max_payload == 64 << 10  # each half is 400 KiB: 7+ chunks
            out = await run_split(wide, 2, "random", batch, channel=channel)
        finally:
            await channel.close()
    np.testing.assert_allclose(out, wide.forward(batch), rtol=1e-5, atol=1e-5)


async def test_jetstream_delivers_what_was_published_before_a_server_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    envelope = Envelope("durable-net", "r1", 1, 0, 1)
    with run_nats(tmp_path / "js", port=port) as server:
        sender = NatsChannel(server.url, durable=True)
        await sender.start()
        receiver = NatsChannel(server.url, durable=True)
        await receiver.start()
        mailbox = Mailbox()
        await receiver.attach("durable-net", 1, mailbox)  # creates the durable consumer
        await receiver.close()  # the receiver goes away ...
        await sender.send(envelope, np.full((4, 2), 3.0, np.float32), timeout_s=5)
        await sender.close()
    with run_nats(tmp_path / "js", port=port) as server:  # ... and the server restarts
        receiver = NatsChannel(server.url, durable=True)
        await receiver.start()
        mailbox = Mailbox()
        mailbox.open("r1")
        await receiver.attach("durable-net", 1, mailbox)
        try:
            got = await receiver.receive(mailbox, envelope, timeout_s=10)
        finally:
            await receiver.close()
    assert got.tolist() == [[3.0, 3.0]] * 4


async def test_jetstream_deletes_a_message_once_its_receiver_has_acknowledged_it(
    tmp_path: Path,
) -> None:
    """A long-running sharded model must not fill JetStream with messages already read
    (the stream kept them for ``max_age``, 5 min, before it became a work queue)."""
    import nats

    envelope = Envelope("durable-net", "r3", 1, 0, 1)
    with run_nats(tmp_path / "js") as server:
        sender = NatsChannel(server.url, durable=True)
        await sender.start()
        receiver = NatsChannel(server.url, durable=True)
        await receiver.start()
        mailbox = Mailbox()
        mailbox.open("r3")
        await receiver.attach("durable-net", 1, mailbox)
        nc = await nats.connect(server.url)
        try:
            await sender.send(envelope, np.full((4, 2), 7.0, np.float32), timeout_s=5)
            got = await receiver.receive(mailbox, envelope, timeout_s=10)
            js = nc.jetstream()
            # The acknowledgement follows the delivery asynchronously: wait for the stream
            # to empty, within a deadline far past any acknowledgement's round trip.
            deadline = asyncio.get_running_loop().time() + 10
            while (left := (await js.stream_info("GPUFAAS_FSD")).state.messages) and (
                asyncio.get_running_loop().time() < deadline
            ):
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
            await receiver.close()
            await sender.close()
    assert got.tolist() == [[7.0, 7.0]] * 4
    assert left == 0


class _DiesOnDelivery(Mailbox):
    """A receiver that goes away between getting a message and acknowledging it."""

    def __init__(self) -> None:
        super().__init__()
        self.got = asyncio.Event()

    def deliver(self, envelope: Envelope, values: Any) -> bool:
        self.got.set()
        raise RuntimeError("the receiver died mid-delivery")


async def test_a_message_delivered_but_never_acknowledged_reaches_the_next_receiver_in_time(
    tmp_path: Path,
) -> None:
    """The cause of the old flaky restart test: JetStream had pushed the message to a receiver
    that never acknowledged it (one closing, or a push inbox nobody read any more), and
    redelivers such a message only after the consumer's ack wait, 30 s by default: past the
    request's deadline. The channel's consumers wait ``redeliver_s`` (2 s) instead."""
    port = free_port()
    envelope = Envelope("durable-net", "r2", 1, 0, 1)
    with run_nats(tmp_path / "js", port=port) as server:
        sender = NatsChannel(server.url, durable=True)
        await sender.start()
        first = NatsChannel(server.url, durable=True)
        await first.start()
        dying = _DiesOnDelivery()
        await first.attach("durable-net", 1, dying)
        await sender.send(envelope, np.full((2, 2), 5.0, np.float32), timeout_s=5)
        await asyncio.wait_for(dying.got.wait(), timeout=10)
        await first.close()
        await sender.close()
    with run_nats(tmp_path / "js", port=port) as server:  # the server restarts too
        second = NatsChannel(server.url, durable=True)
        await second.start()
        mailbox = Mailbox()
        mailbox.open("r2")
        await second.attach("durable-net", 1, mailbox)
        try:
            got = await second.receive(mailbox, envelope, timeout_s=10)
        finally:
            await second.close()
    assert got.tolist() == [[5.0, 5.0]] * 2


async def test_unreachable_nats_is_a_channel_error_naming_nats() -> None:
    channel = NatsChannel(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    with pytest.raises(ChannelUnavailable, match=r"the nats channel at nats://127\.0\.0\.1"):
        await asyncio.wait_for(channel.start(), timeout=20)


async def test_nats_going_away_mid_run_is_a_channel_error(tmp_path: Path) -> None:
    with run_nats(tmp_path / "gone") as server:
        channel = NatsChannel(server.url)
        await channel.start()
    try:
        await asyncio.sleep(0.2)
        with pytest.raises(ChannelUnavailable, match="nats"):
            await channel.send(Envelope("n", "r", 1, 0, 1), np.zeros((1, 1), np.float32),
                               timeout_s=1)  # fmt: skip
    finally:
        await channel.close()


def _s3(server: S3Server, **kw: Any) -> S3Channel:
    return S3Channel(
        endpoint_url=server.endpoint_url, bucket=server.bucket, key=server.key,
        secret=server.secret, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("shards", [2, 4])
async def test_s3_channel_matches_the_reference(
    s3_channel_server: S3Server, net: Any, x: np.ndarray, shards: int, run_split: RunSplit
) -> None:
    small = radix_net(256, 4, weights="random", seed=4)  # S3 round trips are slow: 4 layers
    channel = _s3(s3_channel_server)
    await channel.start()
    try:
        out = await run_split(small, shards, "block", x, channel=channel)
    finally:
        await channel.close()
    np.testing.assert_allclose(out, small.forward(x), rtol=1e-5, atol=1e-5)


async def test_s3_receivers_delete_the_messages_they_read(s3_channel_server: S3Server) -> None:
    channel = _s3(s3_channel_server, prefix="cleanup")
    await channel.start()
    envelope = Envelope("set", "req", 2, 0, 1)
    await channel.send(envelope, np.ones((2, 2), np.float32), timeout_s=5)
    assert (await channel.receive(Mailbox(), envelope, timeout_s=5)).sum() == 4
    await channel.finish("set", "req", 1)
    assert not await channel._fs._exists(channel._path(envelope))
    await channel.close()


async def test_unreachable_s3_is_a_channel_error_naming_s3() -> None:
    channel = S3Channel(endpoint_url=f"http://127.0.0.1:{free_port()}", bucket="fsd",
                        key="k", secret="s")  # fmt: skip
    with pytest.raises(ChannelUnavailable, match=r"the s3 channel at http://127\.0\.0\.1"):
        await asyncio.wait_for(channel.start(), timeout=30)
