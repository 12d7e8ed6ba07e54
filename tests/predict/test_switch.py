"""The per-function switch between ours and another rule (``SwitchingPolicy``): it decides as
either rule when both are the same, never uses an arrival later than the decision, scores each
rule by rent while held and a miss when not, and switches with hysteresis."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache.arrivals import (
    Advice,
    ArrivalError,
    Candidate,
    HybridHistogram,
    PredictivePolicy,
    SwitchingPolicy,
    make_policy,
)

GB = 10**9
FUNCTIONS = ("a", "b", "c")

# a run: events in time order, each an arrival of one function or a decision tick
events = st.lists(
    st.tuples(
        st.floats(min_value=0.01, max_value=900.0),  # time since the previous event
        st.sampled_from((*FUNCTIONS, "tick")),
    ),
    max_size=120,
)


def _replay(
    policy: Any, run: Sequence[tuple[float, str]], *, until: float = float("inf")
) -> list[Advice]:
    """Feed ``run`` to ``policy``; at each tick, the device advice for every function (as the
    simulator's tick asks), up to time ``until``."""
    now, out = 0.0, []
    for step, what in run:
        now += step
        if now > until:
            break
        if what == "tick":
            for f in FUNCTIONS:
                out.append(policy.advise(f, now, size_bytes=2 * GB, reload_ms=300.0, tier="device"))
        else:
            policy.observe(what, now)
    return out


@given(events, st.sampled_from([0.03, 0.3, 3.0]))
@settings(max_examples=120, deadline=None)
def test_with_the_same_rule_twice_it_decides_as_that_rule(
    run: list[tuple[float, str]], price: float
) -> None:
    alone = PredictivePolicy(device_price=price)
    switch = SwitchingPolicy(
        PredictivePolicy(device_price=price), PredictivePolicy(device_price=price)
    )
    assert _replay(switch, run) == _replay(alone, run)
    assert not any(switch.follows_other(f) for f in FUNCTIONS)


@given(events, events)
@settings(max_examples=120, deadline=None)
def test_a_decision_never_depends_on_a_later_arrival(
    head: list[tuple[float, str]], tail: list[tuple[float, str]]
) -> None:
    """Two runs that agree up to the end of ``head`` and differ after it decide alike up to
    there, and the costs scored so far are not changed by later decisions (a gap is scored on
    the decisions made within it and its closing arrival, nothing after)."""

    def fresh() -> SwitchingPolicy:
        return SwitchingPolicy(PredictivePolicy(device_price=0.3), HybridHistogram(), min_gaps=2)

    one, two = fresh(), fresh()
    cut = sum(step for step, _ in head)
    other_tail = [(step * 1.7, "a" if what == "tick" else "tick") for step, what in tail]
    assert _replay(one, head + tail, until=cut) == _replay(two, head + other_tail, until=cut)
    assert [one.follows_other(f) for f in FUNCTIONS] == [two.follows_other(f) for f in FUNCTIONS]
    scored = [one.costs(f) for f in FUNCTIONS]
    _replay(one, [(step, "tick") for step, _ in tail])  # later decisions, no arrival
    assert [one.costs(f) for f in FUNCTIONS] == scored


class _Always:
    """A rule that always holds the model (a test double of the *other* rule)."""

    name = "always"
    may_prefetch = True

    def observe(self, function: str, now_s: float) -> None:
        pass

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        return Advice(keep=True, prefetch=True, reason="always")

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]:
        return []

    def victim_plan(
        self, candidates: Sequence[Candidate], need_bytes: int, now_s: float
    ) -> list[str]:
        return []

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        pass


def _gaps(
    policy: SwitchingPolicy, now: float, gap_s: float, count: int
) -> tuple[float, list[Advice]]:
    """``count`` arrivals ``gap_s`` apart, a device decision half-way through each gap."""
    advice = []
    for _ in range(count):
        advice.append(
            policy.advise("f", now + gap_s / 2, size_bytes=GB, reload_ms=100.0, tier="device")
        )
        now += gap_s
        policy.observe("f", now)
    return now, advice


def test_each_rule_pays_rent_while_it_holds_and_a_miss_when_it_does_not() -> None:
    # ours at 1,000 ms per GB-s, charged rent for the whole horizon (rent_to_hit off) and
    # without the break-even floor, never holds (30 s of rent outweighs any miss); the other
    # always
    switch = SwitchingPolicy(
        PredictivePolicy(device_price=1000.0, miss_ms=2000.0, rent_to_hit=False, break_even=0),
        _Always(),
        half_life=1e9,
    )
    switch.observe("f", 0.0)
    _gaps(switch, 0.0, 1.0, 3)
    ours, other = switch.costs("f") or (0.0, 0.0)
    # until a gap's decision both hold it (a request has just loaded it) and pay the rent,
    # known from the first decision on (1,000 ms/s x 0.5 s); after it, ours pays a miss
    # (reload 100 + 2,000) at the arrival and the other the rest of the gap's rent. In the
    # first gap ours has one arrival and keeps it (its fallback), so it pays rent, no miss.
    assert ours == pytest.approx(500.0 + 2 * (500.0 + 2100.0), rel=1e-6)
    assert other == pytest.approx(500.0 + 2 * 1000.0, rel=1e-6)


