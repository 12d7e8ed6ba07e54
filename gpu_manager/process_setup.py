"""Process-wide torch settings for serving, and the versions the start-up log reports.

Called once at start-up, before anything touches CUDA: expandable segments for the caching
allocator, and TorchScript's fusers off (a fused kernel would bypass the per-layer arrival gate).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping

import torch

from gpufaas.gpu_manager.nvml import nvml_text

__all__ = [
    "EXPANDABLE_SEGMENTS",
    "allocator_conf_update",
    "configure_process",
    "disable_script_fusers",
    "platform_versions",
    "script_fusion_possible",
]


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
            versions["driver"] = nvml_text(pynvml.nvmlSystemGetDriverVersion())
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
