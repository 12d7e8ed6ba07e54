"""#15's throughput goal under the pipeline (``layer``) strategy: the pre-registered verdict.

Reads a ``bench/fsd.py --cpu-split`` report (``--out``'s fsd.json) whose rounds alternate
N = 1 (unsplit) with N-shard configurations, and prints, per configuration, each round's
throughput over the same round's N = 1, the mean of those ratios and its two-sided 95%
Student-t interval (exact t, ``sim.sweep.t95_exact``), and whether the goal is met: the
interval's lower end at or above ``--goal`` (1.6: 0.8 x min(N, 2 cores)). Beside it, each
configuration's median per-request latency (one request at a time), which a pipeline does not
cut. Pure arithmetic on the file: nothing is measured here.

    python bench/fsd-pipeline.py bench/fsd-pipeline-s15.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim.sweep import t95_exact


def config_key(row: Mapping[str, Any]) -> str:
    """A configuration's name, ``N-link-mode`` (mode ``shared`` with the coordinator's passes,
    else ``single``)."""
    return f"{row['shards']}-{row['link']}-{'shared' if row['batching'] else 'single'}"


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per configuration (``N-link-mode``), each round's throughput over that round's N = 1
    run in the same mode (rounds without one are skipped)."""
    base = {(r["round"], r["batching"]): r["throughput_rps"] for r in rows if r["shards"] == 1}
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["shards"] == 1 or (r["round"], r["batching"]) not in base:
            continue
        out.setdefault(config_key(r), []).append(
            r["throughput_rps"] / base[(r["round"], r["batching"])]
        )
    return out


def verdict(values: Sequence[float], *, goal: float) -> dict[str, Any]:
    """Mean, 95% t interval and whether its lower end reaches ``goal`` (needs two rounds)."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    half = t95_exact(n) * statistics.stdev(values) / math.sqrt(n) if n >= 2 else math.nan
    lower = mean - half
    return {"n": n, "ratios": list(values), "mean": mean, "lower": lower, "upper": mean + half,
            "met": n >= 2 and lower >= goal}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--goal", type=float, default=1.6)
    args = parser.parse_args()
    rows = json.loads(args.report.read_text())["cpu_split"]
    for key, values in sorted(ratios(rows).items()):
        v = verdict(values, goal=args.goal)
        print(f"{key:<18} ratios {[round(x, 3) for x in v['ratios']]} mean {v['mean']:.3f} "
              f"95% t [{v['lower']:.3f}, {v['upper']:.3f}] -> "
              f"{'met' if v['met'] else 'not met'} (goal lower >= {args.goal})")  # fmt: skip
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(config_key(r), []).append(r)
    for key, group in sorted(by.items()):
        lat = [r["latency_ms"] for r in group if "latency_ms" in r]
        print(f"{key:<18} req/s {[round(r['throughput_rps'], 1) for r in group]} CPU/request "
              f"{statistics.fmean(r['cpu_ms'] for r in group):.1f} ms (shards "
              f"{[round(statistics.fmean(c), 1) for c in zip(*(r['shard_cpu_ms'] for r in group), strict=True)]}, "
              f"coordinator {statistics.fmean(r['coordinator_cpu_ms'] for r in group):.1f}) idle "
              f"{statistics.fmean(r['idle_ms'] for r in group):.1f} ms; latency median "
              f"{statistics.median(lat) if lat else math.nan:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
