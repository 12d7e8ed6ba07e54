"""The LALB experiment against a real local cluster: ``gpufaas up`` on CPU devices.

For each policy this starts ``python -m gpufaas.core.cli up --nodes N --cpu-devices D --policy P``
with a functions folder of ``wss`` copies of the tiny-mlp and small-cnn examples (each copy is its
own function, so its own cache entry), drives the same Zipf/Poisson trace as the simulator with
httpx on 127.0.0.1, and stops the cluster. Hits and misses come from each response's
``x-gpufaas-cache`` header, load times from ``x-gpufaas-load-ms``, latency from the client.

The host tier is kept too small to hold a model, so a device miss loads from the artifact file,
as in the simulator's ``cpu`` profile. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from .belady import belady_hits
from .workload import make_trace

LIVE_KINDS = ("tiny-mlp", "small-cnn", "minilm")
# small-cnn is a torch.export program, and torch.export.load fails when two threads load at once
# ("_CURRENT_DESERIALIZER is already set"), which the GPU manager does; until model loading
# is serialised, the default live run uses tiny-mlp copies only.
DEFAULT_LIVE_KINDS = ("tiny-mlp",)
# A tiny-mlp copy takes 5,264 bytes on a device (weights and activation reserve): 32 KiB holds six.
LIVE_DEVICE_MEMORY = "32Ki"
WARMUP_FRACTION = 0.1


def write_functions(
    folder: Path, models_dir: Path, *, wss: int, kinds: tuple[str, ...] = DEFAULT_LIVE_KINDS
) -> list[dict[str, Any]]:
    """``wss`` manifests alternating ``kinds``; returns name, kind and SLO of each."""
    from gpufaas.core.manifests import bundled_functions_dir

    templates = {
        kind: yaml.safe_load((bundled_functions_dir() / f"{kind}.yaml").read_text())
        for kind in kinds
    }
    folder.mkdir(parents=True, exist_ok=True)
    functions = []
    for i in range(wss):
        kind = kinds[i % len(kinds)]
        document = json.loads(json.dumps(templates[kind]))  # a deep copy
        name = f"{kind}-{i:03d}"
        document["metadata"]["name"] = name
        filename = Path(document["spec"]["model"]["uri"]).name
        document["spec"]["model"]["uri"] = (models_dir / filename).resolve().as_uri()
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document))
        slo = document["spec"].get("slo", {}).get("latencyMs")
        functions.append({"name": name, "kind": kind, "slo_ms": slo})
    return functions


def _request_bodies() -> dict[str, bytes]:
    from gpufaas.core.examples import example_inputs

    bodies = {}
    for kind in LIVE_KINDS:
        inputs = example_inputs(kind, batch=1)
        bodies[kind] = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(array.shape),
                        "datatype": "INT64" if array.dtype.kind == "i" else "FP32",
                        "data": array.ravel().tolist(),
                    }
                    for name, array in inputs.items()
                ]
            }
        ).encode()
    return bodies


def _start_cluster(
    args: argparse.Namespace, *, policy: str, functions_dir: Path, home: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    from gpufaas.scheduler.local import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "gpufaas.core.cli", "up",
        "--nodes", str(args.nodes),
        "--cpu-devices", str(args.cpu_devices),
        "--device-memory", args.live_device_memory,
        "--host-memory", "1Ki",  # no host tier: a device miss loads from the artifact
        "--policy", policy,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--grpc-port", str(free_port()),
        "--functions", str(functions_dir),
    ]  # fmt: skip
    env = {**os.environ, "GPUFAAS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        # Its own process group: stopping it reaches the GPU managers it started too.
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, *, wss: int, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gpufaas up exited with {proc.returncode}; see {log}")
        try:
            ready = httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
            index = httpx.post(f"{url}/v2/repository/index", timeout=2).json() if ready else []
            if ready and len(index) >= wss:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"gpufaas up was not ready within 180 s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``gpufaas up`` and every process of its group (SIGTERM, then SIGKILL)."""
    group = proc.pid  # start_new_session: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _warm_up(url: str, functions: list[dict[str, Any]], bodies: dict[str, bytes]) -> None:
    """One request per function, one at a time: every process has loaded a model once (torch's
    first load in a process is slow) before the measured trace starts."""
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for function in functions:
            with contextlib.suppress(httpx.HTTPError):
                client.post(
                    f"/v2/models/{function['name']}/infer",
                    content=bodies[function["kind"]],
                    headers={"content-type": "application/json"},
                )


