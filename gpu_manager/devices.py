"""The device layer: the one place that knows about CUDA and NVML.

Discovery reads NVML: every GPU with its UUID, name, total and free memory, PCIe link, which pairs
have NVLink or peer-to-peer access, and MIG instances, each of which becomes a device of its own.
GPUs are matched to torch's CUDA ordinals by UUID (NVML counts in PCI order, CUDA may not).
Without NVML or CUDA, the node gets ``cpu_devices`` CPU stand-ins with a configured memory budget,
so the rest of the GPU manager runs unchanged on a laptop or in CI.

A :class:`DeviceBackend` per device does everything device-specific the loader and the runtime
need: allocate an arena, copy an arena in forward-order groups with one event per group
(:class:`Transfer`), and give each request its own compute context. :class:`CudaBackend` copies on a
dedicated copy stream with non-blocking copies from page-locked memory and records a CUDA event per
group; compute runs on per-request streams that wait on a group's event before using it (as in
PipeSwitch). :class:`CpuBackend` runs the same protocol with a copy thread, plain copies and
``threading.Event`` s, so every code path above this layer is exercised on the CPU.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from gpufaas.gpu_manager.memory import BufferPool, anonymous_buffer

logger = logging.getLogger(__name__)

DeviceKind = Literal["cuda", "cpu"]

# Usable bandwidth per lane and direction after line coding, GB/s, by PCIe generation.
PCIE_LANE_GBPS: Mapping[int, float] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}

TRANSFER_TIMEOUT_S = (
    600.0  # a copy that takes longer is reported as failed, never waited on forever
)


class DeviceOutOfMemory(Exception):
    """A device (or host) allocation failed: the caller answers with a clear error and keeps serving."""


class TransferFailed(Exception):
    """Copying a model's weights to a device failed; the message says why."""


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


@dataclass(frozen=True)
class NvmlDevice:
    """What NVML reports about one GPU or MIG instance."""

    uuid: str
    name: str
    total_bytes: int | None  # None for a MIG-enabled parent: reading it needs privilege
    free_bytes: int | None
    pcie: dict[str, int]
    gpu_index: int  # NVML's index of the physical GPU
    mig_index: int | None = None  # slot of a MIG instance on its GPU
    parent_uuid: str | None = None
    mig_mode: bool = False  # a physical GPU split into MIG instances
    nvlink_to: tuple[str, ...] = ()  # physical GPUs (UUIDs) reachable over NVLink
    p2p_to: tuple[str, ...] = ()  # physical GPUs (UUIDs) readable peer to peer

    @property
    def mig_profile(self) -> str | None:
        """The MIG profile of an instance ("3g.40gb"), read from its name; None for a GPU."""
        if self.mig_index is None:
            return None
        found = re.search(r"(\d+g\.\d+gb)", self.name, flags=re.IGNORECASE)
        return found.group(1).lower() if found else None


def read_nvml_inventory(nvml: Any) -> list[NvmlDevice]:
    """Every GPU and MIG instance NVML sees. ``nvml`` is the ``pynvml`` module, initialised.

    Only a failing device count raises (``nvml.NVMLError``). A GPU whose handle or UUID cannot be
    read is left out with a warning; optional facts a driver does not give (PCIe, MIG mode, P2P,
    a MIG-enabled parent's memory, which needs privilege) are left out of that device alone.
    """
    handles: list[tuple[int, Any, str]] = []  # (NVML index, handle, uuid)
    for i in range(int(nvml.nvmlDeviceGetCount())):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            handles.append((i, handle, _text(nvml.nvmlDeviceGetUUID(handle))))
        except nvml.NVMLError as e:
            logger.warning("NVML cannot read GPU %d (%s); it is left out", i, e)
    devices: list[NvmlDevice] = []
    for i, handle, uuid in handles:
        try:
            devices.extend(_read_gpu(nvml, i, handle, uuid, handles))
        except nvml.NVMLError as e:
            logger.warning("NVML failed on GPU %d (%s): %s; it is left out", i, uuid, e)
    return devices


