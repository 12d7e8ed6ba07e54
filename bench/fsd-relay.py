"""#15, seventeenth session: the N = 2 relayed-channel miss, read from the stored holds.

Pure reading of committed records (no measurement): ``--decompose GRID CAL`` prints each
cell's measured latency against the model's terms on its binding branch and the server's
CPU (``others_ms``); ``--score`` refits every stored 25-cell hold's calibration under each
form and scores its grid, as ``bench/fsd.py --evaluate`` does (bench/RESULTS.md, #15, "fsd,
seventeenth session").

    python bench/fsd-relay.py --decompose bench/fsd-grid-s16-seed21.json bench/fsd-calibration-s16.json
    python bench/fsd-relay.py --score
    python bench/fsd-relay.py --summary bench/fsd-grid-s17-seed24.json
    python bench/fsd-relay.py --rounds bench/fsd-calibration-s17b.json

``--per-round`` (eighteenth session) reads every stored hold's N = 2 cells of one channel
(``--channel``, direct by default) against the model's exchange rounds: the layers where a
shard reads remote values, each charged ``c_msg + c_sync`` (+ bytes) by the model. Per cell:
what the measurement leaves per round after the model's compute and fixed parts, against
what the model charges; and per calibration, the same for its own N = 2 runs, and the median
error of the default fit on its own runs by channel and shard count (in-sample).

    python bench/fsd-relay.py --per-round
    python bench/fsd-relay.py --score   # every stored hold, each form (s17b's holds too)

``--summary`` reads one grid report's scores as the seventeenth session's plan declared
them: per model, the cells within 25% (median of the repetitions), the strict picks, the
mean |error| with its 95% t upper bound over the cells, and how many cells' 95% t interval
of the error over the repetitions (the cell's prediction against each repetition's
latency) lies within ±25%.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.scheduler import costmodel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim.sweep import t95_exact

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fsd_bench", ROOT / "bench" / "fsd.py")
assert _spec is not None and _spec.loader is not None
fsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsd)
# (grid, calibration) of every stored 25-cell hold since the fourteenth session
HOLDS = [("s14-1", "s14-1"), ("s14-2", "s14-2"), ("s15", "s15"), ("s15-18", "s15-18"),
         ("s16-1024x120", "s16"), ("s16-4096x120", "s16"), ("s16-seed21", "s16"),
         ("s16-1024x120-seed22", "s16"), ("s16-16384x120-i", "s16"),
         ("s15-1024x120", "s15"), ("s17-seed24", "s17"), ("s17-seed25", "s17"),
         ("s17b-seed26", "s17b"), ("s17b-seed27", "s17b"),
         ("s18-seed28", "s18"), ("s18-seed29", "s18"),
         ("s19-seed30", "s19"), ("s19-seed31", "s19")]  # fmt: skip
# the holds --per-round reads: every one above but s15's defect hold
ROUND_HOLDS = [h for h in HOLDS if h[0] != "s15-1024x120"]
FORMS: dict[str, dict[str, Any]] = {
    "w = 1": {"contention_weight": 1.0, "relay": False},
    # without the relay: since the follow-up the bench's default fits it (relay=True)
    "w = 0.3": {"contention_weight": costmodel.SERVED_CONTENTION, "relay": False},
    "relay, w = 0.3": {"contention_weight": costmodel.SERVED_CONTENTION, "relay": True},
    # eighteenth session: direct's relay terms fitted too (bench/fsd.py RELAYED_DIRECT)
    "relay with direct's, w = 0.3": {
        "contention_weight": costmodel.SERVED_CONTENTION,
        "relay": True,
        "relayed": fsd.RELAYED_DIRECT,
    },
}


def terms(
    p: costmodel.Profile, batch: int, channel: str, c: costmodel.Constants
) -> dict[str, float]:
    """The prediction's parts on each layer's binding branch, summed over layers (seconds)."""
    cost = c.channels[channel] if p.shards > 1 else costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0)
    alone = costmodel.compute_features(p, batch=batch) @ np.array(dataclasses.astuple(c.compute))
    alone = alone * c.served
    f = costmodel.channel_features(p, batch=batch, cores=c.cores)
    parts = {"compute": alone * costmodel.contention(c, p.shards),
             "msg": f[..., 0] * cost.per_message_s, "byte": f[..., 1] * cost.per_byte_s,
             "sync": f[..., 2] * cost.per_sync_s, "wake": f[..., 3] * cost.per_wake_s,
             "relay": f[..., 4] * cost.per_relay_message_s + f[..., 5] * cost.per_relay_byte_s}  # fmt: skip
    cpu = sum(v for k, v in parts.items() if k != "relay")
    by_max = (cpu + parts["relay"]).max(axis=1) >= cpu.sum(axis=1) / c.cores
    busiest = (cpu + parts["relay"]).argmax(axis=1)
    layers = np.arange(cpu.shape[0])
    out = {k: float(np.where(by_max, v[layers, busiest],
                             0.0 if k == "relay" else v.sum(axis=1) / c.cores).sum())
           for k, v in parts.items()}  # fmt: skip
    out["fixed"] = c.per_request_s + c.per_io_value_s * batch * p.io_values
    out["fixed"] += cost.per_shard_s * p.shards if p.shards > 1 else 0.0
    out["busiest_share"] = float(by_max.mean())
    return out


def decompose(grid_path: Path, cal_path: Path, **form: Any) -> None:
    grid = json.loads(grid_path.read_text())
    cal = json.loads(cal_path.read_text())["calibration"]
    constants = fsd.fit_constants(cal["runs"], cores=2, **form)
    net = radix_net(grid["net"]["neurons"], grid["net"]["layers"])
    for r in sorted(grid["grid"], key=lambda r: (r["shards"], r["channel"], r["method"])):
        if "failed" in r:
            continue
        p = fsd._grid_profile(net, r["shards"], r["method"], int(r.get("seed", 0)))
        channel = r["channel"] if r["shards"] > 1 else "direct"
        here = costmodel.at_speed(constants, r["probe_s"])
        t = terms(p, r["batch"], channel, here)
        predicted = costmodel.predict(p, batch=r["batch"], channel=channel, constants=here)
        kib = r["batch"] * 4 * p.values.sum() / max(p.messages.sum(), 1) / 1024
        print(f"N={r['shards']} {channel:6s} {r['method']:10s} measured {r['latency_s'] * 1e3:7.1f} "
              f"predicted {predicted * 1e3:7.1f} ({predicted / r['latency_s'] - 1:+.2f}) | "
              + " ".join(f"{k} {t[k] * 1e3:.1f}" for k in ("fixed", "compute", "msg", "byte",
                                                             "sync", "wake", "relay"))
              + f" | busiest-branch layers {t['busiest_share']:.2f}, {kib:.0f} KiB a message, "
              f"server CPU {r.get('others_ms', float('nan')):.1f} ms")  # fmt: skip


def score() -> None:
    for name, form in FORMS.items():
        print(name)
        for g, c in HOLDS:
            grid = json.loads((ROOT / "bench" / f"fsd-grid-{g}.json").read_text())
            cal = json.loads((ROOT / "bench" / f"fsd-calibration-{c}.json").read_text())
            runs = cal["calibration"]["runs"]  # without the grid-width runs, as score() fits
            runs = {**runs, "channels": [r for r in runs["channels"] if not fsd._grid_width(r)]}
            constants = fsd.fit_constants(runs, cores=2, **form)
            net = radix_net(grid["net"]["neurons"], grid["net"]["layers"])
            res = fsd.evaluate(net, [dict(r) for r in grid["grid"]], constants)
            misses = {k: round(v, 2) for k, v in res["cell_errors"].items() if abs(v) > 0.25}
            print(f"  {g:20s} {res['within_25pct']}/{res['cells']} picks "
                  f"{res['picks_fastest']}/{len(res['choices'])} {misses}")  # fmt: skip


MODELS = ("costmodel", "costmodel_measured_relay", "costmodel_relay",
          "costmodel_relay_direct", "costmodel_first_round",
          "costmodel_relay_grid_width",
          "costmodel_served_contention", "costmodel_w1", "costmodel_shallow_calibration")  # fmt: skip


def t_upper(values: list[float]) -> float:
    """The upper end of the two-sided 95% t interval of ``values``' mean."""
    n = len(values)
    return float(np.mean(values) + t95_exact(n) * np.std(values, ddof=1) / n**0.5)


