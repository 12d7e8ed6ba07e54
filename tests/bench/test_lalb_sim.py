"""A small, fast run of the LALB simulator (``bench/lalb.py --mode sim``) and its JSON shape.

On a fixed seed in a loaded regime, locality-aware routing beats plain load balancing and O3
dispatch beats FIFO dispatch, on both the miss ratio and the mean latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"
POLICIES = {"lb", "lalb", "lalb-o3", "belady"}


def lalb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "lalb.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_json(*args: str) -> dict[str, Any]:
    result = lalb("--mode", "sim", "--json", *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@pytest.fixture(scope="module")
def loaded_run() -> dict[str, Any]:
    return run_json(
        "--wss", "20", "--devices", "2", "--requests", "5000", "--rate", "60",
        "--concurrency", "1", "--seed", "3",
    )  # fmt: skip


def test_json_is_keyed_by_policy_with_the_four_numbers(loaded_run: dict[str, Any]) -> None:
    assert set(loaded_run) == POLICIES
    for policy, entry in loaded_run.items():
        assert {"mean_ms", "p99_ms", "miss_ratio", "hit_ratio"} <= set(entry), policy
        assert entry["hit_ratio"] + entry["miss_ratio"] == pytest.approx(1.0)
    assert loaded_run["belady"]["mean_ms"] is None


def test_lalb_beats_lb_and_o3_beats_lalb(loaded_run: dict[str, Any]) -> None:
    lb, lalb_, o3 = (loaded_run[p] for p in ("lb", "lalb", "lalb-o3"))
    assert lb["miss_ratio"] > lalb_["miss_ratio"] > o3["miss_ratio"]
    assert lb["mean_ms"] > lalb_["mean_ms"] > o3["mean_ms"]
    assert o3["overtakes"] > 0 and lalb_["overtakes"] == 0
    assert o3["vs_lb"]["mean_cut_pct"] > lalb_["vs_lb"]["mean_cut_pct"] > 0


def test_default_working_set_35_json_shape() -> None:
    document = run_json("--wss", "35", "--requests", "3000")
    assert set(document) == POLICIES
    assert all(0.0 <= document[p]["miss_ratio"] <= 1.0 for p in POLICIES)
    assert document["lalb"]["miss_ratio"] < document["lb"]["miss_ratio"]


def test_table_output_names_every_policy() -> None:
    result = lalb("--wss", "10", "--devices", "2", "--requests", "1500")
    assert result.returncode == 0, result.stderr
    for policy in ("lb", "lalb", "lalb-o3", "belady", "lalb vs lb"):
        assert policy in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--wss", "0"], "--wss"),
        (["--policies", "lb,fastest"], "unknown policies"),
        (["--profile", "tpu"], "unknown --profile"),
        (["--device-memory", "lots"], "--device-memory"),
        (["--wss", "5", "--device-memory", "1Mi"], "raise the capacity"),
    ],
)
def test_bad_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    result = lalb("--mode", "sim", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("gateways", "message"),
    [
        ("1,x", "replica counts >= 1"),
        ("0,2", "replica counts >= 1"),
        (",", "replica counts >= 1"),
        ("1,2,2", "only 1 may appear twice"),
        ("1,1,1", "only 1 may appear twice"),
    ],
)
def test_bad_replica_counts_get_a_clear_error_before_anything_starts(
    gateways: str, message: str
) -> None:
    result = lalb("--mode", "live", "--gateways", gateways)
    assert result.returncode == 2
    assert "--gateways" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def _belady() -> ModuleType:
    return load_bench(BENCH / "sim" / "belady.py", name="gpufaas_bench_belady")


def test_belady_evicts_the_model_needed_furthest_ahead() -> None:
    belady = _belady()
    # Room for two unit models: on the miss for 2, MIN evicts 1 (needed last), keeps 0.
    sequence = [0, 1, 2, 0, 2, 1]
    assert belady.belady_hits(sequence, [1, 1, 1], capacity_bytes=2) == 2
    # Room for 2 takes evicting 1 (size 2); 0, furthest ahead but too small to help, stays.
    assert belady.belady_hits([0, 1, 2, 1, 0], [1, 2, 2], capacity_bytes=3) == 1
    assert belady.belady_hits([0, 1, 0, 1], [1, 1], capacity_bytes=2, skip=3) == 1


def test_measure_never_overwrites_a_committed_profile_set() -> None:
    before = (BENCH / "sim" / "profiles.json").read_bytes()
    for name in ("cpu", "runtime", "cpu-host-tier"):  # cpu-host-tier: a derived name is taken
        result = lalb("measure", "--set", name.removesuffix("-host-tier"))
        assert result.returncode != 0
        assert "exist" in result.stderr and "Traceback" not in result.stderr
    assert (BENCH / "sim" / "profiles.json").read_bytes() == before


def test_sweep_reports_curves_with_intervals_and_lb_utilisation() -> None:
    result = lalb(
        "--sweep", "--json", "--rates", "30,80", "--host-tier-rates", "300", "--seeds", "2",
        "--requests", "2000", "--rows", "lru,hint,host-tier",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summaries = json.loads(result.stdout)
    assert [(s["row"], s["rate_per_s"]) for s in summaries] == [
        ("lru", 30), ("lru", 80), ("hint", 30), ("hint", 80), ("host-tier", 300),
    ]  # fmt: skip
    for s in summaries:
        assert s["seeds"] == 2
        assert set(s["policies"]) == {"lb", "lalb", "lalb-o3"}
        busy = s["lb_copy_utilisation"]
        assert 0 < busy["mean"] <= 1 and busy["ci95"] >= 0 and busy["n"] == 2
        lalb_ = s["policies"]["lalb"]
        for metric in ("mean_ms", "p99_ms", "miss_ratio", "mean_cut_pct", "miss_cut_pct"):
            assert lalb_[metric]["n"] == 2, metric
        assert lalb_["miss_x_pooled_min"]["mean"] >= 1.0  # pooled MIN is the easier cache
        assert s["policies"]["lb"]["mean_cut_pct"]["mean"] is None  # no cut against itself
    by = {(s["row"], s["rate_per_s"]): s for s in summaries}
    for row in ("lru", "hint"):  # more arrivals keep LB's copy engine busier
        assert (
            by[(row, 80)]["lb_copy_utilisation"]["mean"]
            > by[(row, 30)]["lb_copy_utilisation"]["mean"]
        )


def test_hint_rows_give_every_policy_value_eviction() -> None:
    """In the hint row LALB's managers evict the victims LALB names, and LB's evict by the same
    value rule: each policy's misses differ from its plain-LRU run on the same trace."""
    runs = {
        mode: run_json(
            "--wss",
            "35",
            "--requests",
            "4000",
            "--rate",
            "60",
            "--policies",
            "lb,lalb",
            "--eviction",
            mode,
        )
        for mode in ("hint", "lru")
    }
    for policy in ("lb", "lalb"):
        assert runs["hint"][policy]["misses"] != runs["lru"][policy]["misses"], policy


def test_lalb_victims_reach_the_simulated_managers() -> None:
    """In hint mode the simulator hands LALB's chosen victims to the device it routed to (as the
    gateway sends ``x-gpufaas-evict-first``); some loads in a full cluster carry them."""
    sys.path.insert(0, str(BENCH))
    try:
        from sim.engine import SimConfig, Simulation
        from sim.workload import load_profiles, make_catalogue, make_trace
    finally:
        sys.path.remove(str(BENCH))
    catalogue = make_catalogue(load_profiles()["cpu"], n_models=35, seed=1)
    trace = make_trace(wss=35, n_requests=3000, rate_per_s=60, zipf_s=1.0, seed=1)
    config = SimConfig(devices=4, capacity_bytes=192 * 2**20, concurrency=2, eviction="hint")
    simulation = Simulation("lalb", catalogue, trace, config)
    simulation.run()
    assert any(r.evict_first for r in simulation.done)
