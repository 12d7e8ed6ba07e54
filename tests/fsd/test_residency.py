"""Shards are residents of the GPU manager's device tier like any model: one byte budget,
one LRU; a model's load can evict an idle shard set (whole), a shard set's load can evict an
idle model, and a shard serving a request is never evicted."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpufaas.core.api import ModelFormat, parse_spec
from gpufaas.core.layered import radix_net, save_shard
from gpufaas.core.modelio import save_model
from gpufaas.core.sharding import ChannelConfig, ShardLoad
from gpufaas.gpu_manager.chain import RuntimeFailure
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.shards import ShardHost
from gpufaas.scheduler.partition import partition, split

WIDTH = 256


def _model(tmp_path: Path) -> Any:
    path = tmp_path / "linear.pt"
    save_model(
        torch.jit.trace(nn.Linear(WIDTH, WIDTH).eval(), torch.zeros(1, WIDTH)),
        path, format=ModelFormat.TORCHSCRIPT, example_inputs=(torch.zeros(1, WIDTH),),
    )  # fmt: skip
    return parse_spec(
        {
            "model": {"uri": path.resolve().as_uri(), "format": "torchscript"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, WIDTH]}],
        }
    )


def _loads(tmp_path: Path, set_name: str) -> tuple[list[ShardLoad], int]:
    net = radix_net(WIDTH, 8, weights="random", seed=2)
    specs = split(net, partition(net, 2, method="block"))
    loads = []
    for spec in specs:
        path = tmp_path / f"{set_name}-{spec.shard}.safetensors"
        save_shard(path, spec)
        loads.append(
            ShardLoad(
                set_name=set_name, shard=spec.shard, shards=2, artifact=path.resolve().as_uri(),
                node="http://this-node", peers={}, channel=ChannelConfig(kind="local"),
            )
        )  # fmt: skip
    return loads, sum(s.weight_bytes for s in specs)


def _node(tmp_path: Path, capacity: int) -> tuple[NodeRuntime, ShardHost]:
    runtime = build_runtime(
        cpu_devices=1, device_memory_bytes=capacity, host_memory_bytes=64 << 20,
        artifact_dir=tmp_path / "artifacts", disk_cache_bytes=0, force_cpu=True,
    )  # fmt: skip
    (device,) = runtime.devices.values()
    return runtime, ShardHost(store=runtime.artifacts.store, devices=[device])


async def _model_bytes(tmp_path: Path) -> int:
    runtime, host = _node(tmp_path / "measure", 64 << 20)
    try:
        runtime.register("linear", _model(tmp_path))
        await runtime.load("linear", device_id="cpu:0")
        return runtime.devices["cpu:0"].tier.lru.used_bytes
    finally:
        await host.close()


async def test_a_shard_set_and_a_model_evict_each_other_from_one_device(tmp_path: Path) -> None:
    model_bytes = await _model_bytes(tmp_path)
    loads, set_bytes = _loads(tmp_path, "radix")
    # Room for the model or the shard set, never both.
    runtime, host = _node(tmp_path, max(model_bytes, set_bytes) + min(model_bytes, set_bytes) // 2)
    try:
        tier = runtime.devices["cpu:0"].tier
        runtime.register("linear", _model(tmp_path))
        await runtime.load("linear", device_id="cpu:0")
        assert tier.resident("linear") is not None

        for load in loads:  # the set's load evicts the idle model
            report = await host.launch(load)
            assert not report.errors, report.errors
        assert set(host.shards) == {"radix/0", "radix/1"}
        assert tier.current("linear") is None
        assert tier.lru.used_bytes == set_bytes  # the shards' bytes are the device's bytes

        await runtime.load("linear", device_id="cpu:0")  # the model's load evicts the idle set
        await asyncio.sleep(0.05)  # the set's other shard is dropped right after
        assert host.shards == {}
        assert tier.resident("linear") is not None
        state = runtime.devices["cpu:0"].state()
        assert [r.model for r in state.residents] == ["linear"]  # shards are not models
    finally:
        await host.close()


async def test_a_shard_serving_a_request_is_not_evicted(tmp_path: Path) -> None:
    model_bytes = await _model_bytes(tmp_path)
    loads, set_bytes = _loads(tmp_path, "radix")
    runtime, host = _node(tmp_path, max(model_bytes, set_bytes) + min(model_bytes, set_bytes) // 2)
    try:
        for load in loads:
            assert not (await host.launch(load)).errors
        tier = runtime.devices["cpu:0"].tier
        key = "radix/0"
        loaded = host.shards[key]
        assert loaded.tier.shards.hold(key, loaded.resident)  # what infer() does while it runs
        loaded.running += 1
        try:
            runtime.register("linear", _model(tmp_path))
            with contextlib.suppress(RuntimeFailure):  # no room beside the held shard: a 503
                await asyncio.wait_for(runtime.load("linear", device_id="cpu:0"), timeout=30)
            await asyncio.sleep(0.05)
            assert host.shards.get(key) is loaded  # still here, still in the device's LRU
            assert tier.current("\x00shard:" + key) is loaded.resident
        finally:
            loaded.running -= 1
            loaded.tier.shards.unhold(key, loaded.resident)
    finally:
        await host.close()


async def test_a_host_closed_right_after_an_eviction_ends_the_sets_cleanup_first(
    tmp_path: Path,
) -> None:
    loads, set_bytes = _loads(tmp_path, "radix")
    runtime, host = _node(tmp_path, 2 * set_bytes)
    try:
        for load in loads:
            assert not (await host.launch(load)).errors
        shards = list(host.shards.values())
        # Both shards leave the device at once; their cleanups are queued, none has run yet.
        assert runtime.devices["cpu:0"].memory.evict_unheld() == 2
        assert host.shards == {}
    finally:
        await host.close()
    assert all(loaded.dropped for loaded in shards)  # detached and released before the close
    cleanups = [t for t in asyncio.all_tasks() if "_after_eviction" in repr(t.get_coro())]
    assert cleanups == []  # none left to run on closed channels
