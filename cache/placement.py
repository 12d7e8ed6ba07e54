"""Where a model should go among devices of different kinds: full GPUs and MIG slices.

A MIG slice is a device with its own memory budget and profile ("2g.20gb") and no peer-to-peer
access: no copy is ever planned to or from one. A model goes on the *smallest* device whose
budget fits it (best fit), so large models keep the large slices and full GPUs. Pure functions
over :class:`DeviceSlot` descriptions; the cluster directory keeps one per device.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class DeviceKind(enum.StrEnum):
    GPU = "gpu"  # a whole GPU (or a CPU stand-in)
    MIG = "mig"  # a MIG slice of a GPU


@dataclass(frozen=True)
class DeviceSlot:
    """What placement needs to know about one device."""

    device_id: str
    kind: DeviceKind
    capacity_bytes: int  # the model cache's budget on it
    profile: str | None = None  # "3g.40gb" for a slice


def best_fit(slots: Iterable[DeviceSlot], nbytes: int) -> list[str]:
    """The devices whose budget fits ``nbytes``, best fit first: the smallest budget first
    (ties by id, so the order is stable). Devices too small are left out."""
    fitting = [s for s in slots if s.capacity_bytes >= nbytes]
    return [s.device_id for s in sorted(fitting, key=lambda s: (s.capacity_bytes, s.device_id))]


def fits_tighter(a: DeviceSlot, b: DeviceSlot, nbytes: int) -> bool:
    """Whether ``a`` is the better fit for ``nbytes`` than ``b``: both fit and ``a``'s budget is
    strictly smaller. Equal budgets are no reason to move: a tie by id would override the
    caller's own order (LALB's least-waiting first) on every cluster of equal GPUs."""
    return nbytes <= a.capacity_bytes < b.capacity_bytes


def may_copy_between(a: DeviceSlot, b: DeviceSlot) -> bool:
    """Whether a peer-to-peer copy between the two may be planned: never to or from a slice."""
    return a.device_id != b.device_id and DeviceKind.MIG not in (a.kind, b.kind)