def test_it_follows_the_cheaper_rule_after_enough_gaps_and_comes_back_with_hysteresis() -> None:
    switch = SwitchingPolicy(
        PredictivePolicy(device_price=1000.0, miss_ms=2000.0, rent_to_hit=False, break_even=0),
        _Always(),
        min_gaps=8,
        half_life=2,
    )
    switch.observe("f", 0.0)
    now, advice = _gaps(switch, 0.0, 1.0, 7)
    assert not switch.follows_other("f")  # 7 gaps scored: too few, ours
    assert advice[0].reason == "fallback"  # one arrival: ours' fallback keeps it
    assert all(a.reason == "cost" and not a.keep for a in advice[1:])
    now, advice = _gaps(switch, now, 1.0, 3)  # gaps of 1 s: holding (1,000) beats a miss (2,100)
    assert switch.follows_other("f")
    assert advice[-1] == Advice(keep=True, prefetch=True, reason="always")
    # gaps of 100 s: holding costs 100,000 a gap, a miss 2,100; back to ours once ours' decayed
    # cost is under 0.9x the other's
    now, _ = _gaps(switch, now, 100.0, 1)
    ours, other = switch.costs("f") or (0.0, 0.0)
    assert ours < 0.9 * other
    assert not switch.follows_other("f")


def test_hysteresis_holds_a_choice_while_the_costs_are_close() -> None:
    switch = SwitchingPolicy(
        PredictivePolicy(device_price=1000.0, miss_ms=2000.0, rent_to_hit=False, break_even=0),
        _Always(),
        min_gaps=1,
        half_life=1e9,
    )
    switch.observe("f", 0.0)
    _gaps(switch, 0.0, 4.0, 4)  # per gap, the other 4,000 against ours' 2,000 + 2,100
    ours, other = switch.costs("f") or (0.0, 0.0)
    assert 0.9 * ours <= other < ours
    assert not switch.follows_other("f")


def test_the_host_tier_and_the_victim_order_are_ours() -> None:
    ours = PredictivePolicy(device_price=0.3)
    switch = SwitchingPolicy(PredictivePolicy(device_price=0.3), _Always(), min_gaps=0)
    for t in (0.0, 1.0, 2.0):
        ours.observe("f", t)
        switch.observe("f", t)
    kw: dict[str, Any] = {"size_bytes": GB, "reload_ms": 500.0, "tier": "host"}
    assert switch.advise("f", 5000.0, **kw) == ours.advise("f", 5000.0, **kw)
    candidates = [Candidate("f", GB, 100.0), Candidate("g", 2 * GB, 100.0)]
    assert switch.victim_order(candidates, 3.0) == ours.victim_order(candidates, 3.0)


def test_snapshot_round_trip_through_json_keeps_the_choice() -> None:
    switch = make_policy("predictive", device_price=0.3, switch=1, switch_min_gaps=1)
    assert isinstance(switch, SwitchingPolicy)
    for t in range(0, 3000, 37):
        switch.observe("f", float(t))
        switch.advise("f", t + 5.0, size_bytes=GB, reload_ms=100.0, tier="device")
    again = make_policy("predictive", device_price=0.3, switch=1, switch_min_gaps=1)
    again.restore(json.loads(json.dumps(switch.snapshot())))
    kw: dict[str, Any] = {"size_bytes": GB, "reload_ms": 100.0, "tier": "device"}
    assert again.advise("f", 3100.0, **kw) == switch.advise("f", 3100.0, **kw)
    assert isinstance(again, SwitchingPolicy)
    assert again.costs("f") == switch.costs("f")
    with pytest.raises(ArrivalError):
        again.restore({"version": 1, "kind": "switch", "shadow": {"f": {"cost": 1}}})


def test_make_policy_without_switch_is_ours_alone() -> None:
    assert isinstance(make_policy("predictive", device_price=0.3), PredictivePolicy)
    with pytest.raises(ArrivalError):
        SwitchingPolicy(PredictivePolicy(), HybridHistogram(), hysteresis=1.0)


def test_the_gateways_plan_follows_the_rule_each_function_has_switched_to() -> None:
    """The gateway's driver (``scheduler/prefetch.py: plan``) asks the switch as it asks ours:
    a function switched to the other rule is kept (the other holds it) where ours alone would
    demote it; one that is not switched is demoted as ours alone decides."""
    from gpufaas.cache import ClusterDirectory
    from gpufaas.scheduler.prefetch import Action, plan

    directory = ClusterDirectory()
    directory.add_device("n/gpu:0", capacity_bytes=10 * GB, node="n")
    switch = SwitchingPolicy(
        PredictivePolicy(device_price=1000.0, miss_ms=2000.0, rent_to_hit=False, break_even=0),
        _Always(),
        min_gaps=8,
    )
    switch.observe("f", 0.0)
    now, _ = _gaps(switch, 0.0, 1.0, 12)  # switched: holding beat ours' misses
    switch.observe("g", now - 1.0)
    switch.observe("g", now)  # one gap: ours decides for it
    for model in ("f", "g"):
        directory.note_loaded("n/gpu:0", model, size_bytes=GB)
    actions = plan(
        switch,
        directory,
        now_s=now + 0.5,
        sizes={"f": GB, "g": GB},
        reload_ms=lambda name, size: 100.0,
        last_device={},
    )
    assert switch.follows_other("f") and not switch.follows_other("g")
    assert actions == [Action("demote", "g", "n/gpu:0")]
