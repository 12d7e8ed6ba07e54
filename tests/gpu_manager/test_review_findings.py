"""The CUDA-path review findings (issue #11, item 5) shown on the CPU through the runtime.

Each test names its finding. Each fails when its protection is removed: the fatal-error path,
the index check before upload, the OOM retry, the slab pinned once, work kept off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from gm_support import Model, devices, make_spec
from torch import nn

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import ModelLoadError, save_model
from gpufaas.gpu_manager import host_cache, host_tier
from gpufaas.gpu_manager.device_faults import NodeHealth
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.host_tier import prepare_model
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.runtime import InferOutcome, NodeRuntime, RuntimeFailure
from gpufaas.gpu_manager.server import create_app

Factory = Callable[..., NodeRuntime]
MiB = 1 << 20


class SteeredBackend(CpuBackend):
    """A CPU device whose compute can be made to fail, counting the requests that reach it."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.computes = 0
        self.failures: list[BaseException] = []  # raised by the next computes, in order

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        self.computes += 1
        yield
        if self.failures:  # as a CUDA stream's synchronize reports an error after the work
            raise self.failures.pop(0)


def _runtime(tmp_path: Path, *, capacity: int = 1 << 30, **options: Any) -> NodeRuntime:
    from gpufaas.core.artifacts import ArtifactStore

    infos = devices(1, capacity=capacity)
    return NodeRuntime(
        devices=infos,
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=options.pop("host_capacity", 1 << 30),
        backends={infos[0].id: SteeredBackend(infos[0])},
        **options,
    )


def _steered(runtime: NodeRuntime) -> SteeredBackend:
    backend = runtime.devices["cpu:0"].backend
    assert isinstance(backend, SteeredBackend)
    return backend


# --- finding 3: fatal CUDA errors; token ids checked before upload ----------------------------------


