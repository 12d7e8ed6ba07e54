"""Victims priced against the model they make room for (``PredictivePolicy(belady=True)``,
``next_use_times``, ``eviction_plan(loading=...)``): a victim's miss counts with the chance
that its request comes before the loading model's next one (learned Belady), so of two models
due within the fixed horizon the one asked for sooner stays; with no history for the loading
model, the fixed horizon (the rule before); the slices of the loading model's next-use
distribution are its quantiles."""

from __future__ import annotations

import bisect

import pytest
from histories import policy_after
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import (
    _NEXT_USE_GRID,
    _NEXT_USE_POINTS,
    Candidate,
    PredictivePolicy,
    eviction_plan,
)

GB = 10**9
NOW = 100_000.0


def _periodic(policy: PredictivePolicy, name: str, period: float, *, last: float = NOW) -> None:
    for k in range(40, -1, -1):
        policy.observe(name, last - k * period)


def _hot_and_warm(policy: PredictivePolicy) -> list[Candidate]:
    """Two 4 GB models, both due within 30 s: "hot" (every second, the least recently used,
    reloading from its artifact: 400 ms) and "warm" (every 20 s, from host memory: 100 ms); the
    model to load is asked for every 2 s."""
    _periodic(policy, "warm", 20.0, last=NOW - 0.2)
    _periodic(policy, "hot", 1.0, last=NOW - 0.5)
    _periodic(policy, "loader", 2.0)
    return [Candidate("hot", 4 * GB, 400.0), Candidate("warm", 4 * GB, 100.0)]


def test_of_two_models_due_within_the_horizon_the_one_asked_for_before_the_load_stays() -> None:
    """Over the fixed 30 s horizon both are sure to be asked for, and the set rule's costs
    (a miss, plus twice the cost of evicting the other when it returns) make the hot one the
    cheaper victim: it goes, and its request a second later loads it back. Priced
    against the loading model's next request (in 2 s), the hot one will be asked for before
    it, the warm one almost surely not: the warm one goes."""
    belady, fixed = PredictivePolicy(lru_veto=False), PredictivePolicy(belady=False, lru_veto=False)
    for policy in (belady, fixed):
        candidates = _hot_and_warm(policy)
    assert fixed.victim_plan(candidates, GB, NOW, loading="loader") == ["hot"]
    assert belady.victim_plan(candidates, GB, NOW, loading="loader") == ["warm"]
    # the same through eviction_plan, the simulator's and the gateway's call
    residents = [(c.function, c.size_bytes) for c in candidates]
    reload_ms = {c.function: c.reload_ms for c in candidates}
    plan = eviction_plan(
        belady, residents, NOW, lambda m, s: reload_ms[m], need_bytes=GB, loading="loader"
    )
    assert plan == ["warm"]


def test_without_a_history_for_the_loading_model_the_fixed_horizon_prices_the_victims() -> None:
    belady = PredictivePolicy(lru_veto=False)
    candidates = _hot_and_warm(belady)
    fixed = belady.victim_plan(candidates, GB, NOW, loading=None)
    assert belady.victim_plan(candidates, GB, NOW, loading="never-seen") == fixed == ["hot"]
    assert belady.arrivals.next_use_times("never-seen") is None


gaps = st.lists(st.floats(min_value=0.05, max_value=6 * 3600.0), min_size=1, max_size=60)


@given(gaps)
@settings(max_examples=200, deadline=None)
def test_the_next_use_times_are_the_quantiles_of_the_loading_models_next_request(
    gap_list: list[float],
) -> None:
    """Each time lies in [0.1 s, 4 h], in order, and where P(request within t) crosses its
    quantile (k + 1/2) / K on the grid: between the two grid points around the crossing."""
    policy = policy_after(gap_list)
    times = policy.arrivals.next_use_times("f")
    assert times is not None and len(times) == _NEXT_USE_POINTS
    assert times == sorted(times)
    cdf = policy.arrivals.p_arrivals("f", 0.0, _NEXT_USE_GRID)
    for k, t in enumerate(times):
        q = (k + 0.5) / _NEXT_USE_POINTS
        assert _NEXT_USE_GRID[0] <= t <= _NEXT_USE_GRID[-1] * (1 + 1e-9)
        j = bisect.bisect_left(cdf, q)
        if j == 0:  # the quantile lies under the grid's first point
            assert t == _NEXT_USE_GRID[0] and cdf[0] >= q
        elif j == len(cdf):  # past 4 h
            assert t == _NEXT_USE_GRID[-1] and cdf[-1] < q
        else:
            assert cdf[j - 1] < q <= cdf[j]
            assert _NEXT_USE_GRID[j - 1] <= t <= _NEXT_USE_GRID[j] * (1 + 1e-9)


