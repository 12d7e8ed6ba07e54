"""Negative caching of failed loads, with exponential backoff.

A model whose artifact is corrupt or missing fails the same way on every try.
Without memory of that failure every request would start a fresh fetch and
load: a retry storm against the object store. :class:`FailureBackoff`
remembers the last failure per key and, until its retry time, lets callers
fail fast with the same message and a Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Failure:
    message: str
    attempts: int
    retry_at: float

    def retry_after(self, now: float) -> float:
        return max(0.0, self.retry_at - now)


class FailureBackoff(Generic[K]):
    """Per-key failure memory: the n-th consecutive failure blocks retries for
    ``min(max_s, base_s * 2**(n-1))`` seconds; a success forgets the key."""

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError("need 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._failures: dict[K, Failure] = {}

    def blocked(self, key: K) -> Failure | None:
        """The failure that still blocks ``key``, or None when a try is allowed."""
        failure = self._failures.get(key)
        if failure is None or self._clock() >= failure.retry_at:
            return None
        return failure

    def record_failure(self, key: K, message: str) -> Failure:
        previous = self._failures.get(key)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.max_s, self.base_s * 2 ** (attempts - 1))
        failure = Failure(message=message, attempts=attempts, retry_at=self._clock() + delay)
        self._failures[key] = failure
        return failure

    def record_success(self, key: K) -> None:
        self._failures.pop(key, None)

    def forget(self, key: K) -> None:
        """Drop the memory, e.g. when the function's spec changed."""
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)
