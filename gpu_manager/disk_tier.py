"""The disk tier: each model's arena as a loading-optimised sidecar on node-local disk.

A sidecar is a safetensors file holding a model's arena as one ``U8`` tensor, with its layout in
the metadata (:func:`gpufaas.gpu_manager.host_tier.write_sidecar`). Refilling host memory from it is
one ``readinto`` into the host buffer: no unzip, no unpickling, no probe, no second copy. Sidecars
live within their own byte budget (``--disk-cache``), least recently used evicted first, and a
sidecar being read is held (pinned) so it cannot be deleted under the reader.

The tier also keeps each model's *skeleton* (the weightless module and its layout) once prepared:
a sidecar is only readable against the skeleton that wrote it, and the device tier sizes a load
from the skeleton before it holds any host memory.

Sidecars are written when a function is registered (:meth:`DiskTier.prefetch`, in the background),
so the first request already finds one. A request that gets here first gets the freshly prepared
arena to adopt; the host tier then writes the sidecar behind it (:meth:`DiskTier.store`), never
on the request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gpufaas.cache import (
    ByteLRU,
    CacheStats,
    FailureBackoff,
    InsufficientCapacity,
    Residency,
    SingleFlight,
    TierStats,
)
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.modelio import ModelLoadError
from gpufaas.core.node import DiskState, ResidentState
from gpufaas.gpu_manager.backends import backend_for
from gpufaas.gpu_manager.chain import (
    Held,
    ResidencyTier,
    RuntimeFailure,
    not_held,
    spec_fingerprint,
)
from gpufaas.gpu_manager.host_tier import Skeleton, sidecar_path, write_sidecar

__all__ = ["DiskModel", "DiskTier", "HostBuffers"]

logger = logging.getLogger(__name__)

_HEADER_FIELDS = 4096  # a sidecar header's fields besides the layout (paths, versions, sizes)


class HostBuffers(Protocol):
    """Where a freshly prepared arena is filled: the host tier's memory."""

    def take_buffer(self, nbytes: int) -> torch.Tensor: ...

    def give_buffer(self, buffer: torch.Tensor) -> None: ...


@dataclass(eq=False)
class DiskModel:
    """A prepared model: its skeleton, plus its sidecar (a disk hit) or a freshly filled host
    arena that the first taker adopts (``take_arena``)."""

    skeleton: Skeleton
    sidecar: Path | None
    arena: torch.Tensor | None = None

    def take_arena(self) -> torch.Tensor | None:
        arena, self.arena = self.arena, None
        return arena


@dataclass(frozen=True)
class _Options:
    alignment: int
    min_group_bytes: int
    variable_dim: int


