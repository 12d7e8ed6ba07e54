"""Predictive residency: LRU + fixed keep-alive vs Azure's hybrid histogram vs ours, on orcbench.

Each seed generates an orcbench trace (``python -m orcbench trace``, offline; modelled on the
Azure Functions 2019 trace), maps its functions to model sizes (``bench/sim/trace.py``), and
replays it in the LALB simulator with a host tier (``bench/sim/residency.py``) under each
residency policy of ``gpufaas.cache.arrivals`` and parameter setting. It prints the trace's
shape against the published Azure figures, a table per setting (mean and 95% interval over the
seeds), the comparison at equal device memory-time, and writes a plot of cold starts against
memory-time (one point per policy and setting).

    python bench/predict.py                                  # the default sweep, 3 seeds
    python bench/predict.py --seeds 1 --minutes 10 --quick   # a small smoke run
    python bench/predict.py --json out.json --plot bench/predict-pareto.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim.engine import SimConfig
from sim.residency import (
    CAUSES,
    SIZE_CLASSES,
    ResidencySimulation,
    TierConfig,
    catalogue_for,
    engine_trace,
)
from sim.sweep import t95
from sim.trace import (
    ServerlessTrace,
    TraceError,
    assign_models,
    azure_tail,
    generate_orcbench,
    merge,
    shape,
    thin,
)

from gpufaas.cache.arrivals import SwitchingPolicy, make_policy

# (label, policy name, parameters, prefetch on)
SETTINGS: list[tuple[str, str, dict[str, float], bool]] = [
    ("lru+ka-1min", "keepalive", {"keepalive_s": 60}, False),
    ("lru+ka-3min", "keepalive", {"keepalive_s": 180}, False),
    ("lru+ka-5min", "keepalive", {"keepalive_s": 300}, False),
    ("lru+ka-10min", "keepalive", {"keepalive_s": 600}, False),
    ("lru+ka-20min", "keepalive", {"keepalive_s": 1200}, False),
    ("lru+ka-30min", "keepalive", {"keepalive_s": 1800}, False),
    ("hybrid", "hybrid", {}, True),
    # only a pre-warm loads a model, as published (no reload inside the keep-alive window)
    ("hybrid-asis", "hybrid", {"restore_inside": False}, True),
    ("ours-p0.001", "predictive", {"device_price": 0.001}, True),
    ("ours-p0.003", "predictive", {"device_price": 0.003}, True),
    ("ours-p0.01", "predictive", {"device_price": 0.01}, True),
    ("ours-p0.03", "predictive", {"device_price": 0.03}, True),
    ("ours-p0.1", "predictive", {"device_price": 0.1}, True),
    ("ours-p0.3", "predictive", {"device_price": 0.3}, True),
    ("ours-p1", "predictive", {"device_price": 1.0}, True),
    ("ours-p3", "predictive", {"device_price": 3.0}, True),
    # a function with under two arrivals kept as long as the hybrid's fallback (4 h)
    (
        "ours-p0.003-fb4h",
        "predictive",
        {"device_price": 0.003, "fallback_keepalive_s": 14400},
        True,
    ),
    ("ours-p0.03-fb4h", "predictive", {"device_price": 0.03, "fallback_keepalive_s": 14400}, True),
    ("ours-p0.1-noprefetch", "predictive", {"device_price": 0.1}, False),
    # without the memoryless mixture (the policy before it): ablation
    ("ours-p0.01-nosmooth", "predictive", {"device_price": 0.01, "smoothing": 0.0}, True),
    ("ours-p0.1-nosmooth", "predictive", {"device_price": 0.1, "smoothing": 0.0}, True),
    ("ours-p0.01-noprefetch", "predictive", {"device_price": 0.01}, False),
]
# Ours with parameters named in the label: ``ours-p<price>[-m<miss_ms>][-g<prior_gaps>]``
# (e.g. ``ours-p0.1-m1000-g4``), so a sweep needs no table entry; see :func:`setting_for`.
_LABEL_KEYS = {
    "p": "device_price",
    "m": "miss_ms",
    "g": "prior_gaps",
    "s": "smoothing",
    "x": "max_horizon_s",
    # -v1: evict by hit density (per byte-second held) instead of P x cost / bytes (the default,
    # kept on the tuning seeds); -r1 (the default since 2026-12-06): a copy held on k other
    # devices counts 1/(1+k), its miss and its return alike; -r0: as much as a sole one
    "v": "by_density",
    "r": "replica_share",
    # -w1: switched per function to the hybrid's decisions where they have cost less so far
    # (cache/arrivals.py: SwitchingPolicy; -w0, the default: ours alone)
    "w": "switch",
    # -k1: victims chosen as a set, by expected miss cost over the horizon counting what a
    # returning model evicts again (cache/arrivals.py: PredictivePolicy.victim_plan; -k0: the
    # order above); -e<w>: the weight of that re-eviction (default 1); -h<s>: the horizon of
    # the victims' miss probability (default: the keep rule's 30 s)
    "k": "victim_sets",
    "e": "reevict",
    "h": "evict_horizon_s",
    # -a1: the set rule's costs (re-eviction included) ranked per byte, freed in that order
    # (cost per byte freed over a stream of loads) instead of the cheapest set for one load
    "a": "amortized",
    # -i1: a returning model's re-eviction priced as the rule pays it, whole victims (the
    # cheapest cover of its bytes by the others), not a fractional cover
    "i": "whole_refill",
    # -t1 (the default since the eighth session): the keep / prefetch rule charges rent for the
    # expected time until the request (E[min(T, h)]); -t0: for the whole horizon (the rule before)
    "t": "rent_to_hit",
    # -b1 (the default since the ninth session): a victim's miss is priced by the chance of its
    # request before the loading model's next one (learned Belady; cache/arrivals.py:
    # GapHistory.next_use_times), -b0: over the fixed horizon (the rule before)
    "b": "belady",
    # -j1 (the default since the ninth session): a victim's miss also costs the requests that
    # arrive during its reload and join it (PredictivePolicy.miss_cost), -j0: one miss
    "j": "joins",
    # -d1: the keep / demote / prefetch rule's device miss counts the requests that join the
    # reload too, as the victims' price does (PredictivePolicy.reload_miss_cost); -d0: one miss
    "d": "keep_joins",
    # -f<x>: a device copy is kept while its idle time's rent is at most x misses' cost (ski
    # rental's break-even floor under the predictive rule); -f1, the default since the
    # fifteenth session; -f0: no floor, the rule before, so every ours-p{} label published
    # before then reproduces as ours-p{}-f0
    "f": "break_even",
    # -l1: victims in recency's order, the prediction only protecting those more likely than
    # not asked for before the loading model's next request (PredictivePolicy.victim_plan,
    # lru_veto); -l1, the default since the fifteenth session; -l0: the cheapest set, the rule
    # before, so every ours-p{} / ours-p{}-f0 / ours-p{}-f1 label published before then
    # reproduces with -l0 appended (ours-p{}-l0, ours-p{}-f0-l0, ours-p{}-f1-l0)
    "l": "lru_veto",
}


# label suffixes that turn a simulator option off for that setting (bench/sim/residency.py:
# TierConfig): -inuse, the victims planned at routing may be models with requests on the
# device (the gateway before the tenth session); -atstart, ours' victims planned when the load
# starts while the directory notes LRU's at routing (the simulator before the tenth session);
# -devfree, prefetches sent wherever a device has free bytes, the directory noting them there
# (the simulator before the eleventh session; the gateway sends one only where its view has
# room); -busyok, every prefetch the node is sent starts at once beside the requests (the
# simulator before the twelfth session's second wave; the node runs them one at a time and
# skips one whose device is busy: gpu_manager/prefetch.py); -busyskip, the second wave's rule:
# a prefetch whose device is busy at its turn is skipped at once (the node now waits up to one
# prefetch tick for the device to go quiet). They apply to the baselines'
# labels too (``hybrid-devfree``).
SIMULATOR_SUFFIXES = {
    "inuse": "spare_in_use",
    "atstart": "route_victims",
    "devfree": "prefetch_by_view",
    "busyok": "prefetch_when_quiet",
    "busyskip": "prefetch_waits",
}


def setting_for(label: str) -> tuple[str, str, dict[str, float], bool]:
    """The setting a label names: one of :data:`SETTINGS`, or ours with its parameters in the
    label (``ours-p0.3-m1000-g4``; a ``-noprefetch`` suffix turns prefetching off, and those
    of :data:`SIMULATOR_SUFFIXES` a simulator option)."""
    for setting in SETTINGS:
        if setting[0] == label:
            return setting
    unsuffixed = "-".join(part for part in label.split("-") if part not in SIMULATOR_SUFFIXES)
    if unsuffixed != label and not unsuffixed.startswith("ours"):
        _, policy, params, prefetch = setting_for(unsuffixed)  # a baseline, an old simulator
        return label, policy, params, prefetch
    parts = label.split("-")
    prefetch = "noprefetch" not in parts
    parts = [part for part in parts if part != "noprefetch" and part not in SIMULATOR_SUFFIXES]
    if parts[0] != "ours" or len(parts) < 2:
        raise TraceError(
            f"unknown setting {label!r}: a label of SETTINGS or ours-p<price>[-m<ms>][-g<n>]"
        )
    params = {}
    for part in parts[1:]:
        key = _LABEL_KEYS.get(part[:1])
        try:
            value = float(part[1:])
        except ValueError:
            key = None
        if key is None or key in params:
            letters = ", ".join(_LABEL_KEYS)
            raise TraceError(
                f"setting {label!r}: cannot read {part!r} (one of {letters}, a number)"
            )
        params[key] = value
    return label, "predictive", params, prefetch


HISTORY_HOURS = 4.0  # of the rare functions' arrivals, fed to the policy before the replay
QUICK = {"lru+ka-10min", "hybrid", "ours-p0.3", "ours-p2", "ours-p3", "ours-p3-noprefetch"}


def _trim(trace: ServerlessTrace, minutes: float) -> ServerlessTrace:
    n = int((trace.arrival_s < minutes * 60).sum())
    return ServerlessTrace(
        trace.functions,
        trace.clusters,
        trace.arrival_s[:n],
        trace.function[:n],
        trace.runtime_ms[:n],
    )


def load_trace(job: dict[str, Any]) -> tuple[ServerlessTrace, list[tuple[int, float]]]:
    """The trace to replay, and the arrivals seen before it (function index, seconds < 0).
    With ``scale`` 0, only the Azure-shaped rare functions (``tail``)."""
    if job["scale"] <= 0:
        before, tail = azure_tail(
            job["tail"], hours=job["minutes"] / 60, seed=job["seed"], history_hours=HISTORY_HOURS
        )
        return tail, [
            (int(f), float(t)) for f, t in zip(before.function, before.arrival_s, strict=True)
        ]
    trace = _trim(
        generate_orcbench(
            Path(job["trace_file"]),
            scale=job["scale"],
            minutes=job["trace_minutes"],
            seed=job["seed"],
        ),
        job["minutes"],
    )
    history: list[tuple[int, float]] = []
    if job["tail"] > 0:
        before, tail = azure_tail(
            job["tail"], hours=job["minutes"] / 60, seed=job["seed"], history_hours=HISTORY_HOURS
        )
        offset = len(trace.functions)
        history = [
            (offset + int(f), float(t))
            for f, t in zip(before.function, before.arrival_s, strict=True)
        ]
        trace = merge(trace, tail)
    return trace, history


def build_simulation(
    job: dict[str, Any], simulation: type[ResidencySimulation] = ResidencySimulation
) -> ResidencySimulation:
    """The simulation a job describes (``simulation``: a subclass that records more, such as
    ``bench/predict-diagnose.py``'s)."""
    trace, history = load_trace(job)
    weights = None
    if job["max_per_hour"] > 0:
        trace, weights = thin(trace, max_per_hour=job["max_per_hour"])
    costs = assign_models(len(trace.functions), seed=job["seed"])
    catalogue = catalogue_for(trace, costs)
    policy = make_policy(job["policy"], **job["params"])
    suffixes = set(job.get("label", "").split("-")) & SIMULATOR_SUFFIXES.keys()
    config = SimConfig(
        devices=job["devices"],
        capacity_bytes=job["capacity_bytes"],
        concurrency=2,
        eviction="lru",
        seed=job["seed"],
        sync_ms=5000.0,
    )
    tiers = TierConfig(
        host_capacity_bytes=job["host_bytes"],
        tick_s=job["tick_s"],
        prefetch=job["prefetch"],
        staged_routing=job.get("staged_routing", True),
        prefetch_unserved=job.get("prefetch_unserved", True),
        route_victims=job.get("route_victims", True) and "atstart" not in suffixes,
        spare_in_use=job.get("spare_in_use", True) and "inuse" not in suffixes,
        prefetch_by_view=job.get("prefetch_by_view", True) and "devfree" not in suffixes,
        prefetch_when_quiet=job.get("prefetch_when_quiet", True) and "busyok" not in suffixes,
        prefetch_waits=job.get("prefetch_waits", True) and "busyskip" not in suffixes,
    )
    return simulation(
        policy,
        catalogue,
        costs,
        engine_trace(trace),
        config,
        tiers,
        weights=weights,
        history=history,
    )


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    sim = build_simulation(job)
    report = sim.report()
    policy = sim.residency
    if isinstance(policy, SwitchingPolicy):  # how many functions ended on the other rule
        names = [model.name for model in sim.catalogue]
        report["switched_functions"] = sum(policy.follows_other(name) for name in names)
    report.update(label=job["label"], seed=job["seed"])
    return report


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% t-interval (0 with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    # Student's t for n - 1 degrees of freedom (until the eighth session 2.26, df = 9, was used
    # for every n >= 6: six seeds' intervals were 12% too narrow)
    return mean, t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    summary = {}
    for label, runs in by_label.items():
        row: dict[str, Any] = {"policy": runs[0]["policy"], "seeds": len(runs)}
        for key in (
            "cold_start_ratio",
            "device_gb_s",
            "host_gb_s",
            "p50_ms",
            "p99_ms",
            "warm_p99_ms",
            "observe_us_mean",
            "observe_us_p99",
            "tick_us_per_request",
        ):
            row[key] = _interval([float(r[key]) for r in runs])
        for tier in ("host", "artifact", "prefetch"):
            row[f"cold_{tier}"] = _interval([r["cold_by_tier"][tier] for r in runs])
        row["cold_by_cause"] = {
            cause: statistics.fmean(r.get("cold_by_cause", {}).get(cause, 0.0) for r in runs)
            for cause in CAUSES
        }
        row["cold_by_size"] = {
            size: statistics.fmean(r.get("cold_by_size", {}).get(size, 0.0) for r in runs)
            for size in SIZE_CLASSES
        }
        precision = [r["prefetch_precision"] for r in runs if r["prefetch_precision"] is not None]
        row["prefetch_precision"] = _interval(precision) if precision else None
        row["prefetches"] = statistics.fmean(r["prefetches"] for r in runs)
        summary[label] = row
    return summary


def family(label: str) -> str:
    """The curve a setting lies on: ``lru`` (the keep-alive sweep), ``hybrid``, or ours with
    every parameter but the price (``ours-p0.1-m1000-g4`` -> ``ours-m1000-g4``): a family's
    settings differ only in the swept price, so its points trace one curve."""
    if label.startswith("lru"):
        return "lru"
    if not label.startswith("ours"):
        return label
    return "-".join(part for part in label.split("-") if not _is_price(part))


def _is_price(part: str) -> bool:
    try:
        float(part[1:])
    except ValueError:
        return False
    return part.startswith("p")


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` (None outside it)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return next((py for px, py in points if abs(px - x) <= 1e-9 * max(1.0, x)), None)


def _curves(rows: dict[str, tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    """Each family's (device memory-time, cold-start ratio) points."""
    out: dict[str, list[tuple[float, float]]] = {}
    for label, point in rows.items():
        out.setdefault(family(label), []).append(point)
    return out


REFERENCES = ("lru+ka-10min", "hybrid")


def _against(rows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Every family of ours interpolated at each reference's device memory-time (the honest
    match: ours' price sweep must bracket the reference's memory-time, else None), and each of
    ours' settings against the baselines' curves at its own memory-time."""
    curves = _curves(rows)
    out: dict[str, Any] = {}
    for reference in REFERENCES:
        if reference not in rows:
            continue
        x, base = rows[reference]
        for name, points in curves.items():
            if not name.startswith("ours"):
                continue
            ours = _interpolate(points, x)
            out[f"{name}_at_{reference}"] = ours / base if ours is not None and base > 0 else None
    for label, (x, cold) in rows.items():
        if label.startswith("ours"):
            for prefix in ("lru", "hybrid"):
                base_cold = _interpolate(curves.get(prefix, []), x)
                out[f"{label}_vs_{prefix}_curve"] = cold / base_cold if base_cold else None
    return out


def comparisons(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparisons on the seeds' mean points (``per_seed`` does them seed by seed)."""
    rows = {
        label: (row["device_gb_s"][0], row["cold_start_ratio"][0]) for label, row in summary.items()
    }
    out = _against(rows)
    for label in summary:
        base = label.removesuffix("-noprefetch")
        if label != base and base in summary:
            on, off = summary[base]["warm_p99_ms"][0], summary[label]["warm_p99_ms"][0]
            out[f"warm_p99_{base}_over_without_prefetch"] = on / off if off > 0 else None
    return out


def per_seed(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals' comparisons seed by seed (each seed's own curves: memory-times differ between
    seeds), and over the seeds: the mean and 95% interval of each per-seed ratio."""
    by_seed: dict[int, dict[str, tuple[float, float]]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[r["label"]] = (r["device_gb_s"], r["cold_start_ratio"])
    out: dict[str, Any] = {str(seed): _against(rows) for seed, rows in sorted(by_seed.items())}
    keys = {k for row in out.values() for k in row}
    over: dict[str, Any] = {}
    for key in sorted(keys):
        values = [row[key] for row in out.values() if row.get(key) is not None]
        if values and len(values) == len(out):
            over[key] = _interval(values)
    out["over_seeds"] = over
    return out


def _share_table(
    summary: dict[str, dict[str, Any]], key: str, columns: Sequence[str], title: str
) -> list[str]:
    """A markdown table of each setting's ``row[key][column]`` shares, under ``title``."""
    lines = ["", title, "", "| setting | " + " | ".join(columns) + " |"]
    lines.append("|" + " --- |" * (len(columns) + 1))
    for label, row in summary.items():
        cells = " | ".join(f"{row[key][c]:.4%}" for c in columns)
        lines.append(f"| {label} | {cells} |")
    return lines


def _fmt(cell: Any, scale: float = 1.0, digits: int = 4) -> str:
    if cell is None:
        return "-"
    mean, half = cell
    return f"{mean * scale:.{digits}g} ± {half * scale:.2g}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| setting | cold-start ratio | from host | from artifact | on a prefetch | device GB·s |"
        " host GB·s | p50 ms | p99 ms | warm p99 ms | prefetch precision | observe µs |",
        "|" + " --- |" * 12,
    ]
    for label, row in summary.items():
        lines.append(
            f"| {label} | {_fmt(row['cold_start_ratio'])} | {_fmt(row['cold_host'])}"
            f" | {_fmt(row['cold_artifact'])} | {_fmt(row['cold_prefetch'])}"
            f" | {_fmt(row['device_gb_s'])} | {_fmt(row['host_gb_s'])}"
            f" | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {_fmt(row['warm_p99_ms'])}"
            f" | {_fmt(row['prefetch_precision'])} | {_fmt(row['observe_us_mean'], digits=3)} |"
        )
    lines += _share_table(
        summary,
        "cold_by_cause",
        CAUSES,
        "Why the cold requests' models were not there (share of all requests, mean over seeds):",
    )
    lines += _share_table(
        summary,
        "cold_by_size",
        SIZE_CLASSES,
        "Cold starts by model size class (share of all requests; small < 0.5 GB <= medium < 4 GB"
        " <= large):",
    )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path, *, workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {f: f for f in {family(label) for label in summary}}
    labels.update({"lru": "LRU + fixed keep-alive", "hybrid": "hybrid histogram (Azure)"})
    markers = itertools.cycle("^v<>Dpx*")
    for name in sorted(labels, key=lambda f: (not f.startswith(("lru", "hybrid")), f)):
        rows = sorted(
            ((label, row) for label, row in summary.items() if family(label) == name),
            key=lambda item: item[1]["device_gb_s"][0],
        )
        marker = {"lru": "o", "hybrid": "s"}.get(name) or next(markers)
        xs = [row["device_gb_s"][0] / 1000 for _, row in rows]
        ys = [row["cold_start_ratio"][0] for _, row in rows]
        es = [row["cold_start_ratio"][1] for _, row in rows]
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            marker=marker,
            label=labels[name],
            capsize=3,
            linestyle="-" if len(rows) > 1 else "none",
        )
        for (label, _), x, y in zip(rows, xs, ys, strict=True):
            short = label.split("-", 1)[-1] if name != "hybrid" else ""
            short = next((p for p in short.split("-") if _is_price(p)), short)
            ax.annotate(short, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("device memory-time (TB·s)")
    ax.set_ylabel("cold-start ratio (requests that waited for a load)")
    ax.set_yscale("log")  # the policies differ by orders of magnitude
    ax.set_title(f"Cold starts vs device memory-time\n({workload}, LALB simulator)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def prediction_cost(
    *, functions: int = 1000, requests: int = 200_000, seed: int = 0
) -> dict[str, float]:
    """Gateway CPU per request for each policy's ``observe`` (the request path), and per call of
    ``advise`` (the background tick), in microseconds: batches of 1,000 timed together (the
    timer costs more than one call), GC paused; the median batch (and the worst, for observe:
    on a shared machine that is the scheduler's noise, not the policy's work)."""
    import gc
    import time

    import numpy as np

    rng = np.random.default_rng(seed)
    names = [f"fn-{i:04d}" for i in range(functions)]
    picks = rng.zipf(1.3, size=requests) % functions
    times = np.cumsum(rng.exponential(0.004, size=requests))
    out: dict[str, float] = {}
    policies: dict[str, tuple[str, dict[str, float]]] = {
        "keepalive": ("keepalive", {}),
        "hybrid": ("hybrid", {}),
        "predictive": ("predictive", {}),
        "switch": ("predictive", {"switch": 1}),  # ours switched per function to the hybrid
    }
    for label, (name, params) in policies.items():
        policy = make_policy(name, **params)
        batches = []
        gc.disable()
        for start in range(0, requests, 1000):
            tic = time.perf_counter_ns()
            for i in range(start, min(requests, start + 1000)):
                policy.observe(names[picks[i]], float(times[i]))
            batches.append((time.perf_counter_ns() - tic) / 1000 / 1000)
        now = float(times[-1])
        rounds = []
        for _ in range(5):  # batches of 100 calls over every function; the median batch
            for start in range(0, len(names), 100):
                tic = time.perf_counter_ns()
                for name in names[start : start + 100]:
                    policy.advise(
                        name, now + 5.0, size_bytes=2 * 10**9, reload_ms=500.0, tier="device"
                    )
                rounds.append((time.perf_counter_ns() - tic) / 1000 / 100)
        advise_us = float(np.median(rounds))
        gc.enable()
        out[f"{label}_observe_us_p50"] = float(np.median(batches))
        out[f"{label}_observe_us_max"] = float(np.max(batches))
        out[f"{label}_advise_us"] = advise_us
        if (
            label == "predictive"
        ):  # the baselines have no plan (the caller's LRU); the switch: ours'
            # the same history: the ranking (-k0), the sets over the fixed horizon counting one
            # miss each (-b0-j0, the rule up to the eighth session), the default (sets priced
            # against the load, joins counted, the rule up to the fourteenth session), then the
            # default since the fifteenth session: recency's order with the prediction's veto
            policy.lru_veto = False  # type: ignore[attr-defined]
            policy.victim_sets = policy.belady = policy.joins = False  # type: ignore[attr-defined]
            out["predictive_eviction_order_us"] = _eviction_plan_us(policy, names, now, rng)
            policy.victim_sets = True  # type: ignore[attr-defined]
            out["predictive_eviction_sets_us"] = _eviction_plan_us(policy, names, now, rng)
            policy.belady = policy.joins = True  # type: ignore[attr-defined]
            out["predictive_eviction_belady_us"] = _eviction_plan_us(policy, names, now, rng)
            policy.lru_veto = True  # type: ignore[attr-defined]
            out["predictive_eviction_veto_us"] = _eviction_plan_us(policy, names, now, rng)
    return out


def _eviction_plan_us(policy: Any, names: list[str], now: float, rng: Any) -> float:
    """Gateway CPU per load that must evict (``eviction_plan``, what ``PrefetchDriver.victims``
    runs): a device of 32 least recently used residents among the functions, sizes
    log-uniform over 20 MB-16 GB, a load of another function needing 0.5-10 GB; the median of
    batches of 100."""
    import gc
    import time

    import numpy as np

    from gpufaas.cache.arrivals import eviction_plan

    devices = [
        (
            [
                (names[int(i)], int(10 ** rng.uniform(7.3, 10.2)))
                for i in rng.choice(len(names), 32, replace=False)
            ],
            int(rng.uniform(0.5e9, 10e9)),
            names[int(rng.integers(len(names)))],
        )
        for _ in range(100)
    ]
    rounds = []
    gc.disable()
    for _ in range(20):
        tic = time.perf_counter_ns()
        for residents, need, loading in devices:
            eviction_plan(
                policy,
                residents,
                now + 5.0,
                lambda m, s: s / 25e6,
                need_bytes=need,
                loading=loading,
            )
        rounds.append((time.perf_counter_ns() - tic) / 1000 / len(devices))
    gc.enable()
    return float(np.median(rounds))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (trace, sizes, sim)")
    p.add_argument("--scale", type=float, default=0.05, help="orcbench --scale (0: no orcbench)")
    p.add_argument("--minutes", type=float, default=60.0, help="simulated minutes replayed")
    p.add_argument("--devices", type=int, default=12)
    p.add_argument("--capacity-gb", type=float, default=80.0, help="per device")
    p.add_argument("--host-gb", type=float, default=512.0, help="host tier per node (8 devices)")
    p.add_argument("--tick-s", type=float, default=5.0, help="residency decisions every")
    p.add_argument(
        "--max-per-hour",
        type=float,
        default=2000.0,
        help="thin functions invoked more often (weighted; 0: replay every request)",
    )
    p.add_argument(
        "--tail",
        type=int,
        default=0,
        help="add this many Azure-shaped rare functions (timers, sporadic) orcbench lacks",
    )
    p.add_argument(
        "--no-staged-routing",
        action="store_true",
        help="LALB not told where host copies are (the routing before #13's holder fix)",
    )
    p.add_argument(
        "--no-prefetch-unserved",
        action="store_true",
        help="prefetch only functions already served on a device in the run (the rule before)",
    )
    p.add_argument(
        "--victims-at-start",
        action="store_true",
        help="plan the policy's victims when a load starts, the directory noting LALB's at"
        " routing (the simulator before the tenth session; the gateway plans at routing)",
    )
    p.add_argument(
        "--plan-in-use",
        action="store_true",
        help="let the victims planned at routing include models with requests on the device"
        " (the gateway before the tenth session)",
    )
    p.add_argument(
        "--prefetch-on-device-free",
        action="store_true",
        help="send a prefetch wherever a device has free bytes, the directory noting it there"
        " (the simulator before the eleventh session; the gateway sends one only where its"
        " view has room)",
    )
    p.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    p.add_argument("--only", default="", help="comma-separated setting labels")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hash-seed", type=int, default=0, help="PYTHONHASHSEED of the workers")
    p.add_argument("--trace-dir", default=str(Path(tempfile.gettempdir()) / "gpufaas-orcbench"))
    p.add_argument("--cost", action="store_true", help="only measure the prediction's CPU cost")
    p.add_argument(
        "--from-json",
        default="",
        help="comma-separated --json files of earlier runs: summarise and plot those, no simulation",
    )
    p.add_argument("--workload", default="", help="the plot's name for the workload")
    p.add_argument("--json", help="write all runs and the summary here")
    p.add_argument("--plot", help="write the cold-start / memory-time plot here (PNG)")
    return p


def base_job(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One seed's simulation parameters from the command line (a job less its setting)."""
    trace_minutes = max(1, math.ceil(args.minutes))
    trace_file = Path(args.trace_dir) / f"orc-s{args.scale}-m{trace_minutes}-seed{seed}.csv"
    return {
        "seed": seed,
        "trace_file": str(trace_file),
        "scale": args.scale,
        "trace_minutes": trace_minutes,
        "minutes": args.minutes,
        "devices": args.devices,
        "capacity_bytes": int(args.capacity_gb * 1e9),
        "host_bytes": int(args.host_gb * 1e9),
        "tick_s": args.tick_s,
        "max_per_hour": args.max_per_hour,
        "tail": args.tail,
        "staged_routing": not args.no_staged_routing,
        "prefetch_unserved": not args.no_prefetch_unserved,
        "route_victims": not args.victims_at_start,
        "spare_in_use": not args.plan_in_use,
        "prefetch_by_view": not args.prefetch_on_device_free,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except TraceError as e:
        print(f"bench/predict.py: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.cost:
        print(json.dumps(prediction_cost(), indent=1))
        return 0
    if args.from_json:
        runs = [
            r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())["runs"]
        ]
        report(runs, args)
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = {s for s in args.only.split(",") if s} or (QUICK if args.quick else None)
    settings = (
        list(SETTINGS)
        if wanted is None
        else [setting_for(label) for label in args.only.split(",") if label]
        if args.only
        else [s for s in SETTINGS if s[0] in wanted]
    )
    jobs = []
    for seed in seeds:
        base = base_job(args, seed)
        stats = shape(load_trace(base)[0])
        print(f"seed {seed}: trace shape", json.dumps({k: round(v, 4) for k, v in stats.items()}))
        for label, name, params, prefetch in settings:
            jobs.append(
                {**base, "label": label, "policy": name, "params": params, "prefetch": prefetch}
            )
    results = []
    # The simulator iterates sets of names (hash order): fix the hash seed of the workers, so a
    # run is repeatable (unset, the same seed's cold-start ratio moved ~10% between runs).
    os.environ["PYTHONHASHSEED"] = str(args.hash_seed)
    with multiprocessing.get_context("spawn").Pool(max(1, args.workers)) as pool:
        for result in pool.imap_unordered(run_one, jobs, chunksize=1):
            brief = {k: result[k] for k in ("label", "seed", "cold_start_ratio", "device_gb_s")}
            print("done", json.dumps(brief), f"{result['wall_s']:.0f} s", flush=True)
            results.append(result)
            if args.json:  # partial results survive an interrupted sweep
                Path(args.json).write_text(json.dumps({"runs": results}, indent=1))
    order = {(job["label"], job["seed"]): i for i, job in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["label"], r["seed"])])
    report(results, args)
    return 0


def brackets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed, reference and family of ours: where the reference's memory-time lies in the
    family's range and between which two settings it was interpolated (their memory-times and
    cold-start ratios), so a reader can see that no figure is extrapolated and how far apart
    the bracketing settings are (a chord over a wide bracket of a convex curve overstates ours)."""
    by_seed: dict[int, dict[str, tuple[float, float]]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[r["label"]] = (r["device_gb_s"], r["cold_start_ratio"])
    out: dict[str, Any] = {}
    for seed, rows in sorted(by_seed.items()):
        families: dict[str, list[tuple[float, float, str]]] = {}
        for label, (x, y) in rows.items():
            if label.startswith("ours"):
                families.setdefault(family(label), []).append((x, y, label))
        for reference in REFERENCES:
            if reference not in rows:
                continue
            x = rows[reference][0]
            for name, points in families.items():
                points.sort()
                pair = next(
                    ((a, b) for a, b in itertools.pairwise(points) if a[0] <= x <= b[0]), None
                )
                out[f"{seed}/{name}/{reference}"] = {
                    "reference_tb_s": x / 1000,
                    "range_tb_s": [points[0][0] / 1000, points[-1][0] / 1000],
                    "bracket": None
                    if pair is None
                    else [{"label": lab, "tb_s": px / 1000, "cold": py} for px, py, lab in pair],
                    "width": None if pair is None else (pair[1][0] - pair[0][0]) / x,
                }
    return out


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    summary = summarise(results)
    print(table(summary))
    compared = comparisons(summary)
    compared["per_seed"] = per_seed(results)
    compared["brackets"] = brackets(results)
    print(json.dumps(compared, indent=2))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": results, "summary": summary, "comparisons": compared}, indent=1)
        )
    if args.plot:
        workload = args.workload or (
            "orcbench" if args.scale > 0 else "Azure-shaped rare functions"
        )
        plot(summary, Path(args.plot), workload=workload)


if __name__ == "__main__":
    raise SystemExit(main())
