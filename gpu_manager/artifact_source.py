"""The chain's last tier: model artifacts fetched by URI and checked against their sha256.

A thin async face on :class:`gpufaas.core.artifacts.ArtifactStore` (fsspec fetch into the node's
content-addressed cache, hashing as it streams): the remote store always holds every model, so
nothing is ever evicted here, and a failed fetch becomes a 503 naming the URI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from gpufaas.cache import CacheStats, TierStats
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.gpu_manager.chain import Held, RuntimeFailure, not_held

__all__ = ["ArtifactSource"]


class ArtifactSource:
    """Local paths of artifacts, fetched (and verified) on first use."""

    name = "remote"

    def __init__(self, store: ArtifactStore, *, stats: CacheStats) -> None:
        self.store = store
        self._stats = stats

    async def acquire(
        self, model: str, spec: InferenceFunctionSpec, *, prefer: Sequence[str] = ()
    ) -> Held[Path]:
        try:
            path = await asyncio.to_thread(
                self.store.fetch, spec.model.uri, sha256=spec.model.sha256
            )
        except ArtifactError as e:
            raise RuntimeFailure(
                f"model {model!r} failed to load: {e}", status=503, reason="ModelLoadFailed"
            ) from None
        self._stats.record_hit(self.name)
        return not_held(path, hit=True)

    def evict(self, model: str) -> bool:
        return False  # the remote store keeps every artifact

    def stats(self) -> TierStats:
        return self._stats.tier(self.name)
