"""Per-device admission at the GPU manager: the one place that sees every gateway's requests.

Each gateway replica bounds the requests it has running on a device, but N replicas together
could send N times that. The manager admits at most ``concurrency`` requests per device at once
(load and inference together, as a gateway's dispatcher counts them); the rest wait here in
arrival order, at most ``max_waiting`` per device, and past that are refused with a 429 so the
gateway can retry. With one gateway nothing waits here: its own dispatcher already keeps to the
bound.

``running``, ``waiting`` and ``peak`` (the most ever running at once) are exported as gauges;
``peak`` is what the scale-out test reads. ``concurrency=None`` admits everything and still
counts, which is how a test shows that the bound is needed.

:class:`RequestOnce` runs a forwarded request at most once per request key (see its docstring).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufaas.gpu_manager.framed import Answer

__all__ = ["AdmissionFull", "DeviceAdmission", "RequestOnce"]


class AdmissionFull(Exception):
    """Too many requests wait for the device; the caller should retry later."""


@dataclass
class _Gate:
    running: int = 0
    peak: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class DeviceAdmission:
    """At most ``concurrency`` requests per device at once, FIFO waiting; see the module doc."""

    def __init__(self, *, concurrency: int | None, max_waiting: int = 1024) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency!r}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting!r}")
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self._gates: dict[str, _Gate] = {}

    def _gate(self, device: str) -> _Gate:
        gate = self._gates.get(device)
        if gate is None:
            gate = self._gates[device] = _Gate()
        return gate

    def slot(self, device: str) -> _Slot:
        """Hold one of ``device``'s slots for an ``async with`` body; entering raises
        :class:`AdmissionFull`. A slotted class, not a generator-based context manager: this
        runs once per request, and a class enters and leaves without a generator and its
        wrapper (a few µs a request)."""
        return _Slot(self, self._gate(device), device)

    def take_now(self, device: str) -> _Gate | None:
        """One of ``device``'s slots if one is free and nobody waits (give it back with
        :meth:`release`), else None: the warm step's admission, which never waits for one."""
        gate = self._gate(device)
        concurrency = self.concurrency
        if concurrency is not None and (gate.running >= concurrency or gate.waiters):
            return None
        gate.running += 1
        if gate.running > gate.peak:
            gate.peak = gate.running
        return gate

    @staticmethod
    def release(gate: _Gate) -> None:
        while gate.waiters:
            waiter = gate.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: running stays the same
                return
        gate.running -= 1

    def running(self, device: str) -> int:
        gate = self._gates.get(device)
        return gate.running if gate is not None else 0

    def peak(self, device: str) -> int:
        gate = self._gates.get(device)
        return gate.peak if gate is not None else 0

    def waiting(self, device: str) -> int:
        gate = self._gates.get(device)
        return len(gate.waiters) if gate is not None else 0

    def devices(self) -> list[str]:
        return list(self._gates)


class _Slot:
    """One request's hold on a device's slot: :meth:`DeviceAdmission.slot`'s context manager."""

    __slots__ = ("_admission", "_device", "_gate")

    def __init__(self, admission: DeviceAdmission, gate: _Gate, device: str) -> None:
        self._admission = admission
        self._gate = gate
        self._device = device

    async def __aenter__(self) -> None:
        admission, gate = self._admission, self._gate
        concurrency = admission.concurrency
        if concurrency is not None and (gate.running >= concurrency or gate.waiters):
            if len(gate.waiters) >= admission.max_waiting:
                raise AdmissionFull(
                    f"{len(gate.waiters)} requests already wait for device {self._device!r} "
                    f"(at most {admission.max_waiting})"
                )
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            gate.waiters.append(granted)
            try:
                await granted  # the releaser counted us as running
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    DeviceAdmission.release(gate)  # granted, then cancelled: pass the slot on
                else:
                    gate.waiters.remove(granted)
                raise
        else:
            gate.running += 1
        if gate.running > gate.peak:
            gate.peak = gate.running

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        DeviceAdmission.release(self._gate)


