"""core/eager.py: a coroutine started at once, and a task only once it has to wait."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from gpufaas.core.eager import start_eagerly

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="outside")


async def test_a_coroutine_that_never_waits_runs_at_once_and_makes_no_task() -> None:
    ran: list[str] = []

    async def answer() -> None:
        where.set("inside")
        ran.append(where.get())

    tasks_before = len(asyncio.all_tasks())
    assert start_eagerly(answer()) is None
    assert ran == ["inside"]  # already done, before any loop iteration
    assert len(asyncio.all_tasks()) == tasks_before
    assert where.get() == "outside"  # its own context, as a task's


async def test_one_that_waits_goes_on_in_a_task_in_the_same_context() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: list[object] = []

    async def answer() -> None:
        where.set("inside")
        seen.append(await gate)
        await asyncio.sleep(0)  # a bare yield, too
        seen.append(where.get())

    task = start_eagerly(answer())
    assert task is not None and not task.done()
    assert where.get() == "outside"
    gate.set_result(7)
    await asyncio.wait_for(task, 5)
    assert seen == [7, "inside"]


async def test_errors_reach_the_caller_or_the_task() -> None:
    async def at_once() -> None:
        raise ValueError("now")

    with pytest.raises(ValueError, match="now"):
        start_eagerly(at_once())

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def later() -> None:
        await gate
        raise KeyError("later")

    task = start_eagerly(later())
    assert task is not None
    gate.set_result(None)
    with pytest.raises(KeyError):
        await asyncio.wait_for(task, 5)


async def test_cancelling_the_task_cancels_what_it_waits_on() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned: list[bool] = []

    async def answer() -> None:
        try:
            await gate
        finally:
            cleaned.append(True)

    task = start_eagerly(answer())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.cancelled() and cleaned == [True]
