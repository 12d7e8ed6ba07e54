"""Predictive residency, live: an orcbench trace replayed against ``gpufaas up`` on CPU devices.

The simulator's trace (``bench/sim/trace.py``: ``orcbench trace --N 10 --scale 0.05 --runtime 60``,
465 functions over one hour) is scaled down to what two shared cores can serve:

* **functions**: ``--functions K`` of them drawn at random (seeded) from the trace;
* **thinning**: a function invoked more than ``--max-per-hour`` times keeps every k-th
  invocation and each kept one counts k times in the cold-start ratio (as in the simulator);
* **sizes**: each function keeps the model size the simulator maps it to (``assign_models``:
  20 MB-16 GB), times ``--size-scale`` (default 1e-5: 200 B-160 KB), as a TorchScript MLP
  ``16 -> h -> 4`` whose weights have that many bytes;
* **devices**: ``--nodes`` x ``--cpu-devices`` CPU devices whose total capacity is
  ``--capacity-fraction`` of the functions' device bytes (weights plus the node's activation
  reserve, measured by a first cluster that loads each once), so loads evict; a host tier per node that holds every model (as the simulator's);
* **time**: compressed by ``--time-scale F`` (default 30: one trace hour in two wall minutes).
  The arrivals are sent at ``trace seconds / F``, and the gateway's prefetch driver runs its
  policy on a clock ``F`` times faster than the wall (``gpufaas up --prefetch-time-scale F``),
  so the hybrid histogram's 1-minute bins, the keep-alive's 10 minutes and ours' 30-s horizon
  are the trace's, and a load's wall milliseconds count ``F`` times in the policy's economics.

For each policy it starts ``gpufaas up`` (its own process group, always stopped), loads every
function once (so every process has run torch once and the host tiers hold every model), replays
the trace open-loop with httpx on 127.0.0.1 (bounded in flight and in time), and reports over
the requests after the first ``WARMUP_FRACTION`` of the trace: the cold-start ratio by the tier
the model came from (the gateway's ``gpufaas_cold_starts_total{source}``), device and host GB-s
(the nodes' ``gpufaas_device_tier_gb_seconds_total`` and ``gpufaas_host_tier_gb_seconds_total``,
wall seconds x actual bytes, and scaled back to trace seconds x mapped bytes), p50/p99 and the
warm requests' p99 (client-side), and prefetch precision counted at the nodes
(``gpufaas_manager_prefetch_used_total`` over ``..._prefetch_total{result="loaded"}``).

    python bench/predict_live.py --seed 3 --policies ka,hybrid,ours,ours-noprefetch
    python bench/predict_live.py --minutes 6 --functions 6 --time-scale 60   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
import yaml
from sim.live import replay_open_loop
from sim.sweep import t95
from sim.trace import ServerlessTrace, assign_models, generate_orcbench, thin

WARMUP_FRACTION = 0.1
IN_DIM, OUT_DIM = 16, 4
# (policy flag, parameters) per label; "{price}" is the --price value
POLICIES: dict[str, tuple[list[str], bool]] = {
    "ka": (["--prefetch", "keepalive", "--prefetch-param", "keepalive_s=600"], False),
    "hybrid": (["--prefetch", "hybrid"], True),
    "ours": (["--prefetch", "predictive", "--prefetch-param", "device_price={price}"], True),
    "ours-noprefetch": (
        [
            "--prefetch",
            "predictive",
            "--prefetch-param",
            "device_price={price}",
            "--prefetch-demote-only",
        ],
        False,
    ),
    # ours without the break-even floor (the thirteenth session's rule): it demotes, so it
    # prefetches, which the sixteenth session's replica check needs to count
    "ours-f0": (
        [
            "--prefetch",
            "predictive",
            "--prefetch-param",
            "device_price={price}",
            "--prefetch-param",
            "break_even=0",
        ],
        True,
    ),
    # the rule before the fourth session's miss_ms (a cold start's own cost): the check of why
    # the live operating point moved (bench/RESULTS.md, seventh session)
    "ours-m0-noprefetch": (
        [
            "--prefetch",
            "predictive",
            "--prefetch-param",
            "device_price={price}",
            "--prefetch-param",
            "miss_ms=0",
            "--prefetch-demote-only",
        ],
        False,
    ),
}
LABELS = {
    "ka": "lru+ka-10min",
    "hybrid": "hybrid",
    "ours": "ours",
    "ours-noprefetch": "ours-noprefetch",
    "ours-f0": "ours-f0",
    "ours-m0-noprefetch": "ours-m0-noprefetch",
}


# -- the workload ----------------------------------------------------------------------------------


def hidden_units(weight_bytes: float) -> int:
    """``h`` such that ``16 -> h -> 4`` (FP32, with biases) has about ``weight_bytes``."""
    per_unit = 4 * (IN_DIM + 1 + OUT_DIM)
    return max(1, round((weight_bytes / 4 - OUT_DIM) * 4 / per_unit))


def pick_functions(trace: ServerlessTrace, *, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 31])
    return sorted(
        rng.choice(len(trace.functions), size=min(k, len(trace.functions)), replace=False)
    )


def workload(
    trace: ServerlessTrace, *, picked: list[int], minutes: float, max_per_hour: float
) -> tuple[ServerlessTrace, np.ndarray[Any, Any]]:
    """The picked functions' invocations in the first ``minutes``, renumbered 0..K-1, thinned."""
    index = {f: i for i, f in enumerate(picked)}
    keep = np.isin(trace.function, picked) & (trace.arrival_s < minutes * 60)
    sub = ServerlessTrace(
        functions=[trace.functions[f] for f in picked],
        clusters=[trace.clusters[f] for f in picked],
        arrival_s=trace.arrival_s[keep] - float(trace.arrival_s[0]),
        function=np.asarray([index[int(f)] for f in trace.function[keep]], dtype=np.int64),
        runtime_ms=trace.runtime_ms[keep],
    )
    if max_per_hour <= 0:
        return sub, np.ones(len(sub))
    return thin(sub, max_per_hour=max_per_hour)


