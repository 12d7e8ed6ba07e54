"""Tests of gpufaas.cache.tiers.TierChain: fill-through promotion, demotion of victims, stats."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpufaas.cache import (
    CacheError,
    EntryPinned,
    InsufficientCapacity,
    InvalidSize,
    Move,
    Tier,
    TierChain,
)

DEVICE, HOST, DISK, REMOTE = Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.REMOTE


def chain(device: int = 10, host: int = 20, disk: int = 40) -> TierChain:
    return TierChain(capacities={DEVICE: device, HOST: host, DISK: disk})


def state(c: TierChain) -> dict[Tier, list[tuple[str, int, int]]]:
    return {
        tier: [(e.key, e.size_bytes, e.pins) for e in c.tier(tier).entries_lru()]
        for tier in c.tiers()
        if tier is not REMOTE
    }


def test_tiers_are_ranked_fastest_first() -> None:
    assert [t.rank for t in (DEVICE, HOST, DISK, REMOTE)] == [0, 1, 2, 3]
    assert DEVICE.faster_than(HOST) and not REMOTE.faster_than(DISK)
    assert Move("m", HOST, DEVICE, 1).is_promotion
    assert Move("m", DEVICE, HOST, 1).is_demotion


def test_promotion_fills_through_every_tier_and_plan_changes_nothing() -> None:
    c = chain()
    moves = c.plan_promotion("a", size_bytes=5)
    assert moves == [
        Move("a", REMOTE, DISK, 5),
        Move("a", DISK, HOST, 5),
        Move("a", HOST, DEVICE, 5),
    ]
    assert c.locate("a") is REMOTE
    c.apply(moves)
    assert c.locate("a") is DEVICE
    assert c.holders("a") == [DEVICE, HOST, DISK, REMOTE]
    snap = c.stats.snapshot()
    assert snap["remote"]["bytes_out"] == 5 and snap["device"]["bytes_in"] == 5
    assert snap["host"]["bytes_in"] == snap["host"]["bytes_out"] == 5


def test_promotion_to_a_tier_already_holding_it_is_empty() -> None:
    c = chain()
    c.promote("a", size_bytes=5)
    assert c.plan_promotion("a", size_bytes=5) == []
    assert c.plan_promotion("a", size_bytes=5, to=HOST) == []


def test_device_eviction_is_free_when_host_holds_the_victim() -> None:
    c = chain(device=10, host=20)
    c.promote("a", size_bytes=10)
    moves = c.promote("b", size_bytes=10)
    assert moves == [
        Move("b", REMOTE, DISK, 10),
        Move("b", DISK, HOST, 10),
        Move("a", DEVICE, HOST, 10, copies=False),
        Move("b", HOST, DEVICE, 10),
    ]
    assert c.holders("a") == [HOST, DISK, REMOTE]
    assert c.stats.snapshot()["device"]["evictions"] == 1


def test_victim_is_copied_down_and_cascades_when_the_host_dropped_it() -> None:
    c = chain(device=10, host=15)
    c.promote("a", size_bytes=10)
    c.promote("b", size_bytes=10, to=HOST)  # host drops a; the device still holds it
    assert c.holders("a") == [DEVICE, DISK, REMOTE]
    moves = c.promote("c", size_bytes=5)
    assert moves == [
        Move("c", REMOTE, DISK, 5),
        Move("c", DISK, HOST, 5),
        Move("b", HOST, DISK, 10, copies=False),  # room in host for a
        Move("a", DEVICE, HOST, 10),  # a is copied down, not lost
        Move("c", HOST, DEVICE, 5),
    ]
    assert c.holders("a") == [HOST, DISK, REMOTE]
    assert c.holders("c") == [DEVICE, HOST, DISK, REMOTE]


def test_victim_with_nowhere_to_go_is_dropped_to_remote() -> None:
    c = TierChain(capacities={DEVICE: 10})
    c.promote("a", size_bytes=10)
    assert c.promote("b", size_bytes=10) == [
        Move("a", DEVICE, REMOTE, 10, copies=False),
        Move("b", REMOTE, DEVICE, 10),
    ]


def test_in_between_tier_that_cannot_make_room_is_skipped() -> None:
    c = chain()
    c.tier(HOST).put("x", None, size_bytes=20)
    c.tier(HOST).pin("x")
    assert c.promote("a", size_bytes=5) == [
        Move("a", REMOTE, DISK, 5),
        Move("a", DISK, DEVICE, 5),
    ]


def test_target_that_cannot_make_room_raises_and_changes_nothing() -> None:
    c = chain()
    c.promote("a", size_bytes=8)
    c.tier(DEVICE).pin("a")
    before = state(c)
    with pytest.raises(InsufficientCapacity, match="'b' needs 5 bytes in tier device"):
        c.plan_promotion("b", size_bytes=5)
    with pytest.raises(InsufficientCapacity):
        c.plan_promotion("b", size_bytes=11, to=DEVICE)
    assert state(c) == before


def test_stale_plan_is_refused_whole() -> None:
    c = chain()
    plan = c.plan_promotion("a", size_bytes=5)
    c.promote("a", size_bytes=5)
    before, stats_before = state(c), c.stats.snapshot()
    with pytest.raises(CacheError, match="stale"):
        c.apply(plan)
    assert state(c) == before
    assert c.stats.snapshot() == stats_before


def test_apply_refuses_to_demote_a_pinned_entry() -> None:
    c = chain()
    c.promote("a", size_bytes=5)
    c.tier(DEVICE).pin("a")
    with pytest.raises(EntryPinned):
        c.apply([Move("a", DEVICE, HOST, 5, copies=False)])
    assert c.locate("a") is DEVICE


def test_chain_without_a_host_tier() -> None:
    c = TierChain(capacities={DEVICE: 10, DISK: 10})
    assert c.tiers() == [DEVICE, DISK, REMOTE]
    assert c.promote("a", size_bytes=4) == [Move("a", REMOTE, DISK, 4), Move("a", DISK, DEVICE, 4)]
    with pytest.raises(CacheError, match="not a bounded tier"):
        c.plan_promotion("a", size_bytes=4, to=HOST)


def test_bad_configuration_is_rejected_clearly() -> None:
    with pytest.raises(CacheError, match="remote tier is unbounded"):
        TierChain(capacities={REMOTE: 10})
    with pytest.raises(CacheError, match="unknown tier 'gpu'"):
        TierChain(capacities={"gpu": 10})  # type: ignore[dict-item]
    with pytest.raises(InvalidSize, match="capacity of tier host"):
        TierChain(capacities={HOST: -1})
    with pytest.raises(CacheError, match="not a bounded tier"):
        chain().plan_promotion("a", size_bytes=1, to=REMOTE)


def test_lookup_counts_hits_and_misses_and_touches() -> None:
    c = chain()
    c.promote("a", size_bytes=1, to=HOST)
    c.promote("b", size_bytes=1, to=HOST)
    assert c.tier(HOST).keys_lru() == ["a", "b"]
    assert c.lookup("a") is HOST
    assert c.tier(HOST).keys_lru() == ["b", "a"]
    assert c.lookup("zzz") is REMOTE
    snap = c.stats.snapshot()
    assert (snap["device"]["misses"], snap["host"]["hits"], snap["host"]["misses"]) == (2, 1, 1)
    assert (snap["disk"]["misses"], snap["remote"]["hits"]) == (1, 1)


def test_remove_drops_key_everywhere_even_pinned() -> None:
    c = chain()
    c.promote("a", size_bytes=3)
    c.tier(HOST).pin("a")
    assert c.remove("a") == [DEVICE, HOST, DISK]
    assert c.locate("a") is REMOTE
    assert c.remove("a") == []


# -- properties ----------------------------------------------------------------------------------

SIZES = {"a": 3, "b": 5, "c": 8, "d": 10, "e": 4, "f": 12}
CAPS = {DEVICE: 15, HOST: 25, DISK: 40}
KEYS = st.sampled_from(sorted(SIZES))
BOUNDED = st.sampled_from([DEVICE, HOST, DISK])


class TierChainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.chain = TierChain(capacities=CAPS)
        self.pins: dict[tuple[Tier, str], int] = {}

    @rule(key=KEYS, to=BOUNDED)
    def promote(self, key: str, to: Tier) -> None:
        before = state(self.chain)
        try:
            moves = self.chain.plan_promotion(key, size_bytes=SIZES[key], to=to)
        except InsufficientCapacity:
            assert state(self.chain) == before
            return
        assert state(self.chain) == before  # planning changes nothing
        assert all(m.key != key for m in moves if m.is_demotion)
        self.chain.apply(moves)
        assert self.chain.locate(key).rank <= to.rank

    @rule(key=KEYS, tier=BOUNDED)
    def pin(self, key: str, tier: Tier) -> None:
        if key in self.chain.tier(tier):
            self.chain.tier(tier).pin(key)
            self.pins[tier, key] = self.pins.get((tier, key), 0) + 1

    @rule(key=KEYS, tier=BOUNDED)
    def unpin(self, key: str, tier: Tier) -> None:
        if self.pins.get((tier, key), 0) > 0:
            self.chain.tier(tier).unpin(key)
            self.pins[tier, key] -= 1

    @rule(key=KEYS)
    def lookup(self, key: str) -> None:
        assert self.chain.lookup(key) is self.chain.locate(key)

    @invariant()
    def tiers_stay_within_capacity(self) -> None:
        for tier, capacity in CAPS.items():
            lru = self.chain.tier(tier)
            assert lru.used_bytes <= capacity
            assert lru.used_bytes == sum(SIZES[k] for k in lru.keys_lru())

    @invariant()
    def pinned_entries_are_never_moved_out(self) -> None:
        for (tier, key), pins in self.pins.items():
            if pins:
                assert key in self.chain.tier(tier)


TierChainMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestTierChainMachine = TierChainMachine.TestCase