def _read_gpu(
    nvml: Any, index: int, handle: Any, uuid: str, handles: Sequence[tuple[int, Any, str]]
) -> list[NvmlDevice]:
    pcie = _pcie(nvml, handle)
    mig_mode = _mig_enabled(nvml, handle)
    nvlink, p2p = [], []
    if not mig_mode:  # MIG instances have no peer-to-peer access
        for j, other, other_uuid in handles:
            if j == index:
                continue
            if _p2p_ok(nvml, handle, other, "NVML_P2P_CAPS_INDEX_NVLINK"):
                nvlink.append(other_uuid)
            if _p2p_ok(nvml, handle, other, "NVML_P2P_CAPS_INDEX_READ"):
                p2p.append(other_uuid)
    total: int | None = None
    free: int | None = None
    if not mig_mode:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, free = int(memory.total), int(memory.free)
    gpu = NvmlDevice(
        uuid=uuid,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=total,
        free_bytes=free,
        pcie=pcie,
        gpu_index=index,
        mig_mode=mig_mode,
        nvlink_to=tuple(nvlink),
        p2p_to=tuple(p2p),
    )
    if not mig_mode:
        return [gpu]
    return [gpu, *_mig_instances(nvml, handle, gpu_index=index, parent=uuid, pcie=pcie)]


def _mig_instances(
    nvml: Any, handle: Any, *, gpu_index: int, parent: str, pcie: dict[str, int]
) -> Iterator[NvmlDevice]:
    try:
        slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except nvml.NVMLError:
        return
    for slot in range(slots):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # an empty slot
            continue
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(mig)
            yield NvmlDevice(
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                name=_text(nvml.nvmlDeviceGetName(mig)),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
                pcie=pcie,  # instances share their GPU's link
                gpu_index=gpu_index,
                mig_index=slot,
                parent_uuid=parent,
            )
        except nvml.NVMLError as e:
            logger.warning("NVML failed on MIG slot %d of %s: %s; it is left out", slot, parent, e)


def _pcie(nvml: Any, handle: Any) -> dict[str, int]:
    queries = {
        "generation": "nvmlDeviceGetCurrPcieLinkGeneration",
        "width": "nvmlDeviceGetCurrPcieLinkWidth",
        "max_generation": "nvmlDeviceGetMaxPcieLinkGeneration",
        "max_width": "nvmlDeviceGetMaxPcieLinkWidth",
    }
    pcie = {}
    for key, function in queries.items():
        with contextlib.suppress(nvml.NVMLError, AttributeError):
            pcie[key] = int(getattr(nvml, function)(handle))
    return pcie


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (nvml.NVMLError, AttributeError):  # not a MIG-capable GPU
        return False
    return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)


def nvml_enum(value: Any) -> int:
    """An NVML enum constant as the plain ``int`` its C function takes.

    nvidia-ml-py defines some constants with a stray comma (``NVML_P2P_CAPS_INDEX_READ = 0,``
    is the tuple ``(0,)``); ctypes cannot pass a tuple and raises ``ArgumentError``.
    """
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    return int(value)


def _p2p_ok(nvml: Any, a: Any, b: Any, capability: str) -> bool:
    try:
        status = nvml.nvmlDeviceGetP2PStatus(a, b, nvml_enum(getattr(nvml, capability)))
    except (nvml.NVMLError, AttributeError, TypeError, ctypes.ArgumentError) as e:
        logger.debug("P2P query %s failed: %s", capability, e)
        return False
    return bool(status == nvml_enum(nvml.NVML_P2P_STATUS_OK))


def pcie_gbps(pcie: Mapping[str, int]) -> float | None:
    """The per-direction limit of a PCIe link: the best it negotiates, not its idle state."""
    generation = pcie.get("max_generation", pcie.get("generation"))
    width = pcie.get("max_width", pcie.get("width"))
    if generation is None or width is None or generation not in PCIE_LANE_GBPS:
        return None
    return round(PCIE_LANE_GBPS[generation] * width, 3)


def normal_uuid(uuid: str) -> str:
    """A UUID as torch prints it: NVML's ``GPU-``/``MIG-`` prefix dropped, lower case."""
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix) :]
    return uuid


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


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- versions and process set-up -------------------------------------------------------------------


