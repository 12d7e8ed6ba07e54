"""The devices this node serves on: discovery, and each device's cache capacity.

Discovery starts from NVML's inventory (:mod:`gpufaas.gpu_manager.nvml`): GPUs are matched to
torch's CUDA ordinals by UUID (NVML counts in PCI order, CUDA may not), and a GPU's cache capacity
is its free memory at start-up minus a reserve measured by warming its compute streams. Without
NVML or CUDA, the node gets ``cpu_devices`` CPU stand-ins with a configured memory budget, so the
rest of the GPU manager runs unchanged on a laptop or in CI. When NVML sees GPUs this process
cannot serve, :class:`DeviceSetupError` says why: never a silent fall-back to the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from gpufaas.gpu_manager.nvml import NvmlDevice, normal_uuid, pcie_gbps, read_nvml_inventory

__all__ = [
    "ALLOCATOR_SLACK_BYTES",
    "DeviceInfo",
    "DeviceKind",
    "DeviceSetupError",
    "cache_capacity",
    "cpu_devices",
    "devices_from_inventory",
    "discover_devices",
    "mapping_problems",
    "measure_cuda_reserve",
]

logger = logging.getLogger(__name__)

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class DeviceInfo:
    """One schedulable device: a GPU, a MIG instance, or a CPU stand-in."""

    id: str  # stable within the node: "cuda:0", "cpu:1"
    kind: DeviceKind
    index: int  # torch's ordinal for CUDA; a counter for CPU stand-ins
    name: str
    uuid: str
    total_bytes: int
    capacity_bytes: int  # what the model cache may use on it
    free_bytes: int | None = None  # free at discovery (NVML); None for CPU stand-ins
    pcie: dict[str, int] = field(
        default_factory=dict
    )  # generation, width, max_generation, max_width
    pcie_gbps: float | None = None  # per-direction limit of the widest, fastest link it supports
    peers: tuple[str, ...] = ()  # devices whose memory this one can copy from directly
    nvlink_peers: tuple[str, ...] = ()  # the subset of peers joined by NVLink
    mig: bool = False  # a MIG instance (its parent GPU is not a device itself)
    parent_uuid: str | None = None
    mig_profile: str | None = None  # "3g.40gb" for a MIG instance
    reserve_bytes: int = 0  # measured at start-up and left out of the capacity (CUDA)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index) if self.kind == "cuda" else torch.device("cpu")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- discovery ------------------------------------------------------------------------------------


class DeviceSetupError(Exception):
    """NVML sees GPUs this process cannot use as it should: the manager refuses to start.

    Serving on the CPU by accident (a CPU-only torch on a GPU node, a GPU torch cannot map) would
    be slow and silent; ``--force-cpu`` is the explicit way to run on CPU devices anyway.
    """


def mapping_problems(
    inventory: Sequence[NvmlDevice],
    *,
    cuda_available: bool,
    torch_uuids: Sequence[str | None],
    visible_devices: str | None,
) -> list[str]:
    """Why the GPUs NVML sees cannot be served as they are (empty: they can).

    ``torch_uuids`` holds, per CUDA ordinal, the UUID torch reports (None where it could not be
    read). A GPU missing from torch is expected only while ``CUDA_VISIBLE_DEVICES`` hides it; a
    MIG instance may be missing too (CUDA enumerates only the instances it is given).
    """
    if not inventory:
        return []
    if not cuda_available:
        return [
            f"NVML sees {len(inventory)} GPU(s) but this torch ({torch.__version__}) has no "
            "CUDA: install a CUDA build (make up TORCH_SPEC='torch==<version>' with the CUDA "
            "index), or pass --force-cpu to serve on CPU devices"
        ]
    problems = []
    known = {normal_uuid(d.uuid) for d in inventory}
    for index, uuid in enumerate(torch_uuids):
        if uuid is None:
            problems.append(f"torch cannot read the UUID of cuda:{index}")
        elif normal_uuid(uuid) not in known:
            problems.append(f"cuda:{index} (UUID {uuid}) matches no GPU NVML reports")
    mapped = {normal_uuid(u) for u in torch_uuids if u is not None}
    if visible_devices is None:
        for device in inventory:
            if device.mig_mode or device.mig_index is not None:
                continue
            if normal_uuid(device.uuid) not in mapped:
                problems.append(
                    f"GPU {device.uuid} ({device.name}) is not visible to torch, and "
                    "CUDA_VISIBLE_DEVICES does not hide it"
                )
    if not mapped & known:
        problems.append("no GPU NVML reports is visible to torch")
    return problems


def devices_from_inventory(
    inventory: Sequence[NvmlDevice],
    *,
    torch_index_by_uuid: Mapping[str, int],
    peer_access: Callable[[int, int], bool],
    memory_fraction: float,
) -> list[DeviceInfo]:
    """The devices this process can run on: GPUs not split by MIG, and MIG instances.

    A device is matched to torch's ordinal by UUID; one torch cannot see (outside
    ``CUDA_VISIBLE_DEVICES``) is left out. ``peers`` are the devices ``peer_access`` (torch's
    ``can_device_access_peer``) allows; ``nvlink_peers`` those of them NVML reports NVLink to.
    The capacity here is ``memory_fraction`` of the device; :func:`discover_devices` replaces it
    with a measured one on a real GPU.
    """
    usable = [d for d in inventory if not d.mig_mode]
    matched: list[tuple[NvmlDevice, int]] = []
    for device in usable:
        index = torch_index_by_uuid.get(normal_uuid(device.uuid))
        if index is None:
            logger.info("GPU %s (%s) is not visible to this process", device.uuid, device.name)
        else:
            matched.append((device, index))
    result = []
    for device, index in matched:
        peers, nvlink = [], []
        for other, other_index in matched:
            if other is device or device.mig_index is not None or other.mig_index is not None:
                continue  # MIG instances have no peer-to-peer access
            if peer_access(index, other_index):
                peers.append(f"cuda:{other_index}")
                if other.uuid in device.nvlink_to:
                    nvlink.append(f"cuda:{other_index}")
        total = device.total_bytes or 0
        result.append(
            DeviceInfo(
                id=f"cuda:{index}",
                kind="cuda",
                index=index,
                name=device.name,
                uuid=device.uuid,
                total_bytes=total,
                capacity_bytes=int(total * memory_fraction),
                free_bytes=device.free_bytes,
                pcie=dict(device.pcie),
                pcie_gbps=pcie_gbps(device.pcie),
                peers=tuple(peers),
                nvlink_peers=tuple(nvlink),
                mig=device.mig_index is not None,
                parent_uuid=device.parent_uuid,
                mig_profile=device.mig_profile,
            )
        )
    return sorted(result, key=lambda d: d.index)


def cpu_devices(count: int, *, device_memory: int) -> list[DeviceInfo]:
    """CPU stand-ins; they share host memory, so each can copy from every other."""
    if count < 1:
        raise ValueError(f"--cpu-devices must be at least 1, got {count}")
    if device_memory < 1:
        raise ValueError(f"--device-memory must be positive, got {device_memory}")
    ids = [f"cpu:{i}" for i in range(count)]
    return [
        DeviceInfo(
            id=ids[i],
            kind="cpu",
            index=i,
            name="cpu",
            uuid=f"cpu-{i}",
            total_bytes=device_memory,
            capacity_bytes=device_memory,
            peers=tuple(p for p in ids if p != ids[i]),
        )
        for i in range(count)
    ]


def discover_devices(
    *,
    cpu_devices: int = 1,
    device_memory: int = 4 * 2**30,
    memory_fraction: float = 1.0,
    force_cpu: bool = False,
    compute_streams: int = 4,
) -> list[DeviceInfo]:
    """The node's GPUs via NVML, or ``cpu_devices`` CPU stand-ins of ``device_memory`` bytes.

    CPU stand-ins are used when there is no NVML (no driver) or with ``force_cpu``. When NVML
    sees GPUs that torch cannot serve, :class:`DeviceSetupError` says why: never a silent
    fall-back to the CPU. A GPU's cache capacity is its free memory at start-up minus a reserve
    measured by warming ``compute_streams`` streams (at most ``memory_fraction`` of the GPU).
    """
    if not force_cpu:
        gpus = _discover_nvml(memory_fraction=memory_fraction, compute_streams=compute_streams)
        if gpus:
            return gpus
    return _cpu_devices(cpu_devices, device_memory=device_memory)


_cpu_devices = cpu_devices  # the parameter of discover_devices shadows the function's name


def _discover_nvml(*, memory_fraction: float, compute_streams: int) -> list[DeviceInfo]:
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        logger.info("NVML unavailable (%s); using CPU devices", e)
        return []
    try:
        inventory = read_nvml_inventory(pynvml)
    except pynvml.NVMLError as e:
        raise DeviceSetupError(
            f"NVML is present but cannot list the GPUs ({e}); fix the driver, or pass "
            "--force-cpu to serve on CPU devices"
        ) from None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not inventory:
        return []
    torch_uuids = _torch_cuda_uuids() if torch.cuda.is_available() else []
    problems = mapping_problems(
        inventory,
        cuda_available=torch.cuda.is_available(),
        torch_uuids=torch_uuids,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if problems:
        raise DeviceSetupError(
            "refusing to start: " + "; ".join(problems) + " (--force-cpu serves on CPU devices)"
        )
    by_uuid = {normal_uuid(u): i for i, u in enumerate(torch_uuids) if u is not None}
    devices = devices_from_inventory(
        inventory,
        torch_index_by_uuid=by_uuid,
        peer_access=torch.cuda.can_device_access_peer,
        memory_fraction=memory_fraction,
    )
    devices = [
        _with_measured_capacity(d, memory_fraction=memory_fraction, streams=compute_streams)
        for d in devices
    ]
    for device in devices:
        logger.info(
            "%s: %s, %d MiB, cache %d MiB (reserve %d MiB measured), PCIe %s, peers %s",
            device.id,
            device.name,
            device.total_bytes >> 20,
            device.capacity_bytes >> 20,
            device.reserve_bytes >> 20,
            device.pcie,
            ", ".join(device.peers) or "none",
        )
    return devices


def _torch_cuda_uuids() -> list[str | None]:
    uuids: list[str | None] = []
    for index in range(torch.cuda.device_count()):
        try:
            uuids.append(str(torch.cuda.get_device_properties(index).uuid))
        except Exception:  # reported by mapping_problems
            uuids.append(None)
    return uuids


# --- capacity ------------------------------------------------------------------------------------

# Allocator rounding and fragmentation the measurement cannot see (2 MiB pages per segment).
ALLOCATOR_SLACK_BYTES = 256 << 20


def cache_capacity(
    *, total_bytes: int, free_bytes: int, reserve_bytes: int, memory_fraction: float = 1.0
) -> int:
    """The bytes a device's model cache may use: free at start-up minus the measured reserve,
    and at most ``memory_fraction`` of the device."""
    return max(0, min(int(total_bytes * memory_fraction), free_bytes - reserve_bytes))


def _with_measured_capacity(
    info: DeviceInfo, *, memory_fraction: float, streams: int
) -> DeviceInfo:
    free, total, reserve = measure_cuda_reserve(info.index, streams=streams)
    return dataclasses.replace(
        info,
        total_bytes=total,
        free_bytes=free,
        reserve_bytes=reserve,
        capacity_bytes=cache_capacity(
            total_bytes=total,
            free_bytes=free,
            reserve_bytes=reserve,
            memory_fraction=memory_fraction,
        ),
    )


def measure_cuda_reserve(index: int, *, streams: int) -> tuple[int, int, int]:
    """``(free before warm-up, total, reserve)`` for one GPU, CUDA only.

    The reserve is what warming up costs, measured with ``mem_get_info``: the CUDA context is
    created first, then a cuBLAS matmul (its handle and workspace, one per stream) runs on each
    of ``streams`` compute streams, and the allocator's rounding slack is added.
    """
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        torch.empty(1, device=device)  # the context: not ours to count
        free_before, total = torch.cuda.mem_get_info(device)
        for _ in range(max(1, streams)):
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(stream):
                a = torch.ones(256, 256, device=device, dtype=torch.float16)
                (a @ a).sum().item()
        torch.cuda.synchronize(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        # Hand the warm-up's workspaces back: the manager's own compute streams take theirs.
        with contextlib.suppress(AttributeError, RuntimeError):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
    return int(free_before), int(total), max(0, free_before - free_after) + ALLOCATOR_SLACK_BYTES
