"""The gateway's directory bookkeeping around syncs."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import httpx
import numpy as np

from gpufaas.cache import Residency
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app as create_manager_app
from gpufaas.scheduler.gateway import GatewayConfig, NodeCall, learn_from_reply
from gpufaas.scheduler.main import build_gateway


async def test_a_sync_keeps_requests_still_queued_at_the_gateway_in_the_directory() -> None:
    gateway = build_gateway(manager_urls={}, functions=[])
    directory = gateway.cluster.directory
    directory.add_device("node-0/cpu:0", capacity_bytes=100, node="node-0")
    gateway.model_bytes["cold"] = 10
    gateway.in_flight["node-0/cpu:0"] = collections.Counter({"cold": 2})
    # The manager's report cannot know of requests the gateway still holds in its queues.
    directory.sync("node-0/cpu:0", [("warm", Residency.RESIDENT, 20)])
    assert directory.holders("cold") == {}
    await gateway.sync()
    assert directory.holders("cold") == {"node-0/cpu:0": Residency.LOADING}
    assert directory.holders("warm") == {"node-0/cpu:0": Residency.RESIDENT}
    assert directory.used_bytes("node-0/cpu:0") == 30


async def test_in_flight_bookkeeping_empties_when_requests_are_answered(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """The real gateway in front of a real GPU manager (in-process, over ASGI)."""
    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"],
        variables={"GPUFAAS_MODELS": str(example_models_dir)},
    )
    runtime = NodeRuntime(
        devices=cpu_devices(2, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    gateway = build_gateway(
        manager_urls={"node-0": "http://manager"},
        functions=functions,
        policy="lalb-o3",
        config=GatewayConfig(transport="httpx"),
    )
    node = gateway.cluster.nodes["node-0"]
    await node.client.aclose()
    node.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_manager_app(runtime)), base_url="http://manager"
    )
    await gateway.sync()
    for function in functions:
        await gateway.add_function(function)
    content, headers = encode_request({"x": (np.ones((1, 16), dtype=np.float32), "FP32")})

    async def one() -> int:
        reply = await gateway.forward(
            "tiny-mlp", NodeCall("/v2/models/tiny-mlp/infer", content, headers)
        )
        return reply.status

    try:
        assert await asyncio.gather(*(one() for _ in range(12))) == [200] * 12
        assert gateway.in_flight == {}
        assert gateway.pending == {}
        holders = gateway.cluster.directory.holders("tiny-mlp")
        assert set(holders.values()) == {Residency.RESIDENT}
        # An answer that comes back after its node was called down (a sync failed meanwhile)
        # still stands: learning from it must not touch the devices that left the directory.
        reply = await gateway.forward(
            "tiny-mlp", NodeCall("/v2/models/tiny-mlp/infer", content, headers)
        )
        device = next(iter(gateway.cluster.devices.values()))
        gateway.cluster.mark_down(node)
        assert device.key not in gateway.cluster.directory
        learn_from_reply(gateway, device, "tiny-mlp", reply)  # raised UnknownDevice (a 500)
    finally:
        await gateway.cluster.close()
        await runtime.settle()
