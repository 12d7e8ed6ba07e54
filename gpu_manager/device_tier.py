"""The device tier: one per device, a byte LRU of resident models with in-use pins.

A model's entry takes its arena plus its measured activation reserve. :meth:`DeviceTier.acquire`
holds a resident model for one request, or joins (or starts) its load: the device bytes are
claimed first, evicting unheld models (the scheduler's ``prefer`` hint first, then least recently
used), waiting up to ``admission_wait_s`` when models in use hold them; only then is a source held:
a neighbour's copy (:class:`~gpufaas.gpu_manager.peer_source.PeerSource`) or the host tier's arena
(:class:`~gpufaas.gpu_manager.host_cache.HostTier`). The format's backend builds the runnable on
the device while the copy runs, so the request computes as the layers land. A model in use is never
evicted; one unloaded while in use drains (keeps its bytes) until its last request ends.

Waiting is event-driven: a load waiting for memory, and a repository load waiting for the copy to
land, sleep on an event set whenever this tier's bytes or entries change.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from gpufaas.cache import CacheStats, InsufficientCapacity, SingleFlight, TierStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.node import DeviceState
from gpufaas.gpu_manager.backends import CopySource, backend_for, model_error_message
from gpufaas.gpu_manager.chain import (
    DeviceLoadOutOfMemory,
    Held,
    ResidencyTier,
    RuntimeFailure,
    Throughput,
    spec_fingerprint,
)
from gpufaas.gpu_manager.devices import (
    DeviceBackend,
    DeviceFailed,
    DeviceInfo,
    NodeHealth,
    TransferFailed,
    is_out_of_memory,
)
from gpufaas.gpu_manager.disk_tier import DiskTier
from gpufaas.gpu_manager.host_cache import ByteSeconds
from gpufaas.gpu_manager.host_tier import HostModel, Skeleton
from gpufaas.gpu_manager.inline import InlineForwards
from gpufaas.gpu_manager.loader import (
    DeviceModel,
    ForwardResult,
    forward_retrying_oom,
    measure_device_reserve,
)
from gpufaas.gpu_manager.peer_source import PeerSource
from gpufaas.gpu_manager.residency import Tier
from gpufaas.gpu_manager.tensors import TensorError

__all__ = ["SHARD_PREFIX", "DeviceShards", "DeviceTier", "LoadLog", "LoadRecord", "ShardResident"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 3  # a model replaced between its load and our hold is loaded again, this often
# Keys of shards (gpu_manager/shards.py) in the device LRU; model names are DNS-1123 labels.
SHARD_PREFIX = "\x00shard:"


@dataclass(eq=False)
class ShardResident:
    """A shard of a distributed model resident on this device, beside the models: its bytes
    count in this tier's LRU, it is evicted like any unheld entry, and ``evicted`` then tells
    the shard host (which drops the rest of its set: a shard without its set is useless)."""

    size_bytes: int
    evicted: Callable[[ShardResident], None]
    holds: int = 0
    drain_key: str | None = None


Resident = DeviceModel | ShardResident


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


class DeviceShards:
    """Shards of distributed models (gpu_manager/shards.py) resident on one device: they share
    its byte budget and LRU with its models, and leave as a set when their owner drops them."""

    def __init__(
        self, *, tier: Tier[Resident], stats: CacheStats, device_id: str, name: str
    ) -> None:
        self.tier = tier
        self._stats = stats
        self._device_id = device_id
        self._name = name

    def place(
        self, key: str, size_bytes: int, *, evicted: Callable[[ShardResident], None]
    ) -> ShardResident:
        """Make ``key`` resident with ``size_bytes``, evicting unheld models and shards (least
        recently used first); ``evicted`` is called when it leaves. A 503 if it cannot fit."""
        shard_key = SHARD_PREFIX + key
        self.tier.retire(shard_key)
        shard = ShardResident(size_bytes, evicted)
        try:
            for victim in self.tier.make_room(size_bytes):
                self._stats.record_eviction(self._name, victim.size_bytes)
            self.tier.reserve(shard_key, shard, size_bytes=size_bytes)
        except InsufficientCapacity as e:
            raise RuntimeFailure(
                f"shard {key} needs {size_bytes} bytes on {self._device_id}, which cannot be "
                f"freed now: {e}",
                status=503,
                reason="InsufficientMemory",
            ) from None
        self.tier.commit(shard_key, shard)
        return shard

    def hold(self, key: str, shard: ShardResident) -> bool:
        """Keep ``shard`` from eviction while a request runs on it; False if it is gone."""
        if not self.tier.hold(SHARD_PREFIX + key, shard):
            return False
        self.tier.lru.touch(SHARD_PREFIX + key)  # most recently used
        return True

    def unhold(self, key: str, shard: ShardResident) -> None:
        self.tier.unhold(SHARD_PREFIX + key, shard)

    def drop(self, key: str) -> bool:
        """Take the shard out (its bytes return once no request holds it)."""
        return self.tier.retire(SHARD_PREFIX + key)


class DeviceTier:
    """Resident models on one device."""

    name = "device"

    def __init__(
        self,
        *,
        info: DeviceInfo,
        backend: DeviceBackend,
        sources: Sources,
        stats: CacheStats,
        log: LoadLog,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        max_concurrency: int,
        overlap: bool,
        admission_wait_s: float,
        health: NodeHealth | None = None,
        variable_dim: int = 64,
    ) -> None:
        self.info = info
        self.backend = backend
        self.health = health or NodeHealth()  # a fatal device error ends the process
        self.variable_dim = variable_dim  # for the reserve measured on the device
        self.tier: Tier[Resident] = Tier(
            name=info.id,
            capacity_bytes=info.capacity_bytes,
            release=self._release,
            on_change=self._notify,
        )
        self.shards = DeviceShards(tier=self.tier, stats=stats, device_id=info.id, name=self.name)
        self.held = ByteSeconds()  # device GB-s on /metrics (#13), loading bytes included
        self.slots = asyncio.Semaphore(max_concurrency)
        self.inline = InlineForwards()  # tiny passes run on the loop, not in a thread
        self.max_concurrency = max_concurrency
        self.outstanding = 0  # requests routed here and not answered yet
        self.overlap = overlap  # False: a request waits for the whole model before computing
        self.admission_wait_s = admission_wait_s
        self._sources = sources
        self._stats = stats
        self._log = log
        self._spawn = spawn
        self._starts: SingleFlight[str, DeviceModel] = SingleFlight()
        self._joined: dict[str, int] = {}  # callers waiting on each start
        # called with the model whenever a caller starts or joins a load here (#13: a
        # running prefetch of another model yields to it)
        self.load_listeners: list[Callable[[str], None]] = []
        self._changed = asyncio.Event()  # replaced on every change; waiters hold the old one

    # -- the tier protocol -------------------------------------------------------------------------

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[DeviceModel]:
        """Hold ``model`` on this device for one request: resident (a hit), arriving (compute as
        it lands), or loaded now, evicting ``prefer`` first if room must be made."""
        for _ in range(_ATTEMPTS):
            found = _model(self.tier.resident(model))
            hit = found is not None and found.arrived
            if found is None:
                arriving = _model(self.tier.arriving.get(model))
                if arriving is not None and arriving.module is not None:
                    found = arriving  # copy under way: compute as its layers land
            if found is None:
                self._stats.record_miss(self.name)
                for listener in self.load_listeners:
                    listener(model)
                self._joined[model] = self._joined.get(model, 0) + 1
                try:
                    found = await self._starts.do(
                        model, lambda: self._start_evicting_on_oom(model, spec, prefer)
                    )
                finally:
                    self._joined[model] -= 1
                    if not self._joined[model]:
                        del self._joined[model]
            elif hit:
                self._stats.record_hit(self.name)
            if self.tier.hold(model, found):
                break
        else:
            raise RuntimeFailure(
                f"model {model!r} was unloaded while loading; try again",
                status=503,
                reason="ModelChanged",
            )
        held = found
        handle = Held(held, hit, lambda: self.tier.unhold(model, held))
        if not self.overlap and not held.arrived and held.transfer is not None:
            with contextlib.suppress(TransferFailed):  # the forward pass reports it
                await asyncio.to_thread(held.transfer.wait_all)
        return handle

    def evict(self, model: str) -> bool:
        return self.tier.retire(model)

    def cancel_start(self, model: str) -> bool:
        """Cancel a load of ``model`` that has not begun copying yet (filling the host tier,
        waiting for room), if only one caller waits on it; whether it was cancelled."""
        if self._joined.get(model, 0) != 1:
            return False
        return self._starts.cancel(model)

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)

    def gb_seconds(self) -> float:
        """Bytes held on this device x seconds since start, in GB-s: levelled when bytes are
        claimed for a load and at every change the tier reports (commit, release, retire)."""
        return self.held.level(self.tier.lru.used_bytes) / 1e9

    # -- requests ----------------------------------------------------------------------------------

    async def arrived(self, model: DeviceModel) -> None:
        """Wait until every group of ``model`` has landed; a 503 if its copy failed."""
        while not model.arrived and model.error is None:
            changed = self._changed
            if model.transfer is not None and not model.transfer.done():
                with contextlib.suppress(TransferFailed):
                    await asyncio.to_thread(model.transfer.wait_all)
                continue
            await changed.wait()  # the load's finishing step commits it (or records the error)
        if model.error is not None:
            raise RuntimeFailure(
                f"model {model.name!r} failed to load on {self.info.id}: {model.error}",
                status=503,
                reason="ModelLoadFailed",
            )

    async def run(
        self, model: DeviceModel, inputs: Sequence[NDArray[Any]], spec: InferenceFunctionSpec
    ) -> ForwardResult:
        """One forward pass on a held model, with the model's errors as clear failures."""
        backend = backend_for(spec.model.format)
        landed = model.arrived or model.transfer is None or model.transfer.done()
        inline = self.inline.inline(model.fingerprint, landed=landed)
        self.inline.running += 1
        try:
            result = await forward_retrying_oom(  # an OOM evicts what is not in use, retries
                lambda: backend.run(model, list(inputs), spec, self.backend),
                backend=self.backend,
                evict_unheld=self._evict_unheld,
                inline=inline,
            )
            self.inline.measured(model.fingerprint, result.compute_ms)
            return result
        except DeviceFailed as e:  # a sticky CUDA error: this node must stop serving
            self.health.device_failed(self.info.id, e)
            raise RuntimeFailure(str(e), status=503, reason="DeviceFailed") from None
        except Exception as e:
            raise forward_failure(e, model=model.name, device_id=self.info.id) from None
        finally:
            self.inline.running -= 1

    def state(self) -> DeviceState:
        return DeviceState(
            **self.info.to_dict(),
            used_bytes=self.tier.lru.used_bytes,
            free_cache_bytes=self.tier.lru.free_bytes,
            outstanding=self.outstanding,
            max_concurrency=self.max_concurrency,
            memory_allocated=self.backend.memory_allocated(),
            memory_reserved=self.backend.memory_reserved(),
            pooled_bytes=self.backend.pooled_bytes(),
            residents=[
                r for r in self.tier.residents(_describe) if not r.model.startswith(SHARD_PREFIX)
            ],
            draining=self.tier.draining_rows(),
        )

    # -- loading -----------------------------------------------------------------------------------

    async def _start_evicting_on_oom(
        self, model: str, spec: InferenceFunctionSpec, prefer: Sequence[str]
    ) -> DeviceModel:
        """Start a load; if the device itself runs out of memory (our accounting said the
        bytes were free: fragmentation, another process), evict every model not in use and
        try once more before answering 503."""
        try:
            return await self._start(model, spec, prefer)
        except DeviceLoadOutOfMemory as e:
            evicted = self._evict_unheld()
            logger.warning("%s; evicted %d unused model(s), retrying once", e, evicted)
        return await self._start(model, spec, prefer)

    def _evict_unheld(self) -> int:
        lru = self.tier.lru
        evicted = self.tier.make_room(lru.capacity_bytes - lru.pinned_bytes)
        for victim in evicted:
            self._stats.record_eviction(self.name, victim.size_bytes)
        return len(evicted)

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
                self.backend,
                variable_dim=self.variable_dim,
            )
        except Exception as e:
            logger.info("model %s: reserve not measured on %s (%s)", model, self.info.id, e)
            return
        if measured is not None:
            skeleton.reserve_bytes = max(measured, skeleton.probe.input_bytes)

    async def _start(
        self, model: str, spec: InferenceFunctionSpec, prefer: Sequence[str]
    ) -> DeviceModel:
        """Start copying ``model`` here; returns once the copy is under way.

        The device bytes are claimed first (waiting, if models in use hold them), and only then
        is a source held: a load waiting for memory holds no other device's model.
        """
        existing = _model(self.tier.current(model))
        if existing is not None:
            return existing
        fingerprint = spec_fingerprint(spec)
        host: Held[HostModel] | None = None
        skeleton = self._sources.disk.skeleton(model, spec)
        measure = self.backend.tracks_memory and not (skeleton and skeleton.reserve_measured)
        if skeleton is None or measure:
            host = await self._sources.host.acquire(model, spec)  # first fill: learn the layout
            skeleton = host.value.skeleton
            if measure and not skeleton.reserve_measured and host.value.arena.numel():
                await self._measure_reserve(model, skeleton, host.value.arena, spec)
        loading = DeviceModel(
            name=model,
            fingerprint=fingerprint,
            skeleton=skeleton,
            size_bytes=skeleton.layout.arena_bytes + skeleton.reserve_bytes,
            source="host",
        )
        try:
            await self._admit(model, loading, prefer=prefer)
        except BaseException:
            if host is not None:
                host.release()
            raise
        try:
            source = await self._source(model, spec, loading, host)
        except BaseException:
            await self._abandon(model, loading, None)
            raise
        loading.source = source.value.label
        try:
            await asyncio.to_thread(
                backend_for(spec.model.format).start,
                loading,
                self.backend,
                source=source.value,
                in_use_bytes=self.tier.lru.used_bytes,
            )
        except BaseException as e:
            await self._abandon(model, loading, source)
            if is_out_of_memory(e):
                raise DeviceLoadOutOfMemory(
                    f"device {self.info.id} ran out of memory loading {model!r}: {e}",
                    status=503,
                    reason="InsufficientMemory",
                ) from None
            raise
        self._spawn(self._finish(model, loading, source))
        return loading

    async def _source(
        self,
        model: str,
        spec: InferenceFunctionSpec,
        loading: DeviceModel,
        host: Held[HostModel] | None,
    ) -> Held[CopySource]:
        """Hold the fastest source: a neighbour's copy, else the host tier's arena."""
        peer = None
        if backend_for(spec.model.format).peer_copies:
            peer = self._sources.peers.acquire(model, loading.fingerprint, to=self.info)
        if peer is not None:
            if host is not None:
                host.release()
            return peer
        if host is None:
            host = await self._sources.host.acquire(model, spec)
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

    async def _admit(self, model: str, loading: DeviceModel, *, prefer: Sequence[str] = ()) -> None:
        """Claim ``loading.size_bytes``, evicting unheld models (``prefer`` first: the
        scheduler's hint; it chose them as the cheapest to reload).

        If models in use hold the bytes, waits up to ``admission_wait_s`` for them to be
        released; a model larger than the device, or still blocked then, is a 503.
        """
        size = loading.size_bytes
        deadline = time.monotonic() + self.admission_wait_s
        while True:
            changed = self._changed
            try:
                for victim in self.tier.make_room(size, prefer=prefer):
                    self._stats.record_eviction(self.name, victim.size_bytes)
                self.tier.reserve(model, loading, size_bytes=size)
                self.held.level(self.tier.lru.used_bytes)
                return
            except InsufficientCapacity as e:
                remaining = deadline - time.monotonic()
                if size > self.tier.lru.capacity_bytes or remaining <= 0:
                    layout = loading.skeleton.layout
                    raise RuntimeFailure(
                        f"model {model!r} needs {size} bytes on {self.info.id} "
                        f"({layout.weights_bytes} of weights, {loading.reserve_bytes} reserved "
                        f"for activations), which cannot be freed now: {e}",
                        status=503,
                        reason="InsufficientMemory",
                    ) from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    async def _abandon(
        self, model: str, loading: DeviceModel, source: Held[CopySource] | None
    ) -> None:
        if loading.transfer is not None:
            with contextlib.suppress(TransferFailed):
                await asyncio.to_thread(loading.transfer.wait_all)
        if self.tier.arriving.get(model) is loading:
            self.tier.retire(model)
        self.tier.unhold(model, loading)
        if source is not None:
            source.release()

    async def _finish(self, model: str, loading: DeviceModel, source: Held[CopySource]) -> None:
        transfer = loading.transfer
        try:
            if transfer is not None:
                await asyncio.to_thread(transfer.wait_all)
        except (TransferFailed, DeviceFailed) as e:
            if isinstance(e, DeviceFailed):
                self.health.device_failed(self.info.id, e)
            loading.error = str(e)
            logger.error("loading %s onto %s failed: %s", model, self.info.id, e)
            if self.tier.arriving.get(model) is loading:
                self.tier.retire(model)
            self.tier.unhold(model, loading)
            return
        finally:
            source.release()
        loading.arrived = True
        path = "device->device" if loading.source.startswith("peer:") else "host->device"
        self._stats.record_move(
            "device" if path == "device->device" else "host", self.name, loading.arena_bytes
        )
        if transfer is not None and transfer.seconds is not None:
            self._log.add(LoadRecord(model, self.info.id, path, transfer.nbytes, transfer.seconds))
        if not self.tier.commit(model, loading):
            self.tier.unhold(model, loading)  # unloaded while arriving

    def _release(self, model: Resident) -> None:
        if isinstance(model, ShardResident):
            model.evicted(model)
            return
        arena, model.arena, model.module = model.arena, None, None
        if arena is not None:
            self.backend.release(arena, in_use_bytes=self.tier.lru.used_bytes)

    def _notify(self) -> None:
        """Wake whoever waits for this tier to change (each waits on the event current when
        it looked)."""
        self.held.level(self.tier.lru.used_bytes)
        self._changed.set()
        self._changed = asyncio.Event()


