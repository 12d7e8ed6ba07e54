"""The gateway's view of its GPU managers: nodes, their devices, and health.

Each node is one GPU-manager process reached over HTTP. The cluster keeps the
cache directory (:class:`gpufaas.cache.ClusterDirectory`) in step with what
the managers report: optimistically at dispatch, from every response, and by a
full re-sync of each node's state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError

from gpufaas.cache import ClusterDirectory, DeviceKind, Residency
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.frames import FramedEndpoint
from gpufaas.core.node import FUNCTION, STATE, DeviceState, NodeState, route

logger = logging.getLogger(__name__)
_NO_NODES: frozenset[str] = frozenset()


@dataclass
class Device:
    key: str  # "<node>/<device id>"
    node: Node
    device_id: str
    capacity_bytes: int


@dataclass
class Node:
    name: str
    url: str
    client: httpx.AsyncClient
    healthy: bool = False
    devices: dict[str, Device] = field(default_factory=dict)
    framed: FramedEndpoint | None = None  # where it serves framed inference, from its state


def residents_from_state(device_state: DeviceState) -> list[tuple[str, Residency, int]]:
    return [(r.model, r.state, r.size_bytes) for r in device_state.residents]


class Cluster:
    """GPU managers behind the gateway, and where each model lives on them."""

    def _add_to_directory(self, key: str, node: str, device_state: DeviceState) -> None:
        """A device with its budget and kind: a full GPU, or a MIG slice with its profile."""
        self.directory.add_device(
            key,
            capacity_bytes=device_state.capacity_bytes,
            node=node,
            kind=DeviceKind.MIG if device_state.mig else DeviceKind.GPU,
            profile=device_state.mig_profile,
        )

    def __init__(
        self,
        *,
        manager_urls: Mapping[str, str],
        timeout_s: float = 120.0,
        manager_token: str | None = None,
    ) -> None:
        self.directory = ClusterDirectory()
        # GPU managers accept work only from a gateway holding the shared secret.
        self.manager_token = manager_token
        self._headers = {"Authorization": f"Bearer {manager_token}"} if manager_token else {}
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self.nodes: dict[str, Node] = {}
        self.devices: dict[str, Device] = {}
        # model -> nodes with a staged copy (host tier or disk), from the nodes' reports
        self._staged: dict[str, set[str]] = {}
        for name, url in manager_urls.items():
            self._add_node(name, url)

    def _add_node(self, name: str, url: str) -> Node:
        node = Node(
            name=name,
            url=url.rstrip("/"),
            client=httpx.AsyncClient(
                base_url=url.rstrip("/"),
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                headers=self._headers,
            ),
        )
        self.nodes[name] = node
        return node

    async def set_managers(self, manager_urls: Mapping[str, str]) -> None:
        """Adopt a new membership (Kubernetes discovery): add new nodes, drop gone ones."""
        for name, node in list(self.nodes.items()):
            if manager_urls.get(name, "").rstrip("/") != node.url:
                self.mark_down(node)
                for device in node.devices.values():
                    self.devices.pop(device.key, None)
                del self.nodes[name]
                await node.client.aclose()
        for name, url in manager_urls.items():
            if name not in self.nodes:
                self._add_node(name, url)

    async def close(self) -> None:
        await asyncio.gather(*(n.client.aclose() for n in self.nodes.values()))

    def healthy_devices(self) -> list[Device]:
        return [d for d in self.devices.values() if d.node.healthy]

    def staged_nodes(self, model: str) -> Collection[str]:
        """The nodes holding a host-tier or disk copy of ``model`` (LALB's ``staged``)."""
        return self._staged.get(model, _NO_NODES)

    def _note_staged(self, node: str, state: NodeState | None) -> None:
        """Replace what ``node`` holds staged by its report (None: the node is gone)."""
        held: set[str] = set()
        if state is not None:
            held = {r.model for r in state.host.residents if r.state is Residency.RESIDENT}
            if state.disk is not None:
                held.update(r.model for r in state.disk.residents if r.state is Residency.RESIDENT)
        for model in [m for m, nodes in self._staged.items() if node in nodes and m not in held]:
            self._staged[model].discard(node)
            if not self._staged[model]:
                del self._staged[model]
        for model in held:
            self._staged.setdefault(model, set()).add(node)

    @staticmethod
    async def _read_state(node: Node) -> httpx.Response:
        """GET the node's state; once more on a fresh connection if a kept-alive one was closed
        under the request (the manager's idle timeout racing our reuse): that is no sign of a
        dead node, and calling it down would refuse every request until the next sync."""
        try:
            return await node.client.get(STATE, timeout=5.0)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await node.client.get(STATE, timeout=5.0)

    async def sync_node(self, node: Node) -> bool:
        """Re-read a node's devices and residents; a failure marks it down."""
        try:
            response = await self._read_state(node)
            response.raise_for_status()
            state = NodeState.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError) as e:
            if node.healthy:
                logger.warning("GPU manager %s (%s) is down: %s", node.name, node.url, e)
            self.mark_down(node)
            return False
        node.framed = state.framed
        seen = set()
        for device_state in state.devices:
            key = f"{node.name}/{device_state.id}"
            seen.add(key)
            device = self.devices.get(key)
            if device is None:
                device = Device(
                    key=key,
                    node=node,
                    device_id=device_state.id,
                    capacity_bytes=device_state.capacity_bytes,
                )
                self.devices[key] = device
                node.devices[device.device_id] = device
                self._add_to_directory(key, node.name, device_state)
            elif key not in self.directory.devices():
                self._add_to_directory(key, node.name, device_state)
            self.directory.sync(key, residents_from_state(device_state))
        for key in [k for k, d in self.devices.items() if d.node is node and k not in seen]:
            self.directory.remove_device(key)
            node.devices.pop(self.devices.pop(key).device_id, None)
        self._note_staged(node.name, state)
        if not node.healthy:
            logger.info(
                "GPU manager %s (%s) is up with %d device(s)", node.name, node.url, len(seen)
            )
        node.healthy = True
        return True

    def mark_down(self, node: Node) -> None:
        node.healthy = False
        self._note_staged(node.name, None)
        for device in node.devices.values():
            if device.key in self.directory.devices():
                self.directory.remove_device(device.key)

    async def sync_all(self) -> None:
        await asyncio.gather(*(self.sync_node(n) for n in self.nodes.values()))

    async def push_function(self, node: Node, name: str, spec: InferenceFunctionSpec) -> None:
        response = await node.client.put(
            route(FUNCTION, name=name), json=spec.model_dump(mode="json", by_alias=True)
        )
        response.raise_for_status()

    async def push_functions(
        self, node: Node, functions: Mapping[str, InferenceFunctionSpec]
    ) -> None:
        await asyncio.gather(*(self.push_function(node, n, s) for n, s in functions.items()))

    async def delete_function(self, name: str) -> None:
        async def one(node: Node) -> None:
            try:
                await node.client.delete(route(FUNCTION, name=name))
            except httpx.HTTPError as e:
                logger.warning("could not remove %s from %s: %s", name, node.name, e)

        await asyncio.gather(*(one(n) for n in self.nodes.values() if n.healthy))
        for key in self.directory.devices():
            self.directory.note_evicted(key, name)
