"""The scheduler's results as curves: every policy over the arrival rate, several seeds, intervals.

One *cell* is one simulator run of every policy on one trace (``bench/lalb.py``'s ``sim_point``)
at a (row, rate, seed). A *row* fixes what the GPU managers do:

- ``lru``: every policy's managers evict plain LRU (the effect of routing alone);
- ``hint``: every policy's managers evict the cheapest expected reloads first (LALB's own
  victims; LB, which names none, gets the same value rule at the device);
- ``host-tier``: ``hint`` with the host tier on (profile ``<profile>-host-tier``: a miss is a
  host -> device copy), over its own rates, as misses are about ten times cheaper.

Per (row, rate) it reports LB's measured utilisation (the busiest copy engine and the busiest
compute engine), and for each policy the mean and p99 latency, the miss ratio, the cuts
against LB (taken per seed, on the same trace, then averaged) and the miss ratio as a multiple
of the two offline references (``bench/sim/belady.py``); each as the mean over seeds with a 95%
Student-t interval. The catalogue's kind order is part of the workload and stays fixed
(``catalogue_seed``); the seeds vary the arrivals, the picks, the noise and the tie-breaks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

POLICIES = ("lb", "lalb", "lalb-o3")
METRICS = (
    "mean_ms",
    "p99_ms",
    "miss_ratio",
    "mean_cut_pct",
    "miss_cut_pct",
    "miss_x_pooled_min",
    "miss_x_placement_min",
)
# Two-sided 95% Student-t quantiles by degrees of freedom (no scipy in the venv).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip

# The headline bands of LB's busiest copy engine (issue #12): loaded, and at most half busy.
BANDS = {"70-80% busy": (0.70, 0.80), "<= 50% busy": (0.0, 0.50)}


@dataclass(frozen=True)
class Row:
    name: str
    profile: str
    eviction: str
    rates: tuple[float, ...]


@dataclass(frozen=True)
class Cell:
    row: str
    rate: float
    seed: int


def t95(n: int) -> float:
    """The two-sided 95% Student-t quantile for ``n`` samples (``n - 1`` degrees of freedom)."""
    df = n - 1
    if df < 1:
        return math.nan
    known = [d for d in _T95 if d <= df]
    return _T95[max(known)] if df <= 30 else 1.96


# Every degree of freedom 1-30, to three decimals (standard tables). ``t95`` keeps the sparse
# table above, which every published interval used; new figures that say so use this one.
_T95_EXACT = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
              2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
              2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t95_exact(n: int) -> float:
    """The two-sided 95% Student-t quantile for ``n`` samples, for every ``n - 1`` up to 30 (the
    normal's 1.96 beyond; NaN below 2 samples)."""
    df = n - 1
    if df < 1:
        return math.nan
    return _T95_EXACT[df - 1] if df <= len(_T95_EXACT) else 1.96


def interval(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and 95% half-width (Student t) of the values that are not None."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    mean = statistics.fmean(xs)
    half = t95(len(xs)) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return {"mean": mean, "ci95": half, "n": len(xs)}


def cells(rows: Sequence[Row], seeds: Sequence[int]) -> list[Cell]:
    return [Cell(row.name, rate, seed) for row in rows for rate in row.rates for seed in seeds]


def run_cells(
    run_one: Callable[[Cell], dict[str, Any]], todo: Sequence[Cell], *, jobs: int
) -> list[dict[str, Any]]:
    """``run_one`` over every cell, in ``jobs`` forked processes (1: in this one)."""
    if jobs <= 1:
        return [run_one(cell) for cell in todo]
    with get_context("fork").Pool(jobs) as pool:
        return pool.map(run_one, todo, chunksize=1)


def aggregate(
    rows: Sequence[Row], todo: Sequence[Cell], points: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One summary per (row, rate): LB's utilisation and every policy's metrics, mean +- 95%."""
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for cell, point in zip(todo, points, strict=True):
        by_key.setdefault((cell.row, cell.rate), []).append(point)
    out = []
    for row in rows:
        for rate in row.rates:
            runs = by_key.get((row.name, rate), [])
            if not runs:
                continue
            summary: dict[str, Any] = {
                "row": row.name,
                "profile": row.profile,
                "eviction": row.eviction,
                "rate_per_s": rate,
                "seeds": len(runs),
                "lb_copy_utilisation": interval([r["lb"]["copy_utilisation"] for r in runs]),
                "lb_compute_utilisation": interval([r["lb"]["compute_utilisation"] for r in runs]),
                "pooled_min_miss_ratio": interval([r["belady"]["miss_ratio"] for r in runs]),
                "policies": {},
            }
            for policy in POLICIES:
                if not all(policy in r for r in runs):
                    continue
                summary["policies"][policy] = {
                    metric: interval([_metric(r, policy, metric) for r in runs])
                    for metric in METRICS
                }
            out.append(summary)
    return out


def _metric(point: dict[str, Any], policy: str, metric: str) -> float | None:
    if metric in ("mean_cut_pct", "miss_cut_pct"):
        if policy == "lb":
            return None
        base = point["lb"]["mean_ms" if metric == "mean_cut_pct" else "miss_ratio"]
        value = point[policy]["mean_ms" if metric == "mean_cut_pct" else "miss_ratio"]
        return 100.0 * (1 - value / base) if base > 0 else None
    value = point[policy].get(metric)
    return None if value is None else float(value)


def headline(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row and band, the rates whose mean LB copy-engine utilisation falls in the band."""
    out = []
    for summary in summaries:
        busy = summary["lb_copy_utilisation"]["mean"]
        for band, (low, high) in BANDS.items():
            if busy is not None and low <= busy <= high:
                out.append({"band": band, **summary})
    return out


# -- reporting -------------------------------------------------------------------------------------


def fmt(value: dict[str, Any], *, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    mean, half = value.get("mean"), value.get("ci95")
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if half is not None and math.isfinite(half):
        text += f" ± {half * scale:.{digits}f}"
    return text + unit


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """A table per row: one line per (rate, policy)."""
    blocks = []
    header = (
        "| rate /s | LB copy busy | LB compute busy | policy | mean ms | p99 ms | miss ratio"
        " | mean cut vs LB | miss cut vs LB | miss / pooled MIN | miss / per-device MIN |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for row in dict.fromkeys(s["row"] for s in summaries):
        lines = [f"Row `{row}`:", "", header]
        for s in (x for x in summaries if x["row"] == row):
            first = True
            for policy, m in s["policies"].items():
                lead = (
                    f"| {s['rate_per_s']:g} | {fmt(s['lb_copy_utilisation'], scale=100, unit='%')}"
                    f" | {fmt(s['lb_compute_utilisation'], scale=100, unit='%')}"
                    if first
                    else "| | | "
                )
                first = False
                lines.append(
                    f"{lead} | {policy} | {fmt(m['mean_ms'], digits=_digits(m['mean_ms']))}"
                    f" | {fmt(m['p99_ms'], digits=0)} | {fmt(m['miss_ratio'], digits=3)}"
                    f" | {fmt(m['mean_cut_pct'], unit='%')} | {fmt(m['miss_cut_pct'], unit='%')}"
                    f" | {fmt(m['miss_x_pooled_min'], digits=2, unit='x')}"
                    f" | {fmt(m['miss_x_placement_min'], digits=2, unit='x')} |"
                )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _digits(value: dict[str, Any]) -> int:
    mean = value.get("mean")
    return 0 if mean is not None and abs(mean) >= 1000 else 1 if mean and abs(mean) >= 10 else 2


def headline_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    header = (
        "| band (LB copy engine) | row | rate /s | LB copy busy | policy | mean cut vs LB"
        " | miss cut vs LB | paper (LALB / LALB+O3) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    paper = {"lalb": "79.43% / 65.21%", "lalb-o3": "96.93% / 81.16%"}
    lines = [header]
    for h in headline(summaries):
        for policy in ("lalb", "lalb-o3"):
            m = h["policies"].get(policy)
            if m is None:
                continue
            lines.append(
                f"| {h['band']} | {h['row']} | {h['rate_per_s']:g}"
                f" | {fmt(h['lb_copy_utilisation'], scale=100, unit='%')} | {policy}"
                f" | {fmt(m['mean_cut_pct'], unit='%')} | {fmt(m['miss_cut_pct'], unit='%')}"
                f" | {paper[policy]} |"
            )
    return "\n".join(lines)


def plot(summaries: Sequence[dict[str, Any]], path: Any, *, title: str) -> None:
    """Per row: mean latency and miss ratio against LB's copy-engine utilisation, with 95%
    intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(s["row"] for s in summaries))
    fig, axes = plt.subplots(2, len(rows), figsize=(5 * len(rows), 7), squeeze=False)
    for col, row in enumerate(rows):
        points = [s for s in summaries if s["row"] == row]
        x = [100 * (s["lb_copy_utilisation"]["mean"] or 0) for s in points]
        for policy in POLICIES:
            if not all(policy in s["policies"] for s in points):
                continue
            for ax, metric in ((axes[0][col], "mean_ms"), (axes[1][col], "miss_ratio")):
                ys = [s["policies"][policy][metric] for s in points]
                ax.errorbar(
                    x,
                    [y["mean"] for y in ys],
                    yerr=[y["ci95"] if y["ci95"] == y["ci95"] else 0 for y in ys],
                    marker="o",
                    capsize=3,
                    label=policy,
                )
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"row {row}")
        axes[0][col].set_ylabel("mean latency (ms, log)")
        axes[1][col].set_ylabel("miss ratio")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("LB's busiest copy engine (% busy)")
            ax.axvspan(70, 80, color="gray", alpha=0.15)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
