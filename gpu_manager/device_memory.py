"""One device's memory as a cache: who holds its bytes, and who waits for them.

:class:`DeviceMemory` is the byte LRU of what is resident on a device (models, and shards of
distributed models) with in-use pins (:class:`~gpufaas.gpu_manager.residency.Tier`). It evicts
unheld entries to make room, lets a load claim bytes (waiting up to a deadline while entries in use
hold them), returns a leaving model's arena to the device backend, and levels the device's GB-s at
every change. :class:`DeviceShards` places shards in the same budget and LRU as the models.

Waiting is event-driven: a claim waiting for memory sleeps on an event set whenever the bytes or
entries change (each waiter holds the event that was current when it looked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpufaas.cache import CacheStats, InsufficientCapacity
from gpufaas.core.node import DrainingState, ResidentState
from gpufaas.gpu_manager.chain import RuntimeFailure
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.host_cache import ByteSeconds
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.residency import Tier

__all__ = [
    "SHARD_PREFIX",
    "DeviceMemory",
    "DeviceShards",
    "Resident",
    "ShardResident",
    "as_model",
]

# Keys of shards (gpu_manager/shards.py) in the device LRU; model names are DNS-1123 labels.
SHARD_PREFIX = "\x00shard:"


@dataclass(eq=False)
class ShardResident:
    """A shard of a distributed model resident on this device, beside the models: its bytes
    count in this tier's LRU, it is evicted like any unheld entry, and ``evicted`` then tells
    the shard host (which drops the rest of its set: a shard without its set is useless)."""

    size_bytes: int
    evicted: Callable[[ShardResident], None]
    holds: int = 0
    drain_key: str | None = None


Resident = DeviceModel | ShardResident


def as_model(value: Resident | None) -> DeviceModel | None:
    """``value`` if it is a model (not a shard, not absent)."""
    return value if isinstance(value, DeviceModel) else None


class DeviceMemory:
    """The bytes of one device: a byte LRU of residents with in-use pins, and claims on it."""

    def __init__(
        self, *, info: DeviceInfo, backend: DeviceBackend, stats: CacheStats, name: str
    ) -> None:
        self._backend = backend
        self._stats = stats
        self._name = name  # the tier's name in the cache stats
        self.tier: Tier[Resident] = Tier(
            name=info.id,
            capacity_bytes=info.capacity_bytes,
            release=self._release,
            on_change=self._notify,
        )
        self.held = ByteSeconds()  # device GB-s on /metrics (#13), loading bytes included
        self._changed = asyncio.Event()  # replaced at a change once looked at; waiters hold it
        self._looked = False  # whether anyone took the current event (else a change keeps it)

    @property
    def changed(self) -> asyncio.Event:
        """The event set at the next change of this device's bytes or entries."""
        self._looked = True
        return self._changed

    def make_room(self, size_bytes: int, *, prefer: Sequence[str] = ()) -> None:
        """Evict unheld entries (``prefer`` first, then least recently used) until
        ``size_bytes`` fit; :class:`InsufficientCapacity` (evicting nothing) if they cannot."""
        for victim in self.tier.make_room(size_bytes, prefer=prefer):
            self._stats.record_eviction(self._name, victim.size_bytes)

    def evict_unheld(self) -> int:
        """Evict every entry no request holds; how many left."""
        lru = self.tier.lru
        evicted = self.tier.make_room(lru.capacity_bytes - lru.pinned_bytes)
        for victim in evicted:
            self._stats.record_eviction(self._name, victim.size_bytes)
        return len(evicted)

    async def claim(
        self, key: str, value: DeviceModel, *, prefer: Sequence[str], wait_s: float
    ) -> None:
        """Reserve ``value.size_bytes`` for ``value`` arriving under ``key``, evicting unheld
        entries (``prefer`` first: the scheduler's hint).

        If entries in use hold the bytes, waits up to ``wait_s`` for them to be released; raises
        the last :class:`InsufficientCapacity` for a value larger than the device, or still
        blocked then.
        """
        size = value.size_bytes
        deadline = time.monotonic() + wait_s
        while True:
            changed = self.changed
            try:
                self.make_room(size, prefer=prefer)
                self.tier.reserve(key, value, size_bytes=size)
                self.held.level(self.tier.lru.used_bytes)
                return
            except InsufficientCapacity:
                remaining = deadline - time.monotonic()
                if size > self.tier.lru.capacity_bytes or remaining <= 0:
                    raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    def gb_seconds(self) -> float:
        """Bytes held on this device x seconds since start, in GB-s: levelled when bytes are
        claimed for a load and at every change the tier reports (commit, release, retire)."""
        return self.held.level(self.tier.lru.used_bytes) / 1e9

    def resident_rows(self) -> list[ResidentState]:
        """The models resident or arriving here (shards left out), least recently used first."""
        return [r for r in self.tier.residents(_describe) if not r.model.startswith(SHARD_PREFIX)]

    def draining_rows(self) -> list[DrainingState]:
        return self.tier.draining_rows()

    def _release(self, value: Resident) -> None:
        if isinstance(value, ShardResident):
            value.evicted(value)
            return
        arena, value.arena, value.module = value.arena, None, None
        if arena is not None:
            self._backend.release(arena, in_use_bytes=self.tier.lru.used_bytes)

    def _notify(self) -> None:
        """Wake whoever waits for this device's memory to change (each waits on the event
        current when it looked). Every request's release comes here: a new event only when
        someone took the current one."""
        self.held.level(self.tier.lru.used_bytes)
        if self._looked:
            self._looked = False
            self._changed.set()
            self._changed = asyncio.Event()