def summary(path: Path) -> None:
    report = json.loads(path.read_text())
    reps: dict[str, list[float]] = {}
    for r in report.get("grid_repetitions", []):
        if "failed" not in r:
            label = f"N={r['shards']} {r['channel'] if r['shards'] > 1 else 'direct'} {r['method']}"
            reps.setdefault(label, []).append(float(r["latency_s"]))
    for name in MODELS:
        if name not in report:
            continue
        res = report[name]
        errors = res["cell_errors"]
        absolute = [abs(e) for e in errors.values()]
        inside = 0
        for label, predicted in res["cell_predicted_s"].items():
            per = [predicted / latency - 1 for latency in reps.get(label, [])]
            if len(per) > 1:
                half = t95_exact(len(per)) * np.std(per, ddof=1) / len(per) ** 0.5
                inside += np.mean(per) - half >= -0.25 and np.mean(per) + half <= 0.25
        misses = {k: round(v, 3) for k, v in errors.items() if abs(v) > 0.25}
        print(f"{name}: {res['within_25pct']}/{res['cells']} within 25%, picks "
              f"{res['picks_fastest']}/{len(res['choices'])}, mean |error| "
              f"{np.mean(absolute):.3f} (95% t upper {t_upper(absolute):.3f}), cells whose "
              f"repetitions' 95% t interval is within 25%: {inside}; misses {misses}")  # fmt: skip
    if "links_off_shared_memory" in report:  # nineteenth session: the link rule
        print(f"sharded direct cells not all on shared memory: "
              f"{report['links_off_shared_memory'] or 'none'}")  # fmt: skip
    rule = report.get("primary_rule")
    if rule:
        print(f"primary by the rule (calibration alone): {rule['primary']} {rule.get('checks')}")
    per = report.get("per_repetition")
    if per:
        print(f"per repetition (costmodel, at its hold speed): picks {per['picks_fastest']}/"
              f"{per['groups']}")  # fmt: skip


