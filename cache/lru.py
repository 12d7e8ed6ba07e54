"""A least-recently-used cache whose capacity is measured in bytes, with pinning.

This is the data structure behind "GPU memory is a cache of models". Compared with a cache that caps
the number of models (Ray Serve's ``multiplex.py``), it:

* bounds the *bytes* held, so one large model and ten small ones are sized honestly;
* keeps a pin count per entry, so an entry in use (serving a request, being copied) is never chosen
  as a victim; an entry still being loaded (``LOADING``) is always treated as pinned;
* picks victims that free enough bytes and no more (see :meth:`ByteLRU.plan_victims`);
* splits a load into :meth:`~ByteLRU.reserve` (claim the bytes, so concurrent loads of different
  models cannot overbook the memory) and :meth:`~ByteLRU.commit` (the value arrived, with its
  measured size), so the slow part of a load happens outside any lock.

It holds no locks and does no I/O: it is meant to be used from one asyncio event loop (or under the
caller's lock). Every operation is O(1) except victim planning, which walks the LRU order from the
least-recently-used end and is O(victims + pinned entries skipped).

The :class:`Entry` objects returned are the cache's own records: read them, but change them only
through the cache's methods, or the byte accounting goes wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
from collections.abc import Collection, Iterator, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class CacheError(Exception):
    """Any misuse of a cache, or a request the cache cannot satisfy."""


class UnknownKey(CacheError, KeyError):
    """The key is not in the cache."""

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of the message; we want the message itself.
        return str(self.args[0]) if self.args else ""


class EntryExists(CacheError):
    """The key is already in the cache (resident or loading)."""


class EntryPinned(CacheError):
    """The entry is pinned (in use, or still loading) and cannot be evicted."""


class WrongState(CacheError):
    """The entry is not in the state the operation needs (e.g. committing a resident entry)."""


class InvalidSize(CacheError, ValueError):
    """A byte size or capacity is not a non-negative integer."""


class InsufficientCapacity(CacheError):
    """The cache cannot make ``needed_bytes`` available.

    ``free_bytes`` are unused now; ``freeable_bytes`` more could be freed by evicting every entry
    that is neither pinned nor excluded; ``pinned_bytes`` are held by pinned (or loading) entries.
    """

    def __init__(
        self,
        *,
        needed_bytes: int,
        free_bytes: int,
        freeable_bytes: int,
        capacity_bytes: int,
        pinned_bytes: int,
        key: str | None = None,
        where: str | None = None,
    ) -> None:
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.freeable_bytes = freeable_bytes
        self.capacity_bytes = capacity_bytes
        self.pinned_bytes = pinned_bytes
        self.key = key
        self.where = where
        what = f"{key!r} needs" if key is not None else "need"
        place = f" in {where}" if where is not None else ""
        super().__init__(
            f"{what} {needed_bytes} bytes{place} but only {free_bytes + freeable_bytes} can be"
            f" made available ({free_bytes} free + {freeable_bytes} freeable by eviction;"
            f" capacity {capacity_bytes}, pinned {pinned_bytes})"
        )

    def about(self, *, key: str | None = None, where: str | None = None) -> InsufficientCapacity:
        """The same error, naming the key that needed the bytes and/or where."""
        return InsufficientCapacity(
            needed_bytes=self.needed_bytes,
            free_bytes=self.free_bytes,
            freeable_bytes=self.freeable_bytes,
            capacity_bytes=self.capacity_bytes,
            pinned_bytes=self.pinned_bytes,
            key=self.key if key is None else key,
            where=self.where if where is None else where,
        )


class Residency(enum.StrEnum):
    """Where a model stands in a cache. The one residency enum: LRU entries, the cluster
    directory and the node contract (``gpufaas.core.node``) all use it."""

    LOADING = "loading"  # bytes reserved, value not there yet; always pinned
    RESIDENT = "resident"


EntryState = Residency  # the LRU's name for it: the same enum, not a second one


@dataclasses.dataclass
class Entry(Generic[V]):
    key: str
    size_bytes: int
    value: V | None
    state: EntryState
    pins: int
    last_used: int  # the cache's logical clock at the last touch

    @property
    def pinned(self) -> bool:
        """Whether the entry may not be evicted: it has pins, or it is still loading."""
        return self.pins > 0 or self.state is EntryState.LOADING


def check_size(size_bytes: int, *, what: str = "size_bytes") -> int:
    """Return ``size_bytes`` if it is a non-negative int, else raise a clear error."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise InvalidSize(f"{what} must be an int, got {type(size_bytes).__name__}: {size_bytes!r}")
    if size_bytes < 0:
        raise InvalidSize(f"{what} must be >= 0, got {size_bytes}")
    return size_bytes