@functools.cache
def platform_versions() -> dict[str, str | None]:
    """torch, the CUDA it was built for, and the driver: for the start-up log and the state."""
    versions: dict[str, str | None] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": None,
        "driver_cuda": None,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver: the versions say so
        return versions
    try:
        with contextlib.suppress(Exception):
            versions["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        with contextlib.suppress(Exception):
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            versions["driver_cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return versions


EXPANDABLE_SEGMENTS = "expandable_segments:True"
_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_conf_update(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The allocator setting to export so the caching allocator grows segments in place.

    Expandable segments map more physical memory into one segment instead of cutting a new
    one per size, so freed arenas of different sizes do not strand memory. An operator's own
    choice (either variable naming ``expandable_segments``) is kept. torch 2.9 reads
    ``expandable_segments`` only from ``PYTORCH_CUDA_ALLOC_CONF`` (pytorch#183387), so that is
    the one set. Returns ``(variable, value)`` to set, or None.
    """
    for var in _ALLOC_CONF_VARS:
        if "expandable_segments" in environ.get(var, ""):
            return None
    existing = environ.get("PYTORCH_CUDA_ALLOC_CONF", "").strip().strip(",")
    value = f"{existing},{EXPANDABLE_SEGMENTS}" if existing else EXPANDABLE_SEGMENTS
    return "PYTORCH_CUDA_ALLOC_CONF", value


def configure_process() -> None:
    """Process-wide torch settings for serving. Call before anything touches CUDA.

    * expandable segments for the caching allocator (:func:`allocator_conf_update`);
    * no TorchScript fusers: a fused kernel reads weights without an aten dispatch, so the
      arrival gate could not make it wait for its layer (see :func:`script_fusion_possible`).
    """
    update = allocator_conf_update(os.environ)
    if update is not None:
        os.environ[update[0]] = update[1]
    disable_script_fusers()


def disable_script_fusers() -> None:
    torch._C._jit_set_texpr_fuser_enabled(False)
    torch._C._jit_override_can_fuse_on_gpu(False)
    torch._C._jit_override_can_fuse_on_cpu(False)


def script_fusion_possible(device: torch.device) -> bool:
    """Whether TorchScript may run fused kernels on ``device`` (which bypass dispatch modes)."""
    if not torch._C._jit_texpr_fuser_enabled():
        return False
    if device.type == "cuda":
        return bool(torch._C._jit_can_fuse_on_gpu())
    return bool(torch._C._jit_can_fuse_on_cpu())


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


# --- memory ---------------------------------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def allocate_host(nbytes: int, *, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host buffer of exactly ``nbytes``, page-locked when ``pin`` and CUDA is present.

    Returns the ``uint8`` tensor and whether it is page-locked. The memory is registered with
    ``cudaHostRegister`` rather than taken from torch's pinned allocator, which rounds every
    allocation up to a power of two; it is unregistered when the tensor is freed.
    """
    try:
        buffer = anonymous_buffer(nbytes)
    except MemoryError as e:
        raise DeviceOutOfMemory(str(e)) from None
    if not pin or nbytes == 0 or not torch.cuda.is_available():
        return buffer, False
    pointer = buffer.data_ptr()
    error = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
        pointer, nbytes, 0
    )
    if int(error) != 0:
        logger.warning(
            "cannot page-lock %d bytes (CUDA error %s); using pageable memory", nbytes, error
        )
        return buffer, False
    weakref.finalize(buffer, _unregister_host, pointer)
    return buffer, True


_CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context, not only the current one


def stage_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A request's host tensor, ready for its copy to ``device``.

    On a CUDA device: copied once into pinned memory from torch's caching host allocator, so the
    host-to-device copy that follows is a real asynchronous DMA (a pageable source makes the
    driver stage it through its own buffer, synchronously); the allocator reuses a staging
    block only once the copies that read it are done. Anywhere else: the tensor itself, no copy.
    """
    if device.type != "cuda" or tensor.is_pinned():
        return tensor
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staged.copy_(tensor)
    return staged


def pinned_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
    """An array in pinned host memory from torch's caching host allocator, for a request's
    tensor on a CUDA host: decoded straight into it (``decode_request(allocate=...)``), it goes
    to the device with no staging copy (:func:`stage_for` passes a pinned tensor through). The
    array holds its block; the request's compute stream is synchronized before the request (and
    so the array) ends, so the block is never reused while its copy is in flight."""
    return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True).numpy()


@functools.cache
def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def register_host(pointer: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` of host memory at ``pointer`` for all GPUs; False if CUDA refuses
    (or is absent). Blocking, and slow for large ranges (every page is faulted in and locked):
    done once per node at start-up, never per refill. Undo with :func:`unregister_host`."""
    if nbytes == 0 or not torch.cuda.is_available():
        return False
    error = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
        pointer, nbytes, _CUDA_HOST_REGISTER_PORTABLE
    )
    if int(error) != 0:
        logger.warning("cannot page-lock %d bytes (CUDA error %s)", nbytes, error)
        return False
    return True


def unregister_host(pointer: int) -> None:
    _unregister_host(pointer)


def _unregister_host(pointer: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(pointer)  # type: ignore[no-untyped-call]


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure on a device or the host (never a crash to propagate)."""
    if isinstance(error, DeviceOutOfMemory | MemoryError | torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


# --- fatal device errors ----------------------------------------------------------------------------

# CUDA errors that leave the context unusable ("sticky"): every later call on it fails too.
_STICKY_CUDA_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "hardware stack error",
    "invalid program counter",
    "the launch timed out and was terminated",
    "cudaerrorassert",
    "cudaerrorillegaladdress",
)

EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: the supervisor restarts the manager
_FORCE_EXIT_AFTER_S = 15.0  # a graceful shutdown stuck on a dead GPU is cut short


class DeviceFailed(Exception):
    """A device's CUDA context is poisoned: the node stops serving and the process exits."""

    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"device {device_id} failed: {message}")
        self.device_id = device_id


def is_fatal_device_error(error: BaseException) -> bool:
    """True for a sticky CUDA error (device-side assert, illegal memory access, ...).

    TorchScript wraps the error in its own RuntimeError and puts the CUDA message inside, so
    the whole message is searched, and so are chained causes.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DeviceFailed):
            return True
        message = str(current).lower()
        if any(marker in message for marker in _STICKY_CUDA_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False


def terminate_process(message: str) -> None:
    """Stop serving: SIGTERM to ourselves (uvicorn shuts down and the process exits non-zero),
    and a hard exit with :data:`EXIT_DEVICE_FAILED` if that has not happened in 15 s."""
    timer = threading.Timer(_FORCE_EXIT_AFTER_S, os._exit, (EXIT_DEVICE_FAILED,))
    timer.daemon = True
    timer.start()
    signal.raise_signal(signal.SIGTERM)


class NodeHealth:
    """Whether this node may serve. A fatal device error makes it not ready, for good.

    The first :meth:`device_failed` logs, records the failure and calls ``on_fatal`` once (by
    default :func:`terminate_process`): the supervisor restarts the manager, and the gateway,
    seeing 503s and a failing readiness probe, retries elsewhere meanwhile.
    """

    def __init__(self, *, on_fatal: Callable[[str], None] = terminate_process) -> None:
        self._on_fatal = on_fatal
        self._lock = threading.Lock()
        self.failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.failure is None

    def device_failed(self, device_id: str, error: BaseException) -> DeviceFailed:
        """Record a fatal error on ``device_id``; returns the exception to answer with."""
        failed = (
            error
            if isinstance(error, DeviceFailed)
            else DeviceFailed(device_id, _first_line(error))
        )
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = str(failed)
        if first:
            logger.critical("%s; the node is not ready and the manager exits", failed)
            self._on_fatal(str(failed))
        return failed


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = next(
        (line for line in lines if any(m in line.lower() for m in _STICKY_CUDA_ERRORS)), None
    )
    return (marker or (lines[0] if lines else type(error).__name__))[:300]


# --- copies and compute ---------------------------------------------------------------------------


class Transfer(abc.ABC):
    """One model's arena being copied onto a device, group by group in forward order.

    A compute context calls :meth:`wait_group` before it touches a group's weights: on CUDA
    that makes its stream wait on the group's event (the host does not block); on the CPU it
    blocks until the copy thread has copied the group.
    """

    def __init__(self, groups: Sequence[tuple[int, int]]) -> None:
        self.groups = tuple(groups)
        self.started_at = time.perf_counter()  # when the copy was asked for
        self.finished_at: float | None = None  # when the host saw it finish

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.groups)

    @abc.abstractmethod
    def wait_group(self, group: int) -> None: ...

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether every group has landed (or the copy failed)."""

    @abc.abstractmethod
    def wait_all(self) -> None:
        """Block until every group has landed; raise :class:`TransferFailed` if the copy failed."""

    @property
    def seconds(self) -> float | None:
        """How long the copy itself ran, from its first byte to its last; None until done.

        Measured where the copy runs (CUDA events on the copy stream, timestamps in the copy
        thread), so neither issuing, queueing behind other copies, nor a late look at the
        result counts: the bandwidth ``nbytes / seconds`` is not inflated or deflated.
        """
        return None if self.finished_at is None else self.finished_at - self.started_at


class DeviceBackend(abc.ABC):
    """Everything device-specific that loading and running a model needs."""

    alignment = 64  # byte alignment of each storage inside an arena
    min_group_bytes = 0  # copies smaller than this are merged with the next layer's
    tracks_memory = False  # whether peak_bytes_during measures anything

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info

    @property
    def device(self) -> torch.device:
        return self.info.torch_device

    @abc.abstractmethod
    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        """An arena of ``nbytes`` on the device, and whether it was re-used memory.

        Raises :class:`DeviceOutOfMemory` when the device cannot hold it.
        """

    @abc.abstractmethod
    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """An arena nobody uses any more (the caller drops its references too)."""

    @abc.abstractmethod
    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        """Start copying ``src[a:b]`` to ``dst[a:b]`` for each group, in order.

        ``src`` is a host arena, or another device's arena when ``source`` is that device.
        """

    @abc.abstractmethod
    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The context one request computes in (its own stream on CUDA)."""

    def memory_allocated(self) -> int | None:
        """Bytes the device allocator holds for tensors now; None where it is not tracked."""
        return None

    def pooled_bytes(self) -> int:
        """Freed arenas kept for re-use (counted against the device's capacity)."""
        return 0

    def memory_reserved(self) -> int | None:
        """Bytes the device allocator holds from the driver; None where it is not tracked."""
        return None

    def peak_bytes_during(self, work: Callable[[], object]) -> int | None:
        """Run ``work`` and return the most device memory it held above what was allocated
        before; None where the device does not track it (CPU stand-ins: the probe's dispatch
        measurement stands). Blocking."""
        work()
        return None

    @abc.abstractmethod
    def trim(self) -> None:
        """Give cached free memory back (after an out-of-memory). Blocking: run in a thread."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all work on the device."""


def _copied(group: int, start: int, end: int) -> None:
    raise AssertionError("this transfer has finished")


class CpuTransfer(Transfer):
    def __init__(
        self,
        groups: Sequence[tuple[int, int]],
        copy_group: Callable[[int, int, int], None],
    ) -> None:
        super().__init__(groups)
        self._copy_group = copy_group
        self._landed = [threading.Event() for _ in self.groups]
        self._finished = threading.Event()
        self.error: BaseException | None = None
        self.copy_started_at: float | None = None  # the copy thread's first byte
        self.copy_finished_at: float | None = None  # and its last
        self._thread = threading.Thread(target=self._run, name="gpufaas-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.copy_started_at = time.perf_counter()
            for group, (start, end) in enumerate(self.groups):
                self._copy_group(group, start, end)
                self._landed[group].set()
            self.copy_finished_at = time.perf_counter()
        except BaseException as e:  # reported to every waiter
            self.error = e
        finally:
            # Drop the copy (it holds both arenas): a finished transfer kept by its model must
            # not keep a host arena's slab range, or a device arena, alive.
            self._copy_group = _copied
            self.finished_at = time.perf_counter()
            for event in self._landed:
                event.set()
            self._finished.set()

    @property
    def seconds(self) -> float | None:
        if self.copy_started_at is None or self.copy_finished_at is None:
            return None
        return self.copy_finished_at - self.copy_started_at

    def wait_group(self, group: int) -> None:
        if not self._landed[group].wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(
                f"layer group {group} did not arrive in {TRANSFER_TIMEOUT_S:.0f} s"
            )
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")

    def done(self) -> bool:
        return self._finished.is_set()

    def wait_all(self) -> None:
        if not self._finished.wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(f"the weights did not arrive in {TRANSFER_TIMEOUT_S:.0f} s")
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")


class CpuBackend(DeviceBackend):
    """A CPU stand-in: its "device memory" is host memory, a copy is a memcpy on a copy thread.

    Freed arenas are pooled for re-use within the device's capacity, as the CUDA caching
    allocator keeps device memory.
    """

    min_group_bytes = 64 << 10  # below this, waking the compute thread costs more than it saves

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.pool = BufferPool(budget_bytes=info.capacity_bytes)

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.pool.take(nbytes, in_use_bytes=in_use_bytes)
        except MemoryError as e:
            raise DeviceOutOfMemory(f"{self.info.id}: {e}") from None

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        self.pool.give(arena, in_use_bytes=in_use_bytes)

    def pooled_bytes(self) -> int:
        return self.pool.pooled_bytes

    def trim(self) -> None:
        self.pool.trim()

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        return CpuTransfer(groups, lambda group, a, b: self._copy_group(dst, src, group, a, b))

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        dst[start:end].copy_(src[start:end])

    def compute(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Copies and compute are synchronous on the CPU: nothing to wait for."""


class CudaTransfer(Transfer):
    """A copy on one CUDA copy stream: an event per group, and two timing events around it."""

    def __init__(
        self,
        groups: Sequence[tuple[int, int]],
        events: Sequence[Any],
        device: torch.device,
        *,
        timing: tuple[Any, Any] | None = None,
    ) -> None:
        super().__init__(groups)
        self._events = list(events)
        self._device = device
        self._timing = timing  # (start, end) events with timing, on the copy stream

    def wait_group(self, group: int) -> None:
        # Every event was recorded before this transfer was handed out, so the wait is never
        # on an unrecorded event (which CUDA would treat as already complete).
        torch.cuda.current_stream(self._device).wait_event(self._events[group])

    def done(self) -> bool:
        finished = not self._events or bool(self._events[-1].query())
        if finished and self.finished_at is None:
            self.finished_at = time.perf_counter()
        return finished

    def wait_all(self) -> None:
        try:
            if self._events:
                self._events[-1].synchronize()  # one stream: the last event implies the rest
        except RuntimeError as e:
            if is_fatal_device_error(e):
                raise DeviceFailed(str(self._device), _first_line(e)) from e
            raise TransferFailed(f"copying the weights failed: {e}") from None
        finally:
            if self.finished_at is None:
                self.finished_at = time.perf_counter()

    @property
    def seconds(self) -> float | None:
        if self._timing is None or self.finished_at is None:
            return None
        start, end = self._timing
        try:
            return float(start.elapsed_time(end)) / 1000.0  # ms between the events, on the GPU
        except RuntimeError:  # not both recorded and complete
            return None


# Loads up to this size go on the high-priority copy lane, so a small cold model does not
# queue behind a large one on one stream (copies on different streams share the copy engines).
SMALL_LOAD_BYTES = 256 << 20


def copy_lane(
    nbytes: int, *, small_load_bytes: int = SMALL_LOAD_BYTES
) -> Literal["small", "large"]:
    """Which copy stream a load of ``nbytes`` goes on."""
    return "small" if nbytes <= small_load_bytes else "large"


class CudaBackend(DeviceBackend):
    """A GPU: arenas from torch's caching allocator, copies on two copy streams (lanes).

    Host-to-device copies come from page-locked host arenas, issued ``non_blocking`` on a copy
    stream, one event recorded after each group, with a timing event before the first and after
    the last. Small loads use a high-priority lane and large ones a low-priority lane, so a small
    cold load is not stuck behind a large one in one stream's queue. Arenas are allocated
    tagged with an allocation stream that runs no work (every copy and request on an arena
    has finished before it is freed), so either lane may fill any arena.

    A device-to-device copy is issued on the *source* GPU's outbound stream (torch runs a
    cross-device copy on the source device's current stream and makes the destination's current
    stream wait for it), with this device's lane current, so the per-group events recorded on
    the lane follow the copies. Each request computes on a stream of its own from a small pool,
    so requests for different models overlap on the GPU.

    Nothing here runs on the event loop: the runtime calls :meth:`allocate` and
    :meth:`start_transfer` from a worker thread (``asyncio.to_thread``).
    """

    alignment = 256  # what CUDA kernels' vectorised loads expect of a tensor's address
    min_group_bytes = 1 << 20  # smaller copies do not reach the link's bandwidth
    tracks_memory = True

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        least, greatest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
        self.lanes = {
            "small": torch.cuda.Stream(device=self.device, priority=greatest),  # type: ignore[no-untyped-call]
            "large": torch.cuda.Stream(device=self.device, priority=least),  # type: ignore[no-untyped-call]
        }
        self.alloc_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.outbound_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._idle_streams: list[Any] = []
        self._lock = threading.Lock()

    @property
    def copy_stream(self) -> Any:
        return self.lanes["large"]

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        for attempt in range(2):
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.alloc_stream):
                    return torch.empty(nbytes, dtype=torch.uint8, device=self.device), False
            except torch.OutOfMemoryError as e:
                if attempt:
                    raise DeviceOutOfMemory(f"{self.info.id}: {str(e).splitlines()[0]}") from None
                # Blocks cached for the compute streams (freed activations) count as used
                # until they are handed back to the driver. (A worker thread: not the loop.)
                torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        events = []
        lane = self.lanes[copy_lane(dst.numel())]
        peer = source.outbound_stream if isinstance(source, CudaBackend) else None
        started = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        with torch.cuda.device(self.device):
            # The arena may re-use memory that work on the default stream last touched.
            lane.wait_stream(torch.cuda.current_stream(self.device))
            started.record(lane)
            with (
                torch.cuda.stream(lane),
                torch.cuda.stream(peer) if peer is not None else contextlib.nullcontext(),
            ):
                for i, (start, end) in enumerate(groups):
                    dst[start:end].copy_(src[start:end], non_blocking=True)
                    last = i == len(groups) - 1
                    event = torch.cuda.Event(enable_timing=last)  # type: ignore[no-untyped-call]
                    event.record(lane)
                    events.append(event)
        timing = (started, events[-1]) if events else None
        return CudaTransfer(groups, events, self.device, timing=timing)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        with self._lock:
            stream = (
                self._idle_streams.pop()
                if self._idle_streams
                else torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            )
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                yield
        finally:
            # Idle before its request ends: the weights it read may be released right after.
            # (A sticky error raises here too; the caller classifies it.)
            stream.synchronize()
            with self._lock:
                self._idle_streams.append(stream)

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """The caching allocator takes the memory back once the last reference is dropped."""

    def trim(self) -> None:
        """Hand cached free blocks back to the driver. Blocking: never on the event loop."""
        torch.cuda.empty_cache()

    def memory_allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device))

    def memory_reserved(self) -> int | None:
        return int(torch.cuda.memory_reserved(self.device))

    def peak_bytes_during(self, work: Callable[[], object]) -> int | None:
        # Peak statistics are per device: concurrent requests can only raise the figure (a
        # safe over-estimate of the reserve, never an under-estimate).
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        work()
        torch.cuda.synchronize(self.device)
        return max(0, int(torch.cuda.max_memory_allocated(self.device)) - int(base))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def make_backend(info: DeviceInfo) -> DeviceBackend:
    return CudaBackend(info) if info.kind == "cuda" else CpuBackend(info)


def device_free_bytes(info: DeviceInfo) -> int | None:
    """Free memory on a GPU now (all processes counted); None for CPU stand-ins."""
    if info.kind != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(info.index)
    except RuntimeError:
        return None
    return int(free)
