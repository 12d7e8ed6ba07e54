"""Tests of gpufaas.scheduler.dispatch.Dispatcher: slots, FIFO and O3 order, bounds, cancelling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gpufaas.cache import ClusterDirectory
from gpufaas.scheduler.dispatch import (
    DeviceGone,
    Dispatcher,
    Job,
    QueueFull,
    directory_residency,
)
from gpufaas.scheduler.policy import DeviceLoad

TIMEOUT = 5.0  # every wait in these tests is bounded


class Recorder:
    """Runs that record when they start and wait for a gate to finish."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.peak = 0
        self.gates: dict[str, asyncio.Event] = {}

    def run(self, name: str) -> Callable[[], Awaitable[str]]:
        gate = self.gates.setdefault(name, asyncio.Event())

        async def body() -> str:
            self.started.append(name)
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await asyncio.wait_for(gate.wait(), TIMEOUT)
            finally:
                self.running -= 1
            return name

        return body

    def release(self, *names: str) -> None:
        for name in names:
            self.gates.setdefault(name, asyncio.Event()).set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrency_limit_and_results() -> None:
    dispatcher = Dispatcher(concurrency=2)
    rec = Recorder()
    tasks = [
        asyncio.create_task(dispatcher.submit("d", Job(model="m"), rec.run(f"r{i}")))
        for i in range(5)
    ]
    await settle()
    assert rec.started == ["r0", "r1"] and dispatcher.queued("d") == 3
    assert dispatcher.running("d") == 2
    rec.release(*(f"r{i}" for i in range(5)))
    results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert results == [f"r{i}" for i in range(5)] and rec.peak == 2
    assert dispatcher.queued("d") == 0 and dispatcher.running("d") == 0
    stats = dispatcher.stats("d")
    assert (stats.submitted, stats.started, stats.overtakes) == (5, 5, 0)


async def queue_behind_a_blocker(
    dispatcher: Dispatcher, rec: Recorder, jobs: list[tuple[str, Job]]
) -> list[asyncio.Task[str]]:
    tasks = [asyncio.create_task(dispatcher.submit("d", Job(model="x"), rec.run("blocker")))]
    await settle()
    for name, job in jobs:
        tasks.append(asyncio.create_task(dispatcher.submit("d", job, rec.run(name))))
        await settle()
    return tasks


async def test_fifo_mode_keeps_arrival_order() -> None:
    dispatcher = Dispatcher(
        mode="fifo", concurrency=1, is_resident=lambda device, model: model == "hot"
    )
    rec = Recorder()
    jobs = [("cold", Job(model="cold")), ("hot", Job(model="hot"))]
    tasks = await queue_behind_a_blocker(dispatcher, rec, jobs)
    rec.release("blocker", "cold", "hot")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert rec.started == ["blocker", "cold", "hot"]


async def test_o3_mode_lets_a_resident_model_overtake() -> None:
    resident = {("d", "hot")}
    dispatcher = Dispatcher(mode="o3", concurrency=1, is_resident=lambda d, m: (d, m) in resident)
    rec = Recorder()
    jobs = [("cold", Job(model="cold")), ("hot", Job(model="hot"))]
    tasks = await queue_behind_a_blocker(dispatcher, rec, jobs)
    rec.release("blocker", "cold", "hot")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert rec.started == ["blocker", "hot", "cold"]
    assert dispatcher.stats("d").overtakes == 1


async def test_o3_orders_resident_jobs_by_deadline() -> None:
    dispatcher = Dispatcher(mode="o3", concurrency=1, is_resident=lambda d, m: True)
    rec = Recorder()
    jobs = [
        ("relaxed", Job(model="a", slo_ms=10_000)),
        ("no-slo", Job(model="b")),
        ("urgent", Job(model="c", slo_ms=50)),
    ]
    tasks = await queue_behind_a_blocker(dispatcher, rec, jobs)
    rec.release("blocker", "relaxed", "no-slo", "urgent")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert rec.started == ["blocker", "urgent", "relaxed", "no-slo"]


async def test_o3_overtaking_is_bounded() -> None:
    dispatcher = Dispatcher(
        mode="o3", concurrency=1, max_passes=1, is_resident=lambda d, m: m == "hot"
    )
    rec = Recorder()
    jobs = [("cold", Job(model="cold"))] + [(f"hot{i}", Job(model="hot")) for i in range(3)]
    tasks = await queue_behind_a_blocker(dispatcher, rec, jobs)
    rec.release("blocker", "cold", "hot0", "hot1", "hot2")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert rec.started == ["blocker", "hot0", "cold", "hot1", "hot2"]


