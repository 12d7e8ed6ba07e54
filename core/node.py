"""The node contract: what a GPU manager reports about itself, and the paths it serves.

The GPU manager (``gpufaas.gpu_manager.server``) builds a :class:`NodeState` and serves it at
:data:`STATE`; the gateway's cluster client (``gpufaas.scheduler.cluster``) parses the same model.
Neither side spells a route or a state key itself: both take them from here, so a renamed field or
path is one change that mypy follows to every use.

Residency states are :class:`gpufaas.cache.Residency`, the one enum that the LRU, the cluster
directory and this contract share.

Device facts that the device layer adds beyond the typed fields (driver versions, MIG profiles)
pass through :class:`DeviceState` unchanged (``extra="allow"``), so a newer node stays readable by
an older gateway and the other way round.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from gpufaas.cache import Residency
from gpufaas.core.frames import FramedEndpoint

__all__ = [
    "DEMOTE",
    "FUNCTION",
    "HEALTH_LIVE",
    "HEALTH_READY",
    "LOAD_ORDER",
    "MODEL_INFER",
    "MODEL_INFER_PATH",
    "MODEL_LOAD",
    "MODEL_UNLOAD",
    "PREFETCH",
    "STATE",
    "DeviceState",
    "DiskState",
    "DrainingState",
    "HostState",
    "LoadOrder",
    "LoadOrderTaken",
    "NodeState",
    "Residency",
    "ResidentState",
    "SkeletonState",
    "Throughput",
    "route",
]

# --- routes (FastAPI path templates; fill them with :func:`route`) ---------------------------------

HEALTH_LIVE = "/v2/health/live"
HEALTH_READY = "/v2/health/ready"
STATE = "/v2/gpufaas/state"
FUNCTION = "/v2/gpufaas/functions/{name}"  # PUT a spec, DELETE it
MODEL_INFER = "/v2/models/{name}/infer"
# MODEL_INFER as a pattern, with KServe v2's optional version: what the gateway's front and its
# replicas' ingress both match (the name is the ``name`` group).
MODEL_INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/[^/]+)?/infer$")
MODEL_LOAD = "/v2/repository/models/{name}/load"
MODEL_UNLOAD = "/v2/repository/models/{name}/unload"
# Predictive residency (docs/prediction.md): load ahead of a request, at the lowest priority;
# drop a device copy, keeping the host copy. Bodies: {"model", "device"[, "size_bytes"]}.
PREFETCH = "/v2/gpufaas/prefetch"
DEMOTE = "/v2/gpufaas/demote"
# Scale-out (#16), forwarding "decision": the placement owner orders a load as it answers a
# peer's question, and the peer's request joins it in flight. Body: LoadOrder; 202 LoadOrderTaken.
LOAD_ORDER = "/v2/gpufaas/load-orders"
# Shards of models split across nodes (gpu_manager/shards.py, core/sharding.py).
SHARD = "/v2/gpufaas/shards/{set_name}/{shard}"  # PUT a ShardLoad (a launch tree), DELETE it
SHARD_INFER = "/v2/gpufaas/shards/{set_name}/{shard}/infer"
SHARD_MESSAGES = "/v2/gpufaas/shards/{set_name}/{shard}/messages"  # direct-channel messages
SHARDS = "/v2/gpufaas/shards"  # GET: the node's shards
EXECUTIONS = "/v2/gpufaas/executions"  # forward passes run per request id (issue #12)
# GET: the answer of a keyed (forwarded) request this node ran or runs (scale-out #16)
REQUEST_ANSWER = "/v2/gpufaas/requests/{key}"


def route(template: str, *, name: str) -> str:
    """A path template with its ``{name}`` filled in: ``route(MODEL_LOAD, name="m")``."""
    return template.format(name=name)


# --- state ------------------------------------------------------------------------------------------


class PrefetchQueued(BaseModel):
    """The node's answer to a prefetch (:data:`PREFETCH`): queued or not, and the ticket to
    ask for its outcome at ``PREFETCH/<ticket>`` (None from a node older than tickets)."""

    queued: bool
    ticket: int | None = Field(default=None, ge=1)


class PrefetchOutcome(BaseModel):
    """A queued prefetch's outcome (``PREFETCH/<ticket>``): ``loaded``, ``busy``,
    ``no-room``, ``failed``, ``preempted``..., or None while it has none."""

    result: str | None = None


class LoadOrder(BaseModel):
    """A load ordered ahead of a request (:data:`LOAD_ORDER`): ``model`` onto ``device``,
    evicting ``victims`` first if room must be made, as that request's own load would."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=512)
    device: str = Field(min_length=1, max_length=512)
    victims: list[str] = Field(default_factory=list, max_length=1024)


