"""Where the shards of a parallel function go: a plan over the gateway's live devices.

The operator reports a placement for each shard of a function with
``spec.parallelism`` in ``status.shards``. It plans it from what the gateway knows
(``GET /v2/gpufaas/cluster``: healthy GPU managers and their devices), spreading
shards over nodes first so that shards run in parallel and a node failure takes
as few as possible. The plan is deterministic: the same cluster gives the same
placement on every resync, so the status does not churn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

CLUSTER_PATH = "/v2/gpufaas/cluster"


@dataclass(frozen=True, order=True)
class DeviceSlot:
    node: str
    device: str


def devices_from_cluster(state: Mapping[str, Any]) -> list[DeviceSlot]:
    """The devices of healthy nodes in the gateway's cluster view (keys are ``node/device``)."""
    healthy = {n.get("name") for n in state.get("nodes") or [] if n.get("healthy")}
    slots = []
    for device in state.get("devices") or []:
        node, _, device_id = str(device.get("key", "")).partition("/")
        if node in healthy and device_id:
            slots.append(DeviceSlot(node=node, device=device_id))
    return sorted(set(slots))


def plan_shards(devices: Sequence[DeviceSlot], shards: int) -> list[dict[str, Any]]:
    """Shard ``i`` -> a device, round-robin over nodes, then over each node's devices.

    With fewer devices than shards, devices take several shards (in the same order).
    No devices: no plan (an empty list).
    """
    by_node: dict[str, list[DeviceSlot]] = {}
    for slot in sorted(devices):
        by_node.setdefault(slot.node, []).append(slot)
    order: list[DeviceSlot] = []
    for depth in range(max((len(v) for v in by_node.values()), default=0)):
        order += [slots[depth] for slots in by_node.values() if depth < len(slots)]
    if not order:
        return []
    return [
        {"index": i, "node": order[i % len(order)].node, "device": order[i % len(order)].device}
        for i in range(shards)
    ]


async def fetch_devices(
    gateway_base: str, *, token: str | None, timeout_s: float = 3.0
) -> list[DeviceSlot] | None:
    """The gateway's healthy devices, or None when the gateway cannot say (down, refused)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(gateway_base + CLUSTER_PATH, headers=headers)
        response.raise_for_status()
        return devices_from_cluster(response.json())
    except (httpx.HTTPError, ValueError) as e:
        logger.warning("cannot read the gateway's devices for shard placement: %s", e)
        return None
