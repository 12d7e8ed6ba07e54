"""LB vs LALB vs LALB+O3 across working-set sizes, in a simulator or on a live local cluster.

Reproduces the experiment of "GPU-enabled Function-as-a-Service for Machine Learning Inference"
(Zhao et al., 2023) with our own policies (``gpufaas.scheduler.policy``), O3 queue and cache
directory. See ``bench/RESULTS.md`` for results and ``docs/scheduling.md`` for the rules.

    python bench/lalb.py --mode sim --wss 35 --json     # one working set, JSON by policy
    python bench/lalb.py --mode sim                     # the 5..45 sweep, a table and a PNG
    python bench/lalb.py --mode live --wss 10           # against `gpufaas up` on CPU devices
    python bench/lalb.py --sweep --json bench/out/sweep.json   # curves over the arrival rate
    python bench/lalb.py measure --set NAME             # measure the example models (new set)

The simulator's model sizes and load/inference times are measurements of our example models
(``bench/sim/profiles.json``; ``--profile`` picks a set). The default parameters put the cluster
in the paper's regime: the devices together hold fewer models than the working set.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim import sweep
from sim.belady import belady_hits
from sim.engine import SimConfig, simulate
from sim.workload import load_profiles, make_catalogue, make_trace

from gpufaas.core.units import parse_bytes

POLICIES = ("lb", "lalb", "lalb-o3")
DEFAULT_AXIS = (5, 10, 15, 20, 25, 30, 35, 40, 45)
# Arrival rates of the sweep at working set 35: LB's busiest copy engine from about 15% to
# saturation with the default profile; the host tier's misses are ~10x cheaper, so its row
# needs ~10x the rate for the same utilisation.
SWEEP_RATES = (20.0, 40.0, 55.0, 70.0, 80.0, 85.0, 90.0, 100.0)
SWEEP_HOST_TIER_RATES = (100.0, 300.0, 600.0, 750.0, 800.0, 850.0, 900.0)
HERE = Path(__file__).resolve().parent


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _bytes(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _axis(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("working-set sizes must be integers >= 1")
    return values


def _rates(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError("rates must be finite numbers > 0")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("sim", "live"), default="sim")
    parser.add_argument("--wss", type=_positive_int, help="one working-set size (default: sweep)")
    parser.add_argument("--axis", type=_axis, default=list(DEFAULT_AXIS), help="sweep sizes")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (sweeps only)")
    parser.add_argument("--seed", type=int, default=1)
    sim = parser.add_argument_group("simulator")
    sim.add_argument("--profile", default="cpu", help="set of measured model profiles")
    sim.add_argument("--kinds", default=None, help="example-model mix, e.g. minilm=2,small-cnn=1")
    sim.add_argument("--devices", type=_positive_int, default=4)
    sim.add_argument(
        "--device-memory",
        type=_bytes,
        default="192Mi",
        help="model-cache capacity of each simulated device (two MiniLMs and the small models)",
    )
    sim.add_argument("--requests", type=_positive_int, default=30_000)
    sim.add_argument(
        "--eviction",
        choices=("hint", "lru"),
        default="hint",
        help="GPU managers evict the policy's chosen victims first (hint) or plain LRU",
    )
    sim.add_argument("--rate", type=_positive_float, default=100.0, help="arrivals per second")
    sim.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of model popularity")
    sim.add_argument("--concurrency", type=_positive_int, default=2, help="requests per device")
    sim.add_argument("--max-passes", type=int, default=8)
    sim.add_argument("--max-hold-ms", type=float, default=1000.0)
    sim.add_argument("--sync-ms", type=float, default=5000.0)
    sim.add_argument("--catalogue", type=_positive_int, default=None, help="models in catalogue")
    curves = parser.add_argument_group("sweep over the arrival rate (--sweep)")
    curves.add_argument("--sweep", action="store_true", help="curves over --rates, --seeds runs")
    curves.add_argument("--rates", type=_rates, default=list(SWEEP_RATES))
    curves.add_argument("--host-tier-rates", type=_rates, default=list(SWEEP_HOST_TIER_RATES))
    curves.add_argument("--seeds", type=_positive_int, default=5, help="seeds per point")
    curves.add_argument(
        "--rows", default="lru,hint,host-tier", help="which of lru, hint, host-tier to run"
    )
    curves.add_argument("--jobs", type=_positive_int, default=1, help="processes")
    curves.add_argument("--out", type=Path, default=None, help="write the sweep's JSON here")
    curves.add_argument("--markdown", type=Path, default=None, help="write its tables here")
    live = parser.add_argument_group("live")
    live.add_argument("--nodes", type=_positive_int, default=2)
    live.add_argument("--cpu-devices", type=_positive_int, default=2)
    live.add_argument("--live-requests", type=_positive_int, default=600)
    live.add_argument("--live-seconds", type=_positive_float, default=120.0)
    live.add_argument("--live-rate", type=_positive_float, default=25.0, help="requests/s")
    live.add_argument(
        "--live-device-memory", default=None, help="per CPU device (default 32Ki: six models)"
    )
    live.add_argument("--live-kinds", default=None, help="example models to copy (tiny-mlp)")
    from sim.scaleout import add_arguments as add_scaleout_arguments

    add_scaleout_arguments(parser)  # --gateways N,...: gateway scale-out (#16)
    return parser


def _kinds(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    kinds = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        kinds[name.strip()] = float(weight) if weight else 1.0
    return kinds


# -- simulator ---------------------------------------------------------------------------------


def sim_point(
    args: argparse.Namespace,
    wss: int,
    policies: list[str],
    *,
    rate: float | None = None,
    seed: int | None = None,
    profile: str | None = None,
    eviction: str | None = None,
    catalogue_seed: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Every policy and the offline references at one working-set size, on one trace.

    Each policy's entry carries ``placement_min_miss_ratio``: Belady's rule run per device over
    the requests that policy sent there, in the order they started (``bench/sim/belady.py``);
    ``belady`` is MIN over the whole trace with the cluster's memory pooled.
    """
    rate = args.rate if rate is None else rate
    seed = args.seed if seed is None else seed
    profile = args.profile if profile is None else profile
    eviction = args.eviction if eviction is None else eviction
    catalogue_seed = seed if catalogue_seed is None else catalogue_seed
    sets = load_profiles()
    if profile not in sets:
        raise SystemExit(f"unknown --profile {profile!r}; measured sets: {sorted(sets)}")
    profiles = sets[profile]
    catalogue = make_catalogue(
        profiles,
        n_models=max(wss, args.catalogue or 0),
        kinds=_kinds(args.kinds),
        seed=catalogue_seed,
    )
    capacity = args.device_memory
    trace = make_trace(
        wss=wss, n_requests=args.requests, rate_per_s=rate, zipf_s=args.zipf, seed=seed
    )
    config = SimConfig(
        devices=args.devices,
        capacity_bytes=capacity,
        concurrency=args.concurrency,
        max_passes=args.max_passes,
        max_hold_ms=args.max_hold_ms,
        sync_ms=args.sync_ms,
        eviction=eviction,
        seed=seed,
    )
    sizes = [m.profile.size_bytes for m in catalogue]
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        result = simulate(policy, catalogue, trace, config)
        entry = result.summary()
        bound_hits = sum(
            belady_hits(started, sizes, capacity_bytes=capacity, counted=counted)
            for started, counted in result.placement
        )
        entry["placement_min_miss_ratio"] = 1 - bound_hits / max(result.requests, 1)
        out[policy] = entry
    skip = int(len(trace) * config.warmup_fraction)
    hits = belady_hits(
        trace.model.tolist(), sizes, capacity_bytes=capacity * args.devices, skip=skip
    )
    measured = len(trace) - skip
    out["belady"] = {"hit_ratio": hits / measured, "miss_ratio": 1 - hits / measured}
    for policy in policies:
        entry = out[policy]
        entry["miss_x_pooled_min"] = _multiple(entry["miss_ratio"], out["belady"]["miss_ratio"])
        entry["miss_x_placement_min"] = _multiple(
            entry["miss_ratio"], entry["placement_min_miss_ratio"]
        )
    out["_setup"] = {
        "wss": wss,
        "devices": args.devices,
        "capacity_bytes": capacity,
        "rate_per_s": rate,
        "requests": args.requests,
        "profile": profile,
        "eviction": eviction,
        "seed": seed,
        "catalogue_seed": catalogue_seed,
    }
    return out


