"""Who started a device's load of a model, and the load time a request reports (scale-out #16,
nineteenth session; ``DeviceLoads.join``, ``NodeRuntime``'s ``load_ms``).

- ``DeviceLoads.join`` tells its listeners whether the caller ``started`` the load or
  ``joined`` the one under way: a load order tells its own start from a request's join by it
  (gpu_manager/load_orders.py), with no state set for a listener to find.
- A miss reports the whole time of the load it used, from the load's start to its copy's end,
  also when the request joined the load (or found its copy arriving) after it began: gateways
  learn load times from it, and a request's shorter wait pulled them towards 0.

A copy is held on an event the test opens, never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import torch
from gm_support import Model, devices

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.runtime import InferOutcome, NodeRuntime


class HeldCopy(CpuBackend):
    """A CPU device whose copies run only once the test sets ``copying``."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.copying = threading.Event()
        self.copying.set()

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        if not self.copying.wait(60):
            raise TimeoutError("the test never let the copy run")
        super()._copy_group(dst, src, group, start, end)


def _runtime(root: Path, model: Model) -> tuple[NodeRuntime, HeldCopy]:
    info = devices(1)[0]
    backend = HeldCopy(info)
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(root / "artifacts"),
        host_capacity_bytes=1 << 30,
        backends={info.id: backend},
        prepare_on_register=False,
    )
    runtime.register(model.name, model.spec)
    return runtime, backend


async def test_join_tells_its_listeners_who_started_the_load_and_who_joined_it(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    runtime, _ = _runtime(tmp_path, model)
    loads = next(iter(runtime.devices.values())).loads
    told: list[tuple[str, str]] = []
    loads.listeners.append(lambda name, how: told.append((name, how)))

    # Two callers in one loop turn: the first starts the load, the second joins it.
    first = asyncio.ensure_future(loads.join(model.name, model.spec, prefer=()))
    second = asyncio.ensure_future(loads.join(model.name, model.spec, prefer=()))
    copies = await asyncio.wait_for(asyncio.gather(first, second), 60)
    await runtime.settle()
    assert copies[0] is copies[1]  # one load
    assert told == [(model.name, "started"), (model.name, "joined")]

    # Once that load is over, the next caller starts one (which finds the copy there).
    assert await loads.join(model.name, model.spec, prefer=()) is copies[0]
    assert told[-1] == (model.name, "started")


async def test_a_request_that_came_to_a_load_under_way_reports_the_loads_whole_time(
    models: dict[str, Model], tmp_path: Path
) -> None:
    """The first request starts the load; the second comes once the copy is under way (held
    until both hold it). Both are misses, and the second reports the load's whole time, from
    the load's start, not the shorter part of it that it waited for."""
    model = models["tiny-mlp"]
    runtime, backend = _runtime(tmp_path, model)
    (device_id,) = runtime.devices
    used = asyncio.Queue[str]()
    runtime.on_use(lambda name, _device: used.put_nowait(name))
    backend.copying.clear()

    def request() -> asyncio.Future[InferOutcome]:
        return asyncio.ensure_future(runtime.infer(model.name, model.inputs(), device_id=device_id))

    first = request()
    assert await asyncio.wait_for(used.get(), 60) == model.name  # it holds the copy under way
    second = request()
    assert await asyncio.wait_for(used.get(), 60) == model.name  # so does the second
    backend.copying.set()
    outcomes = await asyncio.wait_for(asyncio.gather(first, second), 60)
    await runtime.settle()

    copy: Any = runtime.devices[device_id].tier.current(model.name)
    assert isinstance(copy, DeviceModel) and copy.began_at is not None
    assert copy.transfer is not None and copy.transfer.finished_at is not None
    whole_ms = (copy.transfer.finished_at - copy.began_at) * 1000
    assert [o.cache_hit for o in outcomes] == [False, False]
    assert outcomes[1].load_ms == whole_ms  # not the second request's own, shorter wait
    assert outcomes[0].load_ms >= whole_ms  # the first started it: its time includes the load's
