"""The scale-out bench's summary of rounds (``bench/lalb.py --summarise``): the pooled miss
ratio and its bootstrap interval, and the table built from ``--json`` results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
try:
    from sim.scaleout import (
        forward_excess,
        goal_verdict,
        measured_latencies,
        miss_breakdown,
        pooled_p99_ratio,
        pooled_ratio_interval,
        request_records,
        summarise,
    )
finally:
    sys.path.remove(str(BENCH))


@settings(max_examples=50, deadline=None)
@given(
    rounds=st.lists(st.tuples(st.integers(1, 200), st.integers(0, 200)), min_size=1, max_size=10)
)
def test_the_pooled_ratio_lies_in_its_interval(rounds: list[tuple[int, int]]) -> None:
    base, other = [b for b, _ in rounds], [o for _, o in rounds]
    ratio, low, high = pooled_ratio_interval(base, other, resamples=500)
    assert ratio == sum(other) / sum(base)
    # every resample's ratio lies between the smallest and largest per-round ratio
    per_round = [o / b for b, o in rounds]
    assert min(per_round) - 1e-9 <= low <= high <= max(per_round) + 1e-9


def test_identical_rounds_give_no_width() -> None:
    assert pooled_ratio_interval([100] * 5, [110] * 5) == (1.1, 1.1, 1.1)


def _run(n: int, misses: int) -> dict[str, Any]:
    return {
        "gateways": n, "misses_at_managers": misses, "p99_ms": 8.0, "saturation_rps": 300.0 * n,
        "forwarded": 0, "offered_rps": 25.0, "device_utilisation": 0.003,
        "gateway_cpu_ms_per_request": 0.5,
    }  # fmt: skip


def test_the_summary_pools_rounds_in_any_order(tmp_path: Path) -> None:
    paths = []
    for seed, (one, two) in enumerate([(100, 90), (120, 130)], start=1):
        result = {
            "runs": [_run(2, two), _run(1, one)],  # counts run in either order
            "decision_overhead": {"p50_us": 1.0, "p99_us": 1.5},
            "_setup": {"seed": seed},
        }
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(result))
        paths.append(path)
    text = summarise(paths)
    assert "| misses | 0.992 ± " in text  # mean of 0.90 and 1.083
    assert "| 1.000 [0.900, 1.083] |" in text  # (90 + 130) / (100 + 120), bootstrap bounds
    assert "p99: 1.5-1.5 us (2 rounds)" in text


def _records(n: int, cache: str, forwarded: str, at_ms: list[int] | None = None) -> dict[str, Any]:
    return {
        "gateways": n,
        "cache": cache,
        "forwarded": forwarded,
        "latency_ms": [1.0] * len(cache),
        "at_ms": at_ms if at_ms is not None else [1000 * i for i in range(len(cache))],
    }


def test_misses_are_split_by_cause_request_by_request() -> None:
    # models of requests 0..7; at 2 replicas replica 0 (even requests) places without a hop
    models = [0, 1, 0, 2, 1, 3, 1, 0]
    one = _records(1, "mmhmhhhh", "........")  # 5: one gateway joined another's load
    two = _records(2, "mmhmmmmm", ".f.f.ff.")
    got = miss_breakdown(models, one, two)
    assert got["misses"] == 7 and got["base_misses"] == 3
    # 0, 1, 3: missed at one gateway too, 5 a first request (cold); 4 (model 1): no load
    # between 1 and 4 that one gateway did not make, so a victim choice; 6 (model 1): request
    # 5's load, which one gateway did not make, came between;
    # 7 (model 0): at replica 1, not forwarded: placed without the owner
    assert (got["both"], got["victim"], got["cascade"], got["blind"]) == (4, 1, 1, 1)
    assert got["saved"] == 0
    assert (got["asked"], got["asked_extra"], got["asked_extra_miss"]) == (4, 4, 4)


def test_a_victim_last_used_at_a_peer_just_before_a_load_is_flagged() -> None:
    models = [0, 1, 2, 1]
    one = _records(1, "mmmh", "....")
    # request 1 (model 1) at replica 1, then a load (request 2, the owner's) 30 ms later
    two = _records(2, "mmmm", ".f.f", at_ms=[0, 1000, 1030, 2000])
    got = miss_breakdown(models, one, two)
    assert got["victim"] == 1 and got["victim_peer_recent"] == 1
    late = miss_breakdown(models, one, _records(2, "mmmm", ".f.f", at_ms=[0, 1000, 1200, 2000]))
    assert late["victim"] == 1 and late["victim_peer_recent"] == 0


def test_a_hit_where_the_base_missed_counts_as_saved() -> None:
    got = miss_breakdown([0, 0, 1], _records(1, "mmm", "..."), _records(1, "mhm", "..."))
    assert got["saved"] == 1 and got["misses"] == 2 and got["both"] == 2


def test_the_summary_splits_each_rounds_misses_against_its_one_gateway(tmp_path: Path) -> None:
    models = [0, 1, 0, 2, 1]
    one = {**_run(1, 3), "requests": _records(1, "mmhmh", ".....")}
    two = {**_run(2, 4), "requests": _records(2, "mmhmm", ".f.f.")}
    result = {"runs": [two, one], "trace_models": models, "_setup": {"seed": 3}}
    path = tmp_path / "s3.json"
    path.write_text(json.dumps(result))
    text = summarise([path])
    # misses 4 (base 3): 0, 1, 3 in both; 4 a victim choice; one gateway missed nothing extra
    assert "| 3 | 2 | 4 | 3 | 3 | 0 | 0 | 1 | 0 | 0 | 0 | 0 | 2 | 2 | 2 |" in text


def test_the_control_run_is_reported_beside_the_replicas_against_the_first_one_gateway(
    tmp_path: Path,
) -> None:
    """``--gateways 1,2,1``: the second one-gateway run is the control (1 vs 1); the ratios
    are against the first, and a round without a control pools only where it ran one."""
    paths = []
    rounds = [(100, 110, 105), (120, 120, None)]
    for seed, (one, two, control) in enumerate(rounds, start=1):
        runs = [_run(1, one), _run(2, two)]
        if control is not None:
            runs.append({**_run(1, control), "control": True})
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"runs": runs, "_setup": {"seed": seed}}))
        paths.append(path)
    text = summarise(paths)
    assert (
        "| ratio to one gateway (mean, 95% t interval, rounds) | 1 (control) | 2 replicas |" in text
    )
    assert "| misses | 1.050 ± 0.000 (1) | 1.050 ± " in text  # control 105/100; 2: 1.10, 1.00
    assert "| 1.050 [1.050, 1.050] | 1.045 [" in text  # pooled: 105/100; (110 + 120) / 220
    assert "| 1 | 1 (control) | 105 | 1.05 |" in text


def test_the_secondary_figure_divides_by_the_mean_of_the_two_one_gateway_runs(
    tmp_path: Path,
) -> None:
    """Rounds with a control also report each replica count over the mean of the round's two
    one-gateway runs; a round without a control adds nothing to that row."""
    paths = []
    for seed, (one, control, two) in enumerate([(100, 120, 121), (90, None, 200)], start=1):
        runs = [_run(1, one), _run(2, two)]
        if control is not None:
            runs.append({**_run(1, control), "control": True, "p99_ms": 12.0})
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"runs": runs, "_setup": {"seed": seed}}))
        paths.append(path)
    text = summarise(paths)
    # misses 121 / ((100 + 120) / 2) = 1.1; p99 8 / ((8 + 12) / 2) = 0.8; one round each
    assert (
        "| misses, secondary (over the mean of the round's two one-gateway runs) | - "
        "| 1.100 ± 0.000 (1) |" in text
    )
    assert (
        "| p99, secondary (over the mean of the round's two one-gateway runs) | - "
        "| 0.800 ± 0.000 (1) |" in text
    )


def test_the_summary_says_whether_extra_cascades_are_one_sided(tmp_path: Path) -> None:
    models = [0, 1, 0, 2, 1]
    one = {**_run(1, 3), "requests": _records(1, "mmhmh", ".....")}
    two = {**_run(2, 4), "requests": _records(2, "mmhmm", ".f.f.")}
    path = tmp_path / "s3.json"
    path.write_text(json.dumps({"runs": [two, one], "trace_models": models, "_setup": {"seed": 3}}))
    # request 4: a victim choice at 2 replicas that one gateway did not make, no cascades
    assert "| 2 | 1 | +0.0 ± 0.0 | +1.0 ± 0.0 |" in summarise([path])


@settings(max_examples=30, deadline=None)
@given(
    rounds=st.lists(
        st.lists(st.floats(0.5, 50.0), min_size=5, max_size=40), min_size=2, max_size=6
    ),
    factor=st.floats(0.5, 2.0),
)
def test_a_uniform_slowdown_gives_its_factor_with_no_width(
    rounds: list[list[float]], factor: float
) -> None:
    """Every round's requests slower by one factor: the pooled p99 ratio is that factor, and
    neither interval over the rounds has any width."""
    base = [np.asarray(r) for r in rounds]
    got = pooled_p99_ratio(base, [factor * b for b in base], resamples=200)
    assert got["ratio"] == pytest.approx(factor)
    assert got["half"] == pytest.approx(0.0, abs=1e-9)
    assert got["low"] == pytest.approx(factor) and got["high"] == pytest.approx(factor)


def test_the_p99_is_pooled_over_rounds_and_the_jackknife_leaves_one_round_out() -> None:
    one = np.arange(1.0, 101.0)
    got = pooled_p99_ratio([one, one], [2 * one, one], resamples=200)
    # pooled: one gateway's 200 requests (1..100 twice) p99 99.01; the other's (2, 4 .. 200
    # and 1..100) 196.02. Leaving out round 1 gives 1, round 2 gives 2: a jackknife standard
    # error of sqrt(1/2 * (0.25 + 0.25)) = 0.5, times t(1 df) 12.71
    assert got["ratio"] == pytest.approx(196.02 / 99.01)
    assert got["half"] == pytest.approx(12.71 * 0.5)
    assert 1.0 - 1e-9 <= got["low"] <= got["high"] <= 2.0 + 1e-9
    assert got["rounds"] == 2


def test_one_round_gives_no_interval_and_cannot_meet_a_goal() -> None:
    got = pooled_p99_ratio([np.arange(1.0, 101.0)], [np.arange(1.0, 101.0)])
    assert got["ratio"] == 1.0 and got["half"] == float("inf")
    assert goal_verdict(got["ratio"], [got["ratio"] + got["half"]], goal=1.2) == (
        "met on the point figure only"
    )


def test_rounds_must_be_paired() -> None:
    with pytest.raises(ValueError, match="paired"):
        pooled_p99_ratio([np.ones(5)], [np.ones(5), np.ones(5)])


def test_a_goal_is_met_only_when_every_upper_bound_is_under_it() -> None:
    assert goal_verdict(1.1, [1.19, 1.2], goal=1.2) == "met"
    assert goal_verdict(1.1, [1.19, 1.21], goal=1.2) == "met on the point figure only"
    assert goal_verdict(1.21, [1.3, 1.3], goal=1.2) == "missed"


def test_measured_latencies_skip_the_first_tenth_and_unanswered_requests() -> None:
    records = _records(1, "hhhhhhhhhh-m", "............")
    records["latency_ms"] = [9.0] + [float(i) for i in range(1, 12)]
    # 12 requests: the first (12 // 10 = 1) is skipped, request 10 was not answered
    assert measured_latencies(records).tolist() == [*range(1, 10), 11]


def _timed_run(n: int, scale: float, *, control: bool = False) -> dict[str, Any]:
    records = _records(n, "h" * 200, "." * 200)
    records["latency_ms"] = [scale * (1 + i % 100) for i in range(200)]
    return {**_run(n, 10), "requests": records, **({"control": True} if control else {})}


def test_the_summary_reports_the_pooled_p99_beside_the_control(tmp_path: Path) -> None:
    """Each run's 180 measured requests (200 less the first tenth), pooled over two rounds."""
    paths = []
    for seed in (1, 2):
        runs = [_timed_run(n, scale) for n, scale in ((1, 1.0), (2, 1.1), (4, 1.3))]
        runs.append(_timed_run(1, 1.0, control=True))
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"runs": runs, "_setup": {"seed": seed}}))
        paths.append(path)
    text = summarise(paths)
    control = (
        "| 1 (control) | 2 | 360 | 1.000 | ± 0.000 (1.000) | [1.000, 1.000] | - (the control) |"
    )
    assert control in text
    assert "| 2 | 2 | 360 | 1.100 | ± 0.000 (1.100) | [1.100, 1.100] | met |" in text
    assert "| 4 | 2 | 360 | 1.300 | ± 0.000 (1.300) | [1.300, 1.300] | missed |" in text


