"""The residency chain's shared vocabulary: the tier protocol, held handles, failures.

A model's weights reach a device through a chain of tiers, fastest first::

    DeviceTier  <-  PeerSource  <-  HostTier  <-  DiskTier  <-  ArtifactSource
    (per device)    (a neighbour)   (host RAM)    (sidecars)     (fsspec + sha256)

Every tier implements :class:`ResidencyTier`: :meth:`~ResidencyTier.acquire` returns the model
*held* in that tier (a :class:`Held` handle; a held entry is never evicted), filling it from the
next tier down on a miss; :meth:`~ResidencyTier.evict` drops it (memory still in use drains first);
:meth:`~ResidencyTier.stats` gives its hit, miss and byte counters. The runtime
(:mod:`gpufaas.gpu_manager.runtime`) only composes the tiers; each one is built and tested alone.

A tier reports failures as :class:`RuntimeFailure`: a status and a message meant for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from gpufaas.cache import TierStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.node import Throughput as ThroughputState

__all__ = [
    "DeviceLoadOutOfMemory",
    "Held",
    "ResidencyTier",
    "RuntimeFailure",
    "Throughput",
    "spec_fingerprint",
]

V = TypeVar("V")


class RuntimeFailure(Exception):
    """A request that cannot be served; ``status`` and the message go to the caller."""

    def __init__(
        self, message: str, *, status: int, reason: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeviceLoadOutOfMemory(RuntimeFailure):
    """The device's allocator refused a load's arena (retried once after evicting)."""


@dataclass(eq=False)
class Held(Generic[V]):
    """A value held in a tier for one caller. :meth:`release` ends the hold (once; repeats are
    no-ops), after which the tier may evict the value."""

    value: V
    hit: bool  # found in this tier (no fill from below)
    _release: Callable[[], None] = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()

    def __enter__(self) -> V:
        return self.value

    def __exit__(self, *_exc: object) -> None:
        self.release()


def not_held(value: V, *, hit: bool = False) -> Held[V]:
    """A handle to a value no tier accounts for (uncached, or always present)."""
    return Held(value, hit, lambda: None)


class ResidencyTier(Protocol[V]):
    """One tier of the chain. ``prefer``: models to evict first if this acquire must make room
    (the scheduler's hint; tiers without eviction on acquire ignore it)."""

    name: str

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[V]: ...

    def evict(self, model: str) -> bool: ...

    def stats(self) -> TierStats: ...


def spec_fingerprint(spec: InferenceFunctionSpec) -> str:
    """What identifies a function's weights: a change invalidates cached copies."""
    return f"{spec.model.uri}|{spec.model.format}|{spec.model.sha256}"


@dataclass
class Throughput:
    """Bytes moved along one path, and the seconds it took."""

    nbytes: int = 0
    seconds: float = 0.0
    count: int = 0

    def add(self, nbytes: int, seconds: float) -> None:
        self.nbytes += nbytes
        self.seconds += seconds
        self.count += 1

    def to_state(self) -> ThroughputState:
        gbps = self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return ThroughputState(bytes=self.nbytes, seconds=self.seconds, count=self.count, gbps=gbps)
