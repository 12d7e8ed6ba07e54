"""The placement owner's second pass over a forwarded request (fourteenth session, #16).

The owner answers a lane call with the gateway's own inference path (``replica_setup.py:
lane_answer``), so it inspects the body again, as the sender did. That second inspection is what
a skip would remove (``bench/scaleout_second_pass.py`` measures it: a few microseconds). These
tests pin what it does today: a body the owner cannot take is refused at the owner with a 400
naming the problem (never a 500, never sent on to a GPU manager), and a valid one goes on to the
routing decision. With no device registered, that decision answers 503."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from bench_support import load_bench

from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.scheduler.forward_lane import ForwardHead
from gpufaas.scheduler.gateway import Gateway
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.peers import static_peers
from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer
from gpufaas.scheduler.replicas import Replicas

SELF, PEER = "http://127.0.0.1:9", "http://127.0.0.1:10"
BENCH = Path(__file__).resolve().parents[2] / "bench"
VALID = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
).encode()


def _owner() -> tuple[Gateway, Replicas]:
    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"], variables={"GPUFAAS_MODELS": "/nonexistent"}
    )
    gateway = build_gateway(manager_urls={}, functions=functions, policy="lalb")
    replicas = attach_replicas(
        gateway, self_url=SELF, discover=static_peers([SELF, PEER]), token=None
    )
    return gateway, replicas


async def _close(gateway: Gateway, replicas: Replicas) -> None:
    await replicas.calls.close()
    await replicas.membership.close()
    await gateway.stop()


async def _lane_call(gateway: Gateway, body: bytes) -> tuple[int, dict[str, str]]:
    status, _, answer = await lane_answer(gateway)(
        ForwardHead("tiny-mlp", uuid.uuid4().hex, PEER, None), body
    )
    return status, json.loads(answer)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"inputs": [', "JSON"),
        (
            json.dumps(
                {"inputs": [{"name": "z", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]}
            ).encode(),
            "'z'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
            ).encode(),
            "shape",
        ),
    ],
    ids=["not-json", "unknown-input", "wrong-shape"],
)
async def test_a_forwarded_body_the_owner_cannot_take_is_a_400_at_the_owner(
    body: bytes, names: str
) -> None:
    gateway, replicas = _owner()
    try:
        status, answer = await _lane_call(gateway, body)
    finally:
        await _close(gateway, replicas)
    assert status == 400, answer
    assert names in answer["error"]


async def test_a_valid_forwarded_body_goes_on_to_the_routing_decision() -> None:
    gateway, replicas = _owner()
    try:
        status, answer = await _lane_call(gateway, VALID)
    finally:
        await _close(gateway, replicas)
    assert status == 503, answer  # no device registered: the decision finds none


def test_the_second_pass_bench_times_both_and_refuses_too_few_calls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench(BENCH / "scaleout_second_pass.py", name="scaleout_second_pass")
    assert bench.main(["--calls", "10", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["inspection", "owner path"]
    with pytest.raises(SystemExit) as refused:
        bench.main(["--calls", "5"])
    assert refused.value.code == 2
    sys.modules.pop("scaleout_second_pass", None)
