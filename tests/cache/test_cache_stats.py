"""Tests of gpufaas.cache.stats: per-tier counters."""

from __future__ import annotations

import dataclasses

from gpufaas.cache import CacheStats, TierStats


def test_counters_accumulate_per_tier() -> None:
    stats = CacheStats(("device", "host"))
    stats.record_hit("device")
    stats.record_miss("device")
    stats.record_miss("device")
    stats.record_move("host", "device", 100)
    stats.record_eviction("device", 40)
    snap = stats.snapshot()
    assert snap["device"] == {
        "hits": 1,
        "misses": 2,
        "evictions": 1,
        "bytes_in": 100,
        "bytes_out": 0,
        "bytes_evicted": 40,
    }
    assert snap["host"]["bytes_out"] == 100
    assert stats.tier("device").hit_ratio == 1 / 3


def test_tiers_are_created_on_first_use_and_snapshot_is_a_copy() -> None:
    stats = CacheStats()
    assert stats.snapshot() == {}
    stats.record_hit("disk")
    snap = stats.snapshot()
    snap["disk"]["hits"] = 99
    assert stats.tier("disk").hits == 1
    assert TierStats().hit_ratio == 0.0


def test_reset_zeroes_counters_and_keeps_tiers() -> None:
    stats = CacheStats()
    stats.record_hit("device")
    stats.reset()
    assert stats.snapshot() == {"device": dataclasses.asdict(TierStats())}
