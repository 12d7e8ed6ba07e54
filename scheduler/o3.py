"""O3 (out-of-order) dispatch: the queue of one device, as a pure data structure.

Requests wait for a device in arrival (FIFO) order. When the device can take one more, a request
whose model is already resident there may *overtake* older requests, which would have to wait for
a load: the hit runs at once instead of waiting behind a load, and it runs before that load could
evict its model. The overtaking is bounded, so nothing starves:

1. **Due head.** The oldest waiting request (the head, the one FIFO would serve now) is served
   first if it has been overtaken ``max_passes`` times, or if it has been the head for at least
   ``max_hold_ms``.
2. **Overtake.** Otherwise, if any waiting request's model is resident, the one with the earliest
   deadline among those is served (ties, and requests without a deadline, in arrival order).
3. **FIFO.** Otherwise the head is served.

Every request served out of order counts one *pass* against each older request still waiting.
Since a request that waits also waited through every pass of the requests behind it, passes never
increase along the queue and the head holds the most; rule 1 therefore keeps every request at or
below ``max_passes``. With ``max_passes=0`` (or ``max_hold_ms=0``) the queue is plain FIFO.

The queue is synchronous and takes the time as an argument, so the asyncio dispatcher
(:mod:`gpufaas.scheduler.dispatch`) and the simulator in ``bench/`` drive the same code.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["O3Queue", "Waiting"]

T = TypeVar("T")


@dataclass(eq=False)
class Waiting(Generic[T]):
    """One request in the queue; :meth:`O3Queue.push` returns it as a ticket."""

    item: T
    model: str
    seq: int  # arrival order within the queue
    arrival_ms: float
    deadline_ms: float = math.inf  # inf: no deadline
    passes: int = 0  # times a younger request was served before this one
    head_since_ms: float | None = field(default=None, repr=False)  # since when it is the oldest
    overtook: bool = False  # set when served ahead of an older request


class O3Queue(Generic[T]):
    """A device's waiting requests with bounded out-of-order service; see the module docstring."""

    def __init__(self, *, max_passes: int = 8, max_hold_ms: float = 500.0) -> None:
        if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 0:
            raise ValueError(f"max_passes must be an int >= 0, got {max_passes!r}")
        if not max_hold_ms >= 0:  # also rejects NaN
            raise ValueError(f"max_hold_ms must be >= 0, got {max_hold_ms!r}")
        self.max_passes = max_passes
        self.max_hold_ms = float(max_hold_ms)
        self._waiting: OrderedDict[int, Waiting[T]] = OrderedDict()
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return (
            f"<O3Queue {len(self._waiting)} waiting, max_passes={self.max_passes},"
            f" max_hold_ms={self.max_hold_ms:g}>"
        )

    def __len__(self) -> int:
        return len(self._waiting)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __iter__(self) -> Iterator[Waiting[T]]:
        """Waiting requests, oldest first."""
        return iter(list(self._waiting.values()))

    @property
    def fifo(self) -> bool:
        """Whether the bounds leave no room for overtaking."""
        return self.max_passes == 0 or self.max_hold_ms == 0

    def head(self) -> Waiting[T] | None:
        """The oldest waiting request, the one FIFO would serve next."""
        return next(iter(self._waiting.values()), None)

    def push(
        self, item: T, *, model: str, now_ms: float, deadline_ms: float | None = None
    ) -> Waiting[T]:
        """Queue ``item`` (a request for ``model``) and return its ticket."""
        waiting = Waiting(
            item=item,
            model=model,
            seq=next(self._seq),
            arrival_ms=now_ms,
            deadline_ms=math.inf if deadline_ms is None else deadline_ms,
        )
        if not self._waiting:
            waiting.head_since_ms = now_ms
        self._waiting[waiting.seq] = waiting
        return waiting

    def remove(self, ticket: Waiting[T], *, now_ms: float) -> bool:
        """Take a request out without serving it (it was cancelled); False if it is not here."""
        if self._waiting.get(ticket.seq) is not ticket:
            return False
        was_head = next(iter(self._waiting)) == ticket.seq
        del self._waiting[ticket.seq]  # leaving is not being served: it passes no one
        if was_head:
            self._new_head(now_ms)
        return True

    def pop_next(
        self, now_ms: float, resident: Container[str] | Callable[[str], bool] = ()
    ) -> Waiting[T] | None:
        """Serve the next request by the rules above; None if nothing waits.

        ``resident`` says which models are resident on the device: a container of model names
        or a predicate, asked at most once per distinct model waiting.
        """
        head = self.head()
        if head is None:
            return None
        if self.fifo or self._due(head, now_ms):
            return self._take(head, now_ms=now_ms)
        is_resident = resident if callable(resident) else resident.__contains__
        known: dict[str, bool] = {}
        best: Waiting[T] | None = None
        for waiting in self._waiting.values():
            hit = known.get(waiting.model)
            if hit is None:
                hit = known[waiting.model] = bool(is_resident(waiting.model))
            # Strictly earlier deadline wins; equal ones keep arrival order.
            if hit and (best is None or waiting.deadline_ms < best.deadline_ms):
                best = waiting
        return self._take(best if best is not None else head, now_ms=now_ms)

    def _due(self, head: Waiting[T], now_ms: float) -> bool:
        held_since = head.head_since_ms if head.head_since_ms is not None else head.arrival_ms
        return head.passes >= self.max_passes or now_ms - held_since >= self.max_hold_ms

    def _take(self, chosen: Waiting[T], *, now_ms: float) -> Waiting[T]:
        was_head = next(iter(self._waiting)) == chosen.seq
        if not was_head:
            chosen.overtook = True
            for waiting in self._waiting.values():
                if waiting.seq >= chosen.seq:
                    break
                waiting.passes += 1
        del self._waiting[chosen.seq]
        if was_head:
            self._new_head(now_ms)
        return chosen

    def _new_head(self, now_ms: float) -> None:
        head = self.head()
        if head is not None:
            head.head_since_ms = now_ms
