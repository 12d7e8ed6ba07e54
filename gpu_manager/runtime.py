"""The node runtime: registered functions, the residency chain composed, and requests.

One :class:`NodeRuntime` per GPU-manager process. It builds the chain
(:mod:`gpufaas.gpu_manager.chain`) once::

    DeviceTier (per device) <- PeerSource <- HostTier <- DiskTier <- ArtifactSource

and does what no single tier does: keeps the functions (a changed spec drops every cached copy),
prepares a function's sidecar when it is registered, picks a device, batches concurrent requests
per (device, model), and reports the node's :class:`~gpufaas.core.node.NodeState`.

HTTP lives in :mod:`gpufaas.gpu_manager.server`; failures are :class:`RuntimeFailure` with the
status and message to show.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from gpufaas.cache import CacheStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.node import NodeState, SkeletonState
from gpufaas.core.protocol import Allocate
from gpufaas.gpu_manager.artifact_source import ArtifactSource
from gpufaas.gpu_manager.backends import backend_for
from gpufaas.gpu_manager.batching import Batcher, concat_inputs, split_outputs
from gpufaas.gpu_manager.chain import RuntimeFailure, spec_fingerprint
from gpufaas.gpu_manager.device_faults import NodeHealth
from gpufaas.gpu_manager.device_loads import LoadJoin
from gpufaas.gpu_manager.device_tier import DeviceTier, LoadLog, Sources
from gpufaas.gpu_manager.devices import DeviceBackend, make_backend
from gpufaas.gpu_manager.disk_tier import DiskTier
from gpufaas.gpu_manager.host_cache import HostMemory, HostTier
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel, ForwardResult
from gpufaas.gpu_manager.peer_source import PeerSource
from gpufaas.gpu_manager.pinned import cuda_available, pinned_array
from gpufaas.gpu_manager.process_setup import platform_versions

__all__ = ["InferOutcome", "NodeRuntime", "RuntimeFailure"]

logger = logging.getLogger(__name__)

DEFAULT_DISK_CACHE_BYTES = 32 << 30


@dataclass
class InferOutcome:
    outputs: dict[str, tuple[NDArray[Any], str]]
    cache_hit: bool
    # a miss: the whole time of the load it used, from the load's start to its copy's end,
    # whichever caller started it (a request that joined a load in flight, or found a copy
    # still arriving, waited for less; gateways learn load times from this); a hit: 0
    load_ms: float
    compute_ms: float
    size_bytes: int
    load_source: str = "device"  # "device" (a hit), "host", "peer:<id>"
    batch_size: int = 1  # requests that shared the forward pass


class NodeRuntime:
    """Serves registered functions on this node's devices."""

    def __init__(
        self,
        *,
        devices: Sequence[DeviceInfo],
        store: ArtifactStore,
        host_capacity_bytes: int,
        disk_capacity_bytes: int = DEFAULT_DISK_CACHE_BYTES,
        max_concurrency_per_device: int = 4,
        sidecar_dir: Path | None = None,
        probe_variable_dim: int = 64,
        pin_host_memory: bool | None = None,
        overlap: bool = True,
        admission_wait_s: float = 10.0,
        prepare_on_register: bool = True,
        backends: Mapping[str, DeviceBackend] | None = None,
        health: NodeHealth | None = None,
    ) -> None:
        if not devices:
            raise ValueError("a GPU manager needs at least one device")
        if max_concurrency_per_device < 1:
            raise ValueError(
                f"max_concurrency_per_device must be >= 1, got {max_concurrency_per_device}"
            )
        self.functions: dict[str, InferenceFunctionSpec] = {}
        self.health = health or NodeHealth()  # a fatal device error ends this process
        self.stats = CacheStats(("device", "host", "disk"))
        self.loads = LoadLog()
        self.batchers: dict[tuple[str, str], Batcher[InferOutcome | RuntimeFailure]] = {}
        # called with (model, device id) when a request's batch holds a model (#13: prefetch
        # precision is counted at the node)
        self.use_listeners: list[Callable[[str, str], None]] = []
        # called with a device id when a request on it ends or a load onto it lands (#13: a
        # prefetch waiting for its device to go quiet is woken, never polls)
        self.settle_listeners: list[Callable[[str], None]] = []
        self.prepare_on_register = prepare_on_register
        self._background: set[asyncio.Task[Any]] = set()
        self._preparing = asyncio.Semaphore(1)  # one registration prepared at a time
        device_backends = {
            info.id: (backends or {}).get(info.id) or make_backend(info) for info in devices
        }
        self.memory = HostMemory(
            capacity_bytes=host_capacity_bytes,
            pin=cuda_available() if pin_host_memory is None else pin_host_memory,
        )
        self.artifacts = ArtifactSource(store, stats=self.stats)
        self.disk = DiskTier(
            directory=sidecar_dir if sidecar_dir is not None else store.root / "host-sidecars",
            capacity_bytes=disk_capacity_bytes,
            below=self.artifacts,
            buffers=self.memory,
            stats=self.stats,
            alignment=max(b.alignment for b in device_backends.values()),
            min_group_bytes=max(b.min_group_bytes for b in device_backends.values()),
            variable_dim=probe_variable_dim,
        )
        self.host = HostTier(
            capacity_bytes=host_capacity_bytes,
            memory=self.memory,
            below=self.disk,
            stats=self.stats,
            spawn=self._spawn,
        )
        sources = Sources(
            peers=PeerSource(devices=lambda: self.devices, stats=self.stats),
            host=self.host,
            disk=self.disk,
        )
        self.devices: dict[str, DeviceTier] = {
            info.id: DeviceTier(
                info=info,
                backend=device_backends[info.id],
                sources=sources,
                stats=self.stats,
                log=self.loads,
                spawn=self._spawn,
                max_concurrency=max_concurrency_per_device,
                overlap=overlap,
                admission_wait_s=admission_wait_s,
                health=self.health,
                variable_dim=probe_variable_dim,
            )
            for info in devices
        }
        _settle_on_commit(self.devices, self._settled)

    # -- functions ---------------------------------------------------------------------------------

    def register(self, name: str, spec: InferenceFunctionSpec) -> None:
        """Add or update a function; changed weights drop every cached copy. The function's
        sidecar is prepared in the background, so its first request reads it from disk."""
        old = self.functions.get(name)
        self.functions[name] = spec
        if old is not None and spec_fingerprint(old) != spec_fingerprint(spec):
            self.drop_everywhere(name)
        elif old is not None and old.batching != spec.batching:
            self._drop_batchers(name)
        if self.prepare_on_register and (old is None or self.disk.skeleton(name, spec) is None):
            self._spawn(self._prepare(name, spec))

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
        """Unload ``name`` from every tier and forget its skeleton and sidecar.

        Copies still in use keep their bytes reserved until their last request ends.
        """
        dropped = [device_id for device_id, d in self.devices.items() if d.evict(name)]
        self._drop_batchers(name)
        self.host.evict(name)
        self.disk.forget(name)
        return dropped

    def unload(self, name: str, *, device_id: str | None = None) -> list[str]:
        if device_id is None:
            return self.drop_everywhere(name)
        return [device_id] if self.device(device_id).evict(name) else []

    def device(self, device_id: str | None) -> DeviceTier:
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

    def staging(self, device_id: str | None) -> Allocate | None:
        """Where a request's tensors bound for ``device_id`` are decoded to: pinned host memory
        for a CUDA device (then copied to it asynchronously, with no staging copy between), else
        None (new arrays; on a CPU device they are the very tensors the model reads)."""
        device = (
            next(iter(self.devices.values())) if device_id is None else self.devices.get(device_id)
        )
        return pinned_array if device is not None and device.info.kind == "cuda" else None

    def on_load(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(model, device id)`` whenever a load starts or is joined on a device."""
        for device_id, device in self.devices.items():
            device.load_listeners.append(functools.partial(_with_device, listener, device_id))

    def on_use(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(model, device id)`` whenever a request's batch holds a model on a
        device (resident, arriving, or loaded for it)."""
        self.use_listeners.append(listener)

    def on_settle(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(device id)`` whenever a request on a device ends, a load onto it
        (:meth:`load`) lands, or a load's background commit there ends: the moments the
        device may have gone quiet."""
        self.settle_listeners.append(listener)

    def _settled(self, device_id: str) -> None:
        for listener in self.settle_listeners:
            listener(device_id)

    def cancel_load(self, name: str, *, device_id: str) -> bool:
        """Cancel a load of ``name`` on the device before it copies, if nothing else awaits it."""
        return self.device(device_id).cancel_start(name)

    # -- requests ----------------------------------------------------------------------------------

    async def load(self, name: str, *, device_id: str | None = None) -> str:
        """Make ``name`` resident on a device (repository load); returns the device id."""
        spec = self.spec(name)
        device = self.device(device_id)
        try:
            with await device.acquire(name, spec) as model:
                await device.arrived(model)
        finally:
            self._settled(device.info.id)
        return device.info.id

    async def infer(
        self,
        name: str,
        inputs: Sequence[NDArray[Any]],
        *,
        device_id: str | None = None,
        evict_first: Sequence[str] = (),
    ) -> InferOutcome:
        """Run one request. ``evict_first``: if this request makes the model load, evict these
        models first (when not in use) before least-recently used ones; the scheduler's hint,
        used by this request's load only."""
        spec = self.spec(name)
        device = self.device(device_id)
        hint = tuple(evict_first)
        device.outstanding += 1
        try:
            if _batched(spec, inputs):
                result = await self._batcher(name, device, spec).submit(inputs, evict_first=hint)
            else:
                (result,) = await self._run_batch(name, device, [inputs], hint)
        finally:
            device.outstanding -= 1
            self._settled(device.info.id)
        if isinstance(result, RuntimeFailure):
            raise result
        return result

    def infer_warm(
        self,
        name: str,
        spec: InferenceFunctionSpec,
        inputs: Sequence[NDArray[Any]],
        *,
        device_id: str | None,
    ) -> InferOutcome | Coroutine[Any, Any, InferOutcome] | None:
        """:meth:`infer` in one straight step, for the usual warm request: one that is not
        batched, on a named device where the model is resident with every weight landed, with
        a free slot and passes the inline rule lets on the loop. The hold, the use listeners, the
        pass (under ``inference_mode``) and the release run at once, with no coroutine, task or
        thread hop; nothing else runs on the loop meanwhile, so no slot needs taking. None, with
        nothing done, when the request is not such a one: then :meth:`infer` serves it. A pass
        that ran out of memory returns the rest of the request to await (the usual pass, which
        evicts and retries in a thread, on the copy still held): the hit and the use are counted
        once, here. The answer is the one :meth:`infer` would give."""
        if _batched(spec, inputs):
            return None  # a request the batcher may join with others
        device = self.devices.get(device_id) if device_id is not None else None
        model = device.hold_warm(name) if device is not None else None
        if device is None or model is None:
            return None
        try:
            for listener in self.use_listeners:
                listener(name, device.info.id)
            result = device.run_warm(model, inputs, spec)
        except BaseException:
            device.tier.unhold(name, model)
            raise
        if result is None:  # out of memory: the model stays held for the rest
            return self._after_out_of_memory(name, device, model, inputs, spec)
        device.tier.unhold(name, model)
        return InferOutcome(result.outputs, True, 0.0, result.compute_ms, model.size_bytes)

    async def _after_out_of_memory(
        self,
        name: str,
        device: DeviceTier,
        model: DeviceModel,
        inputs: Sequence[NDArray[Any]],
        spec: InferenceFunctionSpec,
    ) -> InferOutcome:
        """The rest of a warm request whose pass on the loop ran out of memory: the usual pass
        under a slot, on the copy :meth:`infer_warm` holds (and releases here), counted by it."""
        device.outstanding += 1
        try:
            async with device.slots:
                result = await device.run(model, inputs, spec)
        finally:
            device.outstanding -= 1
            device.tier.unhold(name, model)
            self._settled(device.info.id)
        return InferOutcome(result.outputs, True, 0.0, result.compute_ms, model.size_bytes)

    def _batcher(
        self, name: str, device: DeviceTier, spec: InferenceFunctionSpec
    ) -> Batcher[InferOutcome | RuntimeFailure]:
        key = (device.info.id, name)
        batcher = self.batchers.get(key)
        if batcher is None:
            batcher = Batcher(
                max_batch_size=spec.batching.max_batch_size,
                max_delay_ms=spec.batching.max_delay_ms,
                run=lambda batch, hint: self._run_batch(name, device, batch, hint),
                most_waiting=device.max_concurrency,  # the node admits as many per device
            )
            self.batchers[key] = batcher
        return batcher

    def _drop_batchers(self, name: str) -> None:
        for key in [k for k in self.batchers if k[1] == name]:
            del self.batchers[key]

    async def _run_batch(
        self,
        name: str,
        device: DeviceTier,
        batch: list[Sequence[NDArray[Any]]],
        evict_first: tuple[str, ...],
    ) -> list[InferOutcome | RuntimeFailure]:
        """Run the requests of one batch on ``device`` as one forward pass.

        A batch the model rejects is run again one request at a time, so one bad request
        fails alone; so is a batch whose outputs do not have one row per input row.
        """
        spec = self.spec(name)
        started = time.perf_counter()
        held = await device.acquire(name, spec, prefer=evict_first)
        for listener in self.use_listeners:
            listener(name, device.info.id)
        with held as model:
            async with device.slots:
                results: list[ForwardResult | RuntimeFailure] = []
                parts = None
                if len(batch) > 1:
                    counts = [int(b[0].shape[0]) if b and b[0].ndim else 1 for b in batch]
                    try:
                        merged = await device.run(model, concat_inputs(batch), spec)
                    except RuntimeFailure as e:
                        if e.status != 400:  # the model or the input checks rejected one
                            raise
                    else:
                        parts = split_outputs(merged.outputs, counts)
                        results = [merged] * len(batch)
                if len(batch) == 1:  # most requests: no comprehension's frame per request
                    results = [await _run_or_failure(device, model, batch[0], spec)]
                elif parts is None:
                    results = [await _run_or_failure(device, model, b, spec) for b in batch]
            load_ms = _load_ms(model, held.hit, started)
        return [
            result
            if isinstance(result, RuntimeFailure)
            else InferOutcome(
                outputs=parts[i] if parts is not None else result.outputs,
                cache_hit=held.hit,
                load_ms=load_ms,
                compute_ms=result.compute_ms,
                size_bytes=model.size_bytes,
                load_source="device" if held.hit else model.source,
                batch_size=len(batch) if parts is not None else 1,
            )
            for i, result in enumerate(results)
        ]

    # -- background work ---------------------------------------------------------------------------

    async def _prepare(self, name: str, spec: InferenceFunctionSpec) -> None:
        async with self._preparing:
            if not self._current(name, spec):
                return  # unregistered or changed while queued
            await self.disk.prefetch(name, spec)
            # Unregistered or changed while it was prepared: drop it (not a newer spec's).
            stale = self.disk.skeletons.get(name)
            if (
                not self._current(name, spec)
                and stale
                and stale.fingerprint == spec_fingerprint(spec)
            ):
                self.disk.forget(name)

    def _current(self, name: str, spec: InferenceFunctionSpec) -> bool:
        registered = self.functions.get(name)
        return registered is not None and spec_fingerprint(registered) == spec_fingerprint(spec)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # registered outside the event loop (a script): nothing to overlap
            coroutine.close()
            return
        task = loop.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for copies, preparations and sidecar writes in flight (tests, benchmarks,
        shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- state -------------------------------------------------------------------------------------

    def state(self) -> NodeState:
        """Devices and every tier with byte-exact sizes, in LRU order (least recent first)."""
        skeletons = {
            name: SkeletonState(
                **skeleton.describe(), backend=backend_for(self.functions[name].model.format).name
            )
            for name, skeleton in sorted(self.disk.skeletons.items())
            if name in self.functions
        }
        return NodeState(
            devices=[d.state() for d in self.devices.values()],
            host=self.host.state().model_copy(update={"skeletons": skeletons}),
            disk=self.disk.state(),
            functions=sorted(self.functions),
            stats=self.stats.snapshot(),
            loads={path: t.to_state() for path, t in sorted(self.loads.totals.items())},
            host_fills={source: t.to_state() for source, t in sorted(self.host.fills.items())},
            platform=platform_versions(),
            ready=self.health.ready,
            failure=self.health.failure,
        )


def _batched(spec: InferenceFunctionSpec, inputs: Sequence[NDArray[Any]]) -> bool:
    """Whether a request goes through its model's batcher: batching is on and it has fewer
    rows than a full batch."""
    limit = spec.batching.max_batch_size
    return limit > 1 and (int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1) < limit


def _with_device(
    listener: Callable[[str, str], None], device_id: str, model: str, how: LoadJoin
) -> None:
    listener(model, device_id)


def _settle_on_commit(devices: Mapping[str, DeviceTier], settled: Callable[[str], None]) -> None:
    """A load's commit (or failure), which runs after the request that started it was
    answered, may leave its device quiet: tell ``settled`` as when a request ends."""
    for device_id, device in devices.items():
        device.loads.landed.append(functools.partial(_landed, settled, device_id))


def _landed(settled: Callable[[str], None], device_id: str, model: str) -> None:
    settled(device_id)


async def _run_or_failure(
    device: DeviceTier,
    model: DeviceModel,
    inputs: Sequence[NDArray[Any]],
    spec: InferenceFunctionSpec,
) -> ForwardResult | RuntimeFailure:
    try:
        return await device.run(model, inputs, spec)
    except RuntimeFailure as e:
        return e


def _load_ms(model: DeviceModel, hit: bool, started: float) -> float:
    """A request's ``load_ms`` (:class:`InferOutcome`): 0 for a hit; else the whole time of the
    load of ``model``'s copy, from when the load began (before the request's ``started``, if
    the request joined it in flight) to when its copy finished (or now, if not yet)."""
    if hit:
        return 0.0
    finished = model.transfer.finished_at if model.transfer is not None else None
    began = started if model.began_at is None else min(started, model.began_at)
    return max(0.0, ((finished or time.perf_counter()) - began) * 1000)
