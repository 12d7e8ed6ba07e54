"""The scale-out bench's summary of rounds (``bench/lalb.py --summarise``): the pooled miss
ratio and its bootstrap interval, and the table built from ``--json`` results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
try:
    from sim.scaleout import pooled_ratio_interval, summarise
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
