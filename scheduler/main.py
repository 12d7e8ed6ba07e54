"""Entry point of the gateway (``gpufaas gateway``, and in-process for ``gpufaas up``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Mapping, Sequence

import uvloop

from gpufaas.core.api import InferenceFunction
from gpufaas.core.colocated import ColocatedNode
from gpufaas.scheduler.cluster import Cluster
from gpufaas.scheduler.front import FrontSettings, HttpFront
from gpufaas.scheduler.gateway import Gateway, GatewayConfig, create_app
from gpufaas.scheduler.policy import make_policy

logger = logging.getLogger(__name__)


def build_gateway(
    *,
    manager_urls: Mapping[str, str],
    functions: Sequence[InferenceFunction],
    policy: str = "lalb-o3",
    config: GatewayConfig | None = None,
    seed: int | None = None,
    manager_token: str | None = None,
) -> Gateway:
    cluster = Cluster(manager_urls=manager_urls, manager_token=manager_token)
    gateway = Gateway(
        cluster=cluster,
        # LALB prefers a node whose host tier or disk holds the model over an artifact read
        policy=make_policy(policy, seed=seed, staged=cluster.staged_nodes),
        config=config,
    )
    for function in functions:
        gateway.register(function)
    return gateway


def serve(
    *,
    gateway: Gateway,
    host: str,
    port: int,
    grpc_port: int | None = None,
    colocated: Sequence[ColocatedNode] = (),
) -> None:
    """Serve HTTP on ``port`` and, unless ``grpc_port`` is None, gRPC on it, in one event loop
    over one gateway, until SIGINT or SIGTERM. ``colocated``: GPU managers to run on the same
    loop (started before the gateway, stopped after it)."""
    logger.info("gateway on http://%s:%d (policy %s)", host, port, gateway.policy.name)
    serve_on(gateway=gateway, host=host, port=port, grpc_port=grpc_port, colocated=colocated)


def serve_on(
    *,
    gateway: Gateway,
    host: str,
    port: int | None = None,
    sockets: Sequence[socket.socket] = (),
    grpc_port: int | None = None,
    grpc_socket: socket.socket | None = None,
    colocated: Sequence[ColocatedNode] = (),
) -> None:
    """The gateway's HTTP front (:mod:`gpufaas.scheduler.front`: inference straight from the
    httptools parser, every other route through the ASGI app) on ``host:port`` and/or
    ``sockets``, gRPC on ``grpc_port`` (on ``grpc_socket`` if given, already listening there)
    unless None, on uvloop, until SIGINT or SIGTERM; then running requests finish (a bounded
    grace) and the gateway stops."""
    # Start-up objects (torch, pydantic schemas, the app) never die: keep them out of the
    # collector's generations, which cut a ~100 ms pause from the request path's p99.
    settings = FrontSettings(
        max_body_bytes=gateway.config.limits.max_body_bytes,
        max_connections=gateway.config.max_connections,
    )
    front = HttpFront(create_app(gateway), gateway=gateway, settings=settings)
    gc.freeze()
    uvloop.run(
        _serve(
            front,
            host=host,
            port=port,
            sockets=sockets,
            grpc_port=grpc_port,
            grpc_socket=grpc_socket,
            colocated=colocated,
        )
    )


async def _serve(
    front: HttpFront,
    *,
    host: str,
    port: int | None,
    sockets: Sequence[socket.socket],
    grpc_port: int | None,
    grpc_socket: socket.socket | None,
    colocated: Sequence[ColocatedNode],
) -> None:
    gateway = front.gateway
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for node in colocated:  # up before the gateway's first sync; stopped after the gateway
            stack.push_async_callback(node.stop)
            await node.start()
        stack.push_async_callback(front.close)  # also when a port is in use: the gateway stops
        await front.start(sockets=sockets, host=host, port=port)
        if grpc_port is not None:
            from gpufaas.scheduler.grpc_server import make_server

            grpc_server, bound = make_server(gateway, host=host, port=grpc_port, sock=grpc_socket)
            await grpc_server.start()
            stack.push_async_callback(grpc_server.stop, 2.0)
            logger.info("gateway gRPC (KServe v2) on %s:%d", host, bound)
        await stop.wait()


def enable_kubernetes(
    gateway: Gateway,
    *,
    watch_namespace: str | None,
    manager_service: str,
    manager_namespace: str,
) -> None:
    """Learn functions from Ready InferenceFunction objects and managers from the
    GPU-manager DaemonSet's endpoints (refreshed on every sync)."""
    from gpufaas.scheduler.kube import gpu_manager_urls, watch_functions

    async def discover() -> Mapping[str, str]:
        return await gpu_manager_urls(namespace=manager_namespace, service=manager_service)

    async def watch(stop: asyncio.Event) -> None:
        await watch_functions(
            namespace=watch_namespace,
            on_ready=gateway.add_function,
            on_gone=gateway.remove_function,
            stop=stop,
        )

    gateway.discover_managers = discover
    gateway.background.append(watch)

    # Handlers from zero: wake on request, scale idle ones to zero (coldstart.py).
    from gpufaas.scheduler.coldstart import kubernetes_activator

    activator = gateway.handler_activator = kubernetes_activator()
    gateway.background.append(
        lambda stop: activator.scale_idle_forever(lambda: list(gateway.functions.values()), stop)
    )
