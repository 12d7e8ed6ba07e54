"""Loading models onto one device: one load per model at a time, as copy and compute overlap.

A load runs as named steps: size it (its skeleton's arena plus its activation reserve, filling
the host tier first when the layout is not known yet or the reserve is to be measured on this
device), claim its device bytes (:meth:`DeviceMemory.claim
<gpufaas.gpu_manager.device_memory.DeviceMemory.claim>`), hold the fastest source
(:meth:`Sources.copy_source`: a neighbour's copy, else the host tier's arena), then start the copy
while the format's backend builds the runnable on the device, so requests compute as the layers
land. The bytes are claimed before a source is held, so a load waiting for memory holds no other
device's model. The copy finishes in the background: the model is committed and the copy logged
(:class:`LoadLog`), or its error recorded for the requests waiting on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gpufaas.cache import CacheStats, InsufficientCapacity, SingleFlight
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.gpu_manager.backends import CopySource, backend_for
from gpufaas.gpu_manager.chain import (
    DeviceLoadOutOfMemory,
    Held,
    ResidencyTier,
    RuntimeFailure,
    Throughput,
    spec_fingerprint,
)
from gpufaas.gpu_manager.device_faults import (
    DeviceFailed,
    NodeHealth,
    TransferFailed,
    is_out_of_memory,
)
from gpufaas.gpu_manager.device_memory import DeviceMemory, as_model
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.disk_tier import DiskTier
from gpufaas.gpu_manager.host_tier import HostModel, Skeleton
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel, measure_device_reserve
from gpufaas.gpu_manager.peer_source import PeerSource

__all__ = ["DeviceLoads", "LoadJoin", "LoadLog", "LoadRecord", "Sources"]

logger = logging.getLogger(__name__)

# How a caller of :meth:`DeviceLoads.join` came to the device's load of a model: it ``started``
# it (no load of the model was under way there), or ``joined`` the one under way.
LoadJoin = Literal["started", "joined"]


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
class LoadLog:
    """Copies onto devices: the latest ones, and totals per path."""

    recent: collections.deque[LoadRecord] = field(
        default_factory=lambda: collections.deque(maxlen=256)
    )
    totals: dict[str, Throughput] = field(default_factory=dict)

    def add(self, record: LoadRecord) -> None:
        self.recent.append(record)
        self.totals.setdefault(record.path, Throughput()).add(record.nbytes, record.seconds)


@dataclass(frozen=True)
class Sources:
    """Where a device tier fills from, fastest first."""

    peers: PeerSource
    host: ResidencyTier[HostModel]
    disk: DiskTier  # for skeletons: a load is sized before any source is held

    async def copy_source(
        self,
        model: str,
        spec: InferenceFunctionSpec,
        loading: DeviceModel,
        host: Held[HostModel] | None,
        *,
        to: DeviceInfo,
    ) -> Held[CopySource]:
        """Hold the fastest source of ``loading``'s weights for device ``to``: a neighbour's
        copy, else the host tier's arena (``host``, if the load already holds it). A 503 if the
        host's copy is no longer these weights."""
        peer = None
        if backend_for(spec.model.format).peer_copies:
            peer = self.peers.acquire(model, loading.fingerprint, to=to)
        if peer is not None:
            if host is not None:
                host.release()
            return peer
        if host is None:
            host = await self.host.acquire(model, spec)
        found = host.value
        if (
            found.fingerprint != loading.fingerprint
            or found.skeleton.layout != loading.skeleton.layout
            or not found.arena.numel()
        ):
            host.release()
            raise RuntimeFailure(
                f"model {model!r} changed while loading; try again",
                status=503,
                reason="ModelChanged",
            )
        return Held(CopySource(host.value.arena, None, "host"), host.hit, host.release)


