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
(:meth:`~Dispatcher.add_device`, or a first job), current whenever it is read through that
property: pass it to ``policy.choose`` as it is, rather than a list of loads built per request::

    for key in healthy_device_keys:
        dispatcher.add_device(key)  # in the table with no load until its first job
    key = policy.choose(request, dispatcher.table, directory).device
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.scheduler.o3 import O3Queue

__all__ = [
    "DeviceGone",
    "DeviceLoad",
    "DeviceTable",
    "DispatchStats",
    "Dispatcher",
    "Job",
    "QueueFull",
    "directory_residency",
    "expected_waits",
]

T = TypeVar("T")
Mode = Literal["fifo", "o3"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DeviceLoad:
    """What a policy knows about one device when it decides."""

    key: str  # cluster-wide: "<node>/<device>"
    outstanding: int  # requests sent to it and not answered yet (queued or running)
    # Expected wait (ms) before a request sent now would start there, from the dispatcher's
    # queue; None: unknown, estimated from ``outstanding``.
    queue_ms: float | None = None
    # The same for a request whose model the device holds: it needs no load, so it starts as
    # soon as a slot is free, however long the loads running there take. None: ``queue_ms``.
    hit_wait_ms: float | None = None


# DeviceTable.least_waiting keeps at least _LOW_KEEP positions after a partial sort, and sorts
# again once more than _LOW_SLACK x as many as asked for have gathered below the bound.
_LOW_KEEP = 24
_LOW_SLACK = 16


class DeviceTable(Sequence[DeviceLoad]):
    """Devices and their loads in arrays: a ``Sequence[DeviceLoad]`` that policies scan fast.

    The owner keeps it current with :meth:`adjust` (deltas, as requests come and go) or
    :meth:`update` (absolute values). Positions change when a device is removed (the last one
    moves into the gap), so hold keys, not indices.

    Besides the arrays, the table keeps the few devices with the least expected wait up to
    date on every write (:meth:`least_waiting`), so that a policy looking for somewhere to
    load a model need not sort a thousand waits per decision.
    """

    def __init__(self, devices: Sequence[DeviceLoad] = ()) -> None:
        self._keys: list[str] = []
        self._position: dict[str, int] = {}
        self._outstanding: IntArray = np.zeros(max(8, len(devices)), dtype=np.int64)
        self._queue_ms: FloatArray = np.zeros(max(8, len(devices)), dtype=np.float64)
        self._hit_wait_ms: FloatArray = np.zeros(max(8, len(devices)), dtype=np.float64)
        # Read-only views of the used part, made once per change of size rather than per
        # decision (making one costs about as much as a policy's whole fast path).
        self._views: tuple[IntArray, FloatArray, FloatArray] | None = None
        self._columns: object | None = None  # a policy's view of the columns, made as the views are
        # The least-waiting devices, position -> wait: every position whose wait is below
        # _low_bound, and perhaps some whose wait equals it (ties at the bound), none above.
        # Built by a partial sort when a policy asks and too few are left; writes keep it.
        self._low: dict[int, float] = {}
        self._low_bound = -math.inf
        for device in devices:
            self.add(
                device.key,
                outstanding=device.outstanding,
                queue_ms=device.queue_ms or 0.0,
                hit_wait_ms=device.hit_wait_ms,
            )

    def __repr__(self) -> str:
        return f"<DeviceTable {len(self._keys)} devices>"

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> DeviceLoad: ...
    @overload
    def __getitem__(self, index: slice) -> list[DeviceLoad]: ...
    def __getitem__(self, index: int | slice) -> DeviceLoad | list[DeviceLoad]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self._keys))[index]]
        key = self._keys[index]  # raises IndexError, and accepts negative indices
        i = self._position[key]
        queue_ms, hit_wait_ms = float(self._queue_ms[i]), float(self._hit_wait_ms[i])
        return DeviceLoad(
            key=key,
            outstanding=int(self._outstanding[i]),
            queue_ms=queue_ms,
            hit_wait_ms=None if hit_wait_ms == queue_ms else hit_wait_ms,  # None: the same
        )

    def __iter__(self) -> Iterator[DeviceLoad]:
        return (self[i] for i in range(len(self._keys)))

    def __contains__(self, key: object) -> bool:
        return key in self._position

    @property
    def keys(self) -> list[str]:
        """Device keys by position (a view: do not modify)."""
        return self._keys

    @property
    def outstanding(self) -> IntArray:
        """Outstanding requests by position (a read-only view)."""
        return (self._views or self._make_views())[0]

    @property
    def queue_ms(self) -> FloatArray:
        """Expected wait in ms by position (a read-only view)."""
        return (self._views or self._make_views())[1]

    @property
    def hit_wait_ms(self) -> FloatArray:
        """Expected wait in ms of a request whose model is there, by position (read-only)."""
        return (self._views or self._make_views())[2]

    def _make_views(self) -> tuple[IntArray, FloatArray, FloatArray]:
        n = len(self._keys)
        outstanding, queue_ms = self._outstanding[:n], self._queue_ms[:n]
        hit_wait_ms = self._hit_wait_ms[:n]
        for view in (outstanding, queue_ms, hit_wait_ms):
            view.flags.writeable = False
        self._views = (outstanding, queue_ms, hit_wait_ms)
        return self._views

    def position(self, key: str) -> int | None:
        return self._position.get(key)

    def least_wait(self) -> float:
        """The least expected wait of any device (``inf`` for an empty table)."""
        if self._low:  # every wait below the bound is in it, and none above
            return min(self._low.values())
        waits = self.queue_ms
        return waits.item(int(waits.argmin())) if len(waits) else math.inf

    def least_waiting(self, *, at_least: int) -> list[tuple[float, int]]:
        """``(wait, position)`` of the devices with the least expected wait, in no order.

        At least ``at_least`` of them (or every device, if there are fewer), usually a few more,
        and every device not listed waits at least as long as each listed one: a caller that
        needs more continues with the least waits among the rest. Costs O(listed) while enough
        of the previous ones still wait least (the table keeps them on every write), otherwise
        one partial sort of the waits. Sort the pairs (or heapify them) for increasing
        (wait, position).
        """
        low = self._low
        if not at_least <= len(low) <= max(_LOW_SLACK * at_least, _LOW_KEEP) and not (
            len(low) < at_least and self._low_bound == math.inf  # every device is listed
        ):
            self._rebuild_low(max(_LOW_KEEP, 2 * at_least))
            low = self._low
        return list(zip(low.values(), low, strict=True))

    def _rebuild_low(self, keep: int) -> None:
        n = len(self._keys)
        waits = self._queue_ms[:n]
        if keep >= n:
            self._low = dict(enumerate(waits.tolist()))
            self._low_bound = math.inf
            return
        part = np.argpartition(waits, keep)  # part[keep]: the (keep+1)-th smallest wait
        head = part[:keep]
        self._low = dict(zip(head.tolist(), waits[head].tolist(), strict=True))
        self._low_bound = waits.item(int(part[keep]))

    def _track(self, i: int, wait: float) -> None:
        """Keep the least-waiting set current after position ``i``'s wait changed."""
        bound = self._low_bound
        if wait < bound:
            self._low[i] = wait
        elif wait > bound:
            if i in self._low:
                del self._low[i]
        elif i in self._low:  # at the bound: it may stay, but need not join
            self._low[i] = wait

    def add(
        self,
        key: str,
        *,
        outstanding: int = 0,
        queue_ms: float = 0.0,
        hit_wait_ms: float | None = None,
    ) -> None:
        """Add a device; ``hit_wait_ms`` defaults to ``queue_ms``."""
        if key in self._position:
            raise ValueError(f"device {key!r} is already in the table")
        n = len(self._keys)
        if n == len(self._outstanding):
            self._outstanding = np.concatenate(
                [self._outstanding, np.zeros_like(self._outstanding)]
            )
            self._queue_ms = np.concatenate([self._queue_ms, np.zeros_like(self._queue_ms)])
            self._hit_wait_ms = np.concatenate(
                [self._hit_wait_ms, np.zeros_like(self._hit_wait_ms)]
            )
        self._keys.append(key)
        self._position[key] = n
        self._outstanding[n] = outstanding
        self._queue_ms[n] = queue_ms
        self._hit_wait_ms[n] = queue_ms if hit_wait_ms is None else hit_wait_ms
        self._views = self._columns = None
        self._track(n, self._queue_ms.item(n))

    def remove(self, key: str) -> None:
        i = self._require(key)
        last = len(self._keys) - 1
        self._low.pop(last, None)
        if i != last:
            moved = self._keys[last]
            self._keys[i] = moved
            self._position[moved] = i
            self._outstanding[i] = self._outstanding[last]
            self._queue_ms[i] = self._queue_ms[last]
            self._hit_wait_ms[i] = self._hit_wait_ms[last]
            self._track(i, self._queue_ms.item(i))
        self._keys.pop()
        del self._position[key]
        self._views = self._columns = None

    def update(
        self,
        key: str,
        *,
        outstanding: int | None = None,
        queue_ms: float | None = None,
        hit_wait_ms: float | None = None,
    ) -> None:
        """Set a device's values (those given); a ``queue_ms`` without a ``hit_wait_ms`` sets
        both."""
        i = self._require(key)
        if outstanding is not None:
            self._outstanding[i] = outstanding
        if queue_ms is not None:
            self._queue_ms[i] = queue_ms
            self._track(i, self._queue_ms.item(i))
        if hit_wait_ms is not None:
            self._hit_wait_ms[i] = hit_wait_ms
        elif queue_ms is not None:
            self._hit_wait_ms[i] = queue_ms

    def adjust(
        self,
        key: str,
        *,
        outstanding: int = 0,
        queue_ms: float = 0.0,
        hit_wait_ms: float | None = None,
    ) -> None:
        """Add deltas to a device's load (a negative delta when work leaves);
        ``hit_wait_ms`` defaults to the ``queue_ms`` delta."""
        i = self._require(key)
        self._outstanding[i] += outstanding
        wait = max(0.0, self._queue_ms.item(i) + queue_ms)
        self._queue_ms[i] = wait
        hit_delta = queue_ms if hit_wait_ms is None else hit_wait_ms
        self._hit_wait_ms[i] = max(0.0, self._hit_wait_ms.item(i) + hit_delta)
        self._track(i, wait)

    def _require(self, key: str) -> int:
        i = self._position.get(key)
        if i is None:
            raise KeyError(f"device {key!r} is not in the table")
        return i


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
        self._table = DeviceTable()  # one row per lane, written when read (see table)
        self._stale: dict[str, _Lane] = {}  # lanes changed since their row was last written

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
        """Note that the lane's load changed; :attr:`table` writes its row when next read.

        A job starts and ends with a change each, and a request reads the table once (the
        policy's choice): written at read, a request costs one row write, not two. A lane no
        longer in ``_lanes`` (its device was removed, perhaps added again since) has no row of
        its own: the jobs it still runs must not touch the new lane's.
        """
        if self._lanes.get(device_key) is lane:
            self._stale[device_key] = lane

    def _write_stale(self) -> None:
        """Write the load of every lane changed since its row was last written: O(1) each."""
        for device_key, lane in self._stale.items():
            if self._lanes.get(device_key) is lane:
                wait, hit_wait = self._waits(lane)
                self._table.update(
                    device_key,
                    outstanding=len(lane.queue) + lane.running,
                    queue_ms=wait,
                    hit_wait_ms=hit_wait,
                )
        self._stale.clear()

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
        self._stale.pop(device_key, None)
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

        Current as of this read: the rows of devices whose load changed since the last read are
        written here, so read it through this property each time (hold the dispatcher, not the
        table). Pass it to ``policy.choose``, but do not change it. Positions move when a
        device is removed: hold keys, not positions.
        """
        if self._stale:
            self._write_stale()
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
