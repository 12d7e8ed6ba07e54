"""Distributed (FSD-Inference) inference: partition volume, throughput, latency, launch, cost model.

Sections (each prints a table; everything lands in ``--out`` as JSON and PNG plots):

1. **partition**: bytes exchanged per inference (one sample) on RadiX-Net-style sparse nets of
   1,024 / 4,096 / 16,384 neurons x 120 layers at the Graph Challenge's fan-in (32 per
   neuron), for N in {2, 4, 8} and the hypergraph / random / block partitioners. Computed on
   one period of the nets' layer patterns (6 / 8 / 10 layers) times the periods in 120
   layers, which is exact (the patterns repeat), so the 16,384-neuron case fits in memory.
2. **grid**: real ``gpufaas gpu-manager`` processes (one per shard, up to 8) hold the shards;
   the coordinator runs here. For N in {1, 2, 4, 8}, the direct channel with each partitioner
   and NATS / S3 with the hypergraph one: latency (concurrency 1, median) and throughput
   (closed loop, ``--concurrency`` requests in flight), plus the launch time of each set
   through the tree. ``--repeats R`` runs every configuration R times, each repetition in
   its own shuffled order, and a cell is the median of its repetitions; ``--seed`` draws the
   inputs and the random / hypergraph partitions (0: sessions 4-13). ``--cells
   2-direct-block,...`` runs only those cells (one cell's repetitions again, say).
3. **mlp**: a dense MLP larger than one device's budget: it fails to launch on one shard
   and serves on 4 and 8 (``--mlp-only``; with ``--cpu-devices 2`` a node holds two
   shards, one per device).
4. **costmodel**: ``--calibrate-only`` fits the constants of
   :mod:`gpufaas.scheduler.costmodel` on 1,024-neuron nets (never the grid's) and writes them;
   a grid run with ``--constants CAL/fsd.json`` predicts every cell and scores the model
   (within 25%, and per cell whether it picks the fastest configuration); ``--evaluate
   GRID/fsd.json --constants CAL/fsd.json`` re-scores a grid run offline. Calibration and
   validation are always separate runs.
5. **message-cost** (``--message-cost``): one direct-channel message to a real manager, with
   httpx and with the pooled client the channel uses: wall time, sender and receiver CPU.
6. **cpu-split** (``--cpu-split``): CPU seconds per request over every process (shards and
   coordinator) at N = 1, 2, 4, and the throughput bound that puts on the machine's cores.

    python bench/fsd.py --quick          # 4,096 x 24 layers, batch 64: about 10 minutes here
    python bench/fsd.py                  # 4,096 x 120 layers

Timings on a shared machine are noisy: ratios measured in the same run are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpufaas.core.channelservers import S3Server, ServerMissing, run_nats, run_seaweedfs, vacuum
from gpufaas.core.commands import ManagerOptions
from gpufaas.core.layered import LayeredNet, dense_mlp, radix_net
from gpufaas.core.sharding import ChannelConfig, Parallelism, ShardLoad
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.coordinator import (
    Coordinator,
    LaunchFailed,
    ShardFailed,
    ShardSet,
    tree_rounds,
)
from gpufaas.scheduler.local import run_manager_processes
from gpufaas.scheduler.partition import communication, partition, shard_sizes, split

PERIOD = {1024: 6, 4096: 8, 16384: 10}  # layers before a RadiX-Net's pattern repeats
# The calibration's message split (costmodel.message_split): 4,096 wide so that its large
# messages span the grid's (65-524 KiB at batch 64), 8 layers of one stride each.
SPLIT_NEURONS, SPLIT_DEPTH = 4096, 8
# the unsharded calibration runs' depths (the grid's net is 24 deep: never one of them)
UNSHARDED_DEPTHS = (8, 16)
# the sharded (channel) calibration runs' depths. 4 and 8 (sessions 4-15) fit the per-request
# terms and the per-layer ones from two depths close together: on the 1,024 x 120 grid
# (fifteenth session) direct was predicted 32-42% low at every N and split, with c_shard
# 507 us per request against c_sync 99 us per waiting layer. 32 (sixteenth session) anchors
# the per-layer slope; fit_constants(channel_depths=(4, 8)) is the control
CHANNEL_DEPTHS = (4, 8, 32)
SHALLOW_CHANNEL_DEPTHS = (4, 8)
# the channel runs' width (never the grid's), and the seventeenth session's N = 2 runs at the
# 4,096-wide grid's width (depths 8 and 16: never the grid's 24 or 120): the calibration's
# 2,048-wide N = 2 runs did not show what the grid's N = 2 cells pay over NATS and S3 (its
# messages and its server's CPU per layer); score() fits them in costmodel_relay_grid_width only
CHANNEL_WIDTH = 2048
GRID_WIDTH, GRID_WIDTH_DEPTHS = 4096, (8, 16)
# the channels with a server of their own (NATS, SeaweedFS): the seventeenth session's form
# fits their relay terms (costmodel.ChannelCost.per_relay_*, the server's time on the path)
RELAYED = costmodel.RELAYED
# the eighteenth session's secondary form: direct's relay terms fitted too (a time on the path
# per message and byte received, on no core: at N = 2 the calibration's own direct runs are
# fitted 9-11% low by the default, whose direct terms N >= 4 pins over the cores)
RELAYED_DIRECT = ("direct", *RELAYED)
# the nineteenth session's ping-pong runs (kind "pingpong"): the direct channel on a RadiX-Net
# of negligible compute (256 wide: a layer's products are ~1/64 of the 2,048-wide runs') at
# two depths, block split, 2 and 4 shards. A round is then nearly all exchange, and the
# depths' difference per exchange round, wall time against the managers' CPU, says how much
# of a round is on no core (:func:`path_latency`). Never fitted with the other runs: its
# N = 2 figure is the measured form's pinned ``per_relay_sync_s`` (:func:`measured_relay`)
PINGPONG_WIDTH, PINGPONG_DEPTHS, PINGPONG_SHARDS = 256, (16, 64), (2, 4)
# the link metrics the managers export (gpu_manager/shards.py LinkCollector), by record key
LINK_FAMILIES = {"gpufaas_shard_link_setups": "setups", "gpufaas_shard_messages": "messages"}
# sessions 9-14's form and the default until the seventeenth session's follow-up: the whole
# contention (w = 1), no relay terms; score() fits its controls with it, as they were
W1: dict[str, Any] = {"contention_weight": 1.0, "relay": False}


# -------------------------------------------------------------------------------------------
# 1. partition volume
# -------------------------------------------------------------------------------------------


def partition_volumes(layers: int = 120) -> list[dict[str, Any]]:
    rows = []
    for neurons, period in PERIOD.items():
        net = radix_net(neurons, period)
        repeats = layers / period
        for shards in (2, 4, 8):
            for method in ("hypergraph", "random", "block"):
                started = time.perf_counter()
                part = partition(net, shards, method=method, seed=1)
                seconds = time.perf_counter() - started
                volume = communication(net, part)
                rows.append(
                    {
                        "neurons": neurons,
                        "layers": layers,
                        "shards": shards,
                        "method": method,
                        "bytes_per_sample": volume.bytes_per_sample * repeats,
                        "messages": volume.messages * repeats,
                        "partition_s": seconds,
                    }
                )
                print(
                    f"  {neurons:>6} x {layers} N={shards} {method:<10} "
                    f"{volume.bytes_per_sample * repeats / 1e6:9.3f} MB/sample  "
                    f"{volume.messages * repeats:8.0f} msgs  ({seconds:.2f} s to partition)",
                    flush=True,
                )
    return rows


# -------------------------------------------------------------------------------------------
# Nodes
# -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def managers(
    root: Path, count: int, *, device_memory: str, keep_pids: bool = False, cpu_devices: int = 1
) -> Iterator[Any]:
    def options(index: int) -> ManagerOptions:
        return ManagerOptions(
            cpu_devices=cpu_devices,
            device_memory=device_memory,
            host_memory="256Mi",
            artifact_dir=root / f"artifacts{index}",
            force_cpu=True,
        )

    with run_manager_processes(
        nodes=count, options=options, log_dir=root, start_timeout_s=300, stop_timeout_s=20
    ) as procs:
        urls = [m.url for m in procs]
        yield (urls, [m.process.pid for m in procs]) if keep_pids else urls


async def measure(
    coordinator: Coordinator,
    name: str,
    x: np.ndarray,
    *,
    latency_requests: int,
    throughput_requests: int,
    concurrency: int,
    budget_s: float,
    pids: tuple[int, ...] = (),
) -> dict[str, float]:
    """A cell's latency (requests one at a time, a probe pass after each) and closed-loop
    throughput. ``others_ms``: CPU per latency request that processes other than this one
    and ``pids`` (the managers) used meanwhile: the NATS / S3 server's, and anyone else's
    (a disturbed cell; the probe, timed in thread CPU, cannot see CPU taken from a core)."""
    await coordinator.infer(name, x)  # warm-up
    latencies, passes = [], []
    edges = [speed_probe()]  # the machine's speed beside the cell, never from its requests
    busy, own = _machine_busy_seconds(), time.process_time()
    theirs = sum(_cpu_seconds(pid) for pid in pids)
    started = time.perf_counter()
    for _ in range(latency_requests):
        t = time.perf_counter()
        await coordinator.infer(name, x)
        latencies.append(time.perf_counter() - t)
        passes.append(probe_pass())  # between requests: the speed while the cell runs
        if time.perf_counter() - started > budget_s / 2:
            break
    others = (_machine_busy_seconds() - busy) - (time.process_time() - own) \
        - (sum(_cpu_seconds(pid) for pid in pids) - theirs)  # fmt: skip
    edges.append(speed_probe())
    done = 0
    stop_at = time.perf_counter() + budget_s / 2

    async def worker() -> None:
        nonlocal done
        while done < throughput_requests and time.perf_counter() < stop_at:
            done += 1
            await coordinator.infer(name, x)

    shared_before = coordinator.passes(name).stats
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t
    shared = coordinator.passes(name).stats
    run_passes = shared.passes - shared_before.passes
    return {
        "concurrency": concurrency,
        "batching": coordinator.batching,
        "requests_per_pass": (shared.requests - shared_before.requests) / run_passes
        if run_passes
        else 1.0,
        "latency_s": statistics.median(latencies),
        "latency_min_s": min(latencies),
        "throughput_rps": done / elapsed,
        "samples_per_s": done * x.shape[0] / elapsed,
        "requests": done,
        "probe_s": statistics.median(passes),
        "probe_passes_s": passes,
        "probe_edges_s": edges,
        "others_ms": others / len(latencies) * 1e3,
    }


def grid_configs(
    max_shards: int,
    channels: Iterable[str],
    methods: tuple[str, ...] = ("hypergraph", "random", "block"),
    *,
    every_method: bool = False,
) -> list[tuple[int, str, str]]:
    """N = 1, then per N: the direct channel with every partitioner in ``methods``, the
    other channels with the hypergraph partition only (S3 up to N = 4), or with every
    partitioner too where ``every_method``."""
    configs = [(1, "direct", "block")]
    for shards in (2, 4, 8):
        if shards > max_shards:
            continue
        for method in methods:
            configs.append((shards, "direct", method))
        for channel in channels:
            if channel != "direct" and not (channel == "s3" and shards > 4):
                for method in methods if every_method else ("hypergraph",):
                    configs.append((shards, channel, method))
    return configs


def select_cells(configs: list[tuple[int, str, str]], cells: str) -> list[tuple[int, str, str]]:
    """The configurations of ``configs`` that ``cells`` names (``--cells``: comma-separated
    ``N-channel-method``, e.g. ``2-direct-block,4-nats-random``; N = 1 is ``1-direct-block``),
    in the grid's order: so one cell's repetitions can be run again alone. A name that is not
    ``N-channel-method``, or is no configuration of this grid, is a ValueError naming it."""
    wanted = []
    for name in (part.strip() for part in cells.split(",")):
        shards, _, rest = name.partition("-")
        channel, _, method = rest.partition("-")
        if not shards.isdigit() or not channel or not method:
            raise ValueError(f"--cells: {name!r} is not N-channel-method (e.g. 2-direct-block)")
        wanted.append((int(shards), channel, method))
    missing = ["-".join(map(str, w)) for w in wanted if w not in configs]
    if missing:
        raise ValueError(f"--cells: not a cell of this grid: {', '.join(missing)}")
    return [c for c in configs if c in wanted]


def repetition_orders(
    configs: list[tuple[int, str, str]], *, repeats: int, seed: int
) -> list[list[tuple[int, str, str]]]:
    """The order of ``configs`` in each of ``repeats`` repetitions: as listed for one
    repetition (the grid of sessions 4-13); with more, each repetition a permutation of its
    own, drawn from ``seed`` and the repetition's index (interleaved: a slow spell on the
    machine falls on different cells in each)."""
    if repeats == 1:
        return [list(configs)]
    orders = []
    for index in range(repeats):
        rng = np.random.default_rng([seed, index])
        orders.append([configs[i] for i in rng.permutation(len(configs))])
    return orders


MEDIAN_FIELDS = ("latency_s", "latency_min_s", "throughput_rps", "samples_per_s",
                 "requests_per_pass", "others_ms", "launch_s", "cost_usd",
                 "cost_compute_usd", "cost_channel_usd", "max_shard_load_s")  # fmt: skip


def median_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration from its repetitions' rows (``repetition`` 0, 1, ...): the
    median of each measured figure over the repetitions, every probe pass of every
    repetition (``probe_s`` their median), and each repetition's latency in
    ``repetitions_latency_s``. A configuration that failed in any repetition stays failed.
    Rows come out in the order of their configurations' first appearance."""
    by_config: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_config.setdefault((row["shards"], row["channel"], row["method"]), []).append(row)
    merged = []
    for runs in by_config.values():
        runs = sorted(runs, key=lambda r: int(r.get("repetition", 0)))
        failed = [r for r in runs if "failed" in r]
        if failed:
            merged.append({k: v for k, v in failed[0].items() if k != "repetition"})
            continue
        row = {k: v for k, v in runs[0].items() if k != "repetition"}
        for field in MEDIAN_FIELDS:
            if field in row:
                row[field] = statistics.median(float(r[field]) for r in runs)
        passes = [p for r in runs for p in r.get("probe_passes_s", [])]
        if passes:
            row["probe_passes_s"] = passes
            row["probe_s"] = statistics.median(passes)
        row.pop("probe_edges_s", None)  # per repetition only (the raw rows keep them)
        row["repetitions_latency_s"] = [float(r["latency_s"]) for r in runs]
        if any("links" in r for r in runs):  # every repetition's messages, by path
            row["links"] = counts_sum(r["links"] for r in runs if "links" in r)
        merged.append(row)
    return merged


