"""Per-device dispatch queues in the gateway: FIFO for ``lb``/``lalb``, O3 for ``lalb-o3``.

A :class:`Dispatcher` lets at most ``concurrency`` requests run on each device at a time; the
rest wait in that device's bounded queue (:class:`~gpufaas.scheduler.o3.O3Queue`), served in
arrival order (``mode="fifo"``) or out of order with bounded overtaking (``mode="o3"``), where a
request whose model is resident on the device may go first. Residency comes from a callback,
normally the cache directory (:func:`directory_residency`). Usage::

    dispatcher = Dispatcher(mode=policy.dispatch, is_resident=directory_residency(directory))
    job = Job(model=name, slo_ms=spec.slo.latency_ms, expected_ms=estimate)
    response = await dispatcher.submit(device_key, job, lambda: client.post(...))

``submit`` waits for a slot on the device, runs ``run()`` there, frees the slot, and returns what
``run()`` returned (or raises what it raised). It raises :class:`QueueFull` at once if the device's
queue is full, and :class:`DeviceGone` if :meth:`Dispatcher.remove_device` drops the device while
the job waits (the caller may retry elsewhere). Cancelling the caller takes the job out of the
queue, or frees its slot.

For the routing policy, :meth:`Dispatcher.load` gives each device's
:class:`~gpufaas.scheduler.policy.DeviceLoad`: outstanding jobs, and the expected wait before a
new job would start there (the expected device time of the queued and running jobs, divided by
``concurrency``). :attr:`Dispatcher.table` holds the same for every device the dispatcher knows
(:meth:`~Dispatcher.add_device`, or a first job), kept current in O(1) as jobs come, start and go:
pass it to ``policy.choose`` as it is, rather than a list of loads built per request::

    for key in healthy_device_keys:
        dispatcher.add_device(key)  # in the table with no load until its first job
    key = policy.choose(request, dispatcher.table, directory)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.scheduler.o3 import O3Queue
from gpufaas.scheduler.policy import DeviceLoad, DeviceTable

__all__ = [
    "DeviceGone",
    "DispatchStats",
    "Dispatcher",
    "Job",
    "QueueFull",
    "directory_residency",
    "expected_waits",
]

T = TypeVar("T")
Mode = Literal["fifo", "o3"]


class QueueFull(Exception):
    """The device's queue is at its bound; the caller should shed the request or go elsewhere."""


class DeviceGone(Exception):
    """The device was removed while the job waited for it."""


@dataclass(frozen=True)
class Job:
    """What the dispatcher needs to know about a request."""

    model: str
    slo_ms: float | None = None  # deadline = submission time + slo_ms; orders O3 overtaking
    expected_ms: float = 0.0  # expected device time (load + inference), for queue estimates


@dataclass
class DispatchStats:
    """Counters of one device's queue."""

    submitted: int = 0
    started: int = 0
    overtakes: int = 0  # jobs started ahead of an older waiting job
    rejected: int = 0  # QueueFull
    cancelled: int = 0  # left while waiting
    wait_ms_total: float = 0.0  # summed over started jobs
    max_wait_ms: float = 0.0


@dataclass
class _Lane:
    queue: O3Queue[asyncio.Future[None]]
    running: int = 0
    pending_ms: float = 0.0  # expected device time of queued and running jobs
    stats: DispatchStats = field(default_factory=DispatchStats)


def expected_waits(
    *, running: int, queued: int, pending_ms: float, concurrency: int
) -> tuple[float, float]:
    """A device's expected waits, ``(queue_ms, hit_wait_ms)``, for ``DeviceLoad``.

    ``queue_ms``, for a job that loads its model: the expected device time of the queued and
    running jobs per slot (loads share the device's copy work). ``hit_wait_ms``, for a job whose
    model is there: none while a slot is free, however long the running jobs (loads) take.
    """
    wait = pending_ms / concurrency
    return wait, 0.0 if running < concurrency and not queued else wait


