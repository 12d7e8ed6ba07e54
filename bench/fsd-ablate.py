"""Offline ablation of the cost model: refit variants of it (no per-product term, no wait
term, no oversubscription term, no sharing of the cores) on a calibration run's raw measurements and score each on a
grid run, as ``fsd.py --evaluate`` does. Nothing is measured.

    python bench/fsd-ablate.py bench/fsd-calibration-s4a.json bench/fsd-grid-s4a.json
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.scheduler import costmodel as cm
from gpufaas.scheduler.partition import partition

cal = json.loads(Path(sys.argv[1]).read_text())["calibration"]
grid = json.loads(Path(sys.argv[2]).read_text())
runs = cal["runs"]
cores = cal["constants"]["cores"]
gnet = radix_net(grid["net"]["neurons"], grid["net"]["layers"])
profiles = {}


def prof(net_key, net, shards, method, seed):
    k = (net_key, shards, method, seed)
    if k not in profiles:
        profiles[k] = cm.profile(net, partition(net, shards, method=method, seed=seed))
    return profiles[k]


def refit(use_op=True, use_sync=True, cores_=cores):
    xs = [r["features"] if use_op else [0.0, r["features"][1]] for r in runs["compute"]]
    ys = [r["seconds"] for r in runs["compute"]]
    per_op, per_nnz = cm.fit(xs, ys, relative=True)
    compute = cm.Compute(per_op if use_op else 0.0, per_nnz)
    none = {"none": cm.ChannelCost(0, 0, 0, 0, 0)}
    bare = cm.Constants(compute, 0.0, 0.0, cores_, none)
    fx, fy, tot = [], [], []
    for r in runs["coordinator"]:
        net = radix_net(r["width"], 8)
        p = prof(("c", r["width"]), net, 1, "block", 0)
        layers = cm.predict(p, batch=r["batch"], channel="none", constants=bare)
        fx.append([1.0, float(r["batch"] * p.io_values)])
        fy.append(r["seconds"] - layers)
        tot.append(r["seconds"])
    per_request, per_io = cm.fit(fx, fy, relative_to=tot)
    base = cm.Constants(compute, per_request, per_io, cores_, none)
    chans = {}
    for ch in sorted({r["channel"] for r in runs["channels"]}):
        rs = []
        for r in runs["channels"]:
            if r["channel"] != ch:
                continue
            net = radix_net(2048, r["depth"])
            p = prof(("k", r["depth"]), net, r["shards"], r["method"], 2)
            if not use_sync:
                p = dataclasses.replace(p, sync=np.zeros_like(p.sync))
            rs.append((p, r["batch"], r["seconds"]))
        chans[ch] = cm.fit_channel(rs, base=base)
    if "-v" in sys.argv:
        print(
            {
                ch: f"wake {c.per_wake_s * 1e6:.0f} us, sync {c.per_sync_s * 1e6:.0f} us"
                for ch, c in chans.items()
            }
        )
    return cm.Constants(compute, per_request, per_io, cores_, chans)


def score(constants, use_sync=True):
    rows = [dict(r) for r in grid["grid"] if "failed" not in r]
    for r in rows:
        p = prof(("g",), gnet, r["shards"], r["method"], 0)
        if not use_sync:
            p = dataclasses.replace(p, sync=np.zeros_like(p.sync))
        r["predicted_s"] = cm.predict(
            p,
            batch=r["batch"],
            channel=r["channel"] if r["shards"] > 1 else "direct",
            constants=constants,
        )
        r["error"] = r["predicted_s"] / r["latency_s"] - 1
    within = sum(abs(r["error"]) <= 0.25 for r in rows)
    groups = {"all": rows}
    for ch in sorted({r["channel"] for r in rows if r["shards"] > 1}):
        groups[ch] = [r for r in rows if r["channel"] == ch or r["shards"] == 1]
    for n in sorted({r["shards"] for r in rows if r["shards"] > 1}):
        groups[n] = [r for r in rows if r["shards"] == n]
    strict = sum(
        min(g, key=lambda r: r["predicted_s"]) is min(g, key=lambda r: r["latency_s"])
        for g in groups.values()
    )
    near = sum(
        min(g, key=lambda r: r["predicted_s"])["latency_s"] <= 1.1 * min(r["latency_s"] for r in g)
        for g in groups.values()
    )
    med = float(np.median([abs(r["error"]) for r in rows]))
    return (
        f"{within}/{len(rows)} within 25%, median {med:.0%}, picks {strict}/{len(groups)} strict, {near}/{len(groups)} within 10%  "
        + " ".join(f"{r['error']:+.0%}" for r in rows)
    )


print("full model           ", score(refit()))
print("no per-op term       ", score(refit(use_op=False)))
print("no per-sync term     ", score(refit(use_sync=False), use_sync=False))
busy = cm.busy
cm.busy = lambda shards, cores: 0.0  # type: ignore[assignment]  # c_wake's feature is 0
print("no oversubscription  ", score(refit()))
cm.busy = busy
print("no contention (cores=64)", score(refit(cores_=64)))


# -------------------------------------------------------------------------------------------
# The speed probe (session 6): variants on calibrations and grids that carry probes
# -------------------------------------------------------------------------------------------
if "probe_s" in runs["compute"][0]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsd", Path(__file__).parent / "fsd.py")
    fsd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fsd)
    probed = fsd.fit_constants(cal["runs"], cores=cores, **fsd.W1)  # the form it was run with
    plain = fsd.fit_constants(cal["runs"], cores=cores, probe=False, **fsd.W1)

    def compute_only(constants, probe_s):
        ratio = probe_s / constants.probe_s
        c = constants.compute
        return dataclasses.replace(
            constants, compute=cm.Compute(ratio * c.per_op_s, ratio * c.per_nnz_s)
        )

    def probe_score(constants, scale, probe_of):
        rows = [dict(r) for r in grid["grid"] if "failed" not in r]
        for r in rows:
            p = prof(("g",), gnet, r["shards"], r["method"], 0)
            here = scale(constants, probe_of(r)) if scale else constants
            r["predicted_s"] = cm.predict(
                p,
                batch=r["batch"],
                channel=r["channel"] if r["shards"] > 1 else "direct",
                constants=here,
            )
            r["error"] = r["predicted_s"] / r["latency_s"] - 1
        global score_rows
        score_rows = rows
        return _summary(rows)

    def _summary(rows):
        within = sum(abs(r["error"]) <= 0.25 for r in rows)
        groups = {"all": rows}
        for ch in sorted({r["channel"] for r in rows if r["shards"] > 1}):
            groups[ch] = [r for r in rows if r["channel"] == ch or r["shards"] == 1]
        for n in sorted({r["shards"] for r in rows if r["shards"] > 1}):
            groups[n] = [r for r in rows if r["shards"] == n]
        strict = sum(
            min(g, key=lambda r: r["predicted_s"]) is min(g, key=lambda r: r["latency_s"])
            for g in groups.values()
        )
        med = float(np.median([abs(r["error"]) for r in rows]))
        return (
            f"{within}/{len(rows)} within 25%, median {med:.0%}, picks {strict}/{len(groups)}  "
            + " ".join(f"{r['error']:+.0%}" for r in rows)
        )

    interleaved = lambda r: r["probe_s"]  # noqa: E731
    edges = lambda r: float(np.mean(r.get("probe_edges_s", [r["probe_s"]])))  # noqa: E731
    print("probe: none (as measured)          ", probe_score(plain, None, interleaved))
    print("probe: interleaved, all constants  ", probe_score(probed, cm.at_speed, interleaved))
    print("probe: interleaved, compute only   ", probe_score(probed, compute_only, interleaved))
    print("probe: edges, all constants        ", probe_score(probed, cm.at_speed, edges))
    print("probe: normalised calibration only ", probe_score(probed, None, interleaved))
    ps = [r["probe_s"] * 1e3 for r in grid["grid"] if "probe_s" in r]
    print(
        f"grid probes ms: min {min(ps):.2f} median {np.median(ps):.2f} max {max(ps):.2f}; "
        f"calibration reference {probed.probe_s * 1e3:.2f}"
    )
