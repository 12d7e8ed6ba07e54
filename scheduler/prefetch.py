"""The gateway's prefetch driver: learn each function's arrivals, demote and prefetch ahead of them.

Every request the gateway accepts is fed to a residency policy (:mod:`gpufaas.cache.arrivals`,
O(1) per request). Every ``tick_s`` the driver asks the policy about each model the directory
shows resident (demote it to the node's host tier when its next request is predicted far off)
and about each function held nowhere (prefetch it onto a device when its next request is
predicted soon), and sends those actions to the GPU managers (``PREFETCH_PATH``,
``DEMOTE_PATH``). When a request's load must make room, the policy orders the victims the
gateway sends with it (:meth:`PrefetchDriver.victims`). A prefetch only goes where the directory shows enough free bytes, so it never
evicts anything, and the manager runs it at the lowest priority; a failed action is logged and
counted, never seen by a request.

The policy's state is saved to ``state_file`` (atomically, every ``save_every_s`` and at stop)
and read back at start, so what it learned survives a gateway restart; an unreadable file is
logged and the driver starts empty.

Metrics (on the gateway's registry): ``gpufaas_prediction_requests_total``,
``gpufaas_cold_starts_total{source}`` (requests that waited for a load, by where it came from),
``gpufaas_device_memory_gb_seconds_total`` (the directory's resident bytes over time),
``gpufaas_prefetch_actions_total{kind,result}`` and ``gpufaas_prefetch_used_total`` (prefetched
models whose first request found them resident).

**With several gateway replicas** (docs/prediction.md, "Several gateway replicas"): only a
function's placement owner (:meth:`~gpufaas.scheduler.replicas.Replicas.owner`) plans its
demotions and prefetches (``owns``). Every other replica's client requests reach the owner's
model through the merged use stream (:class:`~gpufaas.scheduler.uses.UseStream`, batched within
50 ms), observed at the owner's clock when the batch arrives (:meth:`PrefetchDriver.observe_relayed`);
a request a peer forwarded here is not observed again (``relayed_here``: its sender relays it).
So each client request is observed once by the owner. A prefetch is published to the peers as a
load event, so their views hold it too; a demotion as a demotion
(:meth:`~gpufaas.scheduler.residency_events.ResidencyEvents.publish_demotion`), so their views
drop it. A relay that cannot reach the owner is counted here
(``gpufaas_prediction_relay_lost_requests_total``) and logged; the owner's model lacks those
arrivals, nothing else happens. Metrics added for it: ``gpufaas_prediction_relayed_requests_total``
(arrivals learned from the peers' relays).

**A prefetch the node drops leaves the view at once.** The node answers a prefetch when it queues
it (with a ticket), and runs it later, at the lowest priority: it may drop it then (``busy``,
``no-room``, ``failed``, ``preempted``). The directory holds a prefetch sent as loading on its
device, so that a request is routed to the copy under way; for each prefetch the node gave a
ticket, the driver asks the node for the outcome in the background
(``GET PREFETCH_PATH/<ticket>``, a long poll), and on a drop takes the loading mark out of the
view (and, with replicas, publishes a demotion, so the peers' views drop it too). A request is
then no longer routed as if the model were arriving there. Counted in
``gpufaas_prefetch_dropped_total{why}``. An older node gives no ticket: its prefetches stay in
the view until the next sync, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.cache.arrivals import ArrivalError, ResidencyPolicy, eviction_plan
from gpufaas.core import node
from gpufaas.core.node import PrefetchOutcome, PrefetchQueued

if TYPE_CHECKING:
    from gpufaas.scheduler.gateway import Gateway

logger = logging.getLogger(__name__)

PREFETCH_PATH = node.PREFETCH
DEMOTE_PATH = node.DEMOTE
_NOTHING: frozenset[str] = frozenset()
# the node's outcomes of a prefetch it queued and then did not load (gpu_manager/prefetch.py)
DROPPED = frozenset({"busy", "no-room", "failed", "preempted", "dropped"})
OUTCOME_WAIT_S = 30.0  # one ask for a prefetch's outcome waits this long at the node
OUTCOME_ASKS = 4  # and so many asks: an outcome not known after them is left to the next sync

# A queued prefetch's outcome at the node, once it has one (None: not known).
Outcome = Callable[[], Awaitable[str | None]]


def _everything(name: str) -> bool:
    return True


def _never() -> bool:
    return False


def _unpublished(action: Action) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "prefetch" | "demote"
    model: str
    device: str  # directory key, "<node>/<device id>"


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """``tick_s`` and ``save_every_s`` are in the policy's seconds. ``time_scale`` compresses
    time for a replay (``bench/predict_live.py``): the policy's clock runs ``time_scale`` times
    faster than the wall clock, so its 1-minute bins and 10-minute keep-alives last
    ``1/time_scale`` as long, the tick comes every ``tick_s / time_scale`` wall seconds, and a
    load's wall milliseconds count ``time_scale`` times. ``prefetch`` False: demote only (the
    ablation for the warm-p99 goal)."""

    tick_s: float = 5.0
    state_file: Path | None = None
    save_every_s: float = 60.0
    time_scale: float = 1.0
    prefetch: bool = True


def scaled_clock(time_scale: float) -> Callable[[], float]:
    """Wall seconds times ``time_scale`` (the wall clock itself at 1)."""
    if not (time_scale > 0 and time_scale < float("inf")):
        raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
    if time_scale == 1.0:
        return time.time
    return lambda: time.time() * time_scale


def plan(
    policy: ResidencyPolicy,
    directory: ClusterDirectory,
    *,
    now_s: float,
    sizes: Mapping[str, int],
    reload_ms: Callable[[str, int], float],
    last_device: Mapping[str, str],
    owns: Callable[[str], bool] = _everything,
) -> list[Action]:
    """The demotions and prefetches the policy wants now, given the directory's view.

    ``sizes``: the functions to consider, with their bytes on a device (0: not known yet, never
    prefetched). A prefetch goes to the function's last device if the view shows room there,
    else to the device with the most free bytes that has room; with no room anywhere, none.
    ``owns``: the functions this replica plans for (their placement owner's; every function
    with one gateway); no action is planned for any other.
    """
    actions: list[Action] = []
    held: set[str] = set()
    free = {key: directory.free_bytes(key) for key in directory.devices()}
    for key in directory.devices():
        for model, state, size in directory.residents(key):
            held.add(model)
            if state is not Residency.RESIDENT or not owns(model):
                continue
            advice = policy.advise(
                model, now_s, size_bytes=size, reload_ms=reload_ms(model, size), tier="device"
            )
            if not advice.keep and advice.reason != "no-history":
                actions.append(Action("demote", model, key))
    for model, size in sizes.items() if policy.may_prefetch else ():
        if model in held or size <= 0 or not owns(model):
            continue
        advice = policy.advise(
            model, now_s, size_bytes=size, reload_ms=reload_ms(model, size), tier="device"
        )
        if not advice.prefetch:
            continue
        target = last_device.get(model)
        if target is None or free.get(target, 0) < size:
            roomiest = max(free, key=lambda k: free[k], default=None)
            target = roomiest if roomiest is not None and free[roomiest] >= size else None
        if target is not None:
            free[target] -= size
            actions.append(Action("prefetch", model, target))
    return actions


class PrefetchDriver:
    """Feeds the policy from the request stream and acts on its advice every tick."""

    def __init__(
        self,
        *,
        policy: ResidencyPolicy,
        directory: ClusterDirectory,
        send: Callable[[Action], Awaitable[Outcome | None]],
        sizes: Callable[[], Mapping[str, int]],
        reload_ms: Callable[[str, int], float],
        registry: CollectorRegistry,
        config: PrefetchConfig | None = None,
        clock: Callable[[], float] | None = None,
        in_use: Callable[[str], Collection[str]] = lambda device: (),
        owns: Callable[[str], bool] = _everything,
        relayed_here: Callable[[], bool] = _never,
        on_dropped: Callable[[Action], None] = _unpublished,
    ) -> None:
        self.policy = policy
        # a prefetch the node dropped, out of this view: the peers' views drop it too
        self.on_dropped = on_dropped
        self._following: set[asyncio.Task[None]] = set()  # prefetches' outcomes awaited
        # the functions this replica plans for (with replicas, those it is the placement owner of)
        self.owns = owns
        # whether the request being served was forwarded here by a peer (which relays it)
        self.relayed_here = relayed_here
        # the models with requests routed to a device and not answered yet (never victims)
        self.in_use = in_use
        self.directory = directory
        self.send = send
        self.sizes = sizes
        self.config = config or PrefetchConfig()
        scale = self.config.time_scale
        self.reload_ms = reload_ms if scale == 1.0 else lambda m, b: reload_ms(m, b) * scale
        self.clock = clock or scaled_clock(scale)
        self.last_device: dict[str, str] = {}
        self.prefetched: set[tuple[str, str]] = set()  # (model, device) not yet used
        self._memory_at: float | None = None
        self._saved_at = self.clock()
        self.requests = Counter(
            "gpufaas_prediction_requests", "Requests fed to the arrival model", registry=registry
        )
        self.cold = Counter(
            "gpufaas_cold_starts",
            "Requests that waited for a load, by where the model came from",
            ["source"],
            registry=registry,
        )
        self.memory = Counter(
            "gpufaas_device_memory_gb_seconds",
            "Device memory-time held by resident models (the directory's view)",
            registry=registry,
        )
        self.actions = Counter(
            "gpufaas_prefetch_actions",
            "Prefetch and demote actions sent to GPU managers",
            ["kind", "result"],
            registry=registry,
        )
        self.dropped = Counter(
            "gpufaas_prefetch_dropped",
            "Prefetches the node queued and then dropped, taken out of the view at once",
            ["why"],
            registry=registry,
        )
        self.used = Counter(
            "gpufaas_prefetch_used",
            "Prefetched models whose first request found them resident",
            registry=registry,
        )
        self.relayed = Counter(
            "gpufaas_prediction_relayed_requests",
            "Requests other gateway replicas accepted, relayed here and fed to the arrival model",
            registry=registry,
        )
        self.relay_lost = Counter(
            "gpufaas_prediction_relay_lost_requests",
            "Requests accepted here whose relay to the placement owner failed to arrive",
            registry=registry,
        )

    # -- the request path (O(1)) -----------------------------------------------------------------

    def observe(self, name: str) -> None:
        """A request for ``name`` accepted here. One a peer forwarded here is skipped: its
        sender relays it (:meth:`observe_relayed`), and counting it here too would count
        exactly the requests that miss twice."""
        if self.relayed_here():
            return
        self.policy.observe(name, self.clock())
        self.requests.inc()

    def observe_relayed(self, name: str, count: int) -> None:
        """``count`` requests for ``name`` that a peer accepted and relayed here (its use
        stream's ``requests``): observed now, on this replica's clock (late by at most one
        relay batch and the hop, so every function's arrivals stay in order here)."""
        now = self.clock()
        for _ in range(count):
            self.policy.observe(name, now)
        self.relayed.inc(count)

    def lost_relay(self, requests: Mapping[str, int], reason: object) -> None:
        """A relay of this replica's ``requests`` (per function) did not reach the peer it
        was for: counted and logged; the owner's model lacks them, nothing else happens."""
        lost = sum(requests.values())
        if lost <= 0:
            return
        self.relay_lost.inc(lost)
        logger.warning("a relay of %d requests to the placement owner was lost: %s", lost, reason)

    def note_response(self, device: str, name: str, *, hit: bool, source: str | None) -> None:
        self.last_device[name] = device
        if not hit:
            self.cold.labels(source or "unknown").inc()
        if (name, device) in self.prefetched:
            self.prefetched.discard((name, device))
            if hit:
                self.used.inc()

    def victims(
        self,
        device: str,
        planned: tuple[str, ...],
        *,
        size_bytes: int,
        model: str | None = None,
    ) -> tuple[str, ...]:
        """What a load of ``model`` (``size_bytes``) on ``device`` should evict: the policy's
        plan over the device's resident models (:func:`~gpufaas.cache.arrivals.eviction_plan`,
        the simulator's rule too), or ``planned`` (LALB's victims) when the policy has no plan
        of its own. A model with requests in flight on the device (``in_use``) is no
        candidate: the manager cannot evict it while it runs (it would free LRU's victims
        instead, while the directory noted the plan's gone), and a queued request would find
        it gone."""
        directory = self.directory
        busy = self.in_use(device)
        residents = (
            (model, size)
            for model, state, size in directory.residents(device)
            if state is Residency.RESIDENT and model not in busy
        )
        order = eviction_plan(
            self.policy,
            residents,
            self.clock(),
            self.reload_ms,
            need_bytes=size_bytes - directory.free_bytes(device),
            copies_elsewhere=lambda other: max(0, len(directory.holder_ids(other)) - 1),
            loading=model,
        )
        return tuple(order) if order else planned

    # -- the periodic pass -------------------------------------------------------------------------

    async def tick(self) -> list[Action]:
        now = self.clock()
        self._account_memory(now)
        actions = plan(
            self.policy,
            self.directory,
            now_s=now,
            sizes=self.sizes() if self.config.prefetch else {},
            reload_ms=self.reload_ms,
            last_device=self.last_device,
            owns=self.owns,
        )
        for action in actions:
            try:
                outcome = await self.send(action)
            except Exception as e:  # a failed prefetch or demote never reaches a request
                logger.warning(
                    "%s of %s on %s failed: %s", action.kind, action.model, action.device, e
                )
                self.actions.labels(action.kind, "failed").inc()
                continue
            self.actions.labels(action.kind, "sent").inc()
            if action.kind == "prefetch":
                self.prefetched.add((action.model, action.device))
                with contextlib.suppress(Exception):
                    self.directory.note_dispatch(
                        action.device, action.model, size_bytes=self.sizes().get(action.model, 0)
                    )
                if outcome is not None:
                    self._follow(action, outcome)
            else:
                self.directory.note_evicted(action.device, action.model)
        if now - self._saved_at >= self.config.save_every_s:
            self.save()
        return actions

    def _follow(self, action: Action, outcome: Outcome) -> None:
        """Await ``action``'s outcome at the node in the background (:meth:`settle_prefetch`)."""
        task = asyncio.get_running_loop().create_task(self._outcome_of(action, outcome))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _outcome_of(self, action: Action, outcome: Outcome) -> None:
        try:
            result = await outcome()
        except Exception as e:  # not known: the next sync tells
            logger.debug("outcome of the prefetch of %s on %s: %s", action.model, action.device, e)
            return
        if result is not None:
            self.settle_prefetch(action, result)

    def settle_prefetch(self, action: Action, result: str) -> None:
        """The node's outcome of a prefetch sent: one it dropped (:data:`DROPPED`) leaves the
        view at once, unless the view shows the model resident there (a request loaded it), and
        the peers are told (``on_dropped``)."""
        if result not in DROPPED:
            return
        self.dropped.labels(result).inc()
        self.prefetched.discard((action.model, action.device))
        if self.directory.state(action.device, action.model) is Residency.RESIDENT:
            return
        self.directory.note_evicted(action.device, action.model)
        self.on_dropped(action)
        logger.info(
            "prefetch of %s on %s dropped by the node (%s): out of the view",
            action.model,
            action.device,
            result,
        )

    def _account_memory(self, now: float) -> None:
        if self._memory_at is not None:
            used = sum(self.directory.used_bytes(k) for k in self.directory.devices())
            self.memory.inc(used / 1e9 * max(0.0, now - self._memory_at))
        self._memory_at = now

    async def run(self, stopping: asyncio.Event) -> None:
        """The background task (``Gateway.background``): tick until stopped, then save."""
        self.load()
        try:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stopping.wait(), timeout=self.config.tick_s / self.config.time_scale
                    )
                if stopping.is_set():
                    break
                try:
                    await self.tick()
                except Exception:  # the loop outlives any one bad tick
                    logger.exception("prefetch tick failed")
        finally:
            for task in list(self._following):
                task.cancel()
            self.save()

    # -- persistence -------------------------------------------------------------------------------

    def save(self) -> None:
        path = self.config.state_file
        self._saved_at = self.clock()
        if path is None:
            return
        partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(self.policy.snapshot()))
            os.replace(partial, path)
        except OSError as e:
            logger.warning("could not save the arrival model to %s: %s", path, e)

    def load(self) -> bool:
        """Restore the policy from ``state_file``; False (and a warning) if absent or bad."""
        path = self.config.state_file
        if path is None or not path.exists():
            return False
        try:
            self.policy.restore(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, ArrivalError) as e:
            logger.warning("ignoring the arrival model in %s: %s", path, e)
            return False
        return True


