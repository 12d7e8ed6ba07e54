"""The node runtime: functions, the two cache tiers, loading, and running requests.

One :class:`NodeRuntime` per GPU-manager process. It keeps

- a host tier (:class:`~gpufaas.gpu_manager.residency.Tier` of
  :class:`~gpufaas.gpu_manager.host_tier.HostModel`): each function's weights as one arena in
  page-locked host memory, bounded in bytes, plus a weightless skeleton per function;
- a device tier per device: each resident model's arena on the device and a replica module over
  it, bounded in bytes (arena plus the model's measured activation reserve).

A miss on a device copies the arena from a neighbouring device that holds the model when the two
have peer access, else from the host tier (filled from the artifact, or from its sidecar after an
eviction). The copy runs group by group in forward order, and the request that caused it starts
computing as soon as the first group has landed. Loads are single-flight per (device, function);
a model in use (held) is never evicted, and a model unloaded while in use keeps its bytes
reserved until its last request ends. A request that cannot fit even after evicting every unheld
model gets a 503 ``InsufficientMemory``; the manager keeps serving.

HTTP lives in :mod:`gpufaas.gpu_manager.server`; this module raises :class:`RuntimeFailure` with
the status and message to show.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from numpy.typing import NDArray

from gpufaas.cache import CacheStats, FailureBackoff, InsufficientCapacity, SingleFlight
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.modelio import ModelLoadError
from gpufaas.core.node import DeviceState, HostState, NodeState, SkeletonState
from gpufaas.core.node import Throughput as ThroughputState
from gpufaas.gpu_manager.batching import Batcher, concat_inputs, split_outputs
from gpufaas.gpu_manager.devices import (
    DeviceBackend,
    DeviceInfo,
    DeviceOutOfMemory,
    TransferFailed,
    allocate_host,
    cuda_available,
    is_out_of_memory,
    make_backend,
)
from gpufaas.gpu_manager.host_tier import (
    HostModel,
    PreparedModel,
    SidecarError,
    Skeleton,
    prepare_model,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from gpufaas.gpu_manager.loader import (
    DeviceModel,
    ForwardResult,
    build_module,
    run_forward,
    start_copy,
)
from gpufaas.gpu_manager.memory import BufferPool
from gpufaas.gpu_manager.residency import Tier
from gpufaas.gpu_manager.tensors import TensorError

logger = logging.getLogger(__name__)

_ACQUIRE_ATTEMPTS = 3  # a model replaced between its load and our hold is loaded again, this often


class RuntimeFailure(Exception):
    """A request that cannot be served; ``status`` and the message go to the caller."""

    def __init__(
        self, message: str, *, status: int, reason: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeviceLoadOutOfMemory(RuntimeFailure):
    """The device's allocator refused a load's arena (retried once after evicting)."""


@dataclass
class InferOutcome:
    outputs: dict[str, tuple[NDArray[Any], str]]
    cache_hit: bool
    load_ms: float
    compute_ms: float
    size_bytes: int
    load_source: str = "device"  # "device" (a hit), "host", "peer:<id>"
    batch_size: int = 1  # requests that shared the forward pass


@dataclass(frozen=True)
class LoadRecord:
    """One finished copy onto a device, for metrics and benchmarks."""

    model: str
    device: str
    path: str  # "host->device" or "device->device"
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class Throughput:
    """Bytes moved along one path, and the seconds it took."""

    nbytes: int = 0
    seconds: float = 0.0
    count: int = 0

    def add(self, nbytes: int, seconds: float) -> None:
        self.nbytes += nbytes
        self.seconds += seconds
        self.count += 1

    def to_state(self) -> ThroughputState:
        gbps = self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return ThroughputState(bytes=self.nbytes, seconds=self.seconds, count=self.count, gbps=gbps)


@dataclass
class _Device:
    info: DeviceInfo
    backend: DeviceBackend
    tier: Tier[DeviceModel]
    slots: asyncio.Semaphore
    outstanding: int = 0
    starts: SingleFlight[str, DeviceModel] = field(default_factory=SingleFlight)
    batchers: dict[str, Batcher[InferOutcome | RuntimeFailure]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set when bytes may be free
    # model -> the victims the scheduler asked to evict first for its next load here; set by
    # the latest request for that model (a request without a hint clears it)
    evict_hints: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def notify(self) -> None:
        """Wake loads waiting for memory (each waits on the event current when it started)."""
        self.changed.set()
        self.changed = asyncio.Event()


def spec_fingerprint(spec: InferenceFunctionSpec) -> str:
    """What identifies a function's weights: a change invalidates cached copies."""
    return f"{spec.model.uri}|{spec.model.format}|{spec.model.sha256}"


