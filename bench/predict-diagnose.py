"""Where a residency setting's capacity cold starts come from: every eviction, what the
predictor believed about each victim then, and what happened after.

Replays one seed of ``bench/predict.py``'s orcbench workload under a few settings (the same
simulation, ``predict.build_simulation``) with a simulation that also records, for every load
that had to evict: the loading model, the bytes it needed, and for each victim its size, the
predictor's ``P(request within 30 s)`` at that moment (ours' model, learned from the same
arrivals under every setting, so the baselines' victims are judged by the same belief), the
set rule's cost terms, and the time until the victim's next request in the trace. Each cold
start caused by a capacity eviction is tied to the eviction that removed its model. Then it
compares the settings request by request (the trace, and so each request's index, is the
same under every setting).

    PYTHONHASHSEED=0 python bench/predict-diagnose.py --seed 3 \\
        --only ours-p0.3-k0,ours-p0.3,hybrid --json diag3.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import importlib.util

_spec = importlib.util.spec_from_file_location("predict", Path(__file__).with_name("predict.py"))
assert _spec is not None and _spec.loader is not None
predict = importlib.util.module_from_spec(_spec)
sys.modules["predict"] = predict
_spec.loader.exec_module(predict)

from sim.residency import ResidencySimulation, size_class  # noqa: E402

from gpufaas.cache.arrivals import PredictivePolicy, refill_costs  # noqa: E402

HORIZON_S = 30.0  # the victims' horizon of the default rule


class RecordingSimulation(ResidencySimulation):
    """The residency simulation, recording every eviction a request's load makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.belief = PredictivePolicy()  # ours' model of the arrivals, the same under all
        catalogue = args[1]
        for function, t_s in kwargs.get("history", ()):  # what the gateway saw before
            self.belief.observe(catalogue[function].name, t_s)
        super().__init__(*args, **kwargs)
        self.eviction_log: list[dict[str, Any]] = []  # one per load that evicted
        self.last_eviction: dict[str, tuple[int, int]] = {}  # model -> (event, victim)
        self.blame: dict[int, tuple[int, int] | None] = {}  # cold request -> its eviction
        # second copies: (device, model) -> when a copy last left it and how many devices held
        # the model just before; and per "replica" load (LALB loading a copy while another
        # device holds one) what that record said
        self.left_at: dict[tuple[str, str], tuple[float, int, str]] = {}
        self.second_copies: dict[int, dict[str, Any]] = {}

    def _arrive(self, request: Any) -> None:
        self.belief.observe(request.model.name, self.now / 1000)
        super()._arrive(request)

    def _make_room(self, device: Any, size: int, request: Any) -> list[Any]:
        now_s = self.now / 1000
        node = self._node(device)
        need = size - device.cache.free_bytes
        residents = [(e.key, e.size_bytes) for e in device.cache.entries_lru() if not e.pinned][
            : self.tiers.eviction_sample
        ]
        beliefs = self._beliefs(residents, node, now_s)
        holders = {e.key: len(self.directory.holder_ids(e.key)) for e in device.cache.entries_lru()}
        evicted = super()._make_room(device, size, request)
        for e in evicted:
            self.left_at[(device.key, e.key)] = (now_s, holders.get(e.key, 1), "capacity")
        if not evicted:
            return evicted
        victims = []
        for e in evicted:
            b = beliefs.get(e.key, {})
            victims.append({"model": e.key, "bytes": e.size_bytes, **b})
            self.last_eviction[e.key] = (len(self.eviction_log), len(victims) - 1)
        self.eviction_log.append(
            {
                "t_s": now_s,
                "device": device.key,
                "load": request.model.name,
                # why the loading model was not there: "capacity" is a victim returning
                "load_cause": self._cause(device, request.model.name),
                "load_bytes": size,
                "need_bytes": need,
                "freed_bytes": sum(e.size_bytes for e in evicted),
                "candidates": len(residents),
                "victims": victims,
            }
        )
        return evicted

    def _beliefs(
        self, residents: list[tuple[str, int]], node: str, now_s: float
    ) -> dict[str, dict[str, float]]:
        """The set rule's terms for each candidate, from ours' model (what it believed), as the
        rule up to the eighth session computed them (`-b0-j0`: P over the fixed 30 s horizon,
        one miss), the same belief under every setting."""
        if not residents:
            return {}
        ours = self.belief
        p = [ours._p_evicted(name, now_s, [HORIZON_S]) for name, _ in residents]
        base = [
            pi * (self._reload_ms(node, name) + ours.miss_ms)
            for pi, (name, _) in zip(p, residents, strict=True)
        ]
        sizes = [s for _, s in residents]
        again = refill_costs(sizes, base)
        ranked = sorted(range(len(sizes)), key=lambda i: base[i] / max(1, sizes[i]))
        rank = {i: r for r, i in enumerate(ranked)}
        return {
            name: {
                "p": p[i],
                "base": base[i],
                "refill": again[i],
                "cost": base[i] + ours.reevict * p[i] * again[i],
                "rank_per_byte": rank[i],
                "copies_elsewhere": max(0, len(self.directory.holder_ids(name)) - 1),
                "lru_position": i,
            }
            for i, (name, _) in enumerate(residents)
        }

    def _tick(self) -> None:
        before = {
            (d.key, e.key): len(self.directory.holder_ids(e.key))
            for d in self.devices
            for e in d.cache.entries_lru()
        }
        super()._tick()
        after = {(d.key, e.key) for d in self.devices for e in d.cache.entries_lru()}
        for key in before.keys() - after:
            self.left_at[key] = (self.now / 1000, before[key], "demoted")

    def _load_ms(self, device: Any, request: Any) -> float:
        load_ms = super()._load_ms(device, request)
        if self.cause_of.get(request.index) == "replica":
            left = self.left_at.get((device.key, request.model.name))
            self.second_copies[request.index] = {
                "model": request.model.name,
                "here_before": None if left is None else left[2],
                "sole_copy_then": None if left is None else left[1] <= 1,
                "seconds_since": None if left is None else self.now / 1000 - left[0],
            }
        return load_ms

    def _start(self, device: Any, request: Any) -> None:
        super()._start(device, request)
        if self.cause_of.get(request.index) == "capacity" and request.index not in self.blame:
            self.blame[request.index] = self.last_eviction.get(request.model.name)


