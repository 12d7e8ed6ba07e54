"""Entry point of the GPU manager process (``gpufaas gpu-manager``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import uvicorn

from gpufaas.core.artifacts import ArtifactStore
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
) -> NodeRuntime:
    devices = discover_devices(
        cpu_devices=cpu_devices, device_memory=device_memory_bytes, force_cpu=force_cpu
    )
    return NodeRuntime(
        devices=devices,
        store=ArtifactStore(artifact_dir),
        host_capacity_bytes=host_memory_bytes,
        max_concurrency_per_device=max_concurrency_per_device,
    )


def serve(*, runtime: NodeRuntime, host: str, port: int, name: str) -> None:
    # Requests run in threads; one intra-op thread each keeps them from fighting over cores.
    torch.set_num_threads(1)
    logger.info("GPU manager %s on %s:%d with %s", name, host, port, ", ".join(runtime.devices))
    uvicorn.run(create_app(runtime), host=host, port=port, log_level="warning", access_log=False)
