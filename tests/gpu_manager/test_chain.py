"""Each tier of the residency chain on its own, then registration-time sidecars end to end."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gm_support import Model, devices

from gpufaas.cache import CacheStats
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.artifact_source import ArtifactSource
from gpufaas.gpu_manager.chain import RuntimeFailure, spec_fingerprint
from gpufaas.gpu_manager.device_tier import DeviceTier, LoadLog, Sources
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.disk_tier import DiskTier
from gpufaas.gpu_manager.host_cache import HostMemory, HostTier
from gpufaas.gpu_manager.peer_source import PeerSource
from gpufaas.gpu_manager.runtime import NodeRuntime

Factory = Callable[..., NodeRuntime]


class Buffers:
    """Host buffers that count what is out."""

    def __init__(self) -> None:
        self.out = 0

    def take_buffer(self, nbytes: int) -> torch.Tensor:
        self.out += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def give_buffer(self, buffer: torch.Tensor) -> None:
        self.out -= 1


def disk_tier(
    tmp_path: Path, *, capacity: int = 1 << 30, buffers: Any = None
) -> tuple[DiskTier, CacheStats]:
    stats = CacheStats()
    source = ArtifactSource(ArtifactStore(tmp_path / "artifacts"), stats=stats)
    tier = DiskTier(
        directory=tmp_path / "sidecars",
        capacity_bytes=capacity,
        below=source,
        buffers=buffers or Buffers(),
        stats=stats,
        alignment=64,
        min_group_bytes=0,
        variable_dim=8,
    )
    return tier, stats


class Spawned:
    """Background work the tiers start, awaited by the test."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def __call__(self, coroutine: Any) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coroutine))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop()


# --- ArtifactSource -------------------------------------------------------------------------------


