"""The gateway options the live replay uses: ``--prefetch keepalive``, ``--prefetch-param``,
``--prefetch-time-scale`` (the policy's clock and a load's cost in compressed time) and
``--prefetch-demote-only`` (learn and demote, never prefetch)."""

from __future__ import annotations

import argparse
import time

import pytest
from prometheus_client import CollectorRegistry

from gpufaas.cache import ClusterDirectory
from gpufaas.cache.arrivals import FixedKeepAlive, PredictivePolicy
from gpufaas.scheduler.cli import enable_prefetch_option, prefetch_params
from gpufaas.scheduler.prefetch import Action, PrefetchConfig, PrefetchDriver, scaled_clock

GB = 10**9


def _args(**overrides: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "prefetch": "predictive",
        "prefetch_state": None,
        "prefetch_param": [],
        "prefetch_time_scale": 1.0,
        "prefetch_demote_only": False,
    }
    return argparse.Namespace(**{**base, **overrides})


def test_policy_parameters_parse_and_bad_ones_get_a_clear_error() -> None:
    assert prefetch_params(["device_price=0.1", " keepalive_s = 600"]) == {
        "device_price": 0.1,
        "keepalive_s": 600.0,
    }
    for bad in ("device_price", "=1", "device_price=cheap"):
        with pytest.raises(SystemExit, match="NAME=NUMBER"):
            prefetch_params([bad])


def test_the_options_reach_the_driver() -> None:
    from gpufaas.scheduler.main import build_gateway

    gateway = build_gateway(manager_urls={}, functions=[], policy="lalb")
    args = _args(
        prefetch="keepalive",
        prefetch_param=["keepalive_s=60"],
        prefetch_time_scale=30.0,
        prefetch_demote_only=True,
    )
    enable_prefetch_option(gateway, args)
    driver = gateway.prefetch
    assert driver is not None and isinstance(driver.policy, FixedKeepAlive)
    assert driver.policy.keepalive_s == 60.0
    assert driver.config.time_scale == 30.0 and not driver.config.prefetch
    assert driver.clock() == pytest.approx(time.time() * 30.0, abs=30.0)
    with pytest.raises(SystemExit, match="unexpected keyword"):
        enable_prefetch_option(gateway, _args(prefetch_param=["no_such=1"]))
    with pytest.raises(SystemExit, match="time-scale"):
        enable_prefetch_option(gateway, _args(prefetch_time_scale=0.0))
    with pytest.raises(ValueError, match="positive"):
        scaled_clock(-1.0)


def _driver(*, prefetch: bool, time_scale: float, sent: list[Action]) -> PrefetchDriver:
    # the learned rule alone: the break-even floor would hold "idle" (100 s < its 1,000 s)
    policy = PredictivePolicy(device_price=1.0, break_even=0.0)
    now = 10_000.0
    for t in range(12):  # a timer every 600 s; its next request is due in about 10 s
        policy.observe("timer", now - 590 - 600 * (11 - t))
        policy.observe("idle", now - 100 - 600 * (11 - t))
    directory = ClusterDirectory()
    directory.add_device("n/gpu:0", capacity_bytes=10 * GB, node="n")
    directory.note_loaded("n/gpu:0", "idle", size_bytes=2 * GB)

    async def send(action: Action) -> None:
        sent.append(action)

    return PrefetchDriver(
        policy=policy,
        directory=directory,
        send=send,
        sizes=lambda: {"timer": 2 * GB, "idle": 2 * GB},
        reload_ms=lambda name, size: 1000.0 / time_scale,  # wall ms: the same cost in trace ms
        registry=CollectorRegistry(),
        config=PrefetchConfig(time_scale=time_scale, prefetch=prefetch),
        clock=lambda: now,
    )


@pytest.mark.parametrize("time_scale", [1.0, 50.0])
async def test_demote_only_never_prefetches_and_a_load_costs_the_same_in_trace_time(
    time_scale: float,
) -> None:
    sent: list[Action] = []
    await _driver(prefetch=True, time_scale=time_scale, sent=sent).tick()
    assert set(sent) == {
        Action("demote", "idle", "n/gpu:0"),
        Action("prefetch", "timer", "n/gpu:0"),
    }
    sent.clear()
    await _driver(prefetch=False, time_scale=time_scale, sent=sent).tick()
    assert sent == [Action("demote", "idle", "n/gpu:0")]
