"""Tests of the routing policies (LB, LALB), the device table, and the estimates they use."""

from __future__ import annotations

import math
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.cache import ClusterDirectory, InsufficientCapacity
from gpufaas.scheduler import policy as policy_module
from gpufaas.scheduler.estimates import Estimates, EwmaLine
from gpufaas.scheduler.policy import (
    POLICIES,
    DeviceLoad,
    DeviceTable,
    LeastLoaded,
    LocalityAware,
    NoDevice,
    RouteRequest,
    make_policy,
)

MB = 1_000_000


def cluster(*keys: str, capacity: int = 300 * MB) -> ClusterDirectory:
    directory = ClusterDirectory()
    for key in keys:
        directory.add_device(key, capacity_bytes=capacity, node=key.split("/")[0])
    return directory


def estimates(*, load_ms: float = 100.0, infer_ms: float = 5.0) -> Estimates:
    """Estimates that have seen every model load in ``load_ms`` and run in ``infer_ms``."""
    est = Estimates()
    for model in ("m", "hot", "cold", "x", "y", "z"):
        est.observe_load(model, size_bytes=100 * MB, load_ms=load_ms)
        est.observe_infer(model, infer_ms=infer_ms)
    return est


def loads(**waits: float) -> list[DeviceLoad]:
    return [
        DeviceLoad(key=f"n/{name}", outstanding=int(wait // 5), queue_ms=wait)
        for name, wait in waits.items()
    ]


REQUEST = RouteRequest(model="m", size_bytes=100 * MB)


# -- LB ----------------------------------------------------------------------------------------


def test_least_loaded_picks_the_fewest_outstanding() -> None:
    devices = [DeviceLoad("a", 3), DeviceLoad("b", 1), DeviceLoad("c", 2)]
    assert LeastLoaded(seed=0).choose(REQUEST, devices, ClusterDirectory()).device == "b"


def test_least_loaded_spreads_ties_and_ignores_locality() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    policy = LeastLoaded(seed=1)
    chosen = {policy.choose(REQUEST, loads(a=0, b=0), directory).device for _ in range(50)}
    assert chosen == {"n/a", "n/b"}


def test_least_loaded_with_a_table_matches_the_list() -> None:
    devices = [DeviceLoad("a", 3), DeviceLoad("b", 1), DeviceLoad("c", 2)]
    assert (
        LeastLoaded(seed=0).choose(REQUEST, DeviceTable(devices), ClusterDirectory()).device == "b"
    )


@pytest.mark.parametrize("name", ["lb", "lalb", "lalb-o3"])
def test_no_devices_raise_no_device(name: str) -> None:
    with pytest.raises(NoDevice):
        make_policy(name).choose(REQUEST, [], ClusterDirectory())


def test_make_policy_names_and_dispatch_modes() -> None:
    assert sorted(POLICIES) == ["lalb", "lalb-o3", "lb"]
    assert [make_policy(n).dispatch for n in ("lb", "lalb", "lalb-o3")] == ["fifo", "fifo", "o3"]
    assert make_policy("lalb-o3").name == "lalb-o3"
    shared = Estimates()
    policy = make_policy("lalb", estimates=shared)
    assert isinstance(policy, LocalityAware) and policy.estimates is shared
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")


# -- LALB --------------------------------------------------------------------------------------


def test_lalb_goes_where_the_model_is() -> None:
    directory = cluster("n/a", "n/b", "n/c")
    directory.note_loaded("n/b", "m", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates())
    decision = policy.choose(REQUEST, loads(a=0, b=30, c=0), directory)
    assert decision.device == "n/b"
    assert decision.reason == "holder"


def test_lalb_joins_a_load_in_progress() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_dispatch("n/a", "m", size_bytes=100 * MB)  # loading there
    policy = LocalityAware(seed=0, estimates=estimates())
    assert policy.choose(REQUEST, loads(a=20, b=0), directory).device == "n/a"


def test_lalb_loads_elsewhere_when_waiting_costs_more_than_loading() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates(load_ms=100))
    decision = policy.choose(REQUEST, loads(a=150, b=10), directory)
    assert decision.device == "n/b"
    assert decision.reason == "replicate"
    assert decision.holder_cost_ms == 150 and decision.load_cost_ms == pytest.approx(110)
    # Just below the break-even point it stays.
    assert policy.choose(REQUEST, loads(a=105, b=10), directory).device == "n/a"


def test_lalb_counts_the_reload_of_a_popular_only_copy_it_would_evict() -> None:
    directory = cluster("n/a", "n/b", capacity=150 * MB)
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    directory.note_loaded("n/b", "hot", size_bytes=100 * MB)  # b must evict "hot" to load m
    est = estimates(load_ms=100)
    for _ in range(50):
        est.observe_request("hot")
    est.observe_request("m")
    policy = LocalityAware(seed=0, estimates=est, victim_weight=1.0)
    # Waiting 150 ms at a beats 10 + 100 ms at b once b's victim (~100 ms to reload) counts.
    assert policy.choose(REQUEST, loads(a=150, b=10), directory).device == "n/a"
    without = LocalityAware(seed=0, estimates=est, victim_weight=0.0)
    assert without.choose(REQUEST, loads(a=150, b=10), directory).device == "n/b"


def test_lalb_loads_a_new_model_on_the_least_loaded_device_that_can_make_room() -> None:
    directory = cluster("n/a", "n/b", "n/c", capacity=150 * MB)
    directory.note_dispatch("n/a", "x", size_bytes=100 * MB)  # a: full with a pinned load
    policy = LocalityAware(seed=0, estimates=estimates())
    decision = policy.choose(REQUEST, loads(a=0, b=40, c=20), directory)
    assert decision.device == "n/c"
    assert decision.reason == "load"


def test_lalb_prefers_free_room_to_evicting() -> None:
    directory = cluster("n/a", "n/b", capacity=150 * MB)
    directory.note_loaded("n/a", "x", size_bytes=100 * MB)
    est = estimates()
    est.observe_request("x")
    policy = LocalityAware(seed=0, estimates=est)
    for _ in range(10):
        assert policy.choose(REQUEST, loads(a=0, b=0), directory).device == "n/b"


def test_lalb_falls_back_to_the_least_loaded_when_nothing_can_make_room() -> None:
    directory = cluster("n/a", "n/b", capacity=150 * MB)
    directory.note_dispatch("n/a", "x", size_bytes=100 * MB)
    directory.note_dispatch("n/b", "y", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates())
    decision = policy.choose(REQUEST, loads(a=30, b=10), directory)
    assert decision.device == "n/b"
    assert decision.reason == "fallback"


def test_lalb_ignores_holders_the_caller_left_out() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates())
    assert policy.choose(REQUEST, loads(b=50), directory).device == "n/b"


