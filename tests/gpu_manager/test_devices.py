"""The device layer: NVML discovery parsing, CPU fall-back, CPU copies, memory pools."""

from __future__ import annotations

import types
from collections.abc import Collection
from typing import Any

import pytest
import torch
from fake_nvml import FakeGpu, FakeNvml

from gpufaas.gpu_manager.devices import (
    CpuBackend,
    DeviceOutOfMemory,
    TransferFailed,
    allocate_host,
    cpu_devices,
    devices_from_inventory,
    discover_devices,
    is_out_of_memory,
    normal_uuid,
    pcie_gbps,
    read_nvml_inventory,
)
from gpufaas.gpu_manager.memory import BufferPool, anonymous_buffer

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