@given(
    st.lists(st.tuples(st.floats(0.5, 900.0), st.integers(1, 16)), min_size=1, max_size=10),
    st.floats(0.5, 900.0),
    st.integers(1, 40),
)
@settings(max_examples=100, deadline=None)
def test_priced_against_the_load_the_plan_still_frees_what_it_needs_from_the_candidates(
    rows: list[tuple[float, int]], loader_period: float, need_gb: int
) -> None:
    policy = PredictivePolicy(lru_veto=False)
    _periodic(policy, "loader", loader_period)
    candidates = []
    for i, (period, size_gb) in enumerate(rows):
        _periodic(policy, f"m{i}", period, last=NOW - 0.3 * period)
        candidates.append(Candidate(f"m{i}", size_gb * GB, size_gb * 40.0))
    plan = policy.victim_plan(candidates, need_gb * GB, NOW, loading="loader")
    names = {c.function: c.size_bytes for c in candidates}
    assert len(set(plan)) == len(plan) and set(plan) <= set(names)
    if sum(names.values()) >= need_gb * GB:
        assert sum(names[m] for m in plan) >= need_gb * GB


def test_a_miss_costs_the_requests_that_join_the_reload_too() -> None:
    """Two 4 GB models, both due within 30 s: "busy" (every 0.1 s, reloading in 300 ms) and
    "cool" (every 10 s, 600 ms). One miss each, the busy one is the cheaper victim; but about
    three more of its requests arrive during its reload and wait for it, each a cold start,
    so with ``joins`` the cool one goes. (No re-eviction term, to see this one alone.)"""
    joins = PredictivePolicy(reevict=0.0, lru_veto=False)
    one = PredictivePolicy(joins=False, reevict=0.0, lru_veto=False)
    for policy in (joins, one):
        _periodic(policy, "busy", 0.1, last=NOW - 0.05)
        _periodic(policy, "cool", 10.0, last=NOW - 1.0)
    candidates = [Candidate("busy", 4 * GB, 300.0), Candidate("cool", 4 * GB, 600.0)]
    assert one.victim_plan(candidates, GB, NOW) == ["busy"]
    assert joins.victim_plan(candidates, GB, NOW) == ["cool"]
    busy = candidates[0]
    assert joins.miss_cost(busy) == pytest.approx(300.0 + 1000.0 + 3.0 * (150.0 + 1000.0))
    assert one.miss_cost(busy) == 300.0 + 1000.0


def test_the_keep_rule_counts_the_requests_that_join_the_reload_with_keep_joins() -> None:
    """A 10 GB model asked for every second that reloads in 3 s: a miss is one cold start and
    about three more that arrive during the reload and wait for it. At a price where one cold
    start's worth (3 s + 1 s) is less than the rent until its next request and four's is more,
    the keep rule without joins demotes it and with ``keep_joins`` keeps it, as the victims'
    price (``joins``) already counts them."""
    # the learned rule alone (the break-even floor off)
    kept = PredictivePolicy(keep_joins=True, break_even=0.0)
    plain = PredictivePolicy(break_even=0.0)
    for policy in (kept, plain):
        _periodic(policy, "busy", 1.0, last=NOW - 0.1)
    hold = plain.arrivals.expected_hold("busy", 0.1, plain.horizon_s)
    p = plain.arrivals.p_arrival("busy", 0.1, plain.horizon_s)
    one, joined = 3000.0 + 1000.0, kept.reload_miss_cost("busy", 3000.0)
    assert joined == pytest.approx(one + 3.0 * (1500.0 + 1000.0), rel=0.05)
    price = (p * one + p * joined) / 2 / (10 * hold)  # ms per GB-second, between the two
    for policy in (kept, plain):
        policy.device_price = price
    advice = {
        name: policy.advise("busy", NOW, size_bytes=10 * GB, reload_ms=3000.0, tier="device")
        for name, policy in (("kept", kept), ("plain", plain))
    }
    assert not advice["plain"].keep
    assert advice["kept"].keep
