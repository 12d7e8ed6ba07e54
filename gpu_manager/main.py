"""Entry point of the GPU manager process (``gpufaas gpu-manager``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import uvicorn

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.uripolicy import UriPolicy
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.devices import discover_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app

logger = logging.getLogger(__name__)


def build_runtime(
    *,
    cpu_devices: int,
    device_memory_bytes: int,
    host_memory_bytes: int,
    artifact_dir: Path,
    max_concurrency_per_device: int = 4,
    force_cpu: bool = False,
    memory_fraction: float = 0.9,
    probe_variable_dim: int = 64,
    uri_policy: UriPolicy | None = None,
) -> NodeRuntime:
    """Discover devices (NVML, else CPU stand-ins) and build the runtime over them.

    ``memory_fraction`` of each GPU's memory is the model cache; the rest is left to the CUDA
    context, cuBLAS workspaces and other processes.
    """
    devices = discover_devices(
        cpu_devices=cpu_devices,
        device_memory=device_memory_bytes,
        memory_fraction=memory_fraction,
        force_cpu=force_cpu,
    )
    return NodeRuntime(
        devices=devices,
        store=ArtifactStore(artifact_dir, uri_policy=uri_policy),
        host_capacity_bytes=host_memory_bytes,
        max_concurrency_per_device=max_concurrency_per_device,
        probe_variable_dim=probe_variable_dim,
    )


def serve(
    *, runtime: NodeRuntime, host: str, port: int, name: str, device_concurrency: int | None = 4
) -> None:
    """Serve until interrupted. ``GPUFAAS_MANAGER_TOKEN``, when set, is required of callers."""
    # Requests run in threads; one intra-op thread each keeps them from fighting over cores.
    torch.set_num_threads(1)
    token = os.environ.get("GPUFAAS_MANAGER_TOKEN") or None
    logger.info(
        "GPU manager %s on %s:%d with %s%s",
        name,
        host,
        port,
        ", ".join(runtime.devices),
        " (bearer token required)" if token else "",
    )
    uvicorn.run(
        create_app(
            runtime, token=token, admission=DeviceAdmission(concurrency=device_concurrency)
        ),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )
