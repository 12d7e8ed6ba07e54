"""Gateway scale-out (#16): the same trace through 1, 2 and 4 gateway replicas.

    python bench/lalb.py --mode live --gateways 1,2,4 --wss 16 --zipf 1.1 --live-requests 800

For each replica count this starts ``gpufaas up --gateways N`` (N gateway processes, each on its
own port and on one shared port) over the same GPU managers' configuration, and:

1. **Trace.** Replays the Zipf/Poisson trace open-loop, request ``i`` to replica ``i mod N`` (as a
   Service spreads connections). Misses are counted **at the GPU managers**
   (``gpufaas_manager_requests_total{cache="miss"}``), not by the gateways, so a replica cannot
   hide a blind load. Latency (mean, p99) is measured at the client after the first 10%.
2. **Saturation.** A closed loop of ``--saturation-clients`` clients, spread over the replicas,
   sends the trace's requests back to back for ``--saturation-seconds``: throughput, and the CPU
   seconds each gateway process and each manager spent (``/proc``), per request.
   A second ``1`` in ``--gateways`` runs one gateway again on the same trace: the control,
   reported against the first (how far two runs of the same code differ).
3. **Decision cost.** The p99 of what scale-out adds to a routing decision (ring lookup, the
   ownership test), measured in this process.

Everything shares this machine's cores, the load generator included; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from .live import _request_bodies, _stop, write_functions
from .workload import make_trace

DEFAULT_GATEWAYS = (1, 2, 4)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_replica_counts(text: str) -> list[int]:
    """``--gateways``: replica counts >= 1, comma-separated, each once except 1, which may
    appear twice (the second run is the control); a ValueError says what is wrong."""
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ValueError(f"replica counts >= 1, e.g. 1,2,4; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"replica counts >= 1, e.g. 1,2,4; got {text!r}")
    repeated = {n for n in counts if counts.count(n) > 1}
    if repeated - {1} or counts.count(1) > 2:
        raise ValueError(f"only 1 may appear twice (the second run is the control); got {text!r}")
    return counts


def _replica_counts(text: str) -> str:
    try:
        parse_replica_counts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live scale-out (--mode live --gateways N,...)")
    group.add_argument(
        "--gateways",
        type=_replica_counts,
        default=None,
        help="gateway replica counts to compare, e.g. 1,2,4 (live mode; default: no scale-out "
        "run); a second 1 (1,2,4,1) is the control: a second one-gateway run of the same trace, "
        "reported as '1 (control)' against the first",
    )
    group.add_argument(
        "--summarise",
        nargs="+",
        type=Path,
        default=None,
        help="only print the rounds in these --json results (one seed each) and the mean ratios "
        "to one gateway with 95%% intervals",
    )
    group.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        default=None,
        metavar=("BASE", "OTHER"),
        help="only compare two --json results of one seed request by request: OTHER's misses "
        "at each replica count against BASE's at the same count (e.g. request against decision "
        "forwarding), by cause (miss_breakdown)",
    )
    group.add_argument("--saturation-seconds", type=float, default=10.0)
    group.add_argument("--saturation-clients", type=int, default=32)
    group.add_argument(
        "--client-gc",
        choices=("freeze", "default"),
        default="freeze",
        help="the load generator's own garbage collector during the trace: freeze (gc.freeze() "
        "first: its full collections skip the ~190k objects torch's import leaves, ~85 ms "
        "each otherwise, which stall every request in flight) or default (as before the "
        "ninth session)",
    )
    group.add_argument("--sync-interval", type=float, default=5.0)
    group.add_argument(
        "--scaleout-policy",
        default="lalb",
        help="routing policy of every gateway in the scale-out run (lalb or lalb-o3)",
    )
    group.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="one more argument for `gpufaas up` in the scale-out run (repeatable), e.g. "
        "--gateway-arg=--replica-slots=share",
    )
    group.add_argument(
        "--replica-slots",
        default="full",
        help="replicas' device slots to compare: full, share, or both (full,share)",
    )
    group.add_argument(
        "--ownership",
        default="leader",
        help="placement owner(s) to compare: leader, function, or both (leader,function)",
    )


# -- processes -------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _processes(leader: int) -> dict[str, list[int]]:
    """The gateway and manager processes of one ``gpufaas up`` (its children, and itself when it
    runs the gateway in-process)."""
    out: dict[str, list[int]] = {"gateway": [], "manager": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) != leader:
            continue
        if any(b"gpu-manager" in part or b"gpu_manager" in part for part in cmdline):
            out["manager"].append(int(entry.name))
        elif b"gateway" in cmdline:
            out["gateway"].append(int(entry.name))
    if not out["gateway"]:
        out["gateway"].append(leader)  # one gateway: it runs inside `gpufaas up`
    return out


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {kind: sum(_cpu_seconds(p) for p in group) for kind, group in pids.items()}


def _start(
    args: argparse.Namespace,
    *,
    gateways: int,
    ownership: str,
    slots: str,
    functions_dir: Path,
    home: Path,
    log: Path,
) -> tuple[Any, str]:
    import subprocess
    import sys

    from gpufaas.scheduler.local import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "gpufaas.core.cli", "up",
        "--gateways", str(gateways),
        "--nodes", str(args.nodes),
        "--cpu-devices", str(args.cpu_devices),
        "--device-memory", args.live_device_memory,
        "--host-memory", "1Ki",
        "--policy", args.scaleout_policy,
        "--sync-interval", str(args.sync_interval),
        "--placement-owner", ownership,
        "--replica-slots", slots,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--grpc-port", "-1",  # HTTP only: the trace and the saturation loop use HTTP
        "--functions", str(functions_dir),
        *args.gateway_arg,
    ]  # fmt: skip
    env = {**os.environ, "GPUFAAS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def _replica_urls(proc: Any, url: str, *, gateways: int, wss: int, log: Path) -> list[str]:
    """Wait until every replica is ready (and, with several, sees all its peers)."""
    deadline = time.monotonic() + 240
    urls = [url]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gpufaas up exited with {proc.returncode}; see {log}")
        if gateways > 1:
            found = re.search(r"gateway replicas: (.*)$", log.read_text(errors="replace"), re.M)
            if not found:
                time.sleep(0.5)
                continue
            # Only the URLs: a log line of another process may share the line.
            urls = re.findall(r"http://[\w.\-]+:\d+", found.group(1))[:gateways]
        try:
            ok = True
            for u in urls:
                ready = httpx.get(f"{u}/v2/health/ready", timeout=2)
                body = ready.json() if ready.status_code == 200 else {}
                index = httpx.post(f"{u}/v2/repository/index", timeout=2).json()
                mode = body.get("replica", {}).get("mode", "single")
                ok = ok and bool(body) and len(index) >= wss and mode in ("single", "coordinated")
            if ok:
                return urls
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"gpufaas up --gateways {gateways} was not ready within 240 s; see {log}")


def _manager_urls(url: str) -> list[str]:
    nodes = httpx.get(f"{url}/v2/gpufaas/cluster", timeout=10).json()["nodes"]
    return [n["url"] for n in nodes]


def _manager_lookups(urls: list[str]) -> dict[str, float]:
    """The managers' requests by cache (``hit``, ``miss``), and their load orders
    (forwarding ``decision``; gpu_manager/load_orders.py) by result (``order:<result>``) and by
    how their request claimed them (``claim:<how>``)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"hit": 0.0, "miss": 0.0}
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gpufaas_manager_requests_total":
                    counts[sample.labels["cache"]] += sample.value
                elif sample.name == "gpufaas_manager_load_orders_total":
                    key = f"order:{sample.labels['result']}"
                    counts[key] = counts.get(key, 0.0) + sample.value
                elif sample.name == "gpufaas_manager_load_order_claims_total":
                    key = f"claim:{sample.labels['how']}"
                    counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def manager_misses(before: dict[str, float], after: dict[str, float]) -> int:
    """Misses counted at the managers between two readings: the requests they counted a miss,
    plus those that found a load ordered for them already landed (``claim:landed``: counted a
    hit there, though the load was made for them; one gateway would have made it a miss)."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    return int(delta("miss") + delta("claim:landed"))


def _replica_counters(urls: list[str]) -> dict[str, float]:
    """Every replica's counters, summed; ``miss:<cause>``: the gateways' misses by cause
    (scheduler/misses.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"forwarded": 0.0, "lane": 0.0, "owned": 0.0, "events": 0.0, "overtakes": 0.0}
    names = {
        "gpufaas_dispatch_overtakes": "overtakes",
        "gpufaas_replica_forwarded_requests_total": "forwarded",
        "gpufaas_replica_lane_forwards_total": "lane",
        "gpufaas_replica_owned_requests_total": "owned",
        "gpufaas_replica_residency_events_total": "events",
    }
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gpufaas_gateway_misses_total":
                    cause = f"miss:{sample.labels['cause']}"
                    out[cause] = out.get(cause, 0.0) + sample.value
                    continue
                key = names.get(sample.name)
                if key == "events" and sample.labels.get("direction") != "published":
                    continue
                if key is not None:
                    out[key] += sample.value
    return out


