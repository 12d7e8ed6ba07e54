"""Concurrent requests on one shard set, batched into passes: every per-request cost paid once.

A sharded request costs every shard a fixed amount on top of its arithmetic: the coordinator's
HTTP call and answer, the worker-thread trips, the hand-over copies, the channel's notices
and the receive side (bench/RESULTS.md, #15, session 6: 12.5 ms of CPU per request at N = 2
on the 4,096 x 24 net, against 2.4 ms of extra arithmetic). None of it grows with the batch,
so :class:`Passes` runs a set's concurrent requests as **one pass**: at most ``depth`` passes
are in flight per set (two by default), and the requests that arrive while they run join the
next one, which starts the moment one of them ends (all of them, up to ``max_samples``
samples; one larger request runs alone). Under no concurrency a request runs at once, alone,
as before. Two in flight, because a shard runs one pass's products while the other pass's
parts travel and wait: its single worker thread is the only place where they meet, so the
exchange of one pass overlaps the products of the next (with one in flight, every wait for
a remote part left the shard's core idle).

``max_samples`` is what keeps a pass inside the cache: one shard's products cost more per
sample once its activations (its rows x the pass's samples x 4 bytes) outgrow the L2 cache
(bench/RESULTS.md, #15, sessions 7 and 8). :func:`samples_in_cache` turns a cache size into
that cap for a shard set; the coordinator uses it.

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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "DEFAULT_PASS_CACHE_BYTES",
    "PassDeadline",
    "PassMetrics",
    "PassStats",
    "Passes",
    "samples_in_cache",
]

Columns = NDArray[Any]  # (values, samples)
RunPass = Callable[[Columns, float], Awaitable[Columns]]

# The activations one shard may hold per pass: measured on the 2-core dev box (L2 1 MiB per
# core; bench/fsd-pass-size.py, bench/RESULTS.md, #15, "fsd, eighth session"), where one
# shard's cost per sample is flat while rows x samples x 4 bytes stays within about 1 MiB and
# rises past it.
DEFAULT_PASS_CACHE_BYTES = 1 << 20


def samples_in_cache(rows: int, *, cache_bytes: int = DEFAULT_PASS_CACHE_BYTES) -> int:
    """The most samples a pass may hold so that one shard's activations (``rows`` per
    layer at most, float32) fit ``cache_bytes``; at least 1 (a larger request runs alone)."""
    return max(1, cache_bytes // (4 * max(1, rows)))


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
    in_flight: int = 0
    max_samples: int = 0

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

    def __init__(self, run: RunPass, *, max_samples: int = 1024, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._run = run
        self.max_samples = max_samples
        self.depth = depth
        self._waiting: collections.deque[_Member] = collections.deque()
        self._flying: set[asyncio.Task[None]] = set()
        self._pump_scheduled = False
        self._passes = self._requests = self._samples = 0

    @property
    def stats(self) -> PassStats:
        return PassStats(
            self._passes, self._requests, self._samples, len(self._flying), self.max_samples
        )

    async def submit(self, columns: Columns, *, timeout_s: float) -> Columns:
        """``columns``' output, from the next pass that has room for it."""
        loop = asyncio.get_running_loop()
        member = _Member(columns, loop.time() + timeout_s, loop.create_future())
        self._waiting.append(member)
        if not self._pump_scheduled:  # after this tick: requests of the same tick share a pass
            self._pump_scheduled = True
            loop.call_soon(self._pump)
        try:  # on a timeout or cancellation, wait_for cancels the answer: no pass takes it
            return await asyncio.wait_for(member.answer, timeout_s)
        except TimeoutError:
            raise PassDeadline(timeout_s) from None

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    async def close(self) -> None:
        """Stop: the passes in flight and every waiting request end cancelled."""
        while self._waiting:
            self._waiting.popleft().answer.cancel()
        flying = list(self._flying)
        for task in flying:
            task.cancel()
        await asyncio.gather(*flying, return_exceptions=True)

    def _pump(self) -> None:
        """Start passes while fewer than ``depth`` are in flight and requests wait."""
        self._pump_scheduled = False
        loop = asyncio.get_running_loop()
        while self._waiting and len(self._flying) < self.depth:
            members = self._next_pass()
            if not members:
                break
            task = loop.create_task(self._one_pass(members))
            self._flying.add(task)
            task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._flying.discard(task)
        if not task.cancelled():
            task.exception()  # _one_pass settles its members; nothing else is raised
        self._pump()

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


class PassMetrics(Collector):
    """Every shard set's pass counts as Prometheus families, read when scraped: passes run,
    the requests and samples they carried (requests per pass is
    ``gpufaas_shard_pass_requests_total / gpufaas_shard_passes_total``), passes in flight
    and the pass size cap, by model."""

    def __init__(self, stats: Callable[[], Mapping[str, PassStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        passes = CounterMetricFamily(
            "gpufaas_shard_passes", "Passes run through a shard set", labels=["model"]
        )
        requests = CounterMetricFamily(
            "gpufaas_shard_pass_requests", "Requests carried by a shard set's passes",
            labels=["model"],
        )  # fmt: skip
        samples = CounterMetricFamily(
            "gpufaas_shard_pass_samples", "Samples carried by a shard set's passes",
            labels=["model"],
        )  # fmt: skip
        flying = GaugeMetricFamily(
            "gpufaas_shard_passes_in_flight", "A shard set's passes in flight now",
            labels=["model"],
        )  # fmt: skip
        cap = GaugeMetricFamily(
            "gpufaas_shard_pass_max_samples",
            "The most samples one pass of a shard set holds (fits the cache)",
            labels=["model"],
        )
        for model, stats in sorted(self._stats().items()):
            passes.add_metric([model], stats.passes)
            requests.add_metric([model], stats.requests)
            samples.add_metric([model], stats.samples)
            flying.add_metric([model], stats.in_flight)
            cap.add_metric([model], stats.max_samples)
        return [passes, requests, samples, flying, cap]
