"""core/counting.py: the loop's counters and histograms expose what prometheus_client's would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from gpufaas.core.counting import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.005, 0.01, 0.5, 1, 10)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.floats(min_value=0, max_value=20, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_the_same_samples_as_prometheus_client(observations: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("c", "doc", ["model"], registry=ours)
    histogram = LoopHistogram("h", "doc", ["model"], buckets=BUCKETS, registry=ours)
    their_counter = Counter("c", "doc", ["model"], registry=theirs)
    their_histogram = Histogram("h", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    for model, value in observations:
        counter.labels(model).inc(value)
        histogram.labels(model).observe(value)
        their_counter.labels(model).inc(value)
        their_histogram.labels(model).observe(value)
    mine, expected = samples(ours), samples(theirs)
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(mine[key] - value) <= 1e-9 * max(1.0, abs(value)), key


def test_wrong_labels_and_negative_increments_are_refused() -> None:
    counter = LoopCounter("c", "doc", ["model", "code"])
    try:
        counter.labels("a")
    except ValueError as e:
        assert "takes labels" in str(e)
    else:
        raise AssertionError("one label of two was accepted")
    try:
        counter.labels("a", "200").inc(-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a counter went down")
