"""Tests of ``Dispatcher.table``: the devices' loads kept current for the routing policy.

The property test drives a dispatcher through random submits, finishes, failures, cancels,
device removals and re-additions (some at once, some after the jobs have moved on), and checks
after every step that the table holds exactly the known devices, each with the load
``Dispatcher.load`` reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache import ClusterDirectory
from gpufaas.scheduler.dispatch import DeviceGone, Dispatcher, Job, QueueFull
from gpufaas.scheduler.policy import DeviceLoad, RouteRequest, make_policy

TIMEOUT = 5.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def rows(dispatcher: Dispatcher) -> dict[str, DeviceLoad]:
    return {load.key: load for load in dispatcher.table}


def assert_table_matches(dispatcher: Dispatcher) -> None:
    table = rows(dispatcher)
    assert sorted(table) == sorted(dispatcher.devices())
    for key, load in table.items():
        assert load == dispatcher.load(key), key


@dataclass
class Gate:
    """A job's body: waits until released, then returns or raises."""

    released: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False

    def run(self) -> Callable[[], Awaitable[str]]:
        async def body() -> str:
            await asyncio.wait_for(self.released.wait(), TIMEOUT)
            if self.fail:
                raise RuntimeError("the model failed")
            return "ok"

        return body


async def test_added_devices_are_in_the_table_with_no_load() -> None:
    dispatcher = Dispatcher(concurrency=2)
    assert dispatcher.add_device("n/a") and dispatcher.add_device("n/b")
    assert not dispatcher.add_device("n/a")  # known already: nothing changes
    assert list(dispatcher.table) == [
        DeviceLoad("n/a", 0, queue_ms=0.0),
        DeviceLoad("n/b", 0, queue_ms=0.0),
    ]
    assert dispatcher.devices() == ["n/a", "n/b"]


async def test_table_follows_jobs_as_they_queue_start_and_finish() -> None:
    dispatcher = Dispatcher(concurrency=2)
    dispatcher.add_device("n/a")
    gates = [Gate() for _ in range(3)]
    tasks = [
        asyncio.create_task(dispatcher.submit("n/a", Job(model="m", expected_ms=30.0), g.run()))
        for g in gates
    ]
    await settle()
    assert dispatcher.table[0] == DeviceLoad("n/a", 3, queue_ms=45.0)  # 2 running, 1 queued
    gates[0].released.set()
    await settle()
    assert dispatcher.table[0] == DeviceLoad("n/a", 2, queue_ms=30.0)
    for gate in gates[1:]:
        gate.released.set()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert dispatcher.table[0] == DeviceLoad("n/a", 0, queue_ms=0.0)


async def test_a_job_for_an_unknown_device_adds_it() -> None:
    dispatcher = Dispatcher()
    gate = Gate()
    task = asyncio.create_task(
        dispatcher.submit("n/new", Job(model="m", expected_ms=8.0), gate.run())
    )
    await settle()
    # One of two slots is busy: a request whose model is there would start at once.
    assert rows(dispatcher) == {"n/new": DeviceLoad("n/new", 1, queue_ms=4.0, hit_wait_ms=0.0)}
    gate.released.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_removed_device_leaves_the_table_and_its_old_jobs_do_not_count_again() -> None:
    dispatcher = Dispatcher(concurrency=1)
    running, waiting = Gate(), Gate()
    tasks = [
        asyncio.create_task(dispatcher.submit("n/a", Job(model="m", expected_ms=10.0), g.run()))
        for g in (running, waiting)
    ]
    await settle()
    assert dispatcher.remove_device("n/a") == 1
    assert dispatcher.table.position("n/a") is None and len(dispatcher.table) == 0
    dispatcher.add_device("n/a")  # the node came back before the old waiter woke up
    assert dispatcher.table[0] == DeviceLoad("n/a", 0, queue_ms=0.0)
    with pytest.raises(DeviceGone):
        await asyncio.wait_for(tasks[1], TIMEOUT)
    assert dispatcher.table[0] == DeviceLoad("n/a", 0, queue_ms=0.0)
    running.released.set()  # the old job ends: it does not count on the new lane
    await asyncio.wait_for(tasks[0], TIMEOUT)
    assert dispatcher.table[0] == DeviceLoad("n/a", 0, queue_ms=0.0)
    assert_table_matches(dispatcher)