def test_lalb_counts_a_holders_free_slot_not_the_loads_running_there() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates(load_ms=100))
    # n/a is busy loading something big (300 ms of work per slot) but has a free slot: a
    # request for m, which it holds, starts there at once, so copying m to n/b is a waste.
    busy_with_a_free_slot = DeviceLoad("n/a", 1, queue_ms=300.0, hit_wait_ms=0.0)
    for devices in (
        [busy_with_a_free_slot, DeviceLoad("n/b", 0, queue_ms=0.0)],
        DeviceTable([busy_with_a_free_slot, DeviceLoad("n/b", 0, queue_ms=0.0)]),
    ):
        decision = policy.choose(REQUEST, devices, directory)
        assert decision.device == "n/a"
        assert decision.reason == "holder"
    # Every slot busy: the wait is real, and a copy elsewhere is cheaper.
    full = [DeviceLoad("n/a", 2, queue_ms=300.0), DeviceLoad("n/b", 0, queue_ms=0.0)]
    assert policy.choose(REQUEST, DeviceTable(full), directory).device == "n/b"
    # A load still goes where the copy work is least, free slot or not.
    cold = RouteRequest(model="cold", size_bytes=100 * MB)
    assert (
        policy.choose(cold, DeviceTable([busy_with_a_free_slot, full[1]]), directory).device
        == "n/b"
    )


def test_lalb_without_queue_estimates_uses_outstanding_times_inference() -> None:
    directory = cluster("n/a", "n/b")
    directory.note_loaded("n/a", "m", size_bytes=100 * MB)
    policy = LocalityAware(seed=0, estimates=estimates(load_ms=100, infer_ms=5))
    # 30 outstanding x 5 ms = 150 ms > 100 ms load: replicate; 10 x 5 = 50 ms: stay.
    assert (
        policy.choose(REQUEST, [DeviceLoad("n/a", 30), DeviceLoad("n/b", 0)], directory).device
        == "n/b"
    )
    assert (
        policy.choose(REQUEST, [DeviceLoad("n/a", 10), DeviceLoad("n/b", 0)], directory).device
        == "n/a"
    )