def pingpong(path: Path) -> None:
    """A calibration's ping-pong figures (nineteenth session), its rule, and the hypothesis
    reading the plan declared: N = 2's ``off_cpu_s`` above 0 in every estimate, and N = 4's
    median under half N = 2's."""
    calibration = json.loads(path.read_text())["calibration"]
    found = calibration.get("pingpong", {})
    medians = {}
    for shards, figures in sorted(found.items()):
        estimates = [e for b in figures["batches"].values() for e in b["rounds_off_cpu_s"]]
        medians[shards] = float(np.median(estimates))
        for batch, b in sorted(figures["batches"].items()):
            print(f"N = {shards} batch {batch}: per exchange round wall {b['wall_s'] * 1e3:.3f} ms, "
                  f"managers' CPU {b['cpu_s'] * 1e3:.3f} ms, off CPU {b['off_cpu_s'] * 1e3:.3f} ms; "
                  f"rounds' off CPU {[round(e * 1e3, 3) for e in b['rounds_off_cpu_s']]}")  # fmt: skip
        print(f"N = {shards}: off CPU (median of batches) {figures['off_cpu_s'] * 1e3:.3f} ms; "
              f"median of {len(estimates)} estimates {medians[shards] * 1e3:.3f} ms; all > 0: "
              f"{all(e > 0 for e in estimates)}")  # fmt: skip
    if "2" in medians and "4" in medians:
        two = [e for b in found["2"]["batches"].values() for e in b["rounds_off_cpu_s"]]
        supported = all(e > 0 for e in two) and medians["4"] < medians["2"] / 2
        print(f"hypothesis (on no core at N = 2, hidden at N = 4): "
              f"{'supported' if supported else 'not supported'}")  # fmt: skip
    for row in calibration["runs"].get("pingpong", []):
        print(f"  {row['depth']} layers N = {row['shards']} batch {row['batch']}: "
              f"{row['seconds'] * 1e3:.2f} ms, managers' CPU {row['managers_ms']:.2f} ms, "
              f"waiting for a core {row['managers_wait_ms']:.2f} ms, messages "
              f"{row.get('links', {}).get('messages')}")  # fmt: skip
    rule = calibration.get("primary_rule", {})
    print(f"primary by the rule: {rule.get('primary')} {rule.get('checks')}; pinned "
          f"{rule.get('per_relay_sync_s')}")  # fmt: skip
    for form in ("default", "measured_relay"):
        if form in rule:
            print(f"  {form}: N = 2 direct median error {rule[form]['n2_median_error']:+.4f}, "
                  f"N >= 4 median |error| {rule[form]['n4_median_abs_error']:.4f}")  # fmt: skip
    print(f"calibration runs not all on shared memory: "
          f"{calibration.get('links_off_shared_memory')}")  # fmt: skip


