"""The live replay's run order (``bench/predict_live.py``): the first run of a quiet-lock hold
is slower whatever it runs, so the A/B pairs alternate which policy goes first, by repetition
and by seed, and the aggregate reports each pair's ratio with the policy that went first."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from predict_live import aggregate, run_order  # noqa: E402

PAIR = ["ours", "ours-noprefetch"]


def test_each_repetition_reverses_the_order_and_odd_seeds_start_reversed() -> None:
    assert run_order(PAIR, seed=4, pairs=2) == [
        (0, "ours"),
        (0, "ours-noprefetch"),
        (1, "ours-noprefetch"),
        (1, "ours"),
    ]
    assert [label for _, label in run_order(PAIR, seed=3, pairs=1)] == PAIR[::-1]


def _row(warm_p99: float, repetition: int, position: int) -> dict[str, float]:
    return {
        "cold_ratio": 0.01,
        "device_gb_s_mapped": 1.0,
        "host_gb_s_mapped": 1.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "warm_p99_ms": warm_p99,
        "prefetch_precision": 1.0,
        "repetition": repetition,
        "position": position,
    }


def test_the_aggregate_reports_every_pair_and_which_went_first() -> None:
    alternating = {
        "_setup": {"seed": 4, "started": "t"},
        "ours#0": _row(11.0, 0, 0),
        "ours-noprefetch#0": _row(10.0, 0, 1),
        "ours-noprefetch#1": _row(10.0, 1, 2),
        "ours#1": _row(9.0, 1, 3),
    }
    # a line written before runs had positions: the order of its keys is the run order
    older = {"_setup": {"seed": 3}, "ours-noprefetch": _row(8.0, 0, 0), "ours": _row(8.8, 0, 1)}
    for row in older.values():
        row.pop("position", None)  # type: ignore[attr-defined]
    text = aggregate([alternating, older])
    assert "seed 4 (ours first): 1.100" in text
    assert "seed 4 (noprefetch first): 0.900" in text
    assert "seed 3 (noprefetch first): 1.100" in text
    assert "over the pairs: 1.033" in text
