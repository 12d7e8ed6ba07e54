"""The pre-registered verdict of a fresh-seed confirmation run by ``bench/predict-bracket.py``:
per seed, a family of ours' cold-start ratio over each reference's at the reference's device
memory-time (``predict._against``: interpolated between bracketing prices, never
extrapolated), the mean and the exact-t 95% interval over the seeds (``sim.sweep.t95_exact``),
and the verdict against the goal (met = upper end <= goal; a seed without a bracket is left
out of the mean and counted as not met). Secondary, deciding nothing: the pooled estimator,
ours' interpolated cold starts summed over the seeds over the reference's (so each seed
weighs by its own cold starts), with a seed bootstrap's percentile interval.

    python bench/predict-confirm.py bench/predict-confirm-s14.json --family ours-f1
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict  # bench/predict.py, found through the path above
from sim.sweep import t95_exact

GOALS = {"lru+ka-10min": 0.5, "hybrid": 0.8}


def seed_rows(
    runs: Sequence[Mapping[str, Any]], family: str, reference: str
) -> list[dict[str, Any]]:
    """Per seed: ours' interpolated cold-start ratio at the reference's memory-time (None
    without a bracket), the reference's, and the seed's requests."""
    by_seed: dict[int, dict[str, Mapping[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(int(r["seed"]), {})[str(r["label"])] = r
    out = []
    for seed, labels in sorted(by_seed.items()):
        if reference not in labels:
            continue
        ref = labels[reference]
        curves = predict._curves(
            {
                label: (float(r["device_gb_s"]), float(r["cold_start_ratio"]))
                for label, r in labels.items()
            }
        )
        points = curves.get(family, []) if family.startswith("ours") else []
        x, base = float(ref["device_gb_s"]), float(ref["cold_start_ratio"])
        ours = predict._interpolate(points, x) if points else None
        out.append(
            {
                "seed": seed,
                "ours": ours,
                "reference": base,
                "ratio": ours / base if ours is not None and base > 0 else None,
                "requests": int(ref["requests"]),
            }
        )
    return out


def exact_interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, exact-t 95% half-width and upper end (None below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "half": None, "upper": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "half": None, "upper": None}
    half = t95_exact(n) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "half": half, "upper": mean + half}


def pooled(rows: Sequence[Mapping[str, Any]], *, resamples: int, seed: int) -> dict[str, Any]:
    """Total cold starts of ours over the reference's, over the seeds with a bracket, and the
    2.5-97.5 percentile interval of a bootstrap over those seeds (``resamples`` draws with
    replacement, generator seeded ``seed``)."""
    usable = [r for r in rows if r["ours"] is not None]
    if not usable:
        return {"ratio": None, "low": None, "high": None, "seeds": 0}
    ours = np.array([r["ours"] * r["requests"] for r in usable])
    base = np.array([r["reference"] * r["requests"] for r in usable])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(usable), size=(resamples, len(usable)))
    totals = base[draws].sum(axis=1)
    ratios = ours[draws].sum(axis=1)[totals > 0] / totals[totals > 0]
    low, high = np.percentile(ratios, [2.5, 97.5]) if len(ratios) else (math.nan, math.nan)
    return {
        "ratio": float(ours.sum() / base.sum()) if base.sum() > 0 else None,
        "low": float(low),
        "high": float(high),
        "seeds": len(usable),
        "ours_cold": float(ours.sum()),
        "reference_cold": float(base.sum()),
    }


def verdict(
    runs: Sequence[Mapping[str, Any]], family: str, *, resamples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Every reference's per-seed ratios, the primary interval and verdict, and the pooled
    secondary estimate."""
    out: dict[str, Any] = {}
    for reference, goal in GOALS.items():
        rows = seed_rows(runs, family, reference)
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        primary = exact_interval(ratios)
        upper = primary["upper"]
        out[reference] = {
            "goal": goal,
            "seeds": rows,
            "unbracketed": [r["seed"] for r in rows if r["ratio"] is None],
            "at_or_under_goal": sum(1 for x in ratios if x <= goal),
            "primary": primary,
            "met": upper is not None and upper <= goal and len(ratios) == len(rows),
            "pooled": pooled(rows, resamples=resamples, seed=seed),
        }
    return out


def _markdown(result: Mapping[str, Any]) -> str:
    lines = []
    for reference, r in result.items():
        p, q = r["primary"], r["pooled"]
        per_seed = ", ".join(
            f"{row['seed']}: {'-' if row['ratio'] is None else format(row['ratio'], '.3f')}"
            for row in r["seeds"]
        )
        half = "-" if p["half"] is None else f"{p['half']:.3f}"
        upper = "-" if p["upper"] is None else f"{p['upper']:.4f}"
        mean = "-" if p["mean"] is None else f"{p['mean']:.3f}"
        lines.append(
            f"- vs {reference} (goal <= {r['goal']}): {mean}x ± {half} (exact t, n = {p['n']}), "
            f"upper {upper}: {'met' if r['met'] else 'not met'}; {r['at_or_under_goal']} of "
            f"{len(r['seeds'])} seeds at or under the goal; unbracketed {r['unbracketed']}"
        )
        if q["ratio"] is not None:
            lines.append(
                f"  - pooled (secondary): {q['ratio']:.3f}x (bootstrap 95% {q['low']:.3f}-"
                f"{q['high']:.3f}; {q['ours_cold']:.0f} against {q['reference_cold']:.0f} cold "
                f"starts over {q['seeds']} seeds)"
            )
        lines.append(f"  - per seed: {per_seed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench/predict-bracket.py --json files")
    p.add_argument("--family", default="ours", help="predict.family of ours' labels")
    p.add_argument("--seeds", default="", help="only these seeds (comma-separated)")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--out", help="write the verdict here (JSON)")
    args = p.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for name in args.json:
        runs += json.loads(Path(name).read_text())["runs"]
    if args.seeds:
        wanted = {int(s) for s in args.seeds.split(",") if s.strip()}
        runs = [r for r in runs if int(r["seed"]) in wanted]
    unique = {(r["seed"], r["label"]): r for r in runs}  # a resumed file repeats nothing
    result = verdict(list(unique.values()), args.family, resamples=args.resamples)
    print(_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
