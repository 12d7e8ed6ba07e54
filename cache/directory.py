"""The scheduler's cluster-wide view of which models are on which GPU.

Each device's view is a :class:`~gpufaas.cache.lru.ByteLRU` that mirrors the GPU manager's own
cache on that device: the scheduler updates it *optimistically* when it dispatches a request
(:meth:`ClusterDirectory.note_dispatch` predicts the load and the victims the GPU manager will
evict: the scheduler's hinted ones first, then least-recently used), and the GPU manager's
reports correct it (:meth:`~ClusterDirectory.note_loaded`, :meth:`~ClusterDirectory.note_evicted`,
and the authoritative :meth:`~ClusterDirectory.sync`).
A model->devices index answers "where is model M?" without scanning devices.

Invariants: a device's view never holds more bytes than its capacity, and the index lists a device
for a model exactly when that device's view holds the model. A model still loading is pinned in the
view (it is not predicted as a victim), matching the GPU manager, which never evicts a model in use.

Each device has a ``version`` bumped on every change to its view, so a caller can tell whether a
view changed since it last looked; :meth:`~ClusterDirectory.sync` also takes the report's sequence
number and ignores a report older than one already applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

from gpufaas.cache.lru import (
    ByteLRU,
    CacheError,
    EntryState,
    InsufficientCapacity,
    Residency,
    UnknownKey,
    check_size,
)
from gpufaas.cache.placement import DeviceKind, DeviceSlot, best_fit, fits_tighter, may_copy_between


class UnknownDevice(UnknownKey):
    """The device is not in the directory."""


class DeviceExists(CacheError):
    """A device with this id is already in the directory."""


class InvalidReport(CacheError, ValueError):
    """A GPU manager's report cannot be a true state of the device."""


@dataclasses.dataclass
class _Device:
    device_id: str
    node: str
    view: ByteLRU[None]
    slot: DeviceSlot
    version: int = 0
    report_seq: int | None = None


_EMPTY: frozenset[str] = frozenset()


