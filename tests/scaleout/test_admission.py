"""Per-device admission at the GPU manager: the cluster-wide bound of running requests."""

from __future__ import annotations

import asyncio

import pytest

from gpufaas.gpu_manager.admission import AdmissionFull, DeviceAdmission


async def _hold(
    admission: DeviceAdmission, device: str, release: asyncio.Event, log: list[int]
) -> None:
    async with admission.slot(device):
        log.append(admission.running(device))
        await release.wait()


async def test_never_more_than_the_bound_run_and_waiters_go_in_order() -> None:
    admission = DeviceAdmission(concurrency=2)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(_hold(admission, "cpu:0", release, log)) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert admission.running("cpu:0") == 2 and admission.waiting("cpu:0") == 4
    release.set()
    await asyncio.gather(*tasks)
    assert admission.peak("cpu:0") == 2
    assert max(log) <= 2
    assert admission.running("cpu:0") == 0


async def test_devices_are_bounded_separately() -> None:
    admission = DeviceAdmission(concurrency=1)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(_hold(admission, device, release, log)) for device in ("a", "b")]
    await asyncio.sleep(0.01)
    assert admission.running("a") == 1 and admission.running("b") == 1
    release.set()
    await asyncio.gather(*tasks)


async def test_a_full_queue_refuses_at_once() -> None:
    admission = DeviceAdmission(concurrency=1, max_waiting=1)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(_hold(admission, "d", release, log)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(AdmissionFull):
        async with admission.slot("d"):
            pass
    release.set()
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_leaves_and_a_granted_one_passes_its_slot_on() -> None:
    admission = DeviceAdmission(concurrency=1)
    release = asyncio.Event()
    log: list[int] = []
    holder = asyncio.create_task(_hold(admission, "d", release, log))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(_hold(admission, "d", release, log))
    third = asyncio.create_task(_hold(admission, "d", release, log))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert admission.waiting("d") == 1
    release.set()
    await asyncio.gather(holder, third)
    assert admission.running("d") == 0 and admission.peak("d") == 1


async def test_without_a_bound_it_only_counts() -> None:
    admission = DeviceAdmission(concurrency=None)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(_hold(admission, "d", release, log)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert admission.peak("d") == 5
    release.set()
    await asyncio.gather(*tasks)
