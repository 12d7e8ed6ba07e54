"""FailureBackoff: failed loads are not retried before their time, and the wait doubles."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufaas.cache.backoff import FailureBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failure_blocks_until_its_retry_time_and_doubles() -> None:
    clock = Clock()
    backoff: FailureBackoff[str] = FailureBackoff(base_s=1.0, max_s=8.0, clock=clock)
    assert backoff.blocked("m") is None
    first = backoff.record_failure("m", "sha256 mismatch")
    assert first.attempts == 1 and first.retry_after(clock.now) == 1.0
    blocked = backoff.blocked("m")
    assert blocked is not None and blocked.message == "sha256 mismatch"
    clock.now += 1.0
    assert backoff.blocked("m") is None  # one try allowed
    assert backoff.record_failure("m", "again").retry_after(clock.now) == 2.0
    for expected in (4.0, 8.0, 8.0):
        clock.now += 100
        assert backoff.record_failure("m", "again").retry_after(clock.now) == expected


def test_success_and_forget_clear_the_key() -> None:
    clock = Clock()
    backoff: FailureBackoff[str] = FailureBackoff(clock=clock)
    backoff.record_failure("a", "x")
    backoff.record_failure("b", "y")
    backoff.record_success("a")
    backoff.forget("b")
    assert backoff.blocked("a") is None and backoff.blocked("b") is None and len(backoff) == 0


def test_keys_are_independent() -> None:
    backoff: FailureBackoff[str] = FailureBackoff(clock=Clock())
    backoff.record_failure("a", "x")
    assert backoff.blocked("b") is None


@given(
    failures=st.integers(min_value=1, max_value=40), base=st.floats(0.01, 5), cap=st.floats(5, 600)
)
def test_delay_is_bounded_and_monotone(failures: int, base: float, cap: float) -> None:
    clock = Clock()
    backoff: FailureBackoff[str] = FailureBackoff(base_s=base, max_s=cap, clock=clock)
    delays = [backoff.record_failure("k", "e").retry_after(clock.now) for _ in range(failures)]
    assert all(0 < d <= cap + 1e-9 for d in delays)  # retry_at - now rounds
    assert delays == sorted(delays)


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="base_s"):
        FailureBackoff(base_s=0)