def test_lalb_value_victims_spare_the_popular_model() -> None:
    directory = cluster("n/a", capacity=250 * MB)
    directory.note_loaded("n/a", "hot", size_bytes=100 * MB)  # least recently used
    directory.note_loaded("n/a", "cold", size_bytes=100 * MB)
    est = estimates()
    for _ in range(20):
        est.observe_request("hot")
    lru = LocalityAware(seed=0, estimates=est, victims="lru")
    assert lru.choose(REQUEST, loads(a=0), directory).victims == ("hot",)
    value = LocalityAware(seed=0, estimates=est, victims="value")
    assert value.choose(REQUEST, loads(a=0), directory).victims == ("cold",)


def test_lalb_samples_holders_of_a_widely_replicated_model() -> None:
    keys = [f"n/{i}" for i in range(40)]
    directory = cluster(*keys)
    for key in keys:
        directory.note_loaded(key, "m", size_bytes=100 * MB)
    table = DeviceTable([DeviceLoad(k, 0, queue_ms=1.0) for k in keys])
    policy = LocalityAware(seed=0, estimates=estimates(), holder_sample=4)
    chosen = {policy.choose(REQUEST, table, directory).device for _ in range(200)}
    assert len(chosen) > 20  # spread over many holders, never a non-holder
    assert chosen <= set(keys)