def _warm_up(urls: list[str], names: list[str], body: bytes) -> None:
    """Two requests per function, one at a time, spread over the replicas: every manager
    process has loaded models (torch's first load in a process is slow) before the trace."""
    headers = {"content-type": "application/json"}
    for i, name in enumerate(names * 2):
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                f"{urls[(i + i // len(names)) % len(urls)]}/v2/models/{name}/infer",
                content=body,
                headers=headers,
                timeout=60,
            )


def _header_ms(headers: Any, name: str) -> float:
    try:
        return float(headers.get(name) or 0.0)
    except ValueError:
        return 0.0


# -- load ------------------------------------------------------------------------------------------


async def _open_loop(
    urls: list[str], *, arrivals_ms: list[float], names: list[str], body: bytes, max_s: float
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in names]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    clients = [httpx.AsyncClient(base_url=u, timeout=60.0, limits=limits) for u in urls]
    headers = {"content-type": "application/json"}

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            response = await clients[i % len(clients)].post(
                f"/v2/models/{names[i]}/infer", content=body, headers=headers
            )
        except httpx.HTTPError as e:
            results[i] = {"error": type(e).__name__}
            return
        results[i] = {
            "status": response.status_code,
            "latency_ms": (time.perf_counter() - started) * 1000,
            "hit": response.headers.get("x-gpufaas-cache") == "hit",
            # device time of this request at the manager (load + forward pass), for utilisation
            "device_ms": _header_ms(response.headers, "x-gpufaas-load-ms")
            + _header_ms(response.headers, "x-gpufaas-compute-ms"),
            "at_s": time.perf_counter() - begin,
            # scale-out: set on forwarded answers (the hop at the sender, the owner's own time)
            "forwarded": "x-gpufaas-forward-ms" in response.headers,
            "forward_ms": _header_ms(response.headers, "x-gpufaas-forward-ms"),
            "owner_ms": _header_ms(response.headers, "x-gpufaas-owner-ms"),
        }

    try:
        begin = time.perf_counter()
        tasks = []
        for i, at_ms in enumerate(arrivals_ms):
            if time.perf_counter() - begin > max_s:
                break
            delay = begin + at_ms / 1000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        _, pending = await asyncio.wait(tasks, timeout=max(5.0, max_s)) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return results


async def _closed_loop(
    urls: list[str], *, names: list[str], body: bytes, clients: int, seconds: float
) -> tuple[int, int]:
    """``clients`` loops sending back to back for ``seconds``; (answered 200, failed)."""
    ok = failed = 0
    position = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pool = [httpx.AsyncClient(base_url=u, timeout=60.0, limits=limits) for u in urls]
    headers = {"content-type": "application/json"}
    stop_at = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal ok, failed, position
        client = pool[k % len(pool)]
        while time.perf_counter() < stop_at:
            name = names[position % len(names)]
            position += 1
            try:
                response = await client.post(
                    f"/v2/models/{name}/infer", content=body, headers=headers
                )
                if response.status_code == 200:
                    ok += 1
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1

    try:
        await asyncio.wait_for(
            asyncio.gather(*(loop(k) for k in range(clients))), timeout=seconds + 60
        )
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return ok, failed


# -- the experiment --------------------------------------------------------------------------------