def test_each_requests_parts_are_recorded_with_zero_where_absent() -> None:
    results = [
        {"status": 200, "latency_ms": 6.0, "hit": False, "at_s": 0.1, "forwarded": True,
         "device_ms": 2.0, "forward_ms": 3.5, "owner_ms": 3.0},
        {"status": 200, "latency_ms": 2.0, "hit": True, "at_s": 0.2, "forwarded": False,
         "device_ms": 0.25, "forward_ms": 0.0, "owner_ms": 0.0},
        {"error": "ReadTimeout"},
    ]  # fmt: skip
    got = request_records(results, gateways=2)
    assert (got["cache"], got["forwarded"]) == ("mh-", "f..")
    assert got["device_ms"] == [2.0, 0.25, 0.0]
    assert got["forward_ms"] == [3.5, 0.0, 0.0]
    assert got["owner_ms"] == [3.0, 0.0, 0.0]


def _parted(
    cache: str, forwarded: str, latency: list[float], device: list[float]
) -> dict[str, Any]:
    return {
        **_records(2 if "f" in forwarded else 1, cache, forwarded),
        "latency_ms": latency,
        "device_ms": device,
        "forward_ms": [4.0 if f == "f" else 0.0 for f in forwarded],
        "owner_ms": [3.5 if f == "f" else 0.0 for f in forwarded],
    }


