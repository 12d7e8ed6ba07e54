"""The warm step: the usual warm request served in one straight step, as ``infer`` serves it,
and a CPU device's inline rule judged by the CPU a pass took."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from gm_support import Model

from gpufaas.core.http import CACHE_HEADER, DEVICE_HEADER
from gpufaas.core.protocol import HEADER_LENGTH, decode_response, encode_request
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.backends import backend_for
from gpufaas.gpu_manager.device_memory import as_model
from gpufaas.gpu_manager.inline import WINDOW, InlineForwards
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app


async def _measured(runtime: NodeRuntime, model: Model) -> None:
    """Run the model's first passes (measured in a thread) so it may run on the loop, and
    wait for its load to commit (in the background): then it is resident."""
    runtime.devices["cpu:0"].inline.max_ms = 1_000.0  # the rule, not the box, decides here
    for _ in range(WINDOW):
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()


@pytest.fixture
async def warm_tiny(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> tuple[NodeRuntime, Model]:
    """A runtime with tiny-mlp resident on cpu:0 and measured fit for the loop."""
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    await _measured(runtime, model)
    return runtime, model


async def test_a_warm_request_is_answered_in_one_step_as_infer_answers_it(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], hops: list[str]
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    spec = runtime.spec(model.name)
    # not resident yet: the step declines and does nothing (a load is infer's job)
    assert runtime.infer_warm(model.name, spec, model.inputs(), device_id="cpu:0") is None
    await _measured(runtime, model)
    used: list[tuple[str, str]] = []
    runtime.on_use(lambda name, device: used.append((name, device)))
    tier = runtime.stats.tier(runtime.devices["cpu:0"].name)
    hits = tier.hits
    threaded = len(hops)

    warm = runtime.infer_warm(model.name, spec, model.inputs(), device_id="cpu:0")
    usual = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")

    assert warm is not None and len(hops) == threaded  # on the loop, no thread hop
    assert warm.outputs.keys() == usual.outputs.keys()
    for name, (array, datatype) in warm.outputs.items():
        assert datatype == usual.outputs[name][1]
        np.testing.assert_array_equal(array, usual.outputs[name][0])
    assert (warm.cache_hit, warm.load_ms, warm.load_source, warm.batch_size) == (
        usual.cache_hit,
        usual.load_ms,
        usual.load_source,
        usual.batch_size,
    )
    assert warm.size_bytes == usual.size_bytes
    # what infer's hold does, the step does: the use listeners, the hit count, the release
    assert used == [(model.name, "cpu:0")] * 2
    assert tier.hits == hits + 2
    assert runtime.drop_everywhere(model.name) == ["cpu:0"]  # nothing left holding it


async def test_the_warm_step_declines_what_it_must_not_serve(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    spec = runtime.spec(model.name)
    await _measured(runtime, model)
    device = runtime.devices["cpu:0"]

    def step(**kwargs: Any) -> Any:
        return runtime.infer_warm(
            model.name, spec, model.inputs(), **{"device_id": "cpu:0", **kwargs}
        )

    assert step() is not None
    assert step(device_id=None) is None  # no device named: infer picks one
    assert step(device_id="cpu:9") is None  # an unknown device: infer's 400
    held = [device.slots.acquire() for _ in range(device.max_concurrency)]
    await asyncio.gather(*held)  # every slot taken: it would have to wait, so infer serves it
    assert step() is None
    for _ in held:
        device.slots.release()
    device.inline.running = 1  # another pass on the device: the thread, through infer
    assert step() is None
    device.inline.running = 0
    device.inline.max_ms = 1e-9
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert step() is None  # measured too slow for the loop: the thread, through infer
    batched = spec.model_copy(
        update={"batching": spec.batching.model_copy(update={"max_batch_size": 4})}
    )
    device.inline.max_ms = 1_000.0
    assert runtime.infer_warm(model.name, batched, model.inputs(), device_id="cpu:0") is None


async def test_the_nodes_warm_requests_never_reach_infer(
    warm_tiny: tuple[NodeRuntime, Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, model = warm_tiny
    calls: list[str] = []
    usual = runtime.infer

    async def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return await usual(name, *args, **kwargs)

    monkeypatch.setattr(runtime, "infer", counted)
    for answer in await _post(runtime, model, count=5):
        assert answer.status_code == 200 and answer.headers[CACHE_HEADER] == "hit"
    assert calls == []


async def _post(
    runtime: NodeRuntime, model: Model, *, count: int, admission: DeviceAdmission | None = None
) -> list[httpx.Response]:
    """``count`` inference requests for ``model`` on cpu:0 through the node's app."""
    tensors = {
        t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, model.inputs(), strict=True)
    }
    content, headers = encode_request(tensors)
    headers[DEVICE_HEADER] = "cpu:0"
    transport = httpx.ASGITransport(app=create_app(runtime, admission=admission))
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        return [
            await client.post(f"/v2/models/{model.name}/infer", content=content, headers=headers)
            for _ in range(count)
        ]