def _one(
    args: argparse.Namespace,
    *,
    gateways: int,
    root: Path,
    wss: int,
    trace: Any,
    names: list[str],
    body: bytes,
    label: str,
    ownership: str,
    slots: str,
) -> dict[str, Any]:
    log = root / f"{label}.log"
    proc, url = _start(
        args,
        gateways=gateways,
        ownership=ownership,
        slots=slots,
        functions_dir=root / "functions",
        home=root / label,
        log=log,
    )
    try:
        urls = _replica_urls(proc, url, gateways=gateways, wss=wss, log=log)
        managers = _manager_urls(urls[0])
        pids = _processes(proc.pid)
        _warm_up(urls, sorted(set(names)), body)
        time.sleep(args.sync_interval + 0.5)  # every gateway has synced with the managers
        before = _manager_lookups(managers)
        replicas_before = _replica_counters(urls)
        if args.client_gc == "freeze":
            gc.collect()
            gc.freeze()  # what is alive now is never scanned again (the gateways do the same)
        pauses = ClientPauses()
        with pauses:
            results = asyncio.run(
                _open_loop(
                    urls,
                    arrivals_ms=trace.arrival_ms.tolist(),
                    names=names,
                    body=body,
                    max_s=args.live_seconds,
                )
            )
        after = _manager_lookups(managers)
        replicas_after = _replica_counters(urls)
        cpu_before = _cpu(pids)
        started = time.perf_counter()
        ok, failed = asyncio.run(
            _closed_loop(
                urls,
                names=names,
                body=body,
                clients=args.saturation_clients,
                seconds=args.saturation_seconds,
            )
        )
        elapsed = time.perf_counter() - started
        cpu_after = _cpu(pids)
    finally:
        _stop(proc)
    skip = len(results) // 10
    measured = results[skip:]

    def delta_of(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    latency = np.asarray([r["latency_ms"] for r in measured if r.get("status") == 200])
    hits = np.asarray([r["latency_ms"] for r in measured if r.get("status") == 200 and r["hit"]])
    misses = np.asarray(
        [r["latency_ms"] for r in measured if r.get("status") == 200 and not r["hit"]]
    )
    served = [r for r in results if r.get("status") == 200]
    # Operating point: device time (load + compute, as the managers report it) over the
    # devices' wall time during the trace.
    span_s = max((r["at_s"] + r["latency_ms"] / 1000 for r in served), default=0.0)
    devices = args.nodes * args.cpu_devices
    utilisation = (
        sum(r["device_ms"] for r in served) / 1000 / (devices * span_s) if span_s else math.nan
    )
    gateway_cpu = cpu_after["gateway"] - cpu_before["gateway"]
    manager_cpu = cpu_after["manager"] - cpu_before["manager"]
    return {
        "gateways": gateways,
        "ownership": ownership if gateways > 1 else "-",
        "slots": slots if gateways > 1 else "-",
        "misses_at_managers": manager_misses(before, after),
        "hits_at_managers": int(after["hit"] - before["hit"] - delta_of("claim:landed")),
        # forwarding "decision": loads the owner ordered, by the node's result and by claim
        "load_orders": {
            k: int(after[k] - before.get(k, 0.0))
            for k in sorted(after)
            if k.startswith(("order:", "claim:")) and after[k] - before.get(k, 0.0)
        },
        "answered": len(served),
        "policy": args.scaleout_policy,
        "offered_rps": len(results) / span_s if span_s else math.nan,
        "device_utilisation": utilisation,
        "errors": len(results) - len(served),
        "mean_ms": float(latency.mean()) if len(latency) else math.nan,
        "p99_ms": float(np.percentile(latency, 99)) if len(latency) else math.nan,
        "p50_ms": float(np.percentile(latency, 50)) if len(latency) else math.nan,
        "hit_mean_ms": float(hits.mean()) if len(hits) else math.nan,
        "hit_p99_ms": float(np.percentile(hits, 99)) if len(hits) else math.nan,
        "miss_mean_ms": float(misses.mean()) if len(misses) else math.nan,
        "tail": tail_breakdown(measured),
        # the load generator's own collections of generations 1-2 during the trace: a pause
        # here delays every answer in flight (the latencies are the client's)
        "client_gc": pauses.summary(),
        "requests": request_records(results, gateways=gateways),
        "forwarded": int(replicas_after["forwarded"] - replicas_before["forwarded"]),
        "lane_forwarded": int(replicas_after["lane"] - replicas_before["lane"]),
        "owned": int(replicas_after["owned"] - replicas_before["owned"]),
        "events": int(replicas_after["events"] - replicas_before["events"]),
        "overtakes": int(replicas_after["overtakes"] - replicas_before["overtakes"]),
        "miss_causes": {
            k.removeprefix("miss:"): int(v - replicas_before.get(k, 0.0))
            for k, v in sorted(replicas_after.items())
            if k.startswith("miss:") and v - replicas_before.get(k, 0.0)
        },
        "saturation_rps": ok / elapsed,
        "saturation_failed": failed,
        "gateway_cpu_ms_per_request": 1000 * gateway_cpu / ok if ok else math.nan,
        "manager_cpu_ms_per_request": 1000 * manager_cpu / ok if ok else math.nan,
    }


class ClientPauses:
    """The load generator's garbage-collector pauses of generations 1 and 2 while in use
    (``gc.callbacks``): when (s after entering), which generation, how long (ms)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._began = self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 0:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            ended = time.perf_counter()
            pause = (
                self._started - self._began,
                info["generation"],
                1000 * (ended - self._started),
            )
            self.pauses.append(pause)

    def __enter__(self) -> ClientPauses:
        self._began = time.perf_counter()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        ms = [p[2] for p in self.pauses]
        return {
            "collections": len(ms),
            "max_ms": max(ms, default=0.0),
            "total_ms": sum(ms),
            "over_5ms": [
                [round(at, 2), gen, round(pause, 1)]
                for at, gen, pause in self.pauses
                if pause >= 5.0
            ],
        }


_KINDS = ("hit", "local miss", "forwarded miss", "forwarded hit")


def request_records(results: list[dict[str, Any]], *, gateways: int) -> dict[str, Any]:
    """Every trace request of one run, compactly (request ``i`` went to replica ``i mod N``):
    ``cache`` one letter each (``h`` hit, ``m`` miss at the manager, ``-`` not answered),
    ``forwarded`` (``f``: its placement went through the owner, request or question), and
    ``latency_ms`` (0 where not answered). What :func:`miss_breakdown` compares run by run.
    Since the thirteenth session also each request's parts, as :func:`tail_breakdown` averages
    them (0 where not answered or not forwarded): ``device_ms`` (load + forward pass at the
    manager), ``forward_ms`` (the forward as the sender saw it) and ``owner_ms`` (the owner's
    own time), so that a tail can be taken apart request by request (:func:`forward_excess`)."""
    cache = "".join(("h" if r["hit"] else "m") if r.get("status") == 200 else "-" for r in results)
    forwarded = "".join("f" if r.get("forwarded") else "." for r in results)
    latency = [round(r.get("latency_ms", 0.0), 2) for r in results]
    at_ms = [round(1000 * r.get("at_s", 0.0)) for r in results]
    return {
        "gateways": gateways,
        "cache": cache,
        "forwarded": forwarded,
        "latency_ms": latency,
        "at_ms": at_ms,
        **{part: [round(r.get(part, 0.0), 3) for r in results] for part in _PARTS},
    }


# A request's parts in its record (request_records), as the tail breakdown names them.
_PARTS = ("device_ms", "forward_ms", "owner_ms")


def forward_excess(base: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """Request by request over the measured part of one trace (after its first tenth), the
    forwarded misses of ``run`` (N replicas) against the same requests at one gateway
    (``base``) where they were misses too: how many, and the median of their latency
    difference (ms; what a forward adds to a miss), of their device time's difference, and,
    where ``run`` recorded its parts, the median hop (forward less the owner's own time).
    Hits and local misses, paired the same way, give the difference every request pays
    (``hit_median_ms``, ``local_miss_median_ms``). NaN where a kind has no pair."""
    skip = len(run["cache"]) // 10
    pairs: dict[str, list[int]] = {"forwarded miss": [], "hit": [], "local miss": []}
    for i in range(skip, min(len(base["cache"]), len(run["cache"]))):
        c0, c1, f1 = base["cache"][i], run["cache"][i], run["forwarded"][i]
        if c0 == "-" or c1 == "-" or c0 != c1:
            continue
        kind = "hit" if c1 == "h" else ("forwarded miss" if f1 == "f" else "local miss")
        pairs[kind].append(i)

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else math.nan

    def diff(kind: str, field: str) -> list[float]:
        if field not in run or field not in base:
            return []
        return [run[field][i] - base[field][i] for i in pairs[kind]]

    forwarded = pairs["forwarded miss"]
    hops = (
        [run["forward_ms"][i] - run["owner_ms"][i] for i in forwarded]
        if "forward_ms" in run
        else []
    )
    return {
        "forwarded_misses": float(len(forwarded)),
        "median_ms": median(diff("forwarded miss", "latency_ms")),
        "device_median_ms": median(diff("forwarded miss", "device_ms")),
        "hop_median_ms": median(hops),
        "hit_median_ms": median(diff("hit", "latency_ms")),
        "local_miss_median_ms": median(diff("local miss", "latency_ms")),
    }


# Uses (the peers' hits and request counts) reach the owner within this many ms (UseStream's
# batch, scheduler/uses.py) plus a post; a victim last used at a peer this recently may not
# have been known as used at the owner.
_USES_LAG_MS = 60.0


def miss_breakdown(models: list[int], base: dict[str, Any], run: dict[str, Any]) -> dict[str, int]:
    """Request by request, ``run``'s misses against ``base``'s (the same trace; ``base`` one
    gateway, or request forwarding against decision forwarding), by cause:

    - ``both``: a miss in both runs (cold, capacity: what one gateway pays too);
    - ``blind``: a miss at a replica that is not the placement owner, not forwarded: it loaded
      without the owner (a stale hit, or a placement after a failed forward);
    - ``cascade``: a miss here, a hit in ``base``, with a load between the model's previous
      request and this one that ``base`` did not make (an extra load evicted it);
    - ``victim``: a miss here, a hit in ``base``, no extra load between: the placements between
      chose it as a victim where ``base``'s did not (or went to its device instead of another);
      ``victim_peer_recent`` of those: its previous request was at a peer, within
      ``_USES_LAG_MS`` before one of the loads between (the owner may not have known the use);
    - ``saved``: a hit here that was a miss in ``base``.

    The owner is the replica whose requests' misses are placed without forwarding (most local
    misses). ``asked_extra``: requests forwarded here that ``base`` did not forward, and
    ``asked_extra_miss`` of those, misses here."""
    c0, c1 = base["cache"], run["cache"]
    f0, f1 = base["forwarded"], run["forwarded"]
    at = run["at_ms"]
    n = run["gateways"]
    local = [0] * n
    for i, (c, f) in enumerate(zip(c1, f1, strict=True)):
        if c == "m" and f != "f":
            local[i % n] += 1
    owner = max(range(n), key=lambda k: local[k])
    out = dict.fromkeys(
        ("misses", "base_misses", "both", "blind", "cascade", "victim", "victim_peer_recent",
         "saved", "asked", "asked_extra", "asked_extra_miss"), 0
    )  # fmt: skip
    previous: dict[int, int] = {}
    for i, model in enumerate(models[: min(len(c0), len(c1))]):
        prev = previous.get(model)
        previous[model] = i
        out["base_misses"] += c0[i] == "m"
        out["asked"] += f1[i] == "f"
        if f1[i] == "f" and f0[i] != "f":
            out["asked_extra"] += 1
            out["asked_extra_miss"] += c1[i] == "m"
        if c1[i] != "m":
            out["saved"] += c0[i] == "m" and c1[i] == "h"
            continue
        out["misses"] += 1
        if n > 1 and f1[i] != "f" and i % n != owner:
            out["blind"] += 1
        elif c0[i] == "m" or c0[i] == "-":
            out["both"] += 1
        elif prev is None:
            out["both"] += 1  # never requested before: cold in both (base joined a load)
        else:
            between = range(prev + 1, i)
            if any(c1[j] == "m" and c0[j] != "m" for j in between):
                out["cascade"] += 1
            else:
                out["victim"] += 1
                loads = [at[j] for j in between if c1[j] == "m"]
                if prev % n != owner and any(0 <= t - at[prev] <= _USES_LAG_MS for t in loads):
                    out["victim_peer_recent"] += 1
    return out


def _kind(r: dict[str, Any]) -> str:
    if r.get("forwarded"):
        return "forwarded hit" if r["hit"] else "forwarded miss"
    return "hit" if r["hit"] else "local miss"


def tail_breakdown(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """What the slowest 1% are (answered requests at or above the p99), and per kind of request
    (hit, local miss, forwarded miss) the mean and p99 latency and the mean of its parts: device
    time (load + forward pass at the manager), the forward hop as the sender saw it, the owner's
    own time, and what is left (the client, the ingress gateway, the manager's HTTP)."""
    served = [r for r in measured if r.get("status") == 200]
    if not served:
        return {}
    p99 = float(np.percentile([r["latency_ms"] for r in served], 99))
    slowest = [r for r in served if r["latency_ms"] >= p99]
    out: dict[str, Any] = {
        "p99_ms": p99,
        "slowest": {k: sum(_kind(r) == k for r in slowest) for k in _KINDS},
    }
    for kind in _KINDS:
        group = [r for r in served if _kind(r) == kind]
        if not group:
            continue
        latency = np.asarray([r["latency_ms"] for r in group])
        parts = {
            f: float(np.mean([r.get(f, 0.0) for r in group]))
            for f in ("device_ms", "forward_ms", "owner_ms")
        }
        out[kind] = {
            "n": len(group),
            "mean_ms": float(latency.mean()),
            "p99_ms": float(np.percentile(latency, 99)),
            "max_ms": float(latency.max()),
            **parts,
            # the hop itself: the forward's time less the owner's own
            "hop_ms": parts["forward_ms"] - parts["owner_ms"] if parts["forward_ms"] else 0.0,
        }
    return out


def tail_table(result: dict[str, Any]) -> str:
    lines = [
        "gateways  kind            n     mean ms  p99 ms  max ms  device ms  fwd ms  owner ms  "
        "hop ms  in slowest 1%"
    ]
    for r in result["runs"]:
        tail = r.get("tail") or {}
        for kind in _KINDS:
            k = tail.get(kind)
            if not k:
                continue
            lines.append(
                f"{r['gateways']:>8}  {kind:<14}  {k['n']:>4}  {k['mean_ms']:>7.2f}  "
                f"{k['p99_ms']:>6.2f}  {k['max_ms']:>6.1f}  {k['device_ms']:>9.2f}  "
                f"{k['forward_ms']:>6.2f}  {k['owner_ms']:>8.2f}  {k['hop_ms']:>6.2f}  "
                f"{tail['slowest'][kind]:>13}"
            )
    return "\n".join(lines)


def decision_overhead_us(*, calls: int = 200_000, replicas: int = 4) -> dict[str, float]:
    """p50/p99 (us) of what scale-out adds to one routing decision: the owner lookup and the
    residency test (``directory.state``) the gateway makes before a placement, and
    :meth:`Replicas.admit`. Forwarding is excluded."""
    from prometheus_client import CollectorRegistry

    from gpufaas.cache import ClusterDirectory
    from gpufaas.scheduler.peers import Membership, static_peers
    from gpufaas.scheduler.replicas import Replicas

    async def measure() -> dict[str, float]:
        urls = [f"http://10.0.0.{i}:8080" for i in range(replicas)]
        membership = Membership(self_url=urls[0], discover=static_peers(urls))
        membership.adopt(urls)
        directory = ClusterDirectory()
        for d in range(8):
            directory.add_device(f"n{d // 2}/{d % 2}", capacity_bytes=1 << 30, node=f"n{d // 2}")
        names = [f"function-{i}" for i in range(1000)]
        for i, name in enumerate(names[:200]):
            directory.note_loaded(f"n{i % 4}/{i % 2}", name, size_bytes=1 << 20)
        owner = Replicas(
            membership=membership,
            directory=directory,
            registry=CollectorRegistry(),
            own_misses=lambda: 0.0,
        )
        samples = np.empty(calls, dtype=np.int64)
        clock = time.perf_counter_ns
        for i in range(calls):
            name = names[(i * 7919) % len(names)]
            t0 = clock()
            owner.admit(name, forwarded_by=None)
            if directory.state("n0/0", name) is None:
                owner._owner_elsewhere(name)
            samples[i] = clock() - t0
        await membership.close()
        return {
            "p50_us": float(np.percentile(samples, 50)) / 1000,
            "p99_us": float(np.percentile(samples, 99)) / 1000,
        }

    return asyncio.run(measure())


def run_scaleout(args: argparse.Namespace, *, wss: int) -> dict[str, Any]:
    from gpufaas.core.examples import build_examples

    try:
        counts = parse_replica_counts(args.gateways)
    except ValueError as e:
        raise SystemExit(f"--gateways: {e}") from None
    args.live_device_memory = args.live_device_memory or "24Ki"
    trace = make_trace(
        wss=wss,
        n_requests=args.live_requests,
        rate_per_s=args.live_rate,
        zipf_s=args.zipf,
        seed=args.seed,
    )
    picks = trace.model.tolist()
    out: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="gpufaas-scaleout-") as tmp:
        root = Path(tmp)
        build_examples(root / "models", names=("tiny-mlp",), progress=False)
        functions = write_functions(
            root / "functions", root / "models", wss=wss, kinds=("tiny-mlp",)
        )
        names = [functions[m]["name"] for m in picks]
        body = _request_bodies()["tiny-mlp"]
        ownerships = [o.strip() for o in args.ownership.split(",") if o.strip()]
        slot_modes = [m.strip() for m in args.replica_slots.split(",") if m.strip()]
        variants = [(o, m) for o in ownerships for m in slot_modes]
        for position, gateways in enumerate(counts):
            # A second one-gateway run of the same trace: the control, how far two runs of
            # the same code differ (what a ratio to one gateway can mean).
            control = gateways == 1 and 1 in counts[:position]
            for ownership, slots in variants if gateways > 1 else variants[:1]:
                run = _one(
                    args,
                    gateways=gateways,
                    root=root,
                    wss=wss,
                    trace=trace,
                    names=names,
                    body=body,
                    label=f"g{gateways}-{ownership}-{slots}" + ("-control" if control else ""),
                    ownership=ownership,
                    slots=slots,
                )
                out["runs"].append({**run, "control": True} if control else run)
    out["decision_overhead"] = decision_overhead_us()
    out["trace_models"] = picks  # request i's model (catalogue index), for miss_breakdown
    out["_setup"] = {
        "wss": wss,
        "requests": args.live_requests,
        "rate_per_s": args.live_rate,
        "zipf": args.zipf,
        "seed": args.seed,
        "devices": f"{args.nodes} nodes x {args.cpu_devices} CPU devices of {args.live_device_memory}",
        "saturation": f"{args.saturation_clients} closed-loop clients for {args.saturation_seconds} s",
    }
    return out


def run_label(run: dict[str, Any]) -> str:
    """A run's column: its replica count, or ``1 (control)`` for the second one-gateway run."""
    return "1 (control)" if run.get("control") else str(run["gateways"])


def _label_order(label: str) -> tuple[int, str]:
    return int(label.split()[0]), label


def base_run(result: dict[str, Any]) -> dict[str, Any]:
    """The round's one-gateway run (not the control); rounds that ran none: the fewest."""
    runs = result["runs"]
    ones = [r for r in runs if r["gateways"] == 1 and not r.get("control")]
    return ones[0] if ones else min(runs, key=lambda r: r["gateways"])


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    base = base_run(result)
    lines = [
        "gateways  owner     slots  misses@mgr  vs 1   mean ms  p99 ms  vs 1   errors  fwd   owned  "
        "sat req/s  vs 1   gw cpu ms/req  mgr cpu ms/req",
    ]
    for r in runs:
        lines.append(
            f"{r['gateways']:>8}  {r['ownership']:<8}  {r['slots']:<5}  {r['misses_at_managers']:>10}  "
            f"{_ratio(r['misses_at_managers'], base['misses_at_managers']):>4}  "
            f"{r['mean_ms']:>7.1f}  {r['p99_ms']:>6.1f}  {_ratio(r['p99_ms'], base['p99_ms']):>4}  "
            f"{r['errors']:>6}  {r['forwarded']:>4}  {r['owned']:>5}  "
            f"{r['saturation_rps']:>9.0f}  {_ratio(r['saturation_rps'], base['saturation_rps']):>4}  "
            f"{r['gateway_cpu_ms_per_request']:>13.2f}  {r['manager_cpu_ms_per_request']:>14.2f}"
        )
    lines.append(
        "gateways  owner     p50 ms  hit mean  hit p99  miss mean  sat failed  offered/s  device util"
    )
    for r in runs:
        lines.append(
            f"{r['gateways']:>8}  {r['ownership']:<8}  {r['p50_ms']:>6.1f}  {r['hit_mean_ms']:>8.1f}  "
            f"{r['hit_p99_ms']:>7.1f}  {r['miss_mean_ms']:>9.1f}  {r['saturation_failed']:>10}  "
            f"{r['offered_rps']:>9.1f}  {r['device_utilisation']:>11.2f}"
        )
    lines.append(tail_table(result))
    overhead = result["decision_overhead"]
    lines.append(
        f"scale-out decision overhead: p50 {overhead['p50_us']:.2f} us, p99 {overhead['p99_us']:.2f} us"
    )
    setup = result["_setup"]
    lines.append(
        f"setup: {setup['devices']}; {setup['wss']} tiny-mlp functions, Zipf {setup['zipf']}, "
        f"{setup['requests']} requests at {setup['rate_per_s']}/s, seed {setup['seed']}; "
        f"saturation: {setup['saturation']}"
    )
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}"