@settings(max_examples=60, deadline=None)
@given(
    waits=st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=6),
    held=st.lists(st.booleans(), min_size=6, max_size=6),
    table=st.booleans(),
)
def test_lalb_always_picks_one_of_the_devices(
    waits: list[float], held: list[bool], table: bool
) -> None:
    keys = [f"n/{i}" for i in range(len(waits))]
    directory = cluster(*keys, "n/gone")
    directory.note_loaded("n/gone", "m", size_bytes=100 * MB)
    for key, holds in zip(keys, held, strict=False):
        if holds:
            directory.note_loaded(key, "m", size_bytes=100 * MB)
    devices = [DeviceLoad(k, int(w // 5), queue_ms=w) for k, w in zip(keys, waits, strict=True)]
    policy = LocalityAware(seed=0, estimates=estimates())
    decision = policy.choose(REQUEST, DeviceTable(devices) if table else devices, directory)
    assert decision.device in keys
    holders = [k for k, h in zip(keys, held, strict=False) if h]
    if holders and decision.reason == "holder":
        assert decision.device in holders


# -- the device table --------------------------------------------------------------------------


def test_device_table_is_a_sequence_of_loads() -> None:
    table = DeviceTable([DeviceLoad("a", 1, 2.0), DeviceLoad("b", 3)])
    assert len(table) == 2 and "a" in table and "z" not in table
    assert list(table) == [DeviceLoad("a", 1, 2.0), DeviceLoad("b", 3, 0.0)]
    assert table[-1] == DeviceLoad("b", 3, 0.0) and table[0:1] == [DeviceLoad("a", 1, 2.0)]
    table.adjust("a", outstanding=2, queue_ms=-5.0)  # waits never go below zero
    table.update("b", queue_ms=7.5)
    assert table[0] == DeviceLoad("a", 3, 0.0) and table[1] == DeviceLoad("b", 3, 7.5)
    for i in range(20):  # grows past its initial arrays
        table.add(f"x{i}", outstanding=i)
    table.remove("a")  # the last device moves into the gap
    assert table.position("a") is None and table.keys[0] == "x19" and table[0].outstanding == 19
    assert len(table) == 21


def test_device_table_refuses_duplicates_and_unknown_devices() -> None:
    table = DeviceTable([DeviceLoad("a", 0)])
    with pytest.raises(ValueError, match="already"):
        table.add("a")
    with pytest.raises(KeyError, match="'z'"):
        table.adjust("z", outstanding=1)
    with pytest.raises(IndexError):
        table[5]
    with pytest.raises(ValueError):
        table.outstanding[0] = 9  # a read-only view


# -- estimates ---------------------------------------------------------------------------------


def test_estimates_start_from_priors_and_follow_measurements() -> None:
    est = Estimates(prior_load_overhead_ms=1.0, prior_load_ms_per_byte=1e-6, prior_infer_ms=3.0)
    assert est.load_ms("m", size_bytes=1_000_000) == pytest.approx(2.0)
    assert est.infer_ms("m") == 3.0
    est.observe_infer("m", infer_ms=10.0)
    assert est.infer_ms("m") == 10.0 and est.infer_ms("other") == 10.0  # all-model average
    est.observe_infer("m", infer_ms=20.0)
    assert est.infer_ms("m") == pytest.approx(12.0)  # alpha 0.2
    est.observe_load("m", size_bytes=1_000_000, load_ms=50.0)
    assert est.load_ms("m", size_bytes=1_000_000) == 50.0
    assert est.service_ms("m", size_bytes=1, resident=False) == pytest.approx(62.0)
    est.forget("m")
    assert est.measured_load_ms("m") is None


def test_unseen_models_get_load_times_from_the_fit_over_sizes() -> None:
    est = Estimates()
    for _ in range(5):
        est.observe_load("small", size_bytes=10 * MB, load_ms=12.0)
        est.observe_load("big", size_bytes=100 * MB, load_ms=102.0)
    assert est.load_ms("new", size_bytes=50 * MB) == pytest.approx(52.0, rel=0.05)


def test_ewma_line_with_one_size_scales_with_bytes() -> None:
    line = EwmaLine()
    assert line.predict(1.0) is None
    line.update(10.0, 5.0)
    assert line.coefficients() is None and line.predict(20.0) == pytest.approx(10.0)


def test_request_shares_decay_with_later_requests() -> None:
    est = Estimates(popularity_half_life=10)
    est.observe_request("a")
    first = est.share("a")
    for _ in range(10):
        est.observe_request("b")
    assert est.share("a") == pytest.approx(first / 2)
    assert est.share("b") > est.share("a") and est.share("never") == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.observe_load("m", size_bytes=1, load_ms=-1.0), "load_ms"),
        (lambda e: e.observe_infer("m", infer_ms=math.nan), "infer_ms"),
        (lambda e: e.observe_load("m", size_bytes=-5, load_ms=1.0), "size_bytes"),
    ],
)
def test_estimates_refuse_bad_measurements(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(Estimates())  # type: ignore[operator]


def test_estimates_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Estimates(alpha=0)
    with pytest.raises(ValueError, match="half_life"):
        Estimates(popularity_half_life=0)


def test_device_table_least_waiting_lists_the_least_waits() -> None:
    table = DeviceTable([DeviceLoad(f"d{i}", 0, float(w)) for i, w in enumerate([5, 1, 3, 1, 9])])
    pairs = table.least_waiting(at_least=2)
    assert sorted(pairs)[:2] == [(1.0, 1), (1.0, 3)]
    assert table.least_wait() == 1.0
    table.update("d1", queue_ms=0.5)
    table.adjust("d3", queue_ms=10.0)
    assert sorted(table.least_waiting(at_least=2))[:2] == [(0.5, 1), (3.0, 2)]
    assert table.least_wait() == 0.5
    assert DeviceTable().least_wait() == math.inf and DeviceTable().least_waiting(at_least=3) == []


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "update", "adjust", "ask"]),
            st.integers(0, 40),
            st.sampled_from([0.0, 0.0, 1.0, 2.5, 3.0, 7.0, 50.0, -4.0]),
            st.integers(1, 6),
        ),
        max_size=80,
    )
)
def test_device_table_least_waiting_after_any_changes(
    steps: list[tuple[str, int, float, int]],
) -> None:
    table = DeviceTable()
    waits: dict[str, float] = {}  # what the table should hold
    for kind, n, wait, at_least in steps:
        key = f"d{n}"
        if kind == "add" and key not in waits:
            waits[key] = max(wait, 0.0)
            table.add(key, queue_ms=waits[key])
        elif kind == "remove" and key in waits:
            del waits[key]
            table.remove(key)
        elif kind == "update" and key in waits:
            waits[key] = max(wait, 0.0)
            table.update(key, queue_ms=waits[key])
        elif kind == "adjust" and key in waits:
            waits[key] = max(0.0, waits[key] + wait)
            table.adjust(key, queue_ms=wait)
        pairs = table.least_waiting(at_least=at_least)
        listed = {table.keys[i]: w for w, i in pairs}
        assert len(listed) == len(pairs) >= min(at_least, len(waits))
        assert all(waits[k] == w for k, w in listed.items())  # the current waits
        others = [w for k, w in waits.items() if k not in listed]
        assert not others or not listed or min(others) >= max(listed.values())
        assert table.least_wait() == min(waits.values(), default=math.inf)
        assert {d.key: d.queue_ms for d in table} == waits


