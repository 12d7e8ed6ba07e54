"""A load that finds another load's bytes claimed but its replica not built waits for that
load's outcome (mends, eighteenth session; ``DeviceLoads._start``).

A prefetch's preemption (``DeviceLoads.cancel``) forgets its load's call at once, so a request
after it starts a call of its own (seventeenth session) while the cancelled load is still
being abandoned: its bytes claimed, its copy not begun, its replica not built. The new call
returned that load as if its copy were under way, and the request held a model with no
replica: a 503, "the replica is not built" (found by ``tests/predict/test_prefetch_stress.py``, in
about one run of five of one drawn example). Now it waits for the tier to change (the
abandoned load retired, or a live one committed) and looks again. The test stands the
abandoned load in itself and opens it on an event, never on a sleep.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gm_support import Model, devices

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.runtime import NodeRuntime


async def test_a_load_finding_another_loads_claim_with_no_replica_waits_for_its_outcome(
    models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    info = devices(1)[0]
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
        prepare_on_register=False,
    )
    runtime.register(model.name, model.spec)
    device = runtime.devices[info.id]
    loads, tier = device.loads, device.memory.tier
    # a load whose bytes are claimed and whose copy has not begun, as a cancelled one is
    # while it is abandoned
    dying, host = await loads._sized(model.name, model.spec, began=time.perf_counter())
    await loads._claim(model.name, dying, prefer=())
    assert tier.current(model.name) is dying and dying.module is None

    looked = asyncio.Event()
    current = tier.current

    def watched(key: str) -> DeviceModel | None:
        found = current(key)
        if key == model.name:
            looked.set()
        return found

    tier.current = watched  # type: ignore[method-assign]
    joined = asyncio.ensure_future(loads.join(model.name, model.spec, prefer=()))
    try:
        await asyncio.wait_for(looked.wait(), 30)  # the new load has seen the claim
        tier.retire(model.name)  # the cancelled load's abandonment ends
        tier.unhold(model.name, dying)
        if host is not None:
            host.release()
        got = await asyncio.wait_for(joined, 30)
    finally:
        joined.cancel()
        tier.current = current  # type: ignore[method-assign]
    assert got is not dying and got.module is not None  # a load of its own, with its replica
    await runtime.settle()
    assert [r.model for r in runtime.state().device(info.id).residents] == [model.name]