class DeviceLoads:
    """Loads onto one device: started once per model, joined by every caller meanwhile."""

    def __init__(
        self,
        *,
        info: DeviceInfo,
        backend: DeviceBackend,
        memory: DeviceMemory,
        sources: Sources,
        stats: CacheStats,
        log: LoadLog,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        admission_wait_s: float,
        health: NodeHealth,
        variable_dim: int,
        name: str,
    ) -> None:
        self._info = info
        self._backend = backend
        self._memory = memory
        self._sources = sources
        self._stats = stats
        self._log = log
        self._spawn = spawn
        self._admission_wait_s = admission_wait_s
        self._health = health
        self._variable_dim = variable_dim  # for the reserve measured on the device
        self._name = name  # the tier's name in the cache stats
        self._starts: SingleFlight[str, DeviceModel] = SingleFlight()
        self._joined: dict[str, int] = {}  # callers waiting on each start
        # called with the model, and whether the caller started the load or joined the one
        # under way, whenever a caller starts or joins a load here, before it waits (#13: a
        # running prefetch of another model yields to it; #16: a load order tells its own
        # start from a request that joins it)
        self.listeners: list[Callable[[str, LoadJoin], None]] = []
        # called with the model when a load's last step has run (committed, or its error
        # recorded): the device may have gone quiet (#13: a prefetch waiting for it looks again)
        self.landed: list[Callable[[str], None]] = []

    async def join(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str]
    ) -> DeviceModel:
        """Start loading ``model`` here, or join the load under way; returns once its copy is
        under way (evicting ``prefer`` first if room must be made). The listeners are told
        which, before the caller waits."""
        how: LoadJoin = "joined" if self._starts.in_flight(model) else "started"
        for listener in self.listeners:
            listener(model, how)
        self._joined[model] = self._joined.get(model, 0) + 1
        try:
            return await self._starts.do(
                model, lambda: self._start_evicting_on_oom(model, spec, prefer)
            )
        finally:
            self._joined[model] -= 1
            if not self._joined[model]:
                del self._joined[model]

    def cancel(self, model: str) -> bool:
        """Cancel a load of ``model`` that has not begun copying yet (filling the host tier,
        waiting for room), if only one caller waits on it; whether it was cancelled."""
        if self._joined.get(model, 0) != 1:
            return False
        return self._starts.cancel(model)

    # -- starting ----------------------------------------------------------------------------------

    async def _start_evicting_on_oom(
        self, model: str, spec: InferenceFunctionSpec, prefer: Sequence[str]
    ) -> DeviceModel:
        """Start a load; if the device itself runs out of memory (our accounting said the
        bytes were free: fragmentation, another process), evict every model not in use and
        try once more before answering 503. The load's copy says when the load began
        (``began_at``: its whole time is to its copy's end, whoever joined it later)."""
        began = time.perf_counter()
        try:
            return await self._start(model, spec, prefer, began=began)
        except DeviceLoadOutOfMemory as e:
            evicted = self._memory.evict_unheld()
            logger.warning("%s; evicted %d unused model(s), retrying once", e, evicted)
        return await self._start(model, spec, prefer, began=began)

    async def _start(
        self, model: str, spec: InferenceFunctionSpec, prefer: Sequence[str], *, began: float
    ) -> DeviceModel:
        """Start copying ``model`` here (a load that began at ``began``); returns once the copy
        is under way.

        The device bytes are claimed first (waiting, if models in use hold them), and only then
        is a source held: a load waiting for memory holds no other device's model.
        """
        while (existing := as_model(self._memory.tier.current(model))) is not None:
            if existing.module is not None or existing.error is not None:
                return existing
            # Another load's bytes are claimed but its copy has not begun: one being abandoned
            # (a prefetch's preemption cancelled it, and a later caller started a call of its
            # own), or still starting. Returned, a request held a replica not built yet (a 503,
            # "the replica is not built": tests/predict/test_prefetch_stress.py, eighteenth
            # session). Its retirement or its commit changes the tier: look again then.
            await self._memory.changed.wait()
        loading, host = await self._sized(model, spec, began=began)
        try:
            await self._claim(model, loading, prefer=prefer)
        except BaseException:
            if host is not None:
                host.release()
            raise
        try:
            source = await self._sources.copy_source(model, spec, loading, host, to=self._info)
        except BaseException:
            await self._abandon(model, loading, None)
            raise
        await self._begin_copy(model, spec, loading, source)
        self._spawn(self._finish(model, loading, source))
        return loading

    async def _sized(
        self, model: str, spec: InferenceFunctionSpec, *, began: float
    ) -> tuple[DeviceModel, Held[HostModel] | None]:
        """The load of ``model``, sized by its skeleton: the disk tier's, else learned by
        filling the host tier (whose copy is then held, and returned). The host tier is filled
        too when this device measures the activation reserve and has not yet."""
        host: Held[HostModel] | None = None
        skeleton = self._sources.disk.skeleton(model, spec)
        measure = self._backend.tracks_memory and not (skeleton and skeleton.reserve_measured)
        if skeleton is None or measure:
            host = await self._sources.host.acquire(model, spec)  # first fill: learn the layout
            skeleton = host.value.skeleton
            if measure and not skeleton.reserve_measured and host.value.arena.numel():
                await self._measure_reserve(model, skeleton, host.value.arena, spec)
        loading = DeviceModel(
            name=model,
            fingerprint=spec_fingerprint(spec),
            skeleton=skeleton,
            size_bytes=skeleton.layout.arena_bytes + skeleton.reserve_bytes,
            source="host",
            began_at=began,
        )
        return loading, host

    async def _measure_reserve(
        self, model: str, skeleton: Skeleton, arena: Any, spec: InferenceFunctionSpec
    ) -> None:
        """Replace the probe's reserve with one measured here at the declared max dims (once
        per skeleton; a device that cannot measure, or has no room now, keeps the probe's)."""
        skeleton.reserve_measured = True
        try:
            measured = await asyncio.to_thread(
                measure_device_reserve,
                skeleton,
                arena,
                spec,
                self._backend,
                variable_dim=self._variable_dim,
            )
        except Exception as e:
            logger.info("model %s: reserve not measured on %s (%s)", model, self._info.id, e)
            return
        if measured is not None:
            skeleton.reserve_bytes = max(measured, skeleton.probe.input_bytes)

    async def _claim(self, model: str, loading: DeviceModel, *, prefer: Sequence[str]) -> None:
        """Claim ``loading``'s bytes, waiting up to ``admission_wait_s`` while models in use
        hold them; a model larger than the device, or still blocked then, is a 503."""
        try:
            await self._memory.claim(model, loading, prefer=prefer, wait_s=self._admission_wait_s)
        except InsufficientCapacity as e:
            layout = loading.skeleton.layout
            raise RuntimeFailure(
                f"model {model!r} needs {loading.size_bytes} bytes on {self._info.id} "
                f"({layout.weights_bytes} of weights, {loading.reserve_bytes} reserved "
                f"for activations), which cannot be freed now: {e}",
                status=503,
                reason="InsufficientMemory",
            ) from None

    async def _begin_copy(
        self,
        model: str,
        spec: InferenceFunctionSpec,
        loading: DeviceModel,
        source: Held[CopySource],
    ) -> None:
        """Start the copy from ``source`` while the format's backend builds the runnable on
        the device; a device out of memory is a :class:`DeviceLoadOutOfMemory`."""
        loading.source = source.value.label
        try:
            await asyncio.to_thread(
                backend_for(spec.model.format).start,
                loading,
                self._backend,
                source=source.value,
                in_use_bytes=self._memory.tier.lru.used_bytes,
            )
        except BaseException as e:
            await self._abandon(model, loading, source)
            if is_out_of_memory(e):
                raise DeviceLoadOutOfMemory(
                    f"device {self._info.id} ran out of memory loading {model!r}: {e}",
                    status=503,
                    reason="InsufficientMemory",
                ) from None
            raise

    # -- ending ------------------------------------------------------------------------------------

    async def _abandon(
        self, model: str, loading: DeviceModel, source: Held[CopySource] | None
    ) -> None:
        tier = self._memory.tier
        if loading.transfer is not None:
            with contextlib.suppress(TransferFailed):
                await asyncio.to_thread(loading.transfer.wait_all)
        if tier.arriving.get(model) is loading:
            tier.retire(model)
        tier.unhold(model, loading)
        if source is not None:
            source.release()

    async def _finish(self, model: str, loading: DeviceModel, source: Held[CopySource]) -> None:
        try:
            await self._commit(model, loading, source)
        finally:
            for listener in self.landed:
                listener(model)

    async def _commit(self, model: str, loading: DeviceModel, source: Held[CopySource]) -> None:
        tier = self._memory.tier
        transfer = loading.transfer
        try:
            if transfer is not None:
                await asyncio.to_thread(transfer.wait_all)
        except (TransferFailed, DeviceFailed) as e:
            if isinstance(e, DeviceFailed):
                self._health.device_failed(self._info.id, e)
            loading.error = str(e)
            logger.error("loading %s onto %s failed: %s", model, self._info.id, e)
            if tier.arriving.get(model) is loading:
                tier.retire(model)
            tier.unhold(model, loading)
            return
        finally:
            source.release()
        loading.arrived = True
        path = "device->device" if loading.source.startswith("peer:") else "host->device"
        self._stats.record_move(
            "device" if path == "device->device" else "host", self._name, loading.arena_bytes
        )
        if transfer is not None and transfer.seconds is not None:
            self._log.add(LoadRecord(model, self._info.id, path, transfer.nbytes, transfer.seconds))
        if not tier.commit(model, loading):
            tier.unhold(model, loading)  # unloaded while arriving
