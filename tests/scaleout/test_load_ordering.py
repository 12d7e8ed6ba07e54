"""The placement owner's load orders (forwarding ``decision``, scheduler/forwards.py
``LoadOrdering``): as it answers a peer's question with a load, it orders that load at the
device's GPU manager, written before the answer, never awaited by it, never its failure.

The manager is a recorded post here; the manager's side is ``test_load_orders.py``, and both
sides together with real processes are in ``test_replicas_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from replica_support import close_replicas, replica_with_owner

from gpufaas.cache import Residency
from gpufaas.core.node import LoadOrderTaken
from gpufaas.scheduler.forwards import OrderTo
from gpufaas.scheduler.replicas import Forwarding, OwnerDecision, Replicas
from gpufaas.scheduler.transport import NodeReply, NodeUnreachable


class Manager:
    """The GPU managers as the owner reaches them: each device key ``n/i`` is device ``cpu:i``
    of one manager, which records every order's body the moment it is written (the post's
    first step) and then answers ``reply`` (or raises it)."""

    def __init__(self, reply: NodeReply | Exception | None = None) -> None:
        self.written: list[dict[str, Any]] = []
        self.reply = reply or NodeReply(
            202, {}, LoadOrderTaken(result="started").model_dump_json().encode()
        )
        self.answer = asyncio.Event()
        self.answer.set()

    def to(self, device_key: str) -> tuple[str, Callable[[bytes], Any]] | None:
        if not device_key.startswith("n/"):
            return None
        return f"cpu:{device_key[2:]}", self._post

    async def _post(self, body: bytes) -> NodeReply:
        self.written.append(json.loads(body))
        await self.answer.wait()
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def _owner(
    manager: Manager, *, forwarding: Forwarding = "decision", eagerly: bool = True
) -> Replicas:
    """A placement owner whose policy puts every model on ``n/1`` evicting ``old``."""
    order_to: OrderTo = manager.to
    replicas = replica_with_owner(
        "http://b",
        heartbeat=None,
        devices=("n/0", "n/1"),
        forwarding=forwarding,
        order_to=order_to,
        order_eagerly=eagerly,
    )
    replicas.answers.decide = lambda name, tried, size: OwnerDecision("n/1", ("old",))
    replicas.directory.note_loaded("n/1", "old", size_bytes=60)
    return replicas


def _orders(replicas: Replicas) -> dict[str, float]:
    counted = replicas.metrics.load_orders
    return {
        labels["result"]: value
        for metric in counted.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
        for labels, value in [(sample.labels, sample.value)]
    }


async def _drained(replicas: Replicas) -> None:
    orders = replicas.answers.orders
    assert orders is not None
    while orders._sending:
        await asyncio.gather(*list(orders._sending))


async def test_the_owner_orders_the_load_at_the_manager_before_it_answers() -> None:
    manager = Manager()
    manager.answer.clear()  # the manager has not answered the order when the owner answers
    replicas = _owner(manager)
    decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    # Written already, in the same step as the decision: before the answer goes back.
    assert manager.written == [{"model": "m", "device": "cpu:1", "victims": ["old"]}]
    assert decided.device == "n/1" and decided.victims == ("old",)
    manager.answer.set()
    await _drained(replicas)
    assert _orders(replicas) == {"started": 1.0}
    await close_replicas(replicas)


async def test_a_hit_in_the_owners_view_or_request_forwarding_orders_nothing() -> None:
    manager = Manager()
    replicas = _owner(manager)
    replicas.directory.note_loaded("n/1", "m", size_bytes=50)  # the asker's view was behind
    replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert manager.written == []
    await close_replicas(replicas)

    by_request = _owner(manager, forwarding="request")
    assert by_request.answers.orders is None
    await close_replicas(by_request)


async def test_an_order_refused_lost_or_for_an_unknown_device_never_fails_the_answer() -> None:
    refused = NodeReply(400, {}, b'{"error": "unknown device"}')
    for reply, counted in (
        (refused, "refused"),
        (NodeUnreachable("connection refused"), "failed"),
        (NodeReply(202, {}, b"not json"), "failed"),
    ):
        manager = Manager(reply)
        replicas = _owner(manager)
        decided = replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
        assert decided.device == "n/1"
        await _drained(replicas)
        assert _orders(replicas) == {counted: 1.0}, reply
        await close_replicas(replicas)

    manager = Manager()
    replicas = _owner(manager)
    replicas.answers.decide = lambda name, tried, size: OwnerDecision("elsewhere/0", ())
    replicas.directory.add_device("elsewhere/0", capacity_bytes=100, node="x")
    assert replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset()).device == (
        "elsewhere/0"
    )
    assert manager.written == [] and _orders(replicas) == {"unknown-device": 1.0}
    await close_replicas(replicas)


async def test_over_a_transport_that_needs_a_task_the_order_is_sent_from_one() -> None:
    manager = Manager()
    replicas = _owner(manager, eagerly=False)
    replicas.answers.decide_for_peer("m", size_bytes=50, tried=frozenset())
    assert manager.written == []  # its task has not run yet
    await _drained(replicas)
    assert len(manager.written) == 1 and _orders(replicas) == {"started": 1.0}
    await close_replicas(replicas)


async def test_an_owner_that_orders_loads_learns_load_times_from_its_peers_reports() -> None:
    """A peer's report of a load is the load's whole time, also for a load this owner ordered
    and the peer's request joined in flight (the manager reports the load's time, not the
    request's wait): the owner marks the model resident and learns the time, with orders as
    without them."""
    for order_to in (Manager().to, None):
        observed: list[tuple[str, int, float]] = []
        replicas = replica_with_owner(
            "http://b",
            heartbeat=None,
            devices=("n/0", "n/1"),
            forwarding="decision",
            order_to=order_to,
            observe_load=lambda model, size, ms, seen=observed: seen.append((model, size, ms)),
        )
        replicas.directory.note_dispatch("n/1", "m", size_bytes=50)  # loading in its view
        replicas.events.uses.apply({"loads": [["n/1", "m", 50, 1.5]]})
        assert observed == [("m", 50, 1.5)]
        assert replicas.directory.state("n/1", "m") is Residency.RESIDENT
        await close_replicas(replicas)