async def test_the_artifact_source_fetches_and_names_a_bad_uri(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    source = ArtifactSource(ArtifactStore(tmp_path / "a"), stats=CacheStats())
    with await source.acquire(model.name, model.spec) as path:
        assert path.read_bytes() == model.path.read_bytes()
    missing = model.with_spec(
        model={"uri": (tmp_path / "nope.pt").as_uri(), "format": "torchscript"}
    )
    with pytest.raises(RuntimeFailure) as failure:
        await source.acquire("nope", missing.spec)
    assert failure.value.status == 503 and "nope.pt" in str(failure.value)
    assert not source.evict(model.name)  # the remote store keeps everything


# --- DiskTier -------------------------------------------------------------------------------------


async def test_the_disk_tier_prepares_on_a_miss_and_serves_its_sidecar_after_a_store(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["deep"]
    tier, stats = disk_tier(tmp_path)

    with await tier.acquire(model.name, model.spec) as fresh:
        arena = fresh.take_arena()
        assert arena is not None and fresh.sidecar is None
        assert fresh.take_arena() is None  # adopted once
    skeleton = tier.skeleton(model.name, model.spec)
    assert skeleton is fresh.skeleton and skeleton.layout.arena_bytes == arena.numel()
    await tier.store(model.name, skeleton, arena)
    assert skeleton.sidecar is not None and skeleton.sidecar.is_file()
    assert tier.lru.used_bytes == skeleton.sidecar.stat().st_size

    held = await tier.acquire(model.name, model.spec)
    assert held.hit and held.value.sidecar == skeleton.sidecar and held.value.arena is None
    assert not tier.evict(model.name)  # being read: never deleted under the reader
    held.release()
    assert tier.evict(model.name) and not skeleton.sidecar
    snapshot = stats.snapshot()["disk"]
    assert (snapshot["hits"], snapshot["misses"]) == (1, 1)


async def test_the_disk_tier_keeps_to_its_byte_budget(
    models: dict[str, Model], tmp_path: Path
) -> None:
    first = models["deep"]
    second = dataclasses.replace(first, name="deep-again")
    sizing, _ = disk_tier(tmp_path / "sizing")
    await sizing.prefetch(first.name, first.spec)
    file_bytes = sizing.lru.used_bytes
    room = sizing.room_needed(sizing.skeletons[first.name])
    assert file_bytes <= room
    buffers = Buffers()
    tier, _ = disk_tier(tmp_path, capacity=file_bytes + room - 1, buffers=buffers)  # one fits

    for model in (first, second):
        await tier.prefetch(model.name, model.spec)

    assert buffers.out == 0  # registration-time arenas go back to host memory
    assert [e.key for e in tier.lru.entries_lru()] == [second.name]
    assert tier.skeletons[first.name].sidecar is None  # evicted
    (left,) = (tmp_path / "sidecars").glob("*.safetensors")  # the first one's file is gone
    assert left == tier.skeletons[second.name].sidecar
    assert tier.lru.used_bytes == file_bytes <= tier.lru.capacity_bytes


async def test_a_broken_artifact_backs_off_in_the_disk_tier(
    tmp_path: Path, models: dict[str, Model]
) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    spec = (
        models["tiny-mlp"].with_spec(model={"uri": broken.as_uri(), "format": "torchscript"}).spec
    )
    tier, _ = disk_tier(tmp_path)
    with pytest.raises(RuntimeFailure) as first:
        await tier.acquire("broken", spec)
    assert first.value.reason == "ModelLoadFailed" and first.value.retry_after_s
    with pytest.raises(RuntimeFailure) as again:
        await tier.acquire("broken", spec)
    assert "next try in" in str(again.value)


# --- HostTier -------------------------------------------------------------------------------------


async def test_the_host_tier_fills_from_the_artifact_then_refills_from_the_sidecar(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["small-cnn"]
    memory = HostMemory(capacity_bytes=1 << 30, pin=False)
    disk, stats = disk_tier(tmp_path, buffers=memory)
    spawned = Spawned()
    host = HostTier(capacity_bytes=1 << 30, memory=memory, below=disk, stats=stats, spawn=spawned)

    with await host.acquire(model.name, model.spec) as first:
        assert first.source == "artifact"
        weights = first.arena.clone()
    await spawned.settle()  # the sidecar is written behind the fill
    assert disk.skeletons[model.name].sidecar is not None
    assert host.evict(model.name) and host.tier.lru.used_bytes == 0

    with await host.acquire(model.name, model.spec) as refilled:
        assert refilled.source == "sidecar" and torch.equal(refilled.arena, weights)
        assert host.evict(model.name)  # held: it drains (bytes kept) instead of being freed
        assert [(d.model, d.holds) for d in host.state().draining] == [(model.name, 1)]
        assert host.tier.lru.used_bytes == refilled.size_bytes
    assert host.state().draining == [] and host.tier.lru.used_bytes == 0
    assert host.fills["sidecar"].count == 1


async def test_a_corrupt_sidecar_falls_back_to_the_artifact(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    memory = HostMemory(capacity_bytes=1 << 30, pin=False)
    disk, stats = disk_tier(tmp_path, buffers=memory)
    spawned = Spawned()
    host = HostTier(capacity_bytes=1 << 30, memory=memory, below=disk, stats=stats, spawn=spawned)
    with await host.acquire(model.name, model.spec):
        pass
    await spawned.settle()
    sidecar = disk.skeletons[model.name].sidecar
    assert sidecar is not None
    sidecar.write_bytes(sidecar.read_bytes()[:100])  # truncated
    host.evict(model.name)

    with await host.acquire(model.name, model.spec) as again:
        assert again.source == "artifact"
        prepared = again.arena.clone()
    with await host.acquire(model.name, model.spec) as cached:
        assert torch.equal(cached.arena, prepared)


# --- DeviceTier and PeerSource --------------------------------------------------------------------


async def test_a_device_tier_loads_from_the_host_and_a_peer_copies_from_it(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["deep"]
    memory = HostMemory(capacity_bytes=1 << 30, pin=False)
    disk, stats = disk_tier(tmp_path, buffers=memory)
    spawned = Spawned()
    host = HostTier(capacity_bytes=1 << 30, memory=memory, below=disk, stats=stats, spawn=spawned)
    tiers: dict[str, DeviceTier] = {}
    sources = Sources(peers=PeerSource(devices=lambda: tiers, stats=stats), host=host, disk=disk)
    for info in devices(2):
        tiers[info.id] = DeviceTier(
            info=info,
            backend=CpuBackend(info),
            sources=sources,
            stats=stats,
            log=LoadLog(),
            spawn=spawned,
            max_concurrency=2,
            overlap=True,
            admission_wait_s=0,
        )
    a, b = tiers["cpu:0"], tiers["cpu:1"]

    with await a.acquire(model.name, model.spec) as loaded:
        await a.arrived(loaded)
        assert loaded.source == "host"
    await spawned.settle()
    held = await a.acquire(model.name, model.spec)
    assert held.hit
    held.release()

    fingerprint = spec_fingerprint(model.spec)
    peer = sources.peers.acquire(model.name, fingerprint, to=b.info)
    assert peer is not None and peer.value.label == "peer:cpu:0"
    assert a.tier.lru.peek(model.name).pins == 1  # held on its device while copied
    peer.release()
    assert a.tier.lru.peek(model.name).pins == 0
    assert sources.peers.acquire(model.name, fingerprint, to=a.info) is None  # b has none
    assert a.evict(model.name) and a.tier.lru.used_bytes == 0


# --- registration ---------------------------------------------------------------------------------


async def test_registration_writes_the_sidecar_so_the_first_request_reads_it(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    runtime = runtime_factory(register=[model], prepare_on_register=True)
    await runtime.settle()
    state = runtime.state()
    assert state.disk is not None and [r.model for r in state.disk.residents] == [model.name]
    assert state.host.residents == []  # prepared for disk only; host memory given back

    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")

    assert not outcome.cache_hit
    assert set(runtime.state().host_fills) == {"sidecar"}  # no artifact read on the request
    reference = model.reference(model.inputs())
    (array, _) = next(iter(outcome.outputs.values()))
    torch.testing.assert_close(torch.from_numpy(array), torch.from_numpy(reference))


async def test_a_request_during_registration_joins_its_preparation(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(register=[model], prepare_on_register=True)
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    assert outcome.outputs
    assert runtime.stats.snapshot()["disk"]["misses"] <= 2
    fills = runtime.state().host_fills
    assert sum(f.count for f in fills.values()) == 1  # one host fill, however it raced


async def test_a_function_unregistered_while_prepared_leaves_nothing_on_disk(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(register=[model], prepare_on_register=True)
    runtime.unregister(model.name)  # the preparation is queued or running
    await runtime.settle()
    state = runtime.state()
    assert state.disk is not None and state.disk.residents == []
    assert model.name not in runtime.disk.skeletons


async def test_a_zero_disk_cache_writes_no_sidecars_and_still_serves(
    runtime_factory: Factory, models: dict[str, Model], tmp_path: Path
) -> None:
    from gpufaas.gpu_manager.cli import _parser

    assert _parser().parse_args(["--disk-cache", "0"]).disk_cache == "0"  # the CLI's switch
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model], prepare_on_register=True, disk_capacity_bytes=0)
    await runtime.settle()
    first = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    state = runtime.state()
    assert state.disk is not None and state.disk.residents == [] and state.disk.used_bytes == 0
    assert not list(runtime.disk.directory.glob("*.safetensors"))
    assert first.outputs and set(state.host_fills) == {"artifact"}
