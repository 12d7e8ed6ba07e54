"""A small async Kubernetes API client over httpx, for the operator's own reads and writes.

kopf watches and dispatches; this client fetches children by name, creates them,
and sends JSON merge patches (which replace lists whole, so a rollout really
replaces a container spec). Connection details come from the ``kubernetes``
package's loaders: the in-cluster service account first, then ``$KUBECONFIG``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from gpufaas.core.kubeclient import KubeConnection

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """A resource's apiVersion and plural: enough to build its URLs."""

    api_version: str
    plural: str

    def path(
        self, namespace: str | None, name: str | None = None, subresource: str | None = None
    ) -> str:
        prefix = (
            f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"
        )
        parts = [prefix]
        if namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


JOBS = Kind("batch/v1", "jobs")
DEPLOYMENTS = Kind("apps/v1", "deployments")
SERVICES = Kind("v1", "services")
PODS = Kind("v1", "pods")


class ApiError(Exception):
    """A non-success answer from the API server, with its status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Conflict(ApiError):
    """409: the object exists already (create) or changed meanwhile."""


class KubeApi:
    """get/list/create/patch/delete of namespaced objects as plain dicts."""

    def __init__(self, connection: KubeConnection, *, timeout_s: float = 10.0) -> None:
        self._client = connection.client(timeout=timeout_s, user_agent="gpufaas-operator")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._client.request(method, path, **kwargs)

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            message = str(response.json().get("message", response.text))
        except ValueError:
            message = response.text
        error = Conflict if response.status_code == 409 else ApiError
        raise error(response.status_code, message[:500])

    async def get(self, kind: Kind, namespace: str, name: str) -> JSON | None:
        response = await self._request("GET", kind.path(namespace, name))
        if response.status_code == 404:
            return None
        self._raise_for(response)
        body: JSON = response.json()
        return body

    async def list(self, kind: Kind, namespace: str, *, labels: Mapping[str, str]) -> list[JSON]:
        """Objects carrying all ``labels``: filtered by the server, and again here."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        response = await self._request(
            "GET", kind.path(namespace), params={"labelSelector": selector}
        )
        self._raise_for(response)
        items: list[JSON] = response.json().get("items") or []
        return [
            item
            for item in items
            if all(
                (item.get("metadata", {}).get("labels") or {}).get(k) == v
                for k, v in labels.items()
            )
        ]

    async def create(self, kind: Kind, namespace: str, body: Mapping[str, Any]) -> JSON:
        response = await self._request("POST", kind.path(namespace), json=dict(body))
        self._raise_for(response)
        created: JSON = response.json()
        return created

    async def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> JSON | None:
        """JSON merge patch; None if the object is gone."""
        response = await self._request(
            "PATCH",
            kind.path(namespace, name, subresource),
            json=dict(body),
            headers={"Content-Type": MERGE_PATCH},
        )
        if response.status_code == 404:
            return None
        self._raise_for(response)
        patched: JSON = response.json()
        return patched

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete with background propagation (dependents go too); False if already gone."""
        response = await self._request(
            "DELETE",
            kind.path(namespace, name),
            json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )
        if response.status_code == 404:
            return False
        self._raise_for(response)
        return True
