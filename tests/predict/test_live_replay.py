"""The live replay (``bench/predict_live.py``) end to end against a real ``gpufaas up``: a
periodic function replayed with time compressed 90x under Azure's hybrid histogram, which
unloads the model after each request and pre-warms it before the next one. With the gateway's
prefetches its arrivals are warm hits, counted as used at the node; with the prefetches turned off
(``--prefetch-demote-only``, the control) the same arrivals are cold starts."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from predict_live import build_models, cluster, replay, write_functions  # noqa: E402

TIME_SCALE = 90.0  # trace seconds per wall second: one arrival a wall second
PERIOD_S = 90.0  # in trace seconds: idle times fall in the histogram's 1-2 minute bin
ARRIVALS = 14  # the hybrid histogram needs 5 idle times before it leaves its fallback
CHECKED = 4  # the last arrivals, once the histogram is representative


def _replay(tmp_path: Path, *extra: str) -> tuple[list[dict[str, Any]], Counter[str]]:
    models = build_models(tmp_path / "models", [32])
    (name,) = write_functions(tmp_path / "functions", models)
    tail = [
        "--nodes", "1", "--cpu-devices", "1", "--device-memory", "1Mi",
        "--functions", str(tmp_path / "functions"),
        "--prefetch", "hybrid", "--prefetch-time-scale", str(TIME_SCALE), *extra,
    ]  # fmt: skip
    wall = [i * PERIOD_S / TIME_SCALE for i in range(ARRIVALS)]
    with cluster(tail, home=tmp_path / "home", log=tmp_path / "up.log", functions=1) as url:
        results, _, at_end = asyncio.run(
            replay(url, names=[name] * ARRIVALS, arrivals_s=wall, mark_s=0.0, max_seconds=60.0)
        )
    return results, at_end


def test_a_prefetch_ahead_of_a_predicted_arrival_makes_it_a_warm_hit(tmp_path: Path) -> None:
    results, counters = _replay(tmp_path)
    assert all(r.get("status") == 200 for r in results), results
    assert [r["hit"] for r in results[-CHECKED:]] == [True] * CHECKED
    # the node demoted it after each request and loaded it back ahead of the next
    assert counters["gpufaas_manager_demotions_total"] >= CHECKED
    assert counters["gpufaas_manager_prefetch_total{result=loaded}"] >= CHECKED
    assert counters["gpufaas_manager_prefetch_used_total"] >= CHECKED
    assert counters["gpufaas_device_tier_gb_seconds_total"] > 0
    assert counters["gpufaas_host_tier_gb_seconds_total"] > 0


def test_without_the_prefetches_the_same_arrivals_are_cold_starts(tmp_path: Path) -> None:
    results, counters = _replay(tmp_path, "--prefetch-demote-only")
    assert all(r.get("status") == 200 for r in results), results
    assert [r["hit"] for r in results[-CHECKED:]] == [False] * CHECKED
    assert counters["gpufaas_manager_demotions_total"] >= CHECKED
    assert counters["gpufaas_manager_prefetch_total{result=loaded}"] == 0
    assert counters["gpufaas_cold_starts_total{source=host}"] >= CHECKED
