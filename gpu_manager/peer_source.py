"""Peer copies: a device loads a model from a neighbouring device that holds it (NVLink/P2P).

Not a tier of its own (it owns no memory): it looks through the device tiers this device has peer
access to for a finished copy of the same weights, holds it there for the length of the copy (so it
cannot be evicted under the copy), and hands it out as a copy source. A miss falls through to the
host tier. MIG instances have no peers, so they never copy this way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Protocol

from gpufaas.cache import CacheStats, TierStats
from gpufaas.gpu_manager.backends import CopySource
from gpufaas.gpu_manager.chain import Held
from gpufaas.gpu_manager.device_memory import Resident
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.residency import Tier

__all__ = ["PeerSource", "PeerView"]


class PeerView(Protocol):
    """What the peer source needs of one device: its backend and its tier."""

    @property
    def backend(self) -> DeviceBackend: ...

    @property
    def tier(self) -> Tier[Resident]: ...


class PeerSource:
    """Finished device copies that a device with peer access can copy from."""

    name = "peer"

    def __init__(self, *, devices: Callable[[], Mapping[str, PeerView]], stats: CacheStats) -> None:
        self._devices = devices
        self._stats = stats

    def acquire(self, model: str, fingerprint: str, *, to: DeviceInfo) -> Held[CopySource] | None:
        """A neighbour's copy of ``model`` (these weights), held until the copy is done; None if
        no peer of ``to`` has a finished one."""
        devices = self._devices()
        for peer_id in to.peers:
            peer = devices.get(peer_id)
            if peer is None:
                continue
            entry = peer.tier.entry(model)
            found = entry.value if entry is not None else None
            if (
                not isinstance(found, DeviceModel)  # absent, or a shard
                or not found.arrived
                or found.arena is None
                or found.fingerprint != fingerprint
                or not peer.tier.hold(model, found)
            ):
                continue
            self._stats.record_hit(self.name)
            source = CopySource(found.arena, peer.backend, f"peer:{peer_id}")
            return Held(source, True, functools.partial(peer.tier.unhold, model, found))
        self._stats.record_miss(self.name)
        return None

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)
