"""The device tier: one per device, the models resident on it, held for requests and run.

:meth:`DeviceTier.acquire` holds a resident model for one request, or joins (or starts) its load
(:class:`~gpufaas.gpu_manager.device_loads.DeviceLoads`): the device bytes are claimed first in
:class:`~gpufaas.gpu_manager.device_memory.DeviceMemory`, the byte LRU with in-use pins (evicting
unheld models, the scheduler's ``prefer`` hint first, then least recently used; waiting up to
``admission_wait_s`` when models in use hold them); only then is a source held: a neighbour's
copy (:class:`~gpufaas.gpu_manager.peer_source.PeerSource`) or the host tier's arena
(:class:`~gpufaas.gpu_manager.host_cache.HostTier`). The format's backend builds the runnable on
the device while the copy runs, so the request computes as the layers land
(:meth:`DeviceTier.run`). A model in use is never evicted; one unloaded while in use drains (keeps
its bytes) until its last request ends. Shards of distributed models share the device's bytes
(:class:`~gpufaas.gpu_manager.device_memory.DeviceShards`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from numpy.typing import NDArray

from gpufaas.cache import CacheStats, TierStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.node import DeviceState
from gpufaas.gpu_manager.backends import backend_for, model_error_message
from gpufaas.gpu_manager.chain import Held, RuntimeFailure
from gpufaas.gpu_manager.device_faults import (
    DeviceFailed,
    NodeHealth,
    TransferFailed,
    is_out_of_memory,
)
from gpufaas.gpu_manager.device_loads import DeviceLoads, LoadJoin, LoadLog, LoadRecord, Sources
from gpufaas.gpu_manager.device_memory import DeviceMemory, DeviceShards, Resident, as_model
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.inline import InlineForwards
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.loader import DeviceModel, ForwardResult, forward_retrying_oom
from gpufaas.gpu_manager.residency import Tier
from gpufaas.gpu_manager.tensors import TensorError

# LoadLog, LoadRecord and Sources are the constructor's vocabulary: importable from here.
__all__ = ["DeviceTier", "LoadLog", "LoadRecord", "Sources", "forward_failure"]

_ATTEMPTS = 3  # a model replaced between its load and our hold is loaded again, this often


class DeviceTier:
    """Resident models on one device: its memory, its loads and its shards composed, and the
    requests that hold and run its models."""

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
        self.memory = DeviceMemory(info=info, backend=backend, stats=stats, name=self.name)
        self.shards = DeviceShards(memory=self.memory, device_id=info.id)
        self.loads = DeviceLoads(
            info=info,
            backend=backend,
            memory=self.memory,
            sources=sources,
            stats=stats,
            log=log,
            spawn=spawn,
            admission_wait_s=admission_wait_s,
            health=self.health,
            variable_dim=variable_dim,
            name=self.name,
        )
        self.slots = asyncio.Semaphore(max_concurrency)
        # tiny passes run on the loop, not in a thread; a CPU device's judged by the CPU they took
        self.inline = InlineForwards(by_cpu=info.kind == "cpu")
        self.max_concurrency = max_concurrency
        self.outstanding = 0  # requests routed here and not answered yet
        self.overlap = overlap  # False: a request waits for the whole model before computing
        self._stats = stats

    @property
    def tier(self) -> Tier[Resident]:
        """The byte LRU of this device's residents (models and shards)."""
        return self.memory.tier

    @property
    def load_listeners(self) -> list[Callable[[str, LoadJoin], None]]:
        """Called with the model, and whether the caller started the load or joined it,
        whenever a caller starts or joins a load here (#13: a running prefetch of another model
        yields to it)."""
        return self.loads.listeners

    # -- the tier protocol -------------------------------------------------------------------------

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[DeviceModel]:
        """Hold ``model`` on this device for one request: resident (a hit), arriving (compute as
        it lands), or loaded now, evicting ``prefer`` first if room must be made."""
        for _ in range(_ATTEMPTS):
            found, hit = self._present(model)
            if found is None:
                self._stats.record_miss(self.name)
                found = await self.loads.join(model, spec, prefer=prefer)
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
        return self.loads.cancel(model)

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)

    def gb_seconds(self) -> float:
        """Bytes held on this device x seconds since start, in GB-s: levelled when bytes are
        claimed for a load and at every change the tier reports (commit, release, retire)."""
        return self.memory.gb_seconds()

    # -- requests ----------------------------------------------------------------------------------

    async def arrived(self, model: DeviceModel) -> None:
        """Wait until every group of ``model`` has landed; a 503 if its copy failed."""
        while not model.arrived and model.error is None:
            changed = self.memory.changed
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
        since = self.inline.clock()
        try:
            result = await forward_retrying_oom(  # an OOM evicts what is not in use, retries
                lambda: backend.run(model, list(inputs), spec, self.backend),
                backend=self.backend,
                evict_unheld=self.memory.evict_unheld,
                inline=inline,
            )
            self.inline.measured(model.fingerprint, result.compute_ms, cpu_since=since)
            return result
        except Exception as e:
            raise self._failure(e, model) from None
        finally:
            self.inline.running -= 1

    def hold_warm(self, model: str) -> DeviceModel | None:
        """``model`` held for one pass on the loop now, or None with nothing held: the warm
        step's acquire. Only a resident copy whose weights have all landed, with a free slot and
        passes the inline rule lets on the loop; the caller unholds it (``tier.unhold``)."""
        found = as_model(self.tier.resident(model))
        if (
            found is None
            or not found.arrived
            or self.slots.locked()
            or not self.inline.inline(found.fingerprint, landed=True)
            or not self.tier.hold(model, found)
        ):
            return None
        self._stats.record_hit(self.name)
        return found

    def run_warm(
        self, model: DeviceModel, inputs: Sequence[NDArray[Any]], spec: InferenceFunctionSpec
    ) -> ForwardResult | None:
        """:meth:`run` for a model :meth:`hold_warm` gave: the pass on the loop, now, with no
        slot taken (nothing else runs on the loop meanwhile). None when the device ran out of
        memory: the caller takes the usual path, which evicts and retries in a thread."""
        self.inline.running += 1
        since = self.inline.clock()
        try:
            result = backend_for(spec.model.format).run(model, inputs, spec, self.backend)
        except Exception as e:
            if is_out_of_memory(e) and not isinstance(e, DeviceFailed):
                return None
            raise self._failure(e, model) from None
        finally:
            self.inline.running -= 1
        self.inline.measured(model.fingerprint, result.compute_ms, cpu_since=since)
        return result

    def _failure(self, error: Exception, model: DeviceModel) -> RuntimeFailure:
        if isinstance(error, DeviceFailed):  # a sticky CUDA error: this node must stop serving
            self.health.device_failed(self.info.id, error)
            return RuntimeFailure(str(error), status=503, reason="DeviceFailed")
        return forward_failure(error, model=model.name, device_id=self.info.id)

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
            residents=self.memory.resident_rows(),
            draining=self.memory.draining_rows(),
        )

    def _present(self, model: str) -> tuple[DeviceModel | None, bool]:
        """``model``'s copy here and whether it is a hit: a resident copy (a hit once it has
        arrived), else one whose copy is under way (compute as its layers land), else None.

        A copy still arriving is a hit if it is complete, every byte landed without error:
        the request waits for no load. That is the window between a copy's last byte and its
        commit, which runs in the background (:meth:`DeviceLoads._finish
        <gpufaas.gpu_manager.device_loads.DeviceLoads._finish>`). A request that finds the
        copy still under way waits for a load in flight: not a hit."""
        found = as_model(self.tier.resident(model))
        if found is not None:
            return found, found.arrived
        arriving = as_model(self.tier.arriving.get(model))
        if arriving is not None and arriving.module is not None:
            return arriving, _complete(arriving)
        return None, False


def _complete(model: DeviceModel) -> bool:
    """Whether every byte of ``model``'s copy has landed without error (or it needed none)."""
    return model.error is None and (model.transfer is None or model.transfer.landed())


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
