"""The Batcher's composition of batches: who runs with whom, and how many forward passes."""

from __future__ import annotations

import asyncio

import numpy as np

from gpufaas.gpu_manager.batching import Batcher, Inputs


def request(value: float, rows: int = 1) -> Inputs:
    return [np.full((rows, 2), value, dtype=np.float32)]


class Recorder:
    """A forward pass that records each batch's first values and can be held open."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def run(self, batch: list[Inputs], hint: tuple[str, ...]) -> list[float]:
        self.batches.append([float(inputs[0][0, 0]) for inputs in batch])
        await self.release.wait()
        return [float(inputs[0][0, 0]) for inputs in batch]


async def settle() -> None:
    for _ in range(10):  # loop iterations, not time: the drain task's steps
        await asyncio.sleep(0)


async def test_a_lone_request_on_an_idle_model_runs_at_once_and_later_ones_batch() -> None:
    recorder = Recorder()
    # A delay no test would sit out: the lone request must not wait for it.
    batcher = Batcher(max_batch_size=2, max_delay_ms=600_000, run=recorder.run)
    recorder.release.clear()

    first = asyncio.create_task(batcher.submit(request(1.0)))
    await settle()
    assert recorder.batches == [[1.0]]  # running already, alone

    # These queue while the first batch runs, and run together after it (a full batch).
    later = [asyncio.create_task(batcher.submit(request(v))) for v in (2.0, 3.0)]
    await settle()
    assert recorder.batches == [[1.0]]
    recorder.release.set()
    assert await first == 1.0
    assert await asyncio.gather(*later) == [2.0, 3.0]
    assert recorder.batches == [[1.0], [2.0, 3.0]]
    assert (batcher.batches, batcher.requests) == (2, 3)


async def test_requests_arriving_together_still_wait_to_be_batched() -> None:
    recorder = Recorder()
    batcher = Batcher(max_batch_size=3, max_delay_ms=600_000, run=recorder.run)

    first = asyncio.create_task(batcher.submit(request(1.0)))
    second = asyncio.create_task(batcher.submit(request(2.0)))
    await settle()
    assert recorder.batches == []  # two queued before the drain looked: wait for a third
    third = asyncio.create_task(batcher.submit(request(3.0)))
    assert await asyncio.gather(first, second, third) == [1.0, 2.0, 3.0]
    assert recorder.batches == [[1.0, 2.0, 3.0]]


async def test_a_batch_goes_once_every_request_the_device_admits_is_waiting() -> None:
    """No wait for rows that cannot come: with at most 3 requests admitted on the device at
    once, 3 waiting is all there will be until they are answered (a closed loop of 3 clients
    sat out the whole delay on every batch before)."""
    recorder = Recorder()
    batcher = Batcher(max_batch_size=8, max_delay_ms=600_000, run=recorder.run, most_waiting=3)

    first = asyncio.create_task(batcher.submit(request(1.0)))
    second = asyncio.create_task(batcher.submit(request(2.0)))
    await settle()
    assert recorder.batches == []  # two of three: the third may still come, so they wait
    third = asyncio.create_task(batcher.submit(request(3.0)))
    done = await asyncio.wait_for(asyncio.gather(first, second, third), timeout=10)
    assert done == [1.0, 2.0, 3.0]
    assert recorder.batches == [[1.0, 2.0, 3.0]]
