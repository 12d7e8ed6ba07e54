"""Victims chosen as a set (``PredictivePolicy(victim_sets=True)``, ``eviction_plan``,
``cheapest_cover``, ``refill_costs``): the plan frees what the load needs, never a model in use,
at a cost within 2x the cheapest set; a returning model's re-eviction is priced from the other
candidates; with no history, LRU."""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache import ByteLRU
from gpufaas.cache.arrivals import (
    Candidate,
    PredictivePolicy,
    cheapest_cover,
    eviction_plan,
    refill_costs,
    whole_refill_costs,
)

GB = 10**9
NOW = 100_000.0

items = st.lists(
    st.tuples(st.integers(1, 100), st.one_of(st.just(0.0), st.floats(0.0, 100.0))),
    min_size=1,
    max_size=8,
)


def _cost(plan: list[int], costs: list[float]) -> float:
    return sum(costs[i] for i in plan)


@given(items, st.floats(0.0, 1.2))
@settings(max_examples=300, deadline=None)
def test_the_cover_frees_enough_no_more_and_within_twice_the_cheapest_set(
    rows: list[tuple[int, float]], fraction: float
) -> None:
    sizes, costs = [s for s, _ in rows], [c for _, c in rows]
    need = int(fraction * sum(sizes))
    plan = cheapest_cover(sizes, costs, need)
    assert len(set(plan)) == len(plan) and all(0 <= i < len(sizes) for i in plan)
    if need <= 0:
        assert plan == []
        return
    freed = sum(sizes[i] for i in plan)
    if sum(sizes) < need:  # too little in all: every item, the caller frees the rest
        assert sorted(plan) == list(range(len(sizes)))
        return
    assert freed >= need
    assert all(freed - sizes[i] < need for i in plan)  # none of it is unneeded
    cheapest = min(
        _cost(list(subset), costs)
        for k in range(1, len(sizes) + 1)
        for subset in itertools.combinations(range(len(sizes)), k)
        if sum(sizes[i] for i in subset) >= need
    )
    assert _cost(plan, costs) <= 2 * cheapest + 1e-9


def test_one_cheap_model_that_frees_enough_beats_several_cheaper_per_byte() -> None:
    # per byte the two small ones are cheaper, but the load needs 5 and one item frees it alone
    assert cheapest_cover([4, 4, 6], [1.0, 1.0, 1.8], 5) == [2]
    # and the greedy by cost per byte when no single item is cheaper
    assert sorted(cheapest_cover([4, 4, 6], [1.0, 1.0, 2.5], 5)) == [0, 1]


@given(items)
@settings(max_examples=200, deadline=None)
def test_refilling_an_items_bytes_is_priced_by_the_others_alone(
    rows: list[tuple[int, float]],
) -> None:
    sizes, costs = [s for s, _ in rows], [c for _, c in rows]
    refill = refill_costs(sizes, costs)
    for i, size in enumerate(sizes):
        others = sorted((j for j in range(len(sizes)) if j != i), key=lambda j: costs[j] / sizes[j])
        total = sum(sizes[j] for j in others)
        if total == 0:
            expected = costs[i]
        elif total < size:
            expected = sum(costs[j] for j in others) * size / total
        else:  # the fractional cheapest cover of ``size`` bytes
            expected, left = 0.0, size
            for j in others:
                take = min(sizes[j], left)
                expected += costs[j] * take / sizes[j]
                left -= take
                if left == 0:
                    break
        assert abs(refill[i] - expected) <= 1e-6 * max(1.0, expected)


def _learned(names: list[str], gaps: list[float]) -> PredictivePolicy:
    policy = PredictivePolicy(victim_sets=True, lru_veto=False)
    for name, gap in zip(names, gaps, strict=True):
        for k in range(12, -1, -1):
            policy.observe(name, NOW - k * gap)
    return policy


