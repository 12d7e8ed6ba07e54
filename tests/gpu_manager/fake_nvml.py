"""A fake NVML for the device layer's tests: tables in, pynvml's functions out.

Its constants come from the real ``pynvml`` module (nvidia-ml-py), so a constant the real module
defines oddly (``NVML_P2P_CAPS_INDEX_READ = 0,`` is a tuple) reaches the code under test as it
would on a GPU node. Enum arguments go through ``ctypes.c_uint`` as the real C call does, so a
tuple fails the way it fails on real hardware (``ctypes.ArgumentError``). A MIG-enabled parent
refuses its memory query (it needs privilege), as a real driver does for an unprivileged pod.
"""

from __future__ import annotations

import ctypes
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import pynvml

GiB = 2**30


@dataclass
class FakeGpu:
    uuid: str
    name: str | bytes
    total: int
    free: int
    pcie: tuple[int, int, int, int] = (5, 16, 5, 16)  # current gen, width, max gen, width
    mig: list[str | None] | None = None  # handles of MIG instances per slot; None: no MIG
    broken: Collection[str] = ()  # names of pynvml functions that fail on this device


@dataclass
class FakeNvml:
    gpus: Mapping[str, FakeGpu]  # handle -> GPU or MIG instance; GPUs are "g0", "g1", ...
    nvlink: Collection[tuple[str, str]] = ()
    p2p: Collection[frozenset[str]] = ()
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def module(self) -> types.SimpleNamespace:
        gpus = self.gpus
        count = sum(1 for h in gpus if h.startswith("g"))

        def query(name: str, function: Any) -> Any:
            def call(handle: str, *args: Any) -> Any:
                self.calls.append((name, (handle, *args)))
                if name in gpus[handle].broken:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
                return function(handle, *args)

            return call

        def memory(handle: str) -> Any:
            gpu = gpus[handle]
            if gpu.mig is not None:  # a MIG-enabled parent: needs privilege
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
            return types.SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

        def mig_mode(handle: str) -> tuple[int, int]:
            if gpus[handle].mig is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)

        def mig_handle(handle: str, slot: int) -> str:
            found = (gpus[handle].mig or [])[slot]
            if found is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return found

        def p2p_status(a: str, b: str, index: Any) -> int:
            try:
                capability = ctypes.c_uint(index).value  # what the C call would receive
            except TypeError as e:
                raise ctypes.ArgumentError(f"argument 3: {e}") from None
            if capability == pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
                ok = (a, b) in self.nvlink
            elif capability == pynvml.NVML_P2P_CAPS_INDEX_READ[0]:
                ok = frozenset((a, b)) in self.p2p
            else:
                ok = False
            return pynvml.NVML_P2P_STATUS_OK if ok else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED

        def handle_by_index(i: int) -> str:
            if f"g{i}" not in gpus:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if "nvmlDeviceGetHandleByIndex" in gpus[f"g{i}"].broken:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return f"g{i}"

        constants = {n: getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVML_")}
        return types.SimpleNamespace(
            **constants,
            NVMLError=pynvml.NVMLError,
            nvmlDeviceGetCount=lambda: count,
            nvmlDeviceGetHandleByIndex=handle_by_index,
            nvmlDeviceGetUUID=query("nvmlDeviceGetUUID", lambda h: gpus[h].uuid),
            nvmlDeviceGetName=query("nvmlDeviceGetName", lambda h: gpus[h].name),
            nvmlDeviceGetMemoryInfo=query("nvmlDeviceGetMemoryInfo", memory),
            nvmlDeviceGetCurrPcieLinkGeneration=query("pcie", lambda h: gpus[h].pcie[0]),
            nvmlDeviceGetCurrPcieLinkWidth=query("pcie", lambda h: gpus[h].pcie[1]),
            nvmlDeviceGetMaxPcieLinkGeneration=query("pcie", lambda h: gpus[h].pcie[2]),
            nvmlDeviceGetMaxPcieLinkWidth=query("pcie", lambda h: gpus[h].pcie[3]),
            nvmlDeviceGetMigMode=query("nvmlDeviceGetMigMode", mig_mode),
            nvmlDeviceGetMaxMigDeviceCount=query(
                "nvmlDeviceGetMaxMigDeviceCount", lambda h: len(gpus[h].mig or [])
            ),
            nvmlDeviceGetMigDeviceHandleByIndex=query(
                "nvmlDeviceGetMigDeviceHandleByIndex", mig_handle
            ),
            nvmlDeviceGetP2PStatus=query("nvmlDeviceGetP2PStatus", p2p_status),
        )


def mixed_mig_node() -> FakeNvml:
    """One H100 split 3g.40gb + 2g.20gb + 2g.20gb (slot 3 empty) and a full H100 beside it."""
    gpus = {
        "g0": FakeGpu("GPU-0000aaaa", "NVIDIA H100 80GB HBM3", 80 * GiB, 80 * GiB,
                      mig=["m0", "m1", "m2", None]),
        "g1": FakeGpu("GPU-1111bbbb", "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB),
        "m0": FakeGpu("MIG-2222cccc", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GiB, 40 * GiB),
        "m1": FakeGpu("MIG-3333dddd", "NVIDIA H100 80GB HBM3 MIG 2g.20gb", 20 * GiB, 20 * GiB),
        "m2": FakeGpu("MIG-4444eeee", "NVIDIA H100 80GB HBM3 MIG 2g.20gb", 20 * GiB, 20 * GiB),
    }  # fmt: skip
    # NVML may report P2P between the two GPUs; still no copy may be planned to or from a slice.
    return FakeNvml(gpus=gpus, p2p=[frozenset(("g0", "g1"))])
