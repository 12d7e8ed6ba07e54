"""Concurrent requests on one shard set, batched into passes: every per-request cost paid once.

A sharded request costs every shard a fixed amount on top of its arithmetic: the coordinator's
HTTP call and answer, the worker-thread trips, the hand-over copies, the channel's notices
and the receive side (bench/RESULTS.md, #15, session 6: 12.5 ms of CPU per request at N = 2
on the 4,096 x 24 net, against 2.4 ms of extra arithmetic). None of it grows with the batch,
so :class:`Passes` runs a set's concurrent requests as **one pass**: at most one pass is in
flight per set, and the requests that arrive while it runs join the next one, which starts
the moment it ends (all of them, up to ``max_samples`` samples; one larger request runs
alone). Under no concurrency a request runs at once, alone, as before.

A pass is one request to the shards: its columns are the members' columns side by side
(samples are columns, ``(n_in, batch)``), it gets one fresh request id, so every message of
the pass carries it and the mailbox's stale-message rules apply to it as to any request,
and its output is cut back into the members' columns by the offsets the pass was built with,
in this task, never from anything a shard sends: results cannot mix between members.

Deadlines: each member waits for its answer within its own deadline (:class:`PassDeadline`
when it passes; a member whose deadline passes while it waits for a pass is never sent). A
pass runs under the latest deadline among its members, so a short deadline never cuts a
longer one short. A pass that fails fails each of its members with the same error; the
next pass starts as usual. Cancelling a member (its client went away) drops its answer,
not the pass.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["PassDeadline", "PassStats", "Passes"]

Columns = NDArray[Any]  # (values, samples)
RunPass = Callable[[Columns, float], Awaitable[Columns]]


class PassDeadline(Exception):
    """A request's deadline passed before its pass answered."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"no answer within the request's {timeout_s:.3f} s deadline")


@dataclasses.dataclass(frozen=True)
class PassStats:
    """How much batching happened: passes run, requests and samples they carried."""

    passes: int
    requests: int
    samples: int

    @property
    def requests_per_pass(self) -> float:
        return self.requests / self.passes if self.passes else 0.0


@dataclasses.dataclass
class _Member:
    columns: Columns
    deadline: float  # the event loop's clock
    answer: asyncio.Future[Columns]


class Passes:
    """One shard set's passes (see the module docstring). ``run(columns, timeout_s)`` runs one
    pass on the shards and returns its output columns, in the same order."""

    def __init__(self, run: RunPass, *, max_samples: int = 1024) -> None:
        self._run = run
        self.max_samples = max_samples
        self._waiting: collections.deque[_Member] = collections.deque()
        self._runner: asyncio.Task[None] | None = None
        self._passes = self._requests = self._samples = 0

    @property
    def stats(self) -> PassStats:
        return PassStats(self._passes, self._requests, self._samples)

    async def submit(self, columns: Columns, *, timeout_s: float) -> Columns:
        """``columns``' output, from the next pass that has room for it."""
        loop = asyncio.get_running_loop()
        member = _Member(columns, loop.time() + timeout_s, loop.create_future())
        self._waiting.append(member)
        if self._runner is None:
            self._runner = loop.create_task(self._drain())
        try:  # on a timeout or cancellation, wait_for cancels the answer: no pass takes it
            return await asyncio.wait_for(member.answer, timeout_s)
        except TimeoutError:
            raise PassDeadline(timeout_s) from None

    async def close(self) -> None:
        """Stop: the pass in flight and every waiting request end cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        while self._waiting:
            self._waiting.popleft().answer.cancel()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                members = self._next_pass()
                if members:
                    await self._one_pass(members)
        finally:
            self._runner = None

    def _next_pass(self) -> list[_Member]:
        """The waiting members that fit one pass, oldest first (at least one); members whose
        answer is already settled (deadline passed, caller gone) are dropped."""
        members: list[_Member] = []
        samples = 0
        while self._waiting:
            member = self._waiting[0]
            if member.answer.done():
                self._waiting.popleft()
                continue
            width = int(member.columns.shape[1])
            if members and samples + width > self.max_samples:
                break
            members.append(self._waiting.popleft())
            samples += width
        return members

    async def _one_pass(self, members: list[_Member]) -> None:
        loop = asyncio.get_running_loop()
        timeout_s = max(max(m.deadline for m in members) - loop.time(), 1e-3)
        columns = (
            members[0].columns
            if len(members) == 1
            else np.concatenate([m.columns for m in members], axis=1)
        )
        self._passes += 1
        self._requests += len(members)
        self._samples += int(columns.shape[1])
        try:
            out = await self._run(columns, timeout_s)
        except asyncio.CancelledError:
            for member in members:
                member.answer.cancel()
            raise
        except Exception as error:  # every member fails with the pass
            for member in members:
                if not member.answer.done():
                    member.answer.set_exception(error)
            return
        start = 0
        for member in members:  # cut by the offsets this pass was built with
            stop = start + int(member.columns.shape[1])
            if not member.answer.done():
                member.answer.set_result(out[:, start:stop])
            start = stop
