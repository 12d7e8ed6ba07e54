"""The device layer: the one place that knows about CUDA and NVML.

It discovers the node's accelerators through NVML and falls back to CPU
"devices" with a configured count and memory budget, so the rest of the GPU
manager runs unchanged on a laptop or in CI. Everything CUDA-specific the
manager needs (moving modules, synchronising, pinning host memory) is a small
function here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class DeviceInfo:
    """One schedulable device: a GPU, a MIG instance, or a CPU stand-in."""

    id: str  # stable within the node: "cuda:0", "cpu:1"
    kind: DeviceKind
    index: int
    name: str
    uuid: str
    total_bytes: int
    capacity_bytes: int  # what the model cache may use on it
    pcie: dict[str, int] = field(default_factory=dict)
    peers: tuple[str, ...] = ()  # device ids reachable by NVLink / P2P

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index) if self.kind == "cuda" else torch.device("cpu")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discover_devices(
    *,
    cpu_devices: int = 1,
    device_memory: int = 4 * 2**30,
    memory_fraction: float = 0.9,
    force_cpu: bool = False,
) -> list[DeviceInfo]:
    """Find the node's GPUs via NVML, or make ``cpu_devices`` CPU stand-ins."""
    if not force_cpu:
        gpus = _discover_nvml(memory_fraction=memory_fraction)
        if gpus:
            return gpus
    return [
        DeviceInfo(
            id=f"cpu:{i}",
            kind="cpu",
            index=i,
            name="cpu",
            uuid=f"cpu-{i}",
            total_bytes=device_memory,
            capacity_bytes=device_memory,
        )
        for i in range(cpu_devices)
    ]


def _discover_nvml(*, memory_fraction: float) -> list[DeviceInfo]:
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        logger.info("NVML unavailable (%s); using CPU devices", e)
        return []
    if not torch.cuda.is_available():
        logger.warning("NVML sees GPUs but torch has no CUDA; using CPU devices")
        return []
    try:
        devices = []
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            pcie = {}
            with contextlib.suppress(pynvml.NVMLError):
                pcie = {
                    "generation": int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                    "width": int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
                }
            peers = tuple(
                f"cuda:{j}"
                for j in range(count)
                if j != i and torch.cuda.can_device_access_peer(i, j)
            )
            devices.append(
                DeviceInfo(
                    id=f"cuda:{i}",
                    kind="cuda",
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    total_bytes=int(memory.total),
                    capacity_bytes=int(memory.total * memory_fraction),
                    pcie=pcie,
                    peers=peers,
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def instantiate_on(module: torch.nn.Module, device: DeviceInfo) -> torch.nn.Module:
    """A private copy of ``module`` whose tensors live on ``device``.

    On CPU stand-ins this is a plain memory copy, so a "load" costs what it
    would cost to move the bytes, and each device's copy is accounted for.
    """
    replica = copy.deepcopy(module)
    replica.to(device.torch_device)
    replica.eval()
    return replica


def synchronize(device: DeviceInfo) -> None:
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device allocation failure (CUDA OOM, or a CPU allocator failure)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
