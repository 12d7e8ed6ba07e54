"""Tests of gpufaas.cache.lru.ByteLRU: byte accounting, pins, LRU order, victim planning."""

from __future__ import annotations

from collections.abc import Collection

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpufaas.cache import (
    ByteLRU,
    CacheError,
    EntryExists,
    EntryPinned,
    EntryState,
    InsufficientCapacity,
    InvalidSize,
    UnknownKey,
    WrongState,
)


def filled(capacity: int, **sizes: int) -> ByteLRU[str]:
    lru: ByteLRU[str] = ByteLRU(capacity_bytes=capacity)
    for key, size in sizes.items():
        lru.put(key, f"value-{key}", size_bytes=size)
    return lru


def test_put_accounts_bytes_and_get_returns_value() -> None:
    lru = filled(10, a=3, b=4)
    assert (lru.used_bytes, lru.free_bytes, lru.pinned_bytes, len(lru)) == (7, 3, 0, 2)
    entry = lru.get("a")
    assert entry is not None
    assert (entry.value, entry.state, entry.pins, entry.size_bytes) == (
        "value-a",
        EntryState.RESIDENT,
        0,
        3,
    )
    assert "a" in lru and "z" not in lru
    assert lru.get("z") is None


def test_get_touches_and_peek_does_not() -> None:
    lru = filled(10, a=1, b=1, c=1)
    lru.peek("a")
    assert lru.keys_lru() == ["a", "b", "c"]
    lru.get("a")
    assert lru.keys_lru() == ["b", "c", "a"]
    lru.touch("b")
    assert lru.keys_lru() == ["c", "a", "b"]
    assert lru.peek("b").last_used > lru.peek("a").last_used  # type: ignore[union-attr]


def test_plan_victims_frees_enough_and_no_more() -> None:
    # Walking LRU order takes a, b, then c; c alone is enough, so a and b are spared.
    lru = filled(7, a=1, b=1, c=5)
    assert lru.plan_victims(5) == ["c"]
    assert lru.used_bytes == 7  # planning changes nothing
    assert lru.plan_victims(0) == []
    assert lru.plan_victims(1) == ["a"]
    assert lru.plan_victims(2) == ["a", "b"]


def test_plan_victims_uses_free_bytes_first() -> None:
    lru = filled(10, a=2, b=2)
    assert lru.plan_victims(6) == []
    assert lru.plan_victims(7) == ["a"]


def test_pinned_and_loading_entries_are_never_victims() -> None:
    lru = filled(10, a=4, b=4)
    lru.pin("a")
    assert lru.plan_victims(5) == ["b"]
    lru.reserve("c", size_bytes=2)
    lru.unpin("c")  # still loading: still not a victim
    assert lru.peek("c").pinned  # type: ignore[union-attr]
    with pytest.raises(InsufficientCapacity):
        lru.plan_victims(7)
    evicted = lru.make_room(4)
    assert [e.key for e in evicted] == ["b"]
    assert lru.keys_lru() == ["a", "c"]


def test_exclude_protects_entries_from_planning() -> None:
    lru = filled(6, a=3, b=3)
    assert lru.plan_victims(3, exclude={"a"}) == ["b"]
    with pytest.raises(InsufficientCapacity) as info:
        lru.plan_victims(6, exclude=["a"])
    assert info.value.freeable_bytes == 3


def test_prefer_evicts_hinted_entries_first() -> None:
    lru = filled(9, a=3, b=3, c=3)
    assert lru.plan_victims(3, prefer=["c"]) == ["c"]
    # The hint comes first, then LRU order for the rest.
    assert lru.plan_victims(6, prefer=["c"]) == ["c", "a"]
    assert [e.key for e in lru.make_room(3, prefer=["b"])] == ["b"]
    assert lru.keys_lru() == ["a", "c"]


def test_prefer_is_advice_never_a_reason_to_fail() -> None:
    lru = filled(9, a=3, b=3, c=3)
    lru.pin("c")
    # Pinned, excluded, absent and repeated hints are skipped; LRU order fills in.
    assert lru.plan_victims(3, prefer=["c", "zz", "c"]) == ["a"]
    assert lru.plan_victims(3, exclude={"b"}, prefer=["b"]) == ["a"]
    assert lru.plan_victims(6, prefer=["b", "b"]) == ["b", "a"]
    with pytest.raises(InsufficientCapacity):
        lru.plan_victims(7, prefer=["a", "b"])


