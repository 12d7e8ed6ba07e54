"""The device backends: what loading and running a model needs of a device, on CUDA or the CPU.

A :class:`DeviceBackend` per device does everything device-specific the loader and the runtime
need: allocate an arena, copy an arena in forward-order groups with one event per group
(:class:`Transfer`), and give each request its own compute context. :class:`CudaBackend` copies on a
dedicated copy stream with non-blocking copies from page-locked memory and records a CUDA event per
group; compute runs on per-request streams that wait on a group's event before using it (as in
PipeSwitch). :class:`CpuBackend` runs the same protocol with a copy thread, plain copies and
``threading.Event`` s, so every code path above this layer is exercised on the CPU.

The rest of the device layer sits beside this module: which devices the node has
(:mod:`~gpufaas.gpu_manager.inventory`, from :mod:`~gpufaas.gpu_manager.nvml`), page-locked host
memory (:mod:`~gpufaas.gpu_manager.pinned`), what a device error means
(:mod:`~gpufaas.gpu_manager.device_faults`), and process-wide torch settings
(:mod:`~gpufaas.gpu_manager.process_setup`). Nothing outside these modules calls CUDA.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

from gpufaas.core.sharding import Handed
from gpufaas.gpu_manager.device_faults import (
    DeviceFailed,
    DeviceOutOfMemory,
    TransferFailed,
    is_fatal_device_error,
)
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.memory import BufferPool

__all__ = [
    "SMALL_LOAD_BYTES",
    "TRANSFER_TIMEOUT_S",
    "CpuBackend",
    "CpuTransfer",
    "CudaBackend",
    "CudaTransfer",
    "DeviceBackend",
    "Transfer",
    "copy_lane",
    "device_free_bytes",
    "make_backend",
    "start_held_back_transfer",
]

TRANSFER_TIMEOUT_S = (
    600.0  # a copy that takes longer is reported as failed, never waited on forever
)


class Transfer(abc.ABC):
    """One model's arena being copied onto a device, group by group in forward order.

    A compute context calls :meth:`wait_group` before it touches a group's weights: on CUDA
    that makes its stream wait on the group's event (the host does not block); on the CPU it
    blocks until the copy thread has copied the group.
    """

    def __init__(self, groups: Sequence[tuple[int, int]]) -> None:
        self.groups = tuple(groups)
        self.started_at = time.perf_counter()  # when the copy was asked for
        self.finished_at: float | None = None  # when the host saw it finish

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.groups)

    @abc.abstractmethod
    def wait_group(self, group: int) -> None: ...

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether every group has landed (or the copy failed)."""

    @abc.abstractmethod
    def wait_all(self) -> None:
        """Block until every group has landed; raise :class:`TransferFailed` if the copy failed."""

    @abc.abstractmethod
    def landed(self) -> bool:
        """Whether every group has landed and the copy did not fail: the copy is complete
        (a request that finds it so waits for nothing). Never blocks, never raises."""

    @property
    def seconds(self) -> float | None:
        """How long the copy itself ran, from its first byte to its last; None until done.

        Measured where the copy runs (CUDA events on the copy stream, timestamps in the copy
        thread), so neither issuing, queueing behind other copies, nor a late look at the
        result counts: the bandwidth ``nbytes / seconds`` is not inflated or deflated.
        """
        return None if self.finished_at is None else self.finished_at - self.started_at


