"""Warm p99 within one run (``bench/predict-warm.py --within``): which warm requests count as
overlapping a prefetch load on a constructed timeline, the run's ratio, and the worst-case
bound on what ``k`` contaminated requests can do to the p99 (hypothesis)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from bench_support import load_bench
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"
predict_warm = load_bench(BENCH / "predict-warm.py", name="predict_warm_within")


def _run(requests: list[list[Any] | None], prefetches: list[list[Any]]) -> dict[str, Any]:
    return {
        "label": "ours",
        "seed": 80,
        "repetition": 0,
        "requests": requests,
        "prefetches": prefetches,
    }


# one load on node A's cpu:0, 100.000-100.010 s, and one on node B's cpu:0 (the same device
# name: the log does not say the node), 200.000-200.004 s, preempted
PREFETCHES = [
    [100.0, "fn-001", "cpu:0", "started", None],
    [100.01, "fn-001", "cpu:0", "loaded", 10.0],
    [200.0, "fn-002", "cpu:0", "started", None],
    [200.004, "fn-002", "cpu:0", "preempted", None],
]


def _timeline() -> list[list[Any] | None]:
    """``[sent s, index, latency ms, hit, compute ms, batch]``; the first of ten is warm-up."""
    return [
        [99.99, 0, 30.0, True, 0.2, 1.0],  # warm-up (10%): never counted, though it overlaps
        [99.995, 1, 10.0, True, 0.2, 1.0],  # in the system across the load's start: overlapped
        [100.005, 2, 1.0, True, 0.2, 1.0],  # inside the load: overlapped
        [100.02, 3, 1.0, True, 0.2, 1.0],  # 10 ms after the load ended: clean at margin 0
        [99.98, 4, 10.0, True, 0.2, 1.0],  # answered before the load began: clean
        [100.0, 5, 40.0, False, 0.2, 1.0],  # a cold request: not warm, not counted
        None,  # a failed request
        [200.001, 7, 1.0, True, 0.2, 1.0],  # meets the preempted load on the other node
        [200.01, 8, 2.0, True, 0.2, 1.0],  # after it was preempted: clean
        [300.0, 9, 3.0, True, 0.2, 1.0],  # nowhere near a load: clean
    ]


def test_a_warm_request_is_overlapped_only_while_a_prefetch_load_runs_on_any_node() -> None:
    overlapped, clean = predict_warm.split_warm(_run(_timeline(), PREFETCHES), margin_s=0.0)
    assert sorted(overlapped) == [1.0, 1.0, 10.0]  # requests 1, 2 and 7
    assert sorted(clean) == [1.0, 2.0, 3.0, 10.0]  # requests 3, 4, 8 and 9


def test_the_margin_widens_each_load_window_after_its_end() -> None:
    overlapped, clean = predict_warm.split_warm(_run(_timeline(), PREFETCHES), margin_s=0.020)
    assert sorted(overlapped) == [1.0, 1.0, 1.0, 2.0, 10.0]  # and 3 (100.02) and 8 (200.01)
    assert sorted(clean) == [3.0, 10.0]


def test_a_run_whose_overlapped_requests_are_slow_has_a_ratio_over_one_within_its_bound() -> None:
    # 990 clean warm requests at 1-2 ms, 5 overlapped ones at 50 ms (after 110 warm-up ones)
    rng = np.random.default_rng(0)
    requests: list[list[Any] | None] = [[0.0, i, 1.0, True, 0.1, 1.0] for i in range(110)]
    clean_ms = rng.uniform(1.0, 2.0, 990)
    requests += [[10.0 + i, 110 + i, float(ms), True, 0.1, 1.0] for i, ms in enumerate(clean_ms)]
    prefetches: list[list[Any]] = []
    for j in range(5):
        at = 2000.0 + j
        requests.append([at, 1100 + j, 50.0, True, 0.1, 1.0])
        prefetches += [
            [at, "m", "cpu:1", "started", None],
            [at + 0.005, "m", "cpu:1", "loaded", 5.0],
        ]
    row = predict_warm.within_report(_run(requests, prefetches), margin_s=0.0)
    assert (row["warm"], row["overlapped"]) == (995, 5)
    assert row["clean_p99_ms"] == np.percentile(clean_ms, 99)
    assert row["ratio"] > 1.0
    # all five are above every clean one: the p99 reaches the worst case exactly
    assert math.isclose(row["warm_p99_ms"], row["bound"] * row["clean_p99_ms"], rel_tol=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    clean=st.lists(st.floats(0.1, 1e3), min_size=1, max_size=300),
    extra=st.lists(st.floats(0.0, 1e6), max_size=10),
)
def test_no_k_contaminated_values_raise_the_p99_past_the_bound(
    clean: list[float], extra: list[float]
) -> None:
    bound = predict_warm.contaminated_p99_bound(clean, len(extra))
    p99 = float(np.percentile(clean + extra, 99))
    assert p99 <= bound * (1 + 1e-12) or math.isclose(p99, bound, rel_tol=1e-9)
    # and it is reached: the same k values all above the clean set put the p99 on the bound
    if math.isfinite(bound):
        top = [max(clean) * 2 + 1.0] * len(extra)
        assert math.isclose(float(np.percentile(clean + top, 99)), bound, rel_tol=1e-9)


def test_no_clean_request_is_a_clear_error() -> None:
    requests: list[list[Any] | None] = [[100.0, i, 5.0, True, 0.1, 1.0] for i in range(20)]
    prefetches = [[99.0, "m", "cpu:0", "started", None], [102.0, "m", "cpu:0", "loaded", 3000.0]]
    try:
        predict_warm.within_report(_run(requests, prefetches), margin_s=0.0)
    except ValueError as e:
        assert "no clean warm request" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_the_exact_t_has_every_degree_of_freedom_and_the_published_table_is_unchanged() -> None:
    from sim.sweep import t95, t95_exact  # bench/ is on the path: predict-warm.py put it there

    assert (t95_exact(12), t95_exact(20), t95_exact(10)) == (2.201, 2.093, 2.262)
    assert (t95(12), t95(20)) == (2.228, 2.131)  # the sparse table every #13 figure used
    assert math.isnan(t95_exact(1))


def test_a_run_without_a_worst_case_bound_leaves_the_interval_unbounded() -> None:
    assert predict_warm.over_runs([1.0, math.inf, 1.02])["upper"] == math.inf
    finite = predict_warm.over_runs([1.0, 1.02])
    assert math.isclose(finite["upper"], 1.01 + 12.706 * 0.01)  # sd / sqrt(2) = 0.01