# -- LALB against a plain statement of its rule ------------------------------------------------


def reference_choice(
    request: RouteRequest,
    waits: dict[str, float],
    directory: ClusterDirectory,
    est: Estimates,
    *,
    victims: str,
    candidates: int = 4,
    victim_weight: float = 2.0,
    staged: frozenset[str] = frozenset(),
    fetch_ms_per_byte: float = 1 / 2e6,
    hit_waits: dict[str, float] | None = None,
) -> tuple[str, str, list[str]]:
    """``(device, reason, victims)`` by the rule in docs/scheduling.md, written for clarity:
    every device scanned, every candidate's plan made (waits distinct, no holder sampling).
    ``staged``: the nodes holding a host-tier or disk copy of the requested model.
    ``hit_waits``: a holder's wait for a request needing no load (default: ``waits``)."""
    model, size = request.model, request.size_bytes
    load_ms = est.load_ms(model, size_bytes=size)
    holder_ids = set(directory.holder_ids(model))
    holders = [k for k in waits if k in holder_ids]
    hit = waits if hit_waits is None else hit_waits
    holder = min(holders, key=hit.__getitem__, default=None)
    holder_cost = hit[holder] if holder is not None else math.inf
    if holder is not None and holder_cost <= min(waits.values()) + load_ms:
        return holder, "holder", []

    def value(m: str, s: int) -> float:  # load times snapped (docs, "Ties")
        return est.share(m) * est.victim_load_ms(m, size_bytes=s)

    def cheapest(key: str) -> list[str]:
        need = size - directory.free_bytes(key)
        residents = [(m, s) for m, state, s in directory.residents(key) if state == "resident"]
        singles = [(m, s) for m, s in residents if s >= need]
        if singles:
            return [min(singles, key=lambda ms: value(*ms))[0]]
        chosen, freed = [], 0
        for m, s in sorted(residents, key=lambda ms: value(*ms) / max(ms[1], 1)):
            if freed >= need:
                break
            chosen.append((m, s))
            freed += s
        kept = []
        for m, s in reversed(chosen):
            if freed - s >= need:
                freed -= s
            else:
                kept.append(m)
        return kept[::-1]

    def eviction_cost(key: str, evicted: list[str]) -> float:
        sizes = {m: s for m, _, s in directory.residents(key)}
        wanted = est.share(model)
        cost = 0.0
        for v in evicted:
            share = est.share(v)
            if share <= 0:
                continue
            again = 1 - math.exp(-share / wanted) if wanted > 0 else 1.0
            sole = len(directory.holder_ids(v)) <= 1
            cost += est.victim_load_ms(v, size_bytes=sizes[v]) * again * (1.0 if sole else 0.5)
        return victim_weight * cost

    def fetch(key: str) -> float:  # the artifact read, where a staged copy elsewhere is not
        return 0.0 if not staged or directory.node(key) in staged else size * fetch_ms_per_byte

    def plan_of(key: str) -> list[str] | None:
        try:
            plan = directory.plan_dispatch(key, model, size_bytes=size)
        except InsufficientCapacity:
            return None
        return cheapest(key) if plan and victims == "value" else plan

    by_wait = [k for k in sorted(waits, key=waits.__getitem__) if k not in holder_ids]
    able = [(k, plan) for k in by_wait if (plan := plan_of(k)) is not None]
    tried = able[:candidates]  # the candidates least-loaded that can make room ...
    if staged and not any(directory.node(k) in staged for k, _ in tried):
        # ... and the least-loaded one on a node with a staged copy
        tried += [(k, plan) for k, plan in able if directory.node(k) in staged][:1]
    best: tuple[float, str, list[str]] | None = None
    for key, plan in tried:
        cost = waits[key] + load_ms + fetch(key) + eviction_cost(key, plan)
        if best is None or cost < best[0] or (cost == best[0] and key < best[1]):
            best = (cost, key, plan)  # equal cost: the smallest key
    if best is None:
        if holder is not None:
            return holder, "holder", []
        return min(waits, key=waits.__getitem__), "fallback", []
    if holder is not None and holder_cost <= best[0]:
        return holder, "holder", []
    return best[1], "load" if holder is None else "replicate", best[2]


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    n_devices=st.integers(1, 10),
    victims=st.sampled_from(["lru", "value"]),
    candidates=st.sampled_from([1, 2, 4]),
    victim_weight=st.sampled_from([0.0, 2.0, 30.0]),
    spread=st.sampled_from([5.0, 50.0, 500.0]),
    table=st.booleans(),
)
def test_lalb_decides_as_the_documented_rule(
    data: st.DataObject,
    n_devices: int,
    victims: str,
    candidates: int,
    victim_weight: float,
    spread: float,
    table: bool,
) -> None:
    keys = [f"n{i % 3}/{i}" for i in range(n_devices)]  # up to three nodes
    directory = cluster(*keys, capacity=10 * MB)
    models = [f"m{i}" for i in range(10)]  # "new" is asked for but held nowhere
    sizes = {m: data.draw(st.sampled_from([1, 2, 3, 5]), label=m) * MB for m in [*models, "new"]}
    est = Estimates()
    for m in models:
        if data.draw(st.booleans(), label=f"measured {m}"):
            est.observe_load(m, size_bytes=sizes[m], load_ms=data.draw(st.floats(0.5, 80)))
    for m in data.draw(st.lists(st.sampled_from([*models, "new"]), max_size=60), label="asked"):
        est.observe_request(m)
    for key in keys:  # random residents, mostly full, a few still loading (pinned)
        for m in data.draw(st.lists(st.sampled_from(models), min_size=3, max_size=8, unique=True)):
            if directory.free_bytes(key) >= sizes[m]:
                if data.draw(st.sampled_from([False, False, False, True]), label="loading"):
                    directory.note_dispatch(key, m, size_bytes=sizes[m])
                else:
                    directory.note_loaded(key, m, size_bytes=sizes[m])
    drawn = data.draw(
        st.lists(st.floats(0, spread), min_size=n_devices, max_size=n_devices, unique=True),
        label="waits",
    )
    waits = dict(zip(keys, drawn, strict=True))  # distinct: the order of devices is defined
    model = data.draw(st.sampled_from(["new", "new", *models]), label="request")
    request = RouteRequest(model=model, size_bytes=sizes[model])
    loads_ = [DeviceLoad(k, 0, queue_ms=w) for k, w in waits.items()]
    staged = frozenset(data.draw(st.sets(st.sampled_from(["n0", "n1", "n2"])), label="staged"))
    fetch_ms_per_byte = data.draw(st.sampled_from([0.0, 1 / 2e6, 1e-4]), label="fetch")
    policy = LocalityAware(
        seed=0,
        estimates=est,
        victims=victims,  # type: ignore[arg-type]
        candidates=candidates,
        victim_weight=victim_weight,
        holder_sample=64,  # no sampling: every holder is looked at
        staged=lambda m: staged if m == model else frozenset(),
        fetch_ms_per_byte=fetch_ms_per_byte,
    )
    decision = policy.decide(request, DeviceTable(loads_) if table else loads_, directory)
    expected = reference_choice(
        request,
        waits,
        directory,
        est,
        victims=victims,
        candidates=candidates,
        victim_weight=victim_weight,
        staged=staged,
        fetch_ms_per_byte=fetch_ms_per_byte,
    )
    assert (decision.device, decision.reason, list(decision.victims)) == expected