class LoadOrderTaken(BaseModel):
    """The node's answer to a load order: ``started`` (the load is under way), ``present``
    (resident or arriving already: nothing to do) or ``busy`` (no free slot on the device:
    the request loads it itself, as without an order)."""

    result: str


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResidentState(_State):
    """One model in a tier (device or host), least recently used first in its list."""

    model: str
    state: Residency
    size_bytes: int = Field(ge=0, description="The entry: arena bytes plus, on a device, reserve.")
    pins: int = Field(ge=0)
    weights_bytes: int | None = None
    arena_bytes: int | None = None
    reserve_bytes: int | None = None
    source: str | None = None  # device: "host" | "peer:<id>"; host: "artifact" | "sidecar"
    arrived: bool | None = None  # device: every copy group has landed
    groups: int | None = None
    pinned: bool | None = None  # host: page-locked


class DrainingState(_State):
    """A model unloaded while in use: its bytes stay reserved until its last hold ends."""

    model: str
    size_bytes: int = Field(ge=0)
    holds: int = Field(ge=0)


class DeviceState(BaseModel):
    """One device of the node and its tier. Typed fields are the contract; facts the device
    layer adds ride along (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    kind: str  # "cuda" | "cpu"
    index: int = 0  # torch's CUDA ordinal; a counter for CPU stand-ins
    name: str
    uuid: str
    total_bytes: int = Field(ge=0)
    capacity_bytes: int = Field(ge=0)
    free_bytes: int | None = None
    pcie: dict[str, int] = Field(default_factory=dict)  # generation, width, max_*
    pcie_gbps: float | None = None
    mig: bool = False
    parent_uuid: str | None = None
    mig_profile: str | None = None  # "3g.40gb" for a MIG slice
    peers: list[str] = Field(default_factory=list)
    nvlink_peers: list[str] = Field(default_factory=list)
    used_bytes: int = Field(default=0, ge=0)
    free_cache_bytes: int = Field(default=0, ge=0)
    outstanding: int = Field(default=0, ge=0)
    max_concurrency: int = Field(default=1, ge=1)
    memory_allocated: int | None = None
    memory_reserved: int | None = None  # what the CUDA caching allocator holds
    pooled_bytes: int = Field(default=0, ge=0)
    residents: list[ResidentState] = Field(default_factory=list)
    draining: list[DrainingState] = Field(default_factory=list)


class SkeletonState(_State):
    """A registered model's weightless skeleton and what its layout measured."""

    weights_bytes: int = Field(ge=0)
    arena_bytes: int = Field(ge=0)
    reserve_bytes: int = Field(ge=0)
    groups: int = Field(ge=0)
    tensors: int = Field(ge=0)
    probe_error: str | None = None
    sidecar: str | None = None
    backend: str | None = None  # the model format's backend


class HostState(_State):
    capacity_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)
    pinned: bool
    pooled_bytes: int = Field(ge=0)
    residents: list[ResidentState] = Field(default_factory=list)
    draining: list[DrainingState] = Field(default_factory=list)
    skeletons: dict[str, SkeletonState] = Field(default_factory=dict)


class DiskState(_State):
    """The disk tier: loading-optimised sidecars on node-local disk, within their own budget."""

    capacity_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)
    residents: list[ResidentState] = Field(default_factory=list)


class Throughput(_State):
    """Bytes moved along one path, and the seconds it took."""

    bytes: int = Field(ge=0)
    seconds: float = Field(ge=0)
    count: int = Field(ge=0)
    gbps: float = Field(ge=0)


class NodeState(_State):
    """``GET /v2/gpufaas/state``: devices and every tier with byte-exact sizes."""

    devices: list[DeviceState]
    host: HostState
    disk: DiskState | None = None
    functions: list[str] = Field(default_factory=list)
    stats: dict[str, dict[str, int]] = Field(default_factory=dict)
    loads: dict[str, Throughput] = Field(default_factory=dict)  # "host->device", "device->device"
    host_fills: dict[str, Throughput] = Field(default_factory=dict)  # "artifact", "sidecar"
    unservable: dict[str, str] = Field(
        default_factory=dict, description="Registered models this node cannot run, and why."
    )
    platform: dict[str, str | None] = Field(
        default_factory=dict, description="torch, the CUDA it was built for, and the driver."
    )
    ready: bool = True  # False after a fatal device error: the manager is exiting
    # Where the node serves framed inference (core/frames.py), if it does.
    framed: FramedEndpoint | None = None
    failure: str | None = None

    def device(self, device_id: str) -> DeviceState:
        """The device named ``device_id``; KeyError if the node has none."""
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError(device_id)
