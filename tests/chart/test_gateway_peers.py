"""Gateway scale-out (#16) in the chart: the replicas find each other through a headless
Service's EndpointSlices."""

from __future__ import annotations

from typing import Any

from gpufaas.scheduler.peers import peer_urls


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
