"""The node runtime on CPU devices: both tiers, every load path, overlap, pins, batching."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gm_support import Model, ScriptedBackend, devices

from gpufaas.core.modelio import load_model, tensor_bytes
from gpufaas.core.node import DrainingState, Residency, ResidentState
from gpufaas.gpu_manager.runtime import InferOutcome, NodeRuntime, RuntimeFailure

Factory = Callable[..., NodeRuntime]


def output(outcome: InferOutcome) -> np.ndarray:
    (array, _datatype) = next(iter(outcome.outputs.values()))
    return array


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def backend(runtime: NodeRuntime, device_id: str) -> ScriptedBackend:
    found = runtime.devices[device_id].backend
    assert isinstance(found, ScriptedBackend)
    return found


def resident(runtime: NodeRuntime, device_id: str) -> dict[str, ResidentState]:
    return {r.model: r for r in runtime.state().device(device_id).residents}


async def wait_for(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


# --- the two tiers and the load paths -----------------------------------------------------------


async def test_a_miss_loads_from_host_and_a_hit_has_no_load_cost(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    runtime = runtime_factory(register=[model])
    inputs = model.inputs(batch=3)

    first = await runtime.infer(model.name, inputs, device_id="cpu:0")
    await runtime.settle()  # the load commits in the background after the first answer
    second = await runtime.infer(model.name, inputs, device_id="cpu:0")

    assert (first.cache_hit, first.load_source) == (False, "host")
    assert (second.cache_hit, second.load_source, second.load_ms) == (True, "device", 0.0)
    close(output(first), model.reference(inputs))
    close(output(second), model.reference(inputs))
    stats = runtime.stats.snapshot()
    assert stats["device"]["hits"] == 1 and stats["device"]["misses"] == 1
    assert stats["host"]["misses"] == 1 and stats["host"]["bytes_out"] == first.size_bytes - (
        resident(runtime, "cpu:0")[model.name].reserve_bytes
    )


async def test_a_model_on_a_neighbouring_device_is_copied_device_to_device(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(register=[model])
    inputs = model.inputs()
    await runtime.infer(model.name, inputs, device_id="cpu:0")
    await runtime.settle()

    copied = await runtime.infer(model.name, inputs, device_id="cpu:1")
    await runtime.settle()

    assert (copied.cache_hit, copied.load_source) == (False, "peer:cpu:0")
    close(output(copied), model.reference(inputs))
    assert resident(runtime, "cpu:1")[model.name].source == "peer:cpu:0"
    assert runtime.state().loads["device->device"].count == 1
    assert runtime.stats.snapshot()["host"]["hits"] == 0  # the host tier was not read


async def test_without_peer_access_the_copy_comes_from_host(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(device_list=devices(2, peers=False), register=[model])
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    second = await runtime.infer(model.name, model.inputs(), device_id="cpu:1")
    assert second.load_source == "host"
    assert runtime.stats.snapshot()["host"]["hits"] == 1


async def test_concurrent_loads_on_two_devices_share_one_host_fill(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(device_list=devices(2, peers=False), register=[model])
    inputs = model.inputs()
    outcomes = await asyncio.gather(
        runtime.infer(model.name, inputs, device_id="cpu:0"),
        runtime.infer(model.name, inputs, device_id="cpu:1"),
    )
    for outcome in outcomes:
        assert outcome.load_source == "host"
        close(output(outcome), model.reference(inputs))
    assert runtime.state().host_fills["artifact"].count == 1


async def test_exported_models_load_concurrently(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    # torch.export.load is not thread-safe; the host tier serialises it.
    exported = [models["small-cnn"], models["constant"]]
    copies = [dataclasses.replace(m, name=f"{m.name}-{i}") for m in exported for i in range(2)]
    runtime = runtime_factory(register=copies)
    outcomes = await asyncio.gather(
        *(runtime.infer(m.name, m.inputs(), device_id=f"cpu:{i % 2}") for i, m in enumerate(copies))
    )
    for outcome, model in zip(outcomes, copies, strict=True):
        close(output(outcome), model.reference(model.inputs()))


async def test_host_refill_after_eviction_reads_the_sidecar(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    small, large = models["tiny-mlp"], models["small-cnn"]
    # The host tier holds one of the two at a time; devices do not share copies.
    runtime = runtime_factory(
        device_list=devices(3, peers=False), host_capacity=23_000, register=[small, large]
    )
    inputs = small.inputs()
    await runtime.infer(small.name, inputs, device_id="cpu:0")
    await runtime.settle()  # the sidecar is written in the background
    await runtime.infer(large.name, large.inputs(), device_id="cpu:0")
    await runtime.settle()
    assert [r.model for r in runtime.state().host.residents] == [large.name]

    again = await runtime.infer(small.name, inputs, device_id="cpu:2")

    close(output(again), small.reference(inputs))
    fills = runtime.state().host_fills
    assert fills["sidecar"].count == 1 and fills["artifact"].count == 2
    assert fills["sidecar"].bytes == runtime.disk.skeletons[small.name].layout.arena_bytes


async def test_a_model_too_big_for_the_host_tier_is_served_uncached(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    runtime = runtime_factory(host_capacity=1000, register=[model])
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    close(output(outcome), model.reference(model.inputs()))
    assert runtime.state().host.residents == [] and runtime.host.tier.lru.used_bytes == 0


# --- overlap ------------------------------------------------------------------------------------


async def test_compute_starts_before_the_last_layer_lands(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(scripted=True, register=[model])
    inputs = model.inputs()

    outcome = await runtime.infer(model.name, inputs, device_id="cpu:0")

    log = backend(runtime, "cpu:0").log
    groups = len(runtime.disk.skeletons[model.name].layout.groups)
    assert groups == 8  # inp, 6 layers, out: one event per layer
    waits = [g for kind, g in log if kind == "wait"]
    assert waits == list(range(groups))  # each layer waited for once, in forward order
    assert log.index(("wait", 0)) < log.index(("copied", groups - 1))
    assert log.index(("wait", groups - 1)) < log.index(("copied", groups - 1))
    close(output(outcome), model.reference(inputs))


async def test_once_arrived_a_model_runs_without_waiting(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(scripted=True, register=[model])
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    log = backend(runtime, "cpu:0").log
    before = len(log)
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert len(log) == before


async def test_without_overlap_compute_waits_for_the_whole_model(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(scripted={"hold_last": False}, register=[model], overlap=False)
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    log = backend(runtime, "cpu:0").log
    assert [kind for kind, _ in log] == ["copied"] * 8  # every layer landed, none waited for
    close(output(outcome), model.reference(model.inputs()))


async def test_a_failed_copy_is_a_clear_error_and_the_next_request_reloads(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(scripted={"hold_last": False}, register=[model])
    backend(runtime, "cpu:0").fail_group = 3
    with pytest.raises(RuntimeFailure) as failure:
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert failure.value.status == 503 and failure.value.reason == "ModelLoadFailed"
    await runtime.settle()
    assert resident(runtime, "cpu:0") == {} and runtime.devices["cpu:0"].tier.lru.used_bytes == 0

    backend(runtime, "cpu:0").fail_group = None
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    close(output(outcome), model.reference(model.inputs()))


# --- memory accounting --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-mlp", "small-cnn", "tied", "constant"])
async def test_a_resident_model_takes_its_tensor_bytes_plus_its_reserve(
    runtime_factory: Factory, models: dict[str, Model], name: str
) -> None:
    model = models[name]
    runtime = runtime_factory(register=[model])
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()

    row = resident(runtime, "cpu:0")[name]
    weights = tensor_bytes(load_model(model.path, format=model.format))
    skeleton = runtime.disk.skeletons[name]
    assert row.weights_bytes == weights
    assert row.arena_bytes is not None and row.reserve_bytes is not None
    assert row.size_bytes == outcome.size_bytes == row.arena_bytes + row.reserve_bytes
    assert row.reserve_bytes == skeleton.reserve_bytes > 0
    device_model = runtime.devices["cpu:0"].tier.current(name)
    assert device_model is not None and device_model.arena is not None
    assert device_model.arena.numel() == row.arena_bytes  # what the device really holds
    assert row.arena_bytes - weights < 64 * len(skeleton.layout.storages)
    assert runtime.devices["cpu:0"].tier.lru.used_bytes == row.size_bytes
    host_row = runtime.state().host.residents[0]
    assert host_row.size_bytes == row.arena_bytes


async def test_a_model_in_use_is_never_evicted(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    small, large = models["tiny-mlp"], models["small-cnn"]
    probe = runtime_factory(register=[small, large])
    size = {}
    for model in (small, large):
        size[model.name] = (
            await probe.infer(model.name, model.inputs(), device_id="cpu:0")
        ).size_bytes
    capacity = size[small.name] + size[large.name] - 1  # one at a time
    runtime = runtime_factory(
        device_list=devices(1, capacity=capacity),
        scripted=True,
        register=[small, large],
        admission_wait_s=0,
    )
    compute = backend(runtime, "cpu:0")
    compute.gate.clear()
    busy = asyncio.create_task(runtime.infer(small.name, small.inputs(), device_id="cpu:0"))
    await wait_for(lambda: compute.computing == 1)

    with pytest.raises(RuntimeFailure) as refused:
        await runtime.infer(large.name, large.inputs(), device_id="cpu:0")
    assert refused.value.status == 503 and refused.value.reason == "InsufficientMemory"
    assert "cannot be freed now" in str(refused.value) and str(size[large.name]) in str(
        refused.value
    )

    compute.gate.set()
    close(output(await busy), small.reference(small.inputs()))
    # The pin is released just after the answer is delivered (admission_wait_s=0 won't wait).
    await wait_for(lambda: runtime.devices["cpu:0"].tier.lru.pinned_bytes == 0)
    loaded = await runtime.infer(large.name, large.inputs(), device_id="cpu:0")
    assert loaded.load_source == "host"
    assert list(resident(runtime, "cpu:0")) == [large.name]  # the small one was evicted now
    assert runtime.stats.snapshot()["device"]["evictions"] == 1


async def test_a_load_waits_for_models_in_use_to_be_released(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    small, large = models["tiny-mlp"], models["small-cnn"]
    probe = runtime_factory(register=[small, large])
    size = {}
    for model in (small, large):
        size[model.name] = (
            await probe.infer(model.name, model.inputs(), device_id="cpu:0")
        ).size_bytes
    runtime = runtime_factory(
        device_list=devices(1, capacity=size[small.name] + size[large.name] - 1),
        scripted=True,
        register=[small, large],
        admission_wait_s=30,
    )
    compute = backend(runtime, "cpu:0")
    compute.gate.clear()
    busy = asyncio.create_task(runtime.infer(small.name, small.inputs(), device_id="cpu:0"))
    await wait_for(lambda: compute.computing == 1)
    waiting = asyncio.create_task(runtime.infer(large.name, large.inputs(), device_id="cpu:0"))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # neither refused nor evicting the model in use
    assert list(resident(runtime, "cpu:0")) == [small.name]

    compute.gate.set()
    close(output(await busy), small.reference(small.inputs()))
    # woken by the release (the device's change event), not by its 30 s admission deadline
    loaded = await asyncio.wait_for(waiting, timeout=10)
    close(output(loaded), large.reference(large.inputs()))
    assert list(resident(runtime, "cpu:0")) == [large.name]


async def test_a_model_that_cannot_fit_gets_a_clear_error_and_serving_goes_on(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    infos = devices(2)
    infos[0] = dataclasses.replace(infos[0], capacity_bytes=10_000, total_bytes=10_000)
    runtime = runtime_factory(device_list=infos, register=[model])

    with pytest.raises(RuntimeFailure) as refused:
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert refused.value.status == 503 and refused.value.reason == "InsufficientMemory"
    assert "10000" in str(refused.value)  # names the capacity it could not fit in
    assert runtime.devices["cpu:0"].tier.lru.used_bytes == 0

    served = await runtime.infer(model.name, model.inputs(), device_id="cpu:1")
    close(output(served), model.reference(model.inputs()))


async def test_unloading_a_model_in_use_keeps_its_bytes_until_the_request_ends(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    runtime = runtime_factory(scripted=True, register=[model])
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    tier = runtime.devices["cpu:0"].tier
    size = tier.lru.used_bytes
    compute = backend(runtime, "cpu:0")
    compute.gate.clear()
    busy = asyncio.create_task(runtime.infer(model.name, model.inputs(), device_id="cpu:0"))
    await wait_for(lambda: compute.computing == 1)

    assert runtime.unload(model.name, device_id="cpu:0") == ["cpu:0"]
    device_state = runtime.state().devices[0]
    assert device_state.residents == []
    assert device_state.draining == [DrainingState(model=model.name, size_bytes=size, holds=1)]
    assert device_state.used_bytes == size  # still in use: not free for another model

    compute.gate.set()
    close(output(await busy), model.reference(model.inputs()))
    assert tier.lru.used_bytes == 0 and runtime.state().devices[0].draining == []
    assert runtime.state().devices[0].pooled_bytes > 0  # its arena awaits re-use

    again = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert again.load_source == "host"
    assert compute.pool.reused == 1


async def test_changed_weights_drop_every_cached_copy(
    runtime_factory: Factory, models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()
    sidecar = runtime.disk.skeletons[model.name].sidecar
    assert sidecar is not None and sidecar.is_file()
    moved = tmp_path / "moved.pt"
    shutil.copy(model.path, moved)
    runtime.register(
        model.name, model.with_spec(model={"uri": moved.as_uri(), "format": "torchscript"}).spec
    )

    state = runtime.state()
    assert state.devices[0].residents == [] and state.host.residents == []
    assert model.name not in runtime.disk.skeletons
    assert not sidecar.exists()  # the old weights' sidecar is gone with them
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert (outcome.cache_hit, outcome.load_source) == (False, "host")


async def test_bad_requests_get_clear_errors(
    runtime_factory: Factory, models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    runtime = runtime_factory(register=[model])
    runtime.register(
        "broken", model.with_spec(model={"uri": broken.as_uri(), "format": "torchscript"}).spec
    )

    with pytest.raises(RuntimeFailure) as unknown:
        await runtime.infer("nope", model.inputs())
    assert unknown.value.status == 404
    with pytest.raises(RuntimeFailure) as device:
        await runtime.infer(model.name, model.inputs(), device_id="cuda:7")
    assert device.value.status == 400 and "cpu:0, cpu:1" in str(device.value)
    with pytest.raises(RuntimeFailure) as load:
        await runtime.infer("broken", model.inputs(), device_id="cpu:0")
    assert load.value.status == 503 and load.value.reason == "ModelLoadFailed"
    with pytest.raises(RuntimeFailure) as rejected:
        await runtime.infer(model.name, [np.zeros((2, 3), np.float32)], device_id="cpu:0")
    assert rejected.value.status == 400 and rejected.value.reason == "ModelError"

    fine = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    close(output(fine), model.reference(model.inputs()))


async def test_repository_load_waits_until_the_model_is_resident(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["deep"]
    runtime = runtime_factory(register=[model])
    assert await runtime.load(model.name, device_id="cpu:1") == "cpu:1"
    row = resident(runtime, "cpu:1")[model.name]
    assert row.state is Residency.RESIDENT and row.arrived and row.pins == 0


# --- concurrency and batching -------------------------------------------------------------------


async def test_requests_for_different_models_run_concurrently_up_to_the_limit(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    base = models["tiny-mlp"]
    copies = [dataclasses.replace(base, name=f"mlp-{i}") for i in range(3)]
    runtime = runtime_factory(
        device_list=devices(1), scripted=True, register=copies, max_concurrency_per_device=2
    )
    compute = backend(runtime, "cpu:0")
    compute.gate.clear()
    tasks = [
        asyncio.create_task(runtime.infer(m.name, m.inputs(), device_id="cpu:0")) for m in copies
    ]
    await wait_for(lambda: compute.computing == 2)
    await asyncio.sleep(0.2)  # room for a third to start, were the limit not enforced
    assert compute.computing == 2
    compute.gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert compute.peak_computing == 2
    for outcome in outcomes:
        close(output(outcome), base.reference(base.inputs()))


async def test_concurrent_requests_for_one_model_are_batched(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"].with_spec(batching={"maxBatchSize": 8, "maxDelayMs": 300})
    runtime = runtime_factory(register=[model])
    requests = [model.inputs(batch=1, seed=i) for i in range(5)]

    outcomes = await asyncio.gather(
        *(runtime.infer(model.name, inputs, device_id="cpu:0") for inputs in requests)
    )

    assert [o.batch_size for o in outcomes] == [5] * 5
    assert runtime.batchers[("cpu:0", model.name)].batches == 1
    for outcome, inputs in zip(outcomes, requests, strict=True):
        assert output(outcome).shape == (1, 4)
        close(output(outcome), model.reference(inputs))
    whole = await runtime.infer(model.name, model.inputs(batch=8), device_id="cpu:0")
    assert whole.batch_size == 1  # a full batch on its own goes straight through


async def test_a_batch_does_not_wait_for_more_requests_than_the_device_runs_at_once(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    """Batches of up to 8 on a device that runs 2 requests at once (the node admits as many):
    2 waiting is a batch, not a wait of the whole delay for 6 more that cannot come."""
    model = models["tiny-mlp"].with_spec(batching={"maxBatchSize": 8, "maxDelayMs": 10_000})
    runtime = runtime_factory(register=[model], max_concurrency_per_device=2)
    requests = [model.inputs(batch=1, seed=i) for i in range(2)]

    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(runtime.infer(model.name, inputs, device_id="cpu:0") for inputs in requests)
        ),
        timeout=5,  # half the delay: a batch that waited it out fails here
    )

    assert [o.batch_size for o in outcomes] == [2, 2]


async def test_only_requests_of_the_same_shape_share_a_batch(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["row-sum"]
    runtime = runtime_factory(register=[model])
    rng = np.random.default_rng(1)
    requests = [[rng.standard_normal((1, width), dtype=np.float32)] for width in (3, 5, 3, 3, 5)]

    outcomes = await asyncio.gather(
        *(runtime.infer(model.name, inputs, device_id="cpu:0") for inputs in requests)
    )

    assert [o.batch_size for o in outcomes] == [3, 2, 3, 3, 2]
    for outcome, (x,) in zip(outcomes, requests, strict=True):
        close(output(outcome), x.sum(axis=1, keepdims=True) * 3.0)


async def test_a_request_the_model_rejects_fails_alone_in_its_batch(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["lookup"]
    runtime = runtime_factory(register=[model])
    good = [model.inputs(batch=1, seed=i) for i in range(2)]
    bad = [np.array([[1, 2, 99, 3]], dtype=np.int64)]  # 99: no such row in the table

    results = await asyncio.gather(
        *(runtime.infer(model.name, r, device_id="cpu:0") for r in (good[0], bad, good[1])),
        return_exceptions=True,
    )

    assert isinstance(results[1], RuntimeFailure) and results[1].status == 400
    # Caught by the index-bound check before upload (a device-side assert on a GPU), by name.
    assert results[1].reason == "InvalidInput" and "'ids' holds 99" in str(results[1])
    for result, inputs in ((results[0], good[0]), (results[2], good[1])):
        assert isinstance(result, InferOutcome) and result.batch_size == 1
        close(output(result), model.reference(inputs))


async def test_a_load_evicts_the_schedulers_hinted_victims_first(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    base = models["tiny-mlp"]
    a, b, c = (dataclasses.replace(base, name=n) for n in ("copy-a", "copy-b", "copy-c"))
    probe = runtime_factory(register=[a])
    size = (await probe.infer(a.name, a.inputs(), device_id="cpu:0")).size_bytes
    runtime = runtime_factory(device_list=devices(1, capacity=2 * size), register=[a, b, c])
    for model in (a, b):
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()  # both committed: an arriving copy is never a victim
    # LRU would evict copy-a; the scheduler says copy-b is cheaper to lose.
    loaded = await runtime.infer(c.name, c.inputs(), device_id="cpu:0", evict_first=["copy-b"])
    assert not loaded.cache_hit
    assert sorted(resident(runtime, "cpu:0")) == ["copy-a", "copy-c"]
    # A hint that names a model not there (or not evictable) is advice only: LRU decides.
    await runtime.infer(b.name, b.inputs(), device_id="cpu:0", evict_first=["gone", "copy-b"])
    assert sorted(resident(runtime, "cpu:0")) == ["copy-b", "copy-c"]


async def test_a_hint_applies_only_to_the_load_its_own_request_causes(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    base = models["tiny-mlp"]
    a, b, c = (dataclasses.replace(base, name=f"copy-{n}") for n in "abc")
    probe = runtime_factory(register=[a])
    size = (await probe.infer(a.name, a.inputs(), device_id="cpu:0")).size_bytes
    runtime = runtime_factory(device_list=devices(1, capacity=2 * size), register=[a, b, c])

    async def call(model: Model, hint: tuple[str, ...] = ()) -> InferOutcome:
        return await runtime.infer(model.name, model.inputs(), device_id="cpu:0", evict_first=hint)

    await call(a)
    await call(c)
    await call(c, ("copy-a",))  # a hit: the hint causes no load and must not linger
    await call(a)
    await call(b)  # evicts c, the least recent
    await call(a)
    reloaded = await call(c)  # no hint now: LRU evicts b (a lingering hint would evict a)
    assert not reloaded.cache_hit
    assert sorted(resident(runtime, "cpu:0")) == ["copy-a", "copy-c"]
    hinted = await call(b, ("copy-a",))  # its own hint: a goes, though c is least recent
    assert not hinted.cache_hit
    assert sorted(resident(runtime, "cpu:0")) == ["copy-b", "copy-c"]
