"""Device memory running out during a load: evict what is not in use, retry
once, then a clear 503; the manager keeps serving its other models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gm_support import Model, devices

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.device_faults import DeviceOutOfMemory
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.runtime import NodeRuntime, RuntimeFailure


class FragmentedBackend(CpuBackend):
    """A device whose allocator refuses the next ``refuse`` arenas though the byte
    accounting says they fit (fragmentation, or memory taken by another process)."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.refuse = 0
        self.refusals = 0

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[Any, bool]:
        if self.refuse > 0:
            self.refuse -= 1
            self.refusals += 1
            raise DeviceOutOfMemory(f"{self.info.id}: out of memory allocating {nbytes} bytes")
        return super().allocate(nbytes, in_use_bytes=in_use_bytes)


def _runtime(tmp_path: Path, models: list[Model]) -> tuple[NodeRuntime, FragmentedBackend]:
    info = devices(1)[0]
    backend = FragmentedBackend(info)
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
        backends={info.id: backend},
        prepare_on_register=False,
    )
    for model in models:
        runtime.register(model.name, model.spec)
    return runtime, backend


def _resident(runtime: NodeRuntime) -> set[str]:
    return {r.model for r in runtime.state().devices[0].residents}


async def test_out_of_memory_evicts_unused_models_and_retries_once(
    models: dict[str, Model], tmp_path: Path
) -> None:
    first, second = models["tiny-mlp"], models["deep"]
    runtime, backend = _runtime(tmp_path, [first, second])
    await runtime.infer(first.name, first.inputs(), device_id="cpu:0")
    await runtime.settle()
    assert _resident(runtime) == {first.name}

    backend.refuse = 1
    outcome = await runtime.infer(second.name, second.inputs(), device_id="cpu:0")
    assert outcome.outputs and backend.refusals == 1
    await runtime.settle()
    assert _resident(runtime) == {second.name}  # the unused model made room
    assert runtime.stats.snapshot()["device"]["evictions"] >= 1


async def test_out_of_memory_after_the_retry_is_a_503_and_serving_goes_on(
    models: dict[str, Model], tmp_path: Path
) -> None:
    first, second = models["tiny-mlp"], models["deep"]
    runtime, backend = _runtime(tmp_path, [first, second])
    await runtime.infer(first.name, first.inputs(), device_id="cpu:0")
    await runtime.settle()
    backend.refuse = 2
    with pytest.raises(RuntimeFailure) as refused:
        await runtime.infer(second.name, second.inputs(), device_id="cpu:0")
    assert refused.value.status == 503 and refused.value.reason == "InsufficientMemory"
    assert "out of memory" in str(refused.value) and backend.refusals == 2  # one retry
    outcome = await runtime.infer(first.name, first.inputs(), device_id="cpu:0")
    assert outcome.outputs  # reloaded (it was evicted for the retry) and served
