"""The merged request stream of N gateway replicas (scale-out, #16; docs/scheduling.md).

One gateway sees every request: its popularity estimates count them all, and its directory's
LRU order follows every hit, as the GPU manager's does. A replica sees only its own ingress, so
the placement owner would rank eviction victims on 1/N of the stream and on an LRU order that
misses the other replicas' hits (measured: with replicas, every miss was a placement the owner
decided; no stale hit, no placement after a failed forward). So each replica sends the replicas that
decide evictions (the leader; with function ownership every peer), with its residency events
(batched within :data:`USE_FLUSH_S`):

- ``requests``: its client requests per model since the last batch (forwarded-in ones are the
  sender's, and counted there), which every peer feeds into its popularity estimates;
- ``touches``: the ``(device, model)`` hits it dispatched, in order, which every peer applies to
  its directory's LRU order (a model its view does not hold there is skipped);
- ``loads``: with forwarding ``decision``, the answers of the loads the owner decided for this
  replica (``[device, model, size, load_ms]``): the owner sees them as it would have seen its
  own (the model resident in its view, the load time in its estimates).

The owner then decides on the stream one gateway would see, late by one flush.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

from gpufaas.cache import ClusterDirectory

__all__ = ["USE_FLUSH_S", "UseStream"]

# How long a replica gathers its uses into one post (load events go within 2 ms, and take
# the uses gathered so far along).
USE_FLUSH_S = 0.05
_MAX_TOUCHES = 4096  # per batch; beyond, the oldest are dropped (the LRU order keeps the last)
_MAX_COUNT = 100_000  # per model per batch, from a peer


class UseStream:
    """This replica's uses not yet sent, and the peers' uses applied here."""

    def __init__(
        self,
        *,
        directory: ClusterDirectory,
        observe_requests: Callable[[str, int], None],
        observe_load: Callable[[str, int, float], None] = lambda model, size, load_ms: None,
    ) -> None:
        self.directory = directory
        self.observe_requests = observe_requests
        self.observe_load = observe_load
        self._loads: list[tuple[str, str, int, float]] = []
        self._requests: collections.Counter[str] = collections.Counter()
        self._touches: dict[tuple[str, str], None] = {}  # insertion order = use order

    def __bool__(self) -> bool:
        return bool(self._requests or self._touches or self._loads)

    def request(self, model: str) -> None:
        """A client's inference request for ``model`` arrived here."""
        self._requests[model] += 1

    def touch(self, device_key: str, model: str) -> None:
        """A request for ``model`` was dispatched here to ``device_key`` as a hit."""
        pair = (device_key, model)
        self._touches.pop(pair, None)  # the latest use is the one that orders the LRU
        self._touches[pair] = None
        if len(self._touches) > _MAX_TOUCHES:
            del self._touches[next(iter(self._touches))]

    def loaded(self, device_key: str, model: str, *, size_bytes: int, load_ms: float) -> None:
        """A load the owner decided for this replica was answered (forwarding ``decision``)."""
        self._loads.append((device_key, model, size_bytes, load_ms))
        del self._loads[:-_MAX_TOUCHES]

    def take(self) -> dict[str, Any]:
        """The batch to send (and forget here): ``{"requests": {...}, "touches": [...],
        "loads": [...]}``."""
        batch: dict[str, Any] = {
            "requests": dict(self._requests),
            "touches": [list(pair) for pair in self._touches],
        }
        if self._loads:
            batch["loads"] = [list(load) for load in self._loads]
        self._requests.clear()
        self._touches.clear()
        self._loads.clear()
        return batch

    def apply(self, batch: Mapping[str, Any]) -> int:
        """Take in a peer's batch; returns the requests counted. Raises ``TypeError`` or
        ``ValueError`` on a malformed batch (before changing anything)."""
        requests = batch.get("requests") or {}
        touches = batch.get("touches") or []
        if not isinstance(requests, dict) or not isinstance(touches, list):
            raise TypeError("uses: requests must be an object, touches a list")
        counts = {str(m): int(c) for m, c in requests.items()}
        if any(c < 0 for c in counts.values()):
            raise ValueError("uses: request counts must be >= 0")
        pairs = [(str(d), str(m)) for d, m in touches]
        loads = [(str(d), str(m), int(s), float(ms)) for d, m, s, ms in batch.get("loads") or []]
        if any(s < 0 or ms < 0 for _, _, s, ms in loads):
            raise ValueError("uses: load sizes and times must be >= 0")
        for model, count in counts.items():
            if count:
                self.observe_requests(model, min(count, _MAX_COUNT))
        directory = self.directory
        for device, model in pairs:
            if device in directory and directory.state(device, model) is not None:
                directory.note_dispatch(device, model, size_bytes=0)  # present: marks it used
        for device, model, size, load_ms in loads:
            if size and device in directory and directory.state(device, model) is not None:
                directory.note_loaded(device, model, size_bytes=size)
            self.observe_load(model, size, load_ms)
        return sum(counts.values())
