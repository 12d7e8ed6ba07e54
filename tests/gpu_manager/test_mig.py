"""MIG-aware placement on a mixed node (issue #11, item 7): one H100 split 3g.40gb + 2g.20gb +
2g.20gb and a full H100 beside it, as a fake NVML reports it, through the device layer, the
cluster directory and the gateway's policy."""

from __future__ import annotations

from fake_nvml import GiB, mixed_mig_node

from gpufaas.cache import ClusterDirectory, DeviceKind
from gpufaas.gpu_manager.inventory import DeviceInfo, devices_from_inventory
from gpufaas.gpu_manager.nvml import read_nvml_inventory
from gpufaas.scheduler.estimates import Estimates
from gpufaas.scheduler.policy import DeviceLoad, LocalityAware, RouteRequest


def _devices() -> list[DeviceInfo]:
    inventory = read_nvml_inventory(mixed_mig_node().module())
    # CUDA numbers the full GPU first, then the slices it was given.
    by_uuid = {"1111bbbb": 0, "2222cccc": 1, "3333dddd": 2, "4444eeee": 3}
    return devices_from_inventory(
        inventory, torch_index_by_uuid=by_uuid, peer_access=lambda a, b: True, memory_fraction=1.0
    )


def _directory(devices: list[DeviceInfo]) -> ClusterDirectory:
    directory = ClusterDirectory()
    for d in devices:
        kind = DeviceKind.MIG if d.mig else DeviceKind.GPU
        directory.add_device(
            f"n/{d.id}", capacity_bytes=d.total_bytes, node="n", kind=kind, profile=d.mig_profile
        )
    return directory


def test_each_slice_is_a_device_with_its_budget_profile_and_no_peers() -> None:
    found = {d.id: d for d in _devices()}
    assert [(d.id, d.mig, d.mig_profile, d.total_bytes >> 30) for d in found.values()] == [
        ("cuda:0", False, None, 80),
        ("cuda:1", True, "3g.40gb", 40),
        ("cuda:2", True, "2g.20gb", 20),
        ("cuda:3", True, "2g.20gb", 20),
    ]
    # torch would allow every pair, and NVML reports P2P between the two GPUs: still none.
    assert all(d.peers == () for d in found.values())


def test_a_model_goes_on_the_smallest_slice_that_fits() -> None:
    directory = _directory(_devices())
    assert directory.best_fit(15 * GiB)[0] == "n/cuda:2"  # a 2g.20gb, not the 3g or the GPU
    assert directory.best_fit(30 * GiB)[0] == "n/cuda:1"  # the 3g.40gb
    assert directory.best_fit(50 * GiB) == ["n/cuda:0"]  # only the full GPU
    assert directory.best_fit(90 * GiB) == []


def test_no_copy_is_planned_to_or_from_a_slice() -> None:
    directory = _directory(_devices())
    for device in ("n/cuda:0", "n/cuda:1"):
        directory.note_loaded(device, "m", size_bytes=GiB)
    assert directory.copy_sources("m", "n/cuda:2") == []  # to a slice: from nowhere
    assert directory.copy_sources("m", "n/cuda:0") == []  # from a slice: never


def test_the_gateway_places_a_cold_load_on_the_best_fitting_slice() -> None:
    directory = _directory(_devices())
    estimates = Estimates()
    estimates.observe_load("small", size_bytes=10 * GiB, load_ms=100.0)
    estimates.observe_load("big", size_bytes=30 * GiB, load_ms=300.0)
    policy = LocalityAware(seed=0, estimates=estimates)
    idle = [DeviceLoad(key=f"n/cuda:{i}", outstanding=0, queue_ms=0.0) for i in range(4)]

    assert policy.choose(RouteRequest("small", 10 * GiB), idle, directory).device in {
        "n/cuda:2",
        "n/cuda:3",
    }
    assert policy.choose(RouteRequest("big", 30 * GiB), idle, directory).device == "n/cuda:1"