def test_prefer_keeps_the_plan_minimal() -> None:
    # A small hint taken first becomes unnecessary once a larger LRU entry is taken.
    lru = filled(10, a=5, b=1, c=4)
    assert lru.plan_victims(5, prefer=["b"]) == ["a"]


def test_insufficient_capacity_message_names_the_numbers() -> None:
    lru = filled(100, a=30, b=50)
    lru.pin("b")
    with pytest.raises(InsufficientCapacity) as info:
        lru.plan_victims(60)
    error = info.value
    assert (error.needed_bytes, error.free_bytes, error.freeable_bytes) == (60, 20, 30)
    assert (error.capacity_bytes, error.pinned_bytes) == (100, 50)
    message = str(error)
    for number in ("60", "20", "30", "100", "50"):
        assert number in message
    with pytest.raises(InsufficientCapacity, match="capacity 100"):
        lru.plan_victims(101)


def test_reserve_commit_unpin_lifecycle() -> None:
    lru: ByteLRU[str] = ByteLRU(capacity_bytes=10)
    entry = lru.reserve("m", size_bytes=4)
    assert (entry.state, entry.pins, entry.value) == (EntryState.LOADING, 1, None)
    assert lru.pinned_bytes == 4
    lru.commit("m", "weights", size_bytes=6)  # the measured size replaces the estimate
    assert (entry.state, entry.value, entry.size_bytes, entry.pins) == (
        EntryState.RESIDENT,
        "weights",
        6,
        1,
    )
    assert (lru.used_bytes, lru.pinned_bytes) == (6, 6)
    lru.unpin("m")
    assert lru.pinned_bytes == 0
    with pytest.raises(WrongState):
        lru.commit("m", "again")


def test_commit_growth_beyond_free_space_leaves_entry_alone() -> None:
    lru = filled(10, a=5)
    lru.reserve("m", size_bytes=3)
    with pytest.raises(InsufficientCapacity):
        lru.commit("m", "weights", size_bytes=9)
    entry = lru.peek("m")
    assert entry is not None
    assert (entry.state, entry.size_bytes, lru.used_bytes) == (EntryState.LOADING, 3, 8)


def test_reserve_refuses_overbooking_and_duplicates() -> None:
    lru = filled(10, a=8)
    with pytest.raises(InsufficientCapacity):
        lru.reserve("b", size_bytes=3)
    with pytest.raises(EntryExists):
        lru.reserve("a", size_bytes=1)
    with pytest.raises(EntryExists):
        lru.put("a", "x", size_bytes=1)
    assert lru.keys_lru() == ["a"]


def test_pin_counts_and_unpin_errors() -> None:
    lru = filled(10, a=2)
    lru.pin("a")
    lru.pin("a")
    lru.unpin("a")
    with pytest.raises(EntryPinned, match="'a'"):
        lru.evict("a")
    lru.unpin("a")
    with pytest.raises(CacheError, match="not pinned"):
        lru.unpin("a")
    assert lru.evict("a").key == "a"
    with pytest.raises(UnknownKey, match="'a' is not in the cache"):
        lru.pin("a")


def test_discard_removes_pinned_entries() -> None:
    lru: ByteLRU[str] = ByteLRU(capacity_bytes=10)
    lru.reserve("m", size_bytes=4)
    discarded = lru.discard("m")
    assert discarded is not None and discarded.key == "m"
    assert (lru.used_bytes, lru.pinned_bytes, len(lru)) == (0, 0, 0)
    assert lru.discard("m") is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_bad_sizes_are_rejected_clearly(bad: object) -> None:
    with pytest.raises(InvalidSize, match="capacity_bytes"):
        ByteLRU(capacity_bytes=bad)  # type: ignore[arg-type]
    lru: ByteLRU[str] = ByteLRU(capacity_bytes=10)
    with pytest.raises(InvalidSize, match="size_bytes"):
        lru.reserve("m", size_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSize):
        lru.plan_victims(bad)  # type: ignore[arg-type]