class ByteLRU(Generic[V]):
    """An LRU cache bounded by the total size in bytes of its entries, with pin counts.

    Invariants: ``used_bytes`` is the sum of the entries' sizes and never exceeds ``capacity_bytes``;
    a pinned or loading entry is never evicted except by :meth:`discard`.
    """

    def __init__(self, *, capacity_bytes: int) -> None:
        self._capacity = check_size(capacity_bytes, what="capacity_bytes")
        self._entries: collections.OrderedDict[str, Entry[V]] = collections.OrderedDict()
        self._used = 0
        self._pinned = 0
        self._clock = 0

    def __repr__(self) -> str:
        return (
            f"<ByteLRU {len(self._entries)} entries, {self._used}/{self._capacity} bytes used,"
            f" {self._pinned} pinned>"
        )

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self._capacity - self._used

    @property
    def pinned_bytes(self) -> int:
        """Bytes held by entries that cannot be evicted (pinned or loading)."""
        return self._pinned

    # -- lookup --------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        """Keys from least- to most-recently used."""
        return iter(list(self._entries))

    def get(self, key: str) -> Entry[V] | None:
        """The entry for ``key``, marked most-recently used; ``None`` if absent."""
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(entry)
        return entry

    def peek(self, key: str) -> Entry[V] | None:
        """The entry for ``key`` without changing the LRU order; ``None`` if absent."""
        return self._entries.get(key)

    def touch(self, key: str) -> Entry[V]:
        """Mark ``key`` most-recently used; raise :class:`UnknownKey` if absent."""
        entry = self._require(key)
        self._touch(entry)
        return entry

    def keys_lru(self) -> list[str]:
        """Keys from least- to most-recently used."""
        return list(self._entries)

    def entries_lru(self) -> list[Entry[V]]:
        """Entries from least- to most-recently used."""
        return list(self._entries.values())

    # -- victims -------------------------------------------------------------------------------

    def plan_victims(
        self,
        size_bytes: int,
        *,
        exclude: Collection[str] = (),
        prefer: Sequence[str] = (),
    ) -> list[str]:
        """Keys to evict so that ``size_bytes`` fit in the free bytes.

        Candidates are the entries that are neither pinned (loading entries count as pinned) nor in
        ``exclude``: first those named in ``prefer`` (a scheduler's eviction hint), in that order,
        then the rest least-recently used first, taken until enough bytes would be free. Then each
        chosen victim, last chosen first, is dropped from the plan if the rest still free enough.
        So the plan frees enough and no more: removing any victim from it leaves too little room.
        (It is not a knapsack optimum; it prefers evicting hinted, then old, entries over saving
        bytes.) Keys in ``prefer`` that are absent, pinned or excluded are skipped: a hint is
        advice, never a reason to fail.

        Returns ``[]`` if ``size_bytes`` already fit. Raises :class:`InsufficientCapacity` if even
        evicting every candidate would not be enough, or ``size_bytes`` exceeds the capacity.
        Changes nothing.
        """
        check_size(size_bytes)
        free = self.free_bytes
        if size_bytes <= free:
            return []
        if size_bytes > self._capacity:
            raise self._insufficient(size_bytes, exclude=exclude)

        excluded = exclude if isinstance(exclude, set | frozenset) else frozenset(exclude)
        # dict.fromkeys: the hinted keys in order, once each
        hinted = [self._entries[k] for k in dict.fromkeys(prefer) if k in self._entries]
        taken: set[str] = set()
        victims: list[Entry[V]] = []
        freed = 0
        walk = itertools.chain(hinted, self._entries.values()) if hinted else self._entries.values()
        for entry in walk:
            if entry.pinned or entry.key in excluded or entry.key in taken:
                continue
            if hinted:
                taken.add(entry.key)
            victims.append(entry)
            freed += entry.size_bytes
            if free + freed >= size_bytes:
                break
        else:
            raise self._insufficient(size_bytes, exclude=exclude)

        # Minimality: the walk above may have taken a large entry last that alone makes several
        # earlier small victims unnecessary. Dropping a victim only lowers `freed`, so a victim kept
        # here stays necessary after later drops.
        kept: list[Entry[V]] = []
        for entry in reversed(victims):
            if free + freed - entry.size_bytes >= size_bytes:
                freed -= entry.size_bytes
            else:
                kept.append(entry)
        kept.reverse()
        return [entry.key for entry in kept]

    def make_room(
        self, size_bytes: int, *, exclude: Collection[str] = (), prefer: Sequence[str] = ()
    ) -> list[Entry[V]]:
        """Evict the victims :meth:`plan_victims` chooses; return the evicted entries."""
        victims = self.plan_victims(size_bytes, exclude=exclude, prefer=prefer)
        return [self.evict(key) for key in victims]

    def freeable_bytes(self, *, exclude: Collection[str] = ()) -> int:
        """Bytes that evicting every entry neither pinned nor in ``exclude`` would free."""
        excluded = sum(
            entry.size_bytes
            for key in set(exclude)
            if (entry := self._entries.get(key)) is not None and not entry.pinned
        )
        return self._used - self._pinned - excluded

    # -- loading -------------------------------------------------------------------------------

    def reserve(self, key: str, *, size_bytes: int) -> Entry[V]:
        """Add ``key`` as a ``LOADING`` entry holding ``size_bytes``, pinned once, most-recently used.

        The bytes must already be free (call :meth:`make_room` first): raises
        :class:`InsufficientCapacity` otherwise, and :class:`EntryExists` if ``key`` is present.
        """
        check_size(size_bytes)
        if key in self._entries:
            raise EntryExists(f"{key!r} is already in the cache ({self._entries[key].state})")
        if size_bytes > self.free_bytes:
            raise self._insufficient(size_bytes, key=key)
        entry: Entry[V] = Entry(
            key=key,
            size_bytes=size_bytes,
            value=None,
            state=EntryState.LOADING,
            pins=1,
            last_used=self._tick(),
        )
        self._entries[key] = entry
        self._used += size_bytes
        self._pinned += size_bytes
        return entry

    def commit(self, key: str, value: V, *, size_bytes: int | None = None) -> Entry[V]:
        """Turn the ``LOADING`` entry ``key`` into a ``RESIDENT`` one holding ``value``.

        ``size_bytes``, if given, replaces the reserved size with the measured one; if it grew by
        more than the free bytes, raises :class:`InsufficientCapacity` and leaves the entry as it
        was. The pin taken by :meth:`reserve` stays: the caller unpins when done with the value.
        """
        entry = self._require(key)
        if entry.state is not EntryState.LOADING:
            raise WrongState(f"cannot commit {key!r}: it is {entry.state}, not loading")
        new_size = entry.size_bytes if size_bytes is None else check_size(size_bytes)
        growth = new_size - entry.size_bytes
        if growth > self.free_bytes:
            raise self._insufficient(growth, key=key)
        self._unaccount(entry)
        entry.size_bytes = new_size
        entry.state = EntryState.RESIDENT
        entry.value = value
        self._account(entry)
        self._touch(entry)
        return entry

    def put(self, key: str, value: V, *, size_bytes: int) -> Entry[V]:
        """Add a resident, unpinned entry: :meth:`reserve`, :meth:`commit` and :meth:`unpin`."""
        self.reserve(key, size_bytes=size_bytes)
        entry = self.commit(key, value)
        self.unpin(key)
        return entry

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, key: str) -> Entry[V]:
        """Protect ``key`` from eviction until a matching :meth:`unpin`. Does not touch it."""
        entry = self._require(key)
        self._unaccount(entry)
        entry.pins += 1
        self._account(entry)
        return entry

    def unpin(self, key: str) -> Entry[V]:
        """Undo one :meth:`pin` (or the pin from :meth:`reserve`)."""
        entry = self._require(key)
        if entry.pins <= 0:
            raise CacheError(f"cannot unpin {key!r}: it is not pinned")
        self._unaccount(entry)
        entry.pins -= 1
        self._account(entry)
        return entry

    # -- removal -------------------------------------------------------------------------------

    def evict(self, key: str) -> Entry[V]:
        """Remove the unpinned entry ``key`` and return it; :class:`EntryPinned` if it is pinned."""
        entry = self._require(key)
        if entry.pinned:
            raise EntryPinned(f"cannot evict {key!r}: it is {entry.state} with {entry.pins} pin(s)")
        return self._remove(entry)

    def discard(self, key: str) -> Entry[V] | None:
        """Remove ``key`` whatever its pins (e.g. its load failed); ``None`` if absent."""
        entry = self._entries.get(key)
        return None if entry is None else self._remove(entry)

    def copy(self) -> ByteLRU[V]:
        """An independent copy (entries copied, values shared), e.g. to simulate a plan."""
        clone: ByteLRU[V] = ByteLRU(capacity_bytes=self._capacity)
        clone._entries = collections.OrderedDict(
            (key, dataclasses.replace(entry)) for key, entry in self._entries.items()
        )
        clone._used = self._used
        clone._pinned = self._pinned
        clone._clock = self._clock
        return clone

    # -- internals -----------------------------------------------------------------------------

    def _require(self, key: str) -> Entry[V]:
        entry = self._entries.get(key)
        if entry is None:
            raise UnknownKey(f"{key!r} is not in the cache")
        return entry

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, entry: Entry[V]) -> None:
        self._entries.move_to_end(entry.key)
        entry.last_used = self._tick()

    def _unaccount(self, entry: Entry[V]) -> None:
        if entry.pinned:
            self._pinned -= entry.size_bytes
        self._used -= entry.size_bytes

    def _account(self, entry: Entry[V]) -> None:
        if entry.pinned:
            self._pinned += entry.size_bytes
        self._used += entry.size_bytes

    def _remove(self, entry: Entry[V]) -> Entry[V]:
        del self._entries[entry.key]
        self._unaccount(entry)
        return entry

    def _insufficient(
        self, needed: int, *, exclude: Collection[str] = (), key: str | None = None
    ) -> InsufficientCapacity:
        return InsufficientCapacity(
            needed_bytes=needed,
            free_bytes=self.free_bytes,
            freeable_bytes=self.freeable_bytes(exclude=exclude),
            capacity_bytes=self._capacity,
            pinned_bytes=self._pinned,
            key=key,
        )
