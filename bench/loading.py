"""Model loading in the GPU manager: bandwidth of each path against its limit, and overlap.

For synthetic TorchScript models of several sizes (stacks of 1024x1024 linear layers), measures

* remote -> disk: ``ArtifactStore.fetch`` over HTTP from a loopback server (hashing included);
* disk -> host: the first fill from the artifact (load, probe, lay out, copy), and a refill from
  the host sidecar (page cache warm) into a re-used and into a fresh host buffer;
* host -> device and device -> device: the grouped copy the loader issues, into a re-used and
  into a fresh arena;

each as GB/s beside that path's limit measured in the same run on the same machine: memcpy
between warm buffers on the CPU; a single pinned host-to-device copy, and a single peer copy,
on a GPU. It then measures first-inference latency through :class:`NodeRuntime` with the
per-layer overlap and without it, for a batch size calibrated so that compute takes about as
long as the load (where overlap matters most), and the device memory each resident model takes
against its tensor bytes plus its reserve.

Through the residency chain itself it also measures the disk tier: a host-tier refill from the
model's sidecar (``HostTier.acquire`` after an eviction) against a raw sequential ``readinto`` of
the same file, with the file's pages dropped from the page cache before each read (``fsync`` then
``posix_fadvise(DONTNEED)``: cold) and kept (warm); and MiniLM's cold start (first request after
registration, with the sidecar written at registration) when the example models are built.

    python bench/loading.py                       # 16, 64, 256 MiB; table, JSON in bench/out
    python bench/loading.py --sizes 8Mi,32Mi --repeats 3
    python bench/loading.py --json                # JSON on stdout only

Run it on an idle machine: it is a bandwidth measurement. Results: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import http.server
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpufaas.core.api import ModelFormat, parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.modelio import save_model
from gpufaas.core.units import format_bytes, parse_bytes
from gpufaas.gpu_manager.devices import DeviceBackend, make_backend
from gpufaas.gpu_manager.host_tier import prepare_model, read_sidecar, write_sidecar
from gpufaas.gpu_manager.inventory import discover_devices
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.pinned import allocate_host, cuda_available
from gpufaas.gpu_manager.runtime import NodeRuntime

HERE = Path(__file__).resolve().parent
WIDTH = 1024  # each layer: WIDTH x WIDTH float32 = 4 MiB, plus its bias


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def spec_for(path: Path, *, max_batch: int = 1) -> Any:
    return parse_spec(
        {
            "model": {"uri": path.resolve().as_uri(), "format": "torchscript"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, WIDTH]}],
            "batching": {"maxBatchSize": max_batch},
        }
    )


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --- measuring -------------------------------------------------------------------------------------


def paired(
    path: Callable[[], float], limit: Callable[[], float], nbytes: int, *, repeats: int
) -> dict[str, float]:
    """Time a path and its limit alternately (seconds each), so that load from other work on
    the machine hits both alike; the ratio is the median of the per-round ratios."""
    path_s, limit_s = [], []
    for _ in range(repeats):
        limit_s.append(limit())
        path_s.append(path())
    ratios = [lim / got for got, lim in zip(path_s, limit_s, strict=True)]
    return {
        "gbps": gbps(nbytes, min(path_s)),
        "limit_gbps": gbps(nbytes, min(limit_s)),
        "ratio": statistics.median(ratios),
    }


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def plain_copy(dst: torch.Tensor, src: torch.Tensor, backend: DeviceBackend) -> Callable[[], float]:
    """One plain copy of ``src`` into the warm ``dst``: memcpy on the CPU, a single pinned
    host-to-device (or peer) copy on a GPU. The limit each path is measured against."""

    def run() -> float:
        started = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        backend.synchronize()
        return time.perf_counter() - started

    return run


def grouped_copy(
    backend: DeviceBackend,
    src: torch.Tensor,
    groups: Any,
    *,
    warm: bool,
    source: DeviceBackend | None = None,
) -> Callable[[], float]:
    """The loader's copy: allocate the arena (re-used from the pool when ``warm``), start the
    grouped copy, wait for its last event."""
    nbytes = src.numel()
    if warm:  # the first allocation is fresh; release it so the pool holds one
        first, _ = backend.allocate(nbytes, in_use_bytes=nbytes)
        backend.start_transfer(first, src, groups, source=source).wait_all()
        backend.release(first, in_use_bytes=0)
        del first

    def run() -> float:
        arena, _reused = backend.allocate(nbytes, in_use_bytes=nbytes)
        started = time.perf_counter()
        backend.start_transfer(arena, src, groups, source=source).wait_all()
        seconds = time.perf_counter() - started
        if warm:
            backend.release(arena, in_use_bytes=0)
        return seconds

    return run


# --- paths -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()  # its listening socket (shutdown only stops the loop)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def measure_paths(
    path: Path, backends: list[DeviceBackend], work: Path, base_url: str, *, repeats: int
) -> dict[str, Any]:
    spec = spec_for(path)
    pin = cuda_available()
    started = time.perf_counter()
    prepared = prepare_model(
        path,
        spec,
        fingerprint=str(path),
        alignment=max(b.alignment for b in backends),
        min_group_bytes=max(b.min_group_bytes for b in backends),
        variable_dim=1,
    )
    layout = prepared.skeleton.layout
    nbytes = layout.arena_bytes
    host, pinned = allocate_host(nbytes, pin=pin)
    prepared.fill(host)
    first_fill = time.perf_counter() - started
    skeleton = prepared.skeleton

    # Host memcpy between warm buffers: the CPU limit.
    warm_a = torch.ones(nbytes, dtype=torch.uint8)
    warm_b = torch.zeros(nbytes, dtype=torch.uint8)
    cpu = backends[0] if backends[0].info.kind == "cpu" else None

    def memcpy() -> float:
        return timed(lambda: warm_b.copy_(warm_a))

    artifact = path.read_bytes()
    digest = hashlib.sha256(artifact).hexdigest()
    fetches = iter(range(10**6))

    def sha256() -> float:  # a fetch with a pinned digest hashes every byte: its own limit
        return timed(lambda: hashlib.sha256(artifact).hexdigest())

    def fetch() -> float:
        store = ArtifactStore(work / f"store-{path.stem}-{next(fetches)}")
        return timed(lambda: store.fetch(f"{base_url}/{path.name}", sha256=digest))

    sidecar = work / f"{path.stem}.safetensors"
    write_sidecar(sidecar, skeleton, host)
    read_sidecar(sidecar, skeleton, warm_b)  # page cache warm

    def refill_warm() -> float:
        return timed(lambda: read_sidecar(sidecar, skeleton, warm_b))

    def refill_fresh() -> float:
        return timed(lambda: read_sidecar(sidecar, skeleton, allocate_host(nbytes, pin=pin)[0]))

    device = backends[0]
    target, _ = device.allocate(nbytes, in_use_bytes=nbytes)
    target.copy_(host)
    h2d_limit = plain_copy(target, host, device) if cpu is None else memcpy
    result: dict[str, Any] = {
        "model_bytes": layout.weights_bytes,
        "arena_bytes": nbytes,
        "groups": len(layout.groups),
        "host_pinned": pinned,
        "first_fill_s": first_fill,
        "remote_to_disk": paired(fetch, sha256, path.stat().st_size, repeats=repeats),
        "sidecar_to_host_warm": paired(refill_warm, memcpy, nbytes, repeats=repeats),
        "sidecar_to_host_fresh": paired(refill_fresh, memcpy, nbytes, repeats=repeats),
        "host_to_device_warm": paired(
            grouped_copy(device, host, layout.groups, warm=True), h2d_limit, nbytes, repeats=repeats
        ),
        "host_to_device_fresh": paired(
            grouped_copy(device, host, layout.groups, warm=False),
            h2d_limit,
            nbytes,
            repeats=repeats,
        ),
    }
    if len(backends) > 1 and backends[1].info.id in device.info.peers:
        peer = backends[1]
        on_peer, _ = peer.allocate(nbytes, in_use_bytes=nbytes)
        on_peer.copy_(host)
        peer.synchronize()
        d2d_limit = plain_copy(target, on_peer, device) if cpu is None else memcpy
        for warm in (True, False):
            result[f"device_to_device_{'warm' if warm else 'fresh'}"] = paired(
                grouped_copy(device, on_peer, layout.groups, warm=warm, source=peer),
                d2d_limit,
                nbytes,
                repeats=repeats,
            )
    return result


# --- first inference: overlap ----------------------------------------------------------------------


async def first_inference(path: Path, work: Path, *, repeats: int) -> dict[str, Any]:
    """First-inference latency through the runtime, with and without the per-layer overlap.

    Two runtimes (overlap on, off) take turns, so that other load on the machine hits both
    alike. Each round unloads the model from the device (its arena goes back to the pool, as
    after an eviction) and times one request, which copies the model from the host tier.
    """
    infos = discover_devices(cpu_devices=1, device_memory=8 * 2**30)[:1]
    device = infos[0].id
    runtimes = {}
    for overlap in (True, False):
        runtime = NodeRuntime(
            devices=infos,
            store=ArtifactStore(work / f"overlap-{overlap}"),
            host_capacity_bytes=8 * 2**30,
            overlap=overlap,
        )
        runtime.register("stack", spec_for(path))
        x1 = np.zeros((1, WIDTH), dtype=np.float32)
        await runtime.infer("stack", [x1], device_id=device)  # host tier filled, JIT warmed
        await runtime.settle()
        runtimes["overlap" if overlap else "sequential"] = runtime
    batch = await calibrate_batch(runtimes["overlap"], device)
    x = np.random.default_rng(0).standard_normal((batch, WIDTH), dtype=np.float32)
    rounds: list[dict[str, float]] = []
    for _ in range(repeats):
        measured: dict[str, float] = {}
        for mode, runtime in runtimes.items():
            for _ in range(2):
                await runtime.infer("stack", [x], device_id=device)  # warm at this batch
            measured[f"{mode}_compute_ms"] = (
                await runtime.infer("stack", [x], device_id=device)
            ).compute_ms
            runtime.unload("stack", device_id=device)
            started = time.perf_counter()
            outcome = await runtime.infer("stack", [x], device_id=device)
            measured[f"{mode}_latency_ms"] = (time.perf_counter() - started) * 1000
            await runtime.settle()
            assert not outcome.cache_hit
            measured[f"{mode}_load_ms"] = runtime.loads.recent[-1].seconds * 1000
        # The reference times: the load alone (the sequential round copies with nothing else
        # running) and the forward pass alone (warm, model resident).
        load = measured["sequential_load_ms"]
        compute = statistics.mean(
            [measured["overlap_compute_ms"], measured["sequential_compute_ms"]]
        )
        measured["load_ms"], measured["compute_ms"] = load, compute
        measured["overlap_to_max"] = measured["overlap_latency_ms"] / max(load, compute)
        measured["sequential_to_sum"] = measured["sequential_latency_ms"] / (load + compute)
        measured["gain"] = measured["sequential_latency_ms"] / measured["overlap_latency_ms"]
        rounds.append(measured)
    results: dict[str, Any] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    results["batch"] = batch
    return results


async def calibrate_batch(runtime: NodeRuntime, device: str) -> int:
    """The batch size at which one forward pass takes about as long as loading the model
    (medians of three, as other work on the machine makes single timings jump)."""
    x1 = np.zeros((1, WIDTH), dtype=np.float32)
    loads = []
    for _ in range(3):
        runtime.unload("stack", device_id=device)
        await runtime.infer("stack", [x1], device_id=device)
        await runtime.settle()
        loads.append(runtime.loads.recent[-1].seconds * 1000)
    load_ms = statistics.median(loads)
    batch = 1
    for _ in range(12):
        x = np.zeros((batch, WIDTH), dtype=np.float32)
        await runtime.infer("stack", [x], device_id=device)
        compute_ms = statistics.median(
            [(await runtime.infer("stack", [x], device_id=device)).compute_ms for _ in range(3)]
        )
        if compute_ms >= 0.9 * load_ms or batch >= 4096:
            break
        batch = min(4096, max(batch + 1, int(batch * load_ms / max(compute_ms, 1e-3))))
    return batch


def parallel_speedup(*, repeats: int) -> float:
    """How much faster two CPU-bound threads finish than one after the other (2.0: two free
    cores; 1.0: none). Overlap on CPU devices needs a second core for the copy thread."""
    weights, rows = torch.randn(512, 512), torch.randn(64, 512)

    def work() -> None:
        for _ in range(200):
            rows @ weights

    def two() -> None:
        other = threading.Thread(target=work)
        other.start()
        work()
        other.join()

    ratios = [2 * timed(work) / timed(two) for _ in range(repeats)]
    return statistics.median(ratios)


# --- memory per resident model ---------------------------------------------------------------------


async def memory_per_model(paths: dict[str, Path], work: Path) -> dict[str, Any]:
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests

    infos = discover_devices(cpu_devices=1, device_memory=8 * 2**30)[:1]
    runtime = NodeRuntime(
        devices=infos, store=ArtifactStore(work / "memory"), host_capacity_bytes=8 * 2**30
    )
    specs: dict[str, Any] = {name: spec_for(p) for name, p in paths.items()}
    models = os.environ.get("GPUFAAS_MODELS")
    if models and Path(models).is_dir():
        for function in load_manifests(
            [bundled_functions_dir()], variables={"GPUFAAS_MODELS": models}
        ):
            specs[function.name] = function.spec
    rows = {}
    for name, spec in specs.items():
        runtime.register(name, spec)
        before = runtime.devices[infos[0].id].backend.memory_allocated()
        await runtime.load(name, device_id=infos[0].id)
        after = runtime.devices[infos[0].id].backend.memory_allocated()
        model = runtime.devices[infos[0].id].tier.current(name)
        assert isinstance(model, DeviceModel) and model.arena is not None  # a model, not a shard
        held = (after - before) if before is not None and after is not None else model.arena.numel()
        rows[name] = {
            "weights_bytes": model.weights_bytes,
            "reserve_bytes": model.reserve_bytes,
            "device_bytes": held,
            "entry_bytes": model.size_bytes,
            "overhead": held / model.weights_bytes - 1,
            "entry_overhead": (held + model.reserve_bytes)
            / (model.weights_bytes + model.reserve_bytes)
            - 1,
        }
    return rows


# --- the disk tier: refill against a raw sequential read ----------------------------------------


def drop_from_page_cache(path: Path) -> None:
    """Evict ``path``'s pages from the page cache (clean pages only, hence the fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: Path, into: torch.Tensor) -> float:
    """One sequential ``readinto`` of the whole file into a warm buffer: the disk's limit."""
    target = into.numpy().data
    started = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        done = 0
        while done < len(target):
            count = f.readinto(target[done:])
            if not count:
                break
            done += count
    return time.perf_counter() - started