class DeviceBackend(abc.ABC):
    """Everything device-specific that loading and running a model needs."""

    alignment = 64  # byte alignment of each storage inside an arena
    min_group_bytes = 0  # copies smaller than this are merged with the next layer's
    tracks_memory = False  # whether peak_bytes_during measures anything

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info

    @property
    def device(self) -> torch.device:
        return self.info.torch_device

    @abc.abstractmethod
    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        """An arena of ``nbytes`` on the device, and whether it was re-used memory.

        Raises :class:`DeviceOutOfMemory` when the device cannot hold it.
        """

    @abc.abstractmethod
    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """An arena nobody uses any more (the caller drops its references too)."""

    @abc.abstractmethod
    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        """Start copying ``src[a:b]`` to ``dst[a:b]`` for each group, in order.

        ``src`` is a host arena, or another device's arena when ``source`` is that device.
        """

    @abc.abstractmethod
    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The context one request computes in (its own stream on CUDA)."""

    def memory_allocated(self) -> int | None:
        """Bytes the device allocator holds for tensors now; None where it is not tracked."""
        return None

    def pooled_bytes(self) -> int:
        """Freed arenas kept for re-use (counted against the device's capacity)."""
        return 0

    def memory_reserved(self) -> int | None:
        """Bytes the device allocator holds from the driver; None where it is not tracked."""
        return None

    def peak_bytes_during(self, work: Callable[[], object]) -> int | None:
        """Run ``work`` and return the most device memory it held above what was allocated
        before; None where the device does not track it (CPU stand-ins: the probe's dispatch
        measurement stands). Blocking."""
        work()
        return None

    @abc.abstractmethod
    def trim(self) -> None:
        """Give cached free memory back (after an out-of-memory). Blocking: run in a thread."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all work on the device."""

    def hand_over(self, values: torch.Tensor, *, to: DeviceBackend) -> Handed:
        """``values`` (on this device, made in this thread's compute context) for ``to``'s
        compute, inside the node: no host round trip, no serialisation. Here (CPU stand-ins,
        which share host memory) the tensor itself, not a copy."""
        return Handed(values if values.device == to.device else values.to(to.device))

    def take_over(self, handed: Handed) -> torch.Tensor:
        """A tensor :meth:`hand_over` gave this device, ready for this thread's compute
        context (its stream on CUDA)."""
        return handed.values


def _copied(group: int, start: int, end: int) -> None:
    raise AssertionError("this transfer has finished")


class CpuTransfer(Transfer):
    def __init__(
        self,
        groups: Sequence[tuple[int, int]],
        copy_group: Callable[[int, int, int], None],
    ) -> None:
        super().__init__(groups)
        self._copy_group = copy_group
        self._landed = [threading.Event() for _ in self.groups]
        self._finished = threading.Event()
        self.error: BaseException | None = None
        self.copy_started_at: float | None = None  # the copy thread's first byte
        self.copy_finished_at: float | None = None  # and its last
        self._thread = threading.Thread(target=self._run, name="gpufaas-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.copy_started_at = time.perf_counter()
            for group, (start, end) in enumerate(self.groups):
                self._copy_group(group, start, end)
                self._landed[group].set()
            self.copy_finished_at = time.perf_counter()
        except BaseException as e:  # reported to every waiter
            self.error = e
        finally:
            # Drop the copy (it holds both arenas): a finished transfer kept by its model must
            # not keep a host arena's slab range, or a device arena, alive.
            self._copy_group = _copied
            self.finished_at = time.perf_counter()
            for event in self._landed:
                event.set()
            self._finished.set()

    @property
    def seconds(self) -> float | None:
        if self.copy_started_at is None or self.copy_finished_at is None:
            return None
        return self.copy_finished_at - self.copy_started_at

    def wait_group(self, group: int) -> None:
        if not self._landed[group].wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(
                f"layer group {group} did not arrive in {TRANSFER_TIMEOUT_S:.0f} s"
            )
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")

    def done(self) -> bool:
        return self._finished.is_set()

    def landed(self) -> bool:
        return self._finished.is_set() and self.error is None

    def wait_all(self) -> None:
        if not self._finished.wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(f"the weights did not arrive in {TRANSFER_TIMEOUT_S:.0f} s")
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")


class CpuBackend(DeviceBackend):
    """A CPU stand-in: its "device memory" is host memory, a copy is a memcpy on a copy thread.

    Freed arenas are pooled for re-use within the device's capacity, as the CUDA caching
    allocator keeps device memory.
    """

    min_group_bytes = 64 << 10  # below this, waking the compute thread costs more than it saves

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.pool = BufferPool(budget_bytes=info.capacity_bytes)

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.pool.take(nbytes, in_use_bytes=in_use_bytes)
        except MemoryError as e:
            raise DeviceOutOfMemory(f"{self.info.id}: {e}") from None

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        self.pool.give(arena, in_use_bytes=in_use_bytes)

    def pooled_bytes(self) -> int:
        return self.pool.pooled_bytes

    def trim(self) -> None:
        self.pool.trim()

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        return CpuTransfer(groups, lambda group, a, b: self._copy_group(dst, src, group, a, b))

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        dst[start:end].copy_(src[start:end])

    def compute(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Copies and compute are synchronous on the CPU: nothing to wait for."""


class CudaTransfer(Transfer):
    """A copy on one CUDA copy stream: an event per group, and two timing events around it."""

    def __init__(
        self,
        groups: Sequence[tuple[int, int]],
        events: Sequence[Any],
        device: torch.device,
        *,
        timing: tuple[Any, Any] | None = None,
    ) -> None:
        super().__init__(groups)
        self._events = list(events)
        self._device = device
        self._timing = timing  # (start, end) events with timing, on the copy stream

    def wait_group(self, group: int) -> None:
        # Every event was recorded before this transfer was handed out, so the wait is never
        # on an unrecorded event (which CUDA would treat as already complete).
        torch.cuda.current_stream(self._device).wait_event(self._events[group])

    def done(self) -> bool:
        finished = not self._events or bool(self._events[-1].query())
        if finished and self.finished_at is None:
            self.finished_at = time.perf_counter()
        return finished

    def landed(self) -> bool:
        try:
            return self.done()
        except RuntimeError:  # the copy's stream hit an error: not landed (wait_all says which)
            return False

    def wait_all(self) -> None:
        try:
            if self._events:
                self._events[-1].synchronize()  # one stream: the last event implies the rest
        except RuntimeError as e:
            if is_fatal_device_error(e):
                raise DeviceFailed.from_error(str(self._device), e) from e
            raise TransferFailed(f"copying the weights failed: {e}") from None
        finally:
            if self.finished_at is None:
                self.finished_at = time.perf_counter()

    @property
    def seconds(self) -> float | None:
        if self._timing is None or self.finished_at is None:
            return None
        start, end = self._timing
        try:
            return float(start.elapsed_time(end)) / 1000.0  # ms between the events, on the GPU
        except RuntimeError:  # not both recorded and complete
            return None


# Loads up to this size go on the high-priority copy lane, so a small cold model does not
# queue behind a large one on one stream (copies on different streams share the copy engines).
SMALL_LOAD_BYTES = 256 << 20


def copy_lane(
    nbytes: int, *, small_load_bytes: int = SMALL_LOAD_BYTES
) -> Literal["small", "large"]:
    """Which copy stream a load of ``nbytes`` goes on."""
    return "small" if nbytes <= small_load_bytes else "large"


class CudaBackend(DeviceBackend):
    """A GPU: arenas from torch's caching allocator, copies on two copy streams (lanes).

    Host-to-device copies come from page-locked host arenas, issued ``non_blocking`` on a copy
    stream, one event recorded after each group, with a timing event before the first and after
    the last. Small loads use a high-priority lane and large ones a low-priority lane, so a small
    cold load is not stuck behind a large one in one stream's queue. Arenas are allocated
    tagged with an allocation stream that runs no work (every copy and request on an arena
    has finished before it is freed), so either lane may fill any arena.

    A device-to-device copy is issued on the *source* GPU's outbound stream (torch runs a
    cross-device copy on the source device's current stream and makes the destination's current
    stream wait for it), with this device's lane current, so the per-group events recorded on
    the lane follow the copies. Each request computes on a stream of its own from a small pool,
    so requests for different models overlap on the GPU.

    Nothing here runs on the event loop: the runtime calls :meth:`allocate` and
    :meth:`start_transfer` from a worker thread (``asyncio.to_thread``).
    """

    alignment = 256  # what CUDA kernels' vectorised loads expect of a tensor's address
    min_group_bytes = 1 << 20  # smaller copies do not reach the link's bandwidth
    tracks_memory = True

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        least, greatest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
        self.lanes = {
            "small": torch.cuda.Stream(device=self.device, priority=greatest),  # type: ignore[no-untyped-call]
            "large": torch.cuda.Stream(device=self.device, priority=least),  # type: ignore[no-untyped-call]
        }
        self.alloc_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.outbound_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._idle_streams: list[Any] = []
        self._lock = threading.Lock()

    @property
    def copy_stream(self) -> Any:
        return self.lanes["large"]

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        for attempt in range(2):
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.alloc_stream):
                    return torch.empty(nbytes, dtype=torch.uint8, device=self.device), False
            except torch.OutOfMemoryError as e:
                if attempt:
                    raise DeviceOutOfMemory(f"{self.info.id}: {str(e).splitlines()[0]}") from None
                # Blocks cached for the compute streams (freed activations) count as used
                # until they are handed back to the driver. (A worker thread: not the loop.)
                torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        events = []
        lane = self.lanes[copy_lane(dst.numel())]
        peer = source.outbound_stream if isinstance(source, CudaBackend) else None
        started = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        with torch.cuda.device(self.device):
            # The arena may re-use memory that work on the default stream last touched.
            lane.wait_stream(torch.cuda.current_stream(self.device))
            started.record(lane)
            with (
                torch.cuda.stream(lane),
                torch.cuda.stream(peer) if peer is not None else contextlib.nullcontext(),
            ):
                for i, (start, end) in enumerate(groups):
                    dst[start:end].copy_(src[start:end], non_blocking=True)
                    last = i == len(groups) - 1
                    event = torch.cuda.Event(enable_timing=last)  # type: ignore[no-untyped-call]
                    event.record(lane)
                    events.append(event)
        timing = (started, events[-1]) if events else None
        return CudaTransfer(groups, events, self.device, timing=timing)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        with self._lock:
            stream = (
                self._idle_streams.pop()
                if self._idle_streams
                else torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            )
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                yield
        finally:
            # Idle before its request ends: the weights it read may be released right after.
            # (A sticky error raises here too; the caller classifies it.)
            stream.synchronize()
            with self._lock:
                self._idle_streams.append(stream)

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """The caching allocator takes the memory back once the last reference is dropped."""

    def trim(self) -> None:
        """Hand cached free blocks back to the driver. Blocking: never on the event loop."""
        torch.cuda.empty_cache()

    def memory_allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device))

    def memory_reserved(self) -> int | None:
        return int(torch.cuda.memory_reserved(self.device))

    def peak_bytes_during(self, work: Callable[[], object]) -> int | None:
        # Peak statistics are per device: concurrent requests can only raise the figure (a
        # safe over-estimate of the reserve, never an under-estimate).
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        work()
        torch.cuda.synchronize(self.device)
        return max(0, int(torch.cuda.max_memory_allocated(self.device)) - int(base))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def hand_over(self, values: torch.Tensor, *, to: DeviceBackend) -> Handed:
        """A peer copy onto ``to``'s GPU (or the tensor itself on this GPU), issued on this
        thread's current stream (the sender's compute stream: the copy follows the kernels
        that made ``values``); torch makes ``to``'s current stream wait for it, and the event
        recorded there after it is what the receiver's stream waits for (:meth:`take_over`).
        Not run: no GPU was lent to the session that wrote it."""
        with torch.cuda.device(self.device):
            moved = (
                values if values.device == to.device else values.to(to.device, non_blocking=True)
            )
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record(torch.cuda.current_stream(to.device))
        return Handed(moved, ready)

    def take_over(self, handed: Handed) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        if handed.ready is not None:
            stream.wait_event(handed.ready)
        handed.values.record_stream(stream)  # the allocator keeps it until this stream is done
        return handed.values


def start_held_back_transfer(
    backend: DeviceBackend,
    arena: torch.Tensor,
    source: torch.Tensor,
    groups: Sequence[tuple[int, int]],
    *,
    release: threading.Event,
    cuda_delay_s: float,
) -> Transfer:
    """Copy ``groups`` of ``source`` into ``arena``, held back (for the arrival gate's check):
    on CUDA behind a sleep kernel of ``cuda_delay_s`` on the copy lane; on the CPU until
    ``release`` is set."""
    if backend.device.type == "cuda":
        lane = backend.lanes[copy_lane(arena.numel())]  # type: ignore[attr-defined]
        cycles = int(cuda_delay_s * 2e9)  # GPU clocks stay under 2 GHz: at least the delay
        with torch.cuda.device(backend.device), torch.cuda.stream(lane):
            torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]
        return backend.start_transfer(arena, source, groups)

    def copy_group(group: int, start: int, end: int) -> None:
        if group == 0 and not release.wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed("the gate check's late groups were never released")
        arena[start:end].copy_(source[start:end])

    return CpuTransfer(groups, copy_group)


def make_backend(info: DeviceInfo) -> DeviceBackend:
    return CudaBackend(info) if info.kind == "cuda" else CpuBackend(info)


def device_free_bytes(info: DeviceInfo) -> int | None:
    """Free memory on a GPU now (all processes counted); None for CPU stand-ins."""
    if info.kind != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(info.index)
    except RuntimeError:
        return None
    return int(free)
