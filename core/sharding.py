"""The typed contract between a shard set's coordinator and the nodes that hold its shards.

Routes on a GPU manager (path constants in :mod:`gpufaas.core.node`):

* ``PUT    /v2/gpufaas/shards/{set}/{shard}`` with a :class:`ShardLoad`: load this shard and
  forward each child's :class:`ShardLoad` to its node at the same time (the launch tree);
  answers a :class:`LaunchReport` for the whole subtree.
* ``POST   /v2/gpufaas/shards/{set}/{shard}/infer``: one request; the body is a channel frame
  (:func:`gpufaas.core.channels.encode`) of the shard's input rows, the answer a frame of its
  output rows. ``X-Gpufaas-Request-Id`` and ``X-Gpufaas-Timeout-S`` headers.
* ``POST   /v2/gpufaas/shards/{set}/{shard}/messages``: a direct-channel message.
* ``DELETE /v2/gpufaas/shards/{set}/{shard}``: unload.

Between shards of one node no route is used: :class:`Handed` carries a part from one device
to another inside the node (``gpu_manager/shards.py``).

Failures answer ``{"error": ...}`` with ``X-Gpufaas-Reason`` (``ShardTimeout``,
``ShardUnreachable``, ``ChannelUnavailable``, ``ShardNotLoaded``) and, for shard faults,
``X-Gpufaas-Shard`` naming the shard at fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufaas.core import node
from gpufaas.core.api import Parallelism  # spec.parallelism; re-exported for shard sets

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHANNEL_ENV",
    "REQUEST_ID_HEADER",
    "SHARD_HEADER",
    "SHARD_INFER_PATH",
    "SHARD_PATH",
    "TIMEOUT_HEADER",
    "ChannelConfig",
    "Handed",
    "LaunchReport",
    "Parallelism",
    "ShardLoad",
    "channel_for",
]

SHARD_PATH = node.SHARD
SHARD_INFER_PATH = node.SHARD_INFER
REQUEST_ID_HEADER = "x-gpufaas-request-id"
TIMEOUT_HEADER = "x-gpufaas-timeout-s"
SHARD_HEADER = "x-gpufaas-shard"
# The channel server `gpufaas up --channel` started: a ChannelConfig as JSON.
CHANNEL_ENV = "GPUFAAS_FSD_CHANNEL"


@dataclasses.dataclass(frozen=True)
class Handed:
    """A partial result handed from one shard to another on the same node, device to device
    (``gpu_manager/devices.py: DeviceBackend.hand_over``), never through a channel: ``values``
    on the receiving shard's device, and ``ready``, what the receiver's compute waits for
    before reading them (a CUDA event; None where they are ready as they are)."""

    values: torch.Tensor
    ready: Any = None


class ChannelConfig(BaseModel):
    """Where a shard set's channel lives (the node connects with it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["direct", "nats", "s3", "local"] = "direct"
    # direct: nodes on one host exchange through shared memory (core/hostlink.py), not HTTP
    shared_memory: bool = True
    nats_url: str | None = None
    durable: bool = False  # NATS: JetStream, surviving a server restart
    s3_endpoint: str | None = None
    s3_bucket: str | None = None
    s3_key: str | None = None
    s3_secret: str | None = None


class ShardLoad(BaseModel):
    """Load one shard; ``children`` are loaded by this node's request to theirs (a tree)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    set_name: str
    shard: int = Field(ge=0)
    shards: int = Field(ge=1)
    artifact: str  # a URI the node's artifact store can fetch (file://, s3://, https://)
    sha256: str | None = None
    node: str  # this shard's node base URL (what peers dial for the direct channel)
    peers: dict[int, str]  # shard -> node base URL, for the direct channel
    channel: ChannelConfig = ChannelConfig()
    children: list[ShardLoad] = []


class LaunchReport(BaseModel):
    """What a subtree's launch did: per shard, its bytes and the seconds it took to load."""

    loaded: dict[int, int] = {}  # shard -> weight bytes
    seconds: dict[int, float] = {}
    depth: int = 0  # rounds of the tree below and including this node
    errors: dict[int, str] = {}


def channel_for(kind: str, environ: Mapping[str, str]) -> ChannelConfig:
    """The channel of kind ``kind``: the configured server's (``CHANNEL_ENV``) if it is one."""
    configured = environ.get(CHANNEL_ENV)
    if configured:
        config = ChannelConfig.model_validate_json(configured)
        if config.kind == kind:
            return config
    return ChannelConfig(kind=kind)  # type: ignore[arg-type]
