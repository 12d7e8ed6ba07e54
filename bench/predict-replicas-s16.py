"""Read the sixteenth session's replica check (bench/predict-replicas-s16.sh; bench/RESULTS.md #13,
"predict, sixteenth session"): one row per run, per arm (1 gateway, 2 replicas of this tree, 2
replicas of main 89a453d, each planning alone).

Per run: requests measured and errors; the cold ratio (client-side, the trace's weights, and
unweighted); the nodes' prefetches by outcome and their total (every prefetch a node was sent);
demotions; prefetch precision at the nodes (used / loaded); and **doubles**: prefetch starts of
one model that follow another start of the same model by under ``--window`` wall seconds (1 s,
about six of the policy's 5-s ticks at 30x), from the cluster log's prefetch lines (``--raw``).

    python bench/predict-replicas-s16.py            # the committed files
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ARMS = ("1", "2", "base2")


def doubles(prefetches: list[list[Any]], *, window_s: float) -> int:
    """Starts of a model within ``window_s`` of the same model's previous start."""
    last: dict[str, float] = {}
    count = 0
    for when, model, _device, event, _ms in sorted(prefetches, key=lambda p: p[0]):
        if event != "started":
            continue
        if model in last and when - last[model] < window_s:
            count += 1
        last[model] = when
    return count


def rows(folder: Path, *, window_s: float) -> list[dict[str, Any]]:
    out = []
    for arm in ARMS:
        runs = folder / f"predict-live-s16-{arm}.json"
        raws = folder / f"predict-live-raw-s16-{arm}.jsonl"
        if not runs.exists():
            continue
        raw_by_seed = {}
        if raws.exists():
            for line in raws.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    raw_by_seed[record["seed"]] = record
        for line in runs.read_text().splitlines():
            if not line.strip():
                continue
            run = json.loads(line)
            setup = run["_setup"]
            row = next(v for k, v in run.items() if not k.startswith("_"))
            outcomes = row["prefetch_outcomes"]
            raw = raw_by_seed.get(setup["seed"])
            out.append(
                {
                    "seed": setup["seed"],
                    "arm": arm,
                    "gateways": setup.get("gateways", 1),
                    "requests": row["requests"],
                    "errors": row["errors"],
                    "cold_ratio": row["cold_ratio"],
                    "cold_unweighted": row["cold_ratio_unweighted"],
                    "prefetches": sum(outcomes.values()),
                    "outcomes": outcomes,
                    "demotions": row["demotions"],
                    "precision": row["prefetch_precision"],
                    "doubles": None
                    if raw is None
                    else doubles(raw["prefetches"], window_s=window_s),
                    "started": setup["started"],
                }
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--window", type=float, default=1.0, help="doubles' window, wall seconds")
    args = p.parse_args()
    print(
        "| seed | arm | requests | errors | cold ratio (weighted / unweighted) | prefetches sent "
        "to nodes | outcomes | doubles | demotions | precision |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows(args.folder, window_s=args.window), key=lambda r: (r["seed"], r["arm"])):
        outcomes = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["outcomes"].items()) if v)
        print(
            f"| {r['seed']} | {r['arm']} | {r['requests']} | {r['errors']} | "
            f"{r['cold_ratio']:.4f} / {r['cold_unweighted']:.4f} | {r['prefetches']:.0f} | "
            f"{outcomes or '-'} | {r['doubles']} | {r['demotions']:.0f} | {r['precision']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
