"""Tests of gpufaas.cache.singleflight.SingleFlight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from gpufaas.cache import SingleFlight


class Loader:
    """An async load that waits for the test to release it, counting its calls."""

    def __init__(self, result: str = "weights") -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.result = result
        self.error: Exception | None = None

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await asyncio.wait_for(self.release.wait(), timeout=5)
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    load = Loader()
    waiters = [asyncio.create_task(flight.do("m", load)) for _ in range(10)]
    await load.started.wait()
    assert flight.in_flight("m") and flight.in_flight_keys() == ["m"]
    load.release.set()
    assert await asyncio.gather(*waiters) == ["weights"] * 10
    assert load.calls == 1
    assert not flight.in_flight("m") and flight.in_flight_keys() == [] and len(flight) == 0


async def test_error_reaches_every_waiter_and_next_call_retries() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    failing = Loader()
    failing.error = RuntimeError("disk on fire")
    waiters = [asyncio.create_task(flight.do("m", failing)) for _ in range(3)]
    failing.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "disk on fire" for r in results)
    assert failing.calls == 1

    retry = Loader(result="second try")
    retry.release.set()
    assert await flight.do("m", retry) == "second try"
    assert retry.calls == 1


async def test_fn_that_raises_when_called_still_shares_one_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    calls = 0

    def raises_when_called() -> Awaitable[str]:
        nonlocal calls
        calls += 1
        raise ValueError("bad model")

    waiters = [asyncio.create_task(flight.do("m", raises_when_called)) for _ in range(3)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert calls == 1


async def test_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    load = Loader()
    impatient = asyncio.create_task(flight.do("m", load))
    patient = asyncio.create_task(flight.do("m", load))
    await load.started.wait()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert flight.in_flight("m")
    load.release.set()
    assert await patient == "weights"
    assert load.calls == 1


async def test_call_finishes_even_if_every_waiter_is_cancelled() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    load = Loader()
    only = asyncio.create_task(flight.do("m", load))
    await load.started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    # A new caller joins the still-running call instead of starting another.
    joiner = asyncio.create_task(flight.do("m", load))
    load.release.set()
    assert await joiner == "weights"
    assert load.calls == 1


async def test_different_keys_run_concurrently() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    load_a, load_b = Loader("a"), Loader("b")
    task_a = asyncio.create_task(flight.do("a", load_a))
    task_b = asyncio.create_task(flight.do("b", load_b))
    # Both loads start while neither has finished: nothing serialises them.
    await asyncio.wait_for(asyncio.gather(load_a.started.wait(), load_b.started.wait()), 5)
    assert sorted(flight.in_flight_keys()) == ["a", "b"]
    load_b.release.set()
    assert await task_b == "b"
    assert not task_a.done()
    load_a.release.set()
    assert await task_a == "a"


async def test_cancel_cancels_the_shared_call_for_everyone() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    load = Loader()
    waiters = [asyncio.create_task(flight.do("m", load)) for _ in range(2)]
    await load.started.wait()
    assert flight.cancel("m")
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert not flight.cancel("m")
    assert not flight.in_flight("m")


async def test_a_caller_after_a_cancel_gets_a_call_of_its_own_not_the_cancelled_one() -> None:
    # A cancelled call may still be running its cleanup (a load releasing what it held); a
    # task is not done() until then. A caller that comes in that window (a request for the
    # model a prefetch was loading when it was preempted) must not get the CancelledError.
    flight: SingleFlight[str, str] = SingleFlight()
    started, cleaning, cleaned = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def cancelled_load() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()
            raise
        return "never"

    preempted = asyncio.create_task(flight.do("m", cancelled_load))
    await started.wait()
    assert flight.cancel("m")
    await cleaning.wait()
    later = Loader(result="fresh")
    later.release.set()
    request = asyncio.create_task(flight.do("m", later))  # runs before the cleanup ends:
    cleaned.set()  # the loop runs ready tasks in the order they became ready
    answered, preempted_with = await asyncio.gather(request, preempted, return_exceptions=True)
    assert answered == "fresh"
    assert isinstance(preempted_with, asyncio.CancelledError)
    assert later.calls == 1
    assert not flight.in_flight("m")