def _model(value: Resident | None) -> DeviceModel | None:
    return value if isinstance(value, DeviceModel) else None


def _describe(model: Resident) -> dict[str, Any]:
    if isinstance(model, ShardResident):
        return {}
    return {
        "weights_bytes": model.weights_bytes,
        "arena_bytes": model.arena_bytes,
        "reserve_bytes": model.reserve_bytes,
        "source": model.source,
        "arrived": model.arrived,
        "groups": len(model.skeleton.layout.groups),
    }


def forward_failure(error: Exception, *, model: str, device_id: str) -> RuntimeFailure:
    """What a request is told when a forward pass of ``model`` on ``device_id`` raised
    ``error``: a bad tensor, a failed copy, the device out of memory, or the model's own
    refusal of the input (a 400 with its message)."""
    if isinstance(error, TensorError):
        return RuntimeFailure(str(error), status=error.status, reason=error.reason)
    if isinstance(error, TransferFailed):
        return RuntimeFailure(
            f"model {model!r} failed to load on {device_id}: {error}",
            status=503,
            reason="ModelLoadFailed",
        )
    if is_out_of_memory(error):
        return RuntimeFailure(
            f"device {device_id} ran out of memory running {model!r}",
            status=503,
            reason="InsufficientMemory",
        )
    return RuntimeFailure(
        f"the model rejected the input: {model_error_message(error)}",
        status=400,
        reason="ModelError",
    )