def record(job: dict[str, Any]) -> dict[str, Any]:
    sim = predict.build_simulation(job, RecordingSimulation)
    assert isinstance(sim, RecordingSimulation)
    report = sim.report()
    trace = sim.trace
    names = [m.name for m in sim.catalogue]
    arrivals: dict[str, list[float]] = defaultdict(list)
    for t_ms, f in zip(trace.arrival_ms.tolist(), trace.model.tolist(), strict=True):
        arrivals[names[f]].append(t_ms / 1000)
    for event in sim.eviction_log:
        for v in event["victims"]:
            times = arrivals[v["model"]]
            k = bisect.bisect_right(times, event["t_s"])
            v["next_s"] = times[k] - event["t_s"] if k < len(times) else None
    skip = int(len(trace) * sim.config.warmup_fraction)
    cold = {r.index: float(sim.weights[r.index]) for r in sim.done if r.index >= skip and not r.hit}
    # per request: how long it waited for its device (queue) and in all (kept in memory for
    # the comparison: was a second copy's request here served from a queue there?)
    queue_ms = np.full(len(trace), np.nan)
    latency_ms = np.full(len(trace), np.nan)
    for r in sim.done:
        queue_ms[r.index] = r.start_ms - r.arrival_ms
        latency_ms[r.index] = r.end_ms - r.arrival_ms
    return {
        "label": job["label"],
        "report": {k: report[k] for k in ("cold_start_ratio", "device_gb_s", "cold_by_size")},
        "weighted_requests": report["weighted_requests"],
        "events": sim.eviction_log,
        "cold": cold,
        "cause": {i: sim.cause_of.get(i, "joined") for i in cold},
        "blame": {i: sim.blame.get(i) for i in cold},
        "model_of": {i: sim.trace.model[i].item() for i in cold},
        "second_copies": {i: v for i, v in sim.second_copies.items() if i in cold},
        "names": names,
        "sizes": {m.name: m.profile.size_bytes for m in sim.catalogue},
        "queue_ms": queue_ms,
        "latency_ms": latency_ms,
    }


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """One setting's evictions and capacity cold starts, by size class."""
    n = run["weighted_requests"]
    events = run["events"]
    victims = [v for e in events for v in e["victims"]]
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in victims:
        by_class[size_class(v["bytes"])].append(v)
    per_class = {}
    for cls, vs in sorted(by_class.items()):
        within = [v for v in vs if v["next_s"] is not None]
        per_class[cls] = {
            "victims": len(vs),
            "mean_p30": statistics.fmean(v.get("p", 0.0) for v in vs),
            "requested_within_30s": sum(v["next_s"] <= HORIZON_S for v in within) / len(vs),
            "median_next_s": statistics.median(v["next_s"] for v in within) if within else None,
        }
    # capacity cold starts (weighted share of all requests) by victim class x load class
    blamed: Counter[tuple[str, str]] = Counter()
    unblamed = 0.0
    by_function: Counter[str] = Counter()
    for i, w in run["cold"].items():
        if run["cause"][i] != "capacity":
            continue
        name = run["names"][run["model_of"][i]]
        by_function[name] += w / n
        link = run["blame"][i]
        if link is None:
            unblamed += w / n
            continue
        event = events[link[0]]
        blamed[(size_class(run["sizes"][name]), size_class(event["load_bytes"]))] += w / n
    # what ours believed about the victims whose eviction a cold start followed, and the rest
    blamed_victims = {tuple(link) for i, link in run["blame"].items() if link is not None}
    believed: dict[str, list[float]] = {"caused a cold start": [], "did not": []}
    copies: dict[str, list[bool]] = {"caused a cold start": [], "did not": []}
    for k, e in enumerate(events):
        for j, v in enumerate(e["victims"]):
            key = "caused a cold start" if (k, j) in blamed_victims else "did not"
            believed[key].append(v.get("p", 0.0))
            copies[key].append(v.get("copies_elsewhere", 0) > 0)
    # second-copy ("replica") cold starts: had this device held the model before, and was its
    # copy there then the only one (a sole copy evicted here, the model back elsewhere since)?
    second: Counter[str] = Counter()
    for i, v in run["second_copies"].items():
        here = v["here_before"]
        kind = (
            "never here"
            if here is None
            else f"{here} here, "
            + ("a sole copy then" if v["sole_copy_then"] else "a copy elsewhere then")
        )
        second[kind] += run["cold"][i] / n
    need = [e["need_bytes"] for e in events]
    freed = [e["freed_bytes"] for e in events]
    return {
        "cold_start_ratio": run["report"]["cold_start_ratio"],
        "device_gb_s": run["report"]["device_gb_s"],
        "loads_that_evicted": len(events),
        "victims": len(victims),
        "victims_per_evicting_load": len(victims) / max(1, len(events)),
        "bytes_needed_gb": sum(need) / 1e9,
        "bytes_freed_gb": sum(freed) / 1e9,
        "evicting_loads_by_class": dict(Counter(size_class(e["load_bytes"]) for e in events)),
        # an evicting load that is itself a victim's return: the chain the set rule starts
        "evicting_loads_by_cause": dict(Counter(e["load_cause"] for e in events)),
        "victims_with_copies_elsewhere": {
            k: (sum(v) / len(v) if v else None, len(v)) for k, v in copies.items()
        },
        "victims_mean_p30": {
            k: (statistics.fmean(v) if v else None, len(v)) for k, v in believed.items()
        },
        "victims_by_class": per_class,
        "capacity_cold_by_victim_and_load_class": {
            f"{victim} evicted by a {load} load": share for (victim, load), share in blamed.items()
        },
        "capacity_cold_unlinked": unblamed,
        "second_copy_cold": dict(second.most_common()),
        "top_functions": by_function.most_common(8),
    }


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Request by request: the weighted share cold under one setting and warm under another."""
    out: dict[str, Any] = {}
    n = runs[0]["weighted_requests"]
    for a in runs:
        for b in runs:
            if a is b:
                continue
            only = {i: w for i, w in a["cold"].items() if i not in b["cold"]}
            classes: Counter[str] = Counter()
            for i, w in only.items():
                name = a["names"][a["model_of"][i]]
                classes[f"{size_class(a['sizes'][name])}/{a['cause'][i]}"] += w / n
            # second copies loaded here for requests the other served warm: from a queue there
            # (its holder busy: this setting loaded a copy where the other waited) or at once
            second = [i for i in only if a["cause"][i] == "replica"]
            queued = [i for i in second if b["queue_ms"][i] > 1e-6]
            out[f"cold under {a['label']}, warm under {b['label']}"] = {
                "share": sum(only.values()) / n,
                "by_class_and_cause": dict(classes.most_common(8)),
                "second_copies": {
                    "share": sum(only[i] for i in second) / n,
                    "requests": len(second),
                    "queued_there": len(queued),
                    "median_queue_there_ms": _median(b["queue_ms"], queued),
                    "median_latency_there_ms": _median(b["latency_ms"], second),
                    "median_latency_here_ms": _median(a["latency_ms"], second),
                },
            }
    return out


def _median(values: Any, indices: list[int]) -> float | None:
    return float(np.median(values[indices])) if indices else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--only", default="ours-p0.3-k0,ours-p0.3,hybrid")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--json", help="write the summaries and comparisons here")
    args = p.parse_args()
    bench_args = predict._parser().parse_args(["--minutes", str(args.minutes)])
    base = predict.base_job(bench_args, args.seed)
    runs = []
    for label in args.only.split(","):
        setting, policy, params, prefetch = predict.setting_for(label)
        job = {**base, "label": setting, "policy": policy, "params": params, "prefetch": prefetch}
        runs.append(record(job))
        print("done", label, runs[-1]["report"]["cold_start_ratio"], flush=True)
    result = {
        "seed": args.seed,
        "settings": {r["label"]: summarise(r) for r in runs},
        "request_by_request": compare(runs),
    }
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
