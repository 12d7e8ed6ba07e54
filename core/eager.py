"""Start a coroutine at once, and make it a task only if it has to wait.

A protocol that answers each call in a task (``loop.create_task``) pays for the task, a
``call_soon`` hop and a loop iteration before the first line of the answer runs, even when the
answer never waits: on the GPU manager a warm tiny model's call is decoded, run inline and
encoded without a single suspension (``docs/dataplane.md``). :func:`start_eagerly` runs the
coroutine's first step right away, in a copy of the current context (as a task would); if it
finishes there, no task is made at all; if it suspends, a task takes it over from exactly that
point, waiting on what it waits on, in the same context. Python 3.12's eager task factory does
this for a whole loop; this is the same for the one call site that needs it, on Python 3.11.

Only for code that needs no current task in its first step: ``asyncio.current_task()`` is None
there, so ``asyncio.timeout``, ``TaskGroup``, anyio and sniffio (httpx) fail in it. The node's
answer path is ours and uses none of them; the gateway's HTTP front keeps its tasks (its
requests always wait for a node, and the routes behind it use httpx).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["resume", "start_eagerly"]

T = TypeVar("T")


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` up to its first suspension now. None if it finished (an exception it
    raised is raised here), else the task that runs the rest."""
    context = contextvars.copy_context()
    try:
        first = context.run(coro.send, None)
    except StopIteration:
        return None
    loop = asyncio.get_running_loop()
    return loop.create_task(_rest(coro, first), context=context)


async def _rest(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)


async def resume(coro: Coroutine[Any, Any, T], first: Any) -> T:
    """The rest of ``coro``, which yielded ``first`` when stepped by hand (``coro.send(None)``),
    as a coroutine for a task: it waits on what ``coro`` waits on, and returns its value."""
    return await _Resume(coro, first)


class _Resume(Generic[T]):
    """An awaitable that hands up what ``coro`` yielded (the future it waits on) and passes the
    task's wake-ups, results and cancellation down to it, as if the task ran it from the start."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, None, T]:
        coro, value = self.coro, self.first
        self.first = None
        while True:
            try:
                yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # a cancellation (or a throw) goes down to it
                try:
                    value = coro.throw(e)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    value = coro.send(None)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