async def disk_tier_refill(path: Path, work: Path, *, repeats: int) -> dict[str, Any]:
    """A host-tier refill through the chain (``HostTier.acquire``: the disk tier's sidecar read
    into a pooled host buffer) against a raw read of the same sidecar, alternating, cold and
    warm page cache."""
    infos = discover_devices(cpu_devices=1, device_memory=8 * 2**30)[:1]
    runtime = NodeRuntime(
        devices=infos, store=ArtifactStore(work / "disk-tier"), host_capacity_bytes=8 * 2**30
    )
    spec = spec_for(path)
    runtime.register("stack", spec)  # writes the sidecar in the background
    await runtime.settle()
    skeleton = runtime.disk.skeletons["stack"]
    sidecar = skeleton.sidecar
    assert sidecar is not None
    file_bytes = sidecar.stat().st_size
    buffer = torch.empty(file_bytes, dtype=torch.uint8)
    buffer.fill_(1)

    async def refill(cold: bool) -> float:
        runtime.host.evict("stack")  # its buffer goes back to the pool, as after an eviction
        if cold:
            drop_from_page_cache(sidecar)
        started = time.perf_counter()
        with await runtime.host.acquire("stack", spec) as host:
            assert host.source == "sidecar"
        return time.perf_counter() - started

    result: dict[str, Any] = {"file_bytes": file_bytes, "arena_bytes": skeleton.layout.arena_bytes}
    await refill(False)  # the pool holds a buffer of this size from now on
    for cold in (True, False):
        refills, raws = [], []
        for _ in range(repeats):
            if cold:
                drop_from_page_cache(sidecar)
            raws.append(raw_read(sidecar, buffer))
            refills.append(await refill(cold))
        ratios = [raw / got for got, raw in zip(refills, raws, strict=True)]
        result["cold" if cold else "warm"] = {
            "refill_gbps": gbps(file_bytes, statistics.median(refills)),
            "raw_read_gbps": gbps(file_bytes, statistics.median(raws)),
            "ratio": statistics.median(ratios),
        }
    return result


