"""The gateway's Kubernetes mode: functions from InferenceFunction objects, managers from Endpoints.

:func:`watch_functions` lists and then watches InferenceFunctions and tells the
gateway about each one that the operator has marked Ready (``status.ready`` is
``"True"`` for the current ``metadata.generation``), and about each one that
stops being Ready or is deleted. While the operator has not yet looked at a new
generation, the last decision stands, so a spec update does not take a serving
function offline until its new model has been checked. On any error it
re-lists (which also catches deletions it missed) after a capped exponential
backoff, until ``stop`` is set.

:func:`discover_gpu_managers` reads the EndpointSlices (or, on old clusters,
the Endpoints) of the GPU-manager DaemonSet's headless Service.

Plain httpx against the API server, with connection details from the
``kubernetes`` package's loaders (in-cluster service account, else kubeconfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import httpx

from gpufaas.core.api import API_VERSION, PLURAL, InferenceFunction, ManifestError, parse_manifest
from gpufaas.core.kubeclient import KubeConnection

logger = logging.getLogger(__name__)

_USER_AGENT = "gpufaas-gateway"

JSON = dict[str, Any]
Decision = Literal["ready", "not-ready", "pending"]


class WatchError(Exception):
    """The API server answered with an error; the watcher re-lists after a backoff."""


# -- deciding what to serve ----------------------------------------------------------------------


def decide(obj: Mapping[str, Any]) -> Decision:
    """Serve it, stop serving it, or keep the last decision (the operator is catching up)."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "not-ready"
    status = obj.get("status") or {}
    generation = meta.get("generation")
    if generation is not None and status.get("observedGeneration") != generation:
        return "pending"
    return "ready" if status.get("ready") == "True" else "not-ready"