async def _drive(
    url: str,
    *,
    arrivals_ms: list[float],
    names: list[str],
    bodies: list[bytes],
    max_seconds: float,
    max_in_flight: int = 128,
) -> list[dict[str, Any]]:
    """Send request ``i`` at ``arrivals_ms[i]`` (open loop, bounded in flight and in time)."""
    results: list[dict[str, Any]] = [{} for _ in names]
    gate = asyncio.Semaphore(max_in_flight)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def one(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    response = await client.post(
                        f"/v2/models/{names[i]}/infer",
                        content=bodies[i],
                        headers={"content-type": "application/json"},
                    )
                except httpx.HTTPError as e:
                    results[i] = {"error": type(e).__name__}
                    return
                results[i] = {
                    "status": response.status_code,
                    "reason": "" if response.status_code == 200 else _reason(response),
                    "latency_ms": (time.perf_counter() - started) * 1000,
                    "cache": response.headers.get("x-gpufaas-cache"),
                    "load_ms": float(response.headers.get("x-gpufaas-load-ms", "0") or 0),
                }

        await replay_open_loop([at / 1000 for at in arrivals_ms], one, max_seconds=max_seconds)
    return results


async def replay_open_loop(
    arrivals_s: Sequence[float],
    one: Callable[[int], Coroutine[Any, Any, None]],
    *,
    max_seconds: float,
    before: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Start ``one(i)`` at ``arrivals_s[i]`` seconds from now (open loop: never waiting for an
    answer), then wait for them; no arrival starts after ``max_seconds``, and what is still
    running then (at least 5 s after the last start) is cancelled. ``before(at)`` runs ahead of
    each arrival's wait (a mark in the run, say)."""
    begin = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for i, at in enumerate(arrivals_s):
        if before is not None:
            await before(at)
        if time.perf_counter() - begin > max_seconds:
            break
        delay = begin + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    remaining = max(5.0, max_seconds - (time.perf_counter() - begin))
    _, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _resident_sizes(url: str, functions: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes each kind takes on a device, as the gateway's directory reports them."""
    kinds = {f["name"]: f["kind"] for f in functions}
    sizes: dict[str, int] = {}
    try:
        state = httpx.get(f"{url}/v2/gpufaas/cluster", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return sizes
    for device in state.get("devices", []):
        for resident in device.get("residents", []):
            model, size = resident[0], int(resident[2])
            kind = kinds.get(model)
            if kind is not None:
                sizes[kind] = max(sizes.get(kind, 0), size)
    return sizes


def _gateway_counters(url: str) -> dict[str, float]:
    """The gateway's routing counters now: decisions by reason, queue-wait sum and count,
    overtakes (``/metrics``); the difference of two snapshots covers the requests between."""
    from prometheus_client.parser import text_string_to_metric_families

    counters: dict[str, float] = {}
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return counters
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpufaas_route_decisions_total":
                key = f"decisions.{sample.labels['reason']}"
            elif sample.name in (
                "gpufaas_queue_wait_seconds_sum",
                "gpufaas_queue_wait_seconds_count",
            ):
                key = sample.name.removeprefix("gpufaas_")
            elif sample.name == "gpufaas_dispatch_overtakes":
                key = "overtakes"
            else:
                continue
            counters[key] = counters.get(key, 0.0) + sample.value
    return counters


def _routing(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the gateway did for the trace (warm-up part included): decisions by reason, mean
    queue wait, overtakes."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    waited = delta.get("queue_wait_seconds_count", 0.0)
    return {
        "mean_queue_ms": 1000 * delta.get("queue_wait_seconds_sum", 0.0) / waited
        if waited
        else math.nan,
        "overtakes": int(delta.get("overtakes", 0)),
        "decisions": {
            k.removeprefix("decisions."): int(v)
            for k, v in sorted(delta.items())
            if k.startswith("decisions.") and v
        },
    }


def _reason(response: httpx.Response) -> str:
    """A short reason for a failed request: the reason header, else the error's first words."""
    reason = response.headers.get("x-gpufaas-reason")
    if reason:
        return str(reason)
    try:
        message = str(response.json().get("error", ""))
    except ValueError:
        message = response.text
    return f"{response.status_code}: {' '.join(message.split()[:8])}"


def _summarise(
    results: list[dict[str, Any]], functions: list[dict[str, Any]], picks: list[int]
) -> dict[str, Any]:
    skip = int(len(results) * WARMUP_FRACTION)
    measured = [(r, functions[m]) for r, m in zip(results[skip:], picks[skip:], strict=True)]
    ok = [(r, f) for r, f in measured if r.get("status") == 200]
    latency = np.asarray([r["latency_ms"] for r, _ in ok]) if ok else np.zeros(0)
    hits = sum(1 for r, _ in ok if r["cache"] == "hit")
    loads = [r["load_ms"] for r, _ in ok if r["cache"] != "hit"]
    slo_met = sum(1 for r, f in ok if f["slo_ms"] is None or r["latency_ms"] <= f["slo_ms"])
    served = len(ok)
    return {
        "mean_ms": float(latency.mean()) if served else math.nan,
        "p50_ms": float(np.percentile(latency, 50)) if served else math.nan,
        "p99_ms": float(np.percentile(latency, 99)) if served else math.nan,
        "miss_ratio": (served - hits) / served if served else math.nan,
        "hit_ratio": hits / served if served else math.nan,
        "hits": hits,
        "misses": served - hits,
        "mean_load_ms": float(np.mean(loads)) if loads else 0.0,
        "slo_attainment": slo_met / served if served else math.nan,
        "requests": len(measured),
        "errors": len(measured) - served,
        "error_kinds": dict(
            Counter(
                str(r.get("reason") or r.get("status") or r.get("error", "unsent"))
                for r, _ in measured
                if r.get("status") != 200
            )
        ),
    }


def run_live(args: argparse.Namespace, *, wss: int, policies: list[str]) -> dict[str, Any]:
    from gpufaas.core.examples import build_examples
    from gpufaas.core.modelio import load_model, tensor_bytes
    from gpufaas.core.units import parse_bytes

    args.live_device_memory = args.live_device_memory or LIVE_DEVICE_MEMORY
    kinds = tuple(k.strip() for k in (args.live_kinds or ",".join(DEFAULT_LIVE_KINDS)).split(","))
    unknown = sorted(set(kinds) - set(LIVE_KINDS))
    if unknown or not kinds:
        raise SystemExit(f"--live-kinds: choose from {list(LIVE_KINDS)}, got {unknown}")
    device_bytes = parse_bytes(args.live_device_memory)
    rate = args.live_rate
    trace = make_trace(
        wss=wss, n_requests=args.live_requests, rate_per_s=rate, zipf_s=args.zipf, seed=args.seed
    )
    picks = trace.model.tolist()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpufaas-lalb-live-") as tmp:
        root = Path(tmp)
        paths = build_examples(root / "models", names=kinds, progress=False)
        functions = write_functions(root / "functions", root / "models", wss=wss, kinds=kinds)
        # Until the cluster reports what a model takes on a device, its weights.
        sizes_by_kind: dict[str, int] = {}
        for kind, path in paths.items():
            fmt = "torchscript" if path.suffix == ".pt" else "torch-export"
            sizes_by_kind[kind] = tensor_bytes(load_model(path, format=fmt))  # type: ignore[arg-type]
        bodies_by_kind = _request_bodies()
        names = [functions[m]["name"] for m in picks]
        bodies = [bodies_by_kind[functions[m]["kind"]] for m in picks]
        for policy in policies:
            log = root / f"{policy}.log"
            proc, url = _start_cluster(
                args, policy=policy, functions_dir=root / "functions", home=root / policy, log=log
            )
            try:
                _wait_ready(proc, url, wss=wss, log=log)
                _warm_up(url, functions, bodies_by_kind)
                before = _gateway_counters(url)
                results = asyncio.run(
                    _drive(
                        url,
                        arrivals_ms=trace.arrival_ms.tolist(),
                        names=names,
                        bodies=bodies,
                        max_seconds=args.live_seconds,
                    )
                )
                routing = _routing(before, _gateway_counters(url))
                sizes_by_kind.update(_resident_sizes(url, functions))
            finally:
                _stop(proc)
            out[policy] = {**_summarise(results, functions, picks), **routing}
            if out[policy]["errors"]:
                tail = log.read_text(errors="replace")[-2000:]
                print(f"{policy}: {out[policy]['errors']} failed requests; log tail:\n{tail}",
                      file=sys.stderr)  # fmt: skip
        sizes = [sizes_by_kind[f["kind"]] for f in functions]
        total = device_bytes * args.nodes * args.cpu_devices
        skip = int(len(picks) * WARMUP_FRACTION)
        hits = belady_hits(picks, sizes, capacity_bytes=total, skip=skip)
        measured = len(picks) - skip
        out["belady"] = {"hit_ratio": hits / measured, "miss_ratio": 1 - hits / measured}
    out["_setup"] = {
        "wss": wss,
        "devices": args.nodes * args.cpu_devices,
        "rate_per_s": rate,
        "requests": args.live_requests,
        "profile": f"live: {args.nodes} nodes x {args.cpu_devices} CPU devices of "
        f"{args.live_device_memory}",
    }
    return out