class DeviceShards:
    """Shards of distributed models (gpu_manager/shards.py) resident on one device: they share
    its byte budget and LRU with its models, and leave as a set when their owner drops them."""

    def __init__(self, *, memory: DeviceMemory, device_id: str) -> None:
        self._memory = memory
        self._device_id = device_id

    def place(
        self, key: str, size_bytes: int, *, evicted: Callable[[ShardResident], None]
    ) -> ShardResident:
        """Make ``key`` resident with ``size_bytes``, evicting unheld models and shards (least
        recently used first); ``evicted`` is called when it leaves. A 503 if it cannot fit."""
        tier = self._memory.tier
        shard_key = SHARD_PREFIX + key
        tier.retire(shard_key)
        shard = ShardResident(size_bytes, evicted)
        try:
            self._memory.make_room(size_bytes)
            tier.reserve(shard_key, shard, size_bytes=size_bytes)
        except InsufficientCapacity as e:
            raise RuntimeFailure(
                f"shard {key} needs {size_bytes} bytes on {self._device_id}, which cannot be "
                f"freed now: {e}",
                status=503,
                reason="InsufficientMemory",
            ) from None
        tier.commit(shard_key, shard)
        return shard

    def hold(self, key: str, shard: ShardResident) -> bool:
        """Keep ``shard`` from eviction while a request runs on it; False if it is gone."""
        tier = self._memory.tier
        if not tier.hold(SHARD_PREFIX + key, shard):
            return False
        tier.lru.touch(SHARD_PREFIX + key)  # most recently used
        return True

    def unhold(self, key: str, shard: ShardResident) -> None:
        self._memory.tier.unhold(SHARD_PREFIX + key, shard)

    def drop(self, key: str) -> bool:
        """Take the shard out (its bytes return once no request holds it)."""
        return self._memory.tier.retire(SHARD_PREFIX + key)


def _describe(value: Resident) -> dict[str, Any]:
    if isinstance(value, ShardResident):
        return {}
    return {
        "weights_bytes": value.weights_bytes,
        "arena_bytes": value.arena_bytes,
        "reserve_bytes": value.reserve_bytes,
        "source": value.source,
        "arrived": value.arrived,
        "groups": len(value.skeleton.layout.groups),
    }