# -- the search for a device to load on, past many holders ---------------------------------------
# A widely replicated model fills the least-waiting devices with its holders; the walk skips
# them in bulk (LocalityAware._non_holders). These tests restate the walk as a plain scan, with
# the bulk thresholds forced low and high so that every path of the walk is taken.


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 160),
    density=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    direct=st.sampled_from([0, 3, 128]),
    before_bulk=st.sampled_from([1, 8]),
    candidates=st.sampled_from([1, 4]),
    as_table=st.booleans(),
)
def test_the_candidate_walk_is_the_non_holders_by_wait(
    data: st.DataObject,
    n: int,
    density: float,
    direct: int,
    before_bulk: int,
    candidates: int,
    as_table: bool,
) -> None:
    # Waits with many ties (at the table's bound too) and some devices busy forever.
    value = st.one_of(st.sampled_from([0.0, 1.0, 2.5, 2.5, 10.0, math.inf]), st.floats(0, 20))
    waits = data.draw(st.lists(value, min_size=n, max_size=n), label="waits")
    table = DeviceTable([DeviceLoad(f"d{i}", 0, queue_ms=w) for i, w in enumerate(waits)])
    churn = st.tuples(st.integers(0, n - 1), st.sampled_from([-5.0, -1.0, 2.5, 5.0]), st.booleans())
    for i, delta, ask in data.draw(st.lists(churn, max_size=40), label="churn"):
        table.adjust(f"d{i}", queue_ms=delta)  # the table's least-waiting set goes partly stale
        if ask:
            table.least_waiting(at_least=candidates)
    rand = data.draw(st.randoms(use_true_random=False), label="holders")
    holders = {k for k in table.keys if rand.random() < density}
    load_ms = data.draw(st.sampled_from([0.0, 1.0, 7.5]), label="load_ms")
    waits = table.queue_ms.tolist()
    exact = [w + load_ms for w in waits if math.isfinite(w)]  # bounds tied with a floor
    bound = data.draw(
        st.one_of(st.just(math.inf), st.sampled_from(exact or [0.0]), st.floats(0, 30)),
        label="bound",
    )
    policy = LocalityAware(seed=0, candidates=candidates)
    devices = table if as_table else list(table)
    columns = policy_module._columns(devices, per_request_ms=1.0)
    with (
        mock.patch.object(policy_module, "_DIRECT_WALK", direct),
        mock.patch.object(policy_module, "_HOLDERS_BEFORE_BULK", before_bulk),
    ):
        walk = list(policy._non_holders(columns, holders, load_ms=load_ms, bound=bound))

    keys = table.keys
    plain = sorted(  # the plain scan: every device not holding the model, by wait
        (i for i in range(len(keys)) if keys[i] not in holders and math.isfinite(waits[i])),
        key=waits.__getitem__,
    )
    assert len(set(walk)) == len(walk), "a device came twice"
    assert not [i for i in walk if keys[i] in holders], "a holder was not skipped"
    assert [waits[i] for i in walk] == [waits[i] for i in plain][: len(walk)], "out of order"
    within = {i for i in plain if waits[i] + load_ms <= bound}
    assert within <= set(walk), "a device that could beat the bound was skipped"


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    n_devices=st.integers(25, 70),
    density=st.sampled_from([0.5, 0.9, 1.0]),
    victims=st.sampled_from(["lru", "value"]),
    candidates=st.sampled_from([1, 4]),
    spread=st.sampled_from([20.0, 200.0]),
)
def test_lalb_decides_as_the_documented_rule_past_many_holders(
    data: st.DataObject,
    n_devices: int,
    density: float,
    victims: str,
    candidates: int,
    spread: float,
) -> None:
    # A hot model on most devices; a holder's wait for a hit (a free slot) is below its queue
    # wait, so holders sit among the devices a load elsewhere could beat, in wait order.
    keys = [f"n{i % 8}/{i}" for i in range(n_devices)]
    directory = cluster(*keys, capacity=10 * MB)
    models = [f"m{i}" for i in range(12)]
    rand = data.draw(st.randoms(use_true_random=False), label="layout")
    sizes = {m: rand.choice([1, 2, 3, 5]) * MB for m in models}
    est = Estimates()
    for m in models:
        est.observe_load(m, size_bytes=sizes[m], load_ms=rand.uniform(0.5, 40))
    for _ in range(60):
        est.observe_request(rand.choice(models[:4]))
    for key in keys:
        if rand.random() < density:
            directory.note_loaded(key, "m0", size_bytes=sizes["m0"])
        for m in rand.sample(models[1:], 6):
            if directory.free_bytes(key) >= sizes[m]:
                if rand.random() < 0.2:
                    directory.note_dispatch(key, m, size_bytes=sizes[m])  # loading: pinned
                else:
                    directory.note_loaded(key, m, size_bytes=sizes[m])
    unique = st.lists(st.floats(0, spread), min_size=n_devices, max_size=n_devices, unique=True)
    waits = dict(zip(keys, data.draw(unique, label="waits"), strict=True))
    hits = dict(zip(keys, data.draw(unique, label="hit waits"), strict=True))
    table = DeviceTable([DeviceLoad(k, 0, queue_ms=spread * 2) for k in keys])
    for key in rand.sample(keys, len(keys)):  # the final waits, set in a random order
        table.update(key, queue_ms=waits[key], hit_wait_ms=hits[key])
        if rand.random() < 0.3:
            table.least_waiting(at_least=candidates)
    model = "m0" if rand.random() < 0.8 else rand.choice(models)
    request = RouteRequest(model=model, size_bytes=sizes[model])
    policy = LocalityAware(
        seed=0,
        estimates=est,
        victims=victims,  # type: ignore[arg-type]
        candidates=candidates,
        holder_sample=1000,  # no sampling: every holder is looked at
    )
    decision = policy.decide(request, table, directory)
    expected = reference_choice(
        request, waits, directory, est, victims=victims, candidates=candidates, hit_waits=hits
    )
    assert (decision.device, decision.reason, list(decision.victims)) == expected


