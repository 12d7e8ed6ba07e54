"""Belady's MIN rule over a request sequence: the offline references the policies are measured
against.

Two are reported (``bench/lalb.py``), and neither is the optimum of the multi-device problem
(placement and eviction together, which nobody computes at this size):

- **pooled MIN**: the whole trace against the cluster's memory as one cache (no fragmentation
  across devices, no replicas, no queueing). It answers "how few misses could any cache of this
  many bytes have on this trace".
- **per-device MIN given the placement**: each device's own requests, in the order they started
  there under the policy being measured, against that device's capacity. It answers "how few
  misses could these devices have had with a clairvoyant evictor and this policy's routing",
  so a policy's miss ratio over it is the part eviction could still win back.

Every miss inserts the model (a GPU must hold a model to run it: no bypass). To make room, MIN
takes the models whose next request is furthest in the future until enough bytes would be free,
then keeps back any of those (nearest next request first) that need not go after all, so small
models are not evicted for nothing. With equal sizes this is optimal; with models of different
sizes no eviction order is optimal for every trace, so it is Belady's rule, a near-bound, not a
proven one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def next_uses(sequence: Sequence[int]) -> list[float]:
    """For each position, the position of the next request for the same model (inf: none)."""
    following: list[float] = [float("inf")] * len(sequence)
    last: dict[int, int] = {}
    for i in range(len(sequence) - 1, -1, -1):
        following[i] = last.get(sequence[i], float("inf"))
        last[sequence[i]] = i
    return following


def belady_hits(
    sequence: Sequence[int],
    sizes: Sequence[int],
    *,
    capacity_bytes: int,
    skip: int = 0,
    counted: Sequence[bool] | None = None,
) -> int:
    """Hits of MIN over ``sequence`` (model indices; ``sizes`` by index), counting positions from
    ``skip`` on, or, with ``counted``, the positions it marks."""
    if counted is None:
        counted = [i >= skip for i in range(len(sequence))]
    following = next_uses(sequence)
    cached: dict[int, float] = {}  # model -> position of its next request
    furthest: list[tuple[float, int]] = []  # max-heap by next use, with stale entries
    used = hits = 0
    for i, model in enumerate(sequence):
        if model in cached:
            hits += counted[i]
        else:
            size = sizes[model]
            if size > capacity_bytes:
                raise ValueError(f"model {model} ({size} bytes) exceeds the capacity")
            victims: list[tuple[float, int]] = []
            freed = 0
            while used - freed + size > capacity_bytes:
                negative_next, victim = heapq.heappop(furthest)
                if cached.get(victim) == -negative_next:
                    victims.append((negative_next, victim))
                    freed += sizes[victim]
            for negative_next, victim in reversed(victims):  # nearest next use first
                if used - (freed - sizes[victim]) + size <= capacity_bytes:
                    freed -= sizes[victim]
                    heapq.heappush(furthest, (negative_next, victim))  # keeps its place
                else:
                    del cached[victim]
            used += size - freed
        cached[model] = following[i]
        heapq.heappush(furthest, (-following[i], model))
    return hits
