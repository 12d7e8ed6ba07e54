"""Handlers from zero: the gateway wakes a scaled-to-zero handler and holds the request.

A function's handler (``spec.handler``) is reached through the gateway at
``/v2/handlers/{name}/{path}``, which proxies to its Service. With
``minReplicas: 0`` the gateway is also the handler's 0 <-> 1 scaler, as Knative's
activator is:

* :meth:`HandlerActivator.scale_idle` scales a handler to zero once no request has
  come for ``idleSeconds`` (and none is held); the operator keeps that count (it is
  within ``[minReplicas, maxReplicas]``) and reports ``HandlerReady: ScaledToZero``.
* A request for a handler with no ready replica is held: the first one scales the
  Deployment to one (``deployments/scale``), and every held request waits on the
  same wake-up until a replica is Ready. The buffer is bounded per function (503
  with Retry-After past it) and each hold has a deadline (504 past it: the
  ``X-Gpufaas-Timeout-Ms`` header, else ``hold_timeout_s``).

The Kubernetes edge is :class:`KubeDeployments` (get a Deployment, patch its scale);
the activator takes anything with that shape, so it is tested against KMock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from gpufaas.core.api import InferenceFunction, handler_name
from gpufaas.core.http import TIMEOUT_HEADER  # the same header the gateway's infer route reads
from gpufaas.core.kubeclient import KubeConnection

logger = logging.getLogger(__name__)

HANDLER_ROUTE = "/v2/handlers/{name}/{path:path}"
# Not forwarded: hop-by-hop headers, and what httpx sets itself.
_DROPPED_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}
)


@dataclass(frozen=True)
class Replicas:
    wanted: int
    ready: int


class Deployments(Protocol):
    async def replicas(self, namespace: str, name: str) -> Replicas | None: ...

    async def scale(self, namespace: str, name: str, replicas: int) -> None: ...


class KubeDeployments:
    """The two calls the activator makes: read a Deployment, patch its scale subresource."""

    def __init__(self, connection: KubeConnection) -> None:
        self._client = connection.client(timeout=10.0, user_agent="gpufaas-gateway")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def replicas(self, namespace: str, name: str) -> Replicas | None:
        response = await self._client.get(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        return Replicas(
            wanted=int((body.get("spec") or {}).get("replicas", 1)),
            ready=int((body.get("status") or {}).get("readyReplicas") or 0),
        )

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        response = await self._client.patch(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
            json={"spec": {"replicas": replicas}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()


class HoldRejected(Exception):
    """The function's hold buffer is full."""


class HoldTimedOut(Exception):
    """No handler replica became Ready before the request's deadline."""


def handler_deployment(function: InferenceFunction) -> str:
    """The operator's name for the handler Deployment and Service."""
    return handler_name(function.name)


def in_cluster_url(function: InferenceFunction) -> str:
    port = function.spec.handler.port if function.spec.handler else 8080
    return f"http://{handler_deployment(function)}.{function.metadata.namespace}.svc:{port}"


@dataclass
class _Waking:
    task: asyncio.Task[None]
    held: int = 0