class ClusterDirectory:
    """Where every model is, per device, as the scheduler best knows it."""

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}
        self._holders: dict[str, set[str]] = {}  # model -> device ids whose view holds it
        self._by_node: dict[str, dict[str, None]] = {}  # node -> its device ids, in added order
        self._slices = 0  # MIG slices among the devices

    def __repr__(self) -> str:
        return f"<ClusterDirectory {len(self._devices)} devices, {len(self._holders)} models>"

    # -- devices -------------------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        *,
        capacity_bytes: int,
        node: str = "",
        kind: DeviceKind = DeviceKind.GPU,
        profile: str | None = None,
    ) -> None:
        """Register an empty device (a full GPU, or a MIG slice with its ``profile``);
        :class:`DeviceExists` if the id is taken."""
        if device_id in self._devices:
            raise DeviceExists(f"device {device_id!r} is already in the directory")
        view: ByteLRU[None] = ByteLRU(
            capacity_bytes=check_size(capacity_bytes, what=f"capacity_bytes of {device_id!r}")
        )
        slot = DeviceSlot(device_id, DeviceKind(kind), capacity_bytes, profile)
        self._devices[device_id] = _Device(device_id=device_id, node=node, view=view, slot=slot)
        self._by_node.setdefault(node, {})[device_id] = None
        if slot.kind is DeviceKind.MIG:
            self._slices += 1

    def remove_device(self, device_id: str) -> list[str]:
        """Forget a device (its node died or left) and every model on it; return those models."""
        device = self._device(device_id)
        models = device.view.keys_lru()
        for model in models:
            self._unindex(model, device_id)
        if device.slot.kind is DeviceKind.MIG:
            self._slices -= 1
        del self._devices[device_id]
        on_node = self._by_node[device.node]
        del on_node[device_id]
        if not on_node:
            del self._by_node[device.node]
        return models

    def remove_node(self, node: str) -> dict[str, list[str]]:
        """Forget every device of ``node``; return the models dropped per device."""
        return {
            device_id: self.remove_device(device_id) for device_id in self.devices_on_node(node)
        }

    def devices(self) -> list[str]:
        """Device ids, in the order they were added."""
        return list(self._devices)

    def devices_on_node(self, node: str) -> list[str]:
        """The node's device ids, in the order they were added (indexed: the routing policy
        asks this per decision when a model has staged copies)."""
        return list(self._by_node.get(node, ()))

    def node(self, device_id: str) -> str:
        return self._device(device_id).node

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def slot(self, device_id: str) -> DeviceSlot:
        """The device's kind, budget and MIG profile."""
        return self._device(device_id).slot

    @property
    def has_slices(self) -> bool:
        """Whether any device is a MIG slice (placement then prefers the best fit)."""
        return self._slices > 0

    def best_fit(self, nbytes: int, *, among: Iterable[str] | None = None) -> list[str]:
        """Devices (``among`` them, default all) whose budget fits ``nbytes``, best fit first."""
        ids = self._devices if among is None else among
        return best_fit((self._devices[d].slot for d in ids if d in self._devices), nbytes)

    def fits_tighter(self, a: str, b: str, nbytes: int) -> bool:
        """Whether ``a`` is a better (smaller, still fitting) home for ``nbytes`` than ``b``."""
        return fits_tighter(self.slot(a), self.slot(b), nbytes)

    def copy_sources(self, model: str, target: str) -> list[str]:
        """Devices on ``target``'s node with ``model`` resident that it may copy from peer to
        peer: never to or from a MIG slice (slices have no P2P or CUDA IPC)."""
        node, slot = self.node(target), self.slot(target)
        return [
            d
            for d in sorted(self._holders.get(model, ()))
            if self._devices[d].node == node
            and may_copy_between(self._devices[d].slot, slot)
            and self.state(d, model) is Residency.RESIDENT
        ]

    # -- queries -------------------------------------------------------------------------------

    def holders(self, model: str) -> dict[str, Residency]:
        """The devices whose view holds ``model``, with its state there."""
        result: dict[str, Residency] = {}
        for device_id in self._holders.get(model, ()):
            entry = self._devices[device_id].view.peek(model)
            assert entry is not None, "holders index out of step with a device view"
            result[device_id] = entry.state
        return result

    def state(self, device_id: str, model: str) -> Residency | None:
        """``model``'s state on the device (None: not there), in O(1); None for an unknown
        device too, as a report may name a device that has just left."""
        device = self._devices.get(device_id)
        entry = device.view.peek(model) if device is not None else None
        return None if entry is None else entry.state

    def holder_ids(self, model: str) -> Collection[str]:
        """The devices holding ``model``, in O(1): a read-only view, valid until the next change."""
        return self._holders.get(model, _EMPTY)

    def models(self) -> list[str]:
        """Every model held by at least one device."""
        return list(self._holders)

    def residents(self, device_id: str) -> list[tuple[str, Residency, int]]:
        """``(model, state, size_bytes)`` on a device, least- to most-recently used."""
        return [
            (entry.key, entry.state, entry.size_bytes)
            for entry in self._device(device_id).view.entries_lru()
        ]

    def used_bytes(self, device_id: str) -> int:
        return self._device(device_id).view.used_bytes

    def free_bytes(self, device_id: str) -> int:
        return self._device(device_id).view.free_bytes

    def capacity_bytes(self, device_id: str) -> int:
        return self._device(device_id).view.capacity_bytes

    def version(self, device_id: str) -> int:
        """A counter bumped on every change to the device's view."""
        return self._device(device_id).version

    def report_seq(self, device_id: str) -> int | None:
        """The sequence number of the last report applied by :meth:`sync`, if any."""
        return self._device(device_id).report_seq

    def plan_dispatch(
        self, device_id: str, model: str, *, size_bytes: int, prefer: Sequence[str] = ()
    ) -> list[str]:
        """The victims :meth:`note_dispatch` would predict, without changing anything.

        ``[]`` if the model is already there (loading or resident). ``prefer`` is the eviction
        hint sent with the request: the GPU manager evicts those models first (if not in use),
        then least-recently used ones. Raises :class:`~gpufaas.cache.lru.InsufficientCapacity`
        if the device cannot take it now (too large, or too much of it is loading), so a
        scheduler can rank or rule out devices.
        """
        view = self._device(device_id).view
        check_size(size_bytes)
        if model in view:
            return []
        try:
            return view.plan_victims(size_bytes, prefer=prefer)
        except InsufficientCapacity as error:
            raise error.about(key=model, where=f"device {device_id!r}") from None

    # -- updates -------------------------------------------------------------------------------

    def note_dispatch(
        self, device_id: str, model: str, *, size_bytes: int, prefer: Sequence[str] = ()
    ) -> list[str]:
        """A request for ``model`` was sent to the device: predict what the GPU manager will do.

        A model already there is marked used. Otherwise the predicted victims (those in
        ``prefer`` first, as :meth:`plan_dispatch`) are evicted from the view and the model is
        added as loading. Returns the predicted victims. Raises
        :class:`~gpufaas.cache.lru.InsufficientCapacity` (changing nothing) if it cannot fit.
        """
        device = self._device(device_id)
        if model in device.view:
            device.view.touch(model)
            self._changed(device)
            return []
        victims = self.plan_dispatch(device_id, model, size_bytes=size_bytes, prefer=prefer)
        for victim in victims:
            device.view.evict(victim)
            self._unindex(victim, device_id)
        device.view.reserve(model, size_bytes=size_bytes)
        self._index(model, device_id)
        self._changed(device)
        return victims

    def note_loaded(self, device_id: str, model: str, *, size_bytes: int) -> list[str]:
        """The GPU manager reports ``model`` resident on the device, taking ``size_bytes``.

        This is fact, not prediction: to fit it, unpinned models are evicted from the view in LRU
        order and, if that is not enough, other models predicted as loading (the prediction was
        wrong). Returns the models dropped from the view. Raises
        :class:`~gpufaas.cache.lru.InsufficientCapacity` only if ``size_bytes`` exceeds the
        device's capacity.
        """
        device = self._device(device_id)
        view = device.view
        check_size(size_bytes)
        if size_bytes > view.capacity_bytes:
            raise InsufficientCapacity(
                needed_bytes=size_bytes,
                free_bytes=view.free_bytes,
                freeable_bytes=view.freeable_bytes(exclude=(model,)),
                capacity_bytes=view.capacity_bytes,
                pinned_bytes=view.pinned_bytes,
                key=model,
                where=f"device {device_id!r}",
            )
        current = view.peek(model)
        held = current.size_bytes if current is not None else 0
        dropped = self._fit(device, size_bytes - held, keep=model)
        if current is None:
            view.reserve(model, size_bytes=size_bytes)
            self._index(model, device_id)
        if current is None or current.state is EntryState.LOADING:
            view.commit(model, None, size_bytes=size_bytes)
            view.unpin(model)
        else:
            # Already resident: take the measured size and mark it used.
            view.discard(model)
            view.put(model, None, size_bytes=size_bytes)
        self._changed(device)
        return dropped

    def note_evicted(self, device_id: str, model: str) -> bool:
        """The GPU manager reports ``model`` gone from the device (evicted, or its load failed).

        Returns whether the view held it; reports may arrive late, so an absent model is no error.
        """
        device = self._device(device_id)
        if device.view.discard(model) is None:
            return False
        self._unindex(model, device_id)
        self._changed(device)
        return True

    def sync(
        self,
        device_id: str,
        residents: Sequence[tuple[str, Residency, int]],
        *,
        report_seq: int | None = None,
        capacity_bytes: int | None = None,
    ) -> bool:
        """Replace the device's view with a GPU manager's full report.

        ``residents`` are ``(model, state, size_bytes)``, least- to most-recently used.
        ``capacity_bytes``, if given, also replaces the device's capacity. With ``report_seq``, a
        report not newer than the last applied one is ignored (returns False). Raises
        :class:`InvalidReport` (changing nothing) if the report repeats a model or exceeds the
        capacity. Returns True if the report was applied.
        """
        device = self._device(device_id)
        last = device.report_seq
        if report_seq is not None and last is not None and report_seq <= last:
            return False
        capacity = device.view.capacity_bytes
        if capacity_bytes is not None:
            capacity = check_size(capacity_bytes, what=f"capacity_bytes of {device_id!r}")
        view = _build_view(device_id, residents, capacity_bytes=capacity)
        for model in device.view.keys_lru():
            self._unindex(model, device_id)
        device.view = view
        for model in view.keys_lru():
            self._index(model, device_id)
        if report_seq is not None:
            device.report_seq = report_seq
        self._changed(device)
        return True

    # -- internals -----------------------------------------------------------------------------

    def _device(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            raise UnknownDevice(f"device {device_id!r} is not in the directory")
        return device

    def _fit(self, device: _Device, nbytes: int, *, keep: str) -> list[str]:
        """Drop models other than ``keep`` from the view until ``nbytes`` more fit: unpinned ones
        in LRU order and, if that is not enough, mispredicted loading ones, oldest first."""
        view = device.view
        if nbytes <= view.free_bytes:  # includes shrinking (nbytes < 0)
            return []
        try:
            victims = view.plan_victims(nbytes, exclude=(keep,))
        except InsufficientCapacity:
            entries = [entry for entry in view.entries_lru() if entry.key != keep]
            ordered = [e for e in entries if not e.pinned] + [e for e in entries if e.pinned]
            victims, freed = [], view.free_bytes
            for entry in ordered:
                if freed >= nbytes:
                    break
                victims.append(entry.key)
                freed += entry.size_bytes
        for victim in victims:
            view.discard(victim)
            self._unindex(victim, device.device_id)
        return victims

    def _index(self, model: str, device_id: str) -> None:
        self._holders.setdefault(model, set()).add(device_id)

    def _unindex(self, model: str, device_id: str) -> None:
        devices = self._holders.get(model)
        if devices is not None:
            devices.discard(device_id)
            if not devices:
                del self._holders[model]

    @staticmethod
    def _changed(device: _Device) -> None:
        device.version += 1


def _build_view(
    device_id: str, residents: Iterable[tuple[str, Residency, int]], *, capacity_bytes: int
) -> ByteLRU[None]:
    view: ByteLRU[None] = ByteLRU(capacity_bytes=capacity_bytes)
    total = 0
    for model, state, size_bytes in residents:
        check_size(size_bytes, what=f"size_bytes of {model!r} on {device_id!r}")
        total += size_bytes
        if model in view:
            raise InvalidReport(f"report for {device_id!r} lists {model!r} more than once")
        if total > capacity_bytes:
            raise InvalidReport(
                f"report for {device_id!r} holds at least {total} bytes,"
                f" more than its capacity of {capacity_bytes}"
            )
        if Residency(state) is Residency.LOADING:
            view.reserve(model, size_bytes=size_bytes)
        else:
            view.put(model, None, size_bytes=size_bytes)
    return view
