"""Belady's optimal (MIN) cache hit ratio on a trace: the bound the policies are measured against.

The cache is the whole cluster's GPU memory as one pool of ``capacity_bytes`` (no fragmentation
across devices, no replicas). Every miss inserts the model (a GPU must hold a model to run it: no
bypass). To make room, MIN takes the models whose next request is furthest in the future until
enough bytes would be free, then keeps back any of those (nearest next request first) that need
not go after all, so small models are not evicted for nothing. With models of different sizes no
eviction order is optimal for every trace, so this is Belady's rule, not a strict bound.
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
    sequence: Sequence[int], sizes: Sequence[int], *, capacity_bytes: int, skip: int = 0
) -> int:
    """Hits of MIN over ``sequence`` (model indices; ``sizes`` by index), counting from ``skip``."""
    following = next_uses(sequence)
    cached: dict[int, float] = {}  # model -> position of its next request
    furthest: list[tuple[float, int]] = []  # max-heap by next use, with stale entries
    used = hits = 0
    for i, model in enumerate(sequence):
        if model in cached:
            hits += i >= skip
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
