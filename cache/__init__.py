"""gpufaas.cache.

Pure cache data structures and policies (no I/O, nothing else of ours imported): a byte-bounded LRU
with pinning, asyncio single-flight loads, a device -> host -> disk -> remote tier chain, tier
counters, and the scheduler's cluster-wide directory of where models live.
"""

from gpufaas.cache.backoff import Failure, FailureBackoff
from gpufaas.cache.directory import (
    ClusterDirectory,
    DeviceExists,
    InvalidReport,
    UnknownDevice,
)
from gpufaas.cache.lru import (
    ByteLRU,
    CacheError,
    Entry,
    EntryExists,
    EntryPinned,
    EntryState,
    InsufficientCapacity,
    InvalidSize,
    Residency,
    UnknownKey,
    WrongState,
)
from gpufaas.cache.singleflight import SingleFlight
from gpufaas.cache.stats import CacheStats, TierStats
from gpufaas.cache.tiers import BOUNDED_TIERS, Move, Tier, TierChain

__all__ = [
    "BOUNDED_TIERS",
    "ByteLRU",
    "CacheError",
    "CacheStats",
    "ClusterDirectory",
    "DeviceExists",
    "Entry",
    "EntryExists",
    "EntryPinned",
    "EntryState",
    "Failure",
    "FailureBackoff",
    "InsufficientCapacity",
    "InvalidReport",
    "InvalidSize",
    "Move",
    "Residency",
    "SingleFlight",
    "Tier",
    "TierChain",
    "TierStats",
    "UnknownDevice",
    "UnknownKey",
    "WrongState",
]