class NodeRuntime:
    """Serves registered functions on this node's devices."""

    def __init__(
        self,
        *,
        devices: Sequence[DeviceInfo],
        store: ArtifactStore,
        host_capacity_bytes: int,
        max_concurrency_per_device: int = 4,
        sidecar_dir: Path | None = None,
        probe_variable_dim: int = 64,
        pin_host_memory: bool | None = None,
        overlap: bool = True,
        admission_wait_s: float = 10.0,
        backends: Mapping[str, DeviceBackend] | None = None,
    ) -> None:
        if not devices:
            raise ValueError("a GPU manager needs at least one device")
        if max_concurrency_per_device < 1:
            raise ValueError(
                f"max_concurrency_per_device must be >= 1, got {max_concurrency_per_device}"
            )
        self.store = store
        self.sidecar_dir = sidecar_dir if sidecar_dir is not None else store.root / "host-sidecars"
        _remove_stale_sidecars(self.sidecar_dir)
        self.probe_variable_dim = probe_variable_dim
        self.pin_host_memory = cuda_available() if pin_host_memory is None else pin_host_memory
        self.max_concurrency_per_device = max_concurrency_per_device
        self.overlap = overlap  # False: a request waits for the whole model before computing
        # A load that does not fit because models are in use waits this long for them.
        self.admission_wait_s = admission_wait_s
        self.functions: dict[str, InferenceFunctionSpec] = {}
        self.devices: dict[str, _Device] = {}
        for info in devices:
            backend = (backends or {}).get(info.id) or make_backend(info)
            self.devices[info.id] = _Device(
                info=info,
                backend=backend,
                tier=Tier(
                    name=info.id,
                    capacity_bytes=info.capacity_bytes,
                    release=self._device_releaser(backend),
                    on_change=self._notifier(info.id),
                ),
                slots=asyncio.Semaphore(max_concurrency_per_device),
            )
        backends_used = [d.backend for d in self.devices.values()]
        self.alignment = max(b.alignment for b in backends_used)
        self.min_group_bytes = max(b.min_group_bytes for b in backends_used)
        self.host_pool = BufferPool(budget_bytes=host_capacity_bytes, allocate=self._fresh_host)
        self.host: Tier[HostModel] = Tier(
            name="host", capacity_bytes=host_capacity_bytes, release=self._release_host
        )
        self.skeletons: dict[str, Skeleton] = {}
        self._host_fills: SingleFlight[str, HostModel] = SingleFlight()
        self.load_failures: FailureBackoff[str] = FailureBackoff(base_s=1.0, max_s=60.0)
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = CacheStats(("device", "host", "disk"))
        self.loads: collections.deque[LoadRecord] = collections.deque(maxlen=256)
        self.load_totals: dict[str, Throughput] = {}  # "host->device", "device->device"
        self.host_fills: dict[str, Throughput] = {}  # "artifact", "sidecar"

    # -- functions ---------------------------------------------------------------------------------

    def register(self, name: str, spec: InferenceFunctionSpec) -> None:
        """Add or update a function; changed weights drop every cached copy."""
        old = self.functions.get(name)
        self.functions[name] = spec
        if old is not None and spec_fingerprint(old) != spec_fingerprint(spec):
            self.drop_everywhere(name)
            self.load_failures.forget(name)  # new weights deserve a fresh try
        elif old is not None and old.batching != spec.batching:
            for device in self.devices.values():
                device.batchers.pop(name, None)

    def unregister(self, name: str) -> None:
        self.functions.pop(name, None)
        self.drop_everywhere(name)

    def spec(self, name: str) -> InferenceFunctionSpec:
        try:
            return self.functions[name]
        except KeyError:
            raise RuntimeFailure(
                f"unknown model {name!r} on this GPU manager", status=404, reason="UnknownModel"
            ) from None

    def drop_everywhere(self, name: str) -> list[str]:
        """Unload ``name`` from every device and the host tier, and forget its skeleton.

        Copies still in use keep their bytes reserved until their last request ends.
        """
        dropped = [d.info.id for d in self.devices.values() if d.tier.retire(name)]
        for device in self.devices.values():
            device.batchers.pop(name, None)
            device.evict_hints.pop(name, None)
        self.host.retire(name)
        skeleton = self.skeletons.pop(name, None)
        if skeleton is not None and skeleton.sidecar is not None:
            with contextlib.suppress(OSError):
                skeleton.sidecar.unlink(missing_ok=True)
        return dropped

    def unload(self, name: str, *, device_id: str | None = None) -> list[str]:
        if device_id is None:
            return self.drop_everywhere(name)
        device = self.device(device_id)
        return [device_id] if device.tier.retire(name) else []

    # -- devices -----------------------------------------------------------------------------------

    def device(self, device_id: str | None) -> _Device:
        if device_id is None:
            return min(self.devices.values(), key=lambda d: d.outstanding)
        try:
            return self.devices[device_id]
        except KeyError:
            known = ", ".join(self.devices)
            raise RuntimeFailure(
                f"unknown device {device_id!r}; this node has {known}",
                status=400,
                reason="UnknownDevice",
            ) from None

    def _notifier(self, device_id: str) -> Callable[[], None]:
        def notify() -> None:
            device = self.devices.get(device_id)
            if device is not None:
                device.notify()

        return notify

    def _device_releaser(self, backend: DeviceBackend) -> Callable[[DeviceModel], None]:
        def release(model: DeviceModel) -> None:
            arena, model.arena, model.module = model.arena, None, None
            if arena is not None:
                used = self.devices[backend.info.id].tier.lru.used_bytes
                backend.release(arena, in_use_bytes=used)

        return release

    # -- host tier ---------------------------------------------------------------------------------

    def _fresh_host(self, nbytes: int) -> torch.Tensor:
        buffer, _pinned = allocate_host(nbytes, pin=self.pin_host_memory)
        return buffer

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        try:
            buffer, _warm = self.host_pool.take(nbytes, in_use_bytes=self.host.lru.used_bytes)
        except (DeviceOutOfMemory, MemoryError) as e:
            raise RuntimeFailure(
                f"host memory is exhausted: {e}", status=503, reason="InsufficientMemory"
            ) from None
        return buffer

    def _release_host(self, model: HostModel) -> None:
        if model.arena.numel():
            self.host_pool.give(model.arena, in_use_bytes=self.host.lru.used_bytes)

    async def _held_host_model(self, name: str) -> HostModel:
        """The function's host-tier entry, filled if needed and held for the caller.

        A model too large for the host tier is prepared anyway and served without caching it
        there (``holds`` stays 0 and the tier never sees it).
        """
        spec = self.spec(name)
        fingerprint = spec_fingerprint(spec)
        for _ in range(_ACQUIRE_ATTEMPTS):
            model = self.host.resident(name)
            if model is not None and model.fingerprint != fingerprint:
                self.host.retire(name)
                model = None
            if model is not None:
                self.stats.record_hit("host")
            else:  # missing, or still being filled: join (or start) the fill
                self.stats.record_miss("host")
                model = await self._host_fills.do(name, lambda: self._fill_host_once(name, spec))
            if not model.cached:
                return model  # too large for the host tier: a one-off copy for this load
            if self.host.hold(name, model):
                return model
        raise RuntimeFailure(
            f"model {name!r} kept leaving host memory while loading; try again",
            status=503,
            reason="InsufficientMemory",
        )

    async def _fill_host_once(self, name: str, spec: InferenceFunctionSpec) -> HostModel:
        """Fill the host tier, failing fast while an earlier failure's backoff lasts,
        so a broken artifact cannot turn every request into a fetch (no retry storm)."""
        blocked = self.load_failures.blocked(name)
        if blocked is not None:
            wait = blocked.retry_after(time.monotonic())
            raise RuntimeFailure(
                f"{blocked.message} (failed {blocked.attempts} time(s); next try in {wait:.0f} s)",
                status=503,
                reason="ModelLoadFailed",
                retry_after_s=wait,
            )
        try:
            model = await self._fill_host(name, spec)
        except RuntimeFailure as e:
            if e.reason == "ModelLoadFailed":
                failure = self.load_failures.record_failure(name, str(e))
                e.retry_after_s = failure.retry_after(time.monotonic())
            raise
        self.load_failures.record_success(name)
        return model

    async def _fill_host(self, name: str, spec: InferenceFunctionSpec) -> HostModel:
        fingerprint = spec_fingerprint(spec)
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(
                self.store.fetch, spec.model.uri, sha256=spec.model.sha256
            )
        except ArtifactError as e:
            raise RuntimeFailure(
                f"model {name!r} failed to load: {e}", status=503, reason="ModelLoadFailed"
            ) from None
        skeleton = self.skeletons.get(name)
        if skeleton is not None and not _skeleton_matches(skeleton, path, fingerprint):
            self.skeletons.pop(name, None)
            skeleton = None
        if skeleton is not None and skeleton.sidecar is not None:
            with contextlib.suppress(SidecarError):
                return await self._fill_from_sidecar(name, skeleton, started)
        return await self._fill_from_artifact(name, spec, path, fingerprint, started)

    async def _fill_from_sidecar(self, name: str, skeleton: Skeleton, started: float) -> HostModel:
        sidecar = skeleton.sidecar
        if sidecar is None:
            raise SidecarError("no sidecar")
        model = HostModel(
            skeleton=skeleton, arena=_no_arena(), pinned=self.pin_host_memory, source="sidecar"
        )
        cached = self._reserve_host(name, model)
        try:
            model.arena = self._host_buffer(skeleton.layout.arena_bytes)
            await asyncio.to_thread(read_sidecar, sidecar, skeleton, model.arena)
        except BaseException as e:
            self._abandon_host(name, model, cached)
            if isinstance(e, SidecarError):
                logger.warning("model %s: sidecar unusable (%s); reading the artifact", name, e)
                skeleton.sidecar = None
            raise
        self._finish_host(name, model, cached, started)
        return model

    async def _fill_from_artifact(
        self,
        name: str,
        spec: InferenceFunctionSpec,
        path: Path,
        fingerprint: str,
        started: float,
    ) -> HostModel:
        try:
            prepared: PreparedModel = await asyncio.to_thread(
                prepare_model,
                path,
                spec,
                fingerprint=fingerprint,
                alignment=self.alignment,
                min_group_bytes=self.min_group_bytes,
                variable_dim=self.probe_variable_dim,
            )
        except (ModelLoadError, OSError) as e:
            raise RuntimeFailure(
                f"model {name!r} failed to load: {e}", status=503, reason="ModelLoadFailed"
            ) from None
        skeleton = prepared.skeleton
        model = HostModel(
            skeleton=skeleton, arena=_no_arena(), pinned=self.pin_host_memory, source="artifact"
        )
        cached = self._reserve_host(name, model)
        try:
            model.arena = self._host_buffer(skeleton.layout.arena_bytes)
            await asyncio.to_thread(prepared.fill, model.arena)
        except BaseException:
            self._abandon_host(name, model, cached)
            raise
        current = self.functions.get(name)
        if current is not None and spec_fingerprint(current) == fingerprint:
            self.skeletons[name] = skeleton
        self._finish_host(name, model, cached, started)
        if cached:
            self._spawn(self._write_sidecar(name, model))
        return model

    def _reserve_host(self, name: str, model: HostModel) -> bool:
        """Claim host-tier bytes for ``model``; False if it cannot be cached there at all."""
        size = model.size_bytes
        self.host.retire(name)  # a stale entry (older weights) would block the new one
        try:
            for victim in self.host.make_room(size):
                self.stats.record_eviction("host", victim.size_bytes)
            self.host.reserve(name, model, size_bytes=size)
        except InsufficientCapacity:
            logger.info("host tier cannot hold %s (%d bytes); serving it uncached", name, size)
            return False
        model.cached = True
        return True

    def _abandon_host(self, name: str, model: HostModel, cached: bool) -> None:
        if cached:
            if self.host.arriving.get(name) is model:
                self.host.retire(name)
            self.host.unhold(name, model)

    def _finish_host(self, name: str, model: HostModel, cached: bool, started: float) -> None:
        seconds = time.perf_counter() - started
        self.host_fills.setdefault(model.source, Throughput()).add(model.size_bytes, seconds)
        self.stats.record_move("disk", "host", model.size_bytes)
        if cached and not self.host.commit(name, model):
            self.host.unhold(name, model)  # dropped while filling: served once, then released

    async def _write_sidecar(self, name: str, model: HostModel) -> None:
        if not self.host.hold(name, model):
            return
        skeleton = model.skeleton
        path = sidecar_path(
            self.sidecar_dir, fingerprint=skeleton.fingerprint, artifact=skeleton.artifact
        )
        try:
            await asyncio.to_thread(write_sidecar, path, skeleton, model.arena)
        except OSError as e:
            logger.warning("model %s: cannot write its host sidecar %s: %s", name, path, e)
        else:
            skeleton.sidecar = path
        finally:
            self.host.unhold(name, model)

    # -- device tier -------------------------------------------------------------------------------

    def _peer_holding(self, name: str, device: _Device) -> tuple[_Device, DeviceModel] | None:
        """A neighbouring device with a finished copy of ``name`` this device can copy from."""
        fingerprint = spec_fingerprint(self.spec(name))
        for peer_id in device.info.peers:
            peer = self.devices.get(peer_id)
            if peer is None:
                continue
            entry = peer.tier.entry(name)
            model = entry.value if entry is not None else None
            if model is not None and model.arrived and model.fingerprint == fingerprint:
                return peer, model
        return None

    async def _start_load(self, name: str, device: _Device) -> DeviceModel:
        """Start copying ``name`` onto ``device``; returns once the copy is under way.

        The device bytes are claimed first (waiting, if models in use hold them), and only
        then is a source held: a load waiting for memory holds no other device's model.
        """
        existing = device.tier.current(name)
        if existing is not None:
            return existing
        fingerprint = spec_fingerprint(self.spec(name))
        host: HostModel | None = None
        skeleton = self.skeletons.get(name)
        if skeleton is None or skeleton.fingerprint != fingerprint:
            host = await self._held_host_model(name)  # first fill: learn the layout
            skeleton = host.skeleton
        size = skeleton.layout.arena_bytes + skeleton.reserve_bytes
        model = DeviceModel(
            name=name, fingerprint=fingerprint, skeleton=skeleton, size_bytes=size, source="host"
        )
        try:
            await self._admit(name, device, model, prefer=device.evict_hints.pop(name, ()))
        except BaseException:
            self._release_host_hold(name, host)
            raise

        source_backend: DeviceBackend | None = None
        try:
            peer = self._peer_holding(name, device)
            if peer is not None and peer[0].tier.hold(name, peer[1]):
                self._release_host_hold(name, host)
                peer_device, peer_model = peer
                source_arena = peer_model.arena
                source_backend = peer_device.backend
                model.source = f"peer:{peer_device.info.id}"

                def release_source() -> None:
                    peer_device.tier.unhold(name, peer_model)

            else:
                if host is None:
                    host = await self._held_host_model(name)
                held_host = host
                source_arena = held_host.arena

                def release_source() -> None:
                    self._release_host_hold(name, held_host)

            if source_arena is None or spec_fingerprint(self.spec(name)) != fingerprint:
                release_source()
                raise RuntimeFailure(
                    f"model {name!r} changed while loading; try again",
                    status=503,
                    reason="ModelChanged",
                )
        except BaseException:
            await self._abandon_load(name, device, model, lambda: None)
            raise
        try:
            start_copy(
                model,
                device.backend,
                source_arena=source_arena,
                source_backend=source_backend,
                in_use_bytes=device.tier.lru.used_bytes,
            )
            await asyncio.to_thread(build_module, model)
        except BaseException as e:
            await self._abandon_load(name, device, model, release_source)
            if is_out_of_memory(e):
                raise DeviceLoadOutOfMemory(
                    f"device {device.info.id} ran out of memory loading {name!r}: {e}",
                    status=503,
                    reason="InsufficientMemory",
                ) from None
            raise
        self._spawn(self._finish_load(name, device, model, release_source))
        return model

    async def _start_load_evicting_on_oom(self, name: str, device: _Device) -> DeviceModel:
        """Start a load; if the device itself runs out of memory (our accounting said the
        bytes were free: fragmentation, another process), evict every model not in use and
        try once more before answering 503."""
        try:
            return await self._start_load(name, device)
        except DeviceLoadOutOfMemory as e:
            lru = device.tier.lru
            evicted = device.tier.make_room(lru.capacity_bytes - lru.pinned_bytes)
            logger.warning("%s; evicted %d unused model(s), retrying once", e, len(evicted))
            for victim in evicted:
                self.stats.record_eviction("device", victim.size_bytes)
        return await self._start_load(name, device)

    def _release_host_hold(self, name: str, host: HostModel | None) -> None:
        if host is not None and host.cached and host.holds:
            self.host.unhold(name, host)

    async def _admit(
        self, name: str, device: _Device, model: DeviceModel, *, prefer: Sequence[str] = ()
    ) -> None:
        """Claim ``model.size_bytes`` on ``device``, evicting unheld models (``prefer`` first:
        the scheduler's hint; it chose them as the cheapest to reload).

        If models in use hold the bytes, waits up to ``admission_wait_s`` for them to be
        released; a model larger than the device, or still blocked then, is a 503.
        """
        size = model.size_bytes
        deadline = time.monotonic() + self.admission_wait_s
        while True:
            changed = device.changed
            try:
                for victim in device.tier.make_room(size, prefer=prefer):
                    self.stats.record_eviction("device", victim.size_bytes)
                device.tier.reserve(name, model, size_bytes=size)
                return
            except InsufficientCapacity as e:
                remaining = deadline - time.monotonic()
                if size > device.tier.lru.capacity_bytes or remaining <= 0:
                    layout = model.skeleton.layout
                    raise RuntimeFailure(
                        f"model {name!r} needs {size} bytes on {device.info.id} "
                        f"({layout.weights_bytes} of weights, {model.reserve_bytes} reserved "
                        f"for activations), which cannot be freed now: {e}",
                        status=503,
                        reason="InsufficientMemory",
                    ) from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    async def _abandon_load(
        self, name: str, device: _Device, model: DeviceModel, release_source: Callable[[], None]
    ) -> None:
        if model.transfer is not None:
            with contextlib.suppress(TransferFailed):
                await asyncio.to_thread(model.transfer.wait_all)
        if device.tier.arriving.get(name) is model:
            device.tier.retire(name)
        device.tier.unhold(name, model)
        release_source()

    async def _finish_load(
        self, name: str, device: _Device, model: DeviceModel, release_source: Callable[[], None]
    ) -> None:
        transfer = model.transfer
        try:
            if transfer is not None:
                await asyncio.to_thread(transfer.wait_all)
        except TransferFailed as e:
            model.error = str(e)
            logger.error("loading %s onto %s failed: %s", name, device.info.id, e)
            if device.tier.arriving.get(name) is model:
                device.tier.retire(name)
            device.tier.unhold(name, model)
            return
        finally:
            release_source()
        model.arrived = True
        path = "device->device" if model.source.startswith("peer:") else "host->device"
        self.stats.record_move(
            "device" if path == "device->device" else "host", "device", model.arena_bytes
        )
        if transfer is not None and transfer.seconds is not None:
            record = LoadRecord(name, device.info.id, path, transfer.nbytes, transfer.seconds)
            self.loads.append(record)
            self.load_totals.setdefault(path, Throughput()).add(record.nbytes, record.seconds)
        if not device.tier.commit(name, model):
            device.tier.unhold(name, model)  # unloaded while arriving

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for copies and sidecar writes in flight (tests, benchmarks, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _use(
        self, name: str, device: _Device
    ) -> AsyncIterator[tuple[DeviceModel, bool, float]]:
        """Hold ``name`` on ``device`` for one request: (model, hit, start time)."""
        started = time.perf_counter()
        for _ in range(_ACQUIRE_ATTEMPTS):
            model = device.tier.resident(name)
            hit = model is not None and model.arrived
            if model is None:
                arriving = device.tier.arriving.get(name)
                if arriving is not None and arriving.module is not None:
                    model = arriving  # copy under way: compute as its layers land
            if model is None:
                self.stats.record_miss("device")
                model = await device.starts.do(
                    name, lambda: self._start_load_evicting_on_oom(name, device)
                )
            elif hit:
                self.stats.record_hit("device")
            if device.tier.hold(name, model):
                break
        else:
            raise RuntimeFailure(
                f"model {name!r} was unloaded while loading; try again",
                status=503,
                reason="ModelChanged",
            )
        try:
            if not self.overlap and not model.arrived and model.transfer is not None:
                with contextlib.suppress(TransferFailed):  # the forward pass reports it
                    await asyncio.to_thread(model.transfer.wait_all)
            yield model, hit, started
        finally:
            device.tier.unhold(name, model)

    async def load(self, name: str, *, device_id: str | None = None) -> str:
        """Make ``name`` resident on a device (repository load); returns the device id."""
        device = self.device(device_id)
        async with self._use(name, device) as (model, _hit, _started):
            if model.transfer is not None and not model.arrived:
                with contextlib.suppress(TransferFailed):
                    await asyncio.to_thread(model.transfer.wait_all)
                # The copy is over; let _finish_load's continuation mark it resident (or failed).
                for _ in range(10_000):
                    if model.arrived or model.error is not None:
                        break
                    await asyncio.sleep(0.001)
            if model.error is not None:
                raise RuntimeFailure(
                    f"model {name!r} failed to load on {device.info.id}: {model.error}",
                    status=503,
                    reason="ModelLoadFailed",
                )
        return device.info.id

    # -- inference ---------------------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        inputs: Sequence[NDArray[Any]],
        *,
        device_id: str | None = None,
        evict_first: Sequence[str] = (),
    ) -> InferOutcome:
        """Run one request. ``evict_first``: if this request makes the model load, evict these
        models first (when not in use) before least-recently used ones; the scheduler's hint."""
        spec = self.spec(name)
        device = self.device(device_id)
        if evict_first:
            device.evict_hints[name] = tuple(evict_first)
        else:
            device.evict_hints.pop(name, None)
        device.outstanding += 1
        try:
            batching = spec.batching
            rows = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
            if batching.max_batch_size > 1 and rows < batching.max_batch_size:
                batcher = device.batchers.get(name)
                if batcher is None:
                    batcher = Batcher(
                        max_batch_size=batching.max_batch_size,
                        max_delay_ms=batching.max_delay_ms,
                        run=lambda batch: self._run_batch(name, device, batch),
                    )
                    device.batchers[name] = batcher
                result = await batcher.submit(inputs)
            else:
                (result,) = await self._run_batch(name, device, [inputs])
        finally:
            device.outstanding -= 1
        if isinstance(result, RuntimeFailure):
            raise result
        return result

    async def _run_batch(
        self, name: str, device: _Device, batch: list[Sequence[NDArray[Any]]]
    ) -> list[InferOutcome | RuntimeFailure]:
        """Run the requests of one batch on ``device`` as one forward pass.

        A batch the model rejects is run again one request at a time, so one bad request
        fails alone; so is a batch whose outputs do not have one row per input row.
        """
        spec = self.spec(name)
        async with self._use(name, device) as (model, hit, started), device.slots:
            results: list[ForwardResult | RuntimeFailure] = []
            parts: list[dict[str, tuple[NDArray[Any], str]]] | None = None
            if len(batch) > 1:
                counts = [int(b[0].shape[0]) if b and b[0].ndim else 1 for b in batch]
                try:
                    merged = await self._forward(model, concat_inputs(batch), spec, device)
                except RuntimeFailure as e:
                    if e.reason != "ModelError":
                        raise
                else:
                    parts = split_outputs(merged.outputs, counts)
                    results = [merged] * len(batch)
            if parts is None:
                results = [await self._forward_or_failure(model, b, spec, device) for b in batch]
            load_ms = self._load_ms(model, hit, started)
        outcomes: list[InferOutcome | RuntimeFailure] = []
        for i, result in enumerate(results):
            if isinstance(result, RuntimeFailure):
                outcomes.append(result)
                continue
            outcomes.append(
                InferOutcome(
                    outputs=parts[i] if parts is not None else result.outputs,
                    cache_hit=hit,
                    load_ms=load_ms,
                    compute_ms=result.compute_ms,
                    size_bytes=model.size_bytes,
                    load_source="device" if hit else model.source,
                    batch_size=len(batch) if parts is not None else 1,
                )
            )
        return outcomes

    async def _forward_or_failure(
        self,
        model: DeviceModel,
        inputs: Sequence[NDArray[Any]],
        spec: InferenceFunctionSpec,
        device: _Device,
    ) -> ForwardResult | RuntimeFailure:
        try:
            return await self._forward(model, list(inputs), spec, device)
        except RuntimeFailure as e:
            return e

    @staticmethod
    def _load_ms(model: DeviceModel, hit: bool, started: float) -> float:
        if hit:
            return 0.0
        finished = model.transfer.finished_at if model.transfer is not None else None
        return max(0.0, ((finished or time.perf_counter()) - started) * 1000)

    async def _forward(
        self,
        model: DeviceModel,
        inputs: list[NDArray[Any]],
        spec: InferenceFunctionSpec,
        device: _Device,
    ) -> ForwardResult:
        try:
            return await asyncio.to_thread(run_forward, model, inputs, spec, device.backend)
        except TensorError as e:
            raise RuntimeFailure(str(e), status=e.status, reason=e.reason) from None
        except TransferFailed as e:
            raise RuntimeFailure(
                f"model {model.name!r} failed to load on {device.info.id}: {e}",
                status=503,
                reason="ModelLoadFailed",
            ) from None
        except Exception as e:
            if is_out_of_memory(e):
                raise RuntimeFailure(
                    f"device {device.info.id} ran out of memory running {model.name!r}",
                    status=503,
                    reason="InsufficientMemory",
                ) from None
            raise RuntimeFailure(
                f"the model rejected the input: {model_error_message(e)}",
                status=400,
                reason="ModelError",
            ) from None

    # -- state -------------------------------------------------------------------------------------

    def state(self) -> NodeState:
        """Devices and both tiers with byte-exact sizes, in LRU order (least recent first)."""
        return NodeState(
            devices=[
                DeviceState(
                    **d.info.to_dict(),
                    used_bytes=d.tier.lru.used_bytes,
                    free_cache_bytes=d.tier.lru.free_bytes,
                    outstanding=d.outstanding,
                    max_concurrency=self.max_concurrency_per_device,
                    memory_allocated=d.backend.memory_allocated(),
                    pooled_bytes=d.backend.pooled_bytes(),
                    residents=d.tier.residents(_describe_device_model),
                    draining=d.tier.draining_rows(),
                )
                for d in self.devices.values()
            ],
            host=HostState(
                capacity_bytes=self.host.lru.capacity_bytes,
                used_bytes=self.host.lru.used_bytes,
                pinned=self.pin_host_memory,
                pooled_bytes=self.host_pool.pooled_bytes,
                residents=self.host.residents(_describe_host_model),
                draining=self.host.draining_rows(),
                skeletons={
                    name: SkeletonState(**s.describe())
                    for name, s in sorted(self.skeletons.items())
                },
            ),
            functions=sorted(self.functions),
            stats=self.stats.snapshot(),
            loads={path: t.to_state() for path, t in sorted(self.load_totals.items())},
            host_fills={source: t.to_state() for source, t in sorted(self.host_fills.items())},
        )


