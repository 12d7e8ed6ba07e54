"""A prefetch the node drops leaves the gateway's view at once (#13, a mend).

The node queues a prefetch and runs it later, at the lowest priority; it may drop it then
(busy, no room, failed, preempted). The gateway's view holds a prefetch sent as loading on its
device, so a request goes to the copy under way. Each queued prefetch has a ticket; the driver
asks the node for its outcome in the background (a long poll) and, on a drop, takes the loading
mark out of its view at once, and tells the peers, instead of waiting for the next sync.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from predict_nodes import tiny_mlp_spec
from prometheus_client import CollectorRegistry

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.cache.arrivals import Advice, PredictivePolicy
from gpufaas.core.api import parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.http import REASON_HEADER
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.prefetch import PREFETCH_PATH
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app as create_manager_app
from gpufaas.scheduler.prefetch import DROPPED, Action, PrefetchDriver, enable_prefetch

MODEL = "tiny-mlp"
SIZE = 1 << 20


class Prefetches(PredictivePolicy):
    """Advises a prefetch of every function not held, and keeps every one held."""

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        return Advice(keep=True, prefetch=True, reason="test")


# --- the node: a ticket for each queued prefetch, and its outcome ---------------------------------


@pytest.fixture
async def manager(tmp_path: Path, tiny_mlp: Path) -> AsyncIterator[tuple[NodeRuntime, Any]]:
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    runtime.register(MODEL, parse_spec(tiny_mlp_spec(tiny_mlp)))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_manager_app(runtime)), base_url="http://manager"
    ) as client:
        yield runtime, client
    await runtime.settle()


async def test_a_queued_prefetch_has_a_ticket_whose_outcome_the_node_gives_once_it_has_one(
    manager: tuple[NodeRuntime, httpx.AsyncClient],
) -> None:
    runtime, client = manager
    device = next(iter(runtime.devices))
    tickets = []
    for size in (1 << 40, SIZE):  # no room for the first; the second loads
        queued = await client.post(
            PREFETCH_PATH, json={"model": MODEL, "device": device, "size_bytes": size}
        )
        assert queued.status_code == 202 and queued.json()["queued"] is True
        tickets.append(queued.json()["ticket"])
    outcomes = [
        (await client.get(f"{PREFETCH_PATH}/{ticket}", params={"wait_s": 30})).json()
        for ticket in tickets
    ]
    assert outcomes == [{"result": "no-room"}, {"result": "loaded"}]
    assert [r.model for r in runtime.state().device(device).residents] == [MODEL]


@pytest.mark.parametrize(
    ("ticket", "wait_s", "status"),
    [
        ("x", "0", 400),
        ("0", "0", 400),
        ("-3", "0", 400),
        ("1", "-1", 400),
        ("1", "nan", 400),
        ("1", "inf", 400),
        ("1", "1e9", 400),
        ("1", "soon", 400),
        ("999", "0", 404),
    ],
)
async def test_asking_for_a_bad_or_unknown_ticket_is_a_clear_error(
    manager: tuple[NodeRuntime, httpx.AsyncClient], ticket: str, wait_s: str, status: int
) -> None:
    _, client = manager
    answer = await client.get(f"{PREFETCH_PATH}/{ticket}", params={"wait_s": wait_s})
    assert answer.status_code == status
    assert answer.headers[REASON_HEADER] and "error" in answer.json()


# --- the driver: a drop takes the loading mark out of the view ------------------------------------


def _driver(
    directory: ClusterDirectory,
    outcome: Callable[[], Awaitable[str | None]] | None,
    dropped: list[Action],
    registry: CollectorRegistry | None = None,
) -> PrefetchDriver:
    async def send(action: Action) -> Callable[[], Awaitable[str | None]] | None:
        return outcome

    return PrefetchDriver(
        policy=Prefetches(),
        directory=directory,
        send=send,
        sizes=lambda: {MODEL: SIZE},
        reload_ms=lambda name, size: 1000.0,
        registry=registry or CollectorRegistry(),
        on_dropped=dropped.append,
    )


async def _mark_gone(directory: ClusterDirectory, device: str) -> None:
    """Once the view no longer holds the model on ``device`` (bounded against a hang)."""
    for _ in range(3000):
        if directory.state(device, MODEL) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the view still holds the dropped prefetch")


@pytest.mark.parametrize("result", sorted(DROPPED))
async def test_a_prefetch_the_node_dropped_leaves_the_view_at_once(result: str) -> None:
    directory = ClusterDirectory()
    directory.add_device("n/cpu:0", capacity_bytes=10 * SIZE, node="n")
    told: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    dropped: list[Action] = []
    registry = CollectorRegistry()
    driver = _driver(directory, lambda: told, dropped, registry)

    assert await driver.tick() == [Action("prefetch", MODEL, "n/cpu:0")]
    assert directory.state("n/cpu:0", MODEL) is Residency.LOADING  # a copy on its way
    told.set_result(result)
    await _mark_gone(directory, "n/cpu:0")
    assert dropped == [Action("prefetch", MODEL, "n/cpu:0")]  # the peers are told
    assert registry.get_sample_value("gpufaas_prefetch_dropped_total", {"why": result}) == 1


@pytest.mark.parametrize("result", ["loaded", "resident", None])
async def test_a_prefetch_the_node_loaded_or_whose_outcome_is_unknown_stays(
    result: str | None,
) -> None:
    directory = ClusterDirectory()
    directory.add_device("n/cpu:0", capacity_bytes=10 * SIZE, node="n")
    told: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    dropped: list[Action] = []
    driver = _driver(directory, lambda: told, dropped)
    await driver.tick()
    told.set_result(result)
    (following,) = driver._following
    await following
    assert directory.state("n/cpu:0", MODEL) is Residency.LOADING and dropped == []


async def test_a_drop_that_comes_after_a_request_loaded_the_model_there_changes_nothing() -> None:
    directory = ClusterDirectory()
    directory.add_device("n/cpu:0", capacity_bytes=10 * SIZE, node="n")
    told: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    dropped: list[Action] = []
    driver = _driver(directory, lambda: told, dropped)
    await driver.tick()
    directory.note_loaded("n/cpu:0", MODEL, size_bytes=SIZE)  # a request's answer: it is there
    told.set_result("busy")
    (following,) = driver._following
    await following
    assert directory.state("n/cpu:0", MODEL) is Residency.RESIDENT and dropped == []


# --- gateway, driver and a real GPU manager --------------------------------------------------------


async def test_a_prefetch_a_real_node_drops_leaves_the_gateways_view_without_a_sync(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """Gateway -> driver -> GPU manager in process over ASGI, with the real tiny-mlp: the node
    queues the prefetch and then fails it (the function is gone from the node); the gateway's
    view drops its loading mark as soon as the node has the outcome, with no sync between."""
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests
    from gpufaas.scheduler.gateway import GatewayConfig
    from gpufaas.scheduler.main import build_gateway

    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"],
        variables={"GPUFAAS_MODELS": str(example_models_dir)},
    )
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    gateway = build_gateway(
        manager_urls={"node-0": "http://manager"},
        functions=functions,
        policy="lalb",
        config=GatewayConfig(transport="httpx"),  # the in-process manager is an ASGI app
    )
    node = gateway.cluster.nodes["node-0"]
    await node.client.aclose()
    node.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_manager_app(runtime)), base_url="http://manager"
    )
    driver = enable_prefetch(gateway, policy=Prefetches(), state_file=None)
    try:
        await gateway.sync()  # the node now has the function
        assert MODEL in runtime.functions
        gateway.model_bytes[MODEL] = SIZE  # as learned from an earlier answer
        runtime.unregister(MODEL)  # its prefetch will fail at the node
        device = next(iter(runtime.devices))
        key = f"node-0/{device}"
        directory = gateway.cluster.directory

        assert await driver.tick() == [Action("prefetch", MODEL, key)]
        assert directory.state(key, MODEL) is Residency.LOADING  # sent: a copy on its way

        await _mark_gone(directory, key)  # the node failed it: out of the view, no sync
        value = gateway.metrics.registry.get_sample_value
        assert value("gpufaas_prefetch_dropped_total", {"why": "failed"}) == 1
        assert runtime.state().device(device).residents == []
    finally:
        await gateway.cluster.close()
        await runtime.settle()
