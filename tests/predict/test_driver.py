"""The gateway's prefetch driver (``scheduler/prefetch.py``) over a real ClusterDirectory: what it
demotes and prefetches, that a prefetch never needs an eviction, that a failed action is counted
and never raised, that what it learned survives a restart, and that the gateway feeds it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gpufaas.cache import ClusterDirectory
from gpufaas.cache.arrivals import FixedKeepAlive, PredictivePolicy
from gpufaas.scheduler.prefetch import Action, PrefetchConfig, PrefetchDriver, plan

GB = 10**9


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _directory(*, devices: int = 2, capacity: int = 10 * GB) -> ClusterDirectory:
    directory = ClusterDirectory()
    for i in range(devices):
        directory.add_device(f"n/gpu:{i}", capacity_bytes=capacity, node="n")
    return directory


def _periodic(policy: PredictivePolicy, name: str, *, period: float, until: float) -> None:
    t = until - 12 * period
    while t <= until:
        policy.observe(name, t)
        t += period


def test_plan_demotes_what_is_not_wanted_and_prefetches_what_is_due() -> None:
    # the learned rule alone: the break-even floor would hold "idle" (100 s < its 1,000 s)
    policy = PredictivePolicy(device_price=1.0, break_even=0.0)
    now = 10_000.0
    _periodic(policy, "timer", period=600.0, until=now - 590)  # due in ~10 s
    _periodic(policy, "idle", period=600.0, until=now - 100)  # next in ~500 s
    directory = _directory()
    directory.note_loaded("n/gpu:0", "idle", size_bytes=2 * GB)
    actions = plan(
        policy,
        directory,
        now_s=now,
        sizes={"timer": 2 * GB, "idle": 2 * GB, "unknown-size": 0},
        reload_ms=lambda name, size: 1000.0,
        last_device={"timer": "n/gpu:1"},
    )
    assert Action("demote", "idle", "n/gpu:0") in actions
    assert Action("prefetch", "timer", "n/gpu:1") in actions
    assert all(a.model != "unknown-size" for a in actions)


def test_a_prefetch_only_goes_where_it_fits_without_evicting() -> None:
    policy = PredictivePolicy(device_price=0.0)
    now = 10_000.0
    _periodic(policy, "big", period=600.0, until=now - 590)
    directory = _directory(devices=2, capacity=10 * GB)
    directory.note_loaded("n/gpu:0", "a", size_bytes=9 * GB)  # last device: no room
    directory.note_loaded("n/gpu:1", "b", size_bytes=5 * GB)
    kwargs = {"now_s": now, "reload_ms": lambda n, s: 1000.0, "last_device": {"big": "n/gpu:0"}}
    assert plan(policy, directory, sizes={"big": 4 * GB}, **kwargs) == [  # type: ignore[arg-type]
        Action("prefetch", "big", "n/gpu:1")
    ]
    assert plan(policy, directory, sizes={"big": 6 * GB}, **kwargs) == []  # type: ignore[arg-type]


def test_a_policy_that_never_prefetches_is_not_asked() -> None:
    policy = FixedKeepAlive(keepalive_s=60)
    policy.observe("f", 0.0)
    actions = plan(
        policy,
        _directory(),
        now_s=10.0,
        sizes={"f": GB},
        reload_ms=lambda n, s: 1.0,
        last_device={},
    )
    assert actions == []


async def test_tick_sends_actions_counts_failures_and_never_raises(tmp_path: Path) -> None:
    clock = Clock()
    policy = PredictivePolicy(device_price=1.0, break_even=0.0)  # the learned rule alone
    _periodic(policy, "timer", period=600.0, until=clock.now - 590)
    _periodic(policy, "idle", period=600.0, until=clock.now - 100)
    directory = _directory()
    directory.note_loaded("n/gpu:0", "idle", size_bytes=2 * GB)
    sent: list[Action] = []

    async def send(action: Action) -> None:
        if action.kind == "prefetch":
            raise RuntimeError("artifact gone")
        sent.append(action)

    registry = CollectorRegistry()
    driver = PrefetchDriver(
        policy=policy,
        directory=directory,
        send=send,
        sizes=lambda: {"timer": 2 * GB, "idle": 2 * GB},
        reload_ms=lambda n, s: 1000.0,
        registry=registry,
        clock=clock,
    )
    actions = await driver.tick()
    assert {a.kind for a in actions} == {"prefetch", "demote"}
    assert sent == [Action("demote", "idle", "n/gpu:0")]
    assert "idle" not in directory.holders("idle") and not directory.holders("idle")
    value = registry.get_sample_value
    assert value("gpufaas_prefetch_actions_total", {"kind": "prefetch", "result": "failed"}) == 1
    assert value("gpufaas_prefetch_actions_total", {"kind": "demote", "result": "sent"}) == 1


async def test_what_it_learned_survives_a_gateway_restart(tmp_path: Path) -> None:
    state = tmp_path / "arrivals.json"
    clock = Clock()
    first = PrefetchDriver(
        policy=PredictivePolicy(),
        directory=_directory(),
        send=_no_send,
        sizes=dict,
        reload_ms=lambda n, s: 1.0,
        registry=CollectorRegistry(),
        config=PrefetchConfig(tick_s=0.01, state_file=state),
        clock=clock,
    )
    for _ in range(20):
        clock.now += 60.0
        first.observe("timer")
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await asyncio.sleep(0)
    stop.set()
    await task  # saves at stop
    assert json.loads(state.read_text())["kind"] == "predictive"
    restarted = PredictivePolicy()
    second = PrefetchDriver(
        policy=restarted,
        directory=_directory(),
        send=_no_send,
        sizes=dict,
        reload_ms=lambda n, s: 1.0,
        registry=CollectorRegistry(),
        config=PrefetchConfig(state_file=state),
        clock=clock,
    )
    assert second.load()
    assert restarted.arrivals.periodic("timer") == pytest.approx(60.0)
    assert restarted.arrivals.p_arrival("timer", 55.0, 10.0) > 0.9


async def _no_send(action: Action) -> None:
    raise AssertionError("nothing to send")


def test_a_corrupt_state_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "arrivals.json"
    state.write_text("{not json")
    driver = PrefetchDriver(
        policy=PredictivePolicy(),
        directory=_directory(),
        send=_no_send,
        sizes=dict,
        reload_ms=lambda n, s: 1.0,
        registry=CollectorRegistry(),
        config=PrefetchConfig(state_file=state),
    )
    assert driver.load() is False
    assert "ignoring the arrival model" in caplog.text
    state.write_text(json.dumps({"version": 1, "kind": "hybrid"}))
    assert driver.load() is False


def test_responses_feed_cold_start_and_prefetch_precision_metrics() -> None:
    registry = CollectorRegistry()
    driver = PrefetchDriver(
        policy=PredictivePolicy(),
        directory=_directory(),
        send=_no_send,
        sizes=dict,
        reload_ms=lambda n, s: 1.0,
        registry=registry,
    )
    driver.prefetched.add(("m", "n/gpu:0"))
    driver.note_response("n/gpu:0", "m", hit=True, source="device")
    driver.note_response("n/gpu:1", "m", hit=False, source="host")
    value = registry.get_sample_value
    assert value("gpufaas_prefetch_used_total") == 1
    assert value("gpufaas_cold_starts_total", {"source": "host"}) == 1
    assert driver.last_device["m"] == "n/gpu:1"


async def test_the_gateway_feeds_the_driver_and_its_actions_reach_a_real_manager(
    tmp_path: Path, example_models_dir: Path
) -> None:
    """Gateway -> driver -> GPU manager, in process over ASGI, with the real tiny-mlp."""
    import httpx
    import numpy as np

    from gpufaas.core.artifacts import ArtifactStore
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests
    from gpufaas.core.protocol import encode_request
    from gpufaas.gpu_manager.inventory import cpu_devices
    from gpufaas.gpu_manager.runtime import NodeRuntime
    from gpufaas.gpu_manager.server import create_app as create_manager_app
    from gpufaas.scheduler.gateway import GatewayConfig, create_app
    from gpufaas.scheduler.main import build_gateway
    from gpufaas.scheduler.prefetch import enable_prefetch

    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"],
        variables={"GPUFAAS_MODELS": str(example_models_dir)},
    )
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    manager_app = create_manager_app(runtime)
    gateway = build_gateway(
        manager_urls={"node-0": "http://manager"},
        functions=functions,
        policy="lalb",
        config=GatewayConfig(transport="httpx"),  # the in-process manager is an ASGI app
    )

    node = gateway.cluster.nodes["node-0"]
    await node.client.aclose()
    node.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager_app), base_url="http://manager"
    )
    # nothing is worth its memory, even held only until a request due in milliseconds: demote all
    policy = PredictivePolicy(device_price=1e15)
    driver = enable_prefetch(gateway, policy=policy, state_file=tmp_path / "a.json")
    assert driver.run in gateway.background
    await gateway.sync()
    content, headers = encode_request({"x": (np.ones((1, 16), dtype=np.float32), "FP32")})
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gw"
        ) as client:
            for _ in range(3):
                response = await client.post(
                    "/v2/models/tiny-mlp/infer", content=content, headers=headers
                )
                assert response.status_code == 200
                await runtime.settle()  # the load commits in the background: then hits
        value = gateway.metrics.registry.get_sample_value
        assert value("gpufaas_prediction_requests_total") == 3
        assert value("gpufaas_cold_starts_total", {"source": "host"}) == 1  # the first load
        device = next(iter(runtime.devices))
        actions = await driver.tick()
        assert Action("demote", "tiny-mlp", f"node-0/{device}") in actions
        state = runtime.state()
        assert state.devices[0].residents == []  # demoted on the node
        assert [r.model for r in state.host.residents] == ["tiny-mlp"]
        await driver.send(Action("prefetch", "tiny-mlp", f"node-0/{device}"))
        inner = manager_app
        while not hasattr(inner, "state"):  # under the manager's ASGI wrappers
            inner = inner.app
        queue = inner.state.prefetcher.queue
        assert queue is not None
        await queue.join()
        assert [r.model for r in runtime.state().devices[0].residents] == ["tiny-mlp"]
    finally:
        await gateway.cluster.close()
        await runtime.settle()


def test_the_cli_option_attaches_the_driver(tmp_path: Path) -> None:
    import argparse

    from gpufaas.scheduler.cli import enable_prefetch_option
    from gpufaas.scheduler.main import build_gateway

    gateway = build_gateway(manager_urls={}, functions=[], policy="lalb")
    enable_prefetch_option(gateway, argparse.Namespace(prefetch="off", prefetch_state=None))
    assert gateway.prefetch is None and gateway.background == []
    state = tmp_path / "s.json"
    enable_prefetch_option(gateway, argparse.Namespace(prefetch="hybrid", prefetch_state=state))
    assert gateway.prefetch is not None
    assert gateway.prefetch.policy.name == "hybrid-histogram"
    assert gateway.prefetch.config.state_file == state
    assert gateway.background == [gateway.prefetch.run]