def directory_residency(directory: ClusterDirectory) -> Callable[[str, str], bool]:
    """``is_resident(device_key, model)``: whether the directory sees the model resident there."""

    def is_resident(device_key: str, model: str) -> bool:
        return directory.state(device_key, model) is Residency.RESIDENT

    return is_resident


class Dispatcher:
    """Bounded per-device queues with a concurrency limit; see the module docstring."""

    def __init__(
        self,
        *,
        mode: Mode = "fifo",
        concurrency: int = 2,
        max_queue: int = 1024,
        max_passes: int = 8,
        max_hold_ms: float = 500.0,
        is_resident: Callable[[str, str], bool] = lambda device_key, model: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("fifo", "o3"):
            raise ValueError(f"mode must be 'fifo' or 'o3', got {mode!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        O3Queue[None](max_passes=max_passes, max_hold_ms=max_hold_ms)  # validates both
        self.mode: Mode = mode
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.max_passes = max_passes if mode == "o3" else 0
        self.max_hold_ms = max_hold_ms
        self.is_resident = is_resident
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        self._table = DeviceTable()  # one row per lane, written by _sync

    def __repr__(self) -> str:
        return f"<Dispatcher {self.mode} x{self.concurrency}, {len(self._lanes)} devices>"

    # -- submitting ------------------------------------------------------------------------------

    async def submit(self, device_key: str, job: Job, run: Callable[[], Awaitable[T]]) -> T:
        """Run ``run()`` on ``device_key`` when the device has a free slot; return its result."""
        lane = self._lane(device_key)
        lane.stats.submitted += 1
        if lane.running < self.concurrency and not lane.queue:
            lane.running += 1
            self._started(lane, wait_ms=0.0, overtook=False)
            lane.pending_ms += job.expected_ms
            self._sync(device_key, lane)
        elif len(lane.queue) >= self.max_queue:
            lane.stats.rejected += 1
            raise QueueFull(
                f"device {device_key!r} has {len(lane.queue)} requests waiting"
                f" (the limit is {self.max_queue})"
            )
        else:
            # Its expected time counts from now: while it waits, then while it runs.
            lane.pending_ms += job.expected_ms
            try:
                await self._wait_for_slot(device_key, lane, job)
            except BaseException:  # cancelled, or DeviceGone: it never ran
                lane.pending_ms = max(0.0, lane.pending_ms - job.expected_ms)
                self._sync(device_key, lane)
                raise
        try:
            return await run()
        finally:
            lane.pending_ms = max(0.0, lane.pending_ms - job.expected_ms)
            lane.running -= 1
            self._pump(device_key, lane)

    async def _wait_for_slot(self, device_key: str, lane: _Lane, job: Job) -> None:
        now_ms = self._clock() * 1000
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = lane.queue.push(
            granted,
            model=job.model,
            now_ms=now_ms,
            deadline_ms=None if job.slo_ms is None else now_ms + job.slo_ms,
        )
        self._sync(device_key, lane)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                # Cancelled just after being granted a slot: give it back.
                lane.running -= 1
                self._pump(device_key, lane)
            else:
                lane.queue.remove(ticket, now_ms=self._clock() * 1000)
                lane.stats.cancelled += 1
                self._sync(device_key, lane)
            raise

    def _pump(self, device_key: str, lane: _Lane) -> None:
        """Grant free slots to waiting jobs, in the queue's order."""
        if self._lanes.get(device_key) is not lane:
            return  # the device was removed
        while lane.running < self.concurrency and lane.queue:
            now_ms = self._clock() * 1000
            waiting = lane.queue.pop_next(now_ms, lambda model: self.is_resident(device_key, model))
            if waiting is None:
                break
            if waiting.item.done():  # its caller was cancelled; it is removed on wake-up
                continue
            lane.running += 1
            self._started(lane, wait_ms=now_ms - waiting.arrival_ms, overtook=waiting.overtook)
            waiting.item.set_result(None)
        self._sync(device_key, lane)

    def _sync(self, device_key: str, lane: _Lane) -> None:
        """Write the lane's load into the table: O(1), after every change to it.

        A lane no longer in ``_lanes`` (its device was removed, perhaps added again since) has
        no row of its own: the jobs it still runs must not touch the new lane's.
        """
        if self._lanes.get(device_key) is lane:
            wait, hit_wait = self._waits(lane)
            self._table.update(
                device_key,
                outstanding=len(lane.queue) + lane.running,
                queue_ms=wait,
                hit_wait_ms=hit_wait,
            )

    def _waits(self, lane: _Lane) -> tuple[float, float]:
        return expected_waits(
            running=lane.running,
            queued=len(lane.queue),
            pending_ms=lane.pending_ms,
            concurrency=self.concurrency,
        )

    @staticmethod
    def _started(lane: _Lane, *, wait_ms: float, overtook: bool) -> None:
        stats = lane.stats
        stats.started += 1
        stats.overtakes += overtook
        stats.wait_ms_total += wait_ms
        stats.max_wait_ms = max(stats.max_wait_ms, wait_ms)

    # -- devices ---------------------------------------------------------------------------------

    def _lane(self, device_key: str) -> _Lane:
        lane = self._lanes.get(device_key)
        if lane is None:
            lane = _Lane(queue=O3Queue(max_passes=self.max_passes, max_hold_ms=self.max_hold_ms))
            self._lanes[device_key] = lane
            self._table.add(device_key)
        return lane

    def add_device(self, device_key: str) -> bool:
        """Make a device known, with no load: it is in :attr:`table` before its first job.

        Returns False if it was known already (nothing changes). A job submitted to an unknown
        device adds it too.
        """
        if device_key in self._lanes:
            return False
        self._lane(device_key)
        return True

    def remove_device(self, device_key: str) -> int:
        """Forget a device; its waiting jobs fail with :class:`DeviceGone`. Returns how many.

        It leaves :attr:`table` at once. Jobs already running finish (or fail) on their own,
        and do not count towards the device's load if it is added again.
        """
        lane = self._lanes.pop(device_key, None)
        if lane is None:
            return 0
        self._table.remove(device_key)
        failed = 0
        for waiting in lane.queue:
            if not waiting.item.done():
                waiting.item.set_exception(DeviceGone(f"device {device_key!r} was removed"))
                failed += 1
        return failed

    # -- observing -------------------------------------------------------------------------------

    @property
    def table(self) -> DeviceTable:
        """Every known device's load, as :meth:`load` gives it, in one array-backed table.

        The dispatcher keeps it current; read it, or pass it to ``policy.choose``, but do not
        change it. Positions move when a device is removed: hold keys, not positions.
        """
        return self._table

    def devices(self) -> list[str]:
        return list(self._lanes)

    def queued(self, device_key: str) -> int:
        lane = self._lanes.get(device_key)
        return len(lane.queue) if lane is not None else 0

    def running(self, device_key: str) -> int:
        lane = self._lanes.get(device_key)
        return lane.running if lane is not None else 0

    def expected_wait_ms(self, device_key: str) -> float:
        """Expected time before a job submitted now that loads its model would have the device
        to itself: the expected device time of the queued and running jobs, per slot."""
        lane = self._lanes.get(device_key)
        return self._waits(lane)[0] if lane is not None else 0.0

    def load(self, device_key: str) -> DeviceLoad:
        """The device's load as the routing policy wants it (``hit_wait_ms`` None: the same
        as ``queue_ms``)."""
        lane = self._lanes.get(device_key)
        wait, hit_wait = self._waits(lane) if lane is not None else (0.0, 0.0)
        return DeviceLoad(
            key=device_key,
            outstanding=self.queued(device_key) + self.running(device_key),
            queue_ms=wait,
            hit_wait_ms=None if hit_wait == wait else hit_wait,
        )

    def stats(self, device_key: str) -> DispatchStats:
        lane = self._lanes.get(device_key)
        return lane.stats if lane is not None else DispatchStats()
