"""The host tier: each model's arena in (page-locked) host memory, ready to copy to a device.

Bounded in bytes; a model is held while a device copy reads from it, and a model retired while
held drains (:class:`gpufaas.gpu_manager.residency.Tier`). A miss fills from the disk tier: one
``readinto`` from the model's sidecar, or, the first time, the arena the disk tier just prepared
from the artifact, whose sidecar is then written behind it (holding the entry, off the request's
path). A model too large for the tier is served once without being cached.

:class:`HostMemory` hands out the host buffers (page-locked when CUDA is present) and re-uses
freed ones of the same size within the tier's budget; the disk tier fills fresh arenas in them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import torch

from gpufaas.cache import CacheStats, InsufficientCapacity, SingleFlight, TierStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.node import HostState
from gpufaas.gpu_manager.chain import Held, RuntimeFailure, Throughput, spec_fingerprint
from gpufaas.gpu_manager.device_faults import DeviceOutOfMemory
from gpufaas.gpu_manager.disk_tier import DiskTier
from gpufaas.gpu_manager.host_tier import HostModel, HostSlab, SidecarError, read_sidecar
from gpufaas.gpu_manager.residency import Tier

__all__ = ["ByteSeconds", "HostMemory", "HostTier"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 3  # a model replaced (or its sidecar lost) while filling is tried again, this often


class HostMemory:
    """Host buffers within a byte budget: ranges of one slab page-locked at start-up (never
    per refill), handed back when their last view is freed."""

    def __init__(self, *, capacity_bytes: int, pin: bool) -> None:
        self.pool = HostSlab(capacity_bytes, pin=pin)
        self.pinned = self.pool.pinned  # the real flag, not the wish
        self._in_use = 0
        self._lock = threading.Lock()

    def take_buffer(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._in_use += nbytes
            in_use = self._in_use
        try:
            buffer, _warm = self.pool.take(nbytes, in_use_bytes=in_use)
        except (DeviceOutOfMemory, MemoryError) as e:
            with self._lock:
                self._in_use -= nbytes
            raise RuntimeFailure(
                f"host memory is exhausted: {e}", status=503, reason="InsufficientMemory"
            ) from None
        return buffer

    def give_buffer(self, buffer: torch.Tensor) -> None:
        nbytes = buffer.numel()
        with self._lock:
            self._in_use -= nbytes
            in_use = self._in_use
        self.pool.give(buffer, in_use_bytes=in_use)

    def is_pinned(self, buffer: torch.Tensor) -> bool:
        """Whether this buffer lies in the page-locked slab (not a fall-back outside it)."""
        return self.pool.is_pinned(buffer)


class ByteSeconds:
    """Bytes held x seconds (memory-time), integrated exactly: :meth:`level` is called with
    the new byte count after every change, and at every read."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._bytes = 0
        self.total = 0.0  # byte-seconds

    def level(self, nbytes: int) -> float:
        """Account the bytes held since the last call, then hold ``nbytes``; the total."""
        now = self._clock()
        self.total += self._bytes * max(0.0, now - self._last)
        self._last, self._bytes = now, nbytes
        return self.total


