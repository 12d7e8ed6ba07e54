"""The break-even floor of ``PredictivePolicy`` (``break_even``, fourteenth session): a device
copy idle for less than ``break_even`` x the time whose rent equals one miss is kept whatever
the learned gaps say (ski rental's deterministic rule under the predictive one), and nothing
else changes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import PredictivePolicy

GB = 10**9
gaps = st.lists(st.floats(min_value=0.0, max_value=6 * 3600.0), min_size=0, max_size=60)
ages = st.floats(min_value=0.0, max_value=10 * 3600.0)


def _feed(policy: PredictivePolicy, gap_list: list[float], name: str = "f") -> float:
    now = 1000.0
    policy.observe(name, now)
    for g in gap_list:
        now += g
        policy.observe(name, now)
    return now


def test_a_model_whose_gaps_say_no_request_soon_is_kept_until_its_break_even_idle_time() -> None:
    """Gaps of about an hour: 60 s after a request the histogram says no request within 30 s,
    so the rule alone demotes it. With the floor, a 4 GB model at price 1 (rent 4 ms per
    second) whose miss costs 1,000 + 1,000 ms is kept while idle <= 500 s, then demoted; the
    host tier is not floored."""
    kwargs = {"size_bytes": 4 * GB, "reload_ms": 1000.0, "tier": "device"}
    alone = PredictivePolicy(device_price=1.0, break_even=0.0)
    floored = PredictivePolicy(break_even=1.0)
    for policy in (alone, floored):
        last = _feed(policy, [3600.0, 3500.0, 3700.0, 3600.0, 3550.0, 3650.0] * 4)
    assert alone.arrivals.p_arrival("f", 60.0, 30.0) < 0.01
    assert not alone.advise("f", last + 60, **kwargs).keep  # type: ignore[arg-type]
    assert floored.advise("f", last + 60, **kwargs).keep  # type: ignore[arg-type]
    assert floored.advise("f", last + 499, **kwargs).keep  # type: ignore[arg-type]
    assert not floored.advise("f", last + 501, **kwargs).keep  # type: ignore[arg-type]
    host = {**kwargs, "tier": "host", "reload_ms": 10.0}
    assert not floored.advise("f", last + 60, **host).keep  # type: ignore[arg-type]


def test_the_floor_is_shorter_for_a_larger_model_and_a_higher_price() -> None:
    """The break-even idle time is miss cost / rent: 16 GB at price 2 (32 ms/s) with a 1,600
    ms miss is 50 s, a quarter GB at price 1 (0.25 ms/s) with a 1,100 ms miss 4,400 s."""
    policy = PredictivePolicy(device_price=2.0, break_even=1.0)
    last = _feed(policy, [3600.0] * 3 + [3300.0] * 3)
    large = {"size_bytes": 16 * GB, "reload_ms": 600.0, "tier": "device"}
    assert policy.advise("f", last + 49, **large).keep  # type: ignore[arg-type]
    assert not policy.advise("f", last + 51, **large).keep  # type: ignore[arg-type]
    cheap = PredictivePolicy(device_price=1.0, break_even=1.0)
    last = _feed(cheap, [3600.0] * 3 + [3300.0] * 3)
    small = {"size_bytes": GB // 4, "reload_ms": 100.0, "tier": "device"}
    assert cheap.advise("f", last + 4399, **small).keep  # type: ignore[arg-type]


@given(gaps, ages, st.floats(0.0, 10.0), st.sampled_from([2 * 10**8, 2 * 10**9, 16 * 10**9]))
@settings(max_examples=150, deadline=None)
def test_the_floor_only_ever_keeps_more_and_always_keeps_under_break_even(
    gap_list: list[float], idle: float, price: float, size: int
) -> None:
    """With the floor a device copy is kept whenever the rule alone keeps it, and whenever its
    idle time's rent is at most one miss; prefetching and the host tier are unchanged."""
    alone = PredictivePolicy(device_price=price, break_even=0.0)
    floored = PredictivePolicy(device_price=price, break_even=1.0)
    for policy in (alone, floored):
        last = _feed(policy, gap_list)
    for tier, reload_ms in (("device", 800.0), ("host", 3000.0)):
        kwargs = {"size_bytes": size, "reload_ms": reload_ms, "tier": tier}
        a = alone.advise("f", last + idle, **kwargs)  # type: ignore[arg-type]
        f = floored.advise("f", last + idle, **kwargs)  # type: ignore[arg-type]
        assert f.prefetch == a.prefetch
        if tier == "host":
            assert f.keep == a.keep
            continue
        assert f.keep or not a.keep
        if gap_list and idle * price * size / GB <= reload_ms + floored.miss_ms:
            assert f.keep
