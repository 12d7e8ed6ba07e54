"""A real GPU manager with the bundled tiny-mlp function, served over TCP in this event loop,
for tests of the gateway's request path and HTTP front."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn

from gpufaas.core.api import InferenceFunction
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import FramedListen
from gpufaas.gpu_manager.server import create_app as create_manager_app
from gpufaas.scheduler.local import free_port

TIMEOUT = 60


@contextlib.asynccontextmanager
async def tiny_mlp_manager(
    tmp_path: Path,
    models_dir: Path,
    *,
    wrap: Callable[[Any], Any] = lambda app: app,
    framed_socket: Path | None = None,
) -> AsyncIterator[tuple[str, list[InferenceFunction]]]:
    """The manager's URL and the functions it can serve; ``wrap`` goes around its app. With
    ``framed_socket``, it also serves its framed lane there (started by its lifespan)."""
    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"],
        variables={"GPUFAAS_MODELS": str(models_dir)},
    )
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    port = free_port()
    config = uvicorn.Config(
        wrap(
            create_manager_app(
                runtime,
                framed=None if framed_socket is None else FramedListen(unix_path=framed_socket),
            )
        ),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off" if framed_socket is None else "on",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", functions
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, TIMEOUT)
        await runtime.settle()
