"""Fixtures for tests/fsd: real channel servers, shard nodes serving real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from gpufaas.cache.lru import ByteLRU
from gpufaas.core.channels import LocalChannel, Mailbox
from gpufaas.core.channelservers import (
    NatsServer,
    S3Server,
    ServerMissing,
    free_port,
    run_nats,
    run_seaweedfs,
)
from gpufaas.core.layered import LayeredNet, radix_net
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.shards import ShardExecutor, ShardFastPath, ShardHost, shard_router
from gpufaas.scheduler.coordinator import Coordinator
from gpufaas.scheduler.partition import partition, split


# A net, an input and a coordinator for tests that run shard sets over real nodes
# (test_nodes.py, test_in_node.py); modules with a net of their own define it themselves.
@pytest.fixture(scope="module")
def net() -> Any:
    return radix_net(512, 12, weights="random", seed=6)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(7).random((4, 512)).astype(np.float32)


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    c = Coordinator(artifact_base=str(tmp_path / "shards"), timeout_s=20)
    yield c
    await c.close()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    try:
        with run_nats(tmp_path_factory.mktemp("nats")) as server:
            yield server
    except ServerMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def s3_channel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except ServerMissing as e:
        pytest.skip(str(e))


class ThreadNode:
    """A shard node (the GPU manager's shard routes) served by uvicorn in a thread."""

    def __init__(
        self, root: Path, *, capacity_bytes: int, stall_s: float, cpu_devices: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A real node runtime (CPU devices): the shards live in their devices' tiers.
        self.runtime = build_runtime(
            cpu_devices=cpu_devices, device_memory_bytes=capacity_bytes,
            host_memory_bytes=64 << 20, artifact_dir=root, disk_cache_bytes=0, force_cpu=True,
        )  # fmt: skip
        devices = list(self.runtime.devices.values())
        self.host = ShardHost(store=self.runtime.artifacts.store, devices=devices, stall_s=stall_s)
        host = self.host

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            # As the manager's app does: the host's shards, channels, links and link socket
            # close on the server's own loop when it stops (a server left open under uvloop
            # can close another thread's file when it is collected).
            try:
                yield
            finally:
                await host.close()

        app = FastAPI(lifespan=lifespan)
        app.include_router(shard_router(self.host))
        config = uvicorn.Config(
            ShardFastPath(app, self.host),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def shrink(self, capacity_bytes: int) -> None:
        """The device's budget (models and shards), before anything is loaded."""
        for device in self.host.devices:
            device.tier.lru = ByteLRU(capacity_bytes=capacity_bytes)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("shard node did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving and close the host (once; later calls do nothing)."""
        self.server.should_exit = True
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            raise RuntimeError("shard node did not stop")


def _started_nodes(tmp_path: Path, *, count: int, cpu_devices: int) -> Iterator[list[ThreadNode]]:
    """``count`` shard nodes of ``cpu_devices`` CPU devices each, stopped when done."""
    nodes: list[ThreadNode] = []
    try:
        for index in range(count):
            node = ThreadNode(
                tmp_path / f"node{index}",
                capacity_bytes=1 << 30,
                stall_s=5.0,
                cpu_devices=cpu_devices,
            )
            node.start()
            # A loaded 2-core CI box can take longer than the 2 s a link's setup is allowed, and
            # then the node uses HTTP for that peer: tests of the path, not of the bound.
            node.host.links.connect_timeout_s = 30.0
            nodes.append(node)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def thread_nodes(tmp_path: Path) -> Iterator[list[ThreadNode]]:
    yield from _started_nodes(tmp_path, count=4, cpu_devices=1)


@pytest.fixture
def two_device_nodes(tmp_path: Path) -> Iterator[list[ThreadNode]]:
    """Two shard nodes of two CPU devices each (``--cpu-devices 2``)."""
    yield from _started_nodes(tmp_path, count=2, cpu_devices=2)


@pytest.fixture
def run_split() -> object:
    """``await run_split(net, shards, method, x, channel=None)``: the sharded output."""
    return run_in_process


async def run_in_process(
    net: LayeredNet, shards: int, method: str, x: np.ndarray, *, channel: object | None = None
) -> np.ndarray:
    """Run ``net`` split ``shards`` ways in this process (local channel unless given)."""
    specs = split(net, partition(net, shards, method=method))
    chan = channel if channel is not None else LocalChannel()
    executors = []
    for spec in specs:
        mailbox = Mailbox()
        await chan.attach("net", spec.shard, mailbox)  # type: ignore[attr-defined]
        executors.append(ShardExecutor(spec, set_name="net", channel=chan, mailbox=mailbox))  # type: ignore[arg-type]
    try:
        outs = await asyncio.gather(
            *(
                e.run("req-1", x.T[s.inputs], timeout_s=30)
                for e, s in zip(executors, specs, strict=False)
            )
        )
    finally:
        for e in executors:
            e.close()
    y = np.zeros((net.widths[-1], x.shape[0]), dtype=np.float32)
    for spec, out in zip(specs, outs, strict=True):
        y[spec.outputs] = out
    return y.T