# Two-sided 95% quantiles of Student's t, by degrees of freedom (1-30); beyond, the normal's.
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
        2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)  # fmt: skip


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% interval (Student's t; 0 for one value)."""
    if len(values) < 2:
        return (values[0] if values else math.nan), 0.0
    df = len(values) - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def pooled_ratio_interval(
    base: list[int], other: list[int], *, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """The ratio of summed misses (``sum(other) / sum(base)``, rounds paired) and a 95%
    percentile bootstrap interval over the rounds (resampled with replacement, seeded)."""
    b, o = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    ratios = o[picks].sum(axis=1) / np.maximum(b[picks].sum(axis=1), 1.0)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(o.sum() / max(b.sum(), 1.0)), float(low), float(high)


def measured_latencies(requests: dict[str, Any]) -> NDArray[np.float64]:
    """One run's measured latencies (ms) from its request records: the answered requests after
    the first 10% of the trace, the same requests as its ``p99_ms``."""
    skip = len(requests["cache"]) // 10
    return np.asarray(
        [
            ms
            for cache, ms in zip(
                requests["cache"][skip:], requests["latency_ms"][skip:], strict=True
            )
            if cache != "-"
        ],
        dtype=float,
    )


def _pooled_p99_ratio(base: list[NDArray[np.float64]], other: list[NDArray[np.float64]]) -> float:
    return float(np.percentile(np.concatenate(other), 99) / np.percentile(np.concatenate(base), 99))


def pooled_p99_ratio(
    base: list[NDArray[np.float64]],
    other: list[NDArray[np.float64]],
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """The p99 of ``other``'s requests pooled over rounds over the p99 of ``base``'s pooled over
    the same rounds (round ``i`` of each paired), with two intervals over the rounds (each a
    cluster of requests that shared one hold and one trace): a leave-one-round-out jackknife
    with Student's t on k - 1 degrees of freedom (``half``: infinite for one round), and a 95%
    percentile bootstrap of whole rounds, resampled with replacement (seeded)."""
    k = len(base)
    if k != len(other) or k == 0:
        raise ValueError("pooled_p99_ratio: one latency array per round for each, paired")
    ratio = _pooled_p99_ratio(base, other)
    if k < 2:
        return {"ratio": ratio, "half": math.inf, "low": ratio, "high": ratio, "rounds": 1}
    leave_out = np.asarray(
        [_pooled_p99_ratio(base[:i] + base[i + 1 :], other[:i] + other[i + 1 :]) for i in range(k)]
    )
    spread = math.sqrt((k - 1) / k * float(np.sum((leave_out - leave_out.mean()) ** 2)))
    t = _T95[k - 2] if k - 1 <= len(_T95) else 1.96
    picks = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    ratios = [_pooled_p99_ratio([base[i] for i in p], [other[i] for i in p]) for p in picks]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": ratio, "half": t * spread, "low": float(low), "high": float(high), "rounds": k}


def goal_verdict(ratio: float, uppers: list[float], *, goal: float) -> str:
    """A "<= goal" verdict: met only if every upper bound is at or under the goal, met on the
    ratio (or mean) only if just the point figure is, otherwise missed."""
    if all(u <= goal for u in uppers):
        return "met"
    return "met on the point figure only" if ratio <= goal else "missed"


def _pooled_p99_lines(rounds: list[dict[str, Any]], counts: list[str]) -> list[str]:
    """The pooled p99 (the twelfth session's pre-registered primary p99 figure, bench/RESULTS.md
    #16): per replica count and for the control, over the rounds whose runs all recorded their
    requests, against the round's first one-gateway run."""
    recorded = [r for r in rounds if all("requests" in run for run in r["runs"])]
    if not recorded:
        return []
    lines = [
        "",
        "| p99 pooled over rounds, to one gateway's | rounds | requests | ratio "
        "| jackknife t 95% (upper) | bootstrap 95% over rounds | <= 1.2 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in counts:
        pairs = [
            (measured_latencies(base_run(r)["requests"]), measured_latencies(run["requests"]))
            for r in recorded
            for run in r["runs"]
            if run is not base_run(r) and run_label(run) == n
        ]
        if not pairs:
            continue
        got = pooled_p99_ratio([b for b, _ in pairs], [o for _, o in pairs])
        upper = got["ratio"] + got["half"]
        verdict = (
            "- (the control)"
            if "control" in n
            else goal_verdict(got["ratio"], [upper, got["high"]], goal=1.2)
        )
        lines.append(
            f"| {n} | {got['rounds']} | {sum(len(o) for _, o in pairs)} | {got['ratio']:.3f} "
            f"| ± {got['half']:.3f} ({upper:.3f}) | [{got['low']:.3f}, {got['high']:.3f}] "
            f"| {verdict} |"
        )
    return lines


def _stale(run: dict[str, Any]) -> int:
    causes = run.get("miss_causes", {})
    return int(causes.get("stale_resident", 0) + causes.get("stale_loading", 0))


def _forward_excess_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """Per replica count, :func:`forward_excess` in each round (its run against the round's one
    gateway), as the mean over rounds of each median, and the forwarded misses paired."""
    by_n: dict[str, list[dict[str, float]]] = {}
    for result in rounds:
        base = base_run(result)
        for r in result["runs"]:
            if r is not base and r["gateways"] > 1 and "requests" in r and "requests" in base:
                by_n.setdefault(run_label(r), []).append(
                    forward_excess(base["requests"], r["requests"])
                )
    if not by_n:
        return []
    fields = ("median_ms", "device_median_ms", "hop_median_ms", "hit_median_ms",
              "local_miss_median_ms")  # fmt: skip
    lines = [
        "",
        "| N | rounds | forwarded misses paired | latency - one gateway's, median ms "
        "| device time, same | the hop, median ms | hits, same | local misses, same |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in sorted(by_n, key=_label_order):
        got = by_n[n]
        cells = []
        for field in fields:
            values = [g[field] for g in got if not math.isnan(g[field])]
            cells.append(f"{statistics.fmean(values):+.2f}" if values else "-")
        paired = sum(int(g["forwarded_misses"]) for g in got)
        lines.append(f"| {n} | {len(got)} | {paired} | " + " | ".join(cells) + " |")
    return lines


def _tail_summary(rounds: list[dict[str, Any]]) -> list[str]:
    """Over the rounds that recorded it (``tail``), per replica count: what the slowest 1% were
    (summed over rounds), and per kind of request the mean of the rounds' means and p99s."""
    by_n: dict[int, list[dict[str, Any]]] = {}
    for result in rounds:
        for r in result["runs"]:
            if r.get("tail") and not r.get("control"):
                by_n.setdefault(r["gateways"], []).append(r["tail"])
    if not by_n:
        return []
    lines = [
        "",
        "| N | kind | rounds | requests | mean ms | p99 ms | device ms | forward ms | owner ms "
        "| in the slowest 1% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in sorted(by_n):
        tails = by_n[n]
        for kind in _KINDS:
            groups = [t[kind] for t in tails if kind in t]
            if not groups:
                continue

            def mean(field: str, groups: list[dict[str, Any]] = groups) -> float:
                return statistics.fmean(g[field] for g in groups)

            slowest = sum(t["slowest"][kind] for t in tails)
            total = sum(sum(t["slowest"].values()) for t in tails)
            lines.append(
                f"| {n} | {kind} | {len(groups)} | {sum(g['n'] for g in groups)} "
                f"| {mean('mean_ms'):.2f} | {mean('p99_ms'):.2f} | {mean('device_ms'):.2f} "
                f"| {mean('forward_ms'):.2f} | {mean('owner_ms'):.2f} | {slowest} of {total} |"
            )
    return lines


_BREAKDOWN = ("misses", "base_misses", "both", "blind", "cascade", "victim",
              "victim_peer_recent", "saved", "base_cascade", "base_victim", "asked",
              "asked_extra", "asked_extra_miss")  # fmt: skip


def paired_breakdown(
    models: list[int], base: dict[str, Any], run: dict[str, Any]
) -> dict[str, int]:
    """:func:`miss_breakdown` of ``run`` against ``base``, with the other way round's
    ``cascade`` and ``victim`` as ``base_cascade`` and ``base_victim``: the base's own misses
    that ``run`` did not have, split the same way (are the divergences one-sided?)."""
    out = miss_breakdown(models, base, run)
    back = miss_breakdown(models, run, base)
    return {**out, "base_cascade": back["cascade"], "base_victim": back["victim"]}


def _breakdown_lines(rows: list[tuple[str, str, dict[str, int]]]) -> list[str]:
    lines = [
        "",
        "| seed | N | " + " | ".join(_BREAKDOWN) + " |",
        "| --- | --- |" + " --- |" * len(_BREAKDOWN),
    ]
    totals: dict[str, dict[str, int]] = {}
    for seed, n, b in rows:
        lines.append(f"| {seed} | {n} | " + " | ".join(str(b[k]) for k in _BREAKDOWN) + " |")
        total = totals.setdefault(n, dict.fromkeys(_BREAKDOWN, 0))
        for k in _BREAKDOWN:
            total[k] += b[k]
    for n, total in sorted(totals.items(), key=lambda item: _label_order(item[0])):
        lines.append(f"| all | {n} | " + " | ".join(str(total[k]) for k in _BREAKDOWN) + " |")
    return lines


def _miss_rows(rounds: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, int]]]:
    """Each round's other runs (N > 1, and the control) against its one gateway, request by
    request (rounds that recorded requests)."""
    rows = []
    for result in rounds:
        base = base_run(result)
        if "trace_models" not in result or "requests" not in base:
            continue
        for r in sorted(result["runs"], key=lambda r: _label_order(run_label(r))):
            if r is base:
                continue
            rows.append(
                (
                    str(result["_setup"]["seed"]),
                    run_label(r),
                    paired_breakdown(result["trace_models"], base["requests"], r["requests"]),
                )
            )
    return rows


def _excess_lines(rows: list[tuple[str, str, dict[str, int]]]) -> list[str]:
    """Are a run's extra cascades and victim choices one-sided? Per round, its ``cascade``
    less the base's (``base_cascade``), and the same for ``victim``: the mean over rounds
    with a 95% t interval, per replica count and for the control (two-sided noise gives
    intervals around 0 for both)."""
    by_n: dict[str, list[dict[str, int]]] = {}
    for _, n, b in rows:
        by_n.setdefault(n, []).append(b)
    lines = [
        "",
        "| N | rounds | cascade - base_cascade per round (95% t) "
        "| victim - base_victim per round (95% t) |",
        "| --- | --- | --- | --- |",
    ]
    for n in sorted(by_n, key=_label_order):
        cells = []
        for mine, theirs in (("cascade", "base_cascade"), ("victim", "base_victim")):
            mean, half = mean_and_interval([b[mine] - b[theirs] for b in by_n[n]])
            cells.append(f"{mean:+.1f} ± {half:.1f}")
        lines.append(f"| {n} | {len(by_n[n])} | " + " | ".join(cells) + " |")
    return lines


def _secondary_rows(rounds: list[dict[str, Any]], counts: list[str]) -> list[str]:
    """The secondary figure: each replica count's misses and p99 over the mean of its round's
    two one-gateway runs (the first and the control: half the baseline's noise), over the
    rounds that ran a control. The primary figure stays the ratio to the first run."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for result in rounds:
        base = base_run(result)
        controls = [r for r in result["runs"] if r.get("control")]
        if not controls:
            continue
        for r in result["runs"]:
            if r["gateways"] == 1:
                continue
            for key, field in (("misses", "misses_at_managers"), ("p99", "p99_ms")):
                one = (base[field] + controls[0][field]) / 2
                ratios.setdefault((key, run_label(r)), []).append(r[field] / one)
    if not ratios:
        return []
    lines = []
    for key in ("misses", "p99"):
        cells = []
        for n in counts:
            values = ratios.get((key, n))
            if not values:
                cells.append("-")
                continue
            mean, half = mean_and_interval(values)
            cells.append(f"{mean:.3f} ± {half:.3f} ({len(values)})")
        lines.append(
            f"| {key}, secondary (over the mean of the round's two one-gateway runs) | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def compare(base_path: Path, other_path: Path) -> str:
    """``--compare``: OTHER's runs against BASE's at the same replica count (one seed)."""
    base, other = json.loads(base_path.read_text()), json.loads(other_path.read_text())
    if base.get("trace_models") != other.get("trace_models") or "trace_models" not in base:
        raise SystemExit("--compare: both results must record the same trace (same seed)")
    by_n = {r["gateways"]: r for r in base["runs"] if "requests" in r}
    rows = [
        (
            str(other["_setup"]["seed"]),
            str(r["gateways"]),
            paired_breakdown(base["trace_models"], by_n[r["gateways"]]["requests"], r["requests"]),
        )
        for r in other["runs"]
        if r["gateways"] in by_n and "requests" in r
    ]
    return "\n".join(_breakdown_lines(rows))


def summarise(paths: list[Path]) -> str:
    """Rounds (one ``--json`` result per seed, 1 gateway first, all counts in one hold) as a
    Markdown table per round and the mean ratios to one gateway with 95% intervals."""
    rounds = [json.loads(p.read_text()) for p in paths]
    lines = [
        "| seed | N | misses | vs 1 | stale hits | causes | p99 ms | vs 1 | fwd | offered/s "
        "| device util % | sat. req/s | vs 1 | gw CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios: dict[tuple[str, str], list[float]] = {}
    paired: dict[str, tuple[list[int], list[int]]] = {}  # label: (one gateway's, its) misses
    cpu: dict[str, list[float]] = {}
    decision_p99: list[float] = []
    for result in rounds:
        base = base_run(result)  # one gateway (rounds may run the counts in any order)
        if "decision_overhead" in result:
            decision_p99.append(result["decision_overhead"]["p99_us"])
        for r in sorted(result["runs"], key=lambda r: _label_order(run_label(r))):
            n = run_label(r)
            cpu.setdefault(n, []).append(r["gateway_cpu_ms_per_request"])
            if r is not base:
                one, its = paired.setdefault(n, ([], []))
                one.append(base["misses_at_managers"])
                its.append(r["misses_at_managers"])
                for key, field in (("misses", "misses_at_managers"), ("p99", "p99_ms"),
                                   ("saturation", "saturation_rps")):  # fmt: skip
                    ratios.setdefault((key, n), []).append(r[field] / base[field])
            causes = ", ".join(f"{k} {v}" for k, v in r.get("miss_causes", {}).items())
            lines.append(
                f"| {result['_setup']['seed']} | {n} | {r['misses_at_managers']} "
                f"| {_ratio(r['misses_at_managers'], base['misses_at_managers'])} | {_stale(r)} "
                f"| {causes} | {r['p99_ms']:.1f} | {_ratio(r['p99_ms'], base['p99_ms'])} "
                f"| {r['forwarded']} | {r['offered_rps']:.1f} | {100 * r['device_utilisation']:.2f} "
                f"| {r['saturation_rps']:.0f} | {_ratio(r['saturation_rps'], base['saturation_rps'])} "
                f"| {r['gateway_cpu_ms_per_request']:.2f} |"
            )
    counts = sorted({n for _, n in ratios}, key=_label_order)
    lines += ["", "| ratio to one gateway (mean, 95% t interval, rounds) | "
              + " | ".join(n if "control" in n else f"{n} replicas" for n in counts) + " |",
              "| --- |" + " --- |" * len(counts)]  # fmt: skip
    for key in ("misses", "p99", "saturation"):
        cells = []
        for n in counts:
            mean, half = mean_and_interval(ratios[(key, n)])
            cells.append(f"{mean:.3f} ± {half:.3f} ({len(ratios[(key, n)])})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    pooled = [pooled_ratio_interval(*paired[n]) for n in counts]
    lines.append(
        "| misses, pooled (sum over rounds / one gateway's sum; 95% bootstrap over rounds) | "
        + " | ".join(f"{r:.3f} [{low:.3f}, {high:.3f}]" for r, low, high in pooled)
        + " |"
    )
    lines += _secondary_rows(rounds, counts)
    lines += _pooled_p99_lines(rounds, counts)
    lines.append(
        "| gateway CPU ms/request (mean over rounds; one gateway: "
        f"{statistics.fmean(cpu['1']) if '1' in cpu else math.nan:.2f}) | "
        + " | ".join(f"{statistics.fmean(cpu[n]):.2f}" for n in counts)
        + " |"
    )
    lines += _tail_summary(rounds)
    lines += _forward_excess_lines(rounds)
    rows = _miss_rows(rounds)
    if rows:
        lines += _breakdown_lines(rows)
        lines += _excess_lines(rows)
    if decision_p99:
        lines.append(
            f"\nScale-out's part of a routing decision, p99: {min(decision_p99):.1f}"
            f"-{max(decision_p99):.1f} us ({len(decision_p99)} rounds)."
        )
    return "\n".join(lines)
