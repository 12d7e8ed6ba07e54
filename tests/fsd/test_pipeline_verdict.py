"""``bench/fsd-pipeline.py``: the pipeline hold's per-round ratios and the 95% t verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_support import load_bench

ROOT = Path(__file__).resolve().parents[2]
pipeline = load_bench(ROOT / "bench" / "fsd-pipeline.py", name="fsd_pipeline_verdict")


def _row(round_: int, shards: int, link: str, rps: float, *, batching: bool) -> dict[str, Any]:
    return {"round": round_, "shards": shards, "link": link, "throughput_rps": rps,
            "batching": batching}  # fmt: skip


def test_each_ratio_is_over_the_same_rounds_n1_in_the_same_mode() -> None:
    rows = [
        _row(0, 1, "unsplit", 100.0, batching=True),
        _row(0, 1, "unsplit", 50.0, batching=False),
        _row(0, 2, "layer", 150.0, batching=True),
        _row(0, 2, "layer", 150.0, batching=False),
        _row(1, 1, "unsplit", 200.0, batching=True),
        _row(1, 2, "layer", 100.0, batching=True),
        _row(2, 2, "layer", 100.0, batching=True),  # no N = 1 in round 2: left out
    ]
    assert pipeline.ratios(rows) == {"2-layer-shared": [1.5, 0.5], "2-layer-single": [3.0]}


def test_the_goal_is_met_only_by_the_lower_end_of_the_interval() -> None:
    high = pipeline.verdict([1.7, 1.8, 1.9, 2.0], goal=1.6)
    assert high["met"] and high["lower"] >= 1.6
    spread = pipeline.verdict([1.2, 1.9, 2.4, 1.7], goal=1.6)  # mean 1.8, lower under 1.6
    assert spread["mean"] == pytest.approx(1.8)
    assert spread["lower"] < 1.6 and not spread["met"]
    assert not pipeline.verdict([2.0], goal=1.6)["met"]  # one round: no interval
