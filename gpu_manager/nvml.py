"""What NVML reports about the node's GPUs: the inventory discovery starts from.

Every GPU with its UUID, name, total and free memory and PCIe link, which pairs have NVLink or
peer-to-peer access, and MIG instances (each a device of its own). Nothing here imports torch: the
``pynvml`` module is passed in (a fake one in tests), and matching GPUs to torch's CUDA ordinals is
:mod:`gpufaas.gpu_manager.inventory`'s job.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PCIE_LANE_GBPS",
    "NvmlDevice",
    "normal_uuid",
    "nvml_enum",
    "nvml_text",
    "pcie_gbps",
    "read_nvml_inventory",
]

logger = logging.getLogger(__name__)

# Usable bandwidth per lane and direction after line coding, GB/s, by PCIe generation.
PCIE_LANE_GBPS: Mapping[int, float] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


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
            handles.append((i, handle, nvml_text(nvml.nvmlDeviceGetUUID(handle))))
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
        name=nvml_text(nvml.nvmlDeviceGetName(handle)),
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
                uuid=nvml_text(nvml.nvmlDeviceGetUUID(mig)),
                name=nvml_text(nvml.nvmlDeviceGetName(mig)),
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


def nvml_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
