"""The LALB simulator with a host tier and a residency policy: keep-alive, pre-warm, demote.

:class:`ResidencySimulation` is :class:`sim.engine.Simulation` (the real LALB policy, dispatch
queues, estimates and cluster directory) plus what a node does with the policies of
:mod:`gpufaas.cache.arrivals`, the same code the gateway's prefetch driver runs:

* every request is fed to the policy (``observe``) at arrival, as the gateway does;
* a device miss loads from the node's host tier if the model is there (PCIe only), else from
  the artifact (artifact -> host -> device, filling the host tier on the way);
* every ``tick_s`` the policy is asked about each model (``advise``): a device copy it no
  longer wants is demoted to the host tier, a host copy it no longer wants is dropped (the
  baselines keep the host tier as a plain LRU, as the GPU manager does today), and a model it
  wants before its request is prefetched;
* a prefetch has the lowest priority: it only uses free bytes (it never evicts), a request's
  load takes the copy engine from it (the prefetch resumes after), and a request's load that
  cannot make room otherwise cancels prefetches in flight on its device;
* when a request's load must evict, the policy plans the victims (``eviction_plan``; an empty
  plan is LRU).

Metrics beyond the engine's: requests that waited for a load by the tier it came from (host,
artifact, or an in-flight prefetch), device and host memory-time (GB-s: bytes held x time,
loading included), prefetch precision (prefetches used by a request before their eviction),
warm-request latency, and the policy's cost per request at the gateway.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gpufaas.cache import ByteLRU, CacheError, EntryState, Residency
from gpufaas.cache.arrivals import (
    EVICTION_SAMPLE,
    Advice,
    Candidate,
    ResidencyPolicy,
    eviction_plan,
)
from gpufaas.scheduler.policy import LocalityAware, RouteRequest

from .engine import SimConfig, Simulation, _Device, _Request
from .trace import ModelCosts, ServerlessTrace
from .workload import Model, ModelProfile, Trace

_TICK, _PREFETCH_DONE, _HOST_FETCH_DONE, _PREFETCH_GIVE_UP = 11, 12, 13, 14
# why a cold request's model was not on its device; "joined": it waited on another request's
# load of the model (a burst behind one load)
CAUSES = ("first", "demoted", "capacity", "replica", "prefetch-late", "joined")


@dataclasses.dataclass(frozen=True)
class TierConfig:
    host_capacity_bytes: int = 1024 * 10**9  # per node
    tick_s: float = 5.0
    prefetch: bool = True
    staged_routing: bool = True  # LALB told where host copies are (scheduler/policy.py)
    # prefetch functions never served on a device in this run too (the gateway's driver does:
    # scheduler/prefetch.py plan); False: only those with a last device (the rule before)
    prefetch_unserved: bool = True
    eviction_sample: int = EVICTION_SAMPLE  # victims the policy ranks per load (LRU first)
    # the policy's victims planned at routing over the directory's view, which notes them gone
    # at once, as the gateway does (scheduler/gateway.py: _route); False: planned when the load
    # starts, over the device, while the directory noted LALB's victims gone at routing (the
    # simulator before the tenth session: its view then lost models still held, and kept
    # models already evicted, until the next sync)
    route_victims: bool = True
    # the plan at routing leaves out the models with requests on the device (queued or
    # running), as the gateway's does (its in-flight count); False: the view's residents
    spare_in_use: bool = True
    # prefetches planned over the directory's view, as the gateway's driver does
    # (scheduler/prefetch.py: plan): a model the view shows on no device, sent to its last
    # device if the view has room there, else to the device the view shows roomiest, else not
    # at all; the node then runs it only into the device's free bytes (gpu_manager/prefetch.py:
    # no-room otherwise, never on another device). False: planned over the devices themselves,
    # wherever one had free bytes, the directory noting it there (the simulator before the
    # eleventh session: a view fuller than the device then made room for it by evicting, from
    # the view alone, models the device still held)
    prefetch_by_view: bool = True
    # the node's rule (gpu_manager/prefetch.py: Prefetcher.run, device_room): a node runs the
    # prefetches sent to it one at a time, in order, and one starts only while its device is
    # quiet (no load in flight there, no request being served on it; for a CPU device, on no
    # CPU device of the node), else it is skipped as ``busy`` (the gateway asks again on a
    # later tick, once the view no longer shows it loading). False: every prefetch sent starts
    # at once beside the requests (the simulator before the twelfth session's second wave)
    prefetch_when_quiet: bool = True
    # with prefetch_when_quiet, the third wave's rule (gpu_manager/prefetch.py: Prefetcher.run):
    # a prefetch whose device is not quiet at its turn WAITS for it to go quiet (woken when a
    # request finishes or a load lands on the node), holding the node's queue, and is dropped
    # as ``busy`` only if still not started one prefetch tick (``tick_s``) after its turn came.
    # False: it is skipped as ``busy`` at once (the second wave's rule, label suffix -busyskip)
    prefetch_waits: bool = True


@dataclasses.dataclass
class _Prefetch:
    device: _Device
    name: str
    done_ms: float
    generation: int = 0


def catalogue_for(trace: ServerlessTrace, costs: list[ModelCosts]) -> list[Model]:
    """Engine models for a trace: one per function, loading from the artifact by default."""
    return [
        Model(
            name=f"fn-{i:04d}",
            profile=ModelProfile(
                kind="orcbench",
                size_bytes=c.size_bytes,
                load_ms=c.artifact_to_device_ms,
                infer_ms=c.infer_ms,
            ),
            slo_ms=2 * (c.artifact_to_device_ms + c.infer_ms),
        )
        for i, c in enumerate(costs)
    ]


def engine_trace(trace: ServerlessTrace) -> Trace:
    start = trace.arrival_s[0] if len(trace) else 0.0
    return Trace(arrival_ms=(trace.arrival_s - start) * 1000.0, model=trace.function.copy())


class ResidencySimulation(Simulation):
    def __init__(
        self,
        policy: ResidencyPolicy,
        catalogue: list[Model],
        costs: list[ModelCosts],
        trace: Trace,
        config: SimConfig,
        tiers: TierConfig,
        weights: npt.NDArray[np.float64] | None = None,
        history: Sequence[tuple[int, float]] = (),
    ) -> None:
        super().__init__("lalb", catalogue, trace, config)
        # each request stands for this many of the original trace (bench/sim/trace.py: thin)
        self.weights = np.ones(len(trace)) if weights is None else weights
        self.residency = policy
        for function, t_s in history:  # what the gateway saw before (its persisted state)
            policy.observe(catalogue[function].name, t_s)
        self.tiers = tiers
        self.costs = {m.name: c for m, c in zip(catalogue, costs, strict=True)}
        self.nodes = sorted({d.key.split("/")[0] for d in self.devices})
        self.host: dict[str, ByteLRU[None]] = {
            n: ByteLRU(capacity_bytes=tiers.host_capacity_bytes) for n in self.nodes
        }
        self.staged: dict[str, set[str]] = {}  # model -> nodes whose host tier holds it
        if tiers.staged_routing and isinstance(self.policy, LocalityAware):
            # LALB counts the artifact read on a node without a host copy (as the gateway does
            # from the nodes' reports); fetch cost per byte as the trace's artifact bandwidth.
            self.policy.staged = self._staged_nodes
            self.policy.fetch_ms_per_byte = costs_fetch_ms_per_byte(costs)
        self.device_since: dict[tuple[str, str], float] = {}
        self.host_since: dict[tuple[str, str], float] = {}
        self.device_byte_ms = 0.0
        self.host_byte_ms = 0.0
        self.tier_of: dict[int, str] = {}  # request index -> where its load came from
        # request index -> why its model was not on its device (see _cause), for the loss
        # analysis; and per model, what last removed a device copy of it
        self.cause_of: dict[int, str] = {}
        self.removed_by: dict[str, str] = {}
        self.loading_cause: dict[tuple[str, str], str] = {}
        self.loading_tier: dict[tuple[str, str], str] = {}
        self.last_device: dict[str, _Device] = {}
        self.prefetches: dict[tuple[str, str], _Prefetch] = {}
        self.prefetched: set[tuple[str, str]] = set()  # prefetched, not yet used
        self.host_fetching: set[tuple[str, str]] = set()
        self.prefetch_started = self.prefetch_used = self.prefetch_wasted = 0
        self.prefetch_failed = self.prefetch_preempted = self.prefetch_busy = 0
        # per node, the prefetches sent to it and not yet started (prefetch_when_quiet)
        self.node_queue: dict[str, deque[tuple[_Device, str, int]]] = {
            n: deque() for n in self.nodes
        }
        # per node, when the prefetch at its queue's head began waiting for its device to go
        # quiet (prefetch_waits): (the job's sequence number, the time it gives up)
        self.node_waiting: dict[str, tuple[int, float]] = {}
        self.prefetch_seq = 0
        self.prefetch_waited = 0  # prefetches that waited and then started
        self.demotions = self.releases = 0
        self.observe_ns: list[int] = []
        self.tick_ns = 0
        self.last_arrival_ms = float(trace.arrival_ms[-1]) if len(trace) else 0.0
        # memory-time is counted from the end of the warm-up, as the other metrics are
        skip = int(len(trace) * config.warmup_fraction)
        self.measure_from_ms = float(trace.arrival_ms[skip]) if skip < len(trace) else 0.0

    # -- helpers -------------------------------------------------------------------------------

    def _node(self, device: _Device) -> str:
        return device.key.split("/")[0]

    def _devices_of(self, node: str) -> list[_Device]:
        return [d for d in self.devices if self._node(d) == node]

    def _staged_nodes(self, name: str) -> set[str]:
        return self.staged.get(name, _NONE)

    def _device_in(self, device: _Device, name: str, size: int) -> None:
        self.device_since[(device.key, name)] = self.now
        del size

    def _device_out(self, device: _Device, name: str, size: int) -> None:
        since = self.device_since.pop((device.key, name), None)
        if since is not None:
            self.device_byte_ms += size * max(0.0, self.now - max(since, self.measure_from_ms))
        if (device.key, name) in self.prefetched:
            self.prefetched.discard((device.key, name))
            self.prefetch_wasted += 1
        with_host = self.host[self._node(device)]
        if name not in with_host:
            self._host_put(self._node(device), name, size)

    def _host_put(self, node: str, name: str, size: int) -> bool:
        host = self.host[node]
        if name in host:
            host.touch(name)
            return True
        try:
            candidates = [
                Candidate(e.key, e.size_bytes, self.costs[e.key].artifact_to_host_ms)
                for e in host.entries_lru()
                if not e.pinned
            ]
            prefer = self.residency.victim_order(candidates, self.now / 1000) if candidates else []
            for victim in host.make_room(size, prefer=prefer):
                self._host_out(node, victim.key, victim.size_bytes)
            host.put(name, None, size_bytes=size)
        except CacheError:
            return False
        self.host_since[(node, name)] = self.now
        self.staged.setdefault(name, set()).add(node)
        return True

    def _host_out(self, node: str, name: str, size: int) -> None:
        nodes = self.staged.get(name)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self.staged[name]
        since = self.host_since.pop((node, name), None)
        if since is not None:
            self.host_byte_ms += size * max(0.0, self.now - max(since, self.measure_from_ms))

    def _cause(self, device: _Device, name: str) -> str:
        """Why a request's load was needed: ``replica`` (the model is on another device, LALB
        chose to load it here), ``first`` (never on a device in this run), or what last removed
        it: ``demoted`` (the residency policy let it go) or ``capacity`` (another load evicted
        it)."""
        for other in self.devices:
            if other is not device and other.cache.peek(name) is not None:
                return "replica"
        return self.removed_by.get(name, "first")

    def _reload_ms(self, node: str, name: str) -> float:
        c = self.costs[name]
        return c.host_to_device_ms if name in self.host[node] else c.artifact_to_device_ms

    def _device_advice(self, now_s: float, node: str, name: str, size_bytes: int) -> Advice:
        """The policy's advice on ``name`` in a device of ``node``: what reloading it there
        would cost, from that node's host tier or from the artifact."""
        return self.residency.advise(
            name, now_s, size_bytes=size_bytes, reload_ms=self._reload_ms(node, name), tier="device"
        )

    # -- engine hooks --------------------------------------------------------------------------

    def _arrive(self, request: _Request) -> None:
        gc.disable()
        tic = time.perf_counter_ns()
        self.residency.observe(request.model.name, self.now / 1000)
        self.observe_ns.append(time.perf_counter_ns() - tic)
        gc.enable()
        super()._arrive(request)

    def _start(self, device: _Device, request: _Request) -> None:
        name = request.model.name
        entry = device.cache.peek(name)
        if entry is not None and entry.state is EntryState.LOADING:
            self.tier_of[request.index] = self.loading_tier.get((device.key, name), "artifact")
            self.cause_of[request.index] = self.loading_cause.get((device.key, name), "joined")
        if (device.key, name) in self.prefetched:
            self.prefetched.discard((device.key, name))
            self.prefetch_used += 1
        self.last_device[name] = device
        super()._start(device, request)

    def _route_victims(self, key: str, route: RouteRequest, planned: list[str]) -> list[str]:
        """As the gateway does (``PrefetchDriver.victims``): when LALB's decision evicts, the
        policy plans the victims over the directory's view of the device (a sample, the least
        recently used), so the directory notes the victims the device will evict; an empty
        plan (no eviction needed, or a policy without a plan) leaves ``planned``."""
        directory = self.directory
        if not self.tiers.route_victims or key in directory.holder_ids(route.model):
            return planned  # there already (or loading): nothing to evict
        node = key.split("/")[0]
        busy = self._in_use(self.devices[self.index[key]]) if self.tiers.spare_in_use else _NONE
        residents = (
            (model, size)
            for model, state, size in directory.residents(key)
            if state is Residency.RESIDENT and model not in busy
        )
        plan = eviction_plan(
            self.residency,
            residents,
            self.now / 1000,
            lambda name, _size: self._reload_ms(node, name),
            need_bytes=route.size_bytes - directory.free_bytes(key),
            copies_elsewhere=lambda name: max(0, len(directory.holder_ids(name)) - 1),
            sample=self.tiers.eviction_sample,
            loading=route.model,
        )
        return plan or planned

    @staticmethod
    def _in_use(device: _Device) -> set[str]:
        """The models with requests on ``device``, queued or running (the gateway's
        ``in_flight``): the device cannot evict them while they run, and a queued request
        would find its model gone."""
        busy = {e.key for e in device.cache.entries_lru() if e.pinned}
        busy.update(waiting.item.model.name for waiting in device.queue)
        return busy

    def _make_room(self, device: _Device, size: int, request: _Request) -> list[Any]:
        node = self._node(device)
        self._preempt_prefetches(device, size)
        # The victims chosen at routing first (the device evicts the gateway's hints first);
        # whatever they do not free, LRU frees.
        prefer = request.evict_first
        if not self.tiers.route_victims:
            residents = ((e.key, e.size_bytes) for e in device.cache.entries_lru() if not e.pinned)
            prefer = (
                eviction_plan(
                    self.residency,
                    residents,
                    self.now / 1000,
                    lambda name, _size: self._reload_ms(node, name),
                    need_bytes=size - device.cache.free_bytes,
                    copies_elsewhere=lambda name: max(0, len(self.directory.holder_ids(name)) - 1),
                    sample=self.tiers.eviction_sample,
                    loading=request.model.name,
                )
                or request.evict_first
            )
        evicted = device.cache.make_room(size, prefer=prefer)
        for e in evicted:
            self.removed_by[e.key] = "capacity"
            self._device_out(device, e.key, e.size_bytes)
            with _quiet():
                self.directory.note_evicted(device.key, e.key)
        # A request's load takes the copy engine: running prefetches on it resume afterwards.
        return evicted

    def _load_ms(self, device: _Device, request: _Request) -> float:
        name = request.model.name
        node = self._node(device)
        c = self.costs[name]
        if name in self.host[node]:
            tier, mean = "host", c.host_to_device_ms
            self.host[node].touch(name)
        else:
            tier, mean = "artifact", c.artifact_to_device_ms
        self.tier_of[request.index] = tier
        self.cause_of[request.index] = self.loading_cause[(device.key, name)] = self._cause(
            device, name
        )
        self.loading_tier[(device.key, name)] = tier
        self._device_in(device, name, c.size_bytes)
        load_ms = self._noisy(mean)
        self._delay_prefetches(device, load_ms)
        return load_ms

    def _load_done(self, device: _Device, loader: _Request) -> None:
        super()._load_done(device, loader)
        name = loader.model.name
        self.loading_tier.pop((device.key, name), None)
        self.loading_cause.pop((device.key, name), None)
        node = self._node(device)
        if name not in self.host[node]:  # the load filled the host tier on its way
            self._host_put(node, name, loader.model.profile.size_bytes)
        if self.node_queue[node]:
            self._node_prefetches(node)  # a waiting prefetch's device may be quiet now

    def _infer_done(self, device: _Device, request: _Request) -> None:
        super()._infer_done(device, request)
        node = self._node(device)
        if self.node_queue[node]:
            self._node_prefetches(node)  # a waiting prefetch's device may be quiet now

    def _other_event(self, kind: int, a: Any, b: Any) -> None:
        if kind == _TICK:
            tic = time.perf_counter_ns()
            self._tick()
            self.tick_ns += time.perf_counter_ns() - tic
            if self.now < self.last_arrival_ms:
                self._at(self.now + self.tiers.tick_s * 1000, _TICK, None)
        elif kind == _PREFETCH_DONE:
            self._prefetch_done(a, b)
        elif kind == _PREFETCH_GIVE_UP:
            waiting = self.node_waiting.get(a)
            if waiting is not None and waiting[0] == b:
                self._node_prefetches(a)
        elif kind == _HOST_FETCH_DONE:
            node, name = a
            self.host_fetching.discard((node, name))
            self._host_put(node, name, self.costs[name].size_bytes)
        else:
            super()._other_event(kind, a, b)

    # -- the policy's periodic pass --------------------------------------------------------------

    def run(self) -> Any:
        self._at(self.tiers.tick_s * 1000, _TICK, None)
        return super().run()

    def _tick(self) -> None:
        now_s = self.now / 1000
        policy = self.residency
        on_device: set[str] = set()
        for device in self.devices:
            node = self._node(device)
            for e in device.cache.entries_lru():
                on_device.add(e.key)
                if e.pinned:
                    continue
                advice = self._device_advice(now_s, node, e.key, e.size_bytes)
                if not advice.keep:
                    self.removed_by[e.key] = "demoted"
                    device.cache.evict(e.key)
                    self._device_out(device, e.key, e.size_bytes)
                    with _quiet():
                        self.directory.note_evicted(device.key, e.key)
                    self.demotions += 1
        for node, host in self.host.items():
            for e in host.entries_lru():
                if e.pinned or e.key in on_device:
                    continue
                c = self.costs[e.key]
                advice = policy.advise(
                    e.key,
                    now_s,
                    size_bytes=e.size_bytes,
                    reload_ms=c.artifact_to_host_ms,
                    tier="host",
                )
                # The baselines hold the host tier as a plain LRU (today's GPU manager).
                if not advice.keep and advice.reason == "cost":
                    host.evict(e.key)
                    self._host_out(node, e.key, e.size_bytes)
                    self.releases += 1
        if self.tiers.prefetch and policy.may_prefetch:
            self._prefetch_pass(now_s, on_device)

    def _prefetch_pass(self, now_s: float, on_device: set[str]) -> None:
        """Prefetch what the policy wants: as the gateway, over the directory's view
        (``prefetch_by_view``); else over the devices (``on_device``: models on any), the
        simulator before the eleventh session."""
        if self.tiers.prefetch_by_view:
            self._prefetch_pass_by_view(now_s)
            return
        roomiest: _Device | None = None
        for model in self.catalogue:
            name = model.name
            if name in on_device:
                continue
            device = self.last_device.get(name)
            if device is None:
                if not self.tiers.prefetch_unserved:
                    continue
                # never on a device in this run: as the gateway's driver, the device with the
                # most free bytes (the state at this tick's first such function)
                if roomiest is None:
                    roomiest = max(self.devices, key=lambda d: d.cache.free_bytes)
                device = roomiest
            node = self._node(device)
            c = self.costs[name]
            advice = self._device_advice(now_s, node, name, c.size_bytes)
            if advice.prefetch:
                self._start_prefetch(device, name)
            else:
                self._host_prefetch(now_s, node, name)

    def _prefetch_pass_by_view(self, now_s: float) -> None:
        """The gateway's prefetch pass (``scheduler/prefetch.py: plan``): over the directory's
        view, not the devices. A model the view shows on no device (in any state) that the
        policy wants goes to its last device if the view has room there, else to the device
        the view shows roomiest if it has room, else nowhere; each one sent takes its bytes
        from the view's free bytes for the rest of the pass. Sent, the directory notes it
        loading there (into the view's free bytes, so the view evicts nothing for it) and the
        node runs it (``_prefetch_at``)."""
        directory = self.directory
        held: set[str] = set()
        free: dict[str, int] = {}
        for device in self.devices:
            free[device.key] = directory.free_bytes(device.key)
            held.update(model for model, _state, _size in directory.residents(device.key))
        for model in self.catalogue:
            name = model.name
            if name in held:
                continue
            last = self.last_device.get(name)
            if last is None and not self.tiers.prefetch_unserved:
                continue
            roomiest = max(self.devices, key=lambda d: free[d.key])
            # the reload the prefetch would save, from the host tier of the node it would go
            # to first (the gateway's estimate knows no tiers; the simulator's advice does)
            node = self._node(last if last is not None else roomiest)
            c = self.costs[name]
            advice = self._device_advice(now_s, node, name, c.size_bytes)
            if advice.prefetch:
                target = last if last is not None and free[last.key] >= c.size_bytes else None
                if target is None and free[roomiest.key] >= c.size_bytes:
                    target = roomiest
                if target is None:  # no room in the view: the gateway sends none
                    self.prefetch_failed += 1
                    continue
                free[target.key] -= c.size_bytes
                self._prefetch_at(target, name)
            else:
                self._host_prefetch(now_s, node, name)

    def _host_prefetch(self, now_s: float, node: str, name: str) -> None:
        """Stage ``name`` in ``node``'s host tier if the policy wants it there and it fits."""
        if name in self.host[node] or (node, name) in self.host_fetching:
            return
        c = self.costs[name]
        host_advice = self.residency.advise(
            name, now_s, size_bytes=c.size_bytes, reload_ms=c.artifact_to_host_ms, tier="host"
        )
        if host_advice.prefetch and self.host[node].free_bytes >= c.size_bytes:
            self.host_fetching.add((node, name))
            self._at(self.now + self._noisy(c.artifact_to_host_ms), _HOST_FETCH_DONE, (node, name))

    def _prefetch_at(self, device: _Device, name: str) -> None:
        """The node's side of a prefetch the gateway sent to ``device``: the directory notes it
        loading there at once (the gateway notes it when the node accepts it); the node queues
        it and runs its queue one at a time (``_node_prefetches``); without
        ``prefetch_when_quiet`` it runs at once."""
        c = self.costs[name]
        with _quiet():
            self.directory.note_dispatch(device.key, name, size_bytes=c.size_bytes)
        if not self.tiers.prefetch_when_quiet:
            self._node_prefetch(device, name)
            return
        node = self._node(device)
        self.prefetch_seq += 1
        self.node_queue[node].append((device, name, self.prefetch_seq))
        self._node_prefetches(node)

    def _node_prefetches(self, node: str) -> None:
        """The node's prefetch worker: while none of its prefetches is in flight, the next one
        queued starts, or is skipped (``_node_prefetch``). With ``prefetch_waits``, one whose
        device is not quiet stays at the head, waiting: this runs again when a request
        finishes or a load lands on the node (``_infer_done``, ``_load_done``), and at the
        time it gives up (``_PREFETCH_GIVE_UP``), when it is dropped as ``busy``."""
        queue = self.node_queue[node]
        while queue and not any(
            job.device.key.startswith(node + "/") for job in self.prefetches.values()
        ):
            device, name, seq = queue[0]
            if self.tiers.prefetch_waits and device.cache.peek(name) is None:
                if not device_quiet(device, self._devices_of(node)):
                    waiting = self.node_waiting.get(node)
                    if waiting is None or waiting[0] != seq:
                        give_up = self.now + self.tiers.tick_s * 1000
                        self.node_waiting[node] = (seq, give_up)
                        self._at(give_up, _PREFETCH_GIVE_UP, node, seq)
                        return
                    if self.now < waiting[1]:
                        return
                    queue.popleft()  # waited its bound: dropped
                    del self.node_waiting[node]
                    self.prefetch_busy += 1
                    continue
                if self.node_waiting.pop(node, (None,))[0] == seq:
                    self.prefetch_waited += 1
            queue.popleft()
            self._node_prefetch(device, name)

    def _node_prefetch(self, device: _Device, name: str) -> None:
        """One prefetch at its start, as the node decides it: a model the device already holds
        is left as it is (``resident``); one whose device is not quiet (``device_quiet``) is
        skipped (``busy``, with ``prefetch_when_quiet``); one that does not fit the device's
        free bytes is counted ``no-room``. A skipped one leaves the view showing a load the
        device never started, until the next sync."""
        c = self.costs[name]
        if device.cache.peek(name) is not None:
            return
        node_devices = self._devices_of(self._node(device))
        if self.tiers.prefetch_when_quiet and not device_quiet(device, node_devices):
            self.prefetch_busy += 1
            return
        if device.cache.free_bytes < c.size_bytes:
            self.prefetch_failed += 1
            return
        self._begin_prefetch(device, name)

    def _start_prefetch(self, device: _Device, name: str) -> None:
        """Load ``name`` onto ``device`` into free bytes only; a request's load goes first."""
        c = self.costs[name]
        target = device
        if target.cache.free_bytes < c.size_bytes:  # lowest priority: never evict for it
            roomy = max(self.devices, key=lambda d: d.cache.free_bytes)
            if roomy.cache.free_bytes < c.size_bytes:
                self.prefetch_failed += 1
                return
            target = roomy
        with _quiet():
            self.directory.note_dispatch(target.key, name, size_bytes=c.size_bytes)
        self._begin_prefetch(target, name)

    def _begin_prefetch(self, target: _Device, name: str) -> None:
        """Reserve ``name``'s bytes on ``target`` and copy it behind the requests' loads."""
        c = self.costs[name]
        node = self._node(target)
        tier = "host" if name in self.host[node] else "artifact"
        mean = c.host_to_device_ms if tier == "host" else c.artifact_to_device_ms
        target.cache.reserve(name, size_bytes=c.size_bytes)
        target.loading[name] = []
        self.loading_tier[(target.key, name)] = "prefetch"
        self.loading_cause[(target.key, name)] = "prefetch-late"
        self._device_in(target, name, c.size_bytes)
        begin = max(self.now, target.copy_free_ms)
        job = _Prefetch(device=target, name=name, done_ms=begin + self._noisy(mean))
        self.prefetches[(target.key, name)] = job
        self.prefetch_started += 1
        self._at(job.done_ms, _PREFETCH_DONE, job, job.generation)

    def _preempt_prefetches(self, device: _Device, size: int) -> None:
        """A request's load that cannot make room otherwise cancels prefetches in flight on the
        device that no request waits on, newest first (their reserved bytes are pinned), as the
        node's preemption does (gpu_manager/prefetch.py)."""
        cache = device.cache
        jobs = [job for (key, _), job in self.prefetches.items() if key == device.key]
        for job in reversed(jobs):
            if cache.free_bytes + cache.freeable_bytes() >= size:
                return
            if device.loading.get(job.name):
                continue  # a request waits on it: it is that request's load now
            job.generation += 1  # its completion event is void
            del self.prefetches[(device.key, job.name)]
            del device.loading[job.name]
            self.loading_tier.pop((device.key, job.name), None)
            self.loading_cause.pop((device.key, job.name), None)
            entry = cache.discard(job.name)
            since = self.device_since.pop((device.key, job.name), None)
            if entry is not None and since is not None:
                held = max(0.0, self.now - max(since, self.measure_from_ms))
                self.device_byte_ms += entry.size_bytes * held
            with _quiet():
                self.directory.note_evicted(device.key, job.name)
            self.prefetch_preempted += 1
        self._node_prefetches(self._node(device))

    def _delay_prefetches(self, device: _Device, load_ms: float) -> None:
        for (key, _), job in self.prefetches.items():
            if key == device.key and job.done_ms > self.now:
                job.done_ms += load_ms
                job.generation += 1
                self._at(job.done_ms, _PREFETCH_DONE, job, job.generation)

    def _prefetch_done(self, job: _Prefetch, generation: int) -> None:
        if generation != job.generation:
            return  # superseded: a request's load pushed it back
        device, name = job.device, job.name
        del self.prefetches[(device.key, name)]
        self.loading_tier.pop((device.key, name), None)
        self.loading_cause.pop((device.key, name), None)
        c = self.costs[name]
        device.cache.commit(name, None)
        waiting = device.loading.pop(name)
        for request in waiting:
            device.cache.pin(name)
            self._to_compute(device, request)
        device.cache.unpin(name)
        if waiting:
            self.prefetch_used += 1
        else:
            self.prefetched.add((device.key, name))
        with _quiet():
            self.directory.note_loaded(device.key, name, size_bytes=c.size_bytes)
        node = self._node(device)
        if name not in self.host[node]:
            self._host_put(node, name, c.size_bytes)
        self._node_prefetches(node)

    # -- metrics ---------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        result = self.run()
        start = self.measure_from_ms
        for (_, name), since in list(self.device_since.items()):
            self.device_byte_ms += self.costs[name].size_bytes * (self.now - max(since, start))
        for (_, name), since in list(self.host_since.items()):
            self.host_byte_ms += self.costs[name].size_bytes * (self.now - max(since, start))
        skip = int(len(self.trace) * self.config.warmup_fraction)
        measured = [r for r in self.done if r.index >= skip]
        w = self.weights[[r.index for r in measured]]
        tiers = {"host": 0.0, "artifact": 0.0, "prefetch": 0.0}
        causes = dict.fromkeys(CAUSES, 0.0)
        by_size = dict.fromkeys(SIZE_CLASSES, 0.0)
        for r, weight in zip(measured, w, strict=True):
            if not r.hit:
                tiers[self.tier_of.get(r.index, "artifact")] += weight
                causes[self.cause_of.get(r.index, "joined")] += weight
                by_size[size_class(r.model.profile.size_bytes)] += weight
        latency = np.asarray([r.end_ms - r.arrival_ms for r in measured])
        hit = np.asarray([r.hit for r in measured], dtype=bool)
        observe = np.asarray(self.observe_ns, dtype=float) / 1000
        n = max(1e-9, float(w.sum()))
        cold = sum(tiers.values())
        finished = self.prefetch_used + self.prefetch_wasted
        return {
            "policy": self.residency.name,
            "requests": len(measured),
            "weighted_requests": float(w.sum()),
            "cold_start_ratio": cold / n,
            "cold_by_tier": {k: v / n for k, v in tiers.items()},
            "cold_by_cause": {k: v / n for k, v in causes.items()},
            "cold_by_size": {k: v / n for k, v in by_size.items()},
            "device_gb_s": self.device_byte_ms / 1e12,
            "host_gb_s": self.host_byte_ms / 1e12,
            "p50_ms": weighted_percentile(latency, w, 50),
            "p99_ms": weighted_percentile(latency, w, 99),
            "warm_p99_ms": weighted_percentile(latency[hit], w[hit], 99),
            "prefetches": self.prefetch_started,
            "prefetch_used": self.prefetch_used,
            "prefetch_precision": self.prefetch_used / finished if finished else None,
            "prefetch_no_room": self.prefetch_failed,
            "prefetch_preempted": self.prefetch_preempted,
            "prefetch_busy": self.prefetch_busy,
            "prefetch_waited": self.prefetch_waited,
            "demotions": self.demotions,
            "host_releases": self.releases,
            "loads": result.loads,
            "evictions": result.evictions,
            "observe_us_mean": float(observe.mean()) if len(observe) else 0.0,
            "observe_us_p99": float(np.percentile(observe, 99)) if len(observe) else 0.0,
            "tick_us_per_request": self.tick_ns / 1000 / max(1, len(self.trace)),
            "wall_s": result.wall_s,
        }