@given(
    st.lists(
        st.tuples(st.integers(GB // 100, 16 * GB), st.booleans(), st.floats(0.5, 3600.0)),
        min_size=1,
        max_size=20,
    ),
    st.integers(1, 40 * GB),
    st.floats(0.0, 600.0),
)
@settings(max_examples=150, deadline=None)
def test_a_plan_never_evicts_a_model_in_use_and_frees_what_the_load_needs(
    models: list[tuple[int, bool, float]], load: int, idle: float
) -> None:
    names = [f"m{i}" for i in range(len(models))]
    policy = _learned(names, [gap for _, _, gap in models])
    capacity = sum(size for size, _, _ in models)
    cache: ByteLRU[None] = ByteLRU(capacity_bytes=capacity)
    for name, (size, in_use, _) in zip(names, models, strict=True):
        cache.put(name, None, size_bytes=size)
        if in_use:
            cache.pin(name)
    load = min(load, capacity)
    need = load - cache.free_bytes
    residents = ((e.key, e.size_bytes) for e in cache.entries_lru() if not e.pinned)
    plan = eviction_plan(policy, residents, NOW + idle, lambda m, s: s / 25e6, need_bytes=need)
    in_use = {name for name, (_, pinned, _) in zip(names, models, strict=True) if pinned}
    assert not in_use & set(plan)
    freeable = cache.freeable_bytes()
    if freeable >= need:
        assert sum(cache.peek(m).size_bytes for m in plan) >= need  # type: ignore[union-attr]
        evicted = cache.make_room(load, prefer=plan)
        assert sorted(e.key for e in evicted) == sorted(plan)  # the plan, exactly
        assert cache.free_bytes >= load


@given(st.lists(st.integers(GB // 100, 16 * GB), min_size=1, max_size=12), st.integers(1, 30 * GB))
@settings(max_examples=100, deadline=None)
def test_with_no_history_the_plan_is_empty_so_lru_frees(sizes: list[int], load: int) -> None:
    cache: ByteLRU[None] = ByteLRU(capacity_bytes=sum(sizes))
    for i, size in enumerate(sizes):
        cache.put(f"m{i}", None, size_bytes=size)
    policy = PredictivePolicy(victim_sets=True, lru_veto=False)
    policy.observe("m0", NOW - 5)  # seen once: no gaps, so no history
    load = min(load, sum(sizes))
    residents = ((e.key, e.size_bytes) for e in cache.entries_lru())
    plan = eviction_plan(policy, residents, NOW, lambda m, s: 100.0, need_bytes=load)
    assert plan == []
    assert cache.plan_victims(load, prefer=plan) == cache.plan_victims(load)


def test_a_returning_large_model_is_charged_the_evictions_it_will_make() -> None:
    """A 10 GB model asked for every 2 s, or three 0.4 GB models asked for every minute and due
    within the horizon too: by their own misses the large one goes (one miss against three);
    counting that its return evicts 10 GB of the others again, the small ones go."""
    with_return, blind = (
        PredictivePolicy(victim_sets=True, lru_veto=False),
        PredictivePolicy(victim_sets=True, reevict=0.0, lru_veto=False),
    )
    for policy in (with_return, blind):
        for name, gap, last in (("llm", 2.0, NOW), *((n, 60.0, NOW - 45) for n in "abc")):
            for k in range(12, -1, -1):
                policy.observe(name, last - k * gap)
    candidates = [
        Candidate("llm", 10 * GB, 400.0),
        *(Candidate(n, 4 * GB // 10, 18.0) for n in "abc"),
    ]
    assert blind.victim_plan(candidates, GB, NOW + 1) == ["llm"]
    assert sorted(with_return.victim_plan(candidates, GB, NOW + 1)) == ["a", "b", "c"]


@given(items)
@settings(max_examples=200, deadline=None)
def test_a_whole_refill_is_the_others_cover_and_never_below_the_fractional_one(
    rows: list[tuple[int, float]],
) -> None:
    sizes, costs = [s for s, _ in rows], [c for _, c in rows]
    whole, fractional = whole_refill_costs(sizes, costs), refill_costs(sizes, costs)
    for i, size in enumerate(sizes):
        others = [j for j in range(len(sizes)) if j != i]
        assert whole[i] >= fractional[i] - 1e-6 * max(1.0, fractional[i])
        if sum(sizes[j] for j in others) >= size:  # the cover the rule itself would evict
            cover = cheapest_cover([sizes[j] for j in others], [costs[j] for j in others], size)
            assert abs(whole[i] - sum(costs[others[k]] for k in cover)) <= 1e-9 * max(1, whole[i])


def test_a_copy_held_elsewhere_is_discounted_in_its_return_as_in_its_miss() -> None:
    """An 8 GB model also held on another device (asked for every 10 minutes) against a 1 GB
    sole copy asked for every minute, for a load needing 1 GB. The copy's requests go to its
    other holder (LALB), so neither its miss nor its return's evictions fall on this device at
    full weight, and it goes. With the discount on its miss alone (the rule before), its return
    was charged 8 GB of evictions at full weight and the sole copy went."""
    policy = PredictivePolicy(lru_veto=False)  # the cheapest set alone; replica_share 1
    for name, gap in (("replica", 600.0), ("minutely", 60.0), ("hot", 10.0)):
        for k in range(12, -1, -1):
            policy.observe(name, NOW - k * gap)
    candidates = [
        Candidate("replica", 8 * GB, 320.0, copies_elsewhere=1),
        Candidate("minutely", GB, 40.0),
        Candidate("hot", GB, 40.0),
    ]
    assert policy.victim_plan(candidates, GB, NOW + 1) == ["replica"]
    # as a sole copy it stays, and the minutely one goes
    sole = [dataclasses.replace(candidates[0], copies_elsewhere=0), *candidates[1:]]
    assert policy.victim_plan(sole, GB, NOW + 1) == ["minutely"]