def hold_probe(rows: list[dict[str, Any]]) -> float | None:
    """The machine's speed over a whole grid: the median of every probe pass of every cell
    (one speed for every cell's prediction), or None where the rows carry no probe passes."""
    passes = [p for r in rows if "failed" not in r for p in r.get("probe_passes_s", [])]
    return statistics.median(passes) if passes else None


def set_artifacts(loads: Sequence[ShardLoad], root: Path) -> list[Path]:
    """The files a removed set's ``loads`` leave under ``root``: each shard's artifact where the
    coordinator wrote it (a ``file://`` URI) and its verified copy in every manager's
    artifact store (``artifacts<k>/blobs/<sha256>``, the layout :func:`managers` gives).
    Neither is deleted by a removal: at 4,096 x 24 a cell left 62-73 MB in the
    coordinator's folder alone (bench/RESULTS.md, #15, 16,384 x 120 (i))."""
    found = []
    for load in loads:
        if load.artifact.startswith("file://"):
            found.append(Path(urllib.parse.unquote(urllib.parse.urlsplit(load.artifact).path)))
        if load.sha256:
            found.extend(root.glob(f"artifacts*/blobs/{load.sha256}"))
    return [path for path in found if path.is_relative_to(root)]


def reclaim(shard_set: ShardSet, root: Path, *, s3: S3Server | None) -> None:
    """After a cell: delete its set's artifacts (:func:`set_artifacts`) and compact the S3
    server's volumes, which keep a deleted message's bytes until a sweep (every 14 min).
    Without it the grid of (h) filled the disk after 21 of 25 cells (bench/RESULTS.md, #15,
    16,384 x 120)."""
    for path in set_artifacts(shard_set.loads, root):
        path.unlink(missing_ok=True)
    if s3 is not None:
        vacuum(s3)


async def run_grid(
    urls: list[str],
    net: LayeredNet,
    channels: dict[str, ChannelConfig],
    args: argparse.Namespace,
    root: Path,
    pids: tuple[int, ...] = (),
    *,
    s3: S3Server | None = None,
) -> list[dict[str, Any]]:
    """Every configuration of the grid, ``args.repeats`` times (:func:`repetition_orders`),
    one row per configuration and repetition (``repetition``); the inputs and the
    partitions drawn from ``args.seed`` (0: the grid of sessions 4-13). After each cell its
    files are deleted (:func:`reclaim`); ``disk_free_gb`` is the free space after that."""
    rng = np.random.default_rng(args.seed)
    x = (rng.random((args.batch, net.widths[0])) < 0.2).astype(np.float32)
    coordinator = Coordinator(artifact_base=str(root / "shards"), timeout_s=120,
                              batching=args.shared_passes)  # fmt: skip
    rows = []
    profiles: dict[tuple[int, str], costmodel.Profile] = {}  # for the cost column
    configs = grid_configs(len(urls), channels, tuple(args.methods.split(",")),
                           every_method=args.every_method)  # fmt: skip
    if args.cells:  # a subset, e.g. one cell's repetitions again
        configs = select_cells(configs, args.cells)
    runs = [(repetition, config)
            for repetition, order in enumerate(repetition_orders(configs, repeats=args.repeats,
                                                                 seed=args.seed))
            for config in order]  # fmt: skip
    try:
        for repetition, (shards, channel, method) in runs:
            name = f"radix-{shards}-{channel}-{method}"
            links_before = await asyncio.to_thread(read_link_counts, urls)
            shard_set = await coordinator.deploy(
                name,
                net,
                Parallelism(shards=shards, strategy="intra-layer", channel=channel),  # type: ignore[arg-type]
                nodes=urls[:shards],
                method=method,
                channel=channels[channel],
                seed=args.seed,
            )
            try:
                result = await measure(
                    coordinator,
                    name,
                    x,
                    latency_requests=args.latency_requests,
                    throughput_requests=args.throughput_requests,
                    concurrency=args.concurrency,
                    budget_s=args.budget_s,
                    pids=pids,
                )
            except (ShardFailed, LaunchFailed) as e:
                print(f"  N={shards} {channel} {method}: FAILED {e}", flush=True)
                rows.append({"shards": shards, "channel": channel, "method": method,
                             "seed": args.seed, "repetition": repetition,
                             "failed": str(e)})  # fmt: skip
                await coordinator.remove(name)
                reclaim(shard_set, root, s3=s3)
                continue
            launch = shard_set.launch
            row = {
                "shards": shards,
                "channel": channel,
                "method": method,
                "seed": args.seed,
                "repetition": repetition,
                "batch": args.batch,
                "bytes_per_request": shard_set.volume.bytes_per_sample * args.batch,
                "launch_s": shard_set.launch_seconds,
                "launch_depth": launch.depth if launch else 0,
                "tree_rounds": tree_rounds(shards),
                "max_shard_load_s": max(launch.seconds.values()) if launch else 0.0,
                **result,
                # which path the managers' messages took meanwhile (nineteenth session)
                "links": counts_between(links_before,
                                        await asyncio.to_thread(read_link_counts, urls)),
            }  # fmt: skip
            await coordinator.remove(name)
            reclaim(shard_set, root, s3=s3)
            row["disk_free_gb"] = shutil.disk_usage(root).free / 1e9
            if (shards, method) not in profiles:  # after the measurement, never during it
                part = partition(net, shards, method=method, seed=args.seed)  # the deploy's
                profiles[(shards, method)] = costmodel.profile(net, part)
            cost = costmodel.cost(profiles[(shards, method)], batch=args.batch, channel=channel,
                                  latency_s=row["latency_s"], prices=costmodel.Prices())  # fmt: skip
            row = _inserted_after(row, "latency_s", {
                "cost_usd": cost.total_usd,  # per request, at the measured latency
                "cost_compute_usd": cost.compute_usd,
                "cost_channel_usd": cost.channel_usd,
            })  # fmt: skip
            rows.append(row)
            print(
                f"  [{repetition}] N={shards} {channel:<6} {method:<10} latency {row['latency_s'] * 1e3:8.1f} ms"
                f"  cost ${cost.total_usd * 1e6:8.3f} per 1M requests"
                f"  throughput {row['throughput_rps']:6.2f} req/s"
                f"  launch {row['launch_s']:.2f} s ({row['launch_depth']} rounds)"
                f"  others {row['others_ms']:.1f} ms per request"
                f"  messages {row['links'].get('messages', {})}",
                flush=True,
            )
    finally:
        await coordinator.close()
    return rows