def build_models(folder: Path, hidden: list[int]) -> list[Path]:
    import torch
    from torch import nn

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, h in enumerate(hidden):
        torch.manual_seed(i)
        module = nn.Sequential(nn.Linear(IN_DIM, h), nn.ReLU(), nn.Linear(h, OUT_DIM))
        path = folder / f"fn-{i:03d}.pt"
        torch.jit.save(torch.jit.script(module.eval().requires_grad_(False)), str(path))
        paths.append(path)
    return paths


def write_functions(folder: Path, models: list[Path]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in models:
        name = path.stem
        document = {
            "apiVersion": "gpufaas.dev/v1alpha1",
            "kind": "InferenceFunction",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": path.resolve().as_uri(), "format": "torchscript"},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, IN_DIM]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, OUT_DIM]}],
                "batching": {"maxBatchSize": 8, "maxDelayMs": 2},
            },
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document))
        names.append(name)
    return names


REQUEST = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, IN_DIM], "datatype": "FP32", "data": [0.5] * IN_DIM}]}
).encode()


# -- the cluster -----------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster(command_tail: list[str], *, home: Path, log: Path, functions: int) -> Iterator[str]:
    """``gpufaas up`` in its own process group until ready; always stopped (TERM, then KILL)."""
    from gpufaas.scheduler.local import free_port

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gpufaas.core.cli",
        "up",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        *command_tail,
    ]
    env = {**os.environ, "GPUFAAS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gpufaas up exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"gpufaas up was not ready within 180 s; see {log}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    index = httpx.post(f"{url}/v2/repository/index", timeout=5).json()
                    if len(index) >= functions:
                        break
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# -- counters --------------------------------------------------------------------------------------

GATEWAY_COUNTERS = (
    "gpufaas_cold_starts_total",
    "gpufaas_prefetch_actions_total",
    "gpufaas_prefetch_used_total",
)
NODE_COUNTERS = (
    "gpufaas_device_tier_gb_seconds_total",
    "gpufaas_host_tier_gb_seconds_total",
    "gpufaas_manager_prefetch_total",
    "gpufaas_manager_prefetch_used_total",
    "gpufaas_manager_prefetch_unused_total",
    "gpufaas_manager_demotions_total",
)


def _samples(text: str, names: tuple[str, ...], into: Counter[str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                labels = ",".join(
                    f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "device"
                )
                key = f"{sample.name}{{{labels}}}" if labels else sample.name
                into[key] += sample.value  # type: ignore[assignment]  # a Counter of floats


async def counters(client: httpx.AsyncClient, url: str) -> Counter[str]:
    """The gateway's prediction counters and every node's, summed over devices."""
    out: Counter[str] = Counter()
    _samples((await client.get(f"{url}/metrics", timeout=10)).text, GATEWAY_COUNTERS, out)
    state = (await client.get(f"{url}/v2/gpufaas/cluster", timeout=10)).json()
    for node in state["nodes"]:
        text = (await client.get(f"{node['url']}/metrics", timeout=10)).text
        _samples(text, NODE_COUNTERS, out)
    return out


# -- the replay ------------------------------------------------------------------------------------


async def replay(
    url: str,
    *,
    names: list[str],
    arrivals_s: list[float],
    mark_s: float,
    max_seconds: float,
    max_in_flight: int = 64,
) -> tuple[list[dict[str, Any]], Counter[str], Counter[str]]:
    """Send request ``i`` at ``arrivals_s[i]`` wall seconds (open loop); the counters at
    ``mark_s`` (the end of the warm-up) and at the end."""
    results: list[dict[str, Any]] = [{} for _ in names]
    gate = asyncio.Semaphore(max_in_flight)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    headers = {"content-type": "application/json"}
    clock_offset = time.perf_counter() - time.time()  # perf_counter - epoch
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def one(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    r = await client.post(
                        f"/v2/models/{names[i]}/infer", content=REQUEST, headers=headers
                    )
                except httpx.HTTPError as e:
                    results[i] = {"error": type(e).__name__}
                    return
                results[i] = {
                    "status": r.status_code,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                    "hit": r.headers.get("x-gpufaas-cache") == "hit",
                    "reason": r.headers.get("x-gpufaas-reason", ""),
                    # for --raw: when it was sent (wall epoch), its forward pass, its batch
                    "sent_epoch": started - clock_offset,
                    "compute_ms": _header_float(r.headers.get("x-gpufaas-compute-ms")),
                    "batch": _header_float(r.headers.get("x-gpufaas-batch-size")),
                }

        marks: list[Counter[str]] = []

        async def mark_once(at: float) -> None:
            if not marks and at >= mark_s:
                marks.append(await counters(client, url))

        await replay_open_loop(arrivals_s, one, max_seconds=max_seconds, before=mark_once)
        at_end = await counters(client, url)
    return results, marks[0] if marks else Counter(), at_end


def _header_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


PREFETCH_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO gpufaas\.gpu_manager\.prefetch: "
    r"prefetch of (\S+) onto (\S+) (started|loaded in ([\d.]+) ms|preempted by a request)$"
)


def prefetch_events(log: str) -> list[list[Any]]:
    """The nodes' prefetch lines in a cluster log: ``[epoch s, model, device, event, ms]``
    (event: started, loaded, preempted; ms: the load's length when loaded)."""
    out: list[list[Any]] = []
    for line in log.splitlines():
        m = PREFETCH_LINE.match(line.strip())
        if m is None:
            continue
        when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
        event = m.group(5).split()[0]
        ms = float(m.group(6)) if m.group(6) else None
        out.append([when, m.group(3), m.group(4), event, ms])
    return out


def raw_record(
    label: str, repetition: int, seed: int, results: list[dict[str, Any]], log: str
) -> dict[str, Any]:
    """One run's requests (``[sent epoch s, index, latency ms, hit, compute ms, batch]``; None
    where a request failed) and its prefetches (:func:`prefetch_events`), for ``--raw``."""
    requests = [
        [r["sent_epoch"], i, r["latency_ms"], r["hit"], r.get("compute_ms"), r.get("batch")]
        if r.get("status") == 200
        else None
        for i, r in enumerate(results)
    ]
    return {
        "label": label,
        "repetition": repetition,
        "seed": seed,
        "requests": requests,
        "prefetches": prefetch_events(log),
    }


def warm_up(url: str, names: list[str]) -> None:
    """One request per function, one at a time."""
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for name in names:
            with contextlib.suppress(httpx.HTTPError):
                client.post(
                    f"/v2/models/{name}/infer",
                    content=REQUEST,
                    headers={"content-type": "application/json"},
                )


def resident_sizes(url: str) -> dict[str, int]:
    """Each resident model's bytes on a device (weights and activation reserve), as the
    gateway's directory has them."""
    sizes: dict[str, int] = {}
    state = httpx.get(f"{url}/v2/gpufaas/cluster", timeout=10).json()
    for device in state["devices"]:
        for model, _state, size in device["residents"]:
            sizes[model] = max(sizes.get(model, 0), int(size))
    return sizes


def measure_sizes(root: Path, names: list[str], *, cache: Path) -> dict[str, int]:
    """What each function takes on a CPU device: a cluster with room for all loads each once
    (the node measures its activation reserve); cached in ``cache``."""
    if cache.exists():
        known: dict[str, int] = json.loads(cache.read_text())
        if set(known) >= set(names):
            return known
    tail = [
        "--nodes",
        "1",
        "--cpu-devices",
        "1",
        "--device-memory",
        "1Gi",
        "--functions",
        str(root / "functions"),
    ]
    with cluster(tail, home=root / "sizing", log=root / "sizing.log", functions=len(names)) as url:
        warm_up(url, names)
        sizes = resident_sizes(url)
    missing = sorted(set(names) - set(sizes))
    if missing:
        raise SystemExit(f"sizing: {missing} did not load; see {root / 'sizing.log'}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(sizes))
    return sizes


def summarise(
    results: list[dict[str, Any]],
    weights: np.ndarray[Any, Any],
    skip: int,
    delta: dict[str, float],
    *,
    time_scale: float,
    size_scale: float,
) -> dict[str, Any]:
    measured = results[skip:]
    w = weights[skip:]
    ok = [(r, float(x)) for r, x in zip(measured, w, strict=True) if r.get("status") == 200]
    latency = np.asarray([r["latency_ms"] for r, _ in ok]) if ok else np.zeros(0)
    warm = np.asarray([r["latency_ms"] for r, _ in ok if r["hit"]])
    weight = sum(x for _, x in ok)
    cold_weight = sum(x for r, x in ok if not r["hit"])
    cold = {
        k.split("source=")[1].rstrip("}"): v
        for k, v in delta.items()
        if k.startswith("gpufaas_cold_starts_total{")
    }
    cold_total = sum(cold.values())
    misses = sum(1 for r, _ in ok if not r["hit"])
    loaded = delta.get("gpufaas_manager_prefetch_total{result=loaded}", 0.0)
    used = delta.get("gpufaas_manager_prefetch_used_total", 0.0)
    device_gbs = delta.get("gpufaas_device_tier_gb_seconds_total", 0.0)
    host_gbs = delta.get("gpufaas_host_tier_gb_seconds_total", 0.0)

    def pct(a: np.ndarray[Any, Any], q: float) -> float:
        return float(np.percentile(a, q)) if len(a) else math.nan

    return {
        "requests": len(measured),
        "errors": len(measured) - len(ok),
        "error_kinds": dict(
            Counter(
                str(r.get("reason") or r.get("status") or r.get("error", "unsent"))
                for r in measured
                if r.get("status") != 200
            )
        ),
        "cold_ratio": cold_weight / weight if weight else math.nan,
        "cold_ratio_unweighted": misses / len(ok) if ok else math.nan,
        # the gateway's count by source, spread over the client-side ratio
        "cold_by_tier": {
            k: v / cold_total * (cold_weight / weight if weight else 0.0)
            for k, v in sorted(cold.items())
        }
        if cold_total
        else {},
        "p50_ms": pct(latency, 50),
        "p99_ms": pct(latency, 99),
        "warm_p99_ms": pct(warm, 99),
        "warm_requests": len(warm),
        "device_gb_s": device_gbs,
        "host_gb_s": host_gbs,
        "device_gb_s_mapped": device_gbs * time_scale / size_scale,
        "host_gb_s_mapped": host_gbs * time_scale / size_scale,
        "prefetch_loaded": loaded,
        "prefetch_used": used,
        "prefetch_precision": used / loaded if loaded else math.nan,
        "prefetch_outcomes": {
            k.split("result=")[1].rstrip("}"): v
            for k, v in delta.items()
            if k.startswith("gpufaas_manager_prefetch_total{")
        },
        "prefetch_unused": {
            k.split("why=")[1].rstrip("}"): v
            for k, v in delta.items()
            if k.startswith("gpufaas_manager_prefetch_unused_total{")
        },
        "demotions": delta.get("gpufaas_manager_demotions_total", 0.0),
        "gateway_prefetch_used": delta.get("gpufaas_prefetch_used_total", 0.0),
        # what the gateway's driver sent (kind, sent / failed): with the nodes' outcomes, tells
        # a prefetch never sent from one sent and skipped or lost
        "gateway_actions": {
            k.split("{")[1].rstrip("}"): v
            for k, v in delta.items()
            if k.startswith("gpufaas_prefetch_actions_total{")
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    trace_file = Path(args.trace_dir) / f"orc-s{args.scale}-m60-seed{args.seed}.csv"
    full = generate_orcbench(trace_file, scale=args.scale, minutes=60, seed=args.seed)
    picked = pick_functions(full, k=args.functions, seed=args.seed)
    trace, weights = workload(
        full, picked=picked, minutes=args.minutes, max_per_hour=args.max_per_hour
    )
    mapped = [assign_models(len(full.functions), seed=args.seed)[f].size_bytes for f in picked]
    hidden = [hidden_units(b * args.size_scale) for b in mapped]
    wall = (trace.arrival_s / args.time_scale).tolist()
    skip = int(len(trace) * WARMUP_FRACTION)
    mark_s = wall[skip] if skip < len(wall) else math.inf
    names_by_index: list[str] = []
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpufaas-predict-live-") as tmp:
        root = Path(tmp)
        models = build_models(root / "models", hidden)
        names_by_index = write_functions(root / "functions", models)
        key = f"{args.seed}-{args.functions}-{args.size_scale:g}"  # the models, not the minutes
        measured = measure_sizes(
            root, names_by_index, cache=Path(args.trace_dir) / f"live-sizes-{key}.json"
        )
        entry = [measured[n] for n in names_by_index]
        devices = args.nodes * args.cpu_devices
        per_device = max(max(entry) + 1, int(args.capacity_fraction * sum(entry) / devices))
        names = [names_by_index[f] for f in trace.function.tolist()]
        for repetition, label in run_order(args.policies, seed=args.seed, pairs=args.pairs):
            flags, _ = POLICIES[label]
            tail = [
                "--nodes",
                str(args.nodes),
                "--cpu-devices",
                str(args.cpu_devices),
                "--device-memory",
                str(per_device),
                "--host-memory",
                str(4 * sum(entry)),
                "--policy",
                args.routing,
                "--functions",
                str(root / "functions"),
                "--prefetch-time-scale",
                str(args.time_scale),
                "--gateways",
                str(args.gateways),
                *(["--sync-interval", str(args.sync_interval)] if args.sync_interval else []),
                *(f.format(price=args.price) for f in flags),
            ]
            log = root / f"{label}.log"
            try:
                with cluster(tail, home=root / label, log=log, functions=len(models)) as url:
                    warm_up(url, names_by_index)
                    results, at_mark, at_end = asyncio.run(
                        replay(
                            url,
                            names=names,
                            arrivals_s=wall,
                            mark_s=mark_s,
                            max_seconds=wall[-1] + 30,
                        )
                    )
            except BaseException:
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            if args.raw is not None:
                record = raw_record(
                    LABELS[label], repetition, args.seed, results, log.read_text(errors="replace")
                )
                record["functions"] = names
                with args.raw.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            delta = {k: at_end[k] - at_mark.get(k, 0.0) for k in at_end}
            row = summarise(
                results,
                weights,
                skip,
                delta,
                time_scale=args.time_scale,
                size_scale=args.size_scale,
            )
            row["repetition"] = repetition
            row["position"] = len(out)  # 0: the first run of this invocation (of its hold)
            out[f"{LABELS[label]}#{repetition}" if args.pairs > 1 else LABELS[label]] = row
            print(f"{LABELS[label]} #{repetition}: {json.dumps(row, default=float)}", flush=True)
            if row["errors"]:
                print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
    hours = args.minutes / 60
    out["_setup"] = {
        "seed": args.seed,
        "functions": len(picked),
        "requests_replayed": len(trace),
        "requests_represented": float(weights.sum()),
        "trace_minutes": args.minutes,
        "wall_seconds": wall[-1] if wall else 0.0,
        "time_scale": args.time_scale,
        "size_scale": args.size_scale,
        "mapped_gb": sum(mapped) / 1e9,
        "device_bytes_expected": sum(entry),
        "device_capacity_bytes": per_device * devices,
        "capacity_fraction": per_device * devices / sum(entry),
        "devices": f"{args.nodes} nodes x {args.cpu_devices} CPU devices of {per_device} B",
        "price": args.price,
        "max_per_hour": args.max_per_hour,
        "rate_per_wall_s": len(trace) / max(wall[-1], 1e-9) if wall else 0.0,
        "mean_rate_per_hour": len(trace) / hours,
        "routing": args.routing,
        "gateways": args.gateways,
        "sync_interval": args.sync_interval,
        "order": [label for _, label in run_order(args.policies, seed=args.seed, pairs=args.pairs)],
        "pairs": args.pairs,
        "started": started,
    }
    return out


def run_order(policies: list[str], *, seed: int, pairs: int) -> list[tuple[int, str]]:
    """The runs of one invocation, ``(repetition, policy)``: each repetition runs every
    policy once, the order reversed from one repetition to the next and from one seed to the
    next (odd seeds start reversed). The first run of a quiet-lock hold is ~10% slower
    whatever it runs (``bench/RESULTS.md``, fifth session), so an A/B pair in one order only
    measures the order."""
    out = []
    for repetition in range(pairs):
        order = policies if (seed + repetition) % 2 == 0 else policies[::-1]
        out += [(repetition, label) for label in order]
    return out


def table(out: dict[str, Any]) -> str:
    rows = [
        "| policy | cold ratio | by tier | device GB-s (mapped) | host GB-s (mapped) | p50 ms "
        "| p99 ms | warm p99 ms | prefetch precision (used/loaded) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in out.items():
        if label.startswith("_"):
            continue
        tiers = ", ".join(f"{k} {v:.4f}" for k, v in r["cold_by_tier"].items()) or "-"
        precision = (
            f"{r['prefetch_precision']:.2f} ({r['prefetch_used']:.0f}/{r['prefetch_loaded']:.0f})"
            if r["prefetch_loaded"]
            else "-"
        )
        rows.append(
            f"| {label} | {r['cold_ratio']:.4f} | {tiers} | {r['device_gb_s_mapped']:.0f} | "
            f"{r['host_gb_s_mapped']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['warm_p99_ms']:.1f} | {precision} | {r['errors']} |"
        )
    return "\n".join(rows)


def _interval(values: list[float]) -> str:
    """Mean and 95% interval (Student's t) over seeds."""
    import statistics

    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "-"
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return f"{mean:.4g}"
    t = t95(len(clean))  # Student's t, n - 1 degrees of freedom
    half = t * statistics.stdev(clean) / math.sqrt(len(clean))
    return f"{mean:.4g} ± {half:.2g}"


def aggregate(runs: list[dict[str, Any]]) -> str:
    """Per policy over the seeds (the latest invocation of each seed and policy): mean and 95%
    interval; then ours' warm p99 over ours-noprefetch's per pair (one repetition of one
    invocation), with which of the two ran first, and over all the pairs."""
    by_seed: dict[int, dict[str, Any]] = {}
    pairs: list[tuple[int, str, float, str]] = []  # (seed, started, ratio, first)
    for run in runs:
        setup = run["_setup"]
        rows = {k: v for k, v in run.items() if not k.startswith("_")}
        for position, row in enumerate(rows.values()):  # lines before "position": run order
            row.setdefault("position", position)
        for repetition in sorted({r.get("repetition", 0) for r in rows.values()}):
            pair = {
                label.split("#")[0]: r
                for label, r in rows.items()
                if r.get("repetition", 0) == repetition
            }
            by_seed.setdefault(setup["seed"], {}).update(pair)
            if "ours" in pair and "ours-noprefetch" in pair:
                on, off = pair["ours"], pair["ours-noprefetch"]
                first = "ours" if on["position"] < off["position"] else "noprefetch"
                ratio = on["warm_p99_ms"] / off["warm_p99_ms"]
                pairs.append((setup["seed"], setup.get("started", "?"), ratio, first))
    metrics = (
        "cold_ratio",
        "device_gb_s_mapped",
        "host_gb_s_mapped",
        "p50_ms",
        "p99_ms",
        "warm_p99_ms",
        "prefetch_precision",
    )
    labels = sorted({label for rows in by_seed.values() for label in rows})
    lines = [
        f"seeds: {sorted(by_seed)}",
        "| policy | seeds | " + " | ".join(metrics) + " |",
        "| --- | --- |" + " --- |" * len(metrics),
    ]
    for label in labels:
        found = [per_seed[label] for per_seed in by_seed.values() if label in per_seed]
        cells = [_interval([float(r[m]) for r in found]) for m in metrics]
        lines.append(f"| {label} | {len(found)} | " + " | ".join(cells) + " |")
    if pairs:
        per = ", ".join(f"seed {s} ({first} first): {r:.3f}" for s, _, r, first in pairs)
        lines.append(f"warm p99 ours / ours-noprefetch per pair: {per}")
        lines.append(f"over the pairs: {_interval([r for _, _, r, _ in pairs])}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.05, help="orcbench --scale (the simulator's)")
    p.add_argument("--minutes", type=float, default=60.0, help="trace minutes replayed")
    p.add_argument("--functions", type=int, default=24, help="functions drawn from the trace")
    p.add_argument("--max-per-hour", type=float, default=300.0, help="thinning; 0: none")
    p.add_argument("--time-scale", type=float, default=30.0, help="trace seconds per wall second")
    p.add_argument("--size-scale", type=float, default=1e-5, help="live bytes per mapped byte")
    p.add_argument(
        "--capacity-fraction",
        type=float,
        default=0.5,
        help="device capacity over the functions' device bytes",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway replicas (gpufaas up --gateways): the cold ratio is client-side and the "
        "prefetch outcomes the nodes', so both are the cluster's; the gateway's own counters "
        "(cold_by_tier's split, gateway_actions, gateway_prefetch_used) are one replica's",
    )
    p.add_argument("--cpu-devices", type=int, default=2)
    p.add_argument("--routing", default="lalb")
    p.add_argument(
        "--sync-interval",
        type=float,
        default=None,
        help="gpufaas up --sync-interval (wall seconds; default: up's own, 5)",
    )
    p.add_argument(
        "--price",
        type=float,
        default=3e4,
        help="ours' device_price in ms per GB-s at the live sizes",
    )
    p.add_argument("--policies", default="ka,hybrid,ours,ours-noprefetch")
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="run the policies this many times, the order reversed each time (and by seed)",
    )
    p.add_argument("--trace-dir", default=str(Path(tempfile.gettempdir()) / "gpufaas-orcbench"))
    p.add_argument("--json", type=Path, default=None, help="append the result as a JSON line")
    p.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="append each run's requests and the nodes' prefetches as a JSON line",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="print the seeds' aggregate of a --json file instead of running",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.from_json is not None:
        lines = args.from_json.read_text().splitlines()
        print(aggregate([json.loads(line) for line in lines if line.strip()]))
        return 0
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown}; choose from {sorted(POLICIES)}")
    if not args.time_scale > 0 or not args.size_scale > 0:
        raise SystemExit("--time-scale and --size-scale must be > 0")
    if args.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    out = run(args)
    print(json.dumps(out["_setup"], indent=1, default=float))
    print(table(out))
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(out, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
