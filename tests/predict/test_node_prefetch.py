"""Node-side prefetch and demotion over HTTP, on a real NodeRuntime with CPU devices and a real
example model: a prefetch loads at the lowest priority (never evicting, never next to a load in
flight), a failed one is counted and never reaches a request, a demotion keeps the host copy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from predict_nodes import tiny_mlp_spec as _spec
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.api import parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.prefetch import DEMOTE_PATH, PREFETCH_PATH, Prefetcher, PrefetchJob
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app


@pytest.fixture
async def node(
    tmp_path: Path, tiny_mlp: Path
) -> AsyncIterator[tuple[NodeRuntime, httpx.AsyncClient, Prefetcher]]:
    runtime = NodeRuntime(
        devices=cpu_devices(2, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    runtime.register("tiny", parse_spec(_spec(tiny_mlp)))
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        yield runtime, client, prefetcher_of(app)
    await runtime.settle()


def prefetcher_of(app: Any) -> Prefetcher:
    """The FastAPI app's prefetcher, under the manager's ASGI wrappers (fast path, auth)."""
    while not hasattr(app, "state"):
        app = app.app
    prefetcher: Prefetcher = app.state.prefetcher
    return prefetcher


def _device(runtime: NodeRuntime, index: int = 0) -> str:
    return list(runtime.devices)[index]


def _residents(runtime: NodeRuntime, device: str) -> list[str]:
    return [r.model for r in runtime.state().device(device).residents]


async def _prefetch_counts(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gpufaas_manager_prefetch":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["result"]] = sample.value
    return out


async def test_a_prefetch_loads_the_model_and_a_demotion_keeps_the_host_copy(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    runtime, client, prefetcher = node
    device = _device(runtime)
    queued = await client.post(
        PREFETCH_PATH, json={"model": "tiny", "device": device, "size_bytes": 1 << 20}
    )
    assert queued.status_code == 202
    assert prefetcher.queue is not None
    await prefetcher.queue.join()  # the worker runs in the background
    assert (await _prefetch_counts(client)).get("loaded") == 1.0
    await runtime.settle()
    assert _residents(runtime, device) == ["tiny"]
    demoted = await client.post(DEMOTE_PATH, json={"model": "tiny", "device": device})
    assert demoted.status_code == 200 and demoted.json()["demoted_from"] == [device]
    assert _residents(runtime, device) == []
    host = [r.model for r in runtime.state().host.residents]
    assert host == ["tiny"]  # a later miss copies from host memory


async def test_no_room_busy_and_failed_prefetches_are_counted_never_raised(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    runtime, _client, _ = node
    device = _device(runtime)
    prefetcher = Prefetcher(runtime, registry=CollectorRegistry())
    # more bytes than are free: never evicts to make room
    assert await prefetcher.run(PrefetchJob("tiny", device, 1 << 40)) == "no-room"
    # the artifact is gone: the load fails, the outcome says so, nothing raises
    runtime.register("gone", parse_spec(_spec(Path("/nonexistent/model.pt"))))
    assert await prefetcher.run(PrefetchJob("gone", device, 1024)) == "failed"
    assert await prefetcher.run(PrefetchJob("tiny", "no-such-device", 1024)) == "failed"
    assert _residents(runtime, device) == []


async def test_bad_prefetch_requests_get_a_clear_400(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    _runtime, client, _ = node
    for body in (
        [1],
        {"model": 3},
        {"model": "tiny"},
        {"model": "tiny", "device": "x", "size_bytes": -1},
    ):
        response = await client.post(PREFETCH_PATH, json=body)
        assert response.status_code == 400, body
        assert "message" in response.text or "error" in response.text
    response = await client.post(PREFETCH_PATH, content=b"{not json")
    assert response.status_code == 400
    response = await client.post(DEMOTE_PATH, json={"model": "tiny", "device": "no-such"})
    assert response.status_code == 400


async def test_a_device_with_a_load_in_flight_is_not_quiet(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    """The rule that keeps a prefetch from starting next to a request's load."""
    from gpufaas.cache import Residency
    from gpufaas.core.node import ResidentState
    from gpufaas.gpu_manager.prefetch import device_room

    runtime, _client, _ = node
    state = runtime.state()
    device = state.devices[0]
    assert device_room(state, device.id) == (True, device.free_cache_bytes)
    loading = ResidentState(model="other", state=Residency.LOADING, size_bytes=1, pins=1)
    busy = state.model_copy(
        update={"devices": [device.model_copy(update={"residents": [loading]}), *state.devices[1:]]}
    )
    assert device_room(busy, device.id) == (False, device.free_cache_bytes)
    arriving = ResidentState(
        model="other", state=Residency.RESIDENT, size_bytes=1, pins=1, arrived=False
    )
    copying = state.model_copy(
        update={"devices": [device.model_copy(update={"residents": [arriving]})]}
    )
    assert device_room(copying, device.id) == (False, device.free_cache_bytes)
    assert device_room(state, "no-such-device") is None