def test_lalb_never_picks_a_holder_that_left_the_sampled_set() -> None:
    keys = [f"n/{i}" for i in range(40)]
    directory = cluster(*keys)
    for key in keys:
        directory.note_loaded(key, "m", size_bytes=100 * MB)
    table = DeviceTable([DeviceLoad(k, 0, queue_ms=1.0) for k in keys])
    policy = LocalityAware(seed=0, estimates=estimates(), holder_sample=4)
    for key in keys[:30]:  # holders leave one by one (the set keeps shrinking), or swap
        directory.note_evicted(key, "m")
        for _ in range(5):
            chosen = policy.choose(REQUEST, table, directory).device
            assert chosen in directory.holder_ids("m")
        directory.note_loaded(key, "other", size_bytes=MB)
    for key, new in zip(keys[30:35], keys[:5], strict=True):  # same size, other members
        directory.note_evicted(key, "m")
        directory.note_loaded(new, "m", size_bytes=100 * MB)
        for _ in range(5):
            assert policy.choose(REQUEST, table, directory).device in directory.holder_ids("m")


def test_lalb_refuses_unknown_victim_modes() -> None:
    with pytest.raises(ValueError, match="victims"):
        LocalityAware(victims="random")  # type: ignore[arg-type]


@pytest.mark.parametrize("victims", ["lru", "value"])
def test_lalb_charges_half_for_evicting_a_model_held_elsewhere_too(victims: str) -> None:
    directory = cluster("n/a", "n/b", "n/c", capacity=150 * MB)
    directory.note_loaded("n/a", "x", size_bytes=100 * MB)  # x: only copy
    directory.note_loaded("n/b", "y", size_bytes=100 * MB)  # y: also on c
    directory.note_loaded("n/c", "y", size_bytes=100 * MB)
    est = estimates(load_ms=100)
    for _ in range(10):
        est.observe_request("x")
        est.observe_request("y")
    est.observe_request("m")
    policy = LocalityAware(seed=0, estimates=est, victims=victims, victim_weight=1.0)  # type: ignore[arg-type]
    # a waits 1 ms less than b, but evicting the only copy of x costs twice what y does.
    decision = policy.choose(REQUEST, loads(a=9, b=10, c=500), directory)
    assert decision.device == "n/b"
    assert decision.victims == ("y",)
    assert decision.load_cost_ms == pytest.approx(
        10 + 100 + 0.5 * 100 * (1 - math.exp(-10)), rel=0.01
    )


