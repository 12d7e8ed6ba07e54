"""The residency simulator (``bench/sim/residency.py``) on a small trace of timers: a fixed
10-minute keep-alive misses every request of a 15-minute timer, while the hybrid histogram and
ours load it ahead of time; a prefetch never evicts; memory-time and weights add up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from gpufaas.cache.arrivals import Advice, FixedKeepAlive, HybridHistogram, PredictivePolicy

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    module = sys.modules.get(f"sim.{name}")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(f"sim.{name}", BENCH / "sim" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


trace_mod = _load("trace")
engine = _load("engine")
residency = _load("residency")


def _timers(
    period_s: float, *, functions: int, hours: float
) -> tuple[Any, list[tuple[int, float]]]:
    """``functions`` timers of one period, phases spread; and 4 hours of their history."""
    times, ids = [], []
    for f in range(functions):
        phase = period_s * f / functions
        t = np.arange(-4 * 3600 + phase, hours * 3600, period_s)
        times.extend(t.tolist())
        ids.extend([f] * len(t))
    arrival, function = np.asarray(times), np.asarray(ids)
    order = np.argsort(arrival)
    arrival, function = arrival[order], function[order]
    past = arrival < 0
    history = [(int(f), float(t)) for f, t in zip(function[past], arrival[past], strict=True)]
    trace = trace_mod.ServerlessTrace(
        [f"t{f}" for f in range(functions)],
        ["timer"] * functions,
        arrival[~past],
        function[~past],
        np.zeros(int((~past).sum())),
    )
    return trace, history


def _run(
    policy: Any, *, prefetch: bool = True, devices: int = 2, capacity_gb: int = 40
) -> dict[str, Any]:
    config = engine.SimConfig(
        devices=devices,
        capacity_bytes=capacity_gb * 10**9,
        concurrency=2,
        eviction="lru",
        seed=1,
        warmup_fraction=0.1,
    )
    tiers = residency.TierConfig(host_capacity_bytes=100 * 10**9, tick_s=5.0, prefetch=prefetch)
    report: dict[str, Any] = _timer_simulation(
        policy, config, tiers, functions=6, hours=2.0
    ).report()
    return report


def _timer_simulation(
    policy: Any,
    config: Any,
    tiers: Any,
    *,
    functions: int,
    hours: float,
    simulation: Any = residency.ResidencySimulation,
) -> Any:
    """``functions`` 2 GB timers of 900 s (``_timers``) in ``simulation``, not yet run."""
    trace, history = _timers(900.0, functions=functions, hours=hours)
    costs = [trace_mod.costs_for(2 * 10**9) for _ in trace.functions]
    return simulation(
        policy,
        residency.catalogue_for(trace, costs),
        costs,
        residency.engine_trace(trace),
        config,
        tiers,
        history=history,
    )


def test_a_fixed_keepalive_misses_every_request_of_a_longer_timer() -> None:
    report = _run(FixedKeepAlive(keepalive_s=600))
    assert report["cold_start_ratio"] == pytest.approx(1.0)
    assert report["prefetches"] == 0


def test_the_hybrid_histogram_and_ours_load_the_timer_ahead_of_its_request() -> None:
    for policy in (HybridHistogram(), PredictivePolicy(device_price=1.0)):
        report = _run(policy)
        assert report["cold_start_ratio"] < 0.1, (policy.name, report)
        assert report["prefetch_precision"] > 0.9
    fixed = _run(FixedKeepAlive(keepalive_s=600))
    ours = _run(PredictivePolicy(device_price=1.0))
    # it is released between requests: less memory-time than keeping it for 10 minutes
    assert ours["device_gb_s"] < fixed["device_gb_s"]


def test_without_prefetch_ours_only_keeps_and_so_misses_the_timer() -> None:
    report = _run(PredictivePolicy(device_price=1.0), prefetch=False)
    assert report["prefetches"] == 0
    assert report["cold_start_ratio"] > 0.9


def test_a_prefetch_never_evicts_it_is_skipped_when_no_device_has_room() -> None:
    # one device holding one model at a time: each prefetch finds the device full
    config = engine.SimConfig(
        devices=1, capacity_bytes=2 * 10**9 + 1, concurrency=1, eviction="lru", seed=1
    )
    tiers = residency.TierConfig(host_capacity_bytes=100 * 10**9, tick_s=5.0)
    sim = _timer_simulation(
        PredictivePolicy(device_price=0.0), config, tiers, functions=6, hours=1.0
    )
    report = sim.report()
    # price 0 keeps everything: the device stays full, so no prefetch ever starts
    assert report["prefetches"] == 0 and report["prefetch_no_room"] > 0
    assert report["evictions"] == report["loads"] - 1  # only requests' loads evict


def test_weighted_percentiles() -> None:
    values = np.asarray([1.0, 2.0, 3.0])
    assert residency.weighted_percentile(values, np.asarray([1.0, 1.0, 98.0]), 50) == 3.0
    assert residency.weighted_percentile(values, np.asarray([98.0, 1.0, 1.0]), 50) == 1.0
    assert residency.weighted_percentile(values[:0], values[:0], 50) == 0.0


def test_a_function_never_served_in_the_run_is_prefetched_from_its_history() -> None:
    """The gateway's driver prefetches any function the policy wants, onto the roomiest device
    when it has no last device. In the simulator too: a timer known only from its history is
    loaded before its first request of the run (control: the rule before, last device only)."""
    config = engine.SimConfig(
        devices=2,
        capacity_bytes=40 * 10**9,
        concurrency=2,
        eviction="lru",
        seed=1,
        warmup_fraction=0.0,
    )

    def first_requests_cold(unserved: bool) -> int:
        tiers = residency.TierConfig(
            host_capacity_bytes=100 * 10**9, tick_s=5.0, prefetch_unserved=unserved
        )
        sim = _timer_simulation(
            PredictivePolicy(device_price=1.0), config, tiers, functions=6, hours=0.5
        )
        report = sim.report()
        return round(report["cold_by_cause"]["first"] * report["weighted_requests"])

    # the phases are 150 s apart from 0: only the request at time 0 precedes the first tick
    assert first_requests_cold(False) == 6
    assert first_requests_cold(True) == 1


class _RecordingLoads(PredictivePolicy):
    """Ours at price 0 (it keeps every model, so loads must evict), noting which model each
    victim plan was asked to make room for."""

    def __init__(self) -> None:
        super().__init__(device_price=0.0)
        self.loading: list[str | None] = []

    def victim_plan(
        self, candidates: Any, need_bytes: int, now_s: float, *, loading: str | None = None
    ) -> list[str]:
        self.loading.append(loading)
        return super().victim_plan(candidates, need_bytes, now_s, loading=loading)


def test_the_simulator_tells_the_victim_plan_which_model_the_room_is_for() -> None:
    """Six 2 GB timers on one 5 GB device: loads must evict, and each plan is told the model
    it makes room for (ours prices its victims against that model's next request)."""
    policy = _RecordingLoads()
    _run(policy, prefetch=False, devices=1, capacity_gb=5)
    assert policy.loading, "no load had to evict"
    assert all(name is not None and name.startswith("fn-") for name in policy.loading)


class _ViewCheckedSimulation(residency.ResidencySimulation):
    """Counts, at every load that evicts, the models the device still holds after the eviction
    but the directory's view of it has lost (the next request for one is sent elsewhere and
    loads a second copy; one the view kept instead is sent here and misses)."""

    lost: int = 0
    evicting_loads: int = 0

    def _make_room(self, device: Any, size: int, request: Any) -> list[Any]:
        evicted = super()._make_room(device, size, request)
        if evicted:
            self.evicting_loads += 1
            view = {m for m, _, _ in self.directory.residents(device.key)}
            held = {e.key for e in device.cache.entries_lru()}
            self.lost += len(held - view)
        return evicted


def _view_checked(policy: Any, **tier_options: Any) -> _ViewCheckedSimulation:
    config = engine.SimConfig(
        devices=1, capacity_bytes=5 * 10**9, concurrency=2, eviction="lru", seed=1
    )
    tiers = residency.TierConfig(
        host_capacity_bytes=100 * 10**9, tick_s=5.0, prefetch=False, **tier_options
    )
    sim = _timer_simulation(
        policy, config, tiers, functions=6, hours=2.0, simulation=_ViewCheckedSimulation
    )
    sim.run()
    assert isinstance(sim, _ViewCheckedSimulation)
    return sim


def test_the_directory_notes_the_victims_the_device_evicts() -> None:
    """As at the gateway, ours' victims are planned at routing and the directory notes those
    gone: after every evicting load its view still holds every model the device holds. Planned
    when the load starts instead (the simulator before), the directory had noted its own LRU
    victims gone at routing, and lost models the device kept."""
    planner = _RecordingLoads()
    routed = _view_checked(planner)
    assert routed.evicting_loads > 10
    assert planner.loading, "ours never planned the victims"
    assert routed.lost == 0
    # the cheapest-set plan (lru_veto off): with the veto, ours' victims are mostly LRU's own,
    # which the directory noted, so the old simulator's loss would rarely show
    at_start = _view_checked(
        PredictivePolicy(device_price=0.0, lru_veto=False), route_victims=False
    )
    assert at_start.evicting_loads > 10
    assert at_start.lost > 0


def test_the_victims_planned_at_routing_leave_out_the_models_in_use() -> None:
    """A model with a request running or queued on the device is never planned as a victim
    (the device could not evict it, and the view would lose it): the plan takes the other."""
    config = engine.SimConfig(devices=1, capacity_bytes=4 * 10**9, concurrency=2, eviction="lru")

    def plan(pinned: str | None, **tier_options: Any) -> list[str]:
        tiers = residency.TierConfig(host_capacity_bytes=10**11, prefetch=False, **tier_options)
        sim = _timer_simulation(
            PredictivePolicy(device_price=0.0), config, tiers, functions=3, hours=0.1
        )
        device = sim.devices[0]
        for name in ("fn-0000", "fn-0001"):
            device.cache.put(name, None, size_bytes=2 * 10**9)
            sim.directory.note_loaded(device.key, name, size_bytes=2 * 10**9)
        if pinned is not None:
            device.cache.pin(pinned)  # a request for it is running there
        route = engine.RouteRequest(model="fn-0002", size_bytes=2 * 10**9)
        return list(sim._route_victims(device.key, route, []))

    [victim] = plan(None)
    other = "fn-0001" if victim == "fn-0000" else "fn-0000"
    assert plan(victim, spare_in_use=False) == [victim]
    assert plan(victim) == [other]


class _Wants(FixedKeepAlive):
    """Keeps everything and wants ``wanted`` prefetched (a stand-in for a prefetching policy)."""

    def __init__(self, wanted: str) -> None:
        super().__init__()
        self.may_prefetch = True
        self.wanted = wanted

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        return Advice(keep=True, prefetch=function == self.wanted, reason="test")


def _prefetch_into_a_fuller_view(**tier_options: Any) -> tuple[Any, set[str]]:
    """One 6 GB device holding two 2 GB models, with a third noted at routing in the view and
    not yet started (the view is full, the device has 2 GB free); the policy wants a fourth
    prefetched. Returns the simulation after one prefetch pass and the models the device
    holds that the view has lost."""
    config = engine.SimConfig(devices=1, capacity_bytes=6 * 10**9, concurrency=2, eviction="lru")
    tiers = residency.TierConfig(host_capacity_bytes=10**11, **tier_options)
    sim = _timer_simulation(_Wants("fn-0003"), config, tiers, functions=4, hours=0.1)
    device = sim.devices[0]
    for name in ("fn-0000", "fn-0001"):
        device.cache.put(name, None, size_bytes=2 * 10**9)
        sim.directory.note_loaded(device.key, name, size_bytes=2 * 10**9)
    sim.directory.note_dispatch(device.key, "fn-0002", size_bytes=2 * 10**9)
    sim._prefetch_pass(0.0, {"fn-0000", "fn-0001"})
    view = {m for m, _, _ in sim.directory.residents(device.key)}
    return sim, {e.key for e in device.cache.entries_lru()} - view


def test_a_prefetch_is_sent_only_where_the_directorys_view_has_room() -> None:
    """As the gateway's driver (``scheduler/prefetch.py: plan``), the simulator sends a
    prefetch only where the directory's view shows free bytes: here none, so none is sent and
    the view still holds every model the device holds. Sent where the device had free bytes
    (the simulator before), noting it made room in the view by evicting a model the device
    kept, and the next request for that one would be sent elsewhere to load a second copy."""
    sim, lost = _prefetch_into_a_fuller_view()
    assert sim.prefetch_started == 0 and sim.prefetch_failed == 1
    assert lost == set()
    sim, lost = _prefetch_into_a_fuller_view(prefetch_by_view=False)
    assert sim.prefetch_started == 1
    assert lost == {"fn-0000"}


def test_a_prefetch_the_view_has_room_for_runs_only_into_the_devices_free_bytes() -> None:
    """The view may show room the device lacks (a sync not yet seen): the node then refuses
    it (``no-room``), never evicts for it and never sends it to another device."""
    config = engine.SimConfig(devices=2, capacity_bytes=4 * 10**9, concurrency=2, eviction="lru")

    def prefetch(**tier_options: Any) -> Any:
        tiers = residency.TierConfig(host_capacity_bytes=10**11, **tier_options)
        sim = _timer_simulation(_Wants("fn-0002"), config, tiers, functions=3, hours=0.1)
        full = sim.devices[0]
        for name in ("fn-0000", "fn-0001"):
            full.cache.put(name, None, size_bytes=2 * 10**9)  # the view has not heard of them
        sim.last_device["fn-0002"] = full
        sim._prefetch_pass(0.0, {"fn-0000", "fn-0001"})
        assert {e.key for e in full.cache.entries_lru()} == {"fn-0000", "fn-0001"}
        return sim

    sim = prefetch()
    assert sim.prefetch_started == 0 and sim.prefetch_failed == 1
    assert sim.devices[1].cache.peek("fn-0002") is None
    # the simulator before sent it to the other device, which the gateway never chose
    assert prefetch(prefetch_by_view=False).devices[1].cache.peek("fn-0002") is not None


def test_a_prefetch_goes_to_the_roomiest_device_in_the_view_when_its_last_one_is_full() -> None:
    """The gateway's choice of device: the function's last device if the view has room there,
    else the device the view shows roomiest."""
    config = engine.SimConfig(devices=2, capacity_bytes=4 * 10**9, concurrency=2, eviction="lru")
    tiers = residency.TierConfig(host_capacity_bytes=10**11)
    sim = _timer_simulation(_Wants("fn-0002"), config, tiers, functions=3, hours=0.1)
    last, other = sim.devices
    for name in ("fn-0000", "fn-0001"):
        last.cache.put(name, None, size_bytes=2 * 10**9)
        sim.directory.note_loaded(last.key, name, size_bytes=2 * 10**9)
    sim.last_device["fn-0002"] = last
    sim._prefetch_pass(0.0, {"fn-0000", "fn-0001"})
    assert sim.prefetch_started == 1
    assert other.cache.peek("fn-0002") is not None
    assert set(sim.directory.holder_ids("fn-0002")) == {other.key}


def _device(key: str, *, running: int = 0, loading: bool = False) -> Any:
    device = engine._Device(
        key=key, cache=engine.ByteLRU(capacity_bytes=10**9), queue=engine.O3Queue()
    )
    device.running = running
    if loading:
        device.loading["m"] = []
    return device


def test_a_device_is_quiet_only_without_loads_and_requests_as_the_node_decides() -> None:
    """``device_quiet`` is the node's ``device_room``: a load or a request on the device makes
    it busy; a CUDA neighbour's request does not, a CPU neighbour's does (shared cores)."""
    gpu0, gpu1 = _device("node-0/gpu:0"), _device("node-0/gpu:1", running=1)
    assert residency.device_quiet(gpu0, [gpu0, gpu1])
    assert not residency.device_quiet(gpu1, [gpu0, gpu1])
    assert not residency.device_quiet(_device("node-0/gpu:2", loading=True), [gpu0])
    cpu0, cpu1 = _device("node-0/cpu:0"), _device("node-0/cpu:1", running=2)
    assert not residency.device_quiet(cpu0, [cpu0, cpu1, gpu0])
    assert residency.device_quiet(cpu0, [cpu0, gpu1])


def _one_device_sim(*, when_quiet: bool, waits: bool = False) -> Any:
    config = engine.SimConfig(
        devices=1, capacity_bytes=40 * 10**9, concurrency=2, eviction="lru", seed=1
    )
    tiers = residency.TierConfig(
        host_capacity_bytes=100 * 10**9,
        tick_s=5.0,
        prefetch_when_quiet=when_quiet,
        prefetch_waits=waits,
    )
    return _timer_simulation(
        PredictivePolicy(device_price=1.0), config, tiers, functions=3, hours=0.5
    )


def test_a_prefetch_sent_while_the_device_serves_a_request_is_skipped_as_busy() -> None:
    """The second wave's rule (``-busyskip``): a prefetch sent while a request is in flight on
    its device does not start (``busy``); control: the rule off (``-busyok``), it starts."""
    for when_quiet, started, busy in ((True, 0, 1), (False, 1, 0)):
        sim = _one_device_sim(when_quiet=when_quiet)
        device = sim.devices[0]
        device.running = 1  # a request being served
        sim._prefetch_at(device, "fn-0000")
        assert (sim.prefetch_started, sim.prefetch_busy) == (started, busy), when_quiet
        device.running = 0
        sim._prefetch_at(device, "fn-0001")  # quiet now (or the rule off): it starts
        assert sim.prefetch_started == started + 1


def test_a_node_runs_its_prefetches_one_at_a_time_each_checked_at_its_start() -> None:
    """Two prefetches sent in one tick: the second waits for the first (a load in flight
    would make its device busy), then starts when the first is done; had a request begun on
    the device meanwhile, it would be skipped as busy (``-busyskip``)."""
    for request_meanwhile in (False, True):
        sim = _one_device_sim(when_quiet=True)
        device = sim.devices[0]
        sim._prefetch_at(device, "fn-0000")
        sim._prefetch_at(device, "fn-0001")
        assert sim.prefetch_started == 1 and len(sim.node_queue["node-0"]) == 1
        job = sim.prefetches[(device.key, "fn-0000")]
        device.running = int(request_meanwhile)
        sim._prefetch_done(job, job.generation)
        assert sim.prefetch_started == (1 if request_meanwhile else 2)
        assert sim.prefetch_busy == int(request_meanwhile)
        assert not sim.node_queue["node-0"]


def test_the_busy_label_suffix_turns_the_node_rule_off() -> None:
    """``-busyok`` (bench/predict.py) is the simulator before the rule; the default has it."""
    sys.path.insert(0, str(BENCH))
    import predict

    assert predict.SIMULATOR_SUFFIXES["busyok"] == "prefetch_when_quiet"
    name, policy, _params, prefetch = predict.setting_for("hybrid-busyok")
    assert (name, policy, prefetch) == ("hybrid-busyok", "hybrid", True)


def _serving(sim: Any, device: Any, name: str) -> Any:
    """A request for ``name`` computing on ``device`` (its model resident and pinned)."""
    model = next(m for m in sim.catalogue if m.name == name)
    device.cache.reserve(name, size_bytes=model.profile.size_bytes)
    device.cache.commit(name, None)
    device.cache.pin(name)
    device.running, device.computing = 1, True
    return engine._Request(index=0, model=model, arrival_ms=0.0, infer_start_ms=0.0)


def test_a_prefetch_sent_while_the_device_serves_a_request_waits_and_starts_when_it_ends() -> None:
    """The third wave's rule (the default): a prefetch whose device serves a request waits at
    the head of the node's queue (neither started nor busy) and starts as soon as the request
    ends (``_infer_done`` wakes the node's worker); control: ``-busyskip`` drops it at once."""
    for waits in (True, False):
        sim = _one_device_sim(when_quiet=True, waits=waits)
        device = sim.devices[0]
        request = _serving(sim, device, "fn-0002")
        sim._prefetch_at(device, "fn-0000")
        assert (sim.prefetch_started, sim.prefetch_busy) == (0, int(not waits)), waits
        assert len(sim.node_queue["node-0"]) == int(waits)
        sim._infer_done(device, request)
        assert (sim.prefetch_started, sim.prefetch_waited) == (int(waits), int(waits)), waits
        assert not sim.node_queue["node-0"]


def test_a_waiting_prefetch_is_dropped_as_busy_one_tick_after_its_turn() -> None:
    """A prefetch whose device stays busy is not dropped by a wake-up before its bound (a
    load landing elsewhere on the node), and is dropped as ``busy`` at its bound (one
    ``tick_s``), the queue then moving on."""
    sim = _one_device_sim(when_quiet=True, waits=True)
    device = sim.devices[0]
    _serving(sim, device, "fn-0002")
    sim._prefetch_at(device, "fn-0000")
    (seq, give_up) = sim.node_waiting["node-0"]
    assert give_up == sim.now + 5000.0
    sim.now = give_up - 1.0
    sim._node_prefetches("node-0")  # woken, still busy, bound not reached: keeps waiting
    assert (sim.prefetch_busy, len(sim.node_queue["node-0"])) == (0, 1)
    sim.now = give_up
    sim._other_event(residency._PREFETCH_GIVE_UP, "node-0", seq)
    assert (sim.prefetch_started, sim.prefetch_busy) == (0, 1)
    assert not sim.node_queue["node-0"] and "node-0" not in sim.node_waiting


def test_the_busyskip_label_suffix_is_the_second_waves_rule() -> None:
    """``-busyskip`` (bench/predict.py) keeps the second wave's skip rule reproducible."""
    sys.path.insert(0, str(BENCH))
    import predict

    assert predict.SIMULATOR_SUFFIXES["busyskip"] == "prefetch_waits"
    name, policy, _params, prefetch = predict.setting_for("hybrid-busyskip")
    assert (name, policy, prefetch) == ("hybrid-busyskip", "hybrid", True)
