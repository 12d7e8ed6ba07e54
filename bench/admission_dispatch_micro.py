"""CPU per request of two hot-path pieces alone (#17, seventh pass): the node's device admission
(``async with DeviceAdmission.slot(...)``, empty body) and the gateway's dispatcher (the
policy's ``Dispatcher.table`` read, then ``submit`` of a job that never waits). uvloop, best of
7 x 20,000. Compare commits by running it with a ``git archive`` of each first on
``PYTHONPATH`` (``bench/RESULTS.md``, "Data plane", seventh pass)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import uvloop

from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.scheduler.dispatch import Dispatcher, Job


async def main() -> dict[str, float]:
    admission = DeviceAdmission(concurrency=4)
    dispatcher = Dispatcher(mode="fifo", concurrency=4)
    dispatcher.add_device("n/cpu:0")
    job = Job(model="tiny-mlp", expected_ms=0.2)

    async def run() -> int:
        return 1

    async def slot_once() -> None:
        async with admission.slot("cpu:0"):
            pass

    async def dispatch_once() -> None:
        _ = dispatcher.table  # the policy's read, once per request
        await dispatcher.submit("n/cpu:0", job, run)

    async def per_call_us(one: Callable[[], Awaitable[None]], calls: int = 20_000) -> float:
        started = time.process_time()
        for _ in range(calls):
            await one()
        return (time.process_time() - started) / calls * 1e6

    out: dict[str, float] = {}
    for label, one in (
        ("admission_slot_us", slot_once),
        ("dispatch_submit_and_read_us", dispatch_once),
    ):
        out[label] = round(min([await per_call_us(one) for _ in range(7)]), 3)
    return out


if __name__ == "__main__":
    uvloop.install()
    print(json.dumps(asyncio.run(main())))
