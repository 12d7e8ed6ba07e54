"""Hit or miss in a load's commit window: a request that finds the copy complete is a hit.

A load's last step, committing the copy to the device tier, runs in the background after its
last byte lands (``DeviceLoads._finish``, started through ``NodeRuntime._spawn``). A request in
between waits for no load, so its answer, its load fields and the manager's counters all say hit;
one that finds the copy still under way waits for the load in flight, and is a miss. The tests
hold the commit, or the copy, on an event they open themselves, never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from gm_support import Model, devices
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.http import CACHE_HEADER, DEVICE_HEADER, LOAD_MS_HEADER, LOAD_SOURCE_HEADER
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app

Factory = Callable[..., NodeRuntime]


class HeldCopy(CpuBackend):
    """A CPU device whose copies start only once the test sets ``copying`` (and fail if it
    sets ``fail``)."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.copying = threading.Event()
        self.fail = False

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        if not self.copying.wait(30):
            raise TimeoutError("the test never let the copy run")
        if self.fail:
            raise OSError("simulated copy failure")
        super()._copy_group(dst, src, group, start, end)


def held_copy_runtime(model: Model, tmp_path: Path) -> tuple[NodeRuntime, HeldCopy]:
    info = devices(1)[0]
    backend = HeldCopy(info)
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
        backends={info.id: backend},
        prepare_on_register=False,
    )
    runtime.register(model.name, model.spec)
    return runtime, backend


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Opened by the test: until then the runtime's background work (the commit of a load among
    it) waits, as it may on a loaded box. Injected where the runtime starts that work."""
    opened = asyncio.Event()
    spawn = NodeRuntime._spawn

    def held(runtime: NodeRuntime, coroutine: Coroutine[Any, Any, None]) -> None:
        async def after_opened() -> None:
            await opened.wait()
            await coroutine

        spawn(runtime, after_opened())

    monkeypatch.setattr(NodeRuntime, "_spawn", held)
    return opened


@pytest.fixture
async def client_of() -> AsyncIterator[Callable[[NodeRuntime], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(runtime: NodeRuntime) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=create_app(runtime))
        clients.append(httpx.AsyncClient(transport=transport, base_url="http://manager"))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


async def infer(client: httpx.AsyncClient, model: Model) -> httpx.Response:
    inputs = model.inputs()
    tensors = {t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, inputs, strict=True)}
    content, headers = encode_request(tensors)
    return await client.post(
        f"/v2/models/{model.name}/infer",
        content=content,
        headers={**headers, DEVICE_HEADER: "cpu:0"},
    )


def answer(response: httpx.Response) -> tuple[int, str, str]:
    """The status, the cache header and the load source of an answer."""
    return (
        response.status_code,
        response.headers[CACHE_HEADER],
        response.headers[LOAD_SOURCE_HEADER],
    )


async def counted(client: httpx.AsyncClient) -> dict[str, float]:
    """The manager's request counts by cache, and how many loads it timed."""
    text = (await client.get("/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpufaas_manager_requests_total":
                key = sample.labels["cache"]
                found[key] = found.get(key, 0.0) + sample.value
            elif sample.name == "gpufaas_manager_load_seconds_count":
                found["loads timed"] = found.get("loads timed", 0.0) + sample.value
    return found


async def test_a_request_that_finds_the_copy_complete_before_its_commit_is_a_hit(
    runtime_factory: Factory,
    models: dict[str, Model],
    commits: asyncio.Event,
    client_of: Callable[[NodeRuntime], httpx.AsyncClient],
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(device_list=devices(1), register=[model])
    client = client_of(runtime)
    device = runtime.devices["cpu:0"]
    try:
        first = await infer(client, model)
        assert answer(first) == (200, "miss", "host")
        loading = device.tier.arriving[model.name]  # its commit is held
        assert loading.transfer is not None
        await asyncio.to_thread(loading.transfer.wait_all)  # its last byte has landed

        second = await infer(client, model)

        assert model.name in device.tier.arriving  # still not committed: in the window
        assert answer(second) == (200, "hit", "device")
        assert float(second.headers[LOAD_MS_HEADER]) == 0.0
        assert await counted(client) == {"hit": 1.0, "miss": 1.0, "loads timed": 1.0}
        stats = runtime.stats.tier("device")
        assert (stats.hits, stats.misses) == (1, 1)
    finally:
        commits.set()
        await runtime.settle()
    assert [r.model for r in runtime.state().device("cpu:0").residents] == [model.name]


async def test_a_request_that_finds_the_copy_under_way_waits_for_it_and_is_a_miss(
    models: dict[str, Model],
    client_of: Callable[[NodeRuntime], httpx.AsyncClient],
    tmp_path: Path,
) -> None:
    model = models["tiny-mlp"]
    runtime, backend = held_copy_runtime(model, tmp_path)
    client = client_of(runtime)
    used = asyncio.Queue[str]()
    runtime.on_use(lambda name, _device: used.put_nowait(name))
    try:
        first = asyncio.create_task(infer(client, model))
        await asyncio.wait_for(used.get(), 30)  # the load is under way: its copy is held
        later = asyncio.create_task(infer(client, model))
        await asyncio.wait_for(used.get(), 30)  # it holds the copy still arriving
        transfer = runtime.devices["cpu:0"].tier.arriving[model.name].transfer
        assert transfer is not None and not transfer.done()
    finally:
        backend.copying.set()
    answers = [await asyncio.wait_for(task, 30) for task in (first, later)]
    await runtime.settle()

    assert [answer(a) for a in answers] == [(200, "miss", "host")] * 2
    assert await counted(client) == {"miss": 2.0, "loads timed": 2.0}


async def test_a_copy_that_failed_before_its_commit_is_no_hit(
    models: dict[str, Model],
    commits: asyncio.Event,
    client_of: Callable[[NodeRuntime], httpx.AsyncClient],
    tmp_path: Path,
) -> None:
    model = models["tiny-mlp"]
    runtime, backend = held_copy_runtime(model, tmp_path)
    backend.fail = True
    backend.copying.set()
    client = client_of(runtime)
    device = runtime.devices["cpu:0"]
    try:
        first = await infer(client, model)
        loading = device.tier.arriving[model.name]  # the failure is not recorded yet: held
        assert loading.transfer is not None and loading.transfer.done()

        second = await infer(client, model)

        assert model.name in device.tier.arriving
        for failed in (first, second):
            assert failed.status_code == 503 and CACHE_HEADER not in failed.headers
        stats = runtime.stats.tier("device")
        assert (stats.hits, stats.misses) == (0, 1)
    finally:
        commits.set()
        await runtime.settle()
    assert runtime.state().device("cpu:0").residents == []


async def test_a_prefetch_waiting_for_a_quiet_device_starts_when_a_loads_commit_leaves_it_quiet(
    runtime_factory: Factory, models: dict[str, Model], commits: asyncio.Event
) -> None:
    """A request's load commits in the background after its answer. A prefetch that found the
    device not quiet (that copy still arriving) is woken by the commit and starts, rather than
    waiting out its bound (here far longer than the test's guard) and being dropped as busy."""
    from prometheus_client import CollectorRegistry

    from gpufaas.gpu_manager.prefetch import Prefetcher, PrefetchJob

    first, then = models["tiny-mlp"], models["deep"]
    runtime = runtime_factory(device_list=devices(1), register=[first, then])
    prefetcher = Prefetcher(runtime, registry=CollectorRegistry(), wait_s=600.0)
    device = runtime.devices["cpu:0"]
    try:
        await runtime.infer(first.name, first.inputs(), device_id="cpu:0")
        assert first.name in device.tier.arriving  # answered; its commit is held
        prefetch = asyncio.create_task(prefetcher.run(PrefetchJob(then.name, "cpu:0", 1 << 20)))
        for _ in range(1000):  # until it waits for the device to go quiet (no clock involved)
            if prefetcher._settled is not None:
                break
            await asyncio.sleep(0)
        assert prefetcher._settled is not None and not prefetch.done()
        commits.set()  # the commit runs: the device is quiet now
        assert await asyncio.wait_for(prefetch, 60) == "loaded"
    finally:
        commits.set()
        await runtime.settle()
    assert {r.model for r in runtime.state().device("cpu:0").residents} == {first.name, then.name}
