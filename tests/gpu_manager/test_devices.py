"""The device layer: NVML discovery parsing, CPU fall-back, CPU copies, memory pools."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Collection
from typing import Any

import pytest
import torch
from fake_nvml import FakeGpu, FakeNvml, mixed_mig_node

from gpufaas.gpu_manager.device_faults import (
    DeviceOutOfMemory,
    NodeHealth,
    TransferFailed,
    is_fatal_device_error,
    is_out_of_memory,
)
from gpufaas.gpu_manager.devices import SMALL_LOAD_BYTES, CpuBackend, CpuTransfer, copy_lane
from gpufaas.gpu_manager.inventory import (
    DeviceSetupError,
    cache_capacity,
    cpu_devices,
    devices_from_inventory,
    discover_devices,
    mapping_problems,
)
from gpufaas.gpu_manager.memory import BufferPool, anonymous_buffer
from gpufaas.gpu_manager.nvml import normal_uuid, nvml_enum, pcie_gbps, read_nvml_inventory
from gpufaas.gpu_manager.pinned import allocate_host
from gpufaas.gpu_manager.process_setup import (
    allocator_conf_update,
    configure_process,
    platform_versions,
    script_fusion_possible,
)

GiB = 2**30


def fake_nvml(**broken: Collection[str]) -> types.SimpleNamespace:
    """Three GPUs as NVML reports them: two joined by NVLink, one split into MIG instances
    (slot 1 empty). ``broken`` names functions that fail per handle."""
    gpus = {
        "g0": FakeGpu("GPU-aaaa0000", "NVIDIA H100", 80 * GiB, 79 * GiB, (5, 16, 5, 16)),
        "g1": FakeGpu("GPU-bbbb1111", b"NVIDIA H100", 80 * GiB, 70 * GiB, (1, 16, 5, 16)),
        "g2": FakeGpu("GPU-cccc2222", "NVIDIA A100", 40 * GiB, 40 * GiB, (4, 16, 4, 16),
                      mig=["m0", None, "m2"]),
        "m0": FakeGpu("MIG-dddd3333", "NVIDIA A100 MIG 3g.20gb", 20 * GiB, 19 * GiB),
        "m2": FakeGpu("MIG-eeee4444", "NVIDIA A100 MIG 2g.10gb", 10 * GiB, 10 * GiB),
    }  # fmt: skip
    for handle, names in broken.items():
        gpus[handle].broken = names
    return FakeNvml(
        gpus=gpus, nvlink={("g0", "g1"), ("g1", "g0")}, p2p={frozenset(("g0", "g1"))}
    ).module()


def test_nvml_inventory_lists_gpus_mig_instances_links_and_pcie() -> None:
    inventory = {d.uuid: d for d in read_nvml_inventory(fake_nvml())}

    assert list(inventory) == [
        "GPU-aaaa0000", "GPU-bbbb1111", "GPU-cccc2222", "MIG-dddd3333", "MIG-eeee4444",
    ]  # fmt: skip
    h100 = inventory["GPU-bbbb1111"]
    assert h100.name == "NVIDIA H100"  # bytes from old drivers decoded
    assert (h100.total_bytes, h100.free_bytes) == (80 * GiB, 70 * GiB)
    assert h100.pcie == {"generation": 1, "width": 16, "max_generation": 5, "max_width": 16}
    assert h100.nvlink_to == ("GPU-aaaa0000",) and h100.p2p_to == ("GPU-aaaa0000",)
    assert inventory["GPU-cccc2222"].mig_mode and inventory["GPU-cccc2222"].nvlink_to == ()
    mig = inventory["MIG-dddd3333"]
    assert (mig.parent_uuid, mig.mig_index, mig.total_bytes) == ("GPU-cccc2222", 0, 20 * GiB)
    assert inventory["MIG-eeee4444"].mig_index == 2  # the empty slot 1 is skipped


def test_devices_are_matched_to_torch_by_uuid_with_peers_and_mig_as_devices() -> None:
    inventory = read_nvml_inventory(fake_nvml())
    # CUDA numbers GPUs differently from NVML, and GPU-aaaa0000 is outside CUDA_VISIBLE_DEVICES.
    by_uuid = {"bbbb1111": 0, "dddd3333": 1, "eeee4444": 2, "aaaa0000": 3}
    found = devices_from_inventory(
        inventory,
        torch_index_by_uuid=by_uuid,
        peer_access=lambda a, b: {a, b} == {0, 3},
        memory_fraction=0.5,
    )
    by_id = {d.id: d for d in found}

    assert list(by_id) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]  # the MIG parent is no device
    assert by_id["cuda:0"].uuid == "GPU-bbbb1111"
    assert by_id["cuda:0"].capacity_bytes == 40 * GiB and by_id["cuda:0"].free_bytes == 70 * GiB
    assert by_id["cuda:0"].peers == ("cuda:3",) and by_id["cuda:0"].nvlink_peers == ("cuda:3",)
    assert by_id["cuda:0"].pcie_gbps == pytest.approx(63.008)  # gen 5 x16, not the idle gen 1
    assert by_id["cuda:1"].mig and by_id["cuda:1"].parent_uuid == "GPU-cccc2222"
    assert by_id["cuda:1"].peers == () and by_id["cuda:1"].capacity_bytes == 10 * GiB
    assert by_id["cuda:1"].torch_device == torch.device("cuda", 1)


def test_a_gpu_torch_cannot_see_is_left_out() -> None:
    found = devices_from_inventory(
        read_nvml_inventory(fake_nvml()),
        torch_index_by_uuid={"bbbb1111": 0},
        peer_access=lambda a, b: True,
        memory_fraction=0.9,
    )
    assert [d.uuid for d in found] == ["GPU-bbbb1111"]
    assert found[0].peers == ()


def test_uuid_and_pcie_helpers() -> None:
    assert normal_uuid("GPU-ABCD-12") == "abcd-12"
    assert normal_uuid("MIG-ab") == "ab"
    assert pcie_gbps({"generation": 4, "width": 8}) == pytest.approx(15.752)
    assert pcie_gbps({"generation": 9, "width": 16}) is None
    assert pcie_gbps({}) is None


def test_without_nvml_the_node_gets_configured_cpu_devices() -> None:
    found = discover_devices(cpu_devices=3, device_memory=5 * GiB)  # no NVML driver here
    assert [d.id for d in found] == ["cpu:0", "cpu:1", "cpu:2"]
    assert all(d.kind == "cpu" and d.capacity_bytes == d.total_bytes == 5 * GiB for d in found)
    assert found[0].peers == ("cpu:1", "cpu:2")  # shared host memory: copies go directly
    assert discover_devices(cpu_devices=1, device_memory=GiB, force_cpu=True)[0].id == "cpu:0"


@pytest.mark.parametrize(("count", "memory"), [(0, GiB), (1, 0)])
def test_cpu_devices_reject_nonsense(count: int, memory: int) -> None:
    with pytest.raises(ValueError, match="--"):
        cpu_devices(count, device_memory=memory)


def test_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(DeviceOutOfMemory("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_host_buffers_without_cuda_are_plain_exact_and_zeroed() -> None:
    buffer, pinned = allocate_host(12345, pin=True)
    assert not pinned  # no CUDA here: pinning is skipped, not an error
    assert buffer.dtype == torch.uint8 and buffer.numel() == 12345
    assert int(buffer.sum()) == 0
    assert allocate_host(0, pin=False)[0].numel() == 0


def test_cpu_transfer_copies_every_group_in_order() -> None:
    backend = CpuBackend(cpu_devices(1, device_memory=GiB)[0])
    src = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    dst, reused = backend.allocate(1000, in_use_bytes=1000)
    assert not reused
    transfer = backend.start_transfer(dst, src, [(0, 10), (10, 500), (500, 1000)])
    transfer.wait_group(0)
    transfer.wait_all()
    assert transfer.done() and torch.equal(dst, src)
    assert transfer.nbytes == 1000 and transfer.seconds is not None


def test_a_failed_copy_fails_every_waiter() -> None:
    class Broken(CpuBackend):
        def _copy_group(self, dst: Any, src: Any, group: int, start: int, end: int) -> None:
            if group == 1:
                raise OSError("bus error")
            super()._copy_group(dst, src, group, start, end)

    backend = Broken(cpu_devices(1, device_memory=GiB)[0])
    transfer = backend.start_transfer(
        torch.zeros(20, dtype=torch.uint8), torch.ones(20, dtype=torch.uint8), [(0, 10), (10, 20)]
    )
    with pytest.raises(TransferFailed, match="bus error"):
        transfer.wait_all()
    with pytest.raises(TransferFailed):
        transfer.wait_group(1)


def test_buffer_pool_reuses_exact_sizes_within_its_budget() -> None:
    pool = BufferPool(budget_bytes=1000)
    first, reused = pool.take(300, in_use_bytes=300)
    assert not reused
    assert pool.give(first, in_use_bytes=0)
    again, reused = pool.take(300, in_use_bytes=300)
    assert reused and again.data_ptr() == first.data_ptr()
    assert pool.give(again, in_use_bytes=0) and pool.pooled_bytes == 300
    # Another size needs room: the pooled buffer is released rather than overrun the budget.
    _, reused = pool.take(800, in_use_bytes=800)
    assert not reused and pool.pooled_bytes == 0
    # A buffer that would push the total past the budget is not kept.
    assert not pool.give(anonymous_buffer(300), in_use_bytes=800)
    assert (pool.reused, pool.allocated) == (1, 2)


def test_anonymous_buffer_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        anonymous_buffer(-1)


# --- review finding 1: NVML ---------------------------------------------------------------------


def test_the_fake_takes_the_real_constants_and_rejects_a_tuple_as_ctypes_does() -> None:
    import ctypes

    import pynvml

    nvml = fake_nvml()
    assert nvml.NVML_P2P_CAPS_INDEX_READ == pynvml.NVML_P2P_CAPS_INDEX_READ == (0,)
    with pytest.raises(ctypes.ArgumentError):  # what the unfixed call did on every 2-GPU node
        nvml.nvmlDeviceGetP2PStatus("g0", "g1", nvml.NVML_P2P_CAPS_INDEX_READ)
    assert nvml_enum(nvml.NVML_P2P_CAPS_INDEX_READ) == 0 and nvml_enum(2) == 2


def test_p2p_reads_are_found_with_the_real_tuple_constant() -> None:
    inventory = {d.uuid: d for d in read_nvml_inventory(fake_nvml())}
    assert inventory["GPU-aaaa0000"].p2p_to == ("GPU-bbbb1111",)
    assert inventory["GPU-bbbb1111"].p2p_to == ("GPU-aaaa0000",)


@pytest.mark.parametrize(
    ("handle", "function"),
    [
        ("g1", "nvmlDeviceGetUUID"),
        ("g1", "nvmlDeviceGetHandleByIndex"),
        ("g1", "nvmlDeviceGetMemoryInfo"),
        ("g1", "nvmlDeviceGetName"),
        ("m0", "nvmlDeviceGetMemoryInfo"),
    ],
)
def test_an_error_on_one_device_leaves_only_that_device_out(handle: str, function: str) -> None:
    uuids = [d.uuid for d in read_nvml_inventory(fake_nvml(**{handle: [function]}))]
    gone = {"g1": "GPU-bbbb1111", "m0": "MIG-dddd3333"}[handle]
    everyone = ["GPU-aaaa0000", "GPU-bbbb1111", "GPU-cccc2222", "MIG-dddd3333", "MIG-eeee4444"]
    assert uuids == [u for u in everyone if u != gone]


def test_a_failing_optional_query_keeps_the_device() -> None:
    inventory = {
        d.uuid: d for d in read_nvml_inventory(fake_nvml(g0=["pcie", "nvmlDeviceGetP2PStatus"]))
    }
    assert inventory["GPU-aaaa0000"].pcie == {} and inventory["GPU-aaaa0000"].p2p_to == ()
    assert inventory["GPU-aaaa0000"].total_bytes == 80 * GiB


def test_memory_info_is_not_asked_of_a_mig_enabled_parent() -> None:
    fake = FakeNvml(gpus=mixed_mig_node().gpus)
    inventory = {d.uuid: d for d in read_nvml_inventory(fake.module())}
    asked = [args[0] for name, args in fake.calls if name == "nvmlDeviceGetMemoryInfo"]
    assert "g0" not in asked and {"g1", "m0", "m1", "m2"} <= set(asked)
    parent = inventory["GPU-0000aaaa"]
    assert parent.mig_mode and parent.total_bytes is None and parent.free_bytes is None
    assert inventory["MIG-2222cccc"].mig_profile == "3g.40gb"
    assert inventory["MIG-3333dddd"].mig_profile == "2g.20gb"


# --- review finding 2: no silent CPU fall-back ----------------------------------------------------


def _inventory() -> list[Any]:
    return read_nvml_inventory(fake_nvml())


def test_nvml_gpus_without_cuda_in_torch_is_a_problem_naming_the_fix() -> None:
    (problem,) = mapping_problems(
        _inventory(), cuda_available=False, torch_uuids=[], visible_devices=None
    )
    assert "has no CUDA" in problem and "--force-cpu" in problem and "TORCH_SPEC" in problem


def test_a_uuid_that_does_not_map_is_a_problem() -> None:
    uuids = ["GPU-aaaa0000", "GPU-bbbb1111", "GPU-ffffffff"]
    problems = mapping_problems(
        _inventory(), cuda_available=True, torch_uuids=uuids, visible_devices="0,1,2"
    )
    assert problems == ["cuda:2 (UUID GPU-ffffffff) matches no GPU NVML reports"]
    unreadable = mapping_problems(
        _inventory(), cuda_available=True, torch_uuids=[None], visible_devices="0"
    )
    assert "cannot read the UUID of cuda:0" in unreadable[0]


def test_a_gpu_hidden_only_by_cuda_visible_devices_is_fine() -> None:
    inventory = _inventory()
    assert (
        mapping_problems(
            inventory, cuda_available=True, torch_uuids=["aaaa0000"], visible_devices="0"
        )
        == []
    )
    problems = mapping_problems(
        inventory, cuda_available=True, torch_uuids=["aaaa0000"], visible_devices=None
    )
    assert problems == [
        "GPU GPU-bbbb1111 (NVIDIA H100) is not visible to torch, and CUDA_VISIBLE_DEVICES "
        "does not hide it"
    ]


def test_discovery_refuses_to_start_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    from gpufaas.gpu_manager import inventory as devices_module

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(devices_module, "read_nvml_inventory", lambda nvml: _inventory())
    # This machine's torch has no CUDA, as on a node where a CPU wheel was installed.
    with pytest.raises(DeviceSetupError, match="has no CUDA"):
        discover_devices(cpu_devices=1, device_memory=GiB)
    forced = discover_devices(cpu_devices=2, device_memory=GiB, force_cpu=True)
    assert [d.id for d in forced] == ["cpu:0", "cpu:1"]

    def broken(nvml: Any) -> list[Any]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(devices_module, "read_nvml_inventory", broken)
    with pytest.raises(DeviceSetupError, match="cannot list the GPUs"):
        discover_devices(cpu_devices=1, device_memory=GiB)


def test_platform_versions_name_torch_its_cuda_and_the_driver() -> None:
    versions = platform_versions()
    assert versions["torch"] == torch.__version__
    assert versions["torch_cuda"] == torch.version.cuda  # None for this CPU wheel
    assert set(versions) == {"torch", "torch_cuda", "driver", "driver_cuda"}


def test_the_makefile_reinstalls_when_the_torch_spec_changes(tmp_path: Any) -> None:
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)

    def dry_run(spec: str) -> str:
        return subprocess.run(
            ["make", "-n", "-C", str(repo), "install", f"VENV={venv}", f"TORCH_SPEC={spec}"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip

    assert 'pip install -q "torch==2.13.0"' in dry_run("torch==2.13.0")
    stamp = subprocess.run(
        ["make", "-s", "-C", str(repo), "torch-stamp", f"VENV={venv}", "TORCH_SPEC=torch==2.13.0"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # As if that spec and the project over it were installed (the project after torch).
    Path(stamp).touch()
    (venv / ".installed").touch()
    later = time.time() + 10
    os.utime(venv / ".installed", (later, later))
    assert "pip install" not in dry_run("torch==2.13.0")
    changed = dry_run("torch==2.11.0")
    assert 'pip install -q "torch==2.11.0"' in changed
    assert "pip install -q -e ." in changed  # the project is re-installed over the new torch


# --- review finding 3: fatal CUDA errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered\nCUDA kernel errors might be reported later",
        "CUDA error: an illegal memory access was encountered",
        "The following operation failed in the TorchScript interpreter.\n"
        "RuntimeError: CUDA error: misaligned address",
        "CUDA error: unspecified launch failure",
    ],
)
def test_sticky_cuda_errors_are_fatal(message: str) -> None:
    assert is_fatal_device_error(RuntimeError(message))
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert is_fatal_device_error(outer)


@pytest.mark.parametrize(
    "message",
    ["CUDA out of memory. Tried to allocate 2 GiB", "index 99 is out of bounds", "shape mismatch"],
)
def test_ordinary_errors_are_not_fatal(message: str) -> None:
    assert not is_fatal_device_error(RuntimeError(message))


def test_node_health_fails_once_and_stays_failed() -> None:
    fatal: list[str] = []
    health = NodeHealth(on_fatal=fatal.append)
    assert health.ready
    first = health.device_failed("cuda:0", RuntimeError("CUDA error: device-side assert triggered"))
    health.device_failed("cuda:1", RuntimeError("CUDA error: an illegal memory access"))
    assert not health.ready and first.device_id == "cuda:0"
    assert fatal == [str(first)] and "device-side assert" in fatal[0]


# --- review findings 7, 8, 9: lanes, honest timing, capacity, allocator ------------------------------


def test_small_loads_take_the_high_priority_lane() -> None:
    assert copy_lane(1 << 20) == "small" and copy_lane(SMALL_LOAD_BYTES) == "small"
    assert copy_lane(SMALL_LOAD_BYTES + 1) == "large"


def test_a_cpu_copy_is_timed_from_its_first_byte_to_its_last() -> None:
    release = threading.Event()
    entered: list[float] = []
    left: list[float] = []

    class Slow(CpuBackend):
        def _copy_group(self, dst: Any, src: Any, group: int, start: int, end: int) -> None:
            entered.append(time.perf_counter())
            if group == 0:
                assert release.wait(10)
            super()._copy_group(dst, src, group, start, end)
            left.append(time.perf_counter())

    backend = Slow(cpu_devices(1, device_memory=GiB)[0])
    src = torch.ones(2000, dtype=torch.uint8)
    dst = torch.zeros(2000, dtype=torch.uint8)
    transfer = backend.start_transfer(dst, src, [(0, 1000), (1000, 2000)])
    assert transfer.seconds is None  # not finished: no figure yet
    release.set()
    transfer.wait_all()
    seconds = transfer.seconds
    assert seconds is not None and isinstance(transfer, CpuTransfer)
    assert transfer.copy_started_at is not None and transfer.copy_finished_at is not None
    # The span is the copy's own: it starts no later than the first byte, ends no earlier
    # than the last, and excludes the time between asking and the copy thread starting.
    assert transfer.started_at <= transfer.copy_started_at <= entered[0]
    assert transfer.copy_finished_at >= left[-1]
    assert seconds == pytest.approx(transfer.copy_finished_at - transfer.copy_started_at)


def test_capacity_is_free_memory_minus_the_measured_reserve() -> None:
    assert cache_capacity(total_bytes=80 * GiB, free_bytes=79 * GiB, reserve_bytes=GiB) == 78 * GiB
    assert (
        cache_capacity(
            total_bytes=80 * GiB, free_bytes=79 * GiB, reserve_bytes=GiB, memory_fraction=0.5
        )
        == 40 * GiB
    )
    assert cache_capacity(total_bytes=GiB, free_bytes=GiB // 2, reserve_bytes=GiB) == 0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")),
        (
            {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
            ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True"),
        ),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, None),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, None),
    ],
)
def test_expandable_segments_are_set_unless_the_operator_chose(
    environ: dict[str, str], expected: tuple[str, str] | None
) -> None:
    assert allocator_conf_update(environ) == expected


def test_configure_process_sets_the_allocator_and_turns_script_fusers_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    saved = (torch._C._jit_texpr_fuser_enabled(), torch._C._jit_can_fuse_on_cpu())
    try:
        # Another test may have run configure_process in this process already.
        torch._C._jit_set_texpr_fuser_enabled(True)
        torch._C._jit_override_can_fuse_on_cpu(True)
        assert script_fusion_possible(torch.device("cpu"))
        configure_process()
        assert not script_fusion_possible(torch.device("cpu"))
        assert not script_fusion_possible(torch.device("cuda", 0))
        import os

        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    finally:
        torch._C._jit_set_texpr_fuser_enabled(saved[0])
        torch._C._jit_override_can_fuse_on_cpu(saved[1])