def test_forwarded_misses_are_paired_with_the_same_requests_at_one_gateway() -> None:
    # 20 requests: the first two (20 // 10) are not measured; request 0 is a forwarded miss
    # 10 ms slower there, which must not count
    one_cache = "mm" + "mhmh" * 4 + "hh"
    # request 19: a forwarded miss here, a hit at one gateway: not a pair
    run_cache = "mm" + "mhmh" * 4 + "hm"
    forwarded = "f." + "f..." * 4 + ".f"
    one = _parted(one_cache, "." * 20, [5.0] * 20, [2.0 if c == "m" else 0.3 for c in one_cache])
    latency = [15.0, 5.0] + [
        (5.8 if f == "f" else (4.9 if c == "m" else 5.0))
        for c, f in zip(run_cache[2:], forwarded[2:], strict=True)
    ]
    device = [2.1 if c == "m" else 0.3 for c in run_cache]
    got = forward_excess(one, _parted(run_cache, forwarded, latency, device))
    assert got["forwarded_misses"] == 4.0  # requests 2, 6, 10, 14
    assert got["median_ms"] == pytest.approx(0.8)
    assert got["device_median_ms"] == pytest.approx(0.1)
    assert got["hop_median_ms"] == pytest.approx(0.5)
    assert got["hit_median_ms"] == pytest.approx(0.0)
    assert got["local_miss_median_ms"] == pytest.approx(-0.1)  # 4, 8, 12, 16