class HostTier:
    """Model arenas in host memory, filled from the disk tier."""

    name = "host"

    def __init__(
        self,
        *,
        capacity_bytes: int,
        memory: HostMemory,
        below: DiskTier,
        stats: CacheStats,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.memory = memory
        self.held = ByteSeconds()  # host GB-s on /metrics (#13)
        self.tier: Tier[HostModel] = Tier(
            name=self.name,
            capacity_bytes=capacity_bytes,
            release=self._release,
            on_change=self._on_change,
        )
        self.fills: dict[str, Throughput] = {}  # by source: "artifact", "sidecar"
        self._below = below
        self._stats = stats
        self._spawn = spawn
        self._flights: SingleFlight[str, HostModel] = SingleFlight()

    # -- the tier protocol -------------------------------------------------------------------------

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[HostModel]:
        """The model's host arena, held for the caller (filled from the disk tier if needed)."""
        fingerprint = spec_fingerprint(spec)
        for _ in range(_ATTEMPTS):
            found = self.tier.resident(model)
            if found is not None and found.fingerprint != fingerprint:
                self.tier.retire(model)
                found = None
            hit = found is not None
            if found is not None:
                self._stats.record_hit(self.name)
            else:  # missing, or still being filled: join (or start) the fill
                self._stats.record_miss(self.name)
                found = await self._flights.do(model, lambda: self._fill(model, spec))
            if not found.cached:
                return self._hold_uncached(found, hit)
            if self.tier.hold(model, found):
                return Held(found, hit, functools.partial(self.tier.unhold, model, found))
        raise RuntimeFailure(
            f"model {model!r} kept leaving host memory while loading; try again",
            status=503,
            reason="InsufficientMemory",
        )

    def evict(self, model: str) -> bool:
        return self.tier.retire(model)

    def gb_seconds(self) -> float:
        """Host-tier bytes held x seconds since start, in GB-s (draining bytes included)."""
        return self._meter() / 1e9

    def _meter(self) -> float:
        return self.held.level(self.tier.lru.used_bytes)

    def _on_change(self) -> None:
        self._meter()

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)

    def state(self) -> HostState:
        return HostState(
            capacity_bytes=self.tier.lru.capacity_bytes,
            used_bytes=self.tier.lru.used_bytes,
            pinned=self.memory.pinned,
            pooled_bytes=self.memory.pool.pooled_bytes,
            residents=self.tier.residents(_describe),
            draining=self.tier.draining_rows(),
        )

    # -- filling -----------------------------------------------------------------------------------

    async def _fill(self, model: str, spec: InferenceFunctionSpec) -> HostModel:
        started = time.perf_counter()
        for _ in range(_ATTEMPTS):
            with await self._below.acquire(model, spec) as found:
                fresh = found.take_arena()
                source = "artifact" if fresh is not None else "sidecar"
                host = HostModel(
                    skeleton=found.skeleton,
                    arena=_no_arena(),
                    pinned=self.memory.pinned,
                    source=source,
                )
                cached = self._reserve(model, host)
                try:
                    if fresh is not None:
                        host.arena = fresh
                    elif found.sidecar is not None:
                        host.arena = self.memory.take_buffer(found.skeleton.layout.arena_bytes)
                        await asyncio.to_thread(
                            read_sidecar, found.sidecar, found.skeleton, host.arena
                        )
                    else:  # another caller adopted the fresh arena before its sidecar exists
                        self._abandon(model, host, cached)
                        continue
                except SidecarError as e:
                    self._abandon(model, host, cached)
                    self._below.sidecar_unusable(model, e)
                    continue
                except BaseException:
                    self._abandon(model, host, cached)
                    raise
            host.pinned = self.memory.is_pinned(host.arena)  # the truth for this arena
            self._finish(model, host, cached, started)
            if source == "artifact" and cached:
                self._spawn(self._write_behind(model, host))
            return host
        raise RuntimeFailure(
            f"model {model!r} could not be read from the disk tier; try again",
            status=503,
            reason="ModelLoadFailed",
        )

    def _reserve(self, model: str, host: HostModel) -> bool:
        """Claim host-tier bytes for ``host``; False if it cannot be cached there at all."""
        size = host.size_bytes
        self.tier.retire(model)  # a stale entry (older weights) would block the new one
        try:
            for victim in self.tier.make_room(size):
                self._stats.record_eviction(self.name, victim.size_bytes)
            self.tier.reserve(model, host, size_bytes=size)
        except InsufficientCapacity:
            logger.info("host tier cannot hold %s (%d bytes); serving it uncached", model, size)
            return False
        finally:
            self._meter()
        host.cached = True
        return True

    def _abandon(self, model: str, host: HostModel, cached: bool) -> None:
        if not cached:
            self._release(host)
            return
        if self.tier.arriving.get(model) is host:
            self.tier.retire(model)
        self.tier.unhold(model, host)

    def _finish(self, model: str, host: HostModel, cached: bool, started: float) -> None:
        seconds = time.perf_counter() - started
        self.fills.setdefault(host.source, Throughput()).add(host.size_bytes, seconds)
        origin = "remote" if host.source == "artifact" else self._below.name
        self._stats.record_move(origin, self.name, host.size_bytes)
        if cached and not self.tier.commit(model, host):
            self.tier.unhold(model, host)  # dropped while filling: served once, then released

    async def _write_behind(self, model: str, host: HostModel) -> None:
        if not self.tier.hold(model, host):
            return
        try:
            await self._below.store(model, host.skeleton, host.arena)
        finally:
            self.tier.unhold(model, host)

    def _hold_uncached(self, host: HostModel, hit: bool) -> Held[HostModel]:
        """A model too large for the tier: shared by the loads that joined its fill, and its
        buffer freed with the last one."""
        host.holds += 1

        def release() -> None:
            host.holds -= 1
            if host.holds == 0:
                self._release(host)

        return Held(host, hit, release)

    def _release(self, host: HostModel) -> None:
        arena, host.arena = host.arena, _no_arena()
        if arena.numel():
            self.memory.give_buffer(arena)


def _no_arena() -> torch.Tensor:
    """The arena of a host entry whose buffer is not taken yet (or given back)."""
    return torch.empty(0, dtype=torch.uint8)


def _describe(host: HostModel) -> dict[str, Any]:
    return {
        "weights_bytes": host.skeleton.layout.weights_bytes,
        "arena_bytes": host.size_bytes,
        "pinned": host.pinned,
        "source": host.source,
    }
