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

What a pass is judged by. On a GPU, its wall time (the host waits on the device, which costs no
CPU but holds the loop all the same). On a CPU device (``by_cpu``), the lesser of its wall time
and the process's CPU time over it: a tiny pass preempted by another process on a busy host is
slow by the wall but not by the CPU, and is not the model's cost, while a long pass costs CPU
as long as it holds the loop (intra-op threads included: the process's clock, not the thread's),
so it still goes to the thread. The CPU clock (a system call, ~1 µs here) is read before each
pass, and after it only when the pass was slow by the wall.

The one pass let through is the busy host's: on a shared machine a tiny pass is now and then
preempted in the middle, and sending the model back to the thread for that costs a hop on each
of the next :data:`WINDOW` passes (~100 µs of CPU each here, docs/dataplane.md) for nothing the
model did.
"""

from __future__ import annotations

import collections
import time
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
    by_cpu: bool = False  # a CPU device: judge a slow pass by the CPU it took (module doc)
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

    def clock(self) -> float:
        """Read before a pass, for :meth:`measured`: the process's CPU clock on a CPU device."""
        return time.process_time() if self.by_cpu else 0.0

    def measured(self, model: str, compute_ms: float, *, cpu_since: float = 0.0) -> None:
        """Record a pass of ``model`` that took ``compute_ms`` by the wall; ``cpu_since``: what
        :meth:`clock` read before it."""
        if self.by_cpu and compute_ms >= self.max_ms:
            compute_ms = min(compute_ms, (time.process_time() - cpu_since) * 1000)
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = collections.deque(maxlen=WINDOW)
        recent.append(compute_ms)
