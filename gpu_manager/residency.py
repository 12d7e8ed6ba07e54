"""One cache tier of the GPU manager: a byte LRU whose values are released only when unused.

:class:`gpufaas.cache.ByteLRU` does the bookkeeping (bytes, LRU order, pins). This adds what a tier
of real memory needs on top:

* a value's *holds* (requests using it, copies reading from it, its own load in flight) mirror the
  LRU pins of its key, so a held value is never chosen as a victim;
* a value that leaves the index while still held (an unload, a changed spec) is *retired*: its
  bytes stay reserved under a draining key until the last hold ends, so memory that is still in
  use is never handed to another model (no overcommit), and only then is it released;
* values still arriving (``LOADING`` entries) are kept beside the LRU, so requests can start
  computing on a model whose last layers are still being copied.

Use from one event loop; nothing here blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from gpufaas.cache import ByteLRU, Entry
from gpufaas.core.node import DrainingState, ResidentState

__all__ = ["DRAIN_PREFIX", "Holdable", "Tier"]

# Model names are DNS-1123 labels, so no model key ever starts with this.
DRAIN_PREFIX = "\x00draining:"


class Holdable(Protocol):
    holds: int
    drain_key: str | None


V = TypeVar("V", bound=Holdable)


class Tier(Generic[V]):
    """A byte-bounded tier of values that hold memory; ``release`` frees a value's memory."""

    def __init__(
        self,
        *,
        name: str,
        capacity_bytes: int,
        release: Callable[[V], None],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._on_change = on_change
        self.lru: ByteLRU[V] = ByteLRU(capacity_bytes=capacity_bytes)
        self.arriving: dict[str, V] = {}
        self.draining: dict[str, V] = {}
        self._release = release
        self._drain_ids = itertools.count(1)

    # -- lookup ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries resident or arriving (draining ones not counted)."""
        return len(self.lru) - len(self.draining)

    def resident(self, key: str) -> V | None:
        """The resident value for ``key`` (marked most-recently used), or None."""
        entry = self.lru.get(key)
        return entry.value if entry is not None else None

    def current(self, key: str) -> V | None:
        """The value indexed under ``key``: resident or arriving. Does not touch the LRU order."""
        entry = self.lru.peek(key)
        if entry is None:
            return None
        return entry.value if entry.value is not None else self.arriving.get(key)

    def entry(self, key: str) -> Entry[V] | None:
        return self.lru.peek(key)

    # -- loading -----------------------------------------------------------------------------------

    def make_room(self, size_bytes: int, *, prefer: Sequence[str] = ()) -> list[V]:
        """Evict unheld values until ``size_bytes`` fit, and release them: those named in
        ``prefer`` first (the scheduler's hint), then least recently used.

        Raises :class:`gpufaas.cache.InsufficientCapacity` (evicting nothing) if they cannot fit.
        """
        evicted = []
        for entry in self.lru.make_room(size_bytes, prefer=prefer):
            if entry.value is not None:
                evicted.append(entry.value)
                self._release(entry.value)
        return evicted

    def reserve(self, key: str, value: V, *, size_bytes: int) -> None:
        """Claim ``size_bytes`` for ``value`` arriving under ``key``; its load holds it once."""
        self.lru.reserve(key, size_bytes=size_bytes)
        value.holds = 1
        self.arriving[key] = value

    def commit(self, key: str, value: V) -> bool:
        """``value`` has arrived: make it resident and drop its load's hold.

        False (and nothing committed) if it was retired meanwhile; the load's hold stays for the
        caller to drop with :meth:`unhold`.
        """
        if self.arriving.get(key) is not value:
            return False
        del self.arriving[key]
        self.lru.commit(key, value)
        self.unhold(key, value)  # notifies
        return True

    # -- holds -------------------------------------------------------------------------------------

    def hold(self, key: str, value: V) -> bool:
        """Hold ``value`` if it is still the one under ``key``; False if it was replaced or evicted."""
        if self.current(key) is not value:
            return False
        self.lru.pin(key)
        value.holds += 1
        return True

    def unhold(self, key: str, value: V) -> None:
        """End one hold; a retired value is released with its last hold."""
        if value.holds <= 0:
            raise RuntimeError(f"{self.name}: {key!r} is not held")
        value.holds -= 1
        if value.drain_key is None:
            if self.current(key) is value:
                self.lru.unpin(key)
        elif value.holds == 0:
            self.lru.discard(value.drain_key)
            del self.draining[value.drain_key]
            self._release(value)
        self._changed()

    # -- removal -----------------------------------------------------------------------------------

    def retire(self, key: str) -> bool:
        """Take ``key`` out of the index now; its memory is released once nothing holds it."""
        entry = self.lru.peek(key)
        if entry is None:
            return False
        value = self.current(key)
        self.arriving.pop(key, None)
        self.lru.discard(key)
        if value is None:
            self._changed()
            return True
        if value.holds == 0:
            self._release(value)
            self._changed()
            return True
        drain_key = f"{DRAIN_PREFIX}{key}#{next(self._drain_ids)}"
        self.lru.reserve(drain_key, size_bytes=entry.size_bytes)  # the bytes just freed
        value.drain_key = drain_key
        self.draining[drain_key] = value
        return True

    def _changed(self) -> None:
        """Bytes may have become free (or evictable): tell whoever waits for them."""
        if self._on_change is not None:
            self._on_change()

    # -- state -------------------------------------------------------------------------------------

    def residents(self, describe: Callable[[V], dict[str, Any]]) -> list[ResidentState]:
        """Resident and arriving entries, least recently used first, with byte-exact sizes."""
        rows = []
        for entry in self.lru.entries_lru():
            if entry.key.startswith(DRAIN_PREFIX):
                continue
            value = self.current(entry.key)
            rows.append(
                ResidentState(
                    model=entry.key,
                    state=entry.state,
                    size_bytes=entry.size_bytes,
                    pins=entry.pins,
                    **(describe(value) if value is not None else {}),
                )
            )
        return rows

    def draining_rows(self) -> list[DrainingState]:
        rows = []
        for drain_key, value in self.draining.items():
            entry = self.lru.peek(drain_key)
            rows.append(
                DrainingState(
                    model=drain_key.removeprefix(DRAIN_PREFIX).rpartition("#")[0],
                    size_bytes=entry.size_bytes if entry is not None else 0,
                    holds=value.holds,
                )
            )
        return rows
