"""The node's prediction counters (#13, live): prefetch precision counted at the node (a prefetched
copy used by a request before it left, or left unused: demoted, evicted), device memory-time per
device, and failed prefetches (artifact gone, no room) counted and never seen by a request. On a
real NodeRuntime with CPU devices and the tiny-mlp example, over the manager's HTTP app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from predict_nodes import tiny_mlp_spec as _spec
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.api import parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.prefetch import DEMOTE_PATH, PREFETCH_PATH, Prefetcher
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app

ENTRY_BYTES = 3024  # tiny-mlp with maxBatchSize 1 on a CPU device: weights and reserve
X = [np.ones((1, 16), dtype=np.float32)]


Node = tuple[NodeRuntime, httpx.AsyncClient, Prefetcher, str]


@pytest.fixture
async def node(tmp_path: Path, tiny_mlp: Path) -> AsyncIterator[Node]:
    """One CPU device with room for one model (two names over the same artifact)."""
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=ENTRY_BYTES + ENTRY_BYTES // 2),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    runtime.register("a", parse_spec(_spec(tiny_mlp)))
    runtime.register("b", parse_spec(_spec(tiny_mlp)))
    app: Any = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    while not hasattr(app, "state"):  # under the manager's ASGI wrappers
        app = app.app
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        yield runtime, client, app.state.prefetcher, next(iter(runtime.devices))
    await runtime.settle()


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def _prefetch(
    client: httpx.AsyncClient,
    prefetcher: Prefetcher,
    model: str,
    device: str,
    size: int = ENTRY_BYTES,
) -> None:
    body = {"model": model, "device": device, "size_bytes": size}
    assert (await client.post(PREFETCH_PATH, json=body)).status_code == 202
    assert prefetcher.queue is not None
    await prefetcher.queue.join()


async def test_a_prefetched_copy_a_request_uses_is_counted_used(node: Node) -> None:
    runtime, client, prefetcher, device = node
    await _prefetch(client, prefetcher, "a", device)
    outcome = await runtime.infer("a", X, device_id=device)
    assert outcome.cache_hit
    await runtime.infer("a", X, device_id=device)  # a second use is not a second prefetch used
    m = await _metrics(client)
    assert m["gpufaas_manager_prefetch_total{result=loaded}"] == 1
    assert m["gpufaas_manager_prefetch_used_total"] == 1


async def test_a_prefetched_copy_demoted_or_evicted_unused_is_not_counted_used(
    node: Node,
) -> None:
    runtime, client, prefetcher, device = node
    await _prefetch(client, prefetcher, "a", device)
    assert (
        await client.post(DEMOTE_PATH, json={"model": "a", "device": device})
    ).status_code == 200
    await runtime.infer("a", X, device_id=device)  # loads it again: not the prefetched copy
    await runtime.settle()  # committed in the background: no load in flight, no room
    await _prefetch(client, prefetcher, "b", device)  # room for one, and "a" holds it
    assert (await _metrics(client))["gpufaas_manager_prefetch_total{result=no-room}"] == 1
    runtime.unload("a", device_id=device)
    await _prefetch(client, prefetcher, "b", device)
    await runtime.infer("a", X, device_id=device)  # evicts the unused "b"
    await runtime.infer("b", X, device_id=device)  # which then loads again
    m = await _metrics(client)
    assert m["gpufaas_manager_prefetch_total{result=loaded}"] == 2
    assert m.get("gpufaas_manager_prefetch_used_total", 0.0) == 0
    assert m["gpufaas_manager_prefetch_unused_total{why=demoted}"] == 1
    assert m["gpufaas_manager_prefetch_unused_total{why=evicted}"] == 1


async def test_a_request_that_loaded_the_model_first_is_not_a_prefetch(node: Node) -> None:
    runtime, client, prefetcher, device = node
    await runtime.infer("a", X, device_id=device)
    await _prefetch(client, prefetcher, "a", device)
    await runtime.infer("a", X, device_id=device)
    m = await _metrics(client)
    assert m["gpufaas_manager_prefetch_total{result=resident}"] == 1
    assert m.get("gpufaas_manager_prefetch_used_total", 0.0) == 0


async def test_device_memory_time_is_a_node_counter_per_device(node: Node) -> None:
    runtime, client, _, device = node
    key = f"gpufaas_device_tier_gb_seconds_total{{device={device}}}"
    assert (await _metrics(client))[key] == 0.0  # nothing held yet
    await runtime.infer("a", X, device_id=device)
    started = time.monotonic()
    first = runtime.devices[device].gb_seconds()
    await asyncio.sleep(0.2)  # the model stays resident meanwhile
    after = (await _metrics(client))[key]
    elapsed = time.monotonic() - started
    # integrated exactly: the bytes held times the time between the two reads
    assert 0.2 * ENTRY_BYTES / 1e9 <= after - first <= elapsed * ENTRY_BYTES / 1e9 * 1.001


async def test_a_failed_prefetch_is_counted_and_never_reaches_a_request(
    node: Node, tiny_mlp: Path
) -> None:
    runtime, client, prefetcher, device = node
    runtime.register("gone", parse_spec(_spec(Path("/nonexistent/model.pt"))))
    await _prefetch(client, prefetcher, "gone", device)  # the artifact is gone
    await _prefetch(client, prefetcher, "a", device, size=1 << 40)  # no room for it
    outcome = await runtime.infer("a", X, device_id=device)  # served as if nothing happened
    assert outcome.outputs and not outcome.cache_hit
    m = await _metrics(client)
    assert m["gpufaas_manager_prefetch_total{result=failed}"] == 1
    assert m["gpufaas_manager_prefetch_total{result=no-room}"] == 1
    assert [r.model for r in runtime.state().device(device).residents] == ["a"]