class DiskTier:
    """Sidecars and skeletons of prepared models, within ``capacity_bytes`` of disk."""

    name = "disk"

    def __init__(
        self,
        *,
        directory: Path,
        capacity_bytes: int,
        below: ResidencyTier[Path],
        buffers: HostBuffers,
        stats: CacheStats,
        alignment: int,
        min_group_bytes: int,
        variable_dim: int,
    ) -> None:
        self.directory = directory
        _remove_stale_sidecars(directory)
        self.lru: ByteLRU[Path] = ByteLRU(capacity_bytes=capacity_bytes)
        self.skeletons: dict[str, Skeleton] = {}
        self.failures: FailureBackoff[str] = FailureBackoff(base_s=1.0, max_s=60.0)
        self._below = below
        self._buffers = buffers
        self._stats = stats
        self._options = _Options(alignment, min_group_bytes, variable_dim)
        self._flights: SingleFlight[str, DiskModel] = SingleFlight()

    # -- the tier protocol -------------------------------------------------------------------------

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[DiskModel]:
        """The model's sidecar, held while the caller reads it; on a miss, the model prepared
        from its artifact into a fresh host arena (not held: the caller adopts the arena)."""
        path = await self._artifact(model, spec)
        skeleton = self.skeleton(model, spec, artifact=path)
        entry = self.lru.get(model)  # marks it most recently used
        sidecar = skeleton.sidecar if skeleton is not None else None
        if skeleton is not None and sidecar is not None and entry and entry.value == sidecar:
            self.lru.pin(model)
            self._stats.record_hit(self.name)
            return Held(DiskModel(skeleton, sidecar), True, lambda: self._unpin(model))
        self._stats.record_miss(self.name)
        prepared = await self._flights.do(
            model, lambda: self._prepare(model, spec, path, write=False)
        )
        return not_held(prepared)

    def evict(self, model: str) -> bool:
        """Delete the model's sidecar (the skeleton stays); False if it has none or it is being
        read."""
        entry = self.lru.peek(model)
        if entry is None or entry.pinned:
            return False
        self._delete(model)
        return True

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)

    # -- registration and write-behind -------------------------------------------------------------

    async def prefetch(self, model: str, spec: InferenceFunctionSpec) -> None:
        """Prepare the model and write its sidecar now (a function was registered), so that the
        first request reads the sidecar instead of the artifact. A request arriving meanwhile
        joins this preparation and reads the sidecar. Failures are logged, not raised: a
        request will report them."""
        if self.lru.capacity_bytes == 0:
            return  # no disk tier (--disk-cache 0): nothing to write ahead
        try:
            path = await self._artifact(model, spec)
            skeleton = self.skeleton(model, spec, artifact=path)
            if skeleton is not None and skeleton.sidecar is not None:
                return
            found = await self._flights.do(
                model, lambda: self._prepare(model, spec, path, write=True)
            )
        except RuntimeFailure as e:
            logger.warning("preparing %s at registration failed: %s", model, e)
            return
        arena = found.take_arena()  # joined a request's preparation: write behind it
        if arena is not None:
            try:
                await self.store(model, found.skeleton, arena)
            finally:
                self._buffers.give_buffer(arena)

    async def store(self, model: str, skeleton: Skeleton, arena: torch.Tensor) -> None:
        """Write ``arena`` as the model's sidecar, evicting older sidecars to stay in budget.
        The caller keeps ``arena`` unchanged until this returns."""
        entry = self.lru.peek(model)
        if entry is not None and entry.state is Residency.LOADING:
            return  # another writer is at it
        if entry is not None and skeleton.sidecar is not None and entry.value == skeleton.sidecar:
            return  # written already
        self.forget_sidecar(model)
        estimate = self.room_needed(skeleton)
        try:
            for victim in self.lru.make_room(estimate):
                self._unlink(victim.key, victim.value)
                self._stats.record_eviction(self.name, victim.size_bytes)
            self.lru.reserve(model, size_bytes=estimate)
        except InsufficientCapacity:
            logger.info("disk tier cannot hold %s (%d bytes); no sidecar", model, estimate)
            return
        path = sidecar_path(  # per function: two functions may share one artifact
            self.directory,
            fingerprint=f"{model}|{skeleton.fingerprint}",
            artifact=skeleton.artifact,
        )
        try:
            await asyncio.to_thread(write_sidecar, path, skeleton, arena)
            size = path.stat().st_size
        except OSError as e:
            logger.warning("model %s: cannot write its sidecar %s: %s", model, path, e)
            self.lru.discard(model)
            return
        if self.lru.peek(model) is None:  # forgotten while writing (new weights)
            path.unlink(missing_ok=True)
            return
        self.lru.commit(model, path, size_bytes=size)  # never larger than the estimate
        self.lru.unpin(model)  # the reservation's pin
        skeleton.sidecar = path

    @staticmethod
    def room_needed(skeleton: Skeleton) -> int:
        """Bytes a sidecar of ``skeleton`` may take, claimed before it is written: the arena plus
        a header holding the layout as JSON (escaped inside the metadata, so up to twice its
        length) and a few short fields."""
        return skeleton.layout.arena_bytes + 2 * len(skeleton.layout.to_json()) + _HEADER_FIELDS

    def sidecar_unusable(self, model: str, error: Exception) -> None:
        """A reader found the sidecar stale or corrupt: drop it, so the artifact is read."""
        logger.warning("model %s: sidecar unusable (%s); reading the artifact", model, error)
        self.forget_sidecar(model)

    # -- catalog -----------------------------------------------------------------------------------

    def skeleton(
        self, model: str, spec: InferenceFunctionSpec, *, artifact: Path | None = None
    ) -> Skeleton | None:
        """The model's skeleton if it matches ``spec`` (and, given, the artifact on disk)."""
        skeleton = self.skeletons.get(model)
        if skeleton is None or skeleton.fingerprint != spec_fingerprint(spec):
            return None
        if artifact is not None and not _matches(skeleton, artifact):
            return None
        return skeleton

    def forget(self, model: str) -> None:
        """The function is gone or its weights changed: drop its skeleton and sidecar."""
        self.forget_sidecar(model)
        self.skeletons.pop(model, None)
        self.failures.forget(model)

    def forget_sidecar(self, model: str) -> None:
        entry = self.lru.peek(model)
        if entry is not None:
            self._delete(model)
        skeleton = self.skeletons.get(model)
        if skeleton is not None and skeleton.sidecar is not None:
            with contextlib.suppress(OSError):
                skeleton.sidecar.unlink(missing_ok=True)
            skeleton.sidecar = None

    def state(self) -> DiskState:
        residents = [
            ResidentState(model=e.key, state=e.state, size_bytes=e.size_bytes, pins=e.pins)
            for e in self.lru.entries_lru()
        ]
        return DiskState(
            capacity_bytes=self.lru.capacity_bytes,
            used_bytes=self.lru.used_bytes,
            residents=residents,
        )

    # -- steps -------------------------------------------------------------------------------------

    async def _artifact(self, model: str, spec: InferenceFunctionSpec) -> Path:
        """The artifact's local path, failing fast while an earlier failure's backoff lasts,
        so a broken artifact cannot turn every request into a fetch (no retry storm)."""
        blocked = self.failures.blocked(model)
        if blocked is not None:
            wait = blocked.retry_after(time.monotonic())
            raise RuntimeFailure(
                f"{blocked.message} (failed {blocked.attempts} time(s); next try in {wait:.0f} s)",
                status=503,
                reason="ModelLoadFailed",
                retry_after_s=wait,
            )
        try:
            with await self._below.acquire(model, spec) as path:
                return path
        except RuntimeFailure as e:
            raise self._failed(model, e) from None

    async def _prepare(
        self, model: str, spec: InferenceFunctionSpec, path: Path, *, write: bool
    ) -> DiskModel:
        """Load, check and lay out the artifact, and fill a host arena with its weights; with
        ``write``, also write the sidecar and hand the arena back (registration)."""
        fingerprint = spec_fingerprint(spec)
        options = self._options
        try:
            prepared = await asyncio.to_thread(
                backend_for(spec.model.format).prepare,
                path,
                spec,
                fingerprint=fingerprint,
                alignment=options.alignment,
                min_group_bytes=options.min_group_bytes,
                variable_dim=options.variable_dim,
            )
        except (ModelLoadError, OSError) as e:
            failure = RuntimeFailure(
                f"model {model!r} failed to load: {e}", status=503, reason="ModelLoadFailed"
            )
            raise self._failed(model, failure) from None
        self.failures.record_success(model)
        arena = self._buffers.take_buffer(prepared.skeleton.layout.arena_bytes)
        try:
            await asyncio.to_thread(prepared.fill, arena)
        except BaseException:
            self._buffers.give_buffer(arena)
            raise
        skeleton = prepared.skeleton
        self.skeletons[model] = skeleton
        if not write:
            return DiskModel(skeleton, None, arena)
        try:
            await self.store(model, skeleton, arena)
        finally:
            self._buffers.give_buffer(arena)
        return DiskModel(skeleton, skeleton.sidecar)

    def _failed(self, model: str, failure: RuntimeFailure) -> RuntimeFailure:
        if failure.reason == "ModelLoadFailed":
            recorded = self.failures.record_failure(model, str(failure))
            failure.retry_after_s = recorded.retry_after(time.monotonic())
        return failure

    def _unpin(self, model: str) -> None:
        if self.lru.peek(model) is not None:
            self.lru.unpin(model)

    def _delete(self, model: str) -> None:
        entry = self.lru.discard(model)
        if entry is not None:
            self._unlink(model, entry.value)

    def _unlink(self, model: str, path: Path | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        skeleton = self.skeletons.get(model)
        if skeleton is not None and skeleton.sidecar == path:
            skeleton.sidecar = None


def _matches(skeleton: Skeleton, path: Path) -> bool:
    if skeleton.artifact != path:
        return False
    try:
        stat = path.stat()
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == skeleton.artifact_stat


def _remove_stale_sidecars(directory: Path, *, max_age_s: float = 24 * 3600) -> None:
    """Sidecars serve only the process that wrote them (its skeletons); drop old leftovers."""
    if not directory.is_dir():
        return
    cutoff = time.time() - max_age_s
    for path in directory.glob("*.safetensors"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
