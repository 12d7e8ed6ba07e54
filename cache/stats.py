"""Counters for cache tiers: hits, misses, evictions and bytes moved in and out.

Plain counters with no I/O; whoever exports metrics (e.g. to Prometheus) reads :meth:`CacheStats.snapshot`.
Tiers are named by strings (the GPU manager's chain uses "device", "host", "disk", "remote").
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TierStats:
    """``bytes_in``/``bytes_out`` count bytes copied into/out of the tier; ``bytes_evicted`` the
    sizes of entries that left it."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_evicted: int = 0

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before any lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class CacheStats:
    """A :class:`TierStats` per tier name, created on first use."""

    def __init__(self, tiers: tuple[str, ...] = ()) -> None:
        self._tiers: dict[str, TierStats] = {str(name): TierStats() for name in tiers}

    def tier(self, name: str) -> TierStats:
        """The counters of tier ``name`` (created as zeros if new)."""
        return self._tiers.setdefault(str(name), TierStats())

    def record_hit(self, tier: str) -> None:
        self.tier(tier).hits += 1

    def record_miss(self, tier: str) -> None:
        self.tier(tier).misses += 1

    def record_eviction(self, tier: str, nbytes: int) -> None:
        """An entry of ``nbytes`` left ``tier`` (whether or not it was copied elsewhere)."""
        stats = self.tier(tier)
        stats.evictions += 1
        stats.bytes_evicted += nbytes

    def record_move(self, src_tier: str, dst_tier: str, nbytes: int) -> None:
        """``nbytes`` were copied from ``src_tier`` into ``dst_tier``."""
        self.tier(src_tier).bytes_out += nbytes
        self.tier(dst_tier).bytes_in += nbytes

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy of every tier's counters: ``{tier: {counter: value}}``."""
        return {name: dataclasses.asdict(stats) for name, stats in self._tiers.items()}

    def reset(self) -> None:
        """Zero every counter, keeping the tier names."""
        for name in self._tiers:
            self._tiers[name] = TierStats()