def enable_prefetch(
    gateway: Gateway,
    *,
    policy: ResidencyPolicy,
    state_file: Path | None = None,
    tick_s: float = 5.0,
    time_scale: float = 1.0,
    prefetch: bool = True,
) -> PrefetchDriver:
    """Attach a driver to ``gateway``: it sees every request and runs as a background task.
    Attached to a replica (``gateway.replicas``, before or after this), it plans only for the
    functions the replica is the placement owner of, skips requests peers forwarded here, and
    publishes its prefetches to the peers; :func:`~gpufaas.scheduler.replica_setup.attach_replicas`
    feeds it the peers' relayed requests."""
    cluster = gateway.cluster

    async def send(action: Action) -> Outcome | None:
        device = next((d for d in cluster.healthy_devices() if d.key == action.device), None)
        if device is None:
            raise LookupError(f"device {action.device!r} is not healthy")
        path = PREFETCH_PATH if action.kind == "prefetch" else DEMOTE_PATH
        size_bytes = gateway.model_bytes.get(action.model, 0)
        body = {"model": action.model, "device": device.device_id, "size_bytes": size_bytes}
        response = await device.node.client.post(path, json=body, timeout=5.0)
        if response.status_code >= 300:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:200]}")
        replicas = gateway.replicas
        if replicas is not None and action.kind == "prefetch":  # the peers' views hold it too
            replicas.events.publish(action.device, action.model, size_bytes=size_bytes, victims=())
        elif replicas is not None:  # the peers' views drop it: their next request is no stale hit
            replicas.events.publish_demotion(action.device, action.model)
        ticket = _ticket(response) if action.kind == "prefetch" else None
        if ticket is None:  # an older node: the view learns of a drop at the next sync
            return None
        return functools.partial(_outcome, device.node.client, ticket)

    def unpublish(action: Action) -> None:  # a dropped prefetch leaves the peers' views too
        replicas = gateway.replicas
        if replicas is not None:
            replicas.events.publish_demotion(action.device, action.model)

    def sizes() -> dict[str, int]:
        return {name: gateway.model_bytes.get(name, 0) for name in gateway.functions}

    def reload_ms(name: str, size: int) -> float:
        return gateway.estimates.load_ms(name, size_bytes=size)

    def owns(name: str) -> bool:  # with replicas, the function's placement owner plans for it
        replicas = gateway.replicas
        return replicas is None or replicas.owner(name) == replicas.self_id

    def relayed_here() -> bool:  # a peer forwarded this request here, and relays it
        replicas = gateway.replicas
        return replicas is not None and replicas.forwarded_in()

    driver = PrefetchDriver(
        policy=policy,
        directory=cluster.directory,
        send=send,
        sizes=sizes,
        reload_ms=reload_ms,
        registry=gateway.metrics.registry,
        in_use=lambda device: gateway.in_flight.get(device, _NOTHING),
        owns=owns,
        relayed_here=relayed_here,
        on_dropped=unpublish,
        config=PrefetchConfig(
            tick_s=tick_s, state_file=state_file, time_scale=time_scale, prefetch=prefetch
        ),
    )
    gateway.prefetch = driver
    gateway.background.append(driver.run)
    return driver


def _ticket(response: httpx.Response) -> int | None:
    """The ticket a node gave a queued prefetch (None from an older node)."""
    try:
        return PrefetchQueued.model_validate_json(response.content).ticket
    except ValidationError:
        return None


async def _outcome(client: httpx.AsyncClient, ticket: int) -> str | None:
    """A queued prefetch's outcome at the node, asked for up to :data:`OUTCOME_ASKS` times
    (a long poll of :data:`OUTCOME_WAIT_S` each); None when the node does not know it (it has
    forgotten the ticket) or has none by then."""
    for _ in range(OUTCOME_ASKS):
        response = await client.get(
            f"{PREFETCH_PATH}/{ticket}",
            params={"wait_s": OUTCOME_WAIT_S},
            timeout=OUTCOME_WAIT_S + 10.0,
        )
        if response.status_code == 200:
            try:
                return PrefetchOutcome.model_validate_json(response.content).result
            except ValidationError:
                return None
        if response.status_code != 202:
            return None
    return None
