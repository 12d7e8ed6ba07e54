"""Host memory for model weights: fresh anonymous mappings, and a pool that re-uses them.

Memory fresh from the kernel costs a page fault per 4 KiB page on first write, which caps a copy
into it at about 1 GB/s on our 2-core machines against 6-10 GB/s for memcpy between warm buffers.
Two remedies, both here:

* :func:`anonymous_buffer` maps memory with transparent huge pages advised (one fault per 2 MiB,
  about 3.5x faster to fill; the kernel still zeroes each page);
* :class:`BufferPool` keeps freed buffers for the next allocation of the same size, within a byte
  budget shared with the memory in use, as the CUDA caching allocator does for device memory. A
  model evicted and loaded again (the common case for a cache) then copies into warm memory.

Nothing here knows about CUDA; page-locking lives in :mod:`gpufaas.gpu_manager.pinned`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import mmap
import threading
from collections.abc import Callable

import torch

__all__ = ["BufferPool", "SlabAllocator", "anonymous_buffer"]


def anonymous_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled ``uint8`` tensor of ``nbytes`` over a fresh anonymous mapping.

    The tensor keeps the mapping alive; it is unmapped when the last tensor sharing it is gone
    (the mapping is never closed by hand, which would leave the tensor dangling).
    """
    if nbytes < 0:
        raise ValueError(f"a buffer size must be >= 0, got {nbytes}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise MemoryError(f"cannot map {nbytes} bytes of host memory: {e}") from None
    with contextlib.suppress(OSError, AttributeError):  # THP off, or not Linux: plain pages
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)


class BufferPool:
    """Freed buffers kept for re-use by a later allocation of exactly the same size.

    ``budget_bytes`` bounds the memory in use (as the owner counts it) plus the pooled buffers,
    so a pool never holds memory that its owner's capacity does not allow. Only exact sizes are
    re-used: a model's arena has a fixed size, and a larger buffer would break byte-exact
    accounting. Safe to call from several threads.
    """

    def __init__(
        self, *, budget_bytes: int, allocate: Callable[[int], torch.Tensor] = anonymous_buffer
    ) -> None:
        self.budget_bytes = budget_bytes
        self._allocate = allocate
        self._free: collections.OrderedDict[int, list[torch.Tensor]] = collections.OrderedDict()
        self._pooled = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    @property
    def pooled_bytes(self) -> int:
        return self._pooled

    def take(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        """A buffer of ``nbytes`` and whether it was re-used (warm) rather than fresh.

        ``in_use_bytes`` is the memory the owner counts as used, this allocation included; pooled
        buffers of other sizes are released until that plus the pool fits the budget.
        """
        with self._lock:
            same = self._free.get(nbytes)
            if same:
                buffer = same.pop()
                if not same:
                    del self._free[nbytes]
                self._pooled -= nbytes
                self.reused += 1
                return buffer, True
            self._trim_locked(max(0, self.budget_bytes - in_use_bytes))
        buffer = self._allocate(nbytes)
        with self._lock:
            self.allocated += 1
        return buffer, False

    def give(self, buffer: torch.Tensor, *, in_use_bytes: int) -> bool:
        """Keep a buffer nobody uses any more, if the budget allows; True if kept.

        ``in_use_bytes`` is the owner's memory in use without this buffer.
        """
        nbytes = buffer.numel() * buffer.element_size()
        with self._lock:
            room = self.budget_bytes - in_use_bytes - nbytes
            if nbytes == 0 or room < 0:
                return False
            self._trim_locked(room)
            self._free.setdefault(nbytes, []).append(buffer)
            self._free.move_to_end(nbytes)
            self._pooled += nbytes
            return True

    def trim(self, keep_bytes: int = 0) -> int:
        """Release pooled buffers (oldest sizes first) until at most ``keep_bytes`` stay; bytes freed."""
        with self._lock:
            return self._trim_locked(keep_bytes)

    def _trim_locked(self, keep_bytes: int) -> int:
        freed = 0
        while self._pooled > keep_bytes and self._free:
            nbytes, buffers = next(iter(self._free.items()))
            buffers.pop()
            if not buffers:
                del self._free[nbytes]
            self._pooled -= nbytes
            freed += nbytes
        return freed


class SlabAllocator:
    """Byte ranges of one fixed slab: best fit, aligned, free neighbours merged. Pure bookkeeping.

    The host tier cuts every model's arena out of one slab that is page-locked once at start-up,
    so a refill never pins memory. Best fit keeps large holes for large arenas; merging on free
    means an empty slab is one hole again. Not thread-safe: the owner locks.
    """

    def __init__(self, capacity_bytes: int, *, alignment: int = 4096) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity_bytes}")
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.capacity_bytes = capacity_bytes - capacity_bytes % alignment
        self.alignment = alignment
        self._free_starts: list[int] = [0] if self.capacity_bytes else []
        self._free_sizes: dict[int, int] = {0: self.capacity_bytes} if self.capacity_bytes else {}
        self._used: dict[int, int] = {}  # offset -> rounded size

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    def blocks(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of every allocated range, by offset."""
        return sorted(self._used.items())

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a new range of at least ``nbytes`` (rounded up to the alignment), or
        None if no hole is large enough."""
        if nbytes < 0:
            raise ValueError(f"a size must be >= 0, got {nbytes}")
        size = max(self.alignment, -(-nbytes // self.alignment) * self.alignment)
        best: int | None = None
        for start in self._free_starts:
            hole = self._free_sizes[start]
            if hole >= size and (best is None or hole < self._free_sizes[best]):
                best = start
        if best is None:
            return None
        hole = self._free_sizes.pop(best)
        self._free_starts.remove(best)
        if hole > size:
            self._insert_free(best + size, hole - size)
        self._used[best] = size
        return best

    def free(self, offset: int) -> None:
        """Return a range; its free neighbours merge with it. ``KeyError`` if not allocated."""
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._free_starts, offset)
        if i < len(self._free_starts) and self._free_starts[i] == offset + size:
            following = self._free_starts.pop(i)
            size += self._free_sizes.pop(following)
        if i > 0:
            previous = self._free_starts[i - 1]
            if previous + self._free_sizes[previous] == offset:
                self._free_sizes[previous] += size
                return
        self._insert_free(offset, size)

    def _insert_free(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_sizes[start] = size