@dataclass
class HandlerActivator:
    """Wake handlers on demand, hold their requests meanwhile, and let idle ones sleep."""

    deployments: Deployments
    hold_timeout_s: float = 60.0
    max_held_per_function: int = 100
    poll_s: tuple[float, float] = (0.05, 1.0)  # first and longest wait between readiness checks
    handler_url: Callable[[InferenceFunction], str] = in_cluster_url
    clock: Callable[[], float] = time.monotonic
    _last_request: dict[str, float] = field(default_factory=dict)
    _waking: dict[str, _Waking] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)

    async def ready_url(self, function: InferenceFunction, *, deadline: float | None) -> str:
        """The handler's URL once a replica is Ready; wakes it from zero if need be."""
        key = _key(function)
        self._last_request[key] = self.clock()
        ns, name = function.metadata.namespace, handler_deployment(function)
        now = await self.deployments.replicas(ns, name)
        if now is not None and now.ready > 0:
            return self.handler_url(function)
        held = self._held.get(key, 0)
        if held >= self.max_held_per_function:
            raise HoldRejected(
                f"{held} requests already wait for the handler of {function.name!r} to start"
            )
        self._held[key] = held + 1
        try:
            budget = deadline if deadline is not None else self.clock() + self.hold_timeout_s
            remaining = budget - self.clock()
            if remaining <= 0:
                raise HoldTimedOut(f"no time left to start the handler of {function.name!r}")
            try:
                await asyncio.wait_for(asyncio.shield(self._wake(key, ns, name)), remaining)
            except TimeoutError:
                raise HoldTimedOut(
                    f"the handler of {function.name!r} was not Ready within {remaining:.1f} s"
                ) from None
        finally:
            self._held[key] -= 1
        self._last_request[key] = self.clock()
        return self.handler_url(function)

    def _wake(self, key: str, namespace: str, name: str) -> asyncio.Task[None]:
        """One wake-up per handler, shared by every request held for it."""
        waking = self._waking.get(key)
        if waking is None or waking.task.done():
            task = asyncio.create_task(self._scale_up_and_wait(namespace, name))
            task.add_done_callback(lambda _: self._waking.pop(key, None))
            waking = self._waking[key] = _Waking(task=task)
        return waking.task

    async def _scale_up_and_wait(self, namespace: str, name: str) -> None:
        current = await self.deployments.replicas(namespace, name)
        if current is not None and current.wanted == 0:
            logger.info("waking handler %s/%s from zero", namespace, name)
            await self.deployments.scale(namespace, name, 1)
        delay = self.poll_s[0]
        while True:
            current = await self.deployments.replicas(namespace, name)
            if current is not None and current.ready > 0:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_s[1])

    async def scale_idle(self, functions: list[InferenceFunction]) -> list[str]:
        """Scale to zero each minReplicas-0 handler idle for its idleSeconds; the keys scaled."""
        scaled = []
        now = self.clock()
        for function in functions:
            handler = function.spec.handler
            if handler is None or handler.min_replicas != 0:
                continue
            key = _key(function)
            last = self._last_request.setdefault(key, now)  # first seen: a full window first
            busy = self._held.get(key, 0) > 0 or key in self._waking
            if busy or now - last < handler.idle_seconds:
                continue
            ns, name = function.metadata.namespace, handler_deployment(function)
            current = await self.deployments.replicas(ns, name)
            if current is None or current.wanted == 0:
                continue
            logger.info("scaling idle handler %s/%s to zero", ns, name)
            await self.deployments.scale(ns, name, 0)
            scaled.append(key)
        return scaled

    async def scale_idle_forever(
        self,
        functions: Callable[[], list[InferenceFunction]],
        stop: asyncio.Event,
        *,
        every_s: float = 5.0,
    ) -> None:
        """The gateway's background loop around :meth:`scale_idle`."""
        while not stop.is_set():
            try:
                await self.scale_idle(functions())
            except (httpx.HTTPError, ValueError) as e:
                logger.warning("scaling idle handlers failed: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


def _key(function: InferenceFunction) -> str:
    return f"{function.metadata.namespace}/{function.name}"


def _deadline(request: Request, clock: Callable[[], float]) -> float | None:
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return None
    timeout_ms = float(header)  # ValueError: the caller answers 400
    if not timeout_ms > 0:
        raise ValueError("must be positive")
    return clock() + timeout_ms / 1000


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def handler_router(
    activator: HandlerActivator,
    function: Callable[[str], InferenceFunction | None],
    *,
    client: httpx.AsyncClient | None = None,
) -> APIRouter:
    """``/v2/handlers/{name}/{path}``: wake (or find) the handler, then proxy the request."""
    router = APIRouter()
    http = client or httpx.AsyncClient(timeout=None)

    @router.api_route(HANDLER_ROUTE, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(name: str, path: str, request: Request) -> Response:
        fn = function(name)
        if fn is None:
            return _error(404, f"no function {name!r} is served")
        if fn.spec.handler is None:
            return _error(404, f"function {name!r} has no handler (spec.handler)")
        try:
            deadline = _deadline(request, activator.clock)
        except ValueError:
            return _error(400, f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
        try:
            base = await activator.ready_url(fn, deadline=deadline)
        except HoldRejected as e:
            return _error(503, str(e), **{"Retry-After": "1"})
        except HoldTimedOut as e:
            return _error(504, str(e))
        except httpx.HTTPError as e:
            return _error(503, f"cannot reach the Kubernetes API to start the handler: {e}")
        remaining = None if deadline is None else max(deadline - activator.clock(), 0.001)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS}
        try:
            answer = await http.request(
                request.method,
                f"{base}/{path}",
                params=request.query_params,
                content=await request.body(),
                headers=headers,
                timeout=remaining,
            )
        except httpx.TimeoutException:
            return _error(504, f"the handler of {name!r} did not answer in time")
        except httpx.HTTPError as e:
            return _error(502, f"the handler of {name!r} failed: {e}")
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROPPED_HEADERS}
        kept.pop("content-encoding", None)  # httpx has decoded the body
        return Response(content=answer.content, status_code=answer.status_code, headers=kept)

    return router


def kubernetes_activator(
    connection: KubeConnection | None = None, *, environ: Mapping[str, str] | None = None
) -> HandlerActivator:
    """An activator over the cluster's API (in-cluster service account, else kubeconfig).

    ``GPUFAAS_HANDLER_HOLD_SECONDS`` (60) bounds a hold without a client deadline and
    ``GPUFAAS_HANDLER_MAX_HELD`` (100) the requests held per function.
    """
    env = os.environ if environ is None else environ
    try:
        hold_s = float(env.get("GPUFAAS_HANDLER_HOLD_SECONDS") or 60)
        max_held = int(env.get("GPUFAAS_HANDLER_MAX_HELD") or 100)
        if not (hold_s > 0 and max_held > 0):
            raise ValueError("must be positive")
    except ValueError as e:
        raise ValueError(f"GPUFAAS_HANDLER_HOLD_SECONDS / GPUFAAS_HANDLER_MAX_HELD: {e}") from None
    return HandlerActivator(
        deployments=KubeDeployments(connection or KubeConnection.load()),
        hold_timeout_s=hold_s,
        max_held_per_function=max_held,
    )
