"""gpufaas.cache.

Pure cache data structures and policies (no I/O, nothing else of ours imported): a byte-bounded LRU
with pinning, asyncio single-flight loads, failure backoff, tier counters, and the scheduler's
cluster-wide directory of where models live. The GPU manager's residency chain
(``gpufaas.gpu_manager.chain``) keeps its per-tier bookkeeping in :class:`ByteLRU` s.
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
from gpufaas.cache.placement import DeviceKind, DeviceSlot, best_fit, may_copy_between
from gpufaas.cache.singleflight import SingleFlight
from gpufaas.cache.stats import CacheStats, TierStats

__all__ = [
    "ByteLRU",
    "CacheError",
    "CacheStats",
    "ClusterDirectory",
    "DeviceExists",
    "DeviceKind",
    "DeviceSlot",
    "Entry",
    "EntryExists",
    "EntryPinned",
    "EntryState",
    "Failure",
    "FailureBackoff",
    "InsufficientCapacity",
    "InvalidReport",
    "InvalidSize",
    "Residency",
    "SingleFlight",
    "TierStats",
    "UnknownDevice",
    "UnknownKey",
    "WrongState",
    "best_fit",
    "may_copy_between",
]
