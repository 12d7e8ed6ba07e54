"""Which warm requests are slower with prefetching on, and why: the raw data of live pairs.

``bench/predict_live.py --raw FILE`` appends, per run, every request (when it was sent, its
latency, hit or miss, its forward pass's milliseconds, its batch) and the nodes' prefetches
(started, loaded or preempted, from the cluster's log). Both runs of a pair replay the same
trace, so request ``i`` of the run with prefetching (``ours``) and request ``i`` of the run
without (``ours-noprefetch``) are the same request. Per pair this prints, over the requests
after the warm-up that were warm in both runs:

* the warm p99 of each run (as the benchmark computes it: over each run's own warm requests);
* the paired ratios ``latency on / latency off`` (median, p90): a whole-run drift (the machine)
  moves the median, a local effect (a prefetch) only the requests it meets;
* the requests whose time in the system overlapped a prefetch's load (from its start to its
  end, plus ``--margin-ms``): how many, their paired ratio, and their share of the slowest 1%;
* the warm p99 of the run with prefetching with those requests left out (what the p99 would be
  if the prefetches had delayed nobody), over the run without.

With ``--within`` it compares each run with prefetching **with itself** (no pair, so no
run-to-run drift): its warm requests (as above, after the warm-up) are *overlapped* when their
time in the system meets a prefetch load's window on any node (the log names the device, not
the node, and the nodes share the box's cores), else *clean*. Per run: ``n`` warm, ``k``
overlapped, ``r = p99(all warm) / p99(clean)`` (what the overlapped requests did to the tail)
and ``bound``, the worst case whatever the overlapped requests' latencies: with ``k`` of ``n``
contaminated, ``np.percentile(all, 99)`` is at most the clean set's quantile at rank
``0.99 (n - 1)`` of ``n - k - 1`` (about ``0.99 + k/n``), over the clean p99. Then the mean and
95% Student t interval of both over the runs (``sim.sweep.t95_exact``).

    python bench/predict-warm.py bench/predict-live-raw-s12.jsonl
    python bench/predict-warm.py RAW --within --margin-ms 5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim.sweep import t95_exact

WARMUP_FRACTION = 0.1  # bench/predict_live.py's


def windows(prefetches: list[list[Any]], *, margin_s: float) -> list[tuple[float, float]]:
    """Each prefetch's load, ``(start, end + margin)`` in epoch seconds; a started load with no
    end line lasts to its next line or ``margin_s``."""
    out: list[tuple[float, float]] = []
    open_at: dict[tuple[str, str], float] = {}
    for when, model, device, event, ms in sorted(prefetches, key=lambda e: e[0]):
        key = (model, device)
        if event == "started":
            open_at[key] = when
        elif key in open_at:
            start = open_at.pop(key)
            end = start + ms / 1e3 if event == "loaded" and ms is not None else when
            out.append((start, end + margin_s))
    out += [(start, start + margin_s) for start in open_at.values()]
    return sorted(out)


def overlaps(sent: float, latency_ms: float, spans: list[tuple[float, float]]) -> bool:
    end = sent + latency_ms / 1e3
    return any(a < end and sent < b for a, b in spans)


def pair_report(on: dict[str, Any], off: dict[str, Any], *, margin_s: float) -> dict[str, Any]:
    n = len(on["requests"])
    skip = int(n * WARMUP_FRACTION)
    spans = windows(on["prefetches"], margin_s=margin_s)
    on_warm = [r for r in on["requests"][skip:] if r is not None and r[3]]
    off_warm = [r for r in off["requests"][skip:] if r is not None and r[3]]
    both = [
        (a, b)
        for a, b in zip(on["requests"][skip:], off["requests"][skip:], strict=True)
        if a is not None and b is not None and a[3] and b[3]
    ]
    ratio = np.asarray([a[2] / b[2] for a, b in both])
    hit = [overlaps(a[0], a[2], spans) for a, _ in both]
    met = ratio[np.asarray(hit, dtype=bool)] if any(hit) else np.zeros(0)
    p99_on = float(np.percentile([r[2] for r in on_warm], 99))
    p99_off = float(np.percentile([r[2] for r in off_warm], 99))
    slow = sorted(on_warm, key=lambda r: r[2])[-max(1, len(on_warm) // 100) :]
    slow_met = sum(overlaps(r[0], r[2], spans) for r in slow)
    untouched = [r[2] for r in on_warm if not overlaps(r[0], r[2], spans)]
    compute_on = [r[4] for r in slow if r[4] is not None]
    return {
        "seed": on["seed"],
        "repetition": on["repetition"],
        "prefetch_loads": len(spans),
        "prefetch_ms": [round((b - a - margin_s) * 1e3, 1) for a, b in spans],
        "warm_p99_on_ms": p99_on,
        "warm_p99_off_ms": p99_off,
        "warm_p99_ratio": p99_on / p99_off,
        "warm_both": len(both),
        "paired_ratio_median": float(np.median(ratio)),
        "paired_ratio_p90": float(np.percentile(ratio, 90)),
        "met_prefetch": len(met),
        "met_ratio_median": float(np.median(met)) if len(met) else None,
        "slowest_1pct": len(slow),
        "slowest_1pct_met_prefetch": int(slow_met),
        "slowest_1pct_compute_ms_median": float(np.median(compute_on)) if compute_on else None,
        "warm_p99_on_without_met_ms": float(np.percentile(untouched, 99)),
        "warm_p99_ratio_without_met": float(np.percentile(untouched, 99)) / p99_off,
    }


def split_warm(run: dict[str, Any], *, margin_s: float) -> tuple[list[float], list[float]]:
    """A run's warm requests after the warm-up, their latencies (ms) split into those that
    overlapped a prefetch load's window (on any node) and the clean ones."""
    requests = run["requests"]
    skip = int(len(requests) * WARMUP_FRACTION)
    spans = windows(run["prefetches"], margin_s=margin_s)
    overlapped: list[float] = []
    clean: list[float] = []
    for r in requests[skip:]:
        if r is not None and r[3]:
            (overlapped if overlaps(r[0], r[2], spans) else clean).append(r[2])
    return overlapped, clean


