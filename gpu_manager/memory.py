"""Host memory for model weights: fresh anonymous mappings, and a pool that re-uses them.

Memory fresh from the kernel costs a page fault per 4 KiB page on first write, which caps a copy
into it at about 1 GB/s on our 2-core machines against 6-10 GB/s for memcpy between warm buffers.
Two remedies, both here:

* :func:`anonymous_buffer` maps memory with transparent huge pages advised (one fault per 2 MiB,
  about 3.5x faster to fill; the kernel still zeroes each page);
* :class:`BufferPool` keeps freed buffers for the next allocation of the same size, within a byte
  budget shared with the memory in use, as the CUDA caching allocator does for device memory. A
  model evicted and loaded again (the common case for a cache) then copies into warm memory.

Nothing here knows about CUDA; page-locking lives in :mod:`gpufaas.gpu_manager.devices`.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import threading
from collections.abc import Callable

import torch

__all__ = ["BufferPool", "anonymous_buffer"]


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
