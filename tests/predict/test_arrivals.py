"""The arrival models of ``gpufaas.cache.arrivals``: invariants (hypothesis) and the published
hybrid-histogram rules, the cost-aware rule, the no-history fallback and persistence."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import (
    ArrivalError,
    Candidate,
    FixedKeepAlive,
    HybridHistogram,
    PredictivePolicy,
    bin_count_cv,
    forecast_idle,
    gap_bin,
    make_policy,
)

gaps = st.lists(st.floats(min_value=0.0, max_value=6 * 3600.0), min_size=0, max_size=60)
ages = st.floats(min_value=0.0, max_value=10 * 3600.0)


def _feed(policy: object, gap_list: list[float], name: str = "f") -> float:
    now = 1000.0
    policy.observe(name, now)  # type: ignore[attr-defined]
    for g in gap_list:
        now += g
        policy.observe(name, now)  # type: ignore[attr-defined]
    return now


# -- ours: invariants -------------------------------------------------------------------------


@given(gaps, ages, st.floats(min_value=0.0, max_value=3600.0), st.floats(0.0, 3600.0))
@settings(max_examples=200, deadline=None)
def test_p_arrival_is_a_probability_monotone_in_the_window(
    gap_list: list[float], age: float, w1: float, w2: float
) -> None:
    policy = PredictivePolicy()
    _feed(policy, gap_list)
    short, long = sorted((w1, w2))
    p_short = policy.arrivals.p_arrival("f", age, short)
    p_long = policy.arrivals.p_arrival("f", age, long)
    assert 0.0 <= p_short <= 1.0 and 0.0 <= p_long <= 1.0
    assert p_short <= p_long + 1e-9


@given(gaps, ages, ages)
@settings(max_examples=200, deadline=None)
def test_survival_never_rises_with_age(gap_list: list[float], a1: float, a2: float) -> None:
    policy = PredictivePolicy()
    _feed(policy, gap_list)
    young, old = sorted((a1, a2))
    assert (
        0.0
        <= policy.arrivals.survival("f", old)
        <= policy.arrivals.survival("f", young) + 1e-9
        <= 1.0 + 1e-9
    )


@given(gaps)
@settings(max_examples=100, deadline=None)
def test_snapshot_round_trip_through_json_predicts_the_same(gap_list: list[float]) -> None:
    before = PredictivePolicy()
    now = _feed(before, gap_list)
    after = PredictivePolicy()
    after.restore(json.loads(json.dumps(before.snapshot())))
    for age in (0.0, 1.0, 30.0, 600.0, 5 * 3600.0):
        assert math.isclose(
            before.arrivals.p_arrival("f", age, 30.0),
            after.arrivals.p_arrival("f", age, 30.0),
            abs_tol=1e-9,
        )
    a = before.advise("f", now + 20, size_bytes=10**9, reload_ms=500, tier="device")
    b = after.advise("f", now + 20, size_bytes=10**9, reload_ms=500, tier="device")
    assert a == b


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=40))
@settings(max_examples=100, deadline=None)
def test_arrivals_out_of_order_never_break_the_model(times: list[float]) -> None:
    policy = PredictivePolicy()
    for t in times:
        policy.observe("f", t)
    for age in (0.0, 10.0, 1e5):
        assert 0.0 <= policy.arrivals.p_arrival("f", age, 60.0) <= 1.0


@given(st.floats(min_value=0.0, max_value=1e7))
def test_gap_bins_are_ordered(gap: float) -> None:
    assert gap_bin(gap) <= gap_bin(gap * 1.5 + 0.01)


# -- ours: behaviour -------------------------------------------------------------------------


def test_a_periodic_function_is_detected_and_prefetched_just_before_its_period() -> None:
    """Every 600 s; with the library's defaults (the break-even floor on since the fifteenth
    session). A 10 GB model at price 1 (rent 10 ms/s) whose miss costs 1,000 + 1,000 ms has a
    break-even idle time of 200 s, so at 300 s the floor no longer holds it and what decides is
    the learned period: released between arrivals, not prefetched a minute early, prefetched
    10 s before the next."""
    policy = PredictivePolicy(device_price=1.0, horizon_s=30.0, lead_s=5.0)
    now = _feed(policy, [600.0] * 12)
    assert policy.arrivals.periodic("f") == pytest.approx(600.0)
    size, reload_ms = 10 * 10**9, 1000.0
    rent = policy.device_price * size / 1e9
    assert policy.break_even == 1.0 and 300 * rent > reload_ms + policy.miss_ms  # past the floor
    held = policy.advise("f", now + 150, size_bytes=size, reload_ms=reload_ms, tier="device")
    early = policy.advise("f", now + 300, size_bytes=size, reload_ms=reload_ms, tier="device")
    soon = policy.advise("f", now + 545, size_bytes=size, reload_ms=reload_ms, tier="device")
    due = policy.advise("f", now + 590, size_bytes=size, reload_ms=reload_ms, tier="device")
    assert held.keep and not held.prefetch  # under the floor's 200 s
    assert not early.keep and not early.prefetch  # released between arrivals
    # not a minute early: the period's normal is sharper than the log histogram's ~20% bins
    # (with the histogram alone it is prefetched from 540 s)
    assert not soon.prefetch
    assert due.keep and due.prefetch  # brought back for the next one


def test_a_bursty_function_is_kept_while_idle_is_short_and_released_when_long() -> None:
    policy = PredictivePolicy(device_price=5.0)
    _feed(policy, [1.0, 2.0, 1.0, 3.0, 1.0, 2.0] * 10)
    last = policy.arrivals.seen.last["f"]
    assert policy.advise("f", last + 1, size_bytes=10**9, reload_ms=500, tier="device").keep
    assert not policy.advise("f", last + 600, size_bytes=10**9, reload_ms=500, tier="device").keep


def test_price_trades_memory_for_cold_starts() -> None:
    cheap, dear = PredictivePolicy(device_price=0.01), PredictivePolicy(device_price=100.0)
    for p in (cheap, dear):
        _feed(p, [10.0, 40.0, 20.0, 80.0, 15.0] * 5)
    t = cheap.arrivals.seen.last["f"] + 30
    kwargs = {"size_bytes": 4 * 10**9, "reload_ms": 2000.0, "tier": "device"}
    assert cheap.advise("f", t, **kwargs).keep  # type: ignore[arg-type]
    assert not dear.advise("f", t, **kwargs).keep  # type: ignore[arg-type]


def test_no_history_falls_back_to_a_fixed_keepalive_and_never_prefetches() -> None:
    policy = PredictivePolicy(fallback_keepalive_s=600.0)
    assert policy.advise("new", 0, size_bytes=1, reload_ms=1, tier="device").reason == "no-history"
    policy.observe("new", 100.0)
    young = policy.advise("new", 400.0, size_bytes=10**9, reload_ms=500, tier="device")
    old = policy.advise("new", 800.0, size_bytes=10**9, reload_ms=500, tier="device")
    assert (young.keep, young.prefetch, young.reason) == (True, False, "fallback")
    assert (old.keep, old.prefetch) == (False, False)


def test_victims_least_value_per_byte_first() -> None:
    policy = PredictivePolicy()
    for t in range(1000, 16001, 3000):
        policy.observe("cold", float(t))
    for t in range(15970, 16001):
        policy.observe("hot", float(t))
    now = 16002.0  # both idle 2 s: "hot" is due, "cold" not for another 50 minutes
    order = policy.victim_order(
        [Candidate("hot", 10**9, 500.0), Candidate("cold", 10**9, 500.0)], now
    )
    assert order == ["cold", "hot"]


def test_snapshot_of_another_kind_or_version_is_refused() -> None:
    with pytest.raises(ArrivalError, match="not 'predictive'"):
        PredictivePolicy().restore(HybridHistogram().snapshot())
    with pytest.raises(ArrivalError, match="version"):
        PredictivePolicy().restore({"version": 99})
    bad = PredictivePolicy()
    _feed(bad, [1.0, 2.0])
    state = bad.snapshot()
    state["models"]["f"]["weights"] = [1.0]
    with pytest.raises(ArrivalError, match="malformed"):
        PredictivePolicy().restore(state)


# -- the hybrid histogram, as published ---------------------------------------------------------


def test_hybrid_prewarms_at_the_head_and_keeps_until_the_tail_with_margins() -> None:
    policy = HybridHistogram()
    _feed(policy, [600.0] * 20)  # every idle time in the 10-minute bin
    w = policy.windows("f")
    assert w.source == "histogram"
    assert w.prewarm_s == pytest.approx(600 * 0.9)  # head bin's lower edge - 10%
    assert w.prewarm_s + w.keepalive_s == pytest.approx(660 * 1.1)  # tail bin's upper edge + 10%
    last = policy._seen.last["f"]
    kwargs = {"size_bytes": 1, "reload_ms": 1.0, "tier": "device"}
    assert not policy.advise("f", last + 60, **kwargs).keep  # type: ignore[arg-type]
    inside = policy.advise("f", last + 560, **kwargs)  # type: ignore[arg-type]
    assert inside.keep and inside.prefetch


def test_hybrid_short_idle_times_keep_loaded_from_the_start() -> None:
    policy = HybridHistogram()
    _feed(policy, [5.0, 20.0, 40.0, 30.0, 10.0, 50.0])
    w = policy.windows("f")
    assert w.prewarm_s == 0.0 and w.keepalive_s == pytest.approx(60 * 1.1)


def test_hybrid_reloads_a_model_missing_inside_its_window_unless_as_published() -> None:
    """Windows starting at 0 (never unloaded): as published nothing loads such a model, so one
    missing inside its window (a fresh node, a capacity eviction) stays missing; the default
    reloads it, as the steady state the policy assumes. Outside the window: neither."""
    best, published = HybridHistogram(), HybridHistogram(restore_inside=False)
    for policy in (best, published):
        _feed(policy, [5.0, 20.0, 40.0, 30.0, 10.0, 50.0])
    last = best._seen.last["f"]
    kwargs = {"size_bytes": 1, "reload_ms": 1.0, "tier": "device"}
    assert best.advise("f", last + 30, **kwargs).prefetch  # type: ignore[arg-type]
    assert not published.advise("f", last + 30, **kwargs).prefetch  # type: ignore[arg-type]
    assert published.advise("f", last + 30, **kwargs).keep  # type: ignore[arg-type]
    assert not best.advise("f", last + 600, **kwargs).prefetch  # type: ignore[arg-type]


def test_hybrid_not_representative_falls_back_to_a_fixed_keepalive_of_the_range() -> None:
    policy = HybridHistogram()
    _feed(policy, [60.0 * k + 1 for k in range(0, 240, 2)])  # spread evenly over the range
    assert bin_count_cv(policy._hist["f"].counts) < 2
    w = policy.windows("f")
    assert (w.source, w.prewarm_s, w.keepalive_s) == ("fixed", 0.0, 4 * 3600.0)
    few = HybridHistogram()
    _feed(few, [600.0, 600.0])  # too few idle times
    assert few.windows("f").source == "fixed"


def test_hybrid_out_of_range_idle_times_use_the_forecast() -> None:
    policy = HybridHistogram()
    _feed(policy, [5 * 3600.0, 6 * 3600.0, 5 * 3600.0, 6 * 3600.0])
    w = policy.windows("f")
    assert w.source == "forecast"
    assert 0.85 * 5 * 3600 * 0.9 < w.prewarm_s < 0.85 * 6 * 3600 * 1.1
    assert w.keepalive_s == pytest.approx(w.prewarm_s / 0.85 * 0.30)


def test_forecast_follows_a_persistent_series() -> None:
    assert forecast_idle([100.0]) == 100.0
    rising = forecast_idle([1e4, 2e4, 4e4, 8e4])
    assert rising > 2e4


def test_hybrid_snapshot_round_trip() -> None:
    a = HybridHistogram()
    _feed(a, [600.0] * 8)
    b = HybridHistogram()
    b.restore(json.loads(json.dumps(a.snapshot())))
    assert a.windows("f") == b.windows("f")
    with pytest.raises(ArrivalError, match="bins"):
        HybridHistogram(bin_s=30).restore(a.snapshot())


def test_fixed_keepalive() -> None:
    policy = FixedKeepAlive(keepalive_s=600)
    policy.observe("f", 0.0)
    assert policy.advise("f", 599, size_bytes=1, reload_ms=1, tier="device").keep
    assert not policy.advise("f", 601, size_bytes=1, reload_ms=1, tier="device").keep
    assert not policy.advise("f", 1, size_bytes=1, reload_ms=1, tier="device").prefetch
    assert make_policy("keepalive", keepalive_s=60).name == "keepalive-1min"
    with pytest.raises(ArrivalError, match="unknown residency policy"):
        make_policy("belady")


@given(gaps)
@settings(max_examples=150, deadline=None)
def test_hybrid_windows_are_sane_for_any_history(gap_list: list[float]) -> None:
    policy = HybridHistogram()
    now = _feed(policy, gap_list)
    w = policy.windows("f")
    assert w.prewarm_s >= 0 and w.keepalive_s >= 0
    assert w.source in {"histogram", "fixed", "forecast"}
    if w.source == "histogram":
        assert w.prewarm_s + w.keepalive_s <= 4 * 3600 * 1.1 + 1e-6
    advice = policy.advise("f", now + 1.0, size_bytes=1, reload_ms=1.0, tier="device")
    assert not (advice.prefetch and not advice.keep)  # a prefetch is always into a window


@given(gaps, ages, st.floats(min_value=0.0, max_value=100.0))
@settings(max_examples=150, deadline=None)
def test_a_higher_price_never_keeps_more(gap_list: list[float], idle: float, price: float) -> None:
    cheap, dear = PredictivePolicy(device_price=price), PredictivePolicy(device_price=price * 2 + 1)
    for p in (cheap, dear):
        now = _feed(p, gap_list)
    kwargs = {"size_bytes": 10**9, "reload_ms": 800.0, "tier": "device"}
    a = cheap.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    b = dear.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    assert b.keep <= a.keep and b.prefetch <= a.prefetch


def test_smoothing_fills_the_holes_between_a_histograms_modes() -> None:
    """Gaps of ~2 s and ~600 s: idle 20 s sits in empty bins, where the raw histogram says no
    request can come within 30 s (so the model is demoted at any price); the mixture with a
    memoryless arrival at the mean gap does not."""
    # the learned rule alone: the break-even floor (default on) would hold both
    raw = PredictivePolicy(smoothing=0.0, prior_gaps=0.0, device_price=0.001, break_even=0.0)
    smooth = PredictivePolicy(device_price=0.001, break_even=0.0)
    for policy in (raw, smooth):
        t = 0.0
        for i in range(200):
            t += 600.0 if i % 10 == 9 else 2.0
            policy.observe("f", t)
    now = t + 20.0
    assert raw.arrivals.p_arrival("f", 20.0, 30.0) == 0.0
    assert 0.0 < smooth.arrivals.p_arrival("f", 20.0, 30.0) <= 0.05
    kwargs = {"size_bytes": 10**9, "reload_ms": 500.0, "tier": "device"}
    assert not raw.advise("f", now, **kwargs).keep  # type: ignore[arg-type]
    assert smooth.advise("f", now, **kwargs).keep  # type: ignore[arg-type]
    with pytest.raises(ArrivalError, match="smoothing"):
        PredictivePolicy(smoothing=1.5)


# -- the confidence gate (prior_gaps) and the cost of a cold start itself (miss_ms) -----------


@given(
    gaps,
    ages,
    st.floats(min_value=0.0, max_value=3600.0),
    st.floats(min_value=0.0, max_value=64.0),
    st.floats(min_value=0.0, max_value=1.0),
)
@settings(max_examples=200, deadline=None)
def test_with_the_prior_p_arrival_stays_a_probability_monotone_in_the_window(
    gap_list: list[float], age: float, window: float, prior: float, smoothing: float
) -> None:
    policy = PredictivePolicy(prior_gaps=prior, smoothing=smoothing)
    _feed(policy, gap_list)
    p = policy.arrivals.p_arrival("f", age, window)
    assert 0.0 <= p <= 1.0
    assert p <= policy.arrivals.p_arrival("f", age, window * 2 + 1) + 1e-9


@given(st.floats(min_value=0.0, max_value=64.0), st.floats(0.0, 1.0), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_the_priors_weight_lies_between_smoothing_and_one_and_falls_with_gaps(
    prior: float, smoothing: float, seen: int
) -> None:
    policy = PredictivePolicy(prior_gaps=prior, smoothing=smoothing)
    now, later = policy.arrivals.prior_weight(seen), policy.arrivals.prior_weight(seen + 1)
    assert smoothing - 1e-12 <= later <= now <= 1.0
    if prior == 0:
        assert now == smoothing


def test_a_young_histogram_leans_on_the_memoryless_prior_and_an_old_one_does_not() -> None:
    """Three gaps (100, 100, 1000 s): idle 300 s lies in empty bins, so the histogram alone says
    no request can come within 30 s; with a pseudo-count of 4 gaps the prior weighs 4/7 and the
    model is kept. After 200 more gaps the weight is back to ``smoothing``."""
    gated = PredictivePolicy(prior_gaps=4.0, smoothing=0.0)
    plain = PredictivePolicy(smoothing=0.0, prior_gaps=0.0)
    for policy in (gated, plain):
        _feed(policy, [100.0, 100.0, 1000.0])
    assert plain.arrivals.p_arrival("f", 300.0, 30.0) == 0.0
    assert gated.arrivals.prior_weight(3) == pytest.approx(4 / 7)
    assert gated.arrivals.p_arrival("f", 300.0, 30.0) > 0.05
    assert gated.arrivals.prior_weight(203) == pytest.approx(4 / 207)
    with pytest.raises(ArrivalError, match="prior_gaps"):
        PredictivePolicy(prior_gaps=-1.0)


@given(gaps, ages, st.floats(0.0, 10.0), st.floats(0.0, 5000.0), st.floats(0.0, 5000.0))
@settings(max_examples=150, deadline=None)
def test_a_dearer_cold_start_never_keeps_less(
    gap_list: list[float], idle: float, price: float, m1: float, m2: float
) -> None:
    low, high = sorted((m1, m2))
    cheap, dear = (
        PredictivePolicy(device_price=price, miss_ms=low),
        PredictivePolicy(device_price=price, miss_ms=high),
    )
    for p in (cheap, dear):
        now = _feed(p, gap_list)
    kwargs = {"size_bytes": 3 * 10**9, "reload_ms": 120.0, "tier": "device"}
    a = cheap.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    b = dear.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    assert a.keep <= b.keep and a.prefetch <= b.prefetch
    # the host tier's rule ignores it: a host-tier miss is not a cold start
    host = {"size_bytes": 3 * 10**9, "reload_ms": 1500.0, "tier": "host"}
    assert cheap.advise("f", now + idle, **host) == dear.advise("f", now + idle, **host)  # type: ignore[arg-type]


def test_a_cold_starts_own_cost_makes_eviction_count_misses_not_load_time() -> None:
    """Two models with the same arrivals, 1 GB and 10 GB, reload time proportional to size:
    by load time per byte they are worth the same (the larger goes first only on the tie);
    with ``miss_ms`` a miss costs more than its load, so the large one is worth a tenth per
    byte, and a rule keeps the small one at a price where it drops the large one."""
    by_time, by_count = (
        PredictivePolicy(device_price=5.0, miss_ms=0.0),
        PredictivePolicy(device_price=5.0, miss_ms=1000.0),
    )
    for policy in (by_time, by_count):
        for name in ("small", "large"):
            _feed(policy, [60.0] * 5 + [200.0] * 5, name=name)
    now = _feed(PredictivePolicy(), [60.0] * 5 + [200.0] * 5) + 30.0
    small = Candidate("small", 10**9, 40.0)
    large = Candidate("large", 10 * 10**9, 400.0)
    assert by_count.victim_order([small, large], now) == ["large", "small"]
    v_small = by_count.value("small", now, size_bytes=10**9, reload_ms=40.0)
    v_large = by_count.value("large", now, size_bytes=10 * 10**9, reload_ms=400.0)
    assert v_small > 5 * v_large
    assert by_time.value("small", now, size_bytes=10**9, reload_ms=40.0) == pytest.approx(
        by_time.value("large", now, size_bytes=10 * 10**9, reload_ms=400.0)
    )
    kw_small = {"size_bytes": 10**9, "reload_ms": 40.0, "tier": "device"}
    kw_large = {"size_bytes": 10 * 10**9, "reload_ms": 400.0, "tier": "device"}
    assert by_count.advise("small", now, **kw_small).keep  # type: ignore[arg-type]
    assert not by_count.advise("large", now, **kw_large).keep  # type: ignore[arg-type]
    with pytest.raises(ArrivalError, match="miss_ms"):
        PredictivePolicy(miss_ms=float("nan"))


# -- longer horizons (max_horizon_s) -----------------------------------------------------------


@given(gaps, ages, st.floats(0.0, 10.0), st.sampled_from([120.0, 480.0, 1920.0]))
@settings(max_examples=150, deadline=None)
def test_looking_further_ahead_never_keeps_or_prefetches_less(
    gap_list: list[float], idle: float, price: float, longest: float
) -> None:
    near, far = (
        PredictivePolicy(device_price=price),
        PredictivePolicy(device_price=price, max_horizon_s=longest),
    )
    assert near.horizons == [30.0] and far.horizons[-1] <= longest
    for p in (near, far):
        now = _feed(p, gap_list)
    kwargs = {"size_bytes": 2 * 10**9, "reload_ms": 90.0, "tier": "device"}
    a = near.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    b = far.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    assert a.keep <= b.keep and a.prefetch <= b.prefetch


def test_a_model_in_the_hole_between_two_modes_is_kept_when_looking_far_enough() -> None:
    """Gaps of 2 s and ~100 s: at idle 20 s nothing comes within 30 s (the raw histogram), so the
    30-s rule demotes it though a request is certain within two minutes; over 120 s it pays."""
    raw = {"device_price": 0.05, "smoothing": 0.0, "prior_gaps": 0.0, "break_even": 0.0}
    near = PredictivePolicy(**raw)  # the learned rule alone (the floor off)
    far = PredictivePolicy(**raw, max_horizon_s=480.0)
    for policy in (near, far):
        t = 0.0
        for i in range(200):
            t += 100.0 if i % 10 == 9 else 2.0
            policy.observe("f", t)
    assert far.horizons == [30.0, 120.0, 480.0]
    kwargs = {"size_bytes": 2 * 10**9, "reload_ms": 90.0, "tier": "device"}
    assert near.arrivals.p_arrival("f", 20.0, 30.0) == 0.0
    assert not near.advise("f", t + 20.0, **kwargs).keep  # type: ignore[arg-type]
    assert far.advise("f", t + 20.0, **kwargs).keep  # type: ignore[arg-type]
    with pytest.raises(ArrivalError, match="max_horizon_s"):
        PredictivePolicy(max_horizon_s=10.0)


# -- the rent paid until the request (rent_to_hit, eighth session) -----------------------------


def test_a_hot_model_is_kept_at_a_price_where_a_whole_horizon_of_rent_exceeds_its_miss() -> None:
    """A 16 GB model asked for about every 1.25 s, at a price where 30 s of its rent (3.5 x 16 x
    30 = 1,680 ms) exceeds a miss (640 + 1,000 ms): held until its request (about a second),
    it pays, so it is kept and prefetched; charged the whole horizon (the rule before), it is
    demoted though its next request is a second away. A cool model of the same size, asked for
    every ten minutes, is demoted under both (the bounds that skip the integral agree)."""
    hit, whole = (
        # the learned rules alone (the break-even floor off)
        PredictivePolicy(device_price=3.5, break_even=0.0),
        PredictivePolicy(device_price=3.5, rent_to_hit=False, break_even=0.0),
    )
    kwargs = {"size_bytes": 16 * 10**9, "reload_ms": 640.0, "tier": "device"}
    for policy in (hit, whole):
        t = 0.0
        for i in range(300):
            t += 1.0 if i % 2 else 1.5
            policy.observe("hot", t)
        cool = 0.0
        for _ in range(30):
            cool += 600.0
            policy.observe("cool", cool)
    now = max(t, cool) + 0.5
    assert (
        hit.arrivals.p_arrival("hot", 0.5, 30.0) > 0.99
        and hit.arrivals.expected_hold("hot", 0.5, 30.0) < 2.0
    )
    hot = hit.advise("hot", t + 0.5, **kwargs)  # type: ignore[arg-type]
    assert hot.keep and hot.prefetch
    before = whole.advise("hot", t + 0.5, **kwargs)  # type: ignore[arg-type]
    assert not before.keep and not before.prefetch
    for policy in (hit, whole):
        assert not policy.advise("cool", now, **kwargs).keep  # type: ignore[arg-type]


@given(gaps, ages, st.floats(0.0, 10.0), st.sampled_from([2 * 10**8, 2 * 10**9, 16 * 10**9]))
@settings(max_examples=150, deadline=None)
def test_paying_rent_only_until_the_request_never_keeps_or_prefetches_less(
    gap_list: list[float], idle: float, price: float, size: int
) -> None:
    """``pays`` with the hold is the rule before with a rent charged for at most the horizon:
    it keeps (prefetches) whatever the rule before kept, and its bounds decide as the integral
    would (checked against :meth:`expected_hold` directly)."""
    hit, whole = (
        PredictivePolicy(device_price=price),
        PredictivePolicy(device_price=price, rent_to_hit=False),
    )
    for policy in (hit, whole):
        now = _feed(policy, gap_list)
    kwargs = {"size_bytes": size, "reload_ms": 90.0, "tier": "device"}
    a = whole.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    b = hit.advise("f", now + idle, **kwargs)  # type: ignore[arg-type]
    assert a.keep <= b.keep and a.prefetch <= b.prefetch
    if hit.arrivals.has_history("f"):
        rent = price * size / 1e9
        p = hit.arrivals.p_arrival("f", idle, 30.0)
        exact = p * 1090.0 >= rent * hit.arrivals.expected_hold("f", idle, 30.0)
        assert hit.pays("f", idle, 30.0, saved_ms=1090.0, rent=rent) == exact