def contaminated_p99_bound(clean: list[float], k: int) -> float:
    """The largest ``np.percentile(all, 99)`` can be when ``all`` is ``clean`` plus any ``k``
    values: every one of the ``k`` above the clean set puts the all-requests p99 at the clean
    set's rank ``0.99 (n - 1)`` (``n = len(clean) + k``); past the clean set's last rank it is
    unbounded (inf)."""
    n, m = len(clean) + k, len(clean)
    if m == 0:
        return math.inf
    position = 0.99 * (n - 1)  # numpy's linear rule: the p99 sits at this 0-based rank
    if position > m - 1:
        return math.inf
    return float(np.percentile(clean, 100 * position / (m - 1))) if m > 1 else clean[0]


def within_report(run: dict[str, Any], *, margin_s: float) -> dict[str, Any]:
    """One run with prefetching against itself: the warm p99 of all its warm requests over that
    of the clean ones, and the worst-case bound (:func:`contaminated_p99_bound`)."""
    overlapped, clean = split_warm(run, margin_s=margin_s)
    if not clean:
        raise ValueError(f"seed {run['seed']}: no clean warm request to compare with")
    p99_all = float(np.percentile(overlapped + clean, 99))
    p99_clean = float(np.percentile(clean, 99))
    n, k = len(overlapped) + len(clean), len(overlapped)
    return {
        "seed": run["seed"],
        "repetition": run["repetition"],
        "prefetch_loads": len(windows(run["prefetches"], margin_s=margin_s)),
        "warm": n,
        "overlapped": k,
        "overlapped_fraction": k / n,
        "warm_p99_ms": p99_all,
        "clean_p99_ms": p99_clean,
        "ratio": p99_all / p99_clean,
        "bound": contaminated_p99_bound(clean, k) / p99_clean,
        "overlapped_median_ms": float(np.median(overlapped)) if overlapped else None,
        "clean_median_ms": float(np.median(clean)),
    }


def over_runs(values: list[float]) -> dict[str, float | int]:
    """Mean, 95% Student t half-width and upper end over runs (half-width NaN for one run;
    all three inf when a run's value is: a worst-case bound that does not exist)."""
    if not all(math.isfinite(v) for v in values):
        return {"n": len(values), "mean": math.inf, "ci95": math.inf, "upper": math.inf}
    mean = statistics.fmean(values)
    half = (
        t95_exact(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
        if len(values) > 1
        else math.nan
    )
    return {"n": len(values), "mean": mean, "ci95": half, "upper": mean + half}


def reports(lines: list[dict[str, Any]], *, margin_s: float) -> list[dict[str, Any]]:
    """One report per pair; runs are told apart by seed, repetition and ``hold`` (a label
    added to the lines of one quiet hold, when several holds share a file)."""
    runs = {(r.get("hold", ""), r["seed"], r["repetition"], r["label"]): r for r in lines}
    out = []
    for (hold, seed, repetition, label), on in sorted(runs.items()):
        off = runs.get((hold, seed, repetition, "ours-noprefetch"))
        if label == "ours" and off is not None:
            out.append({"hold": hold, **pair_report(on, off, margin_s=margin_s)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("raw", type=Path, help="bench/predict_live.py --raw output")
    p.add_argument("--margin-ms", type=float, default=0.0, help="added to each prefetch's end")
    p.add_argument("--within", action="store_true", help="each run with prefetching against itself")
    args = p.parse_args(argv)
    lines = [json.loads(x) for x in args.raw.read_text().splitlines() if x.strip()]
    if not args.within:
        for row in reports(lines, margin_s=args.margin_ms / 1e3):
            print(json.dumps(row))
        return 0
    rows = [
        within_report(run, margin_s=args.margin_ms / 1e3) for run in lines if run["label"] == "ours"
    ]
    for row in rows:
        print(json.dumps(row))
    if rows:
        print(json.dumps({key: over_runs([r[key] for r in rows]) for key in ("ratio", "bound")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