def _no_arena() -> torch.Tensor:
    """The arena of a host entry whose buffer is not taken yet."""
    return torch.empty(0, dtype=torch.uint8)


def _remove_stale_sidecars(directory: Path, *, max_age_s: float = 24 * 3600) -> None:
    """Sidecars serve only the process that wrote them (its skeletons); drop old leftovers."""
    if not directory.is_dir():
        return
    cutoff = time.time() - max_age_s
    for path in directory.glob("*.safetensors"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def model_error_message(error: BaseException) -> str:
    """The line of a model's exception that says what went wrong (TorchScript puts it last,
    after its own traceback), at most 500 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("The following operation failed"):
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
                return line[:500]
    return lines[0][:500]


def _skeleton_matches(skeleton: Skeleton, path: Path, fingerprint: str) -> bool:
    if skeleton.fingerprint != fingerprint or skeleton.artifact != path:
        return False
    try:
        stat = path.stat()
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == skeleton.artifact_stat


def _describe_device_model(model: DeviceModel) -> dict[str, Any]:
    return {
        "weights_bytes": model.weights_bytes,
        "arena_bytes": model.arena_bytes,
        "reserve_bytes": model.reserve_bytes,
        "source": model.source,
        "arrived": model.arrived,
        "groups": len(model.skeleton.layout.groups),
    }


def _describe_host_model(model: HostModel) -> dict[str, Any]:
    return {
        "weights_bytes": model.skeleton.layout.weights_bytes,
        "arena_bytes": model.size_bytes,
        "pinned": model.pinned,
        "source": model.source,
    }
