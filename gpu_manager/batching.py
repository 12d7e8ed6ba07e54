"""Dynamic batching: concurrent requests for one model on one device, run as one forward pass.

A :class:`Batcher` per (device, model) gathers requests until ``max_batch_size`` rows are waiting
or ``max_delay_ms`` have passed since the oldest arrived, concatenates their inputs along the
first dimension, runs once, and splits the outputs back by rows. A request that finds nothing of
its model queued or running there runs at once: the delay is spent only when there is load to
batch with (requests that queue while a batch runs), never by a lone request on an idle device. Only requests whose inputs agree
beyond the first dimension (same trailing shape and dtype) are merged; the others wait for the
next batch, which starts right away. Nor is the delay spent waiting for requests that cannot
come: once ``most_waiting`` requests wait (as many as the device admits at once: no other can
reach the batcher before this batch runs), the batch goes, full or not. One batch runs at a time per (device, model): requests that
arrive meanwhile form the next one. A request's eviction hint (the scheduler's ``evict_first``)
travels with it: a batch runs with its oldest request's hint, for the load that batch may cause.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["Batcher", "concat_inputs", "signature", "split_outputs"]

R = TypeVar("R")
Inputs = Sequence[NDArray[Any]]
Outputs = dict[str, tuple[NDArray[Any], str]]


def signature(inputs: Inputs) -> tuple[tuple[tuple[int, ...], str], ...]:
    """What must agree for requests to be concatenated: each input's shape past dim 0, dtype."""
    return tuple((tuple(a.shape[1:]), a.dtype.str) for a in inputs)


def rows(inputs: Inputs) -> int:
    return int(inputs[0].shape[0]) if inputs and inputs[0].ndim > 0 else 1


def concat_inputs(batch: Sequence[Inputs]) -> list[NDArray[Any]]:
    return [np.concatenate(parts, axis=0) for parts in zip(*batch, strict=True)]


def split_outputs(outputs: Outputs, counts: Sequence[int]) -> list[Outputs] | None:
    """Each request's rows of every output; None if an output does not have one row per input row."""
    total = sum(counts)
    if any(array.ndim == 0 or array.shape[0] != total for array, _ in outputs.values()):
        return None
    bounds = np.cumsum([0, *counts])
    return [
        {name: (array[a:b], datatype) for name, (array, datatype) in outputs.items()}
        for a, b in itertools.pairwise(bounds)
    ]


@dataclass(eq=False)
class _Waiting(Generic[R]):
    inputs: Inputs
    rows: int
    signature: tuple[tuple[tuple[int, ...], str], ...]
    future: asyncio.Future[R]
    evict_first: tuple[str, ...] = ()
    alone: bool = False  # nothing of this model was queued or running when it arrived
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[R]):
    """Batches requests for one model on one device.

    ``run`` gets the inputs of every request in a batch (in arrival order) and the oldest
    request's eviction hint, and returns one result per request; an exception fails every
    request of that batch.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        run: Callable[[list[Inputs], tuple[str, ...]], Awaitable[list[R]]],
        most_waiting: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if most_waiting is not None and most_waiting < 1:
            raise ValueError(f"most_waiting must be >= 1 or None, got {most_waiting}")
        self.max_batch_size = max_batch_size
        # Requests that can wait here at once (the device's admission); None: no bound known.
        # Without it a closed loop of as many clients as the device admits waited the whole
        # delay for every batch: rows that could not arrive (bench/RESULTS.md, #17, eighth session).
        self.most_waiting = most_waiting
        self.max_delay_s = max(0.0, max_delay_ms) / 1000
        self._run = run
        self._queue: list[_Waiting[R]] = []
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False  # a batch is in its forward pass
        self.batches = 0  # forward passes run
        self.requests = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: Inputs, *, evict_first: Sequence[str] = ()) -> R:
        """Queue one request and wait for its share of a batch's result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        alone = not self._queue and not self._running
        waiting = _Waiting(
            inputs, rows(inputs), signature(inputs), future, tuple(evict_first), alone=alone
        )
        self._queue.append(waiting)
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="gpufaas-batcher"
            )
        return await future

    async def _drain(self) -> None:
        # Runs while requests wait; a new task starts with the next request after it ends.
        while self._queue:
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            self._running = True
            try:
                results = await self._run([w.inputs for w in batch], batch[0].evict_first)
            except Exception as e:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(e)
                continue
            finally:
                self._running = False
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)

    async def _gather(self) -> None:
        """Wait until a full batch is queued or the oldest request has waited long enough; a
        lone request that arrived with nothing of its model queued or running goes at once."""
        while True:
            self._queue = [w for w in self._queue if not w.future.cancelled()]
            if not self._queue:
                return
            if len(self._queue) == 1 and self._queue[0].alone:
                return
            deadline = self._queue[0].arrived + self.max_delay_s
            remaining = deadline - time.monotonic()
            if self._ready_rows() >= self.max_batch_size or remaining <= 0 or self._no_more():
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _no_more(self) -> bool:
        """Whether every request the device admits at once is already waiting here."""
        return self.most_waiting is not None and len(self._queue) >= self.most_waiting

    def _ready_rows(self) -> int:
        first = self._queue[0]
        return sum(w.rows for w in self._queue if w.signature == first.signature)

    def _take(self) -> list[_Waiting[R]]:
        """The oldest request and the compatible ones after it, up to ``max_batch_size`` rows."""
        if not self._queue:
            return []
        first = self._queue[0]
        batch, kept, total = [first], [], first.rows
        for waiting in self._queue[1:]:
            if waiting.signature == first.signature and total + waiting.rows <= self.max_batch_size:
                batch.append(waiting)
                total += waiting.rows
            else:
                kept.append(waiting)
        self._queue = kept
        return batch
