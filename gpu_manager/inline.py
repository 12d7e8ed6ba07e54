"""Which forward passes run on the event loop instead of a worker thread.

Handing a forward pass to a worker thread and back costs a thread wake-up, a future and a
loop wake-up: tens of microseconds of CPU and more in latency on a loaded box, which is most
of the pass itself for a tiny model. A pass runs inline (on the loop) only when all of these
hold, else it takes the thread hop, so a big model never blocks the loop:

- the model's weights have all landed (no wait on a copy, no arrival gate);
- no other forward pass is running on that device (nothing to queue behind);
- its last :data:`WINDOW` passes on that device were measured under ``max_ms``, all but at
  most one, and that one under :data:`SPIKE` x ``max_ms`` (the first ones always run in a
  thread; a pass ten times too slow, or a second slow one, sends it back there).

The one pass let through is the busy host's: on a shared machine a tiny pass is now and then
preempted in the middle, and sending the model back to the thread for that costs a hop on each
of the next :data:`WINDOW` passes (~100 µs of CPU each here, docs/dataplane.md) for nothing the
model did.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["DEFAULT_INLINE_MAX_MS", "SPIKE", "WINDOW", "InlineForwards"]

# A pass this short blocks the loop less than the hop itself costs in latency on this box
# (docs/dataplane.md, "Forward passes on the loop").
DEFAULT_INLINE_MAX_MS = 0.5
WINDOW = 8
SPIKE = 10.0  # the one pass of a window allowed over max_ms must stay under this many times it


@dataclass
class InlineForwards:
    """One per device: measured compute times per model (by fingerprint), and the passes running now."""

    max_ms: float = DEFAULT_INLINE_MAX_MS
    running: int = 0
    _recent: dict[str, collections.deque[float]] = field(default_factory=dict)

    def inline(self, model: str, *, landed: bool) -> bool:
        """Whether the next pass of ``model`` may run on the loop."""
        if not landed or self.running or self.max_ms <= 0:
            return False
        recent = self._recent.get(model)
        if recent is None or len(recent) < WINDOW:
            return False
        slow = [ms for ms in recent if ms >= self.max_ms]
        return not slow or (len(slow) == 1 and slow[0] < SPIKE * self.max_ms)

    def measured(self, model: str, compute_ms: float) -> None:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = collections.deque(maxlen=WINDOW)
        recent.append(compute_ms)
