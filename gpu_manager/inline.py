"""Which forward passes run on the event loop instead of a worker thread.

Handing a forward pass to a worker thread and back costs a thread wake-up, a future and a
loop wake-up: tens of microseconds of CPU and more in latency on a loaded box, which is most
of the pass itself for a tiny model. A pass runs inline (on the loop) only when all of these
hold, else it takes the thread hop, so a big model never blocks the loop:

- the model's weights have all landed (no wait on a copy, no arrival gate);
- no other forward pass is running on that device (nothing to queue behind);
- its last :data:`WINDOW` passes on that device were all measured under ``max_ms``
  (the first ones always run in a thread, and one slow pass sends it back there).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["DEFAULT_INLINE_MAX_MS", "WINDOW", "InlineForwards"]

# A pass this short blocks the loop less than the hop itself costs in latency on this box
# (docs/dataplane.md, "Forward passes on the loop").
DEFAULT_INLINE_MAX_MS = 0.5
WINDOW = 8


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
        return recent is not None and len(recent) == WINDOW and max(recent) < self.max_ms

    def measured(self, model: str, compute_ms: float) -> None:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = collections.deque(maxlen=WINDOW)
        recent.append(compute_ms)
