"""A discrete-event simulator of the gateway, its dispatch queues and the GPU managers.

The simulated gateway runs the real routing policies (:mod:`gpufaas.scheduler.policy`), the real
O3 queue (:mod:`gpufaas.scheduler.o3`), the real estimates and the real cache directory
(:class:`gpufaas.cache.ClusterDirectory`), kept as the gateway keeps it: an optimistic
``note_dispatch`` when it routes a request, ``note_loaded`` from every response, and a full
``sync`` from the GPU managers' state every ``sync_ms``.

Each simulated device is what a GPU manager does with one GPU: a byte-bounded LRU of models
(:class:`gpufaas.cache.ByteLRU`; a model in use or loading is pinned), one copy engine that
loads models one at a time, and one compute engine that runs inferences one at a time, so a load
can overlap another request's inference. The gateway lets ``concurrency`` requests onto a device
at once; the rest wait in its dispatch queue (FIFO, or O3 for ``lalb-o3``). A request is a *hit*
if its model was resident when it started on the device (as the GPU manager counts it).

Times are milliseconds of simulated time. Load and inference times are the profiles' means with
log-normal noise (``jitter_cv``).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpufaas.cache import ByteLRU, CacheError, ClusterDirectory, EntryState, Residency
from gpufaas.scheduler.dispatch import expected_waits
from gpufaas.scheduler.estimates import Estimates
from gpufaas.scheduler.o3 import O3Queue
from gpufaas.scheduler.policy import DeviceTable, LocalityAware, RouteRequest, make_policy

from .workload import Model, Trace

_LOAD_DONE, _INFER_DONE, _SYNC = 1, 2, 3


@dataclass(frozen=True)
class SimConfig:
    devices: int = 4
    capacity_bytes: int = 2**30
    concurrency: int = 1  # requests the gateway lets onto one device at once
    max_passes: int = 8  # O3 bounds
    max_hold_ms: float = 1000.0
    sync_ms: float = 5000.0  # full directory re-sync period
    jitter_cv: float = 0.1
    warmup_fraction: float = 0.1  # leading requests left out of the metrics
    # "hint": the GPU managers evict the cheapest expected reloads first (the victims LALB
    # chose; for LB, which names none, the same value rule applied at the device), then LRU;
    # "lru": they evict least-recently used, as the policy predicts.
    eviction: str = "hint"
    seed: int = 0


@dataclass(eq=False)
class _Request:
    index: int
    model: Model
    arrival_ms: float
    device: int = -1
    expected_ms: float = 0.0
    start_ms: float = math.nan
    ready_ms: float = math.nan  # the model is usable on the device
    infer_start_ms: float = math.nan
    end_ms: float = math.nan
    load_ms: float = 0.0
    hit: bool = False
    passes: int = 0
    overtook: bool = False
    evict_first: list[str] = field(default_factory=list)  # the policy's victim hints


@dataclass(eq=False)
class _Device:
    key: str
    cache: ByteLRU[None]
    queue: O3Queue[_Request]
    running: int = 0
    copy_free_ms: float = 0.0
    computing: bool = False
    ready: deque[_Request] = field(default_factory=deque)
    loading: dict[str, list[_Request]] = field(default_factory=dict)
    pending_ms: float = 0.0  # expected device time of queued and running requests
    copy_busy_ms: float = 0.0  # engine time of work begun after the warm-up
    compute_busy_ms: float = 0.0
    started: list[int] = field(default_factory=list)  # request indices, in start order


@dataclass
class SimResult:
    policy: str
    requests: int
    hits: int
    misses: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    mean_queue_ms: float
    p99_queue_ms: float
    mean_load_ms: float  # over misses: from start on the device until the model was usable
    slo_attainment: float
    loads: int
    evictions: int
    overtakes: int
    max_passes: int
    decisions: dict[str, int]
    decision_us_p50: float  # CPU time of policy.choose (thread clock, GC paused)
    decision_us_p99: float
    wall_s: float
    # Busy fraction of the busiest device's copy engine and compute engine over the measured
    # window (the first measured arrival to the last answer).
    copy_utilisation: float = 0.0
    compute_utilisation: float = 0.0
    # Each device's requests (catalogue indices) in the order they started there, and whether
    # each is measured (past the warm-up): the placement an offline bound is computed for.
    placement: list[tuple[list[int], list[bool]]] = field(default_factory=list)

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "miss_ratio": self.miss_ratio,
            "hit_ratio": self.hit_ratio,
            "hits": self.hits,
            "misses": self.misses,
            "mean_queue_ms": self.mean_queue_ms,
            "p99_queue_ms": self.p99_queue_ms,
            "mean_load_ms": self.mean_load_ms,
            "slo_attainment": self.slo_attainment,
            "loads": self.loads,
            "evictions": self.evictions,
            "overtakes": self.overtakes,
            "max_passes": self.max_passes,
            "decisions": self.decisions,
            "decision_us_p50": self.decision_us_p50,
            "decision_us_p99": self.decision_us_p99,
            "requests": self.requests,
            "wall_s": self.wall_s,
            "copy_utilisation": self.copy_utilisation,
            "compute_utilisation": self.compute_utilisation,
        }


class Simulation:
    def __init__(
        self, policy_name: str, catalogue: list[Model], trace: Trace, config: SimConfig
    ) -> None:
        largest = max(catalogue[i].profile.size_bytes for i in set(trace.model.tolist()))
        if config.concurrency * largest > config.capacity_bytes:
            raise SystemExit(
                f"a device of {config.capacity_bytes} bytes cannot hold {config.concurrency}"
                f" models of {largest} bytes in use at once; raise the capacity"
            )
        self.config = config
        if config.eviction not in ("hint", "lru"):
            raise SystemExit(f"eviction must be 'hint' or 'lru', got {config.eviction!r}")
        self.victim_hints = config.eviction == "hint"
        self.catalogue = catalogue
        self.trace = trace
        self.estimates = Estimates()
        self.policy = make_policy(policy_name, seed=config.seed, estimates=self.estimates)
        if isinstance(self.policy, LocalityAware):
            self.policy.victims = "value" if self.victim_hints else "lru"
            self.victim_planner: LocalityAware | None = None
        else:
            # A policy that names no victims (LB) gets the same value rule at the device, so
            # "hint" compares routing with routing, eviction being equal.
            self.victim_planner = (
                LocalityAware(estimates=self.estimates) if self.victim_hints else None
            )
        self.directory = ClusterDirectory()
        self.table = DeviceTable()
        o3 = self.policy.dispatch == "o3"
        self.devices: list[_Device] = []
        for i in range(config.devices):
            key = f"node-{i // 8}/gpu:{i % 8}"
            self.directory.add_device(
                key, capacity_bytes=config.capacity_bytes, node=f"node-{i // 8}"
            )
            self.table.add(key)
            self.devices.append(
                _Device(
                    key=key,
                    cache=ByteLRU(capacity_bytes=config.capacity_bytes),
                    queue=O3Queue(
                        max_passes=config.max_passes if o3 else 0, max_hold_ms=config.max_hold_ms
                    ),
                )
            )
        self.index = {d.key: i for i, d in enumerate(self.devices)}
        self.events: list[tuple[float, int, int, Any, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.rng = random.Random(config.seed)
        sigma = math.sqrt(math.log1p(config.jitter_cv**2))
        self._jitter = (-sigma * sigma / 2, sigma)
        self.done: list[_Request] = []
        self.warm_index = int(len(trace) * config.warmup_fraction)
        self.warm_ms = float(trace.arrival_ms[self.warm_index]) if len(trace) else 0.0
        self.loads = 0
        self.evictions = 0
        self.decision_ns: list[int] = []

    # -- plumbing ---------------------------------------------------------------------------------

    def _at(self, t: float, kind: int, a: Any, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def _noisy(self, mean: float) -> float:
        mu, sigma = self._jitter
        return mean * self.rng.lognormvariate(mu, sigma) if sigma > 0 else mean

    def _resident_in_view(self, device: _Device) -> Any:
        holders = self.directory.holders
        key = device.key
        return lambda model: holders(model).get(key) is Residency.RESIDENT

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        arrivals = self.trace.arrival_ms.tolist()
        models = self.trace.model.tolist()
        if self.config.sync_ms > 0:
            self._at(self.config.sync_ms, _SYNC, None)
        i, n = 0, len(arrivals)
        while i < n or self.events:
            if i < n and (not self.events or arrivals[i] <= self.events[0][0]):
                self.now = arrivals[i]
                self._arrive(
                    _Request(index=i, model=self.catalogue[models[i]], arrival_ms=self.now)
                )
                i += 1
                continue
            t, _, kind, a, b = heapq.heappop(self.events)
            self.now = t
            if kind == _LOAD_DONE:
                self._load_done(a, b)
            elif kind == _INFER_DONE:
                self._infer_done(a, b)
            elif kind == _SYNC:
                self._sync()
                if i < n:
                    self._at(t + self.config.sync_ms, _SYNC, None)
            else:  # a subclass's own events (bench/sim/residency.py)
                self._other_event(kind, a, b)
        return self._result(time.perf_counter() - started)

    def _arrive(self, request: _Request) -> None:
        model = request.model
        size = model.profile.size_bytes
        route = RouteRequest(model=model.name, size_bytes=size)
        gc.disable()  # a collection pause is not the decision's cost
        tic = time.thread_time_ns()
        decision = self.policy.choose(route, self.table, self.directory)
        self.decision_ns.append(time.thread_time_ns() - tic)
        gc.enable()
        key = decision.device
        if self.victim_hints and self.victim_planner is None:
            request.evict_first = list(decision.victims)  # LALB's own victims
        elif self.victim_planner is not None:
            request.evict_first = self._value_victims(key, route)
        # what a subclass puts in their place (the gateway's residency hook)
        request.evict_first = self._route_victims(key, route, request.evict_first)
        device = self.devices[self.index[key]]
        request.device = self.index[key]
        there = key in self.directory.holders(model.name)
        request.expected_ms = self.estimates.service_ms(model.name, size_bytes=size, resident=there)
        # The view may not fit it now (all pinned): the manager's own cache decides then.
        with contextlib.suppress(CacheError):
            self.directory.note_dispatch(
                key, model.name, size_bytes=size, prefer=request.evict_first
            )
        device.pending_ms += request.expected_ms
        device.queue.push(
            request, model=model.name, now_ms=self.now, deadline_ms=self.now + model.slo_ms
        )
        self._admit(device)
        self._table_row(device)

    def _route_victims(self, key: str, route: RouteRequest, planned: list[str]) -> list[str]:
        """The victims a load of ``route`` on ``key`` evicts first (then LRU), decided at
        routing: the directory notes them gone at once (``note_dispatch``) and the device
        evicts them when the load starts. ``planned`` (LALB's with ``hint`` eviction, else none:
        LRU) here; a subclass may replace them, as the gateway's residency hook does
        (``scheduler/gateway.py: _route``)."""
        del key, route
        return planned

    def _value_victims(self, key: str, route: RouteRequest) -> list[str]:
        """LALB's value victims for a load of ``route`` on ``key`` (for a policy naming none)."""
        planner = self.victim_planner
        assert planner is not None
        estimates = self.estimates
        estimates.observe_request(route.model)
        if key in self.directory.holder_ids(route.model):
            return []  # there already (or loading): nothing to evict
        plan = planner.plans.value(key, route, self.directory, wanted=estimates.share(route.model))
        return plan[0] if plan else []

    def _table_row(self, device: _Device) -> None:
        """The device's load as the gateway's dispatcher reports it (``Dispatcher.load``): the
        expected time of its work per slot; for a request needing no load, none while a slot
        is free."""
        wait, hit_wait = expected_waits(
            running=device.running,
            queued=len(device.queue),
            pending_ms=device.pending_ms,
            concurrency=self.config.concurrency,
        )
        self.table.update(
            device.key,
            outstanding=device.running + len(device.queue),
            queue_ms=wait,
            hit_wait_ms=hit_wait,
        )

    def _admit(self, device: _Device) -> None:
        if device.running >= self.config.concurrency or not device.queue:
            return
        resident = self._resident_in_view(device)
        while device.running < self.config.concurrency and device.queue:
            waiting = device.queue.pop_next(self.now, resident)
            assert waiting is not None
            request = waiting.item
            request.passes, request.overtook = waiting.passes, waiting.overtook
            self._start(device, request)

    def _start(self, device: _Device, request: _Request) -> None:
        device.running += 1
        request.start_ms = self.now
        device.started.append(request.index)
        name = request.model.name
        entry = device.cache.peek(name)
        if entry is not None and entry.state is EntryState.RESIDENT:
            request.hit = True
            device.cache.touch(name)
            device.cache.pin(name)
            self._to_compute(device, request)
            return
        if entry is not None:  # loading for another request: wait for that load
            device.loading[name].append(request)
            return
        size = request.model.profile.size_bytes
        # As the GPU manager does: the hinted victims first (if not in use), then LRU.
        self.evictions += len(self._make_room(device, size, request))
        device.cache.reserve(name, size_bytes=size)
        load_ms = self._load_ms(device, request)
        request.load_ms = load_ms
        begin = max(self.now, device.copy_free_ms)
        device.copy_free_ms = begin + load_ms
        if begin >= self.warm_ms:
            device.copy_busy_ms += load_ms
        device.loading[name] = [request]
        self.loads += 1
        self._at(begin + load_ms, _LOAD_DONE, device, request)

    # Hooks for subclasses (bench/sim/residency.py: tiers and residency policies).
    def _make_room(self, device: _Device, size: int, request: _Request) -> list[Any]:
        return device.cache.make_room(size, prefer=request.evict_first)

    def _load_ms(self, device: _Device, request: _Request) -> float:
        return self._noisy(request.model.profile.load_ms)

    def _other_event(self, kind: int, a: Any, b: Any) -> None:
        raise AssertionError(f"unknown event kind {kind}")

    def _load_done(self, device: _Device, loader: _Request) -> None:
        name = loader.model.name
        device.cache.commit(name, None)
        for request in device.loading.pop(name):
            device.cache.pin(name)
            self._to_compute(device, request)
        device.cache.unpin(name)  # the load's own pin
        self.estimates.observe_load(
            name, size_bytes=loader.model.profile.size_bytes, load_ms=loader.load_ms
        )

    def _to_compute(self, device: _Device, request: _Request) -> None:
        request.ready_ms = self.now
        device.ready.append(request)
        if not device.computing:
            self._next_compute(device)

    def _next_compute(self, device: _Device) -> None:
        if device.ready:
            request = device.ready.popleft()
            device.computing = True
            request.infer_start_ms = self.now
            infer_ms = self._noisy(request.model.profile.infer_ms)
            if self.now >= self.warm_ms:
                device.compute_busy_ms += infer_ms
            self._at(self.now + infer_ms, _INFER_DONE, device, request)

    def _infer_done(self, device: _Device, request: _Request) -> None:
        device.computing = False
        request.end_ms = self.now
        model = request.model
        device.cache.unpin(model.name)
        self.done.append(request)
        device.pending_ms = max(0.0, device.pending_ms - request.expected_ms)
        # The gateway learns from every response: the model is resident there, at this size.
        with contextlib.suppress(CacheError):
            self.directory.note_loaded(device.key, model.name, size_bytes=model.profile.size_bytes)
        self.estimates.observe_infer(model.name, infer_ms=self.now - request.infer_start_ms)
        device.running -= 1
        self._next_compute(device)
        self._admit(device)
        self._table_row(device)

    def _sync(self) -> None:
        """Every GPU manager reports its residents; the gateway replaces its view, then re-notes
        the requests it has queued but not yet sent (which the managers cannot know about)."""
        for device in self.devices:
            residents = [
                (
                    e.key,
                    Residency.RESIDENT if e.state is EntryState.RESIDENT else Residency.LOADING,
                    e.size_bytes,
                )
                for e in device.cache.entries_lru()
            ]
            self.directory.sync(device.key, residents)
            for waiting in device.queue:
                with contextlib.suppress(CacheError):
                    self.directory.note_dispatch(
                        device.key, waiting.model, size_bytes=waiting.item.model.profile.size_bytes
                    )

    # -- metrics ------------------------------------------------------------------------------------

    def _result(self, wall_s: float) -> SimResult:
        skip = self.warm_index
        measured = [r for r in self.done if r.index >= skip]
        window = max((r.end_ms for r in measured), default=self.warm_ms) - self.warm_ms
        models = self.trace.model
        placement = [
            ([int(models[i]) for i in d.started], [i >= skip for i in d.started])
            for d in self.devices
        ]
        latency = np.asarray([r.end_ms - r.arrival_ms for r in measured])
        queue = np.asarray([r.start_ms - r.arrival_ms for r in measured])
        loads = np.asarray([r.ready_ms - r.start_ms for r in measured if not r.hit])
        slo_met = sum(1 for r, lat in zip(measured, latency, strict=True) if lat <= r.model.slo_ms)
        hits = sum(r.hit for r in measured)
        decisions = np.asarray(self.decision_ns, dtype=float) / 1000
        reasons = getattr(self.policy, "reasons", {})
        return SimResult(
            policy=self.policy.name,
            requests=len(measured),
            hits=hits,
            misses=len(measured) - hits,
            mean_ms=float(latency.mean()) if len(latency) else 0.0,
            p50_ms=float(np.percentile(latency, 50)) if len(latency) else 0.0,
            p99_ms=float(np.percentile(latency, 99)) if len(latency) else 0.0,
            mean_queue_ms=float(queue.mean()) if len(queue) else 0.0,
            p99_queue_ms=float(np.percentile(queue, 99)) if len(queue) else 0.0,
            mean_load_ms=float(loads.mean()) if len(loads) else 0.0,
            slo_attainment=slo_met / len(measured) if measured else 0.0,
            loads=self.loads,
            evictions=self.evictions,
            overtakes=sum(r.overtook for r in measured),
            max_passes=max((r.passes for r in measured), default=0),
            decisions=dict(reasons),
            decision_us_p50=float(np.percentile(decisions, 50)) if len(decisions) else 0.0,
            decision_us_p99=float(np.percentile(decisions, 99)) if len(decisions) else 0.0,
            wall_s=wall_s,
            copy_utilisation=max(d.copy_busy_ms for d in self.devices) / window if window else 0.0,
            compute_utilisation=(
                max(d.compute_busy_ms for d in self.devices) / window if window else 0.0
            ),
            placement=placement,
        )


def simulate(policy: str, catalogue: list[Model], trace: Trace, config: SimConfig) -> SimResult:
    return Simulation(policy, catalogue, trace, config).run()
