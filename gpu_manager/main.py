"""Entry point of the GPU manager process (``gpufaas gpu-manager``)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import torch
import uvicorn

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.uripolicy import UriPolicy
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.device_faults import EXIT_DEVICE_FAILED
from gpufaas.gpu_manager.inventory import discover_devices
from gpufaas.gpu_manager.process_setup import configure_process, platform_versions
from gpufaas.gpu_manager.runtime import DEFAULT_DISK_CACHE_BYTES, NodeRuntime
from gpufaas.gpu_manager.server import FramedListen, create_app

logger = logging.getLogger(__name__)


def build_runtime(
    *,
    cpu_devices: int,
    device_memory_bytes: int,
    host_memory_bytes: int,
    artifact_dir: Path,
    disk_cache_bytes: int = DEFAULT_DISK_CACHE_BYTES,
    max_concurrency_per_device: int = 4,
    force_cpu: bool = False,
    memory_fraction: float = 1.0,
    probe_variable_dim: int = 64,
    uri_policy: UriPolicy | None = None,
) -> NodeRuntime:
    """Discover devices (NVML, else CPU stand-ins) and build the runtime over them.

    A GPU's model cache is its free memory at start-up minus a measured reserve (CUDA context,
    cuBLAS workspaces, allocator slack), and at most ``memory_fraction`` of it. Raises
    :class:`~gpufaas.gpu_manager.inventory.DeviceSetupError` when NVML sees GPUs torch cannot
    serve, unless ``force_cpu``.
    """
    configure_process()  # expandable segments, no TorchScript fusers: before CUDA starts
    devices = discover_devices(
        cpu_devices=cpu_devices,
        device_memory=device_memory_bytes,
        memory_fraction=memory_fraction,
        force_cpu=force_cpu,
        compute_streams=max_concurrency_per_device,
    )
    return NodeRuntime(
        devices=devices,
        store=ArtifactStore(artifact_dir, uri_policy=uri_policy),
        host_capacity_bytes=host_memory_bytes,
        disk_capacity_bytes=disk_cache_bytes,
        max_concurrency_per_device=max_concurrency_per_device,
        probe_variable_dim=probe_variable_dim,
    )


def serve(
    *,
    runtime: NodeRuntime,
    host: str,
    port: int,
    name: str,
    device_concurrency: int | None = 4,
    framed: FramedListen | None = None,
) -> None:
    """Serve until interrupted. ``GPUFAAS_MANAGER_TOKEN``, when set, is required of callers."""
    # Requests run in threads; one intra-op thread each keeps them from fighting over cores.
    torch.set_num_threads(1)
    token = os.environ.get("GPUFAAS_MANAGER_TOKEN") or None
    versions = platform_versions()
    logger.info(
        "GPU manager %s on %s:%d with %s%s; torch %s (CUDA %s), driver %s (CUDA %s)",
        name,
        host,
        port,
        ", ".join(runtime.devices),
        " (bearer token required)" if token else "",
        versions["torch"],
        versions["torch_cuda"] or "none",
        versions["driver"] or "none",
        versions["driver_cuda"] or "none",
    )
    app = create_app(
        runtime,
        token=token,
        admission=DeviceAdmission(concurrency=device_concurrency),
        framed=framed,
    )
    # Start-up objects (torch, numpy, pydantic schemas, the app) never die: keep them out of
    # the collector's generations, so its full passes stop walking them on the request path.
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        proxy_headers=False,  # nothing reads the caller's address
    )
    if not runtime.health.ready:  # a fatal device error stopped the server: say so on exit
        logger.critical("exiting: %s", runtime.health.failure)
        sys.exit(EXIT_DEVICE_FAILED)
