"""Gateway scale-out (#16) in the chart: the replicas find each other through a headless
Service's EndpointSlices."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpufaas.scheduler.cli import _gateway_parser
from gpufaas.scheduler.peers import peer_urls

CHART = Path(__file__).resolve().parents[2] / "charts" / "gpufaas"


def test_gateway_replicas_find_each_other_through_a_headless_service(render: Any) -> None:
    docs = render()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    peers = services["gf-gpufaas-gateway-peers"]
    gateway = services["gf-gpufaas-gateway"]
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["selector"] == gateway["spec"]["selector"]
    assert [p["name"] for p in peers["spec"]["ports"]] == ["http"]

    deployment = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "gf-gpufaas-gateway"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--peer-service=gf-gpufaas-gateway-peers" in container["args"]
    assert "--replica-url=http://$(POD_IP):8080" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    # The gateway's service account may list EndpointSlices in its namespace.
    bindings = [
        d
        for d in docs
        if d["kind"] == "RoleBinding"
        and any(s["name"] == "gf-gpufaas-gateway" for s in d.get("subjects", []))
    ]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    rules = [r for b in bindings for r in roles[b["roleRef"]["name"]]["rules"]]
    assert any(
        "endpointslices" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in rules
    )

    # What the gateway reads from such a slice: one peer per ready pod address.
    endpoint_slice = {
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True}}],
    }
    assert peer_urls([endpoint_slice]) == ["http://10.1.0.7:8080"]


def gateway_args(docs: list[dict[str, Any]]) -> argparse.Namespace:
    """The gateway container's arguments as the gateway's own parser reads them."""
    deployment = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "gf-gpufaas-gateway"
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "gateway"
    return _gateway_parser().parse_args(args[1:])


def test_scale_out_options_reach_the_gateway_and_its_parser_accepts_them(
    render: Any, helm: Any
) -> None:
    """The chart passes the replicas' scale-out options; the gateway's own parser reads them."""

    default = gateway_args(render())
    assert (default.placement_owner, default.replica_slots, default.replica_forward) == (
        "leader",
        "full",
        "request",
    )
    chosen = gateway_args(
        render(
            sets=[
                "gateway.scaleOut.placementOwner=function",
                "gateway.scaleOut.replicaSlots=share",
                "gateway.scaleOut.replicaForward=decision",
            ]
        )
    )
    assert (chosen.placement_owner, chosen.replica_slots, chosen.replica_forward) == (
        "function",
        "share",
        "decision",
    )
    for bad in ("gateway.scaleOut.replicaForward=owner", "gateway.scaleOut.forward=request"):
        done = helm("template", "gf", str(CHART), "--set", bad)
        assert done.returncode != 0, f"--set {bad} was accepted"


def test_shard_passes_reach_the_gateway_and_the_schema_rejects_others(
    render: Any, helm: Any
) -> None:
    """The chart passes `gateway.shardPasses` as `--shard-passes` (#15); single by default."""
    assert gateway_args(render()).shard_passes == "single"
    assert gateway_args(render(sets=["gateway.shardPasses=shared"])).shard_passes == "shared"
    done = helm("template", "gf", str(CHART), "--set", "gateway.shardPasses=batched")
    assert done.returncode != 0, "--set gateway.shardPasses=batched was accepted"


def test_the_forward_lane_port_is_fixed_declared_and_checked(render: Any, helm: Any) -> None:
    """Each replica's keyed-forward lane listens on a declared container port (8082 by default),
    so that a NetworkPolicy can name it; 0 (ephemeral) and -1 (none) declare none; a port that
    clashes with the gateway's others, or is out of range, fails the render."""
    docs = render()
    assert gateway_args(docs).forward_lane_port == 8082
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"]
    )
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "forward-lane", "containerPort": 8082, "protocol": "TCP"} in ports
    for value in (0, -1):
        off = render(sets=[f"gateway.scaleOut.forwardLanePort={value}"])
        assert gateway_args(off).forward_lane_port == value
        deployment = next(
            d for d in off if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"]
        )
        names = [
            p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        ]
        assert "forward-lane" not in names
    for bad in ("8080", "8081", "-2", "70000"):
        done = helm(
            "template", "gf", str(CHART), "--set", f"gateway.scaleOut.forwardLanePort={bad}"
        )
        assert done.returncode != 0, f"forwardLanePort={bad} was accepted"
        assert "forwardLanePort" in done.stderr