async def test_a_fatal_device_error_is_a_503_and_the_node_stops_being_ready(
    tmp_path: Path, models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    ended: list[str] = []
    runtime = _runtime(tmp_path, health=NodeHealth(on_fatal=ended.append))
    runtime.register(model.name, model.spec)
    app = create_app(runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        assert (await c.get("/v2/health/ready")).status_code == 200
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
        _steered(runtime).failures.append(
            RuntimeError(
                "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"
            )
        )

        with pytest.raises(RuntimeFailure) as failed:
            await runtime.infer(model.name, model.inputs(), device_id="cpu:0")

        assert failed.value.status == 503 and failed.value.reason == "DeviceFailed"
        assert "device-side assert" in str(failed.value)
        ready = await c.get("/v2/health/ready")
        assert ready.status_code == 503 and "device-side assert" in ready.text
        assert len(ended) == 1  # the process is told to exit, once
        state = (await c.get("/v2/gpufaas/state")).json()
        assert state["ready"] is False and "device-side assert" in state["failure"]
        assert state["platform"]["torch"] == torch.__version__  # and torch_cuda, the driver


async def test_an_out_of_range_token_id_is_a_400_naming_the_input_before_upload(
    tmp_path: Path, models: dict[str, Model]
) -> None:
    model = models["lookup"].with_spec(batching={"maxBatchSize": 1})
    runtime = _runtime(tmp_path)
    runtime.register(model.name, model.spec)
    good = await runtime.infer(model.name, model.inputs(batch=2), device_id="cpu:0")
    assert isinstance(good, InferOutcome) and _steered(runtime).computes == 1

    for bad, value in ((np.array([[1, 2, 10, 3]]), 10), (np.array([[0, -1, 0, 0]]), -1)):
        with pytest.raises(RuntimeFailure) as rejected:
            await runtime.infer(model.name, [bad.astype(np.int64)], device_id="cpu:0")
        assert rejected.value.status == 400 and rejected.value.reason == "InvalidInput"
        assert f"'ids' holds {value}" in str(rejected.value) and "[0, 10)" in str(rejected.value)
    assert _steered(runtime).computes == 1  # nothing went to the device
    assert runtime.health.ready


# --- finding 9: an OOM while computing evicts what is not in use and retries once ---------------


async def test_an_oom_while_computing_evicts_unused_models_and_retries_once(
    tmp_path: Path, models: dict[str, Model]
) -> None:
    a, b = models["tiny-mlp"], models["deep"]
    runtime = _runtime(tmp_path)
    for model in (a, b):
        runtime.register(model.name, model.spec)
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    await runtime.settle()  # both committed: a copy still arriving is never evicted
    backend = _steered(runtime)
    backend.failures.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    before = backend.computes

    outcome = await runtime.infer(b.name, b.inputs(), device_id="cpu:0")

    np.testing.assert_allclose(outcome.outputs["y"][0], b.reference(b.inputs()), rtol=1e-5)
    assert backend.computes == before + 2  # one retry
    residents = [r.model for r in runtime.state().devices[0].residents]
    assert residents == [b.name]  # the unused model made room; the one in use stayed

    backend.failures.extend([torch.OutOfMemoryError("CUDA out of memory")] * 2)
    with pytest.raises(RuntimeFailure) as twice:
        await runtime.infer(b.name, b.inputs(), device_id="cpu:0")
    assert twice.value.status == 503 and twice.value.reason == "InsufficientMemory"


# --- finding 6: the host tier is pinned once; refills stay off the event loop ---------------------


def _big_model(tmp_path: Path, nbytes: int) -> Model:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(nbytes // 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w[:16]

    path = tmp_path / "big.pt"
    ts = ModelFormat.TORCHSCRIPT
    save_model(torch.jit.script(Big().eval()), path, format=ts, example_inputs=())
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}]
    return Model("big", path, ts, make_spec(path, ts, inputs=inputs, outputs=outputs))


async def test_a_512_mib_refill_leaves_the_loop_running_and_never_pins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins: list[int] = []

    def register(pointer: int, nbytes: int) -> bool:  # stands in for cudaHostRegister
        pins.append(nbytes)
        return True

    monkeypatch.setattr(host_tier, "register_host", register)
    monkeypatch.setattr(host_tier, "unregister_host", lambda pointer: None)
    model = _big_model(tmp_path, 512 * MiB)
    # Room for two copies: the evicted arena's range returns to the slab when its last view
    # is gone, which a worker thread may hold a moment longer than the tier does.
    runtime = _runtime(
        tmp_path, capacity=1200 * MiB, host_capacity=1100 * MiB, pin_host_memory=True
    )
    assert pins == [1100 * MiB]  # the slab, at start-up
    runtime.register(model.name, model.spec)
    await runtime.load(model.name, device_id="cpu:0")
    await runtime.settle()  # the sidecar is written
    runtime.host.evict(model.name)
    runtime.devices["cpu:0"].evict(model.name)
    await asyncio.sleep(0)

    # The probe ticks on the loop; the refill's read (in its worker thread) waits for three
    # ticks after it started. Were the read on the loop, no tick could come: it would time out.
    loop_thread = threading.get_ident()
    ticks_during_read = threading.Event()
    reading = threading.Event()
    lags: list[float] = []
    real_read = host_cache.read_sidecar

    def read(*args: Any, **kwargs: Any) -> None:
        assert threading.get_ident() != loop_thread
        reading.set()
        if not ticks_during_read.wait(30):
            raise AssertionError("the event loop did not run while the refill read its sidecar")
        real_read(*args, **kwargs)

    monkeypatch.setattr(host_cache, "read_sidecar", read)

    async def probe(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        ticks = 0
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - before - 0.001)
            if reading.is_set():
                ticks += 1
                if ticks >= 3:
                    ticks_during_read.set()

    stop = asyncio.Event()
    prober = asyncio.create_task(probe(stop))
    await runtime.load(model.name, device_id="cpu:0")
    stop.set()
    await prober

    state = runtime.state()
    assert state.host_fills["sidecar"].bytes >= 512 * MiB
    assert state.host.pinned and state.host.residents[0].pinned  # the real flag of its arena
    assert pins == [1100 * MiB]  # no page-locking per refill
    print(f"max loop lag during a 512 MiB refill: {max(lags) * 1000:.1f} ms (shared 2-core box)")


# --- finding 5: traced CPU constants are refused for a GPU, with the reason -------------------------


class _Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.zeros(x.shape[0], 4)  # tracing bakes in device="cpu"


def test_a_traced_model_with_cpu_constants_is_refused_for_a_gpu(tmp_path: Path) -> None:
    ts = ModelFormat.TORCHSCRIPT
    traced, scripted = tmp_path / "traced.pt", tmp_path / "scripted.pt"
    save_model(torch.jit.trace(_Traced().eval(), torch.zeros(2, 16)), traced, format=ts,
               example_inputs=())  # fmt: skip
    save_model(torch.jit.script(_Traced().eval()), scripted, format=ts, example_inputs=())
    x16 = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    y4 = [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]

    def prepare(path: Path, device_type: str) -> object:
        spec = make_spec(path, ts, inputs=x16, outputs=y4)
        return prepare_model(
            path, spec, fingerprint="f", alignment=256, min_group_bytes=0, variable_dim=4,
            device_type=device_type,
        )  # fmt: skip

    with pytest.raises(ModelLoadError, match=r"CPU device constants.*torch\.export"):
        prepare(traced, "cuda")
    assert prepare(traced, "cpu") is not None  # on CPU devices the constant is right
    assert prepare(scripted, "cuda") is not None  # scripted code uses the input's device


# --- finding 9: the activation reserve measured on the device, at the declared max dims -----------


class MeasuringBackend(SteeredBackend):
    """A device that "tracks memory": it reports the rows of the probe forward it watched."""

    tracks_memory = True

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.rows: list[int] = []

    def peak_bytes_during(self, work: Callable[[], object]) -> int | None:
        from torch.utils._python_dispatch import TorchDispatchMode

        rows = self.rows

        class Watch(TorchDispatchMode):  # type: ignore[no-untyped-call]
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                for a in args:
                    if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[1] == 16:
                        rows.append(int(a.shape[0]))
                return func(*args, **(kwargs or {}))

        with Watch():
            work()
        return 7 * MiB


async def test_the_reserve_is_measured_on_the_device_at_the_declared_max_batch(
    tmp_path: Path, models: dict[str, Model]
) -> None:
    from gpufaas.core.artifacts import ArtifactStore

    model = models["tiny-mlp"].with_spec(batching={"maxBatchSize": 32})
    info = devices(1)[0]
    backend = MeasuringBackend(info)
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(tmp_path / "a"),
        host_capacity_bytes=1 << 30,
        backends={info.id: backend},
    )
    runtime.register(model.name, model.spec)
    outcome = await runtime.infer(model.name, model.inputs(), device_id=info.id)

    assert backend.rows and set(backend.rows) == {32}  # at maxBatchSize rows
    skeleton = runtime.disk.skeletons[model.name]
    assert skeleton.reserve_bytes == 7 * MiB
    assert outcome.size_bytes == skeleton.layout.arena_bytes + 7 * MiB


def test_the_manager_refuses_to_start_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpufaas.gpu_manager import cli, main
    from gpufaas.gpu_manager.inventory import DeviceSetupError

    def refuse(**options: Any) -> NodeRuntime:
        raise DeviceSetupError("refusing to start: NVML sees 2 GPU(s) but this torch has no CUDA")

    monkeypatch.setattr(main, "build_runtime", refuse)
    assert cli.main(["--port", "0"]) == 2
    assert "has no CUDA" in capsys.readouterr().err
