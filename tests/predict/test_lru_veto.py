"""Victims in recency's order with the prediction only protecting (``PredictivePolicy(lru_veto=
True)``, fifteenth session): the least recently used candidates go first, skipping those the
model predicts are more likely than not asked for before the loading model's next request."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import Candidate, PredictivePolicy, lru_unless_protected, make_policy

GB = 10**9


def test_unprotected_candidates_go_in_lru_order_and_protected_ones_only_last() -> None:
    sizes = [2, 5, 1, 4]
    protected = [False, True, False, False]
    assert lru_unless_protected(sizes, protected, 3) == [0, 2]
    assert lru_unless_protected(sizes, protected, 4) == [0, 2, 3]
    assert lru_unless_protected(sizes, protected, 8) == [0, 2, 3, 1]
    assert lru_unless_protected(sizes, protected, 100) == [0, 2, 3, 1]  # all there is
    assert lru_unless_protected(sizes, protected, 0) == []


@given(
    st.lists(st.tuples(st.integers(1, 50), st.booleans()), min_size=0, max_size=20),
    st.integers(-5, 400),
)
@settings(max_examples=300, deadline=None)
def test_the_victims_are_the_shortest_lru_prefix_of_unprotected_then_protected(
    items: list[tuple[int, bool]], need: int
) -> None:
    sizes = [s for s, _ in items]
    protected = [p for _, p in items]
    chosen = lru_unless_protected(sizes, protected, need)
    order = [i for i in range(len(items)) if not protected[i]]
    order += [i for i in range(len(items)) if protected[i]]
    assert chosen == order[: len(chosen)]  # a prefix of that order
    freed = sum(sizes[i] for i in chosen)
    if need <= 0:
        assert chosen == []
    elif freed < need:
        assert chosen == order  # too little in all: everything
    else:
        assert freed - sizes[chosen[-1]] < need  # nothing freed past the need
    if any(protected[i] for i in chosen):
        assert all(i in chosen for i in range(len(items)) if not protected[i])


def _bursty(policy: PredictivePolicy, name: str, *, last: float) -> None:
    """Bursts of requests a second apart, an hour between bursts; the last at ``last``."""
    t = last - 5 * 3600
    for _ in range(5):
        for _ in range(10):
            policy.observe(name, t)
            t += 1.0
        t += 3600.0
    policy.observe(name, last)


GAPS = [20.0, 150.0, 60.0, 250.0, 40.0, 90.0, 130.0, 10.0, 180.0, 70.0] * 4  # mean 100 s


def test_a_recent_model_the_histogram_writes_off_is_not_evicted_before_a_long_idle_one() -> None:
    """Two 8 GB models; ``old`` (irregular gaps of 100 s on average, last asked for 150 s ago)
    is the least recently used, ``fresh`` (bursty, last asked for 40 s ago: past its bursts'
    1-s gaps, so its histogram says no request for an hour) the more recent; the loading model
    is asked for every 30 s. The cheapest-set rule evicts ``fresh`` (P ~0.003 against old's
    ~0.33); with ``lru_veto`` recency's victim, ``old``, goes (its P is under 1/2)."""
    now = 100_000.0
    plans = {}
    for veto in (False, True):
        policy = PredictivePolicy(device_price=0.3, lru_veto=veto)
        t = now - 150.0 - sum(GAPS)
        for gap in GAPS:
            policy.observe("old", t)
            t += gap
        policy.observe("old", now - 150.0)
        _bursty(policy, "fresh", last=now - 40)
        for k in range(40):
            policy.observe("loading", now - 30 * (40 - k))
        candidates = [Candidate("old", 8 * GB, 800.0), Candidate("fresh", 8 * GB, 800.0)]
        plans[veto] = policy.victim_plan(candidates, 8 * GB, now, loading="loading")
    assert plans[False] == ["fresh"]
    assert plans[True] == ["old"]


def test_a_model_predicted_due_before_the_loading_ones_next_request_is_protected() -> None:
    """``due`` is the least recently used but asked for every 60 s, 55 s ago (due in ~5 s);
    the loading model's next request is minutes away, so ``due`` is protected and the more
    recent ``spare`` goes; when both are protected, recency's order stands."""
    now = 100_000.0
    policy = PredictivePolicy(lru_veto=True)
    for k in range(40):
        policy.observe("due", now - 55 - 60 * (39 - k))
        policy.observe("spare", now - 10 - 3000 * (39 - k))
        policy.observe("loading", now - 600 * (40 - k))
    candidates = [Candidate("due", GB, 500.0), Candidate("spare", GB, 500.0)]
    assert policy.victim_plan(candidates, GB, now, loading="loading") == ["spare"]
    both = [Candidate("due", GB, 500.0), Candidate("due2", GB, 500.0)]
    for k in range(40):
        policy.observe("due2", now - 50 - 60 * (39 - k))
    assert policy.victim_plan(both, GB, now, loading="loading") == ["due"]


def test_it_is_the_default_and_the_gateway_option_turns_it_off() -> None:
    """On by default since the fifteenth session (library, gateway and simulator labels);
    ``--prefetch-param lru_veto=0`` (``make_policy``, as the gateway's CLI calls it) is the
    cheapest-set plan, the rule before."""
    assert PredictivePolicy().lru_veto
    default = make_policy("predictive")
    assert isinstance(default, PredictivePolicy) and default.lru_veto
    policy = make_policy("predictive", lru_veto=0.0)
    assert isinstance(policy, PredictivePolicy) and not policy.lru_veto
