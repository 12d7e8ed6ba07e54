"""Single-flight for asyncio: concurrent requests for the same key share one call.

When ten requests for a cold model arrive at once, the model must be loaded once, not ten times, and
a load of model A must not wait behind a load of model B (Ray Serve's ``multiplex.py`` serialises
every load behind one lock). :class:`SingleFlight` runs the first caller's function as a task and
lets later callers with the same key await that same task; different keys run concurrently.

* A result or an exception is delivered to every caller waiting at the time; the key is then
  forgotten, so the next call after a failure retries.
* Cancelling one waiter does not cancel the shared call: the others still get the result. The call
  runs to completion even if every waiter is cancelled (a half-done model load is worth finishing),
  unless :meth:`SingleFlight.cancel` is used.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Deduplicates concurrent async calls by key. Use from one event loop."""

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """Return ``await fn()``, sharing the call with every concurrent caller for ``key``.

        ``fn`` is called only if no call for ``key`` is in flight; otherwise it is ignored.
        """
        task = self._calls.get(key)
        if task is None or task.done():  # done but not yet forgotten: its outcome is stale
            task = asyncio.get_running_loop().create_task(_call(fn), name=f"singleflight:{key!r}")
            self._calls[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        # shield: cancelling this waiter cancels only its wait, not the shared task.
        return await asyncio.shield(task)

    def in_flight(self, key: K) -> bool:
        """Whether a call for ``key`` is running."""
        task = self._calls.get(key)
        return task is not None and not task.done()

    def in_flight_keys(self) -> list[K]:
        """Keys with a call running, in the order the calls started."""
        return [key for key, task in self._calls.items() if not task.done()]

    def cancel(self, key: K) -> bool:
        """Cancel the shared call for ``key`` (every waiter gets ``CancelledError``).

        The call is forgotten at once: a task being cancelled is not ``done()`` until its
        cancellation has run, and a caller that came in between would join it and get the
        ``CancelledError`` meant for the waiters it had. It starts a call of its own instead.
        Returns whether there was a running call to cancel.
        """
        task = self._calls.get(key)
        if task is None or task.done():
            return False
        del self._calls[key]
        return task.cancel()

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            # Mark the exception retrieved: if every waiter was cancelled, nobody else will, and
            # asyncio would log "Task exception was never retrieved".
            task.exception()


async def _call(fn: Callable[[], Awaitable[V]]) -> V:
    # Calling fn inside the task means an exception raised before its first await still reaches
    # every waiter instead of only the first caller.
    return await fn()