async def test_a_warm_pass_out_of_memory_is_served_and_counted_once(
    warm_tiny: tuple[NodeRuntime, Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, model = warm_tiny
    expected = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    used: list[tuple[str, str]] = []
    runtime.on_use(lambda name, device: used.append((name, device)))
    tier = runtime.stats.tier(runtime.devices["cpu:0"].name)
    hits = tier.hits
    backend = backend_for(model.spec.model.format)
    forward = backend.run
    refused: list[int] = []

    def out_of_memory_once(*args: Any, **kwargs: Any) -> Any:
        if not refused:  # the warm step's pass on the loop
            refused.append(1)
            raise MemoryError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend, "run", out_of_memory_once)
    admission = DeviceAdmission(concurrency=4)
    (answer,) = await _post(runtime, model, count=1, admission=admission)
    assert answer.status_code == 200 and answer.headers[CACHE_HEADER] == "hit"
    length = int(answer.headers[HEADER_LENGTH])
    _, arrays = decode_response(answer.content, header_length=length)
    (name,) = expected.outputs
    np.testing.assert_array_equal(arrays[name], expected.outputs[name][0])
    assert refused == [1]  # the pass ran out of memory once, then was served
    # one request, one use and one hit: not counted again by the path that served it
    assert used == [(model.name, "cpu:0")]
    assert tier.hits == hits + 1
    assert admission.running("cpu:0") == 0 and runtime.devices["cpu:0"].outstanding == 0
    assert runtime.drop_everywhere(model.name) == ["cpu:0"]  # nothing left holding it


async def test_every_pass_runs_in_inference_mode(warm_tiny: tuple[NodeRuntime, Model]) -> None:
    runtime, model = warm_tiny
    resident = as_model(runtime.devices["cpu:0"].tier.resident(model.name))
    assert resident is not None and resident.module is not None
    module = resident.module
    modes: list[bool] = []

    def recording(*tensors: torch.Tensor) -> Any:
        modes.append(torch.is_inference_mode_enabled())
        return module(*tensors)

    resident.module = recording  # type: ignore[assignment]
    spec = runtime.spec(model.name)
    assert runtime.infer_warm(model.name, spec, model.inputs(), device_id="cpu:0") is not None
    await runtime.infer(model.name, model.inputs(), device_id="cpu:0")  # the usual path
    assert modes == [True, True] and not torch.is_inference_mode_enabled()


def test_the_warm_admission_never_waits_and_never_jumps_the_queue() -> None:
    admission = DeviceAdmission(concurrency=1)
    gate = admission.take_now("cpu:0")
    assert gate is not None and admission.running("cpu:0") == 1 and admission.peak("cpu:0") == 1
    assert admission.take_now("cpu:0") is None  # full: the caller takes the waiting slot
    admission.release(gate)
    assert admission.running("cpu:0") == 0
    loop = asyncio.new_event_loop()  # a waiter's future needs one; closed, not left to GC
    try:
        admission._gate("cpu:0").waiters.append(asyncio.Future(loop=loop))
        assert admission.take_now("cpu:0") is None  # someone waits: not ahead of them
    finally:
        loop.close()
    assert DeviceAdmission(concurrency=None).take_now("cpu:0") is not None


# -- a CPU device's inline rule: the CPU a pass took, not its wall time -------------------------


def _sleeping_pass(policy: InlineForwards, ms: float) -> None:
    """A pass that takes ``ms`` by the wall and almost no CPU: a tiny pass preempted by
    another process on a busy host looks like this to the clock."""
    since = policy.clock()
    started = time.perf_counter()
    time.sleep(ms / 1000)
    policy.measured("m", (time.perf_counter() - started) * 1000, cpu_since=since)


def _spinning_pass(policy: InlineForwards, ms: float) -> None:
    """A pass that takes ``ms`` of CPU: a model too long for the loop. It spins until the
    process has used ``ms`` of CPU, not ``ms`` by the wall: on a loaded box a wall-clock spin
    can get less CPU than the rule's bound, and the test failed that way under load."""
    since = policy.clock()
    started = time.perf_counter()
    cpu_started = time.process_time()
    while time.process_time() - cpu_started < ms / 1000:
        pass
    policy.measured("m", (time.perf_counter() - started) * 1000, cpu_since=since)


def test_a_cpu_device_keeps_a_preempted_tiny_pass_on_the_loop() -> None:
    policy = InlineForwards(max_ms=1.0, by_cpu=True)
    for _ in range(WINDOW):
        _sleeping_pass(policy, 3.0)  # slow by the wall, at almost no CPU
    assert policy.inline("m", landed=True)
    by_wall = InlineForwards(max_ms=1.0)  # a GPU's rule: the wall time (it waits on the device)
    for _ in range(WINDOW):
        _sleeping_pass(by_wall, 3.0)
    assert not by_wall.inline("m", landed=True)


def test_a_cpu_device_still_sends_a_long_pass_to_the_thread() -> None:
    policy = InlineForwards(max_ms=1.0, by_cpu=True)
    for _ in range(WINDOW):
        _sleeping_pass(policy, 0.0)
    assert policy.inline("m", landed=True)
    _spinning_pass(policy, 4.0)
    _spinning_pass(policy, 4.0)  # two passes that held the CPU too long: back to the thread
    assert not policy.inline("m", landed=True)


def test_only_cpu_devices_judge_by_cpu(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> None:
    runtime = runtime_factory(register=[models["tiny-mlp"]])
    assert all(d.inline.by_cpu == (d.info.kind == "cpu") for d in runtime.devices.values())
    assert runtime.devices["cpu:0"].inline.by_cpu
