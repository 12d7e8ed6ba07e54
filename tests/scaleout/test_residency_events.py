"""A load's residency event goes to the peers once the load is done, not while the GPU manager
loads (scheduler/residency_events.py; docs/scheduling.md, "Scale-out")."""

from __future__ import annotations

import asyncio
import json
import time

from replica_support import close_replicas, replica_with_owner

from gpufaas.scheduler.replicas import Replicas
from gpufaas.scheduler.transport import NodeReply


class _Posts:
    """Stands in for the peer pools: records each post's events and when it came."""

    def __init__(self) -> None:
        self.posted: list[tuple[float, list[dict[str, object]]]] = []
        self.arrived = asyncio.Event()

    def pool(self, peer: str) -> _Posts:
        return self

    async def post(self, path: str, body: bytes, headers: object) -> NodeReply:
        self.posted.append((time.monotonic(), json.loads(body)["events"]))
        self.arrived.set()
        return NodeReply(status=200, headers={}, body=b"")


def _placing(hold_s: float) -> tuple[Replicas, _Posts]:
    """A replica that has just placed ``m`` on ``n/0`` (published, and loading in its view)."""
    replicas = replica_with_owner("http://b", heartbeat=None)
    posts = _Posts()
    replicas.calls.pool = posts.pool  # type: ignore[assignment,method-assign]
    replicas.events.hold_s = hold_s
    replicas.events.publish_load("n/0", "m", size_bytes=10, victims=[])
    replicas.directory.note_dispatch("n/0", "m", size_bytes=10)
    return replicas, posts


async def test_a_load_is_published_after_its_answer_not_while_it_loads() -> None:
    replicas, posts = _placing(hold_s=30.0)
    flusher = asyncio.create_task(replicas.events.flush_forever())
    try:
        await asyncio.sleep(0.2)  # 100 x the flush delay: the manager is still loading
        assert posts.posted == []
        replicas.directory.note_loaded("n/0", "m", size_bytes=10)  # the answer came back
        answered_at = time.monotonic()
        replicas.answered(NodeReply(200, {"x-gpufaas-cache": "miss"}, b""))
        await asyncio.wait_for(posts.arrived.wait(), timeout=5)
        ((posted_at, events),) = posts.posted
        assert events == [{"device": "n/0", "model": "m", "size": 10, "victims": []}]
        assert posted_at - answered_at < 1.0  # at once, not after the hold
    finally:
        flusher.cancel()
        await close_replicas(replicas)


async def test_a_load_whose_answer_never_comes_is_published_after_the_hold() -> None:
    replicas, posts = _placing(hold_s=0.1)
    started = time.monotonic()
    flusher = asyncio.create_task(replicas.events.flush_forever())
    try:
        await asyncio.wait_for(posts.arrived.wait(), timeout=5)
        ((posted_at, events),) = posts.posted
        assert [e["model"] for e in events] == ["m"]
        assert posted_at - started >= 0.1
    finally:
        flusher.cancel()
        await close_replicas(replicas)