def test_runs_recorded_without_parts_pair_latencies_only() -> None:
    one = _records(1, "m" * 10 + "m", "." * 11)
    run = _records(2, "m" * 10 + "m", "." * 10 + "f")
    run["latency_ms"] = [1.0] * 10 + [1.7]
    got = forward_excess(one, run)
    assert got["forwarded_misses"] == 1.0 and got["median_ms"] == pytest.approx(0.7)
    assert all(np.isnan(got[k]) for k in ("device_median_ms", "hop_median_ms", "hit_median_ms"))


def test_the_summary_reports_what_a_forward_adds_to_a_miss(tmp_path: Path) -> None:
    one_cache = "mm" + "mhmh" * 4 + "hm"
    forwarded = "f." + "f..." * 4 + ".."
    one = {**_run(1, 9), "requests": _parted(one_cache, "." * 20, [5.0] * 20, [2.0] * 20)}
    latency = [5.8 if f == "f" else 5.0 for f in forwarded]
    two = {**_run(2, 9), "requests": _parted(one_cache, forwarded, latency, [2.0] * 20)}
    path = tmp_path / "s5.json"
    path.write_text(json.dumps({"runs": [one, two], "_setup": {"seed": 5}}))
    assert "| 2 | 1 | 4 | +0.80 | +0.00 | +0.50 | +0.00 | +0.00 |" in summarise([path])