async def test_full_queue_is_refused_at_once() -> None:
    dispatcher = Dispatcher(concurrency=1, max_queue=1)
    rec = Recorder()
    tasks = await queue_behind_a_blocker(dispatcher, rec, [("waiting", Job(model="m"))])
    with pytest.raises(QueueFull, match="limit is 1"):
        await dispatcher.submit("d", Job(model="m"), rec.run("refused"))
    assert dispatcher.stats("d").rejected == 1
    rec.release("blocker", "waiting")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert "refused" not in rec.started


async def test_cancelled_waiter_leaves_the_queue() -> None:
    dispatcher = Dispatcher(concurrency=1)
    rec = Recorder()
    tasks = await queue_behind_a_blocker(
        dispatcher, rec, [("gone", Job(model="m", expected_ms=40)), ("next", Job(model="m"))]
    )
    assert dispatcher.expected_wait_ms("d") == 40
    tasks[1].cancel()
    await settle()
    assert dispatcher.queued("d") == 1 and dispatcher.expected_wait_ms("d") == 0
    rec.release("blocker", "next")
    await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), TIMEOUT)
    assert rec.started == ["blocker", "next"] and dispatcher.stats("d").cancelled == 1
    assert tasks[1].cancelled()


async def test_failing_run_frees_its_slot() -> None:
    dispatcher = Dispatcher(concurrency=1)

    async def boom() -> str:
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        await dispatcher.submit("d", Job(model="m"), boom)
    rec = Recorder()
    rec.release("after")
    assert (
        await asyncio.wait_for(dispatcher.submit("d", Job(model="m"), rec.run("after")), 1)
        == "after"
    )


async def test_removed_device_fails_its_waiters() -> None:
    dispatcher = Dispatcher(concurrency=1)
    rec = Recorder()
    tasks = await queue_behind_a_blocker(dispatcher, rec, [("waiting", Job(model="m"))])
    assert dispatcher.remove_device("d") == 1
    with pytest.raises(DeviceGone):
        await asyncio.wait_for(tasks[1], TIMEOUT)
    rec.release("blocker")
    assert await asyncio.wait_for(tasks[0], TIMEOUT) == "blocker"
    assert dispatcher.remove_device("d") == 0 and dispatcher.devices() == []


async def test_load_reports_outstanding_and_expected_wait() -> None:
    dispatcher = Dispatcher(concurrency=2)
    rec = Recorder()
    tasks = [
        asyncio.create_task(
            dispatcher.submit("d", Job(model="m", expected_ms=30.0), rec.run(f"r{i}"))
        )
        for i in range(3)
    ]
    await settle()
    load = dispatcher.load("d")
    assert (load.key, load.outstanding, load.queue_ms) == ("d", 3, 45.0)
    assert dispatcher.load("idle").outstanding == 0
    rec.release("r0", "r1", "r2")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert dispatcher.load("d").queue_ms == 0.0


async def test_a_free_slot_serves_a_hit_at_once_however_long_the_running_loads() -> None:
    dispatcher = Dispatcher(concurrency=2)
    rec = Recorder()
    loading = asyncio.create_task(
        dispatcher.submit("d", Job(model="big", expected_ms=300.0), rec.run("load"))
    )
    await settle()
    # One slot is busy with a long load: a request whose model is there starts at once, one
    # that loads shares the device's copy work.
    assert dispatcher.load("d") == DeviceLoad("d", 1, queue_ms=150.0, hit_wait_ms=0.0)
    assert dispatcher.table[0] == dispatcher.load("d")
    second = asyncio.create_task(
        dispatcher.submit("d", Job(model="m", expected_ms=10.0), rec.run("hit"))
    )
    await settle()
    both_busy = DeviceLoad("d", 2, queue_ms=155.0)  # hit_wait_ms None: the same
    assert dispatcher.load("d") == both_busy and dispatcher.table[0] == both_busy
    rec.release("load", "hit")
    await asyncio.wait_for(asyncio.gather(loading, second), TIMEOUT)


def test_directory_residency_reads_the_directory() -> None:
    directory = ClusterDirectory()
    directory.add_device("n/a", capacity_bytes=100)
    directory.note_loaded("n/a", "ready", size_bytes=10)
    directory.note_dispatch("n/a", "loading", size_bytes=10)
    is_resident = directory_residency(directory)
    assert is_resident("n/a", "ready")
    assert not is_resident("n/a", "loading") and not is_resident("n/a", "absent")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "lifo"}, "mode"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_queue": -1}, "max_queue"),
        ({"max_passes": -2}, "max_passes"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Dispatcher(**options)  # type: ignore[arg-type]