_NONE: set[str] = set()


def is_cpu(device: _Device) -> bool:
    """Whether ``device`` is a CPU device (its key ``node/cpu:N``)."""
    return device.key.split("/")[-1].startswith("cpu")


def device_quiet(device: _Device, node_devices: Sequence[_Device]) -> bool:
    """Whether a prefetch may start on ``device`` now, as the node decides it
    (``gpu_manager/prefetch.py: device_room``): no load in flight there (a request's or a
    prefetch's) and no request being served on it (the node's ``outstanding``: requests it
    runs or loads for; those still queued at the gateway's dispatcher are not at the node),
    or, for a CPU device, on any CPU device of the node (``node_devices``)."""
    sharing = [d for d in node_devices if is_cpu(d)] if is_cpu(device) else [device]
    return not device.loading and not any(d.running for d in sharing)


# the trace's size classes (bench/sim/trace.py: SIZE_MIX): cold starts by class show whether
# an eviction order sacrifices large models
SIZE_CLASSES = ("small", "medium", "large")


def size_class(size_bytes: int) -> str:
    return "small" if size_bytes < 5 * 10**8 else "medium" if size_bytes < 4 * 10**9 else "large"


def costs_fetch_ms_per_byte(costs: Sequence[ModelCosts]) -> float:
    """The artifact read's cost per byte of these models (ms/B), fitted through the origin."""
    size = sum(c.size_bytes for c in costs)
    fetch = sum(c.artifact_to_host_ms for c in costs)
    return fetch / size if size > 0 else 0.0


def weighted_percentile(
    values: npt.NDArray[np.float64], weights: npt.NDArray[np.float64], q: float
) -> float:
    """The ``q``-th percentile of ``values`` where each counts ``weights`` times."""
    if len(values) == 0:
        return 0.0
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    rank = q / 100 * cumulative[-1]
    return float(values[order][min(len(values) - 1, int(np.searchsorted(cumulative, rank)))])


class _quiet:
    """Ignore the directory's view being full: the next sync corrects it (as the gateway)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return isinstance(value, CacheError)