@pytest.mark.parametrize("victims", ["lru", "value"])
def test_lalb_looks_past_many_devices_that_cannot_make_room(victims: str) -> None:
    keys = [f"n/{i:02}" for i in range(60)]
    directory = cluster(*keys, capacity=150 * MB)
    for key in keys[:40]:  # the 40 least loaded are full of loads in progress (pinned)
        directory.note_dispatch(key, "x", size_bytes=100 * MB)
    waits = {key: float(i) for i, key in enumerate(keys)}
    table = DeviceTable([DeviceLoad(k, 0, queue_ms=w) for k, w in reversed(waits.items())])
    policy = LocalityAware(seed=0, estimates=estimates(), victims=victims)  # type: ignore[arg-type]
    decision = policy.choose(REQUEST, table, directory)
    assert decision.device == "n/40"
    assert decision.reason == "load"
    for key in keys[40:]:  # and when nothing can: the least-loaded device
        directory.note_dispatch(key, "x", size_bytes=100 * MB)
    decision = policy.choose(REQUEST, table, directory)
    assert decision.device == "n/00"
    assert decision.reason == "fallback"


def test_a_request_not_observed_leaves_the_models_share_alone() -> None:
    # A replica routes a request a peer forwarded with observe=False: it was counted there.
    directory = cluster("n/0", "n/1")
    est = Estimates()
    policy = LocalityAware(seed=0, estimates=est)
    loads_ = [DeviceLoad("n/0", 0), DeviceLoad("n/1", 0)]
    policy.choose(RouteRequest(model="m", size_bytes=MB), loads_, directory, observe=False)
    assert est.share("m") == 0.0
    policy.choose(RouteRequest(model="m", size_bytes=MB), loads_, directory)
    assert est.share("m") > 0.0
