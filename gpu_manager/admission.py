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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["AdmissionFull", "DeviceAdmission"]


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

    @contextlib.asynccontextmanager
    async def slot(self, device: str) -> AsyncIterator[None]:
        """Hold one of ``device``'s slots for the body; raises :class:`AdmissionFull`."""
        gate = self._gate(device)
        if self.concurrency is not None and (gate.running >= self.concurrency or gate.waiters):
            if len(gate.waiters) >= self.max_waiting:
                raise AdmissionFull(
                    f"{len(gate.waiters)} requests already wait for device {device!r} "
                    f"(at most {self.max_waiting})"
                )
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            gate.waiters.append(granted)
            try:
                await granted  # the releaser counted us as running
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(gate)  # granted, then cancelled: pass the slot on
                else:
                    gate.waiters.remove(granted)
                raise
        else:
            gate.running += 1
        gate.peak = max(gate.peak, gate.running)
        try:
            yield
        finally:
            self._release(gate)

    @staticmethod
    def _release(gate: _Gate) -> None:
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
