"""Entry point of the GPU manager process (``gpufaas gpu-manager``), and of a GPU manager on a
gateway's event loop (:class:`ColocatedManager`, opt-in: :mod:`gpufaas.core.colocated`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.colocated import ColocatedOptions, InferNode
from gpufaas.core.config import artifact_dir
from gpufaas.core.units import parse_bytes
from gpufaas.core.uripolicy import UriPolicy
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.device_faults import EXIT_DEVICE_FAILED
from gpufaas.gpu_manager.inventory import discover_devices
from gpufaas.gpu_manager.process_setup import configure_process, platform_versions
from gpufaas.gpu_manager.runtime import DEFAULT_DISK_CACHE_BYTES, NodeRuntime
from gpufaas.gpu_manager.server import FramedListen, create_app, create_node

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
    listener: socket.socket | None = None,
) -> None:
    """Serve until interrupted, on ``listener`` (a listening socket on ``host:port``) if given,
    else binding ``host:port``. ``GPUFAAS_MANAGER_TOKEN``, when set, is required of callers."""
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
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        proxy_headers=False,  # nothing reads the caller's address
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run(sockets=[listener] if listener is not None else None)
    if not server.started:  # the port was taken or the app failed at start-up: as uvicorn.run
        sys.exit(STARTUP_FAILURE)
    if not runtime.health.ready:  # a fatal device error stopped the server: say so on exit
        logger.critical("exiting: %s", runtime.health.failure)
        sys.exit(EXIT_DEVICE_FAILED)


# -- a GPU manager on a gateway's event loop (``gpufaas up --node-transport inprocess``) --------


class _Server(uvicorn.Server):
    """uvicorn's server as a guest on a loop it does not own: the signals stay the host's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ColocatedManager:
    """A GPU manager serving on the running event loop of the process that starts it: its HTTP
    API on ``host:port`` and its framed lane on ``framed_socket`` as a manager process would (for
    other gateways, peers and tools), and :attr:`answer` for the gateway beside it. Built by the
    composition root through :func:`gpufaas.core.colocated.colocated_node`."""

    def __init__(self, options: ColocatedOptions) -> None:
        manager = options.options
        self._name = options.name
        self._url = f"http://{options.host}:{options.port}"
        torch.set_num_threads(1)  # as the manager process: one intra-op thread per request
        self.runtime = build_runtime(
            cpu_devices=manager.cpu_devices,
            device_memory_bytes=parse_bytes(manager.device_memory),
            host_memory_bytes=parse_bytes(manager.host_memory),
            artifact_dir=manager.artifact_dir or artifact_dir(),
            force_cpu=manager.force_cpu,
            max_concurrency_per_device=manager.device_concurrency or 4,
        )
        node = create_node(
            self.runtime,
            token=options.token,
            admission=DeviceAdmission(concurrency=manager.device_concurrency or None),
            framed=FramedListen(unix_path=options.framed_socket)
            if options.framed_socket is not None
            else None,
        )
        self._answer = node.answer
        config = uvicorn.Config(
            node.app,
            host=options.host,
            port=options.port,
            log_level="warning",
            access_log=False,
            http="httptools",
            loop="none",  # the host's loop
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._listener = options.listener
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    @property
    def answer(self) -> InferNode:
        return self._answer

    async def start(self, *, timeout_s: float = 120.0) -> None:
        """Serve; return once the API and the framed lane are up (or raise why not)."""
        sockets = [self._listener] if self._listener is not None else None
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its error, if it failed
                raise RuntimeError(f"the co-located GPU manager {self._name} stopped at start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the co-located GPU manager {self._name} did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 15.0)
        await self.runtime.settle()
        self._task = None


def start_colocated(options: ColocatedOptions) -> ColocatedManager:
    """The entry point of :data:`gpufaas.core.colocated.NODE_GROUP` (``gpu-manager``)."""
    return ColocatedManager(options)
