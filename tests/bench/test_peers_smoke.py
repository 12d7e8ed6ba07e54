"""Smoke test of the peer benchmark's workload generator and statistics (no servers).

``bench/peers/workload.py`` is loaded by path: ``bench/`` is not an installed package.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from bench_support import load_bench

WORKLOAD_PATH = Path(__file__).resolve().parents[2] / "bench" / "peers" / "workload.py"


def _load() -> ModuleType:
    return load_bench(WORKLOAD_PATH, name="gpufaas_bench_peers_workload")


workload = _load()


def test_zipf_weights_follow_the_power_law() -> None:
    weights = workload.zipf_weights(4, s=1.0)
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert weights == pytest.approx(
        [1 / harmonic, 1 / 2 / harmonic, 1 / 3 / harmonic, 1 / 4 / harmonic]
    )
    assert workload.zipf_weights(3, s=0.0) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize(("count", "s"), [(0, 1.0), (3, -0.5), (3, float("nan"))])
def test_zipf_weights_reject_bad_parameters(count: int, s: float) -> None:
    with pytest.raises(ValueError, match="zipf_weights"):
        workload.zipf_weights(count, s=s)


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    models = [f"m{i}" for i in range(8)]
    first = workload.zipf_sequence(models, count=5000, s=1.1, seed=7)
    assert first == workload.zipf_sequence(models, count=5000, s=1.1, seed=7)
    assert first != workload.zipf_sequence(models, count=5000, s=1.1, seed=8)
    counts = [first.count(m) for m in models]
    assert set(first) <= set(models)
    assert counts[0] > counts[1] > counts[3] > counts[7]
    expected = workload.zipf_weights(8, s=1.1)[0] * 5000
    assert counts[0] == pytest.approx(expected, rel=0.1)


def test_zipf_sequence_needs_models() -> None:
    with pytest.raises(ValueError, match="no models"):
        workload.zipf_sequence([], count=3, s=1.0, seed=0)


def test_poisson_arrivals_are_bounded_in_count_and_time() -> None:
    arrivals = workload.poisson_arrivals(rate=100.0, count=10_000, duration_s=5.0, seed=1)
    assert arrivals == sorted(arrivals)
    assert all(0 < t < 5.0 for t in arrivals)
    assert len(arrivals) == pytest.approx(500, rel=0.15)  # rate x duration
    capped = workload.poisson_arrivals(rate=100.0, count=20, duration_s=5.0, seed=1)
    assert capped == arrivals[:20]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf")])
def test_poisson_arrivals_reject_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        workload.poisson_arrivals(rate=rate, count=5, duration_s=1.0, seed=0)


def test_percentile_interpolates_linearly() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert workload.percentile(values, 50) == pytest.approx(50.5)
    assert workload.percentile(values, 99) == pytest.approx(99.01)
    assert workload.percentile([3.0], 99) == 3.0
    assert workload.percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be"):
        workload.percentile(values, 101)


def test_summarize_reports_milliseconds_and_rate() -> None:
    summary = workload.summarize([0.001, 0.002, 0.003, 0.004], errors=1, wall_s=2.0)
    assert summary.count == 4
    assert summary.errors == 1
    assert summary.throughput_rps == 2.0
    assert summary.p50_ms == pytest.approx(2.5)
    assert summary.max_ms == pytest.approx(4.0)
    empty = workload.summarize([], errors=3, wall_s=1.0)
    assert (empty.count, empty.p50_ms, empty.throughput_rps) == (0, None, 0.0)


def test_ratio_table_divides_gpufaas_by_each_peer() -> None:
    figures = {
        "gpufaas": {"throughput_rps": 300.0, "warm_p50_ms": 2.0, "cold_ms": 10.0},
        "ray": {"throughput_rps": 100.0, "warm_p50_ms": 8.0, "cold_ms": None},
        "triton": {"throughput_rps": 0.0, "warm_p50_ms": 1.0, "cold_ms": 20.0},
    }
    rows = {row["figure"]: row for row in workload.ratio_table(figures)}
    assert rows["throughput_rps"]["ratios"] == {"ray": 3.0, "triton": None}  # x/0: no ratio
    assert rows["warm_p50_ms"]["ratios"] == {"ray": 0.25, "triton": 2.0}
    assert rows["cold_ms"]["ratios"] == {"ray": None, "triton": 0.5}
    assert rows["warm_p99_ms"]["values"] == {"gpufaas": None, "ray": None, "triton": None}
    table = workload.format_table(list(rows.values()))
    assert table.splitlines()[0] == (
        "| figure | unit | gpufaas | ray | triton | gpufaas/ray | gpufaas/triton |"
    )
    assert "| warm p50 (1 client) | ms | 2 | 8 | 1 | 0.25 | 2 |" in table


def test_ratio_table_needs_the_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        workload.ratio_table({"ray": {"warm_p50_ms": 1.0}})


def test_goals_are_checked_against_the_ratios() -> None:
    figures = {
        "gpufaas": {
            "warm_p50_ms": 2.0, "warm_p99_ms": 6.0, "throughput_rps": 300.0,
            "zipf_throughput_rps": 100.0, "cold_ms": 10.0,
        },
        "ray": {
            "warm_p50_ms": 5.0, "warm_p99_ms": 10.0, "throughput_rps": 100.0,
            "zipf_throughput_rps": 100.0, "cold_ms": 50.0,
        },
        "triton": {"warm_p50_ms": 1.0, "cold_ms": 10.0},
    }  # fmt: skip
    goals = {g.name: g for g in workload.check_goals(workload.ratio_table(figures))}
    assert goals["warm p50 at least 2x lower than Ray Serve"].met is True  # 0.4
    assert goals["warm p99 at least 2x lower than Ray Serve"].met is False  # 0.6
    assert goals["throughput at least 2x Ray Serve (warm models)"].met is True  # 3.0
    assert goals["throughput at least 2x Ray Serve (Zipf mix)"].met is False  # 1.0
    assert goals["cold start lower than Ray Serve"].met is True
    assert goals["cold start lower than PyTriton"].met is False  # equal is not lower
    assert goals["warm p50 within 1.5x of PyTriton"].met is False  # 2.0
    without_triton = workload.check_goals(workload.ratio_table({"gpufaas": figures["gpufaas"]}))
    assert {g.met for g in without_triton if g.peer == "triton"} == {None}


def test_issue_17_goal_table_names_each_goal_with_both_figures_and_the_verdict() -> None:
    figures = {
        "gpufaas": {"warm_p50_ms": 1.0, "batched_throughput_rps": 900.0},
        "ray": {"warm_p50_ms": 4.0, "batched_throughput_rps": 500.0},
        "triton": {"warm_p50_ms": 0.8, "batched_throughput_rps": 800.0},
    }
    rows = workload.ratio_table(figures)
    goals = {g.name: g for g in workload.check_goals(rows)}
    assert goals["#17 warm p50 <= PyTriton's"].met is False  # 1.25
    assert goals["#17 warm p50 at least 2x lower than Ray Serve's"].met is True  # 0.25
    assert goals["#17 batched throughput >= PyTriton's"].met is True  # 1.125
    assert goals["#17 batched throughput >= 2x Ray Serve's"].met is False  # 1.8
    table = workload.goal_table(
        {"tiny-mlp": {"figures": figures, "goals": [g.to_dict() for g in goals.values()]}}
    )
    lines = table.splitlines()
    assert len(lines) == 2 + len(workload.GOALS_17)  # header, rule, one row per #17 goal
    assert (
        "| tiny-mlp | batched throughput >= PyTriton's | 900 | 800 | 1.12 | >= 1 | met |" in lines
    )
    assert "| tiny-mlp | warm p50 <= PyTriton's | 1 | 0.8 | 1.25 | <= 1 | **missed** |" in lines


def test_figures_no_system_measured_are_left_out_of_the_table() -> None:
    figures = {"gpufaas": {"warm_p50_ms": 1.0}, "ray": {"warm_p50_ms": 2.0}}
    table = workload.format_table(workload.ratio_table(figures))
    assert "warm p50 (1 client)" in table
    assert "dynamic batching on" not in table