def _inserted_after(row: dict[str, Any], key: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``extra``'s fields right after ``key`` (the tables list fields in order)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        out[k] = v
        if k == key:
            out.update(extra)
    return out


async def run_mlp(
    urls: list[str], device_bytes: int, root: Path, *, devices_per_node: int = 1
) -> dict[str, Any]:
    """The dense MLP unsplit (refused: it fits no device) and split 4 and 8 ways where the
    nodes have that many devices (``devices_per_node`` each: a node puts a set's shards on
    distinct devices), block partition: allclose to the reference, and the latency. A split
    whose largest shard is over one device's budget is recorded as refused."""
    widths = [2048, 4096, 4096, 1024, 10]
    mlp = dense_mlp(widths, seed=3)
    x = np.random.default_rng(1).standard_normal((16, widths[0])).astype(np.float32)
    reference = mlp.forward(x)
    coordinator = Coordinator(artifact_base=str(root / "mlp"), timeout_s=120)
    result: dict[str, Any] = {
        "widths": widths,
        "weight_bytes": mlp.weight_bytes,
        "device_bytes": device_bytes,
        "times_device": mlp.weight_bytes / device_bytes,
        "nodes": len(urls),
        "devices_per_node": devices_per_node,
    }
    try:
        try:
            await coordinator.deploy(
                "mlp-1", mlp, Parallelism(shards=1, strategy="intra-layer"), nodes=urls[:1]
            )
            result["n1"] = "launched (unexpected)"
        except LaunchFailed as e:
            result["n1"] = f"refused: {str(e)[:160]}"
        for shards in (4, 8):
            if shards > len(urls) * devices_per_node:
                continue
            name = f"mlp-{shards}"
            largest = max(shard_sizes(split(mlp, partition(mlp, shards, method="block"))))
            result[f"n{shards}_largest_shard_bytes"] = largest
            if largest > device_bytes:  # refused before launching: no device can hold it
                result[f"n{shards}"] = f"refused: largest shard {largest} B > {device_bytes} B"
                print(f"  MLP on N={shards}: {result[f'n{shards}']}")
                continue
            await coordinator.deploy(
                name,
                mlp,
                Parallelism(shards=shards, strategy="intra-layer"),
                nodes=urls[:shards],
                method="block",
            )
            out = await coordinator.infer(name, x)
            ok = bool(np.allclose(out, reference, rtol=1e-4, atol=1e-4))
            lat = []
            for _ in range(5):
                t = time.perf_counter()
                await coordinator.infer(name, x)
                lat.append(time.perf_counter() - t)
            result[f"n{shards}"] = {"allclose": ok, "latency_s": statistics.median(lat)}
            print(
                f"  MLP on N={shards}: allclose={ok} latency {statistics.median(lat) * 1e3:.1f} ms"
            )
            await coordinator.remove(name)
    finally:
        await coordinator.close()
    print(f"  MLP on N=1: {result['n1']}")
    return result


async def run_local(net: LayeredNet, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Shards as threads of one process over the local channel (one node, no HTTP)."""
    import torch

    torch.set_num_threads(1)  # one core per shard, as on a node
    rng = np.random.default_rng(0)
    x = (rng.random((args.batch, net.widths[0])) < 0.2).astype(np.float32)
    rows = []
    for shards in (1, 2, 4, 8):
        row = await _local_once(net, shards, x, args)
        rows.append(row)
        print(f"  local N={shards}: latency {row['latency_s'] * 1e3:7.1f} ms  "
              f"throughput {row['throughput_rps']:6.2f} req/s", flush=True)  # fmt: skip
    return rows


async def _local_once(
    net: LayeredNet, shards: int, x: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    from gpufaas.core.channels import LocalChannel, Mailbox
    from gpufaas.gpu_manager.shards import ShardExecutor
    from gpufaas.scheduler.partition import split

    specs = split(net, partition(net, shards, method="hypergraph"))
    channel = LocalChannel()
    executors = []
    for spec in specs:
        mailbox = Mailbox()
        await channel.attach("net", spec.shard, mailbox)
        executors.append(ShardExecutor(spec, set_name="net", channel=channel, mailbox=mailbox))
    counter = 0

    async def one() -> None:
        nonlocal counter
        counter += 1
        rid = f"r{counter}"
        await asyncio.gather(
            *(
                e.run(rid, x.T[s.inputs], timeout_s=120)
                for e, s in zip(executors, specs, strict=True)
            )
        )

    await one()
    latencies = [await _timed(one()) for _ in range(args.latency_requests)]
    done = 0
    stop_at = time.perf_counter() + args.budget_s / 2

    async def worker() -> None:
        nonlocal done
        while done < args.throughput_requests and time.perf_counter() < stop_at:
            done += 1
            await one()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t
    for e in executors:
        e.close()
    return {"shards": shards, "latency_s": statistics.median(latencies),
            "throughput_rps": done / elapsed, "requests": done}  # fmt: skip


# -------------------------------------------------------------------------------------------
# 5. one direct-channel message
# -------------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_times(pids: Iterable[int]) -> tuple[float, float]:
    """The seconds the threads of ``pids`` have run on a core and waited for one, summed
    (``/proc/PID/task/TID/schedstat``: nanoseconds, where ``/proc/PID/stat`` counts 10 ms
    ticks, too coarse for a few requests of a few ms). A thread that has ended is not in
    it: the shards' workers and event loops live as long as their process."""
    ran = waited = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:  # the thread ended
                continue
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``: all but idle and
    iowait): against this run's own CPU it shows what other processes took meanwhile."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def link_counts_in(texts: Iterable[str]) -> dict[str, dict[str, float]]:
    """The managers' link counts (``setups`` by result, ``messages`` by path: the direct
    channel's messages each sent, by the path they took) from their ``/metrics`` texts,
    added over the managers."""
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[str, dict[str, float]] = {part: {} for part in LINK_FAMILIES.values()}
    for text in texts:
        for family in text_string_to_metric_families(text):
            part = LINK_FAMILIES.get(family.name)
            for sample in family.samples if part is not None else ():
                if sample.name.endswith("_total"):
                    (label,) = sample.labels.values()
                    total[part][label] = total[part].get(label, 0.0) + sample.value
    return total


def counts_between(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What the managers counted between two readings (:func:`link_counts_in`)."""
    return {part: {label: value - before.get(part, {}).get(label, 0.0)
                   for label, value in counts.items()}
            for part, counts in after.items()}  # fmt: skip


def counts_sum(readings: Iterable[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Several runs' counts added (a cell's repetitions, a calibration run's rounds)."""
    total: dict[str, dict[str, float]] = {}
    for reading in readings:
        for part, counts in reading.items():
            for label, value in counts.items():
                total.setdefault(part, {})[label] = total.get(part, {}).get(label, 0.0) + value
    return total


def read_link_counts(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every manager's link counts now, added (their ``/metrics``; no token needed)."""
    import urllib.request

    texts = []
    for url in urls:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as answer:
            texts.append(answer.read().decode())
    return link_counts_in(texts)


def off_shared_memory(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The sharded direct-channel rows whose messages did not all go through shared memory:
    some over HTTP or inline, none through a ring, or no counts recorded (the rule the
    nineteenth session's plan declared: such a cell is reported as such)."""
    found = []
    for row in rows:
        if row.get("channel") != "direct" or int(row.get("shards", 1)) < 2 or "failed" in row:
            continue
        sent = row.get("links", {}).get("messages")
        if not sent or sent.get("http", 0) or sent.get("inline", 0) or not sent.get("shm", 0):
            found.append(_label(row))
    return found


def _thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, by role: ``loop`` (the main thread: the event loop,
    HTTP, messages) and ``workers`` (every other thread: the shards' worker threads, where the
    products run, and uvloop's and torch's helpers). Python 3.11 does not give its threads
    OS names, so the worker threads cannot be told from the helpers by name."""
    roles = {"loop": 0.0, "workers": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = text.rsplit(")", 1)[1]
        seconds = sum(int(v) for v in fields.split()[11:13]) / os.sysconf("SC_CLK_TCK")
        roles["loop" if task.name == str(pid) else "workers"] += seconds
    return roles


async def message_cost(root: Path, *, count: int = 400, rounds: int = 3) -> list[dict[str, Any]]:
    """Sequential messages to a real manager's message route: wall time per message, the
    sender's CPU and the receiver's CPU (from /proc), with httpx and with the pooled client
    the direct channel uses (core/peerhttp.py), at 16 KiB, and with the pooled client at
    512 KiB (a hypergraph split's message on the 4,096 x 24 net at batch 64): the two sizes
    give the direct channel's CPU per message and per byte."""
    import httpx

    from gpufaas.core.channels import Envelope, encode, message_path
    from gpufaas.core.peerhttp import PeerPools

    rows = []
    with managers(root, 2, device_memory="32Mi", keep_pids=True) as (urls, pids):
        coordinator = Coordinator(artifact_base=str(root / "msg"), timeout_s=60)
        await coordinator.deploy(
            "m", radix_net(1024, 4), Parallelism(shards=2, strategy="intra-layer"),
            nodes=urls, method="block",
        )  # fmt: skip
        path = message_path("m", 1)
        client = httpx.AsyncClient()
        pools = PeerPools()
        try:
            for _ in range(rounds):
                for kind, values in (("httpx", np.ones((64, 64), np.float32)),
                                     ("pooled", np.ones((64, 64), np.float32)),
                                     ("pooled", np.ones((64, 2048), np.float32))):  # fmt: skip
                    before_rx, before_tx = _cpu_seconds(pids[1]), time.process_time()
                    started = time.perf_counter()
                    # Messages of requests the shard never runs wait in its mailbox for
                    # 30 s: fewer of the big ones keep that memory bounded (~150 MiB).
                    sent = count if values.nbytes < 1 << 16 else count // 4
                    for i in range(sent):
                        frame = encode(Envelope("m", f"{kind}-{values.nbytes}-{i}", 1, 0, 1),
                                       values)  # fmt: skip
                        if kind == "httpx":  # httpx takes bytes, not a memoryview
                            reply_x = await client.post(urls[1] + path, content=bytes(frame))
                            status = reply_x.status_code
                        else:
                            reply = await pools.to(urls[1]).post(path, frame, timeout_s=5)
                            status = reply.status
                        assert status in (202, 208), status
                    row = {
                        "client": kind,
                        "bytes": values.nbytes,
                        "wall_ms": (time.perf_counter() - started) / sent * 1e3,
                        "sender_cpu_ms": (time.process_time() - before_tx) / sent * 1e3,
                        "receiver_cpu_ms": (_cpu_seconds(pids[1]) - before_rx) / sent * 1e3,
                    }
                    rows.append(row)
                    print(f"  {kind:<7} {values.nbytes >> 10:>4} KiB {row['wall_ms']:.3f} ms/message, sender CPU "
                          f"{row['sender_cpu_ms']:.3f} ms, receiver CPU "
                          f"{row['receiver_cpu_ms']:.3f} ms", flush=True)  # fmt: skip
        finally:
            await client.aclose()
            await pools.close()
            await coordinator.close()
    return rows


CPU_SPLIT_CONFIGS = (
    (1, "unsplit"),
    (2, "shm"),
    (2, "http"),
    (4, "shm"),
    (4, "http"),
    (2, "layer"),
    (4, "layer"),
)
# "layer": the pipeline strategy (shard p owns layers [pL/N, (p+1)L/N) whole), direct channel
# through shared memory; never in the default run (the configurations sessions 10-14 ran).
_DEFAULT_SPLIT_CONFIGS = CPU_SPLIT_CONFIGS[:5]


def split_configs(text: str | None, *, batching: bool) -> list[tuple[int, str, bool]]:
    """``--split-configs`` (``N-link-mode``, comma-separated; mode ``single`` or ``shared``),
    or every one of :data:`CPU_SPLIT_CONFIGS` in the one mode ``batching`` gives."""
    if not text:
        return [(n, link, batching) for n, link in _DEFAULT_SPLIT_CONFIGS]
    configs = []
    for item in text.split(","):
        shards, link, mode = item.split("-")
        assert (int(shards), link) in CPU_SPLIT_CONFIGS and mode in ("single", "shared"), item
        configs.append((int(shards), link, mode == "shared"))
    return configs


async def cpu_per_request(
    root: Path,
    *,
    neurons: int,
    layers: int,
    batch: int,
    requests: int = 60,
    rounds: int = 3,
    concurrency: int = 4,
    configs: list[tuple[int, str, bool]] | None = None,
    pass_depth: int = 2,
    pass_cache_bytes: int | None = None,
    latency_requests: int = 0,
) -> list[dict[str, Any]]:
    """Where the time goes: CPU seconds per request, summed over the shard processes and
    the coordinator (this process), in a closed loop of ``concurrency`` requests in flight,
    N = 1, 2, 4 (direct channel, hypergraph split, between nodes through shared memory and
    through HTTP; N = 1 unsplit), in ``rounds`` rounds whose order alternates (forward,
    backward, ...) so that a drift in the machine's speed falls on every configuration alike.
    Every configuration goes through the same coordinator; each names whether its requests
    share passes (``configs``: N, link, batching; the coordinator's ``batching`` is set
    before each run), so N = 1 shares passes exactly as N = 2 and 4 do, with passes sized to
    the cache (``pass_cache_bytes``) and ``pass_depth`` in flight (``requests_per_pass`` is
    the operating point). With
    ``c`` cores, throughput cannot pass ``c / cpu``. ``products_ms`` is the shards' arithmetic
    alone per request (every shard's pass at the run's mean pass size, timed on one thread in
    this process, no channel: :func:`shard_compute_seconds`), so the shards' worker threads'
    CPU beyond it is their trips, hand-overs and receive-side copies; ``idle_ms`` is the
    cores' time per request that no process used (waits). ``latency_requests``: that many
    requests one at a time after each closed loop, their median as ``latency_ms``."""
    net = radix_net(neurons, layers)
    x = (np.random.default_rng(0).random((batch, neurons)) < 0.2).astype(np.float32)
    rows = []
    configs = configs or [(n, link, True) for n, link in _DEFAULT_SPLIT_CONFIGS]
    cache = {} if pass_cache_bytes is None else {"pass_cache_bytes": pass_cache_bytes}
    with managers(root, 4, device_memory="256Mi", keep_pids=True) as (urls, pids):
        coordinator = Coordinator(artifact_base=str(root / "cpu"), timeout_s=120,
                                  pass_depth=pass_depth, **cache)  # fmt: skip
        sets, specs = {}, {}
        try:
            for shards, link in sorted({(n, link) for n, link, _ in configs}):
                method = "layer" if link == "layer" else "hypergraph" if shards > 1 else "block"
                strategy = "layer" if link == "layer" else "intra-layer"
                name = f"net-{shards}-{link}"
                sets[name] = await coordinator.deploy(
                    name, net, Parallelism(shards=shards, strategy=strategy),
                    nodes=urls[:shards], method=method,
                    channel=ChannelConfig(kind="direct", shared_memory=link != "http"),
                )  # fmt: skip
                specs[name] = split(net, partition(net, shards, method=method))
            for index in range(rounds):
                order = configs if index % 2 == 0 else configs[::-1]
                for shards, link, batching in order:
                    name = f"net-{shards}-{link}"
                    coordinator.batching = batching
                    row = await _cpu_split_one(coordinator, name, x, pids[:shards], requests,
                                               concurrency, latency_requests=latency_requests)  # fmt: skip
                    per_pass = max(1, round(row["requests_per_pass"]))
                    row.update(round=index, shards=shards, link=link, concurrency=concurrency,
                               batching=batching, pass_depth=pass_depth,
                               pass_samples=coordinator.pass_samples(name),
                               products_ms=[shard_compute_seconds(spec, batch * per_pass)
                                            / per_pass * 1e3 for spec in specs[name]],
                               messages=sets[name].volume.messages,
                               bytes_per_request=sets[name].volume.bytes_per_sample * batch)  # fmt: skip
                    rows.append(row)
                    mode = "shared" if batching else "single"
                    print(f"  round {index} N={shards} {link:<7} {mode}: {row['throughput_rps']:.1f} "
                          f"req/s ({row['requests_per_pass']:.2f} requests per pass); CPU per "
                          f"request {row['cpu_ms']:.1f} ms (shards "
                          f"{[round(c, 1) for c in row['shard_cpu_ms']]}, coordinator "
                          f"{row['coordinator_cpu_ms']:.1f}; shard threads "
                          f"{ {k: round(v, 1) for k, v in row['shard_threads_ms'].items()} }; "
                          f"products alone {sum(row['products_ms']):.1f}; idle "
                          f"{row['idle_ms']:.1f}; other processes {row['others_ms']:.1f}); "
                          f"{os.cpu_count()} cores bound "
                          f"{row['bound_rps']:.1f} req/s", flush=True)  # fmt: skip
        finally:
            await coordinator.close()
    return rows


async def _cpu_split_one(
    coordinator: Coordinator,
    name: str,
    x: np.ndarray,
    pids: list[int],
    requests: int,
    concurrency: int,
    *,
    latency_requests: int = 0,
) -> dict[str, Any]:
    await asyncio.gather(*(coordinator.infer(name, x) for _ in range(concurrency)))  # warm
    passes_before = coordinator.passes(name).stats
    before = [_cpu_seconds(pid) for pid in pids]
    threads_before = [_thread_cpu_seconds(pid) for pid in pids]
    own = time.process_time()
    machine = _machine_busy_seconds()
    started = time.perf_counter()
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < requests:
            done += 1
            await coordinator.infer(name, x)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    shard_cpu = [_cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    passes = coordinator.passes(name).stats
    run_passes = passes.passes - passes_before.passes
    row: dict[str, Any] = {
        "throughput_rps": done / wall,
        "requests_per_pass": (passes.requests - passes_before.requests) / run_passes
        if run_passes
        else 1.0,
        "shard_cpu_ms": [c / done * 1e3 for c in shard_cpu],
        "coordinator_cpu_ms": (time.process_time() - own) / done * 1e3,
        # per request, summed over the shards: the event loop vs the other threads
        "shard_threads_ms": {
            role: sum(
                _thread_cpu_seconds(pid)[role] - b[role]
                for pid, b in zip(pids, threads_before, strict=True)
            )
            / done
            * 1e3
            for role in ("loop", "workers")
        },
    }
    row["cpu_ms"] = sum(row["shard_cpu_ms"]) + row["coordinator_cpu_ms"]
    # CPU other processes used meanwhile, per request (a hold shared with unlocked work)
    row["others_ms"] = (_machine_busy_seconds() - machine) / done * 1e3 - row["cpu_ms"]
    row["bound_rps"] = (os.cpu_count() or 1) / row["cpu_ms"] * 1e3
    row["idle_ms"] = (os.cpu_count() or 1) * wall / done * 1e3 - row["cpu_ms"]
    if latency_requests:  # one request at a time, after the closed loop (fifteenth session)
        seconds = [await _timed(coordinator.infer(name, x)) for _ in range(latency_requests)]
        row["latency_ms"] = statistics.median(seconds) * 1e3
    return row


# -------------------------------------------------------------------------------------------
# 4. cost model
# -------------------------------------------------------------------------------------------


class ShardPass:
    """One pass of a shard's compute for a batch, on this thread, through the executor's own
    code (products, bias, activation, hand-overs), with zeros standing in for remote parts,
    timed in thread CPU seconds (contention is the model's part, not this one's). No
    channel, no event loop: what a shard's worker does."""

    def __init__(self, spec: Any, batch: int) -> None:
        from gpufaas.core.channels import LocalChannel, Mailbox
        from gpufaas.gpu_manager.shards import ShardExecutor

        self.spec = spec
        self.batch = batch
        self.executor = ShardExecutor(spec, set_name="cal", channel=LocalChannel(),
                                      mailbox=Mailbox())  # fmt: skip
        self.inputs = np.zeros((len(spec.inputs), batch), np.float32)
        self.seconds()  # warm

    def _once(self, between_trips: Any = None) -> None:
        step = self.executor._first_step("r", self.inputs, lambda parts: None)
        while step.output is None:
            if between_trips is not None:  # where a shard waits for remote parts
                between_trips()
            layer = self.spec.layers[step.index]
            arrived = [(q, np.zeros((b.shape[1], self.batch), np.float32))
                       for q, b in sorted(layer.remote.items())]  # fmt: skip
            step = self.executor._step("r", step, arrived, lambda parts: None)

    def seconds(self) -> float:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a manager (gpu_manager/main.py); thread_time needs it
        try:
            started = time.thread_time()  # CPU: other processes' load is not the shard's
            self._once()
            return time.thread_time() - started
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        self.executor.close()


def _split_of(width: int, depth: int, shards: int, method: str, seed: int) -> list[Any]:
    net = radix_net(width, depth)
    return split(net, partition(net, shards, method=method, seed=seed))


def _products_worker(
    split_args: tuple[int, int, int, str, int],
    shard: int,
    batch: int,
    seconds: float,
    kernel: str,
    sync: tuple[Any, Any, Any],
) -> None:
    """One process of :func:`concurrent_products`: shard ``shard``'s passes for ``seconds``
    from the moment every process is ready, leaving its core (``sched_yield``) where the
    shard would wait for remote parts, as a shard's worker does at every trip."""
    ready, go, out = sync
    if kernel == "csr":  # the CSR products of main 8c6855b, for an A/B in one hold
        from gpufaas.core import layered
        from gpufaas.gpu_manager import shards as shard_module

        shard_module.product_matrix = layered.matrix  # type: ignore[assignment]
    import torch

    torch.set_num_threads(1)  # as in a manager
    one = ShardPass(_split_of(*split_args)[shard], batch)
    ready.release()
    go.wait()
    count, cpu = 0, time.thread_time()
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        one._once(os.sched_yield)
        count += 1
    out.put((shard, count, time.thread_time() - cpu))
    one.close()


def concurrent_products(
    split_args: tuple[int, int, int, str, int],
    shards: list[int],
    *,
    batch: int = 64,
    seconds: float = 2.0,
    kernel: str = "tiles",
) -> dict[str, Any]:
    """The products of ``shards`` of a split (indices; one may repeat), each in its own
    process, all at once for ``seconds`` (each process passes round its shard's trips, leaving its
    core between them): passes done, and the CPU per pass in each process. The cost model's
    contention (:func:`contention_of`) and ``bench/fsd-cores.py``'s ceiling both read it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_products_worker,
                    args=(split_args, shard, batch, seconds, kernel, (ready, go, out)))
        for shard in shards
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=120):
                raise TimeoutError("a products process did not start within 120 s")
        go.set()
        done = [out.get(timeout=seconds + 60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return {
        "shards": [shard for shard, _, _ in done],
        "seconds": seconds,
        "passes": [count for _, count, _ in done],
        "cpu_per_pass_s": [cpu / max(count, 1) for _, count, cpu in done],
    }


# The contention calibration's split (never the grid's net): tiles, like the grid's
# hypergraph and block splits, at every shard count the grid has beyond one.
CONTENTION_SPLIT = (2048, 8, "block", 3)


def contention_of(cores: int, *, batch: int, seconds: float = 2.0) -> list[dict[str, Any]]:
    """How much slower N shards' products run sharing the cores at once than alone, beyond
    sharing them out, for N = 2, 4, 8 (``costmodel.Constants.contention``): every shard's
    pass timed alone on this thread, then all N at once in N processes
    (:func:`concurrent_products`); the factor is the cores' time over the alone-time of
    the passes done, ``seconds x min(N, cores) / sum(passes x alone)``."""
    width, depth, method, seed = CONTENTION_SPLIT
    rows = []
    for shards in (2, 4, 8):
        split_args = (width, depth, shards, method, seed)
        alone = [shard_compute_seconds(spec, batch, repeats=9) for spec in _split_of(*split_args)]
        run = concurrent_products(split_args, list(range(shards)), batch=batch, seconds=seconds)
        work = sum(n * alone[p] for p, n in zip(run.pop("shards"), run["passes"], strict=True))
        factor = seconds * min(shards, cores) / work
        rows.append({"shards": shards, "alone_s": alone, **run, "factor": factor})
        print(f"  contention N={shards}: {factor:.2f}x the alone time ({sum(run['passes'])} "
              f"passes in {seconds:.0f} s; alone {statistics.median(alone) * 1e3:.2f} ms per "
              f"pass)", flush=True)  # fmt: skip
    return rows


def shard_compute_seconds(spec: Any, batch: int, *, repeats: int = 5) -> float:
    """The median of ``repeats`` :class:`ShardPass` timings."""
    one = ShardPass(spec, batch)
    try:
        return statistics.median(one.seconds() for _ in range(repeats))
    finally:
        one.close()


@functools.cache
def _probe() -> ShardPass:
    net = radix_net(2048, 4)  # fixed: the probe must be the same work every time
    return ShardPass(split(net, partition(net, 2, method="block", seed=0))[0], 64)


def probe_pass() -> float:
    """One pass of the speed probe: half of a block split of a fixed net (2,048 x 4, batch
    64) through the executor's code on this thread, in thread CPU seconds (~1.4 ms here).
    Timed the way compute is calibrated, it reads the machine's speed now; passes are
    interleaved with a run's timed requests (one after each), and their median is the run's
    probe (``costmodel.at_speed``). It never touches the requests it corrects."""
    return _probe().seconds()


def speed_probe(*, repeats: int = 5) -> float:
    """The median of ``repeats`` probe passes in a row (round A of session 6 used this, before
    and after a run; passes interleaved with the requests replaced it)."""
    return statistics.median(probe_pass() for _ in range(repeats))


def calibrate_compute(batch: int) -> list[dict[str, Any]]:
    """Every shard of block and random splits of RadiX-Nets of 1,024 / 2,048 / 4,096 neurons
    (8, 8, 4 layers: never the grid's net), N = 1, 2, 4, 8, two batch sizes, timed on one
    thread (a shard's worker has one core and one torch thread), each between two probe
    passes: the runs ``c_op`` and ``c_nnz`` are fitted on (:func:`fit_constants`)."""
    rows = []
    for width, depth in ((1024, 8), (2048, 8), (4096, 4)):
        net = radix_net(width, depth)
        for shards, method in ((1, "block"), (2, "block"), (2, "random"), (4, "block"),
                               (4, "random"), (8, "block"), (8, "random")):  # fmt: skip
            part = partition(net, shards, method=method, seed=3)
            prof = costmodel.profile(net, part)
            specs = split(net, part)
            passes = []
            for b in (max(1, batch // 4), batch):
                features = costmodel.compute_features(prof, batch=b).sum(axis=0)
                for spec in specs[:2]:  # shards of one split are alike
                    passes.append(probe_pass())
                    seconds = shard_compute_seconds(spec, b)
                    passes.append(probe_pass())
                    probe = statistics.median(passes[-2:])
                    rows.append({"width": width, "depth": depth, "shards": shards,
                                 "method": method, "batch": b, "shard": spec.shard,
                                 "features": features[spec.shard].tolist(), "seconds": seconds,
                                 "probe_s": probe})  # fmt: skip
            print(f"  compute {width} x {depth} N={shards} {method:<6}: "
                  f"{rows[-1]['seconds'] * 1e3:.2f} ms per shard pass at batch {batch} "
                  f"(probe {probe * 1e3:.2f} ms)", flush=True)  # fmt: skip
    return rows


def sharded_configs(channels: Sequence[str], nodes: int) -> list[dict[str, Any]]:
    """Every sharded calibration configuration, in the order one round runs them: per
    channel, the 2,048-wide RadiX-Net runs (:data:`CHANNEL_DEPTHS`; 2 and 4 shards, block and
    random; 8 block where there are 8 nodes, and 8 random on direct), the grid-width N = 2 runs
    (:data:`GRID_WIDTH_DEPTHS`, block and random) and the message split's nets (2 and 4
    blocks). Each is a deploy's name and its row's fields (``neurons``, ``depth``, ``shards``,
    ``method``, and ``split`` for the message split's)."""
    configs: list[dict[str, Any]] = []
    for channel in channels:
        for depth in CHANNEL_DEPTHS:
            # N = 8 (with --nodes 8): more shards than cores, the oversubscribed point
            # that c_wake needs (N = 4 alone barely tells it apart); a random N = 8 split
            # on the direct channel, the grid's heaviest traffic (session 7: without it,
            # N = 8 direct random was predicted 28-55% low)
            for shards, method in ((2, "block"), (2, "random"), (4, "block"), (4, "random"),
                                   (8, "block"), (8, "random")):  # fmt: skip
                if shards > nodes or (shards == 8 and method == "random"
                                      and channel != "direct"):  # fmt: skip
                    continue
                configs.append({"name": f"cal-{channel}-{depth}-{shards}-{method}",
                                "channel": channel, "neurons": CHANNEL_WIDTH, "depth": depth,
                                "shards": shards, "method": method})  # fmt: skip
        # N = 2 at the grid's width (seventeenth session): the messages and the server's
        # work per layer that the grid's N = 2 cells have, on nets that are not the grid's
        for depth in GRID_WIDTH_DEPTHS:
            for method in ("block", "random"):
                configs.append({"name": f"cal-{channel}-w{GRID_WIDTH}-{depth}-2-{method}",
                                "channel": channel, "neurons": GRID_WIDTH, "depth": depth,
                                "shards": 2, "method": method})  # fmt: skip
        # The message split (costmodel.message_split): nets alike but for the bytes per
        # message, 2 and 4 contiguous blocks (session 12: the splits above raise bytes with
        # messages and waits, and the fit could not tell them apart).
        for kind in ("small", "large"):
            for shards in (2, 4):
                if shards > nodes:
                    continue
                configs.append({"name": f"cal-{channel}-split-{kind}-{shards}",
                                "channel": channel, "split": kind, "neurons": SPLIT_NEURONS,
                                "depth": SPLIT_DEPTH, "shards": shards, "method": "block"})  # fmt: skip
    return configs


def _config_net(config: dict[str, Any]) -> LayeredNet:
    if "split" in config:
        return costmodel.message_split(SPLIT_NEURONS, SPLIT_DEPTH)[config["split"]]
    return radix_net(config["neurons"], config["depth"])


def median_of_rounds(config: dict[str, Any], batch: int,
                     rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """A sharded calibration run's row from its rounds (each a deploy timed once: its
    ``seconds``, ``probe_s`` and ``others_ms``): the fit sees the median of the rounds'
    seconds and the median of their probes. Why (bench/RESULTS.md #15, seventeenth session
    (e)): one N = 2 set's timing moved 12.3-21.1 ms between deploys, and a calibration that
    timed each set once read it at 12.4 ms. Every round is kept beside it (``rounds_*``)."""
    row = {k: v for k, v in config.items() if k != "name"}
    row["batch"] = batch
    for key in ("seconds", "probe_s", "others_ms", "managers_ms", "managers_wait_ms",
                "coordinator_ms"):  # fmt: skip
        if key not in rounds[0]:  # the CPU per request: nineteenth session on
            continue
        values = [float(r[key]) for r in rounds]
        row[key] = statistics.median(values)
        row[f"rounds_{key}"] = values
    if any("links" in r for r in rounds):  # the deploy's messages by path (both
        # batches of a round together), added over its rounds
        row["links"] = counts_sum(r["links"] for r in rounds if "links" in r)
    return row


def first_round(measured: dict[str, Any]) -> dict[str, Any]:
    """A calibration in rounds as if each sharded run had been timed once, in its first
    round (the protocol before the seventeenth session's follow-up): the control of
    :func:`median_of_rounds`, scored beside it as ``costmodel_first_round``."""
    return {**measured, "channels": [
        {**r, "seconds": r["rounds_seconds"][0], "probe_s": r["rounds_probe_s"][0]}
        if "rounds_seconds" in r else r
        for r in measured["channels"]
    ]}  # fmt: skip


def unsharded_configs() -> list[dict[str, Any]]:
    """The unsharded calibration configurations (the coordinator's runs), in the order one
    round runs them: 1,024 / 2,048 / 4,096 wide at each of :data:`UNSHARDED_DEPTHS` (two
    depths, s13 wave 2: a served pass's compute over the in-process one,
    ``costmodel.fit_coordinator``, grows with depth; ``c_io`` does not)."""
    return [{"name": f"cal-{width}-{depth}", "width": width, "depth": depth}
            for width in (1024, 2048, 4096) for depth in UNSHARDED_DEPTHS]  # fmt: skip


def pingpong_configs(channels: Sequence[str], nodes: int) -> list[dict[str, Any]]:
    """The ping-pong runs (nineteenth session; :data:`PINGPONG_WIDTH`): the direct channel,
    block split, at each of :data:`PINGPONG_SHARDS` and :data:`PINGPONG_DEPTHS`, where the
    calibration has the direct channel and the nodes."""
    if "direct" not in channels:
        return []
    return [{"name": f"cal-pingpong-{depth}-{shards}", "channel": "direct",
             "neurons": PINGPONG_WIDTH, "depth": depth, "shards": shards, "method": "block"}
            for shards in PINGPONG_SHARDS if shards <= nodes
            for depth in PINGPONG_DEPTHS]  # fmt: skip


def calibration_schedule(
    rounds: int, channels: Sequence[str], nodes: int
) -> list[tuple[int, str, dict[str, Any]]]:
    """The calibration's timed configurations in order, as ``(round, kind, config)``: each of
    ``rounds`` rounds runs every unsharded configuration (:func:`unsharded_configs`, kind
    ``"unsharded"``), then every sharded one (:func:`sharded_configs`, ``"sharded"``), then
    the ping-pong runs (:func:`pingpong_configs`, ``"pingpong"``; nineteenth session), each
    deployed, timed and removed, so a configuration's rounds are interleaved with every
    other's, never back to back (eighteenth session: the unsharded runs too; before, they
    ran twice, before and after the sharded rounds)."""
    return [(index, kind, config) for index in range(rounds)
            for kind, configs in (("unsharded", unsharded_configs()),
                                  ("sharded", sharded_configs(channels, nodes)),
                                  ("pingpong", pingpong_configs(channels, nodes)))
            for config in configs]  # fmt: skip


def calibration_rows(
    timed: Mapping[tuple[str, int], Sequence[dict[str, Any]]],
    channels: Sequence[str],
    nodes: int,
    batches: Sequence[int],
) -> dict[str, list[dict[str, Any]]]:
    """The calibration's ``coordinator`` and ``channels`` rows from every configuration's
    timed rounds (``timed[(name, batch)]``, one entry a round): each the median of its
    rounds (:func:`median_of_rounds`), the unsharded runs as the sharded ones (eighteenth
    session: before, an unsharded run kept the lower of its two rounds, so the coordinator's
    constants, which every sharded run's fit takes off first, rested on the fast reading)."""
    unsharded = [median_of_rounds(c, b, timed[(c["name"], b)])
                 for c in unsharded_configs() for b in batches]  # fmt: skip
    sharded = [median_of_rounds(c, b, timed[(c["name"], b)])
               for c in sharded_configs(channels, nodes) for b in batches]  # fmt: skip
    pingpong = [median_of_rounds(c, b, timed[(c["name"], b)])
                for c in pingpong_configs(channels, nodes) for b in batches
                if (c["name"], b) in timed]  # fmt: skip
    return {"coordinator": unsharded, "channels": sharded,
            **({"pingpong": pingpong} if pingpong else {})}  # fmt: skip


async def calibrate(
    urls: list[str],
    channels: dict[str, ChannelConfig],
    root: Path,
    batch: int,
    *,
    rounds: int = 3,
    pids: Sequence[int] = (),
) -> dict[str, Any]:
    """Measure the cost model's calibration runs on calibration nets, never on the grid's net
    (see :mod:`gpufaas.scheduler.costmodel`): compute in-process per shard; the coordinator
    from unsharded runs on real managers (:func:`unsharded_configs`); each channel from
    :func:`sharded_configs`. Every run has a speed probe beside it (between its timed
    requests), and records ``others_ms``: the CPU per request of processes other than this one
    and ``pids`` (the managers), i.e. the NATS / S3 server's, as the grid's cells do.

    Every configuration, unsharded and sharded, is deployed, timed and removed in each of
    ``rounds`` rounds, the rounds interleaved (:func:`calibration_schedule`), and its row is
    the median of its rounds (:func:`calibration_rows`). Every run is measured before
    anything is fitted (:func:`fit_constants`)."""
    measured: dict[str, Any] = {"compute": calibrate_compute(batch),
                                "contention": contention_of(os.cpu_count() or 1, batch=batch),
                                "coordinator": [], "channels": [], "rounds": rounds}  # fmt: skip
    coordinator = Coordinator(artifact_base=str(root / "calib"), timeout_s=120)
    rng = np.random.default_rng(5)
    batches = (max(1, batch // 4), batch)

    async def median_latency(name: str, b: int, width: int, count: int = 7) -> dict[str, float]:
        """The median latency, the median of probe passes interleaved with it, and the other
        processes' CPU per request meanwhile; and (nineteenth session) the managers' CPU per
        request and this process's during the requests (the probes left out)."""
        x = (rng.random((b, width)) < 0.2).astype(np.float32)
        await coordinator.infer(name, x)
        times, passes = [], []
        busy, own = _machine_busy_seconds(), time.process_time()
        theirs = sum(_cpu_seconds(pid) for pid in pids)
        mine, (ran, waited) = 0.0, task_times(pids)
        for _ in range(count):
            before = time.process_time()
            times.append(await _timed(coordinator.infer(name, x)))
            mine += time.process_time() - before
            passes.append(probe_pass())  # the managers idle meanwhile: their CPU is the requests'
        ran, waited = (after - before for after, before in zip(task_times(pids), (ran, waited),
                                                               strict=True))  # fmt: skip
        managers = sum(_cpu_seconds(pid) for pid in pids) - theirs
        others = (_machine_busy_seconds() - busy) - (time.process_time() - own) - managers
        return {"seconds": statistics.median(times), "probe_s": statistics.median(passes),
                "others_ms": others / count * 1e3, "managers_ms": ran / count * 1e3,
                "managers_wait_ms": waited / count * 1e3,
                "coordinator_ms": mine / count * 1e3}  # fmt: skip

    timed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for index, kind, config in calibration_schedule(rounds, list(channels), len(urls)):
            name = config["name"]
            links_before = await asyncio.to_thread(read_link_counts, urls)
            if kind == "unsharded":
                width, count = config["width"], 7
                await coordinator.deploy(
                    name, radix_net(width, config["depth"]),
                    Parallelism(shards=1, strategy="intra-layer"), nodes=urls[:1],
                )  # fmt: skip
            else:
                width, count = config["neurons"], 9 if kind == "pingpong" else 5
                await coordinator.deploy(
                    name, _config_net(config),
                    Parallelism(shards=config["shards"], strategy="intra-layer",
                                channel=config["channel"]),
                    nodes=urls[: config["shards"]], method=config["method"],
                    channel=channels[config["channel"]], seed=2,
                )  # fmt: skip
            for b in batches:
                one = await median_latency(name, b, width, count)
                timed.setdefault((name, b), []).append(one)
                print(f"  round {index + 1}/{rounds} {kind} {name} batch {b}: "
                      f"{one['seconds'] * 1e3:.1f} ms (probe {one['probe_s'] * 1e3:.2f} ms,"
                      f" others {one['others_ms']:.1f} ms, managers"
                      f" {one['managers_ms']:.1f} ms)", flush=True)  # fmt: skip
            # the deploy's messages by path (both batches together), on each batch's round
            links = counts_between(links_before, await asyncio.to_thread(read_link_counts, urls))
            for b in batches:
                timed[(name, b)][-1]["links"] = links
            if kind != "unsharded":
                print(f"    messages {links.get('messages', {})}", flush=True)
            await coordinator.remove(name)
    finally:
        await coordinator.close()
    measured.update(calibration_rows(timed, list(channels), len(urls), batches))
    return measured


def _probe_reference(measured: dict[str, Any]) -> float | None:
    """The speed every fitted run is scaled to: the median probe of the compute, coordinator
    and channel runs (:func:`fit_constants`'s; the ping-pong runs' probes are not in it)."""
    probes = [r["probe_s"] for part in ("compute", "coordinator", "channels")
              for r in measured[part] if "probe_s" in r]  # fmt: skip
    return statistics.median(probes) if probes else None


def _round_figures(
    seconds: Sequence[float],
    cpu_ms: Sequence[float],
    probes: Sequence[float],
    *,
    exchanges: int,
    share: int,
    reference: float | None,
) -> tuple[float, float, float]:
    """Per exchange round, at the ``reference`` speed, from two depths' latency (``seconds``)
    and managers' CPU per request (``cpu_ms``), ``exchanges`` rounds apart: the wall time,
    the CPU, and the wall time beyond the CPU shared out over ``share`` cores."""
    scale = reference / statistics.median(probes) if reference else 1.0
    wall = (seconds[1] - seconds[0]) / exchanges * scale
    cpu = (cpu_ms[1] - cpu_ms[0]) / 1e3 / exchanges * scale
    return wall, cpu, wall - cpu / share


def path_latency(measured: dict[str, Any], *, cores: int) -> dict[str, Any]:
    """What the ping-pong runs (:func:`pingpong_configs`) say about an exchange round, per
    shard count and batch, from the difference between their two depths (so every
    per-request part cancels), per exchange round (a layer where some shard waits), at the
    calibration's reference speed: the wall time (``wall_s``), the managers' CPU over all
    shards (``cpu_s``), and the wall time the CPU cannot account for when it is shared out
    over ``min(N, cores)`` cores (``off_cpu_s = wall_s - cpu_s / min(N, cores)``): at N = 2
    on 2 cores each shard has a core, so this is the round's time on no core, the delivery
    latency. Each figure per calibration round too (``rounds_off_cpu_s``: the depths'
    timings of the same round), and ``off_cpu_s`` for a shard count is the median over its
    batches. Empty where the calibration has no ping-pong runs."""
    rows = measured.get("pingpong", [])
    reference = _probe_reference(measured)
    out: dict[str, Any] = {}
    for shards in sorted({int(r["shards"]) for r in rows}):
        per_batch = {}
        for batch in sorted({int(r["batch"]) for r in rows if int(r["shards"]) == shards}):
            pair = sorted((r for r in rows if int(r["shards"]) == shards
                           and int(r["batch"]) == batch), key=lambda r: int(r["depth"]))  # fmt: skip
            if len(pair) != 2 or "rounds_managers_ms" not in pair[0]:
                continue
            low, high = pair
            exchanges = [int((_calibration_profile(int(r["depth"]), shards, "block",
                                                   PINGPONG_WIDTH).sync.max(axis=1) > 0).sum())
                         for r in pair]  # fmt: skip
            one = functools.partial(_round_figures, exchanges=exchanges[1] - exchanges[0],
                                    share=min(shards, cores), reference=reference)  # fmt: skip
            wall, cpu, off = one([low["seconds"], high["seconds"]],
                                 [low["managers_ms"], high["managers_ms"]],
                                 [low["probe_s"], high["probe_s"]])  # fmt: skip
            rounds = [one([a, b], [c, d], [e, f]) for a, b, c, d, e, f in zip(
                low["rounds_seconds"], high["rounds_seconds"], low["rounds_managers_ms"],
                high["rounds_managers_ms"], low["rounds_probe_s"], high["rounds_probe_s"],
                strict=True)]  # fmt: skip
            per_batch[batch] = {"exchange_rounds": exchanges, "wall_s": wall, "cpu_s": cpu,
                                "off_cpu_s": off, "rounds_off_cpu_s": [r[2] for r in rounds],
                                "rounds_wall_s": [r[0] for r in rounds],
                                "rounds_cpu_s": [r[1] for r in rounds]}  # fmt: skip
        if per_batch:
            out[str(shards)] = {
                "batches": per_batch,
                "off_cpu_s": statistics.median(b["off_cpu_s"] for b in per_batch.values()),
            }
    return out


def measured_relay(measured: dict[str, Any], *, cores: int) -> dict[str, dict[str, float]]:
    """The nineteenth session's measured form's pinned term: direct's ``per_relay_sync_s``, a
    round's delivery latency on the waiting shard's path, from the N = 2 ping-pong runs
    (:func:`path_latency`'s ``off_cpu_s``, never below 0). Empty where they did not run."""
    found = path_latency(measured, cores=cores).get("2")
    if found is None:
        return {}
    return {"direct": {"per_relay_sync_s": max(0.0, float(found["off_cpu_s"]))}}


def in_sample(measured: dict[str, Any], constants: costmodel.Constants,
              channel: str = "direct") -> dict[str, Any]:  # fmt: skip
    """The fitted form against the calibration's own ``channel`` runs (the 2,048-wide runs and
    the message split, as the fit saw them, each at the reference speed): per run the
    error, and the median error at N = 2 and the median |error| at N >= 4."""
    reference = _probe_reference(measured)
    errors: dict[str, list[float]] = {"2": [], "4+": []}
    for r in measured["channels"]:
        if r["channel"] != channel or _grid_width(r):
            continue
        seconds = float(r["seconds"]) * (reference / float(r["probe_s"]) if reference else 1.0)
        predicted = costmodel.predict(_channel_profile(r), batch=int(r["batch"]),
                                      channel=channel, constants=constants)  # fmt: skip
        errors["2" if int(r["shards"]) == 2 else "4+"].append(predicted / seconds - 1)
    return {
        "n2_median_error": statistics.median(errors["2"]) if errors["2"] else None,
        "n4_median_abs_error": statistics.median(abs(e) for e in errors["4+"])
        if errors["4+"] else None,
        "n2_errors": errors["2"],
        "n4_errors": errors["4+"],
    }  # fmt: skip


def rule_checks(latency: float, *, default: dict[str, Any], new: dict[str, Any]) -> dict[str, bool]:
    """:func:`primary_rule`'s three checks from the pinned latency and the two forms'
    :func:`in_sample` figures; the measured form is the primary only if all hold."""
    n2, n4, n4_default = (new["n2_median_error"], new["n4_median_abs_error"],
                          default["n4_median_abs_error"])  # fmt: skip
    return {
        "latency_above_0": latency > 0,
        "n2_within_5pct": n2 is not None and abs(n2) <= 0.05,
        "n4_no_worse": n4 is not None and n4_default is not None and n4 <= n4_default,
    }


def primary_rule(measured: dict[str, Any], *, cores: int) -> dict[str, Any]:
    """The nineteenth session's plan's rule, read from the calibration alone (its training
    data, before any grid): the measured-relay form (``costmodel_measured_relay``) is the
    primary if its pinned latency is above 0, its in-sample median error on the calibration's
    N = 2 direct runs is within +-5%, and its median |error| on the N >= 4 direct runs is no
    larger than the default form's; else the default (``costmodel``) is."""
    runs = {**measured, "channels": [r for r in measured["channels"] if not _grid_width(r)]}
    pinned = measured_relay(runs, cores=cores)
    default = in_sample(runs, fit_constants(runs, cores=cores))
    if not pinned:
        return {"primary": "costmodel", "why": "no ping-pong runs", "default": default}
    new = in_sample(runs, fit_constants(runs, cores=cores, pinned=pinned))
    latency = pinned["direct"]["per_relay_sync_s"]
    checks = rule_checks(latency, default=default, new=new)
    return {
        "primary": "costmodel_measured_relay" if all(checks.values()) else "costmodel",
        "checks": checks,
        "per_relay_sync_s": latency,
        "default": default,
        "measured_relay": new,
    }


def fit_constants(
    measured: dict[str, Any],
    *,
    cores: int,
    probe: bool = True,
    shared: tuple[str, ...] = costmodel.SHARED_TERMS,
    message_split: bool = True,
    pin_bytes: bool = True,
    waits_on_path: bool = False,
    served: bool = True,
    served_contention: bool = False,
    contention_weight: float = costmodel.SERVED_CONTENTION,
    channel_depths: tuple[int, ...] | None = None,
    relay: bool = True,
    relayed: tuple[str, ...] = RELAYED,
    pinned: Mapping[str, Mapping[str, float]] | None = None,
) -> costmodel.Constants:
    """The constants from a calibration's runs. With ``probe``, each run's seconds are first
    scaled to one speed (the median of the calibration's probes) by its own probe, and the
    constants carry that probe time (``costmodel.at_speed`` rescales them for a later
    probe); without, the runs are fitted as measured (sessions 4 and 5). The ``shared``
    channel terms take one value for every channel (``costmodel.fit_channels``; session 8;
    ``()`` fits each channel alone, as sessions 4-7 did). ``message_split=False`` leaves
    the message split's runs out (the calibration of sessions 4-11: the control); with
    them and ``pin_bytes``, each channel's ``c_byte`` is the median of its split's pairs
    (``costmodel.byte_cost``) and the joint fit fits the other terms (session 12's
    primary); without ``pin_bytes`` the split's runs join the joint fit like any other.
    ``waits_on_path=True`` charges the waits on the busiest shard's path only (session 13's
    alternative, scored beside the default: ``costmodel_waits_on_path``). ``served`` fits a
    served pass's compute over the in-process calibration's from the unsharded runs at two
    depths (``costmodel.fit_coordinator``; s13 wave 2); ``served=False`` keeps it at 1 (the
    model of earlier runs, the control: ``costmodel_without_served``). ``contention_weight``
    is the share of the saturated contention a served pass pays (1: all of it, as sessions
    9-14), or ``served_contention`` fits it with the channels (fifteenth session; scored
    beside as ``costmodel_fitted_weight``). ``channel_depths`` keeps only the RadiX-Net
    channel runs of those depths (None: all; :data:`SHALLOW_CHANNEL_DEPTHS` is the
    calibration of sessions 4-15, scored beside as ``costmodel_shallow_calibration``).
    ``relay`` (seventeenth session) fits the :data:`RELAYED` channels' relay terms (the
    server's time for what a shard receives, on its path and on no shard's core); without,
    they are 0. ``relayed`` names the channels whose relay terms are fitted (eighteenth
    session: :data:`RELAYED_DIRECT` fits direct's too, an on-path time per message received
    with no server behind it; scored beside as ``costmodel_relay_direct``). The defaults,
    ``contention_weight`` = ``costmodel.SERVED_CONTENTION``, ``relay`` and ``relayed`` =
    :data:`RELAYED`, are the product's default form (the seventeenth session's follow-up, chosen
    post hoc; until then ``w`` = 1 without the relay: ``W1``, scored as ``costmodel_w1``).
    ``pinned`` gives channel terms measured on their own, taken off the runs before the fit
    and never fitted (nineteenth session: :func:`measured_relay`, direct's ``per_relay_sync_s``
    from the ping-pong runs; scored as ``costmodel_measured_relay``)."""
    if channel_depths is not None:  # as if the other depths had never run (their probes too)
        measured = {**measured, "channels": [r for r in measured["channels"]
                                             if "split" in r or r["depth"] in channel_depths]}  # fmt: skip
    probes = [r["probe_s"] for part in ("compute", "coordinator", "channels")
              for r in measured[part] if "probe_s" in r]  # fmt: skip
    reference = statistics.median(probes) if probe and probes else None

    def at_reference(row: dict[str, Any]) -> float:
        if reference is None or "probe_s" not in row:
            return float(row["seconds"])
        return float(row["seconds"]) * reference / float(row["probe_s"])

    rows = measured["compute"]
    compute = costmodel.Compute(*costmodel.fit([_compute_features(r) for r in rows],
                                               [at_reference(r) for r in rows], relative=True))  # fmt: skip
    none = {"none": costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0)}
    # sessions before 9 measured no contention: their products are charged as alone
    shared_cores = {int(r["shards"]): float(r["factor"]) for r in measured.get("contention", [])}
    unsharded = []
    for r in measured["coordinator"]:
        net = radix_net(r["width"], r.get("depth", 8))  # depth 8 alone before s13 wave 2
        prof = costmodel.profile(net, partition(net, 1, method="block"))
        unsharded.append((prof, int(r["batch"]), at_reference(r)))
    base = costmodel.fit_coordinator(
        unsharded, served=served,
        base=costmodel.Constants(compute, 0.0, 0.0, cores, none, contention=shared_cores,
                                 waits_on_path=waits_on_path,
                                 contention_weight=contention_weight),
    )  # fmt: skip
    runs: dict[str, list[tuple[costmodel.Profile, int, float]]] = {}
    for r in measured["channels"]:
        if "split" in r and not message_split:
            continue
        prof = _channel_profile(r)
        runs.setdefault(r["channel"], []).append((prof, r["batch"], at_reference(r)))
    fixed = {}
    if message_split and pin_bytes:
        pairs = _split_pairs(measured["channels"])
        for channel in {r["channel"] for r, _ in pairs}:
            fixed[channel] = {"per_byte_s": statistics.median(
                costmodel.byte_cost((_channel_profile(s), s["batch"], at_reference(s)),
                                    (_channel_profile(r), r["batch"], at_reference(r)), base=base)
                for r, s in pairs if r["channel"] == channel
            )}  # fmt: skip
    for channel, terms in (pinned or {}).items():
        if channel in runs:
            fixed[channel] = {**fixed.get(channel, {}), **terms}
    relayed_here = [name for name in runs if name in relayed] if relay else []
    if served_contention:
        fitted = costmodel.fit_channels_and_contention(runs, base=base, shared=shared,
                                                       fixed=fixed, relayed=relayed_here)  # fmt: skip
        return dataclasses.replace(fitted, probe_s=reference)
    costs = costmodel.fit_channels(runs, base=base, shared=shared, fixed=fixed,
                                   relayed=relayed_here)  # fmt: skip
    return dataclasses.replace(base, channels=costs, probe_s=reference)


_GRID_PROFILES: dict[tuple[int, int, str, int], tuple[LayeredNet, costmodel.Profile]] = {}


def _grid_profile(net: LayeredNet, shards: int, method: str, seed: int) -> costmodel.Profile:
    """The profile of a grid cell's split (the deploy's partition: ``method``, ``seed``),
    computed once per net and split: every model scored on a grid reads the same ones."""
    key = (id(net), shards, method, seed)
    if key not in _GRID_PROFILES or _GRID_PROFILES[key][0] is not net:
        _GRID_PROFILES[key] = (net, costmodel.profile(net, partition(net, shards, method=method,
                                                                     seed=seed)))  # fmt: skip
    return _GRID_PROFILES[key][1]


def _compute_features(row: dict[str, Any]) -> list[float]:
    """A compute calibration run's features, from its split (not the ones stored with it:
    calibrations measured before a feature was added refit with it)."""
    prof = _compute_profile(row["width"], row["depth"], row["shards"], row["method"])
    return [
        float(v)
        for v in costmodel.compute_features(prof, batch=row["batch"]).sum(axis=0)[row["shard"]]
    ]


@functools.cache
def _compute_profile(width: int, depth: int, shards: int, method: str) -> costmodel.Profile:
    net = radix_net(width, depth)
    return costmodel.profile(net, partition(net, shards, method=method, seed=3))


@functools.cache
def _calibration_profile(
    depth: int, shards: int, method: str, width: int = CHANNEL_WIDTH
) -> costmodel.Profile:
    net = radix_net(width, depth)
    return costmodel.profile(net, partition(net, shards, method=method, seed=2))


@functools.cache
def _split_profile(kind: str, neurons: int, depth: int, shards: int) -> costmodel.Profile:
    net = costmodel.message_split(neurons, depth)[kind]
    return costmodel.profile(net, partition(net, shards, method="block", seed=2))


def _channel_profile(row: dict[str, Any]) -> costmodel.Profile:
    """A channel calibration run's profile: the message split's net, or a 2,048-wide
    RadiX-Net (2,048 wide, or the grid's width where the row says so)."""
    if "split" in row:
        return _split_profile(row["split"], row["neurons"], row["depth"], row["shards"])
    return _calibration_profile(row["depth"], row["shards"], row["method"],
                                int(row.get("neurons", CHANNEL_WIDTH)))  # fmt: skip


def _grid_width(row: dict[str, Any]) -> bool:
    """Whether a channel calibration run is one of the grid-width N = 2 runs (seventeenth
    session), not the 2,048-wide RadiX-Net runs or the message split."""
    return "split" not in row and int(row.get("neurons", CHANNEL_WIDTH)) != CHANNEL_WIDTH


def _split_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The message split's runs as ``(large, small)`` pairs of one channel, shard count and
    batch."""
    split = [r for r in rows if "split" in r]
    pairs = []
    for r in split:
        if r["split"] == "large":
            pairs += [(r, s) for s in split if s["split"] == "small" and s["channel"] == r["channel"]
                      and s["shards"] == r["shards"] and s["batch"] == r["batch"]]  # fmt: skip
    return pairs


def message_split_summary(
    measured: dict[str, Any], constants: costmodel.Constants
) -> list[dict[str, Any]]:
    """Per channel, shard count and batch: the message split's two runs side by side, the
    bytes each shard receives more in the large one, and the pair's ``c_byte``
    (``costmodel.byte_cost``, as measured: no probe scaling) under ``constants``' compute."""
    out = []
    for r, s in _split_pairs(measured["channels"]):
        large_p, small_p = _channel_profile(r), _channel_profile(s)
        gap = float(
            r["batch"] * 4 * (large_p.values.sum(axis=0) - small_p.values.sum(axis=0)).mean()
        )
        c_byte = costmodel.byte_cost((small_p, s["batch"], s["seconds"]),
                                     (large_p, r["batch"], r["seconds"]), base=constants)  # fmt: skip
        out.append({"channel": r["channel"], "shards": r["shards"], "batch": r["batch"],
                    "small_ms": s["seconds"] * 1e3, "large_ms": r["seconds"] * 1e3,
                    "bytes_gap_per_shard": gap, "per_byte_s": c_byte})  # fmt: skip
    return out


def constants_to_json(constants: costmodel.Constants) -> dict[str, Any]:
    return dataclasses.asdict(constants)


def constants_from_json(data: dict[str, Any]) -> costmodel.Constants:
    channels = {k: costmodel.ChannelCost(**v) for k, v in data.pop("channels").items()}
    compute = costmodel.Compute(**data.pop("compute"))
    shared_cores = {int(n): float(f) for n, f in data.pop("contention", {}).items()}  # JSON keys
    return costmodel.Constants(compute=compute, **data, channels=channels, contention=shared_cores)


async def _timed(call: Any) -> float:
    t = time.perf_counter()
    await call
    return time.perf_counter() - t


def evaluate(
    net: LayeredNet,
    grid: list[dict[str, Any]],
    constants: costmodel.Constants,
    *,
    probe: bool = True,
    spread: float = 0.0,
) -> dict[str, Any]:
    """Score predictions against the grid's latencies; with ``probe`` (and probed
    constants), each cell's prediction is at the speed its own probe read. Picks rank every
    candidate at one speed (the constants'). ``spread`` is the run-to-run spread of a
    configuration's latency (:func:`run_to_run_spread`): a pick whose measured latency is
    within it of the fastest's counts in ``picks_within_spread`` (``picks_fastest`` counts
    strictly)."""
    predictions = []
    for row in grid:
        if "failed" in row:
            continue
        prof = _grid_profile(net, row["shards"], row["method"], int(row.get("seed", 0)))
        channel = row["channel"] if row["shards"] > 1 else "direct"
        here = constants
        if probe and row.get("probe_s"):
            here = costmodel.at_speed(constants, row["probe_s"])
        predicted = costmodel.predict(prof, batch=row["batch"], channel=channel, constants=here)
        row["predicted_s"] = predicted
        row["error"] = predicted / row["latency_s"] - 1
        # The choice is made at one moment, so at one speed for every candidate: ranked at
        # the constants' own speed, never at each cell's probe (a probe read beside one
        # cell moved that cell alone: session 7's misses, N = 2 direct read 27-42% slower
        # than N = 2 NATS and was ranked behind it though measured 10-13% faster).
        row["ranked_s"] = costmodel.predict(
            prof, batch=row["batch"], channel=channel, constants=constants
        )
        # cost per request: predicted (at the ranked latency) and at the measured latency
        prices = costmodel.Prices()
        row["ranked_cost_usd"] = costmodel.cost(prof, batch=row["batch"], channel=channel,
                                                latency_s=row["ranked_s"], prices=prices).total_usd  # fmt: skip
        row["cost_usd"] = costmodel.cost(prof, batch=row["batch"], channel=channel,
                                         latency_s=row["latency_s"], prices=prices).total_usd  # fmt: skip
        if "requests_per_pass" in row:  # the closed loop's passes (sessions 7 on)
            row["predicted_rps"] = costmodel.throughput(
                prof, batch=row["batch"], concurrency=max(1, round(row["requests_per_pass"])),
                channel=channel, constants=here,
            )  # fmt: skip
            row["rps_error"] = row["predicted_rps"] / row["throughput_rps"] - 1
        predictions.append(row)
    within = [abs(r["error"]) <= 0.25 for r in predictions]
    rps = [abs(r["rps_error"]) <= 0.25 for r in predictions if "rps_error" in r]
    # Cells: every choice the model is asked to make on this grid: per channel (N and
    # partitioner, N=1 included), per N > 1 (channel and partitioner), and the whole grid.
    groups: dict[str, list[dict[str, Any]]] = {"all": predictions}
    for channel in sorted({r["channel"] for r in predictions if r["shards"] > 1}):
        groups[f"channel={channel}"] = [
            r for r in predictions if r["channel"] == channel or r["shards"] == 1
        ]
    for shards in sorted({r["shards"] for r in predictions if r["shards"] > 1}):
        groups[f"N={shards}"] = [r for r in predictions if r["shards"] == shards]
    cells = {}
    for cell, rows in groups.items():
        measured = min(rows, key=lambda r: r["latency_s"])
        picked = min(rows, key=lambda r: r["ranked_s"])
        cells[cell] = {
            "picked": _label(picked),
            "fastest": _label(measured),
            "strict": picked is measured,
            "within_10pct": picked["latency_s"] <= 1.10 * measured["latency_s"],
            "within_spread": picked["latency_s"] <= (1 + spread) * measured["latency_s"],
            "apart": picked["latency_s"] / measured["latency_s"] - 1,
        }
        # ranked by cost (costmodel.choose(by="cost")): the predicted cheapest against the
        # cheapest at the measured latencies, and whether it is another pick than by latency
        cheapest = min(rows, key=lambda r: r["cost_usd"])
        by_cost = min(rows, key=lambda r: r["ranked_cost_usd"])
        cells[cell]["by_cost"] = {
            "picked": _label(by_cost),
            "cheapest": _label(cheapest),
            "strict": by_cost is cheapest,
            "differs_from_latency_pick": by_cost is not picked,
        }
    return {
        "within_25pct": sum(within),
        "cells": len(within),
        "median_abs_error": statistics.median(abs(r["error"]) for r in predictions),
        "picks_fastest": sum(c["strict"] for c in cells.values()),
        # a pick as fast as the fastest within the run-to-run spread of the grid's latencies
        "picks_within_spread": sum(c["within_spread"] for c in cells.values()),
        "picks_cheapest": sum(c["by_cost"]["strict"] for c in cells.values()),
        "spread": spread,
        "throughput_within_25pct": sum(rps),
        "throughput_cells": len(rps),
        "choices": cells,
        # per configuration: the prediction (at the speed the cell was predicted at) and
        # its error against the measured latency
        "cell_predicted_s": {_label(r): r["predicted_s"] for r in predictions},
        "cell_errors": {_label(r): r["error"] for r in predictions},
        "constants": constants_to_json(constants),
        "probe": probe and constants.probe_s is not None,
    }


def run_to_run_spread(*grids: list[dict[str, Any]]) -> float:
    """How far one configuration's latency moves between grid runs: the median, over the
    configurations measured in every run, of (slowest - fastest) / fastest."""
    by_config: dict[tuple[int, str, str], list[float]] = {}
    for grid in grids:
        for row in grid:
            if "failed" not in row:
                key = (row["shards"], row["channel"], row["method"])
                by_config.setdefault(key, []).append(float(row["latency_s"]))
    gaps = [max(v) / min(v) - 1 for v in by_config.values() if len(v) == len(grids)]
    return statistics.median(gaps) if gaps and len(grids) > 1 else 0.0


def score(
    net: LayeredNet,
    grid: list[dict[str, Any]],
    calibration: dict[str, Any],
    *,
    spread: float = 0.0,
    repetitions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The model scored on a grid, with the speed probe (``costmodel``) and without
    (``costmodel_without_probe``: constants fitted on the runs as measured, predictions
    unscaled), both refitted from the calibration's runs where they carry probes; the
    grid's rows get the probed predictions. ``costmodel_hold_probe`` predicts every cell at
    one speed, the whole grid's (:func:`hold_probe`), not at its own probe's.

    With ``repetitions`` (a repeated grid's rows, one per configuration and repetition;
    ``grid`` is then their :func:`median_cells`), also ``costmodel_first_repetition`` (the
    first repetition alone, each cell at its own probe: the protocol of sessions 4-13 on the
    same hold) and ``per_repetition`` (each repetition scored alone at its own hold probe)."""
    cores = int(calibration["constants"]["cores"])
    full = calibration["runs"]
    # every fit but one is of the 2,048-wide runs, as before the seventeenth session; the
    # grid-width N = 2 runs are fitted only in costmodel_relay_grid_width
    runs = {**full, "channels": [r for r in full["channels"] if not _grid_width(r)]}
    probed = "probe_s" in runs["compute"][0]
    reps = sorted({int(r.get("repetition", 0)) for r in repetitions or []})
    alone = [[dict(r) for r in repetitions or [] if int(r.get("repetition", 0)) == i] for i in reps]
    if len(alone) > 1 and not spread:  # a repeated grid: its own repetitions' spread
        spread = run_to_run_spread(*alone)
    if probed:
        # the default form pins direct's measured delivery latency where the calibration ran
        # the ping-pong runs (the nineteenth session's second hold's rule; without them,
        # measured_relay is empty and the fit is the relay form at w = 0.3, as before)
        with_probe = fit_constants(runs, cores=cores, pinned=measured_relay(runs, cores=cores))
    else:  # an older calibration: its constants as stored
        with_probe = constants_from_json(dict(calibration["constants"]))
    without = fit_constants(runs, cores=cores, probe=False, **W1)
    split = any("split" in r for r in runs["channels"])
    edges = [{**r, "probe_s": statistics.mean(r["probe_edges_s"])} for r in grid
             if "probe_edges_s" in r]  # fmt: skip

    def refit(**options: Any) -> dict[str, Any]:
        """The grid (a copy) scored by the calibration's runs refitted with ``options``."""
        constants = fit_constants(runs, cores=cores, **options)
        return evaluate(net, [dict(r) for r in grid], constants, spread=spread)

    # Every control below is fitted as it was before the default became the relay form at
    # w = 0.3 (the seventeenth session's follow-up): at w = 1, without the relay (``W1``).
    # costmodel_w1 is that old default itself.

    # Alternatives to the default fit, scored on the same measurements:
    # - without_message_split: the control, the runs without their message split (sessions
    #   4-11); split_joint: the split's runs in the joint fit, c_byte fitted like the others;
    # - waits_on_path: session 13's alternative (its round ran it as the primary; the default
    #   scored better and stayed); without_served: s13 wave 2's control (served = 1, c_request
    #   and c_io fitted on the same unsharded runs, as before it).
    alternatives: dict[str, dict[str, Any]] = {}
    if split and probed:
        alternatives["costmodel_without_message_split"] = refit(message_split=False, **W1)
        alternatives["costmodel_split_joint"] = refit(pin_bytes=False, **W1)
    if probed:
        alternatives["costmodel_w1"] = refit(**W1)
        alternatives["costmodel_waits_on_path"] = refit(waits_on_path=True, **W1)
        alternatives["costmodel_without_served"] = refit(served=False, **W1)
        # the fifteenth session's served contention: at the weight chosen on session 14's
        # grids, and fitted on the calibration's own runs
        alternatives["costmodel_served_contention"] = refit(
            contention_weight=costmodel.SERVED_CONTENTION, relay=False
        )
        alternatives["costmodel_fitted_weight"] = refit(served_contention=True, relay=False)
        # the sixteenth session's deeper channel runs: the fit without them (the control)
        if any(r["depth"] not in SHALLOW_CHANNEL_DEPTHS
               for r in runs["channels"] if "split" not in r):  # fmt: skip
            alternatives["costmodel_shallow_calibration"] = refit(
                channel_depths=SHALLOW_CHANNEL_DEPTHS, **W1
            )
        # the seventeenth session's form: the relay terms on the path, at w = 0.3 (its
        # pre-registered primary); and the same fit with the grid-width N = 2 runs
        alternatives["costmodel_relay"] = refit(
            contention_weight=costmodel.SERVED_CONTENTION, relay=True
        )
        # the eighteenth session's secondary: direct's relay terms fitted too
        alternatives["costmodel_relay_direct"] = refit(relayed=RELAYED_DIRECT)
        # the nineteenth session's: direct's delivery latency per round, measured on its
        # own by the ping-pong runs and pinned before the fit; which form is primary is
        # decided by primary_rule, on the calibration alone
        # (the default since that session's second hold: see with_probe above); the
        # unpinned fit, the default before it, is scored as costmodel_unpinned
        pinned = measured_relay(runs, cores=cores)
        if pinned:
            alternatives["costmodel_measured_relay"] = refit(pinned=pinned)
            alternatives["costmodel_measured_relay"]["pinned"] = pinned
            alternatives["costmodel_unpinned"] = refit()
            alternatives["primary_rule"] = primary_rule(full, cores=cores)
        # the follow-up's rounds: the same default form fitted on each run's first round
        # alone (one timing per configuration, as every calibration before it)
        if any("rounds_seconds" in r for r in runs["channels"]):
            alternatives["costmodel_first_round"] = evaluate(
                net, [dict(r) for r in grid], fit_constants(first_round(runs), cores=cores),
                spread=spread,
            )  # fmt: skip
        if any(_grid_width(r) for r in full["channels"]):
            wide = fit_constants(full, cores=cores, relay=True,
                                 contention_weight=costmodel.SERVED_CONTENTION)  # fmt: skip
            alternatives["costmodel_relay_grid_width"] = evaluate(
                net, [dict(r) for r in grid], wide, spread=spread
            )
    hold = hold_probe(grid) if probed else None
    if hold is not None:
        alternatives["costmodel_hold_probe"] = evaluate(
            net, [{**r, "probe_s": hold} for r in grid], with_probe, spread=spread
        )
        alternatives["costmodel_hold_probe"]["hold_probe_s"] = hold
    if probed and len(alone) > 1:
        alternatives["costmodel_first_repetition"] = evaluate(net, alone[0], with_probe,
                                                              spread=spread)  # fmt: skip
        alternatives["per_repetition"] = {"repetitions": []}
        for rows in alone:
            speed = hold_probe(rows)
            one = evaluate(net, [{**r, "probe_s": speed} for r in rows], with_probe)
            alternatives["per_repetition"]["repetitions"].append({
                k: one[k] for k in ("within_25pct", "cells", "median_abs_error", "picks_fastest")
            } | {"groups": len(one["choices"]), "hold_probe_s": speed})  # fmt: skip
        per = alternatives["per_repetition"]["repetitions"]
        alternatives["per_repetition"]["picks_fastest"] = sum(r["picks_fastest"] for r in per)
        alternatives["per_repetition"]["groups"] = sum(r["groups"] for r in per)
    return {
        "costmodel_without_probe": evaluate(
            net, [dict(r) for r in grid], without, probe=False, spread=spread
        ),
        # round A's probe: five passes before and five after the cell, not between requests
        **({"costmodel_probe_edges": evaluate(net, edges, with_probe)} if edges else {}),
        **alternatives,
        "costmodel": evaluate(net, grid, with_probe, spread=spread),
    }


def _label(row: dict[str, Any]) -> str:
    return f"N={row['shards']} {row['channel']} {row['method']}"


# -------------------------------------------------------------------------------------------
# Plots and main
# -------------------------------------------------------------------------------------------


def plot(out: Path, volumes: list[dict[str, Any]], grid: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    ax = axes[0]
    for method in ("hypergraph", "block", "random"):
        for neurons in PERIOD:
            rows = [r for r in volumes if r["method"] == method and r["neurons"] == neurons]
            ax.plot([r["shards"] for r in rows], [r["bytes_per_sample"] / 1e6 for r in rows],
                    marker="o", label=f"{method} {neurons}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("shards")
    ax.set_ylabel("MB exchanged per sample (120 layers)")
    ax.set_title("Partition volume" + ("" if volumes else " (not run)"))
    if volumes:
        ax.legend(fontsize=6)
    ok = [r for r in grid if "failed" not in r]
    pairs = sorted({(r["channel"], r["method"]) for r in ok if r["shards"] > 1})
    for ax, key, label, title in (
        (axes[1], "throughput_rps", "requests/s (closed loop)", "Throughput"),
        (axes[3], "cost_usd", "US$ per 1M requests (at measured latency)", "Cost"),
    ):
        for channel, method in pairs:  # every channel and partitioner the grid ran
            rows = [r for r in ok if key in r and ((r["channel"] == channel
                    and r["method"] == method) or r["shards"] == 1)]  # fmt: skip
            rows.sort(key=lambda r: r["shards"])
            scale = 1e6 if key == "cost_usd" else 1.0
            ax.plot([r["shards"] for r in rows], [r[key] * scale for r in rows], marker="o",
                    ls={"direct": "-", "nats": "--", "s3": ":"}.get(channel, "-."),
                    label=f"{channel} {method}")  # fmt: skip
        if key == "cost_usd":
            ax.set_yscale("log")
        ax.set_xlabel("shards")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=6)
    ax = axes[2]
    measured = [r["latency_s"] * 1e3 for r in grid if "predicted_s" in r]
    predicted = [r["predicted_s"] * 1e3 for r in grid if "predicted_s" in r]
    if measured:
        ax.loglog(measured, predicted, "o")
        lo, hi = min(measured + predicted), max(measured + predicted)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], alpha=0.15)
    ax.set_xlabel("measured latency, ms")
    ax.set_ylabel("predicted, ms")
    ax.set_title("Cost model (band: +-25%)")
    fig.tight_layout()
    fig.savefig(out / "fsd.png", dpi=110)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "args": vars(args),
    }
    if args.evaluate:  # score a grid run against a calibration run: pure, nothing measured
        grid_run = json.loads(Path(args.evaluate).read_text())
        calibration = json.loads(Path(args.constants).read_text())
        net_info = grid_run["net"]
        net = radix_net(net_info["neurons"], net_info["layers"])
        rows = [{k: v for k, v in r.items() if k not in ("predicted_s", "error")}
                for r in grid_run["grid"]]  # fmt: skip
        others = [json.loads(Path(g).read_text())["grid"] for g in args.spread_grids]
        spread = run_to_run_spread(grid_run["grid"], *others) if others else 0.0
        report.update(score(net, rows, calibration["calibration"], spread=spread,
                            repetitions=grid_run.get("grid_repetitions")))  # fmt: skip
        report["costmodel"]["runs"] = {
            "grid": {k: grid_run[k] for k in ("commit", "date")},
            "calibration": {k: calibration[k] for k in ("commit", "date")},
        }
        report["grid"] = rows
        print(json.dumps(report["costmodel"], indent=1))
        plot(out, grid_run.get("partition", []), rows)
        return report
    if args.cpu_split:
        print("6. CPU per request, N = 1, 2, 4", flush=True)
        with tempfile.TemporaryDirectory(prefix="fsd-cpu-") as tmp:
            layers = args.layers or (24 if args.quick else 120)
            report["cpu_split"] = await cpu_per_request(
                Path(tmp), neurons=args.neurons, layers=layers, batch=args.batch,
                concurrency=args.concurrency,
                configs=split_configs(args.split_configs, batching=not args.unbatched),
                pass_depth=args.pass_depth, pass_cache_bytes=args.pass_cache_bytes,
                requests=args.split_requests, rounds=args.split_rounds,
                latency_requests=args.split_latency_requests,
            )  # fmt: skip
        return report
    if args.message_cost:
        print("5. one direct-channel message", flush=True)
        with tempfile.TemporaryDirectory(prefix="fsd-msg-") as tmp:
            report["message_cost"] = await message_cost(Path(tmp))
        return report
    print("1. partition volume (bytes per sample, 120 layers)", flush=True)
    report["partition"] = [] if args.skip_partition else partition_volumes()
    if args.partition_only:
        return report
    layers = args.layers or (24 if args.quick else 120)
    net = radix_net(args.neurons, layers)
    report["net"] = {"neurons": args.neurons, "layers": layers, "weight_bytes": net.weight_bytes}
    if not args.skip_local:
        print("2b. one node, shards as threads over the local channel", flush=True)
        report["local"] = await run_local(net, args)
    if args.local_only:
        return report
    with tempfile.TemporaryDirectory(prefix="fsd-bench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        channels = {"direct": ChannelConfig(kind="direct")}
        s3_server = None
        if "nats" in args.channels:
            try:
                nats = stack.enter_context(run_nats(root / "nats"))
                channels["nats"] = ChannelConfig(kind="nats", nats_url=nats.url)
            except ServerMissing as e:
                print(f"  (skipping NATS: {e})")
        if "s3" in args.channels:
            try:
                s3_server = s3 = stack.enter_context(run_seaweedfs(root / "s3"))
                channels["s3"] = ChannelConfig(
                    kind="s3", s3_endpoint=s3.endpoint_url, s3_bucket=s3.bucket,
                    s3_key=s3.key, s3_secret=s3.secret,
                )  # fmt: skip
            except ServerMissing as e:
                print(f"  (skipping S3: {e})")
        print(f"starting {args.nodes} GPU managers ...", flush=True)
        with managers(root, args.nodes, device_memory=args.device_memory, keep_pids=True,
                      cpu_devices=args.cpu_devices) as (urls, pids):  # fmt: skip
            if args.mlp_only:
                from gpufaas.core.units import parse_bytes

                print("3. dense MLP over one device's budget", flush=True)
                report["mlp"] = await run_mlp(urls, parse_bytes(args.device_memory), root,
                                              devices_per_node=args.cpu_devices)  # fmt: skip
                return report
            # Calibration and validation are separate runs: --calibrate-only writes the
            # constants (fitted on 1,024-neuron nets only); a grid run reads them with
            # --constants and never fits anything.
            if args.calibrate_only:
                print("4. cost model: calibration (never the grid's net)", flush=True)
                started = time.time()
                runs = await calibrate(
                    urls, channels, root, args.batch, rounds=args.calibration_rounds, pids=pids
                )
                cores = os.cpu_count() or 1
                constants = fit_constants(
                    runs, cores=cores, pinned=measured_relay(runs, cores=cores)
                )
                report["calibration"] = {
                    "constants": constants_to_json(constants),
                    "constants_without_probe": constants_to_json(
                        fit_constants(runs, cores=cores, probe=False)
                    ),
                    "runs": runs,
                    "message_split": message_split_summary(
                        runs, fit_constants(runs, cores=cores, probe=False)
                    ),
                    "seconds": time.time() - started,
                    "load_average": os.getloadavg(),
                    # nineteenth session: an exchange round on no core, and the plan's rule
                    "pingpong": path_latency(runs, cores=cores),
                    "primary_rule": primary_rule(runs, cores=cores),
                    "links_off_shared_memory": off_shared_memory(
                        runs["channels"] + runs.get("pingpong", [])
                    ),
                }
                print(json.dumps(report["calibration"], indent=1))
                return report
            print(f"2. grid on RadiX-Net {args.neurons} x {layers}, batch {args.batch}", flush=True)
            raw = await run_grid(urls, net, channels, args, root, tuple(pids), s3=s3_server)
            report["grid"] = median_cells(raw) if args.repeats > 1 else raw
            if args.repeats > 1:
                report["grid_repetitions"] = raw
            report["links_off_shared_memory"] = off_shared_memory(report["grid"])
            if args.constants:
                calibration = json.loads(Path(args.constants).read_text())
                report.update(score(net, report["grid"], calibration["calibration"],
                                    repetitions=raw if args.repeats > 1 else None))  # fmt: skip
                report["costmodel"]["calibration_run"] = {
                    k: calibration[k] for k in ("commit", "date")
                }
                print(json.dumps(report["costmodel"], indent=1))
            if not args.skip_mlp:
                print("3. dense MLP over one device's budget", flush=True)
                from gpufaas.core.units import parse_bytes

                report["mlp"] = await run_mlp(urls, parse_bytes(args.device_memory), root,
                                              devices_per_node=args.cpu_devices)  # fmt: skip
    plot(out, report["partition"], report.get("grid", []))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 layers instead of 120")
    parser.add_argument("--neurons", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--device-memory", default="32Mi")
    parser.add_argument("--channels", default="direct,nats,s3")
    parser.add_argument("--methods", default="hypergraph,random,block",
                        help="direct channel (every channel with --every-method)")  # fmt: skip
    parser.add_argument("--every-method", action="store_true",
                        help="NATS and S3 run every partitioner too, not only hypergraph")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-requests", type=int, default=5)
    parser.add_argument("--throughput-requests", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=30.0, help="per configuration")
    parser.add_argument("--partition-only", action="store_true")
    parser.add_argument("--message-cost", action="store_true", help="section 5 only")
    parser.add_argument("--cpu-split", action="store_true", help="section 6 only")
    parser.add_argument("--unbatched", action="store_true",
                        help="the coordinator runs every request as its own pass")  # fmt: skip
    parser.add_argument("--shared-passes", action="store_true",
                        help="grid: the closed loop's requests share passes")  # fmt: skip
    parser.add_argument("--split-requests", type=int, default=60, help="cpu-split: per run")
    parser.add_argument("--split-rounds", type=int, default=3, help="cpu-split: rounds")
    parser.add_argument(
        "--calibration-rounds",
        type=int,
        default=3,
        help="--calibrate-only: rounds over every sharded configuration (median)",
    )
    parser.add_argument("--split-latency-requests", type=int, default=0,
                        help="cpu-split: sequential requests after each run (median latency)")  # fmt: skip
    parser.add_argument("--spread-grids", nargs="*", default=[],
                        help="--evaluate: other runs of the grid, for the run-to-run spread")  # fmt: skip
    parser.add_argument("--split-configs", default=None,
                        help="cpu-split: N-link-mode,... (e.g. 1-unsplit-single,2-shm-shared)")  # fmt: skip
    parser.add_argument("--pass-depth", type=int, default=2, help="passes in flight per set")
    parser.add_argument("--pass-cache-bytes", type=int, default=None,
                        help="a pass's activations at most (default: the coordinator's)")  # fmt: skip
    parser.add_argument(
        "--evaluate", default=None, help="a grid run's fsd.json: score it with --constants"
    )
    parser.add_argument(
        "--calibrate-only", action="store_true", help="fit the cost model's constants, no grid"
    )
    parser.add_argument(
        "--constants", default=None, help="a --calibrate-only run's fsd.json: validate on the grid"
    )
    parser.add_argument("--skip-partition", action="store_true", help="no section 1")
    parser.add_argument("--local-only", action="store_true", help="sections 1 and 2b only")
    parser.add_argument("--skip-local", action="store_true", help="no section 2b")
    parser.add_argument("--skip-mlp", action="store_true", help="no section 3")
    parser.add_argument("--seed", type=int, default=0,
                        help="grid: the inputs' and the partitions' seed (0: sessions 4-13)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="grid: repetitions, each in its own shuffled order; a cell is "
                             "the median of its repetitions")  # fmt: skip
    parser.add_argument("--cells", default=None,
                        help="grid: only these cells, N-channel-method,... (e.g. "
                             "2-direct-block,4-nats-random)")  # fmt: skip
    parser.add_argument("--cpu-devices", type=int, default=1, help="CPU devices per manager")
    parser.add_argument("--mlp-only", action="store_true",
                        help="section 3 only (with --cpu-devices 2: 2 shards per node)")  # fmt: skip
    parser.add_argument("--out", default="bench/out/fsd")
    args = parser.parse_args()
    if args.repeats < 1 or args.cpu_devices < 1:
        parser.error("--repeats and --cpu-devices must be at least 1")
    if args.cells is not None:  # before any manager starts: a clear error, not a late one
        channels = ["direct", *(c for c in args.channels.split(",") if c != "direct")]
        try:
            select_cells(grid_configs(args.nodes, channels, tuple(args.methods.split(",")),
                                      every_method=args.every_method), args.cells)  # fmt: skip
        except ValueError as e:
            parser.error(str(e))
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsd.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'fsd.json'}" + (f" and {out / 'fsd.png'}" if "grid" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
