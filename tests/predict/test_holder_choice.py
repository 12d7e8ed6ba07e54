"""LALB's holder choice with staged copies (#13): a model that is not on any device loads on a
node whose host tier or disk holds it rather than one that would read the artifact; the
gateway's cluster view learns the staged copies from the nodes' reports, and the simulator runs
the same policy code."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from gpufaas.cache import ClusterDirectory, Residency
from gpufaas.cache.arrivals import FixedKeepAlive
from gpufaas.core.node import STATE, DeviceState, DiskState, HostState, NodeState, ResidentState
from gpufaas.scheduler.cluster import Cluster
from gpufaas.scheduler.estimates import Estimates
from gpufaas.scheduler.policy import DeviceLoad, LocalityAware, RouteRequest, make_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from sim.engine import SimConfig
from sim.residency import ResidencySimulation, TierConfig
from sim.trace import costs_for
from sim.workload import Model, ModelProfile, Trace

GB = 10**9


def _two_nodes() -> ClusterDirectory:
    directory = ClusterDirectory()
    for node in ("a", "b"):
        for i in range(2):
            directory.add_device(f"{node}/gpu:{i}", capacity_bytes=80 * GB, node=node)
    return directory


def test_a_load_goes_to_the_node_with_a_host_copy_even_if_it_waits_a_little_longer() -> None:
    directory = _two_nodes()
    request = RouteRequest(model="m", size_bytes=2 * GB)  # artifact read: 1 s at 2 GB/s
    waits = [
        DeviceLoad("a/gpu:0", 0, queue_ms=0.0),
        DeviceLoad("a/gpu:1", 0, queue_ms=1.0),
        DeviceLoad("b/gpu:0", 0, queue_ms=50.0),  # 50 ms more wait, no artifact read
        DeviceLoad("b/gpu:1", 0, queue_ms=60.0),
    ]
    staged = LocalityAware(seed=0, estimates=Estimates(), staged=lambda m: {"b"})
    decision = staged.choose(request, waits, directory)
    assert (decision.device, decision.reason) == ("b/gpu:0", "load")
    blind = LocalityAware(seed=0, estimates=Estimates())  # the rule before: least loaded wins
    assert blind.choose(request, waits, directory).device == "a/gpu:0"
    # Past the candidates too: with one candidate, the least-loaded staged device is still tried.
    one = LocalityAware(seed=0, estimates=Estimates(), candidates=1, staged=lambda m: {"b"})
    assert one.choose(request, waits, directory).device == "b/gpu:0"
    # A staged device that waits longer than the artifact read saves is not worth it.
    far = [*waits[:2], DeviceLoad("b/gpu:0", 0, queue_ms=5000.0)]
    assert staged.choose(request, far, directory).device == "a/gpu:0"


def _state(host: list[str], disk: list[str]) -> NodeState:
    def resident(model: str) -> ResidentState:
        return ResidentState(model=model, state=Residency.RESIDENT, size_bytes=GB, pins=0)

    return NodeState(
        devices=[
            DeviceState(
                id="gpu:0",
                kind="cpu",
                name="cpu",
                uuid="u0",
                total_bytes=80 * GB,
                capacity_bytes=80 * GB,
            )
        ],
        host=HostState(
            capacity_bytes=100 * GB,
            used_bytes=0,
            pinned=False,
            pooled_bytes=0,
            residents=[resident(m) for m in host],
        ),
        disk=DiskState(
            capacity_bytes=100 * GB, used_bytes=0, residents=[resident(m) for m in disk]
        ),
    )


async def test_the_gateways_cluster_learns_staged_copies_from_the_nodes_reports() -> None:
    reports = {"a": _state(["m"], []), "b": _state([], ["m", "d"])}
    cluster = Cluster(manager_urls={"a": "http://a", "b": "http://b"})

    def app_for(node: str) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert scope["path"] == STATE
            body = reports[node].model_dump_json().encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        return app

    for name, node in cluster.nodes.items():
        await node.client.aclose()
        node.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app_for(name)), base_url=f"http://{name}"
        )
    try:
        await cluster.sync_all()
        assert set(cluster.staged_nodes("m")) == {"a", "b"}  # host tier on a, disk on b
        assert set(cluster.staged_nodes("d")) == {"b"}
        assert not cluster.staged_nodes("unknown")
        reports["a"] = _state([], [])  # a dropped its host copy
        await cluster.sync_all()
        assert set(cluster.staged_nodes("m")) == {"b"}
        cluster.mark_down(cluster.nodes["b"])
        assert not cluster.staged_nodes("m")
        # the gateway's policy asks the cluster (scheduler/main.py wires it so)
        policy = make_policy("lalb", seed=0, staged=cluster.staged_nodes)
        assert isinstance(policy, LocalityAware)
        assert policy.staged == cluster.staged_nodes
    finally:
        await cluster.close()


def test_the_simulator_routes_a_demoted_models_request_to_its_host_copy() -> None:
    """A model demoted by a 1-minute keep-alive keeps its host copy on its node (node-0); when
    its next request comes, node-0's devices are each busy loading a small model and node-1's
    are idle. With staged copies LALB waits a little on node-0 and loads from host memory;
    without (the control), it picks an idle device on node-1, which reads the artifact."""
    sizes = [8 * GB] + [100 * 10**6] * 8
    costs = [costs_for(size) for size in sizes]
    catalogue = [
        Model(
            name=f"fn-{i}",
            profile=ModelProfile(
                kind="t",
                size_bytes=c.size_bytes,
                load_ms=c.artifact_to_device_ms,
                infer_ms=c.infer_ms,
            ),
            slo_ms=10_000.0,
        )
        for i, c in enumerate(costs)
    ]
    arrivals = [0.0, *(199_990.0 + k for k in range(8)), 200_000.0]
    trace = Trace(arrival_ms=np.asarray(arrivals), model=np.asarray([0, *range(1, 9), 0]))
    config = dataclasses.replace(
        SimConfig(devices=16, capacity_bytes=80 * GB, concurrency=2, eviction="lru"),
        warmup_fraction=0.0,
    )
    where: dict[bool, tuple[str, str]] = {}
    for staged_routing in (True, False):
        sim = ResidencySimulation(
            FixedKeepAlive(keepalive_s=60),
            catalogue,
            costs,
            trace,
            config,
            TierConfig(host_capacity_bytes=100 * GB, staged_routing=staged_routing),
        )
        report = sim.report()
        assert report["demotions"] == 1
        again = {r.index: r for r in sim.done}[9]
        where[staged_routing] = (sim.devices[again.device].key.split("/")[0], sim.tier_of[9])
    first = {r.index: r for r in sim.done}[0]
    assert sim.devices[first.device].key.startswith("node-0/")
    assert where[True] == ("node-0", "host")
    assert where[False] == ("node-1", "artifact")  # the control: the rule before the fix