async def minilm_cold_start(work: Path, *, repeats: int) -> dict[str, Any] | None:
    """MiniLM's first request on a fresh runtime, artifact on local disk: with its sidecar
    written at registration (the default) and, for reference, with the artifact read on the
    request path (``prepare_on_register=False``). None without the example's weights."""
    from gpufaas.core.examples import build_examples
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests

    models = Path(os.environ.get("GPUFAAS_MODELS") or work / "examples")
    if not (models / "minilm.pt").is_file():
        try:
            build_examples(models, names=("minilm",), progress=False)
        except Exception as e:  # the weights ship in an optional package
            print(f"minilm cold start skipped: {e}", file=sys.stderr)
            return None
    (function,) = [
        f
        for f in load_manifests(
            [bundled_functions_dir()], variables={"GPUFAAS_MODELS": str(models)}
        )
        if f.name == "minilm"
    ]
    from gpufaas.core.examples import example_inputs

    inputs = list(example_inputs("minilm", batch=1).values())
    infos = discover_devices(cpu_devices=1, device_memory=8 * 2**30)[:1]
    rounds: dict[str, list[float]] = {"sidecar_at_register": [], "artifact_on_request": []}
    for i in range(repeats):
        for mode, prepare in (("sidecar_at_register", True), ("artifact_on_request", False)):
            runtime = NodeRuntime(
                devices=infos,
                store=ArtifactStore(work / f"cold-{mode}-{i}"),
                host_capacity_bytes=8 * 2**30,
                prepare_on_register=prepare,
            )
            runtime.register("minilm", function.spec)
            await runtime.settle()  # registration's work (the sidecar) is done before the request
            started = time.perf_counter()
            outcome = await runtime.infer("minilm", inputs, device_id=infos[0].id)
            rounds[mode].append((time.perf_counter() - started) * 1000)
            assert not outcome.cache_hit
            await runtime.settle()
    return {mode: statistics.median(ms) for mode, ms in rounds.items()}


