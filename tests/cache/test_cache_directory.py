"""Tests of gpufaas.cache.directory.ClusterDirectory: the scheduler's view of model placement."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gpufaas.cache import (
    ClusterDirectory,
    DeviceExists,
    InsufficientCapacity,
    InvalidReport,
    InvalidSize,
    Residency,
    UnknownDevice,
)

LOADING, RESIDENT = Residency.LOADING, Residency.RESIDENT


def directory(**capacities: int) -> ClusterDirectory:
    d = ClusterDirectory()
    for device_id, capacity in capacities.items():
        d.add_device(device_id, capacity_bytes=capacity, node=f"node-{device_id}")
    return d


def test_dispatch_marks_loading_then_loaded_marks_resident() -> None:
    d = directory(gpu0=10, gpu1=10)
    assert d.note_dispatch("gpu0", "m", size_bytes=4) == []
    assert d.holders("m") == {"gpu0": LOADING}
    assert d.residents("gpu0") == [("m", LOADING, 4)]
    d.note_loaded("gpu0", "m", size_bytes=5)  # the measured size wins
    assert d.holders("m") == {"gpu0": RESIDENT}
    assert (d.used_bytes("gpu0"), d.free_bytes("gpu0"), d.capacity_bytes("gpu0")) == (5, 5, 10)
    assert d.holders("other") == {}


def test_dispatch_predicts_lru_victims_and_spares_loading_models() -> None:
    d = directory(gpu0=10)
    d.note_dispatch("gpu0", "a", size_bytes=4)
    d.note_loaded("gpu0", "a", size_bytes=4)
    d.note_dispatch("gpu0", "b", size_bytes=4)  # still loading: pinned in the view
    d.note_dispatch("gpu0", "a", size_bytes=4)  # a request for a: a is now most recent
    assert [m for m, _, _ in d.residents("gpu0")] == ["b", "a"]
    assert d.plan_dispatch("gpu0", "c", size_bytes=6) == ["a"]
    assert d.note_dispatch("gpu0", "c", size_bytes=6) == ["a"]
    assert d.holders("a") == {}
    assert d.residents("gpu0") == [("b", LOADING, 4), ("c", LOADING, 6)]
    with pytest.raises(InsufficientCapacity, match="'d' needs 1 bytes in device 'gpu0'"):
        d.note_dispatch("gpu0", "d", size_bytes=1)
    assert d.residents("gpu0") == [("b", LOADING, 4), ("c", LOADING, 6)]


def test_dispatch_with_a_hint_predicts_the_hinted_victims() -> None:
    d = directory(gpu0=12)
    for model in ("a", "b", "c"):
        d.note_loaded("gpu0", model, size_bytes=4)
    # LRU would take a; the scheduler hinted c (cheaper to reload), and the GPU manager obeys.
    assert d.plan_dispatch("gpu0", "x", size_bytes=4) == ["a"]
    assert d.plan_dispatch("gpu0", "x", size_bytes=4, prefer=["c"]) == ["c"]
    assert d.note_dispatch("gpu0", "x", size_bytes=4, prefer=["c"]) == ["c"]
    assert d.holders("c") == {}
    assert [m for m, _, _ in d.residents("gpu0")] == ["a", "b", "x"]


def test_state_of_one_model_on_one_device() -> None:
    d = directory(gpu0=10, gpu1=10)
    d.note_dispatch("gpu0", "m", size_bytes=4)
    assert (d.state("gpu0", "m"), d.state("gpu1", "m")) == (LOADING, None)
    d.note_loaded("gpu0", "m", size_bytes=4)
    assert d.state("gpu0", "m") is RESIDENT
    assert d.state("gone", "m") is None and d.state("gpu0", "other") is None


def test_loaded_report_overrides_wrong_predictions() -> None:
    d = directory(gpu0=10)
    d.note_dispatch("gpu0", "a", size_bytes=5)
    d.note_dispatch("gpu0", "b", size_bytes=5)
    # The GPU manager loaded x instead (say, the dispatches were rerouted): a and b were wrong.
    assert d.note_loaded("gpu0", "x", size_bytes=7) == ["a", "b"]
    assert d.residents("gpu0") == [("x", RESIDENT, 7)]
    with pytest.raises(InsufficientCapacity, match="capacity 10"):
        d.note_loaded("gpu0", "huge", size_bytes=11)


def test_loaded_report_for_a_resident_model_updates_its_size() -> None:
    d = directory(gpu0=10)
    d.note_loaded("gpu0", "a", size_bytes=3)
    d.note_loaded("gpu0", "b", size_bytes=3)
    assert d.note_loaded("gpu0", "a", size_bytes=8) == ["b"]
    assert d.residents("gpu0") == [("a", RESIDENT, 8)]


def test_evicted_report_is_idempotent() -> None:
    d = directory(gpu0=10)
    d.note_loaded("gpu0", "a", size_bytes=3)
    assert d.note_evicted("gpu0", "a") is True
    assert d.note_evicted("gpu0", "a") is False
    assert d.holders("a") == {} and d.models() == []


def test_remove_device_drops_its_models_from_the_index() -> None:
    d = directory(gpu0=10, gpu1=10)
    d.note_loaded("gpu0", "a", size_bytes=3)
    d.note_loaded("gpu0", "b", size_bytes=3)
    d.note_loaded("gpu1", "a", size_bytes=3)
    assert d.remove_device("gpu0") == ["a", "b"]
    assert d.devices() == ["gpu1"]
    assert d.holders("a") == {"gpu1": RESIDENT}
    assert d.holders("b") == {}
    with pytest.raises(UnknownDevice, match="'gpu0'"):
        d.residents("gpu0")


def test_remove_node_drops_all_its_devices() -> None:
    d = ClusterDirectory()
    d.add_device("n1/0", capacity_bytes=10, node="n1")
    d.add_device("n1/1", capacity_bytes=10, node="n1")
    d.add_device("n2/0", capacity_bytes=10, node="n2")
    d.note_loaded("n1/1", "m", size_bytes=1)
    assert d.remove_node("n1") == {"n1/0": [], "n1/1": ["m"]}
    assert d.devices() == ["n2/0"] and d.node("n2/0") == "n2"


def test_sync_replaces_the_view_and_ignores_stale_reports() -> None:
    d = directory(gpu0=10)
    d.note_dispatch("gpu0", "a", size_bytes=4)
    report = [("b", RESIDENT, 3), ("c", LOADING, 5)]
    assert d.sync("gpu0", report, report_seq=2) is True
    assert d.residents("gpu0") == report
    assert d.holders("a") == {} and d.holders("c") == {"gpu0": LOADING}
    version = d.version("gpu0")
    assert d.sync("gpu0", [], report_seq=1) is False  # older report, arrived late
    assert d.residents("gpu0") == report and d.version("gpu0") == version
    assert d.sync("gpu0", [], report_seq=3, capacity_bytes=20) is True
    assert d.residents("gpu0") == [] and d.capacity_bytes("gpu0") == 20
    assert d.report_seq("gpu0") == 3 and d.version("gpu0") > version


def test_invalid_reports_change_nothing() -> None:
    d = directory(gpu0=10)
    d.note_loaded("gpu0", "a", size_bytes=4)
    with pytest.raises(InvalidReport, match="more than once"):
        d.sync("gpu0", [("b", RESIDENT, 1), ("b", RESIDENT, 1)])
    with pytest.raises(InvalidReport, match="capacity of 10"):
        d.sync("gpu0", [("b", RESIDENT, 6), ("c", RESIDENT, 6)])
    with pytest.raises(InvalidSize, match="'b'"):
        d.sync("gpu0", [("b", RESIDENT, -1)])
    assert d.residents("gpu0") == [("a", RESIDENT, 4)]
    assert d.holders("a") == {"gpu0": RESIDENT} and d.holders("b") == {}


def test_device_registration_errors() -> None:
    d = directory(gpu0=10)
    with pytest.raises(DeviceExists):
        d.add_device("gpu0", capacity_bytes=10)
    with pytest.raises(InvalidSize, match="capacity_bytes of 'gpu1'"):
        d.add_device("gpu1", capacity_bytes=-5)
    with pytest.raises(UnknownDevice, match="'nope' is not in the directory"):
        d.note_dispatch("nope", "m", size_bytes=1)
    assert "gpu0" in d and "gpu1" not in d


# -- properties ----------------------------------------------------------------------------------

DEVICES = st.sampled_from(["g0", "g1", "g2"])
MODELS = st.sampled_from(["m0", "m1", "m2", "m3", "m4", "m5"])
CAPACITY = 30
SIZES = st.integers(min_value=0, max_value=CAPACITY)
REPORTS = st.lists(
    st.tuples(MODELS, st.sampled_from([LOADING, RESIDENT]), st.integers(0, 12)),
    max_size=5,
    unique_by=lambda r: r[0],
).filter(lambda report: sum(size for _, _, size in report) <= CAPACITY)


class DirectoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = ClusterDirectory()

    @rule(device=DEVICES)
    def add_device(self, device: str) -> None:
        if device in self.d:
            with pytest.raises(DeviceExists):
                self.d.add_device(device, capacity_bytes=CAPACITY)
        else:
            self.d.add_device(device, capacity_bytes=CAPACITY)
            assert self.d.residents(device) == []

    @rule(device=DEVICES)
    def remove_device(self, device: str) -> None:
        if device not in self.d:
            return
        models = [m for m, _, _ in self.d.residents(device)]
        assert self.d.remove_device(device) == models
        assert all(device not in self.d.holders(m) for m in models)

    @rule(device=DEVICES, model=MODELS, size=SIZES)
    def note_dispatch(self, device: str, model: str, size: int) -> None:
        if device not in self.d:
            return
        before = self.d.residents(device)
        try:
            victims = self.d.note_dispatch(device, model, size_bytes=size)
        except InsufficientCapacity:
            assert self.d.residents(device) == before
            return
        assert device in self.d.holders(model)
        loading_before = {m for m, state, _ in before if state is LOADING}
        assert not loading_before & set(victims)  # loading models are never predicted victims
        assert all(device not in self.d.holders(v) for v in victims)

    @rule(device=DEVICES, model=MODELS, size=SIZES)
    def note_loaded(self, device: str, model: str, size: int) -> None:
        if device not in self.d:
            return
        self.d.note_loaded(device, model, size_bytes=size)
        assert self.d.holders(model)[device] is RESIDENT
        assert self.d.residents(device)[-1] == (model, RESIDENT, size)

    @rule(device=DEVICES, model=MODELS)
    def note_evicted(self, device: str, model: str) -> None:
        if device not in self.d:
            return
        was_there = device in self.d.holders(model)
        assert self.d.note_evicted(device, model) is was_there
        assert device not in self.d.holders(model)

    @rule(device=DEVICES, report=REPORTS)
    def sync(self, device: str, report: list[tuple[str, Residency, int]]) -> None:
        if device not in self.d:
            return
        version = self.d.version(device)
        assert self.d.sync(device, report)
        assert self.d.residents(device) == report
        assert self.d.version(device) > version

    @invariant()
    def views_stay_within_capacity(self) -> None:
        for device in self.d.devices():
            used = sum(size for _, _, size in self.d.residents(device))
            assert used == self.d.used_bytes(device) <= self.d.capacity_bytes(device)

    @invariant()
    def holders_index_matches_residents(self) -> None:
        expected: dict[str, dict[str, Residency]] = {}
        for device in self.d.devices():
            for model, state, _ in self.d.residents(device):
                expected.setdefault(model, {})[device] = state
        assert sorted(self.d.models()) == sorted(expected)
        for model in ["m0", "m1", "m2", "m3", "m4", "m5"]:
            assert self.d.holders(model) == expected.get(model, {})


DirectoryMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestDirectoryMachine = DirectoryMachine.TestCase


def test_holder_ids_is_the_set_of_holders() -> None:
    directory = ClusterDirectory()
    for device in ("a", "b", "c"):
        directory.add_device(device, capacity_bytes=100)
    directory.note_dispatch("a", "m", size_bytes=10)
    directory.note_loaded("b", "m", size_bytes=10)
    assert set(directory.holder_ids("m")) == set(directory.holders("m")) == {"a", "b"}
    assert set(directory.holder_ids("unknown")) == set()
    directory.note_evicted("a", "m")
    assert set(directory.holder_ids("m")) == {"b"}


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from(["n0", "n1", "n2"])),
        max_size=40,
    )
)
def test_the_node_index_agrees_with_a_scan_after_any_adds_and_removes(
    steps: list[tuple[bool, int, str]],
) -> None:
    """devices_on_node is an index (the policy asks it per decision): after any sequence of
    adds and removes it lists exactly what a scan of the devices finds, in added order."""
    d = ClusterDirectory()
    for add, number, node in steps:
        device_id = f"{node}/{number}"
        if add and device_id not in d:
            d.add_device(device_id, capacity_bytes=10, node=node)
        elif not add and device_id in d:
            d.remove_device(device_id)
    for node in ("n0", "n1", "n2"):
        assert d.devices_on_node(node) == [k for k in d.devices() if d.node(k) == node]
