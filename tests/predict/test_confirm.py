"""The confirmation's pre-registered verdict (``bench/predict-confirm.py``) on constructed runs:
per-seed ratios at the reference's memory-time, the exact-t interval, an unbracketed seed
counted as not met, and the pooled secondary estimate weighing seeds by their cold starts."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench_support import load_bench
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"
confirm = load_bench(BENCH / "predict-confirm.py", name="predict_confirm")


def _run(seed: int, label: str, memory: float, cold: float, requests: int = 1000) -> dict[str, Any]:
    return {
        "seed": seed,
        "label": label,
        "device_gb_s": memory,
        "cold_start_ratio": cold,
        "requests": requests,
    }


def _seed(seed: int, lru: float, hybrid: float, ours: list[tuple[float, float]]) -> list[Any]:
    """LRU at memory 100, the hybrid at 90, ours' family at the given (price, cold) points
    with memory 110 - 10 x price."""
    runs = [_run(seed, "lru+ka-10min", 100.0, lru), _run(seed, "hybrid", 90.0, hybrid)]
    runs += [_run(seed, f"ours-p{p:g}-f1", 110.0 - 10 * p, c) for p, c in ours]
    return runs


def test_each_seeds_ratio_is_ours_interpolated_at_the_references_memory_time() -> None:
    runs = _seed(1, 0.010, 0.020, [(0.0, 0.002), (1.0, 0.004), (2.0, 0.012)])
    out = confirm.verdict(runs, "ours-f1", resamples=100)
    # at 100 (LRU): ours 0.004, at 90 (the hybrid): ours 0.012
    assert math.isclose(out["lru+ka-10min"]["seeds"][0]["ratio"], 0.4)
    assert math.isclose(out["hybrid"]["seeds"][0]["ratio"], 0.6)
    # another family's points are not ours
    other = _seed(1, 0.010, 0.020, [(1.0, 0.004)])
    other += [_run(1, "ours-p0", 110.0, 0.0), _run(1, "ours-p2", 90.0, 0.0)]
    assert confirm.verdict(other, "ours-f1", resamples=10)["hybrid"]["seeds"][0]["ratio"] is None


def test_the_verdict_uses_the_exact_t_upper_end_and_an_unbracketed_seed_is_not_met() -> None:
    runs = []
    cold_at_lru = [0.002, 0.003, 0.004, 0.0035]  # ratios 0.2, 0.3, 0.4, 0.35 against 0.01
    for seed, c in enumerate(cold_at_lru):
        runs += _seed(seed, 0.010, 0.020, [(0.0, c), (2.0, c)])
    out = confirm.verdict(runs, "ours-f1", resamples=100)["lru+ka-10min"]
    ratios = [0.2, 0.3, 0.4, 0.35]
    half = 3.182 * statistics.stdev(ratios) / 2  # exact t, 3 df
    assert math.isclose(out["primary"]["mean"], statistics.fmean(ratios))
    assert math.isclose(out["primary"]["half"], half, rel_tol=1e-3)
    assert out["met"] and out["at_or_under_goal"] == 4
    runs += _seed(9, 0.010, 0.020, [(0.0, 0.001)])  # one point: no bracket for LRU's 100
    out = confirm.verdict(runs, "ours-f1", resamples=100)["lru+ka-10min"]
    assert out["unbracketed"] == [9] and out["primary"]["n"] == 4 and not out["met"]


def test_the_pooled_estimate_weighs_each_seed_by_its_cold_starts() -> None:
    """Seed 1 has 1,000 requests and 10 cold starts under LRU, seed 2 100,000 requests and 100
    under LRU: ours' 5 and 1 make the per-seed mean (0.5 + 0.01) / 2 and the pooled 6 / 110."""
    runs = [_run(1, "lru+ka-10min", 100.0, 0.010, 1000), _run(1, "ours-p0-f1", 110.0, 0.005, 1000)]
    runs += [_run(1, "ours-p2-f1", 90.0, 0.005, 1000)]
    runs += [_run(2, "lru+ka-10min", 100.0, 1e-3, 100_000)]
    runs += [
        _run(2, "ours-p0-f1", 110.0, 1e-5, 100_000),
        _run(2, "ours-p2-f1", 90.0, 1e-5, 100_000),
    ]
    out = confirm.verdict(runs, "ours-f1", resamples=2000)["lru+ka-10min"]
    assert math.isclose(out["primary"]["mean"], 0.255)
    assert math.isclose(out["pooled"]["ratio"], 6 / 110)
    assert out["pooled"]["low"] <= 6 / 110 <= out["pooled"]["high"]


@given(st.lists(st.floats(0.01, 5.0), min_size=2, max_size=12), st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_the_pooled_bootstrap_interval_lies_within_the_seeds_own_ratios(
    ratios: list[float], seed: int
) -> None:
    """Every resample's pooled ratio is a weighted mean of per-seed ratios, so the interval
    lies within their range."""
    rows = [
        {"seed": i, "ours": r * 0.01, "reference": 0.01, "ratio": r, "requests": 1000}
        for i, r in enumerate(ratios)
    ]
    out = confirm.pooled(rows, resamples=200, seed=seed)
    assert min(ratios) - 1e-9 <= out["low"] <= out["high"] <= max(ratios) + 1e-9
