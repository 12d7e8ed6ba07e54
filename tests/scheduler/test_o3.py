"""Tests of gpufaas.scheduler.o3.O3Queue: bounded overtaking, deadline order, no starvation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.scheduler.o3 import O3Queue, Waiting

MODELS = ("a", "b", "c", "d")


def drain(queue: O3Queue[str], *, now_ms: float, resident: set[str]) -> list[str]:
    served = []
    while (waiting := queue.pop_next(now_ms, resident)) is not None:
        served.append(waiting.item)
    return served


def test_fifo_when_nothing_is_resident() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=8, max_hold_ms=1000)
    for i, model in enumerate("abcab"):
        queue.push(f"r{i}", model=model, now_ms=0)
    assert drain(queue, now_ms=1, resident=set()) == ["r0", "r1", "r2", "r3", "r4"]


def test_resident_request_overtakes_one_waiting_for_a_load() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=8, max_hold_ms=1000)
    queue.push("cold", model="a", now_ms=0)
    queue.push("hot", model="b", now_ms=1)
    first = queue.pop_next(2, {"b"})
    assert first is not None and (first.item, first.overtook) == ("hot", True)
    rest = queue.pop_next(3, {"b"})
    assert rest is not None and (rest.item, rest.passes, rest.overtook) == ("cold", 1, False)


def test_resident_requests_go_by_deadline_then_arrival() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=8, max_hold_ms=1000)
    queue.push("late", model="a", now_ms=0, deadline_ms=500)
    queue.push("none", model="a", now_ms=0)
    queue.push("soon", model="b", now_ms=0, deadline_ms=100)
    queue.push("soon-too", model="b", now_ms=0, deadline_ms=100)
    assert drain(queue, now_ms=1, resident={"a", "b"}) == ["soon", "soon-too", "late", "none"]


def test_head_is_served_after_max_passes() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=2, max_hold_ms=10_000)
    queue.push("cold", model="a", now_ms=0)
    for i in range(5):
        queue.push(f"hot{i}", model="b", now_ms=0)
    order = drain(queue, now_ms=1, resident={"b"})
    assert order == ["hot0", "hot1", "cold", "hot2", "hot3", "hot4"]


def test_head_is_served_after_max_hold() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=100, max_hold_ms=50)
    queue.push("cold", model="a", now_ms=0)
    queue.push("hot0", model="b", now_ms=0)
    queue.push("hot1", model="b", now_ms=0)
    assert queue.pop_next(10, {"b"}).item == "hot0"  # type: ignore[union-attr]
    assert queue.pop_next(50, {"b"}).item == "cold"  # type: ignore[union-attr]


def test_hold_counts_from_becoming_the_head() -> None:
    queue: O3Queue[str] = O3Queue(max_passes=100, max_hold_ms=50)
    queue.push("first", model="a", now_ms=0)
    queue.push("second", model="a", now_ms=0)
    queue.push("hot", model="b", now_ms=0)
    assert queue.pop_next(100, set()).item == "first"  # type: ignore[union-attr]
    # "second" became the head at t=100: it may still be overtaken at t=120.
    assert queue.pop_next(120, {"b"}).item == "hot"  # type: ignore[union-attr]


def test_zero_bounds_mean_fifo() -> None:
    for queue in (O3Queue[str](max_passes=0), O3Queue[str](max_hold_ms=0)):
        queue.push("cold", model="a", now_ms=0)
        queue.push("hot", model="b", now_ms=0)
        assert queue.fifo
        assert drain(queue, now_ms=1, resident={"b"}) == ["cold", "hot"]


def test_remove_takes_a_request_out_once() -> None:
    queue: O3Queue[str] = O3Queue()
    ticket = queue.push("x", model="a", now_ms=0)
    queue.push("y", model="a", now_ms=0)
    assert queue.remove(ticket, now_ms=1) is True
    assert queue.remove(ticket, now_ms=1) is False
    assert drain(queue, now_ms=2, resident=set()) == ["y"]


def test_resident_may_be_a_predicate_asked_once_per_model() -> None:
    asked: list[str] = []

    def resident(model: str) -> bool:
        asked.append(model)
        return model == "b"

    queue: O3Queue[str] = O3Queue()
    for i, model in enumerate("aabba"):
        queue.push(f"r{i}", model=model, now_ms=0)
    assert queue.pop_next(1, resident).item == "r2"  # type: ignore[union-attr]
    assert sorted(asked) == ["a", "b"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_passes": -1}, "max_passes"),
        ({"max_passes": 1.5}, "max_passes"),
        ({"max_hold_ms": -1.0}, "max_hold_ms"),
        ({"max_hold_ms": math.nan}, "max_hold_ms"),
    ],
)
def test_bad_bounds_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        O3Queue(**options)  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------------------

push_op = st.tuples(
    st.just("push"),
    st.sampled_from(MODELS),
    st.one_of(st.none(), st.floats(min_value=0, max_value=200)),  # relative deadline
)
pop_op = st.tuples(st.just("pop"), st.frozensets(st.sampled_from(MODELS)), st.none())
remove_op = st.tuples(st.just("remove"), st.integers(min_value=0, max_value=50), st.none())
step = st.tuples(st.floats(min_value=0, max_value=30), st.one_of(push_op, pop_op, remove_op))


def expected_choice(
    waiting: list[Waiting[int]], *, now_ms: float, resident: frozenset[str], queue: O3Queue[int]
) -> Waiting[int]:
    """The rules of the module docstring, written out plainly."""
    head = waiting[0]
    since = head.head_since_ms if head.head_since_ms is not None else head.arrival_ms
    if queue.fifo or head.passes >= queue.max_passes or now_ms - since >= queue.max_hold_ms:
        return head
    hits = [w for w in waiting if w.model in resident]
    if not hits:
        return head
    return min(hits, key=lambda w: (w.deadline_ms, w.seq))


@settings(max_examples=150, deadline=None)
@given(
    max_passes=st.integers(min_value=0, max_value=4),
    max_hold_ms=st.sampled_from([0.0, 20.0, 60.0, math.inf]),
    steps=st.lists(step, max_size=60),
    final_resident=st.frozensets(st.sampled_from(MODELS)),
)
def test_o3_properties(
    max_passes: int,
    max_hold_ms: float,
    steps: list[tuple[float, tuple[str, object, float | None]]],
    final_resident: frozenset[str],
) -> None:
    queue: O3Queue[int] = O3Queue(max_passes=max_passes, max_hold_ms=max_hold_ms)
    now = 0.0
    pushed: list[Waiting[int]] = []
    served: list[int] = []
    removed: list[int] = []

    def pop(resident: frozenset[str]) -> None:
        before = list(queue)
        if not before:
            assert queue.pop_next(now, resident) is None
            return
        expected = expected_choice(before, now_ms=now, resident=resident, queue=queue)
        head = before[0]
        head_passes = head.passes
        since = head.head_since_ms if head.head_since_ms is not None else head.arrival_ms
        chosen = queue.pop_next(now, resident)
        assert chosen is expected
        if chosen is not head:
            # Overtaking only while the head is within both bounds, and only by a hit.
            assert head_passes < max_passes and now - since < max_hold_ms
            assert chosen.model in resident
        served.append(chosen.item)

    for gap, (kind, arg, deadline) in steps:
        now += gap
        if kind == "push":
            assert isinstance(arg, str)
            relative = deadline
            pushed.append(
                queue.push(
                    len(pushed),
                    model=arg,
                    now_ms=now,
                    deadline_ms=None if relative is None else now + relative,
                )
            )
        elif kind == "pop":
            assert isinstance(arg, frozenset)
            pop(arg)
        else:
            assert isinstance(arg, int)
            if pushed:
                ticket = pushed[arg % len(pushed)]
                if queue.remove(ticket, now_ms=now):
                    removed.append(ticket.item)
        # Nobody is ever passed more than max_passes times; passes never grow along the queue.
        passes = [w.passes for w in queue]
        assert all(p <= max_passes for p in passes)
        assert passes == sorted(passes, reverse=True)
    while queue:
        now += 1.0
        pop(final_resident)
    # Every request left exactly once: served or removed, never both, never twice.
    assert sorted(served + removed) == list(range(len(pushed)))
    assert len(set(served)) == len(served)