def test_copy_is_independent() -> None:
    lru = filled(10, a=2, b=3)
    clone = lru.copy()
    clone.evict("a")
    clone.pin("b")
    assert lru.keys_lru() == ["a", "b"]
    assert (lru.pinned_bytes, clone.pinned_bytes, clone.used_bytes) == (0, 3, 3)


def test_zero_capacity_holds_only_empty_entries() -> None:
    lru: ByteLRU[str] = ByteLRU(capacity_bytes=0)
    lru.put("empty", "", size_bytes=0)
    with pytest.raises(InsufficientCapacity):
        lru.plan_victims(1)


# -- properties ----------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
SIZES = st.integers(min_value=0, max_value=40)
CAPACITY = 100


class ByteLRUMachine(RuleBasedStateMachine):
    """Drives a ByteLRU against a plain model of it: order, sizes, pins, loading set."""

    def __init__(self) -> None:
        super().__init__()
        self.lru: ByteLRU[int] = ByteLRU(capacity_bytes=CAPACITY)
        self.order: list[str] = []  # least- to most-recently used
        self.sizes: dict[str, int] = {}
        self.pins: dict[str, int] = {}
        self.loading: set[str] = set()

    # model helpers
    def touch(self, key: str) -> None:
        self.order.remove(key)
        self.order.append(key)

    def forget(self, key: str) -> None:
        self.order.remove(key)
        del self.sizes[key], self.pins[key]
        self.loading.discard(key)

    def pinned(self, key: str) -> bool:
        return self.pins[key] > 0 or key in self.loading

    def free(self) -> int:
        return CAPACITY - sum(self.sizes.values())

    def check_plan(self, size: int, exclude: Collection[str], victims: list[str]) -> None:
        assert all(not self.pinned(v) and v not in exclude for v in victims)
        positions = [self.order.index(v) for v in victims]
        assert positions == sorted(positions) and len(set(victims)) == len(victims)
        freed = sum(self.sizes[v] for v in victims)
        assert self.free() + freed >= size
        for v in victims:  # minimal: every victim is needed
            assert self.free() + freed - self.sizes[v] < size
        if size <= self.free():
            assert victims == []

    def expect_impossible(self, size: int, exclude: Collection[str]) -> bool:
        freeable = sum(s for k, s in self.sizes.items() if not self.pinned(k) and k not in exclude)
        return size > CAPACITY or self.free() + freeable < size

    # rules
    @rule(key=KEYS, size=SIZES)
    def reserve(self, key: str, size: int) -> None:
        if key in self.sizes:
            with pytest.raises(EntryExists):
                self.lru.reserve(key, size_bytes=size)
        elif size > self.free():
            with pytest.raises(InsufficientCapacity):
                self.lru.reserve(key, size_bytes=size)
        else:
            self.lru.reserve(key, size_bytes=size)
            self.order.append(key)
            self.sizes[key], self.pins[key] = size, 1
            self.loading.add(key)

    @rule(key=KEYS, size=st.none() | SIZES)
    def commit(self, key: str, size: int | None) -> None:
        if key not in self.loading:
            with pytest.raises(CacheError):
                self.lru.commit(key, 1, size_bytes=size)
            return
        new_size = self.sizes[key] if size is None else size
        if new_size - self.sizes[key] > self.free():
            with pytest.raises(InsufficientCapacity):
                self.lru.commit(key, 1, size_bytes=size)
            return
        self.lru.commit(key, 1, size_bytes=size)
        self.sizes[key] = new_size
        self.loading.discard(key)
        self.touch(key)

    @rule(key=KEYS, size=SIZES)
    def put(self, key: str, size: int) -> None:
        if key in self.sizes or size > self.free():
            with pytest.raises(CacheError):
                self.lru.put(key, 2, size_bytes=size)
            return
        self.lru.put(key, 2, size_bytes=size)
        self.order.append(key)
        self.sizes[key], self.pins[key] = size, 0

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        entry = self.lru.get(key)
        assert (entry is not None) == (key in self.sizes)
        if entry is not None:
            self.touch(key)

    @rule(key=KEYS)
    def peek(self, key: str) -> None:
        entry = self.lru.peek(key)
        assert (entry is not None) == (key in self.sizes)

    @rule(key=KEYS)
    def pin(self, key: str) -> None:
        if key not in self.sizes:
            with pytest.raises(UnknownKey):
                self.lru.pin(key)
            return
        self.lru.pin(key)
        self.pins[key] += 1

    @rule(key=KEYS)
    def unpin(self, key: str) -> None:
        if key not in self.sizes or self.pins[key] == 0:
            with pytest.raises(CacheError):
                self.lru.unpin(key)
            return
        self.lru.unpin(key)
        self.pins[key] -= 1

    @rule(key=KEYS)
    def evict(self, key: str) -> None:
        if key not in self.sizes:
            with pytest.raises(UnknownKey):
                self.lru.evict(key)
        elif self.pinned(key):
            with pytest.raises(EntryPinned):
                self.lru.evict(key)
        else:
            assert self.lru.evict(key).key == key
            self.forget(key)

    @rule(key=KEYS)
    def discard(self, key: str) -> None:
        entry = self.lru.discard(key)
        assert (entry is not None) == (key in self.sizes)
        if entry is not None:
            self.forget(key)

    @rule(size=st.integers(min_value=0, max_value=CAPACITY + 10), exclude=st.sets(KEYS, max_size=2))
    def plan_victims(self, size: int, exclude: set[str]) -> None:
        if self.expect_impossible(size, exclude):
            with pytest.raises(InsufficientCapacity):
                self.lru.plan_victims(size, exclude=exclude)
            return
        self.check_plan(size, exclude, self.lru.plan_victims(size, exclude=exclude))

    @rule(
        size=st.integers(min_value=0, max_value=CAPACITY + 10),
        exclude=st.sets(KEYS, max_size=2),
        prefer=st.lists(KEYS, max_size=3),
    )
    def plan_victims_with_hints(self, size: int, exclude: set[str], prefer: list[str]) -> None:
        if self.expect_impossible(size, exclude):
            with pytest.raises(InsufficientCapacity):
                self.lru.plan_victims(size, exclude=exclude, prefer=prefer)
            return
        victims = self.lru.plan_victims(size, exclude=exclude, prefer=prefer)
        assert all(not self.pinned(v) and v not in exclude for v in victims)
        assert len(set(victims)) == len(victims)
        freed = sum(self.sizes[v] for v in victims)
        assert self.free() + freed >= size
        for v in victims:  # minimal: every victim is needed
            assert self.free() + freed - self.sizes[v] < size
        # An evictable hint is only passed over if evicting the hints alone is not enough, or a
        # later choice made it unnecessary; so hints are never skipped for an older entry when
        # the hints alone suffice.
        usable = [k for k in dict.fromkeys(prefer) if k in self.sizes and not self.pinned(k)]
        usable = [k for k in usable if k not in exclude]
        if self.free() + sum(self.sizes[k] for k in usable) >= size:
            assert set(victims) <= set(usable)

    @precondition(lambda self: len(self.sizes) > 0)
    @rule(size=st.integers(min_value=0, max_value=CAPACITY), exclude=st.sets(KEYS, max_size=2))
    def make_room(self, size: int, exclude: set[str]) -> None:
        if self.expect_impossible(size, exclude):
            with pytest.raises(InsufficientCapacity):
                self.lru.make_room(size, exclude=exclude)
            return
        evicted = [entry.key for entry in self.lru.make_room(size, exclude=exclude)]
        self.check_plan(size, exclude, evicted)
        for key in evicted:
            self.forget(key)
        assert self.lru.free_bytes >= size

    # invariants
    @invariant()
    def bytes_add_up(self) -> None:
        assert self.lru.used_bytes == sum(self.sizes.values()) <= CAPACITY
        assert sum(e.size_bytes for e in self.lru.entries_lru()) == self.lru.used_bytes
        assert self.lru.pinned_bytes == sum(s for k, s in self.sizes.items() if self.pinned(k))
        assert self.lru.free_bytes == CAPACITY - self.lru.used_bytes

    @invariant()
    def order_and_state_match_model(self) -> None:
        assert self.lru.keys_lru() == self.order
        assert len(self.lru) == len(self.order)
        for entry in self.lru.entries_lru():
            assert entry.pins == self.pins[entry.key]
            assert (entry.state is EntryState.LOADING) == (entry.key in self.loading)


ByteLRUMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestByteLRUMachine = ByteLRUMachine.TestCase
