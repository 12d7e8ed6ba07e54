"""Rendezvous ownership: every replica computes the same owner, and membership changes move
only the functions that must move."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufaas.scheduler.ring import Ring

members = st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=8)
keys = st.lists(st.text(max_size=16), min_size=1, max_size=60, unique=True)


@given(members, keys)
def test_the_owner_is_a_member_and_the_same_in_every_replica(ms: set[str], ks: list[str]) -> None:
    a, b = Ring(ms), Ring(sorted(ms, reverse=True))
    for key in ks:
        assert a.owner(key) in ms
        assert a.owner(key) == b.owner(key)


@given(members, st.text(min_size=1, max_size=12), keys)
def test_a_member_leaving_moves_only_its_own_keys(
    ms: set[str], leaving: str, ks: list[str]
) -> None:
    ring = Ring(ms | {leaving})
    before = {k: ring.owner(k) for k in ks}
    if len(ms - {leaving}) == 0:
        return
    assert ring.set_members(ms - {leaving})
    for key in ks:
        if before[key] != leaving:
            assert ring.owner(key) == before[key]
        else:
            assert ring.owner(key) != leaving


@given(members, st.text(min_size=1, max_size=12), keys)
def test_a_member_joining_takes_keys_only_for_itself(
    ms: set[str], joining: str, ks: list[str]
) -> None:
    ring = Ring(ms - {joining} or {"other"})
    before = {k: ring.owner(k) for k in ks}
    ring.set_members(set(ring.members) | {joining})
    for key in ks:
        assert ring.owner(key) in (before[key], joining)


def test_keys_spread_over_the_members() -> None:
    ring = Ring([f"http://10.0.0.{i}:8080" for i in range(4)])
    counts: dict[str, int] = {}
    for i in range(4000):
        owner = ring.owner(f"function-{i}")
        counts[owner] = counts.get(owner, 0) + 1
    assert len(counts) == 4
    assert min(counts.values()) > 800  # 1000 each on average


def test_an_empty_ring_has_no_owner() -> None:
    with pytest.raises(LookupError):
        Ring().owner("f")
    ring = Ring(["a"])
    assert not ring.set_members(["a"])