def rounds(path: Path) -> None:
    """A calibration in rounds (the follow-up's): per group of sharded runs, the median over
    runs of the rounds' range over their median, and of the first round over the median
    (what a calibration that timed each run once would have read), and the server's CPU
    per request (``others_ms``, median of the rounds) per channel at N = 2."""
    runs = json.loads(path.read_text())["calibration"]["runs"]["channels"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if "rounds_seconds" in r:
            groups.setdefault(f"N = {r['shards']}" if r["shards"] == 2 else "N >= 4", []).append(r)
    for name, rows in sorted(groups.items()):
        spread = [
            (max(r["rounds_seconds"]) - min(r["rounds_seconds"])) / r["seconds"] for r in rows
        ]
        first = [r["rounds_seconds"][0] / r["seconds"] for r in rows]
        print(f"{name}: {len(rows)} runs; rounds' range / median: median {np.median(spread):.3f} "
              f"(max {max(spread):.3f}); first round / median: median {np.median(first):.3f} "
              f"({min(first):.3f}-{max(first):.3f})")  # fmt: skip
    for channel in sorted({r["channel"] for r in runs}):
        others = [r["others_ms"] for r in runs if r["channel"] == channel and r["shards"] == 2
                  and "others_ms" in r]  # fmt: skip
        if others:
            print(f"  {channel} N = 2: others_ms median {np.median(others):.2f} "
                  f"({min(others):.2f}-{max(others):.2f})")  # fmt: skip


def _without_channel(c: costmodel.Constants, channel: str) -> costmodel.Constants:
    """``c`` with ``channel``'s message, byte, wait and relay terms at 0 (its call to a shard
    kept): what the model charges a split for everything but its exchanges."""
    cost = dataclasses.replace(c.channels[channel], per_message_s=0.0, per_byte_s=0.0,
                               per_sync_s=0.0, per_wake_s=0.0, per_relay_message_s=0.0,
                               per_relay_byte_s=0.0)  # fmt: skip
    return dataclasses.replace(c, channels={**c.channels, channel: cost})


def _per_round(p: costmodel.Profile, batch: int, channel: str, c: costmodel.Constants,
               measured: float) -> tuple[int, float, float, float]:  # fmt: skip
    """(exchange rounds, predicted seconds, measured and predicted seconds per round beyond
    the model's compute and fixed parts)."""
    rounds = int((p.sync.max(axis=1) > 0).sum())
    predicted = costmodel.predict(p, batch=batch, channel=channel, constants=c)
    rest = costmodel.predict(p, batch=batch, channel=channel,
                             constants=_without_channel(c, channel))  # fmt: skip
    return (
        rounds,
        predicted,
        (measured - rest) / max(rounds, 1),
        (predicted - rest) / max(rounds, 1),
    )


def per_round(channel: str) -> None:
    seen: set[str] = set()
    for g, cal_name in ROUND_HOLDS:
        grid = json.loads((ROOT / "bench" / f"fsd-grid-{g}.json").read_text())
        cal = json.loads((ROOT / "bench" / f"fsd-calibration-{cal_name}.json").read_text())
        runs = cal["calibration"]["runs"]
        fitted = {**runs, "channels": [r for r in runs["channels"] if not fsd._grid_width(r)]}
        c = fsd.fit_constants(fitted, cores=2)
        net = radix_net(grid["net"]["neurons"], grid["net"]["layers"])
        reps: dict[str, list[float]] = {}
        for r in grid.get("grid_repetitions", []):
            if "failed" not in r and r["shards"] == 2 and r["channel"] == channel:
                reps.setdefault(r["method"], []).append(round(r["latency_s"] * 1e3, 1))
        print(f"{g} ({grid['net']['neurons']} x {grid['net']['layers']}), calibration {cal_name}")
        for r in sorted(grid["grid"], key=lambda r: r["method"]):
            if "failed" in r or r["shards"] != 2 or r["channel"] != channel:
                continue
            p = fsd._grid_profile(net, 2, r["method"], int(r.get("seed", 0)))
            here = costmodel.at_speed(c, r["probe_s"])
            n, predicted, meas, model = _per_round(p, r["batch"], channel, here, r["latency_s"])
            kib = r["batch"] * 4 * p.values.sum() / max(p.messages.sum(), 1) / 1024
            print(f"  {r['method']:10s} {r['latency_s'] * 1e3:6.1f} ms, predicted "
                  f"{predicted * 1e3:6.1f} ({predicted / r['latency_s'] - 1:+.2f}); {n:3d} rounds "
                  f"of {kib:.0f} KiB, {p.ops.mean():.2f} products a layer; per round measured "
                  f"{meas * 1e3:.3f} ms, model {model * 1e3:.3f} ms; repetitions "
                  f"{reps.get(r['method'], [])}")  # fmt: skip
        if cal_name in seen:
            continue
        seen.add(cal_name)
        probes = [r["probe_s"] for part in ("compute", "coordinator", "channels")
                  for r in runs[part] if "probe_s" in r]  # fmt: skip
        reference = float(np.median(probes))
        own, errors = [], {}
        for r in runs["channels"]:
            p = fsd._channel_profile(r)
            measured = r["seconds"] * reference / r["probe_s"]
            n, predicted, meas, _ = _per_round(p, r["batch"], r["channel"], c, measured)
            if r["channel"] == channel and r["shards"] == 2 and "split" not in r:
                own.append(meas * 1e3)
            if not fsd._grid_width(r):
                errors.setdefault((r["channel"], r["shards"]), []).append(predicted / measured - 1)
        print(f"  calibration {cal_name}: its {channel} N = 2 runs' per round measured median "
              f"{np.median(own):.3f} ms ({min(own):.3f}-{max(own):.3f}); the default fit on "
              "its own runs, median error: " + ", ".join(
                  f"N = {n} {np.median(e):+.3f}" for (ch, n), e in sorted(errors.items())
                  if ch == channel))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decompose", nargs=2, type=Path, metavar=("GRID", "CAL"))
    parser.add_argument("--relay", action="store_true", help="decompose under the relay form")
    parser.add_argument("--score", action="store_true")
    parser.add_argument("--summary", type=Path, metavar="REPORT")
    parser.add_argument("--rounds", type=Path, metavar="CAL", help="a calibration's rounds")
    parser.add_argument("--per-round", action="store_true", help="N = 2 exchange rounds")
    parser.add_argument("--pingpong", type=Path, metavar="CAL", help="a calibration's ping-pong")
    parser.add_argument("--channel", default="direct", help="the channel --per-round reads")
    args = parser.parse_args()
    if args.decompose:
        form = FORMS["relay, w = 0.3" if args.relay else "w = 0.3"]
        decompose(*args.decompose, **form)
    if args.score:
        score()
    if args.summary:
        summary(args.summary)
    if args.rounds:
        rounds(args.rounds)
    if args.pingpong:
        pingpong(args.pingpong)
    if args.per_round:
        per_round(args.channel)


if __name__ == "__main__":
    main()