async def _hold_host_fill(runtime: NodeRuntime, model: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``model``'s host fill wait for a gate (an artifact that takes long to read): returns
    (entered, gate)."""
    entered, gate = asyncio.Event(), asyncio.Event()
    original = runtime.host.acquire

    async def slow_fill(name: str, spec: Any, **kwargs: Any) -> Any:
        if name == model:
            entered.set()
            await gate.wait()
        return await original(name, spec, **kwargs)

    runtime.host.acquire = slow_fill  # type: ignore[method-assign]
    return entered, gate


def _x() -> list[np.ndarray[Any, Any]]:
    return [np.zeros((1, 16), dtype=np.float32)]


async def test_a_requests_load_preempts_a_prefetch_that_has_not_begun_copying(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher], tiny_mlp: Path
) -> None:
    runtime, client, prefetcher = node
    runtime.register("slow", parse_spec(_spec(tiny_mlp)))
    await runtime.settle()
    entered, gate = await _hold_host_fill(runtime, "slow")
    device = _device(runtime)
    prefetch = asyncio.create_task(prefetcher.run(PrefetchJob("slow", device, 1 << 20)))
    await asyncio.wait_for(entered.wait(), 10)  # the prefetch is filling the host tier
    outcome = await asyncio.wait_for(runtime.infer("tiny", _x(), device_id=device), 10)
    assert not outcome.cache_hit  # the request's own load, of another model, on that device
    # Without preemption the prefetch would still be waiting on its fill (the gate is shut).
    assert await asyncio.wait_for(prefetch, 10) == "preempted"
    assert "slow" not in _residents(runtime, device)
    gate.set()
    await runtime.settle()
    # and through the worker, the outcome is counted on /metrics
    other = _device(runtime, 1)
    gate.clear()
    entered.clear()
    queued = await client.post(
        PREFETCH_PATH, json={"model": "slow", "device": other, "size_bytes": 1 << 20}
    )
    assert queued.status_code == 202
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(runtime.infer("tiny", _x(), device_id=other), 10)
    assert prefetcher.queue is not None
    await asyncio.wait_for(prefetcher.queue.join(), 10)
    assert (await _prefetch_counts(client)).get("preempted") == 1.0
    gate.set()


async def test_a_request_for_the_prefetched_model_joins_it_instead_of_preempting(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher], tiny_mlp: Path
) -> None:
    runtime, _client, prefetcher = node
    entered, gate = await _hold_host_fill(runtime, "tiny")
    device = _device(runtime)
    prefetch = asyncio.create_task(prefetcher.run(PrefetchJob("tiny", device, 1 << 20)))
    await asyncio.wait_for(entered.wait(), 10)
    request = asyncio.create_task(runtime.infer("tiny", _x(), device_id=device))
    await asyncio.sleep(0.05)  # the request joins the prefetch's load
    assert not prefetch.done() and not request.done()
    gate.set()
    assert await asyncio.wait_for(prefetch, 10) == "loaded"
    assert (await asyncio.wait_for(request, 10)).outputs


def test_byte_seconds_integrate_exactly_between_changes() -> None:
    from gpufaas.gpu_manager.host_cache import ByteSeconds

    now = [100.0]
    meter = ByteSeconds(clock=lambda: now[0])
    meter.level(2 * 10**9)  # 2 GB from t=100
    now[0] = 103.0
    meter.level(5 * 10**9)  # 3 s x 2 GB, then 5 GB
    now[0] = 104.5
    assert meter.level(0) == 3 * 2 * 10**9 + 1.5 * 5 * 10**9
    now[0] = 200.0
    assert meter.level(0) == 13.5 * 10**9  # nothing held: nothing added


async def _host_gb_seconds(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "gpufaas_host_tier_gb_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no gpufaas_host_tier_gb_seconds on /metrics")


async def test_host_memory_time_is_a_node_counter(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    runtime, client, _ = node
    assert await _host_gb_seconds(client) == 0.0  # nothing held yet
    await runtime.infer("tiny", _x(), device_id=_device(runtime))  # fills the host tier
    held = runtime.host.tier.lru.used_bytes
    assert held > 0
    first = await _host_gb_seconds(client)
    await asyncio.sleep(0.02)
    second = await _host_gb_seconds(client)
    assert second > first  # grows while the model is held ...
    assert runtime.host.evict("tiny")
    await runtime.settle()
    third = await _host_gb_seconds(client)
    await asyncio.sleep(0.02)
    assert await _host_gb_seconds(client) == third  # ... and not once it is gone


async def test_a_device_serving_requests_is_not_quiet(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher],
) -> None:
    """A prefetch never starts next to a request being served: on its device, and for a CPU
    device on any CPU device of the node (they compute on the same host cores); a CUDA
    device's neighbours do not count."""
    from gpufaas.gpu_manager.prefetch import device_room

    runtime, _client, _ = node
    state = runtime.state()
    first, second = state.devices[0], state.devices[1]
    serving = state.model_copy(
        update={"devices": [first.model_copy(update={"outstanding": 1}), second]}
    )
    assert device_room(serving, first.id) == (False, first.free_cache_bytes)
    assert device_room(serving, second.id) == (False, second.free_cache_bytes)
    cuda = state.model_copy(
        update={
            "devices": [
                first.model_copy(update={"outstanding": 1, "kind": "cuda"}),
                second.model_copy(update={"kind": "cuda"}),
            ]
        }
    )
    assert device_room(cuda, first.id) == (False, first.free_cache_bytes)
    assert device_room(cuda, second.id) == (True, second.free_cache_bytes)


async def _request_in_its_pass(
    runtime: NodeRuntime, device: str
) -> tuple[asyncio.Task[Any], asyncio.Event]:
    """A request for the resident ``tiny`` held in its forward pass on ``device`` until the
    returned gate is set."""
    await runtime.infer("tiny", _x(), device_id=device)
    # The first request computes as the layers land and its load commits in the background;
    # settled, the model is resident and the next request is a hit.
    await runtime.settle()
    entered, gate = asyncio.Event(), asyncio.Event()
    tier = runtime.devices[device]
    original = tier.run

    async def slow_pass(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await original(*args, **kwargs)

    tier.run = slow_pass  # type: ignore[method-assign]
    request = asyncio.create_task(runtime.infer("tiny", _x(), device_id=device))
    await asyncio.wait_for(entered.wait(), 10)
    return request, gate


async def test_a_prefetch_waits_for_no_request_in_flight_then_starts_when_it_ends(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher], tiny_mlp: Path
) -> None:
    """A request in its forward pass on the node (CPU devices share the cores): a prefetch
    then waits, loading nothing, and starts as soon as the request is answered, woken by the
    runtime (``on_settle``), long before its bound (``wait_s``) runs out."""
    runtime, _client, _ = node
    prefetcher = Prefetcher(runtime, registry=CollectorRegistry(), wait_s=3.0)
    runtime.register("next", parse_spec(_spec(tiny_mlp)))
    device, other = _device(runtime), _device(runtime, 1)
    request, gate = await _request_in_its_pass(runtime, device)
    prefetch = asyncio.create_task(prefetcher.run(PrefetchJob("next", other, 1 << 20)))
    await asyncio.sleep(0.2)
    assert not prefetch.done() and "next" not in _residents(runtime, other)
    loop = asyncio.get_running_loop()
    released = loop.time()
    gate.set()
    assert (await asyncio.wait_for(request, 10)).cache_hit
    assert await asyncio.wait_for(prefetch, 10) == "loaded"
    assert loop.time() - released < 2.0  # woken by the request's end, not by the bound
    assert "next" in _residents(runtime, other)


async def test_a_prefetch_whose_device_stays_busy_is_dropped_as_busy_at_its_bound(
    node: tuple[NodeRuntime, httpx.AsyncClient, Prefetcher], tiny_mlp: Path
) -> None:
    """The request outlasts the prefetch's wait: it is dropped as ``busy`` (the gateway asks
    again on its next tick) and loads nothing; a bad bound is refused."""
    runtime, _client, _ = node
    prefetcher = Prefetcher(runtime, registry=CollectorRegistry(), wait_s=0.1)
    runtime.register("next", parse_spec(_spec(tiny_mlp)))
    device, other = _device(runtime), _device(runtime, 1)
    request, gate = await _request_in_its_pass(runtime, device)
    assert await prefetcher.run(PrefetchJob("next", other, 1 << 20)) == "busy"
    assert "next" not in _residents(runtime, other)
    gate.set()
    await asyncio.wait_for(request, 10)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="wait_s"):
            Prefetcher(runtime, registry=CollectorRegistry(), wait_s=bad)