class AdmissionCollector(Collector):
    """``gpufaas_manager_device_running``, ``..._waiting`` and ``..._running_peak`` gauges."""

    def __init__(self, admission: DeviceAdmission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            "gpufaas_manager_device_running", "Requests running per device", labels=["device"]
        )
        waiting = GaugeMetricFamily(
            "gpufaas_manager_device_waiting",
            "Requests waiting for admission per device",
            labels=["device"],
        )
        peak = GaugeMetricFamily(
            "gpufaas_manager_device_running_peak",
            "The most requests ever running at once per device",
            labels=["device"],
        )
        for device in self.admission.devices():
            running.add_metric([device], self.admission.running(device))
            waiting.add_metric([device], self.admission.waiting(device))
            peak.add_metric([device], self.admission.peak(device))
        yield from (running, waiting, peak)


# -- one execution per request key (#16: a forward that failed after its owner dispatched) --------


class RequestOnce:
    """At most one execution per *request key* on this manager, and its answer kept a while.

    A gateway replica that forwards a placement to its owner tags it with a fresh key (the
    ``x-gpufaas-request-key`` header), and the owner passes the key on to the manager it
    dispatches to. If the forward then fails after the owner dispatched (the owner died or hung
    mid-request), the replica (1) asks the managers for the key's answer (:meth:`lookup`, which
    waits for a run in flight) and (2) if none has it, runs the request itself, under the same
    key. So a key that reaches this manager twice runs once: the second caller joins the run in
    flight, or gets the kept answer. Requests without a key (every ordinary one) pass straight
    through.

    Only successful answers (200) are kept, for ``keep_s``, at most ``max_bytes`` of bodies in
    all (oldest dropped first): a key whose first run failed (429, a load that did not fit) may
    run again, which is what a retry wants. Only forwarded requests carry keys, a few per cent
    of the traffic, so the memory stays small.
    """

    def __init__(
        self,
        *,
        keep_s: float = 60.0,
        max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._running: dict[str, asyncio.Future[Answer]] = {}
        self._kept: collections.OrderedDict[str, tuple[float, Answer]] = collections.OrderedDict()
        self._kept_bytes = 0
        self.joined = 0  # callers that got another caller's run instead of running again

    async def run(self, key: str | None, compute: Callable[[], Awaitable[Answer]]) -> Answer:
        """``compute()``'s answer; with a key already seen, the first run's answer instead."""
        if not key:
            return await compute()
        earlier = self._earlier(key)
        if earlier is not None:
            self.joined += 1
            return await asyncio.shield(earlier)
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._running[key] = done
        try:
            response = await compute()
        except BaseException as e:
            done.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
            done.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            self._running.pop(key, None)
        done.set_result(response)
        if response[0] == 200:
            self._keep(key, response)
        return response

    async def lookup(self, key: str, *, wait_s: float) -> Answer | None:
        """The answer of ``key``'s run here: kept, or awaited (at most ``wait_s``) while in
        flight; None if this manager never ran it, or its run failed."""
        earlier = self._earlier(key)
        if earlier is None:
            return None
        try:
            response = await asyncio.wait_for(asyncio.shield(earlier), timeout=wait_s)
        except Exception:
            return None
        return response if response[0] == 200 else None

    def _earlier(self, key: str) -> asyncio.Future[Answer] | None:
        running = self._running.get(key)
        if running is not None:
            return running
        self._expire()
        kept = self._kept.get(key)
        if kept is None:
            return None
        ready: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        ready.set_result(kept[1])
        return ready

    def _keep(self, key: str, response: Answer) -> None:
        status, headers, body = response
        # A copy: an answer's body may be a view of a buffer the server reuses.
        response = (status, headers, bytes(body))
        size = len(body)
        if size > self.max_bytes:
            return
        self._kept[key] = (self._clock(), response)
        self._kept_bytes += size
        while self._kept_bytes > self.max_bytes:
            _, (_, dropped) = self._kept.popitem(last=False)
            self._kept_bytes -= len(dropped[2])

    def _expire(self) -> None:
        horizon = self._clock() - self.keep_s
        while self._kept:
            key, (at, response) = next(iter(self._kept.items()))
            if at >= horizon:
                break
            del self._kept[key]
            self._kept_bytes -= len(response[2])
