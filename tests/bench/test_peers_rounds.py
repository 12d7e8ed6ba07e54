"""The peer goal run's rounds (``bench/peers/run.py --goals --rounds N``): the order the systems
run in, the figures and ratios over rounds, the goal table's ranges and the batch-size counts.
No servers: the pure parts, loaded by path (``bench/`` is not an installed package)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from bench_support import load_bench

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers"


workload = load_bench(PEERS / "workload.py", name="gpufaas_bench_peers_workload_rounds")
run = load_bench(PEERS / "run.py", name="gpufaas_bench_peers_run")


def _goals_plan(rounds: int, ray_rounds: int = 1) -> object:
    args = argparse.Namespace(
        families=["tiny-mlp", "small-cnn"], systems=["gpufaas", "ray", "triton"], concurrency=8,
        zipf_s=1.1, seed=0, models_dir=Path("m"), out=Path("o"), profile=False,
        torch_threads=1, rounds=rounds, ray_rounds=ray_rounds,
    )  # fmt: skip
    return run.Plan.goals_plan(args)


def test_rounds_alternate_the_order_and_run_ray_in_the_middle_round_only() -> None:
    plan = _goals_plan(3)
    order = run.schedule(plan)
    firsts = {}
    for r, family, system in order:
        firsts.setdefault((r, family), system)
    # every other round and family the order is reversed: no system always goes first
    assert firsts[(0, "tiny-mlp")] == "gpufaas" and firsts[(1, "tiny-mlp")] == "triton"
    assert firsts[(0, "small-cnn")] == "triton" and firsts[(2, "tiny-mlp")] == "gpufaas"
    ray = [(r, family) for r, family, system in order if system == "ray"]
    assert ray == [(1, "tiny-mlp"), (1, "small-cnn")]
    for system in ("gpufaas", "triton"):
        assert sum(s == system for _, _, s in order) == 3 * 2
    # the one-round run's requests, shared out over the rounds
    assert (plan.warm_requests, plan.loaded_requests, plan.batched_requests) == (334, 667, 1667)
    # one round: Ray runs in it, and the second family still goes in reverse
    assert [s for _, _, s in run.schedule(_goals_plan(1))] == [
        "gpufaas", "ray", "triton", "triton", "ray", "gpufaas",
    ]  # fmt: skip


def test_a_round_ratio_pairs_rounds_run_together_else_takes_the_peers_median() -> None:
    assert workload.round_ratios([2.0, 4.0, 3.0], [1.0, 2.0, 3.0]) == [2.0, 2.0, 1.0]
    assert workload.round_ratios([2.0, 4.0, None], [2.0]) == [1.0, 2.0]
    assert workload.median([3.0, None, 1.0, 2.0]) == 2.0
    assert workload.spread([None]) is None


def test_one_disturbed_round_shows_as_a_range_and_a_round_that_missed() -> None:
    """The harm the rounds guard against: one disturbed minute read as the result. With three
    rounds the median stays where two undisturbed rounds put it, and the table says that one
    round of three missed, with the range of the ratios."""
    rounds = {
        "gpufaas": [{"batched_throughput_rps": 1100.0}, {"batched_throughput_rps": 560.0},
                    {"batched_throughput_rps": 1080.0}],
        "triton": [{"batched_throughput_rps": 720.0}, {"batched_throughput_rps": 700.0},
                   {"batched_throughput_rps": 710.0}],
    }  # fmt: skip
    figures = {
        system: {"batched_throughput_rps": workload.median(
            [r["batched_throughput_rps"] for r in runs])}
        for system, runs in rounds.items()
    }  # fmt: skip
    rows = workload.ratio_table(figures, rounds=rounds)
    goals = {g.name: g for g in workload.check_goals(rows)}
    batched = goals["#17 batched throughput >= PyTriton's"]
    assert batched.met is True and batched.met_rounds == 2 and len(batched.rounds) == 3
    row = next(r for r in rows if r["figure"] == "batched_throughput_rps")
    table = workload.goal_table(
        {
            "tiny-mlp": {
                "figures": figures,
                "spread": {s: {row["figure"]: row["spread"][s]} for s in figures},
                "goals": [g.to_dict() for g in goals.values()],
            }
        }
    )
    assert (
        "| tiny-mlp | batched throughput >= PyTriton's | 1080 (560-1100) | 710 (700-720)"
        " | 1.52 (0.8-1.53) | >= 1 | met (2 of 3 rounds) |" in table.splitlines()
    ), table
    assert "1080 (560-1100)" in workload.format_table(rows)


def test_passes_per_batch_size_come_from_the_systems_count_or_from_each_answer() -> None:
    triton = run._executions([], {1: 10, 4: 7, 8: 3}, {1: 4, 4: 2})
    assert triton == {"1": 6, "4": 5, "8": 3}
    answers = [SimpleNamespace(ok=True, batch_size=size) for size in [1, 1, 4, 4, 4, 4, 2, 2]]
    assert run._executions(answers, None, None) == {"1": 2, "2": 1, "4": 1}
    assert run._executions([SimpleNamespace(ok=True, batch_size=None)], None, None) is None


def test_cpu_split_is_per_request_and_per_process() -> None:
    split = run._cpu_split(
        {"gpufaas.core.cli up": 3.0, "gpufaas.gpu_manager": 2.5},
        {"gpufaas.core.cli up": 1.0, "gpufaas.gpu_manager": 2.0},
        client_s=1.0,
        requests=1000,
    )
    assert split == {
        "client (load generator)": 1000.0,
        "gpufaas.core.cli up": 2000.0,
        "gpufaas.gpu_manager": 500.0,
    }