def _multiple(value: float, bound: float) -> float | None:
    return value / bound if bound > 0 else None


# -- reporting ---------------------------------------------------------------------------------


def cuts(point: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Percent reductions of mean latency and miss ratio against LB."""
    base = point.get("lb")
    result: dict[str, dict[str, float]] = {}
    if base is None:
        return result
    for policy in ("lalb", "lalb-o3"):
        if policy in point:
            result[policy] = {
                "mean_cut_pct": _cut(base["mean_ms"], point[policy]["mean_ms"]),
                "miss_cut_pct": _cut(base["miss_ratio"], point[policy]["miss_ratio"]),
            }
    return result


def _cut(base: float, value: float) -> float:
    return 100.0 * (1 - value / base) if base > 0 else 0.0


def table(point: dict[str, dict[str, Any]]) -> str:
    setup = point.get("_setup", {})
    lines = [
        f"working set {setup.get('wss')}: {setup.get('devices')} devices,"
        f" {setup.get('rate_per_s', 0):.4g} req/s, {setup.get('requests')} requests"
    ]
    header = (
        f"{'policy':<9}{'mean ms':>10}{'p99 ms':>10}{'miss':>8}{'hit':>8}"
        f"{'queue ms':>10}{'load ms':>9}{'SLO':>7}{'overtook':>9}"
    )
    lines.append(header)
    for policy, r in point.items():
        if policy.startswith("_"):
            continue
        if policy == "belady":
            lines.append(
                f"{policy:<9}{'':>10}{'':>10}{r['miss_ratio']:>8.3f}{r['hit_ratio']:>8.3f}"
            )
            continue
        lines.append(
            f"{policy:<9}{r['mean_ms']:>10.2f}{r['p99_ms']:>10.1f}{r['miss_ratio']:>8.3f}"
            f"{r['hit_ratio']:>8.3f}{r['mean_queue_ms']:>10.2f}{r['mean_load_ms']:>9.2f}"
            f"{r['slo_attainment']:>7.3f}{r.get('overtakes', 0):>9}"
        )
    for policy, r in point.items():
        decisions = r.get("decisions") if isinstance(r, dict) else None
        if decisions:
            lines.append(f"  {policy} decisions: {decisions}")
    errors = {p: r["errors"] for p, r in point.items() if isinstance(r, dict) and r.get("errors")}
    if errors:
        lines.append(f"  failed requests (not in the latencies): {errors}")
    for policy, c in cuts(point).items():
        lines.append(
            f"  {policy} vs lb: mean latency {-c['mean_cut_pct']:+.2f}%,"
            f" miss ratio {-c['miss_cut_pct']:+.2f}%"
        )
    if "belady" in point:
        for policy, r in point.items():
            if policy.startswith("_") or policy == "belady" or "miss_x_pooled_min" not in r:
                continue
            lines.append(
                f"  {policy} miss ratio = {_times(r['miss_x_pooled_min'])} pooled MIN's,"
                f" {_times(r['miss_x_placement_min'])} per-device MIN's given its placement"
                f" ({r['placement_min_miss_ratio']:.3f})"
            )
    return "\n".join(lines)


def _times(multiple: float | None) -> str:
    return "n/a" if multiple is None else f"{multiple:.2f}x"


def plot(points: dict[int, dict[str, dict[str, Any]]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(points)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in POLICIES:
        if all(policy in points[w] for w in sizes):
            ax1.plot(sizes, [points[w][policy]["mean_ms"] for w in sizes], marker="o", label=policy)
            ax2.plot(
                sizes, [points[w][policy]["miss_ratio"] for w in sizes], marker="o", label=policy
            )
    if all("belady" in points[w] for w in sizes):
        ax2.plot(
            sizes,
            [points[w]["belady"]["miss_ratio"] for w in sizes],
            linestyle="--",
            color="gray",
            label="Belady (MIN)",
        )
    ax1.set_yscale("log")
    ax1.set_xlabel("working set (models)")
    ax1.set_ylabel("mean latency (ms, log)")
    ax2.set_xlabel("working set (models)")
    ax2.set_ylabel("cache-miss ratio")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- sweep ----------------------------------------------------------------------------------------


def sweep_rows(args: argparse.Namespace) -> list[sweep.Row]:
    known = {
        "lru": sweep.Row("lru", args.profile, "lru", tuple(args.rates)),
        "hint": sweep.Row("hint", args.profile, "hint", tuple(args.rates)),
        "host-tier": sweep.Row(
            "host-tier", f"{args.profile}-host-tier", "hint", tuple(args.host_tier_rates)
        ),
    }
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise SystemExit(f"unknown --rows {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


def _sweep_cell(
    args: argparse.Namespace, policies: list[str], rows: dict[str, sweep.Row], cell: sweep.Cell
) -> dict[str, Any]:
    row = rows[cell.row]
    point = sim_point(
        args,
        args.wss or 35,
        policies,
        rate=cell.rate,
        seed=cell.seed,
        profile=row.profile,
        eviction=row.eviction,
        catalogue_seed=args.seed,
    )
    for policy in policies:  # keep the JSON small: the sweep needs no decision counts
        point[policy].pop("decisions", None)
    return point


def run_sweep(args: argparse.Namespace, policies: list[str]) -> dict[str, Any]:
    rows = sweep_rows(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    todo = sweep.cells(rows, seeds)
    run_one = functools.partial(_sweep_cell, args, policies, {r.name: r for r in rows})
    points = sweep.run_cells(run_one, todo, jobs=args.jobs)
    summaries = sweep.aggregate(rows, todo, points)
    return {
        "setup": {
            "wss": args.wss or 35,
            "devices": args.devices,
            "device_memory_bytes": args.device_memory,
            "requests": args.requests,
            "seeds": seeds,
            "catalogue_seed": args.seed,
            "rows": [r.__dict__ for r in rows],
        },
        "summaries": summaries,
        "headline": sweep.headline(summaries),
        "cells": [
            {"row": c.row, "rate_per_s": c.rate, "seed": c.seed, **_public(p)}
            for c, p in zip(todo, points, strict=True)
        ],
    }


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:
        from sim.measure import main as measure_main

        return measure_main(argv[1:])
    args = _parser().parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {list(POLICIES)}")
    if args.compare:
        from sim.scaleout import compare

        print(compare(*args.compare))
        return 0
    if args.summarise:
        from sim.scaleout import summarise

        print(summarise(args.summarise))
        return 0
    if args.mode == "live" and args.gateways:
        from sim.scaleout import run_scaleout
        from sim.scaleout import table as scaleout_table

        result = run_scaleout(args, wss=args.wss or 16)
        print(json.dumps(result, indent=2) if args.json else scaleout_table(result))
        return 0
    if args.mode == "live":
        from sim.live import run_live

        point = run_live(args, wss=args.wss or 35, policies=policies)
        print(json.dumps(_public(point), indent=2) if args.json else table(point))
        return 0
    if args.sweep:
        result = run_sweep(args, policies)
        summaries = result["summaries"]
        text = (
            "Headline bands:\n\n"
            + sweep.headline_markdown(summaries)
            + "\n\n"
            + sweep.markdown(summaries)
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(text + "\n")
        if args.plot:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            sweep.plot(
                summaries,
                args.plot,
                title=f"LB vs LALB vs LALB+O3 over the arrival rate (simulator, wss"
                f" {args.wss or 35}, {args.seeds} seeds, 95% intervals)",
            )
        print(json.dumps(result["summaries"], indent=1) if args.json else text)
        return 0
    sizes = [args.wss] if args.wss else args.axis
    points = {wss: sim_point(args, wss, policies) for wss in sizes}
    if args.json:
        if args.wss:
            print(json.dumps(_public(points[args.wss]), indent=2))
        else:
            print(json.dumps({str(w): _public(p) for w, p in points.items()}, indent=2))
    else:
        print("\n\n".join(table(points[w]) for w in sizes))
    if len(sizes) > 1 or args.plot:
        path = args.plot or HERE / "out" / "lalb-sim.png"
        plot(points, path, title=f"LB vs LALB vs LALB+O3 (simulator, {args.devices} devices)")
        if not args.json:
            print(f"\nplot: {path}")
    return 0


def _public(point: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON shape: exactly one entry per policy (and ``belady``)."""
    out: dict[str, Any] = {k: dict(v) for k, v in point.items() if not k.startswith("_")}
    for policy, cut in cuts(point).items():
        out[policy]["vs_lb"] = cut
    if "belady" in out:
        out["belady"] = {"mean_ms": None, "p99_ms": None, **out["belady"]}
    return out


def _fix_hash_seed() -> None:
    """Re-run this script with ``PYTHONHASHSEED=0`` unless the caller chose a seed.

    Python salts string hashes per process, so the order of a set of device keys (a model's
    holders, which the policy samples from with its seeded random generator) changes from run
    to run; without a fixed salt the same command moves the miss-ratio cut by about 0.5 point.
    """
    if "PYTHONHASHSEED" not in os.environ:
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _fix_hash_seed()
    sys.exit(main())