class _Served:
    """What the gateway has been told, so each change is reported once."""

    def __init__(
        self,
        on_ready: Callable[[InferenceFunction], Awaitable[None]],
        on_gone: Callable[[str], Awaitable[None]],
    ) -> None:
        self._on_ready = on_ready
        self._on_gone = on_gone
        self.functions: dict[str, InferenceFunction] = {}
        # name -> namespace/name of the object that owns the name (first one wins).
        self._owner: dict[str, str] = {}

    async def observe(self, obj: Mapping[str, Any]) -> None:
        key, name = _key(obj), (obj.get("metadata") or {}).get("name", "")
        owner = self._owner.get(name)
        if owner is not None and owner != key:
            logger.warning(
                "InferenceFunction %s ignored: %s already serves the name %r", key, owner, name
            )
            return
        decision = decide(obj)
        if decision == "pending":
            return
        if decision == "not-ready":
            await self.forget(name)
            return
        try:
            function = parse_manifest(obj, source=key)
        except ManifestError as e:
            logger.warning("InferenceFunction %s is Ready but does not parse here: %s", key, e)
            await self.forget(name)
            return
        previous = self.functions.get(name)
        if previous is not None and previous.spec == function.spec:
            return
        self.functions[name] = function
        self._owner[name] = key
        await _guarded(self._on_ready(function), f"on_ready({name})")

    async def forget(self, name: str) -> None:
        if self.functions.pop(name, None) is not None:
            self._owner.pop(name, None)
            await _guarded(self._on_gone(name), f"on_gone({name})")

    async def deleted(self, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if self._owner.get(name) == _key(obj):
            await self.forget(name)

    async def forget_missing(self, listed: Sequence[Mapping[str, Any]]) -> None:
        """After a re-list: forget what was deleted while we were not watching."""
        present = {_key(obj) for obj in listed}
        for name, owner in sorted(self._owner.items()):
            if owner not in present:
                await self.forget(name)


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


async def _guarded(call: Awaitable[None], what: str) -> None:
    """A failing callback must not stop the watch."""
    try:
        await call
    except Exception:
        logger.exception("gateway callback %s failed", what)


# -- the watch loop ------------------------------------------------------------------------------


def functions_path(namespace: str | None) -> str:
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"/apis/{API_VERSION}{scope}/{PLURAL}"


async def watch_functions(
    *,
    namespace: str | None,
    on_ready: Callable[[InferenceFunction], Awaitable[None]],
    on_gone: Callable[[str], Awaitable[None]],
    stop: asyncio.Event,
    connection: KubeConnection | None = None,
    watch_timeout_s: int = 300,
    backoff_s: tuple[float, float] = (0.5, 30.0),
) -> None:
    """Keep the gateway in step with the Ready InferenceFunctions until ``stop`` is set.

    ``namespace=None`` watches all namespaces; function names must then be unique
    across them (the first one seen keeps a name; others are logged and ignored).
    """
    conn = connection if connection is not None else await asyncio.to_thread(KubeConnection.load)
    served = _Served(on_ready, on_gone)
    timeout = httpx.Timeout(10.0, read=watch_timeout_s + 30.0)
    async with conn.client(timeout=timeout, user_agent=_USER_AGENT) as client:
        loop = asyncio.create_task(
            _list_and_watch_forever(client, namespace, served, watch_timeout_s, backoff_s)
        )
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({loop, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop, stopper):
                task.cancel()
            await asyncio.gather(loop, stopper, return_exceptions=True)


async def _list_and_watch_forever(
    client: httpx.AsyncClient,
    namespace: str | None,
    served: _Served,
    watch_timeout_s: int,
    backoff_s: tuple[float, float],
) -> None:
    path = functions_path(namespace)
    delay = backoff_s[0]
    while True:
        try:
            resume_from: str | None = await _list(client, path, served)
            delay = backoff_s[0]
            while resume_from is not None:  # None: the server says re-list (410 Gone)
                resume_from = await _watch(client, path, resume_from, served, watch_timeout_s)
        except (httpx.HTTPError, WatchError, ValueError) as e:
            logger.warning("watching %s failed (%s); re-listing in %.1f s", path, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_s[1])


def _raise_for(response: httpx.Response) -> None:
    if not response.is_success:
        raise WatchError(
            f"HTTP {response.status_code} from {response.request.url.path}: {response.text[:200]}"
        )


async def _list(client: httpx.AsyncClient, path: str, served: _Served) -> str:
    response = await client.get(path)
    _raise_for(response)
    body = response.json()
    items: list[JSON] = body.get("items") or []
    for item in items:
        await served.observe(item)
    await served.forget_missing(items)
    return str((body.get("metadata") or {}).get("resourceVersion", ""))


async def _watch(
    client: httpx.AsyncClient, path: str, resource_version: str, served: _Served, timeout_s: int
) -> str | None:
    """Stream events; the last resourceVersion when the server ends the watch, None to re-list."""
    params = {
        "watch": "true",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(timeout_s),
    }
    if resource_version:
        params["resourceVersion"] = resource_version
    async with client.stream("GET", path, params=params) as response:
        if response.status_code == 410:
            return None
        if not response.is_success:
            await response.aread()
            _raise_for(response)
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise WatchError(f"watch error: {obj.get('message', obj)}")
            resource_version = (obj.get("metadata") or {}).get(
                "resourceVersion"
            ) or resource_version
            if kind in {"ADDED", "MODIFIED"}:
                await served.observe(obj)
            elif kind == "DELETED":
                await served.deleted(obj)
    return resource_version


# -- GPU managers --------------------------------------------------------------------------------


def manager_urls(
    slices: Sequence[Mapping[str, Any]], *, port_name: str | None = "http", scheme: str = "http"
) -> dict[str, str]:
    """``{node name: base URL}`` of the ready endpoints in EndpointSlices (addresses when unnamed)."""
    urls = {
        endpoint.get("nodeName") or address: url
        for endpoint, address, url in ready_endpoints(slices, port_name=port_name, scheme=scheme)
    }
    return dict(sorted(urls.items()))


def ready_endpoints(
    slices: Sequence[Mapping[str, Any]], *, port_name: str | None = "http", scheme: str = "http"
) -> Iterator[tuple[Mapping[str, Any], str, str]]:
    """Each ready endpoint address in EndpointSlices, with its base URL on the named port:
    ``(endpoint, address, url)``. Endpoints whose ``ready`` condition is false are left out."""
    for endpoint_slice in slices:
        ports = endpoint_slice.get("ports") or []
        port = next(
            (p.get("port") for p in ports if port_name is None or p.get("name") == port_name), None
        )
        if port is None:
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                yield endpoint, address, f"{scheme}://{_host(address)}:{port}"


def _endpoints_as_slices(endpoints: Mapping[str, Any]) -> list[JSON]:
    """Core v1 Endpoints in EndpointSlice shape (only ready addresses are in ``addresses``)."""
    return [
        {
            "ports": subset.get("ports") or [],
            "endpoints": [
                {
                    "addresses": [a["ip"]],
                    "nodeName": a.get("nodeName"),
                    "conditions": {"ready": True},
                }
                for a in subset.get("addresses") or []
            ],
        }
        for subset in endpoints.get("subsets") or []
    ]


def _host(address: str) -> str:
    with contextlib.suppress(ValueError):
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            return f"[{address}]"
    return address


async def gpu_manager_urls(
    *,
    namespace: str,
    service: str,
    port_name: str | None = "http",
    scheme: str = "http",
    connection: KubeConnection | None = None,
) -> dict[str, str]:
    """``{node name: base URL}`` of the GPU managers behind ``service`` that are ready."""
    conn = connection if connection is not None else await asyncio.to_thread(KubeConnection.load)
    async with conn.client(timeout=10.0, user_agent=_USER_AGENT) as client:
        label = "kubernetes.io/service-name"
        response = await client.get(
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            params={"labelSelector": f"{label}={service}"},
        )
        if response.status_code == 404:  # no discovery API: fall back to core Endpoints
            response = await client.get(f"/api/v1/namespaces/{namespace}/endpoints/{service}")
            if response.status_code == 404:
                return {}
            _raise_for(response)
            slices = _endpoints_as_slices(response.json())
        else:
            _raise_for(response)
            items: list[JSON] = response.json().get("items") or []
            slices = [
                s
                for s in items
                if ((s.get("metadata") or {}).get("labels") or {}).get(label) == service
            ]
    return manager_urls(slices, port_name=port_name, scheme=scheme)


async def discover_gpu_managers(
    *,
    namespace: str,
    service: str,
    port_name: str | None = "http",
    scheme: str = "http",
    connection: KubeConnection | None = None,
) -> list[str]:
    """Base URLs of the ready GPU managers behind ``service`` (see :func:`gpu_manager_urls`)."""
    urls = await gpu_manager_urls(
        namespace=namespace,
        service=service,
        port_name=port_name,
        scheme=scheme,
        connection=connection,
    )
    return sorted(set(urls.values()))