async def test_a_policy_routes_on_the_dispatcher_table() -> None:
    directory = ClusterDirectory()
    dispatcher = Dispatcher(concurrency=1)
    for key in ("n/a", "n/b"):
        directory.add_device(key, capacity_bytes=1000)
        dispatcher.add_device(key)
    directory.note_loaded("n/a", "m", size_bytes=100)
    policy = make_policy("lalb", seed=0)
    request = RouteRequest(model="m", size_bytes=100)
    assert policy.choose(request, dispatcher.table, directory).device == "n/a"
    gate = Gate()
    busy = [
        asyncio.create_task(
            dispatcher.submit("n/a", Job(model="m", expected_ms=10_000.0), gate.run())
        )
        for _ in range(3)
    ]
    await settle()
    # Ten seconds of work queued on the holder: loading the model on the idle device wins.
    assert policy.choose(request, dispatcher.table, directory).device == "n/b"
    gate.released.set()
    await asyncio.wait_for(asyncio.gather(*busy), TIMEOUT)


DEVICES = ["n/a", "n/b"]

submits = st.tuples(
    st.just("submit"),
    st.sampled_from(DEVICES),
    st.sampled_from([0.0, 0.1, 0.2, 2.5, 7.0, 1000.0]),
    st.sampled_from(["hot", "cold"]),
)
operations = st.lists(
    st.one_of(
        submits,
        submits,  # twice as likely as any other step, so that queues form
        st.tuples(st.just("tick")),  # let the jobs move on: between two ticks, steps are "at once"
        st.tuples(st.just("finish"), st.integers(0, 30)),
        st.tuples(st.just("fail"), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("remove"), st.sampled_from(DEVICES)),
        st.tuples(st.just("add"), st.sampled_from(DEVICES)),
    ),
    min_size=4,
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    mode=st.sampled_from(["fifo", "o3"]),
    concurrency=st.integers(1, 2),
    max_queue=st.sampled_from([0, 1, 4]),
)
def test_table_equals_load_after_any_sequence(
    ops: list[tuple[object, ...]], mode: str, concurrency: int, max_queue: int
) -> None:
    async def scenario() -> None:
        dispatcher = Dispatcher(
            mode=mode,  # type: ignore[arg-type]
            concurrency=concurrency,
            max_queue=max_queue,
            max_passes=1,
            is_resident=lambda device, model: model == "hot",
        )
        gates: list[Gate] = []
        tasks: list[asyncio.Task[str]] = []
        for op in ops:
            kind = op[0]
            if kind == "submit":
                _, device, expected_ms, model = op
                gate = Gate()
                gates.append(gate)
                job = Job(model=str(model), slo_ms=50.0, expected_ms=float(expected_ms))  # type: ignore[arg-type]
                tasks.append(asyncio.create_task(dispatcher.submit(str(device), job, gate.run())))
            elif kind in ("finish", "fail", "cancel") and gates:
                index = int(op[1]) % len(gates)  # type: ignore[call-overload]
                if kind == "cancel":
                    tasks[index].cancel()
                else:
                    gates[index].fail = kind == "fail"
                    gates[index].released.set()
            elif kind == "remove":
                dispatcher.remove_device(str(op[1]))
            elif kind == "add":
                dispatcher.add_device(str(op[1]))
            elif kind == "tick":
                await settle()
            assert_table_matches(dispatcher)
        for gate in gates:
            gate.released.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)
        for result in results:
            assert isinstance(
                result, str | RuntimeError | QueueFull | DeviceGone | asyncio.CancelledError
            ), result
        assert_table_matches(dispatcher)
        assert all(load.outstanding == 0 for load in dispatcher.table)

    asyncio.run(scenario())
