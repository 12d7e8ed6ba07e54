"""Best-fit placement over full GPUs and MIG slices (cache/placement.py): properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpufaas.cache import ClusterDirectory, DeviceKind, DeviceSlot, best_fit, may_copy_between
from gpufaas.cache.placement import fits_tighter

GiB = 2**30

slots = st.lists(
    st.builds(
        DeviceSlot,
        device_id=st.text("abcdefgh", min_size=1, max_size=3),
        kind=st.sampled_from(list(DeviceKind)),
        capacity_bytes=st.integers(0, 100).map(lambda n: n * GiB),
    ),
    max_size=8,
    unique_by=lambda s: s.device_id,
)


@given(slots, st.integers(0, 110 * GiB))
def test_best_fit_lists_exactly_the_fitting_devices_smallest_budget_first(
    devices: list[DeviceSlot], nbytes: int
) -> None:
    order = best_fit(devices, nbytes)
    by_id = {d.device_id: d for d in devices}
    assert set(order) == {d.device_id for d in devices if d.capacity_bytes >= nbytes}
    budgets = [by_id[d].capacity_bytes for d in order]
    assert budgets == sorted(budgets)
    if order:  # nothing that fits is smaller than the choice: big slices stay free
        assert by_id[order[0]].capacity_bytes == min(
            d.capacity_bytes for d in devices if d.capacity_bytes >= nbytes
        )


@given(slots, st.integers(0, 110 * GiB), st.integers(0, 100))
def test_a_larger_device_never_changes_the_best_fit(
    devices: list[DeviceSlot], nbytes: int, extra: int
) -> None:
    order = best_fit(devices, nbytes)
    largest = max((d.capacity_bytes for d in devices), default=0)
    bigger = DeviceSlot("zzzz", DeviceKind.GPU, largest + 1 + extra)
    assert best_fit([*devices, bigger], nbytes)[: len(order)] == order


@given(slots)
def test_no_copy_is_planned_to_or_from_a_slice(devices: list[DeviceSlot]) -> None:
    for a in devices:
        for b in devices:
            allowed = may_copy_between(a, b)
            assert allowed == (a is not b and DeviceKind.MIG not in (a.kind, b.kind))


def test_the_directory_knows_each_devices_kind_and_plans_no_copy_with_slices() -> None:
    directory = ClusterDirectory()
    directory.add_device("n/gpu0", capacity_bytes=80 * GiB, node="n")
    directory.add_device("n/gpu1", capacity_bytes=80 * GiB, node="n")
    directory.add_device(
        "n/mig", capacity_bytes=20 * GiB, node="n", kind=DeviceKind.MIG, profile="2g.20gb"
    )
    assert directory.has_slices and directory.slot("n/mig").profile == "2g.20gb"
    for device in ("n/gpu0", "n/mig"):
        directory.note_loaded(device, "m", size_bytes=GiB)
    assert directory.copy_sources("m", "n/gpu1") == ["n/gpu0"]  # not the slice
    directory.remove_device("n/gpu0")
    assert directory.copy_sources("m", "n/gpu1") == []
    directory.remove_device("n/mig")
    assert not directory.has_slices


@given(st.integers(1, 100), st.integers(1, 100), st.integers(1, 100))
def test_only_a_strictly_smaller_fitting_budget_is_a_tighter_fit(a: int, b: int, n: int) -> None:
    # Equal budgets must not count: a tie broken by id overrode LALB's least-waiting choice.
    slot_a = DeviceSlot("n/1", DeviceKind.GPU, a)
    slot_b = DeviceSlot("n/2", DeviceKind.GPU, b)
    assert fits_tighter(slot_a, slot_b, n) == (n <= a < b)
