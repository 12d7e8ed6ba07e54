"""A shard set's concurrent requests batched into passes (scheduler/passes.py).

The pass runner here stands in for the shards (it is what the coordinator hands
:class:`Passes`): a fixed matrix times the pass's columns, gated by an event so a test can
hold a pass in flight. The coordinator over real shard nodes is tested in test_nodes.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from gpufaas.scheduler.passes import PassDeadline, Passes, samples_in_cache

W = np.random.default_rng(3).random((5, 7)).astype(np.float32)


class Runner:
    """Runs a pass as ``W @ columns``; records each pass's width; ``gate`` holds passes."""

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.timeouts: list[float] = []
        self.fail_next: Exception | None = None

    async def __call__(self, columns: Any, timeout_s: float) -> Any:
        self.widths.append(int(columns.shape[1]))
        self.timeouts.append(timeout_s)
        self.started.set()
        await self.gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return W @ columns


def columns(batch: int, seed: int) -> Any:
    return np.random.default_rng(seed).random((7, batch)).astype(np.float32)


async def one_pass_held(width: int) -> tuple[Runner, Passes, asyncio.Future[Any]]:
    """Passes with one in flight at most (the rules of joining alone), and a first request of
    ``width`` columns whose pass is held in flight by the runner's gate."""
    runner = Runner()
    passes = Passes(runner, depth=1)
    runner.gate.clear()
    first = asyncio.ensure_future(passes.submit(columns(width, 0), timeout_s=5))
    await runner.started.wait()
    return runner, passes, first


async def test_requests_arriving_during_a_pass_join_the_next_one_and_get_their_own_answer() -> None:
    runner, passes, first = await one_pass_held(2)  # pass 1 (the first request alone) is in flight
    sizes = [1, 3, 4, 2, 5]
    inputs = [columns(b, 10 + i) for i, b in enumerate(sizes)]
    later = [asyncio.ensure_future(passes.submit(c, timeout_s=5)) for c in inputs]
    await asyncio.sleep(0.01)
    assert runner.widths == [2]  # nothing started beside the pass in flight
    runner.gate.set()
    outs = await asyncio.gather(first, *later)
    assert runner.widths == [2, sum(sizes)]  # every later request joined one pass
    for given, out in zip([columns(2, 0), *inputs], outs, strict=True):
        np.testing.assert_allclose(out, W @ given, rtol=1e-6)  # its own columns, no others
    assert passes.stats.passes == 2 and passes.stats.requests == 6
    assert passes.stats.samples == 2 + sum(sizes)


async def test_a_pass_holds_at_most_max_samples_and_a_larger_request_runs_alone() -> None:
    runner = Runner()
    passes = Passes(runner, max_samples=6, depth=1)
    runner.gate.clear()
    first = asyncio.ensure_future(passes.submit(columns(1, 0), timeout_s=5))
    await runner.started.wait()
    inputs = [columns(b, i) for i, b in enumerate((4, 2, 3, 9, 1))]
    rest = [asyncio.ensure_future(passes.submit(c, timeout_s=5)) for c in inputs]
    await asyncio.sleep(0)
    runner.gate.set()
    outs = await asyncio.gather(first, *rest)
    assert runner.widths == [1, 6, 3, 9, 1]  # in arrival order, none over 6 but the 9 alone
    for given, out in zip(inputs, outs[1:], strict=True):
        np.testing.assert_allclose(out, W @ given, rtol=1e-6)


async def test_a_request_whose_deadline_passes_while_it_waits_is_never_sent() -> None:
    runner, passes, first = await one_pass_held(2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PassDeadline, match=r"0\.050 s deadline"):
        await passes.submit(columns(3, 1), timeout_s=0.05)
    assert loop.time() - started < 1.0  # at its own deadline, not the pass's
    kept = asyncio.ensure_future(passes.submit(columns(4, 2), timeout_s=5))
    await asyncio.sleep(0)
    runner.gate.set()
    await first
    np.testing.assert_allclose(await kept, W @ columns(4, 2), rtol=1e-6)
    assert runner.widths == [2, 4]  # the timed-out request's 3 columns were never sent


async def test_a_pass_runs_under_its_latest_deadline() -> None:
    runner, passes, first = await one_pass_held(1)
    short = asyncio.ensure_future(passes.submit(columns(1, 1), timeout_s=2))
    long = asyncio.ensure_future(passes.submit(columns(1, 2), timeout_s=9))
    await asyncio.sleep(0)
    runner.gate.set()
    await asyncio.gather(first, short, long)
    assert 8.0 < runner.timeouts[1] <= 9.0


async def test_a_failed_pass_fails_its_members_and_the_next_pass_runs() -> None:
    runner, passes, first = await one_pass_held(1)
    runner.fail_next = RuntimeError("shard 1 of radix failed")
    runner.gate.set()
    with pytest.raises(RuntimeError, match="shard 1 of radix"):
        await first
    np.testing.assert_allclose(
        await passes.submit(columns(2, 1), timeout_s=5), W @ columns(2, 1), rtol=1e-6
    )


async def test_a_cancelled_member_leaves_the_pass_to_the_others_and_close_ends_the_rest() -> None:
    runner, passes, first = await one_pass_held(1)
    gone = asyncio.ensure_future(passes.submit(columns(2, 1), timeout_s=5))
    stays = asyncio.ensure_future(passes.submit(columns(3, 2), timeout_s=5))
    await asyncio.sleep(0)
    gone.cancel()
    runner.gate.set()
    await first
    np.testing.assert_allclose(await stays, W @ columns(3, 2), rtol=1e-6)
    assert runner.widths == [1, 3]
    runner.gate.clear()
    held = asyncio.ensure_future(passes.submit(columns(1, 3), timeout_s=5))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(passes.close(), timeout=5)  # never hangs on the held pass
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_two_passes_fly_at_once_and_the_rest_join_the_next_one() -> None:
    """The default depth is two: a request arriving while one pass is in flight starts a
    second at once (so one pass's exchange overlaps the other's products on the shards);
    requests arriving while two fly join the next, which starts when either lands."""
    runner = Runner()
    passes = Passes(runner)
    assert passes.depth == 2
    runner.gate.clear()
    first = asyncio.ensure_future(passes.submit(columns(2, 0), timeout_s=5))
    await runner.started.wait()
    second = asyncio.ensure_future(passes.submit(columns(3, 1), timeout_s=5))
    await asyncio.sleep(0.01)
    assert runner.widths == [2, 3] and passes.stats.in_flight == 2
    inputs = [columns(b, 10 + i) for i, b in enumerate((1, 4, 2))]
    later = [asyncio.ensure_future(passes.submit(c, timeout_s=5)) for c in inputs]
    await asyncio.sleep(0.01)
    assert runner.widths == [2, 3]  # two in flight: the rest wait
    runner.gate.set()
    outs = await asyncio.gather(first, second, *later)
    assert runner.widths == [2, 3, 7]
    for given, out in zip([columns(2, 0), columns(3, 1), *inputs], outs, strict=True):
        np.testing.assert_allclose(out, W @ given, rtol=1e-6)
    assert passes.stats.passes == 3 and passes.stats.requests == 5
    assert passes.stats.in_flight == 0


def test_a_pass_holds_the_samples_whose_activations_fit_the_cache() -> None:
    """1 MiB of float32 activations: 64 samples of 4,096 rows, 128 of 2,048; never 0."""
    assert samples_in_cache(4096, cache_bytes=1 << 20) == 64
    assert samples_in_cache(2048, cache_bytes=1 << 20) == 128
    assert samples_in_cache(1 << 20, cache_bytes=1 << 20) == 1
