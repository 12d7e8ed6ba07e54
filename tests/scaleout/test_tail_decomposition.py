"""The tail decomposition (``bench/scaleout_tail.py``, sixteenth session, #16) on a made-up pair
of runs whose answer is known: one gateway, and four replicas where the placement owner is
replica 0, every other replica's miss is forwarded and costs 1.4 ms more than at one gateway
(0.5 ms of it the hop), a local miss 0.3 ms more and a hit 0.1 ms more. The forwarded misses'
twins are one gateway's slowest misses (5.5 ms against 5.0), and one of them was a hit there."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"
N_REQ = 1000
JOINER = 501  # a hit sent 1 ms after request 500, a miss for the same model
LATE = 703  # a hit for request 700's model, sent after its answer: waited on nothing
HIT_AT_ONE = 230  # a forwarded miss at four replicas, a hit at one gateway


@pytest.fixture(scope="module")
def tail() -> ModuleType:
    module = load_bench(BENCH / "scaleout_tail.py", name="scaleout_tail")
    yield module
    sys.modules.pop("scaleout_tail", None)


def _miss(i: int) -> bool:
    return i % 10 == 0


def _models() -> list[int]:
    models = [100 + (i // 10) % 5 if _miss(i) else i % 3 for i in range(N_REQ)]
    models[JOINER] = models[500]
    models[LATE] = models[700]
    return models


def _run(gateways: int) -> dict[str, Any]:
    at = [40 * i for i in range(N_REQ)]
    at[JOINER] = at[500] + 1
    cache, forwarded, latency, device, forward, owner = "", "", [], [], [], []
    for i in range(N_REQ):
        wobble = (i % 7) * 0.01
        miss = _miss(i) and (gateways > 1 or i != HIT_AT_ONE)
        fwd = gateways > 1 and miss and i % gateways != 0
        cache += "m" if miss else "h"
        forwarded += "f" if fwd else "."
        if not miss:
            latency.append(2.0 + wobble + (0.1 if gateways > 1 else 0.0))
        elif fwd:
            latency.append(6.9 + wobble)
        else:
            twin = 5.5 if i % 20 == 10 else 5.0  # forwarded at four replicas, local there
            latency.append(twin + wobble + (0.3 if gateways > 1 else 0.0))
        device.append(2.0 if miss else 0.3)
        forward.append(4.0 if fwd else 0.0)
        owner.append(3.5 if fwd else 0.0)
    return {
        "gateways": gateways,
        "cache": cache,
        "forwarded": forwarded,
        "latency_ms": latency,
        "at_ms": at,
        "device_ms": device,
        "forward_ms": forward,
        "owner_ms": owner,
    }


@pytest.fixture(scope="module")
def result(tail: ModuleType) -> dict[str, Any]:
    rounds = [
        {"trace_models": _models(), "runs": [{"gateways": n, "requests": _run(n)} for n in (1, 4)]}
    ]
    out: dict[str, Any] = tail.decompose(rounds)
    return out


def test_the_tail_at_four_is_the_forwarded_misses_that_were_misses_at_one_gateway_too(
    result: dict[str, Any],
) -> None:
    four = result["top 2%"]["4"]
    assert set(four["kinds"]) == {"forwarded miss"}
    fwd = four["kinds"]["forwarded miss"]
    assert 0.9 < fwd["base_miss_share"] < 1.0  # HIT_AT_ONE was a hit there
    assert fwd["hop_ms"] == pytest.approx(0.5)
    assert fwd["device_ms"] == pytest.approx(2.0)
    assert fwd["owner_off_device_ms"] == pytest.approx(1.5)
    assert four["ingress_owner_share"] == 0.0
    # one gateway's own top 2% is its slowest misses (the same requests, with ties), not all
    assert 0.0 < four["in_base_tail_share"] < 1.0
    assert result["top 2%"]["1"]["in_base_tail_share"] == 1.0


def test_paired_medians_split_a_forwarded_miss_from_what_every_request_pays(
    result: dict[str, Any],
) -> None:
    medians = result["paired medians"]["4"]
    assert medians["forwarded_excess_ms"] == pytest.approx(1.4)
    assert medians["local_miss_excess_ms"] == pytest.approx(0.3)
    assert medians["hit_excess_ms"] == pytest.approx(0.1)
    assert medians["hop_ms"] == pytest.approx(0.5)
    # the forwarded misses' twins at one gateway: 5.5 ms (and the wobble) less 2.0 on the device
    assert medians["one_gateway_off_device_ms"] == pytest.approx(3.53, abs=0.011)


def test_a_forward_costing_a_local_miss_takes_the_ratio_down_to_the_local_misses(
    result: dict[str, Any],
) -> None:
    ratios = result["counterfactual pooled p99 ratios"]["4"]
    one_p99 = 5.56  # one gateway's slowest misses, the forwarded misses' twins
    assert ratios["measured"] == pytest.approx(6.96 / one_p99, rel=0.005)
    assert ratios["hop_free"] == pytest.approx(6.46 / one_p99, rel=0.005)
    # 1.4 ms less the 0.3 ms a local miss pays too
    assert ratios["forward_costs_a_local_miss"] == pytest.approx(5.86 / one_p99, rel=0.005)
    assert ratios["hit_excess_off_everything"] == pytest.approx(6.86 / one_p99, rel=0.005)


def test_a_hit_sent_while_its_models_miss_is_in_flight_is_counted_as_waiting_on_that_load(
    result: dict[str, Any],
) -> None:
    queueing = result["queueing, all requests"]
    assert queueing["1"]["joined_load"] == 1
    assert queueing["4"]["joined_load"] == 1
    measured = N_REQ - N_REQ // 10
    assert queueing["1"]["nothing_else_in_flight_share"] == pytest.approx((measured - 1) / measured)


def test_unreadable_rounds_are_a_clear_error(tail: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "round.json"
    bad.write_text("{not json")
    assert tail.main([str(bad)]) == 2