# --- main ------------------------------------------------------------------------------------------


def build_models(sizes: list[int], work: Path) -> dict[str, Path]:
    paths = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for size in sizes:
            layers = max(1, round(size / (WIDTH * WIDTH * 4)))
            path = work / f"stack-{format_bytes(size)}.pt"
            save_model(
                torch.jit.script(Stack(layers).eval()),
                path,
                format=ModelFormat.TORCHSCRIPT,
                example_inputs=(),
            )
            paths[f"stack-{format_bytes(size)}"] = path
    return paths


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']}; devices: {report['devices']}.",
        "",
        "Each cell: best GB/s, then the median ratio to the path's limit (memcpy between warm",
        "buffers here; pinned H2D and peer copies on a GPU), both measured in alternation.",
        "",
        "remote->disk is measured against SHA-256 of the artifact (a fetch with a pinned digest",
        "hashes every byte); the first fill from the artifact against nothing (it parses it).",
        "",
        "| model | bytes | memcpy GB/s | remote->disk | disk->host first fill "
        "| sidecar->host warm / fresh | host->device warm / fresh "
        "| device->device warm / fresh |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any] | None) -> str:
        return "n/a" if r is None else f"{r['gbps']:.2f} ({r['ratio']:.0%})"

    for name, r in report["paths"].items():
        limit = r["sidecar_to_host_warm"]["limit_gbps"]
        lines.append(
            f"| {name} | {format_bytes(r['arena_bytes'])} | {limit:.2f} "
            f"| {cell(r['remote_to_disk'])} "
            f"| {r['arena_bytes'] / r['first_fill_s'] / 1e9:.2f} "
            f"| {cell(r['sidecar_to_host_warm'])} / {cell(r['sidecar_to_host_fresh'])} "
            f"| {cell(r['host_to_device_warm'])} / {cell(r['host_to_device_fresh'])} "
            f"| {cell(r.get('device_to_device_warm'))} / {cell(r.get('device_to_device_fresh'))} |"
        )
    o = report["first_inference"]
    lines += [
        "",
        f"First inference of {o['model']} at batch {o['batch']} (where compute takes about as "
        "long as the load); medians of alternating rounds. Load alone "
        f"{o['load_ms']:.1f} ms, compute alone {o['compute_ms']:.1f} ms.",
        "",
        "| mode | latency ms | its copy took ms | latency / max(load, compute) "
        "| latency / (load + compute) |",
        "|---|---|---|---|---|",
        f"| overlap | {o['overlap_latency_ms']:.1f} | {o['overlap_load_ms']:.1f} "
        f"| {o['overlap_to_max']:.2f} "
        f"| {o['overlap_latency_ms'] / (o['load_ms'] + o['compute_ms']):.2f} |",
        f"| sequential | {o['sequential_latency_ms']:.1f} | {o['sequential_load_ms']:.1f} "
        f"| {o['sequential_latency_ms'] / max(o['load_ms'], o['compute_ms']):.2f} "
        f"| {o['sequential_to_sum']:.2f} |",
        "",
        f"Gain from overlap (sequential / overlap latency, median of rounds): {o['gain']:.2f}x. "
        f"Control: two CPU-bound threads ran {o['parallel_speedup']:.2f}x as fast as one after "
        "the other (2.00 with two free cores).",
        "",
        "| resident model | tensor bytes | reserve | device bytes held | above tensor bytes "
        "| cache entry (held + reserve) | entry above tensor bytes + reserve |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in report["memory"].items():
        lines.append(
            f"| {name} | {m['weights_bytes']} | {m['reserve_bytes']} | {m['device_bytes']} "
            f"| {m['overhead']:.3%} | {m['entry_bytes']} | {m['entry_overhead']:.3%} |"
        )
    d = report["disk_tier"]
    lines += [
        "",
        f"Disk tier, {d['model']} (sidecar {d['file_bytes']} bytes): host-tier refill through "
        "the chain against a raw sequential read of the same file, medians of alternating rounds.",
        "",
        "| page cache | refill GB/s | raw read GB/s | refill / raw (median of rounds) |",
        "|---|---|---|---|",
    ]
    for mode in ("cold", "warm"):
        r = d[mode]
        lines.append(
            f"| {mode} | {r['refill_gbps']:.2f} | {r['raw_read_gbps']:.2f} | {r['ratio']:.0%} |"
        )
    c = report.get("cold_start")
    if c:
        lines += [
            "",
            "MiniLM first request (fresh runtime, artifact on local disk): "
            f"{c['sidecar_at_register']:.0f} ms with the sidecar written at registration, "
            f"{c['artifact_on_request']:.0f} ms reading the artifact on the request path.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16Mi,64Mi,256Mi", help="model sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overlap-model", default=None, help="size used for the overlap test")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--cold-start", action="store_true", help="also time MiniLM's first request (slow)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "out" / "loading.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        sizes = [parse_bytes(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(1)  # as the GPU manager runs: one intra-op thread per request
    started_load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="gpufaas-bench-") as tmp:
        work = Path(tmp)
        paths = build_models(sizes, work)
        infos = discover_devices(cpu_devices=2, device_memory=max(sizes) * 4)
        backends = [make_backend(info) for info in infos[:2]]
        with http_server(work) as base_url:
            measured = {
                name: measure_paths(path, backends, work, base_url, repeats=args.repeats)
                for name, path in paths.items()
            }
        overlap_name = (
            f"stack-{format_bytes(parse_bytes(args.overlap_model))}"
            if args.overlap_model
            else list(paths)[-1]
        )
        if overlap_name not in paths:
            parser.error(f"--overlap-model must be one of --sizes ({', '.join(paths)})")
        overlap = asyncio.run(first_inference(paths[overlap_name], work, repeats=args.repeats))
        overlap["model"] = overlap_name
        overlap["parallel_speedup"] = parallel_speedup(repeats=args.repeats)
        memory = asyncio.run(memory_per_model({overlap_name: paths[overlap_name]}, work))
        disk = asyncio.run(disk_tier_refill(paths[overlap_name], work, repeats=args.repeats))
        disk["model"] = overlap_name
        cold_start = (
            asyncio.run(minilm_cold_start(work, repeats=args.repeats)) if args.cold_start else None
        )
        load = os.getloadavg()[0]
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"load average {started_load:.1f} at start, {load:.1f} at end",
            "devices": ", ".join(f"{i.id} ({i.name})" for i in infos[:2]),
            "paths": measured,
            "first_inference": overlap,
            "memory": memory,
            "disk_tier": disk,
            "cold_start": cold_start,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
