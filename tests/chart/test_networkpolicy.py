"""The chart's ingress NetworkPolicies (networkPolicy.enabled, templates/networkpolicy.yaml):
off by default; when on, valid Kubernetes objects whose every named port is one the selected
pods declare and whose every pod selector matches a pod the chart runs (so a renamed port or
label cannot silently close a path), opening every port a component serves to the components
that call it, and no more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate

Docs = list[dict[str, Any]]
K8S_VERSION = "1.33"
CHART = Path(__file__).resolve().parents[2] / "charts" / "gpufaas"
ON = ["networkPolicy.enabled=true", "channels.nats.deploy=true"]
# Ports only the kubelet's probes use (traffic from a pod's own node is always allowed).
PROBE_ONLY = {("nats", "monitor")}


def _policies(docs: Docs) -> dict[str, dict[str, Any]]:
    return {
        d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "NetworkPolicy"
    }


def _pods(docs: Docs) -> dict[str, dict[str, Any]]:
    """Each workload's pod template, by its component label."""
    return {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"][
            "template"
        ]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
    }


def _declared_ports(template: dict[str, Any]) -> set[str]:
    return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def _opened(policy: dict[str, Any]) -> dict[str, list[list[dict[str, Any]] | None]]:
    """Each named port the policy opens, with the ``from`` list of each rule opening it
    (None: from anywhere)."""
    opened: dict[str, list[list[dict[str, Any]] | None]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            opened.setdefault(port["port"], []).append(rule.get("from"))
    return opened


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _sources(froms: list[dict[str, Any]] | None, pods: dict[str, dict[str, Any]]) -> set[str]:
    """The chart's components a ``from`` list admits (namespace-wide peers count as none)."""
    if froms is None:
        return set(pods) | {"anyone"}
    admitted: set[str] = set()
    for peer in froms:
        selector = peer.get("podSelector", {}).get("matchLabels")
        if selector is None:
            continue
        admitted |= {c for c, t in pods.items() if _matches(selector, t["metadata"]["labels"])}
    return admitted


def test_no_network_policy_unless_asked(render: Any) -> None:
    assert not [d for d in render() if d["kind"] == "NetworkPolicy"]


def test_policies_are_valid_and_name_only_what_the_chart_runs(render: Any) -> None:
    docs = render(sets=ON)
    policies, pods = _policies(docs), _pods(docs)
    assert set(policies) == {"gateway", "gpu-manager", "nats"}
    for component, policy in policies.items():
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        selected = pods[component]
        assert _matches(
            policy["spec"]["podSelector"]["matchLabels"], selected["metadata"]["labels"]
        )
        declared = _declared_ports(selected)
        opened = _opened(policy)
        assert set(opened) <= declared, f"{component}: opens undeclared ports"
        assert {p for p in declared if (component, p) not in PROBE_ONLY} <= set(opened), (
            f"{component}: a served port is closed"
        )
        for froms in (f for rules in opened.values() for f in rules if f is not None):
            for peer in froms:
                selector = peer.get("podSelector", {}).get("matchLabels")
                if selector is not None and "namespaceSelector" not in peer:
                    assert _sources([peer], pods), f"{component}: {selector} matches no pod"


def test_each_port_is_open_to_its_callers_and_no_one_else(render: Any) -> None:
    docs = render(sets=ON)
    policies, pods = _policies(docs), _pods(docs)

    def callers(component: str, port: str) -> set[str]:
        return set().union(*(_sources(f, pods) for f in _opened(policies[component])[port]))

    assert "anyone" in callers("gateway", "http") and "anyone" in callers("gateway", "grpc")
    assert callers("gateway", "forward-lane") == {"gateway"}
    assert callers("gpu-manager", "framed") == {"gateway"}
    assert callers("gpu-manager", "http") == {"gateway", "gpu-manager"}
    assert callers("nats", "client") == {"gateway", "gpu-manager"}


def test_restricted_clients_keep_the_components_and_handlers_and_admit_metrics(
    render: Any,
) -> None:
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    docs = render(
        sets=ON,
        extra=[
            "--set-json",
            f"networkPolicy.clients=[{_json(ingress)}]",
            "--set-json",
            f"networkPolicy.metrics=[{_json(monitoring)}]",
        ],
    )
    policies, pods = _policies(docs), _pods(docs)
    gateway = _opened(policies["gateway"])
    assert None not in gateway["http"] and None not in gateway["grpc"]  # not from anyone
    http_from = [peer for froms in gateway["http"] if froms for peer in froms]
    assert ingress in http_from and monitoring in http_from
    assert {"gateway", "operator"} <= _sources(http_from, pods)
    handlers = [p for p in http_from if "namespaceSelector" in p and "podSelector" in p]
    assert handlers == [
        {
            "namespaceSelector": {},
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/managed-by": "gpufaas",
                    "app.kubernetes.io/component": "handler",
                }
            },
        }
    ]
    manager_http = [p for f in _opened(policies["gpu-manager"])["http"] if f for p in f]
    assert monitoring in manager_http and ingress not in manager_http
    for policy in policies.values():
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_handler_labels_are_the_operators() -> None:
    """The policy's handler selector (templates/networkpolicy.yaml) is the operator's labels."""
    from gpufaas.operator.reconcile import (
        COMPONENT_LABEL,
        HANDLER_COMPONENT,
        MANAGED_BY,
        MANAGED_BY_LABEL,
    )

    assert (MANAGED_BY_LABEL, COMPONENT_LABEL) == (
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/component",
    )
    assert (MANAGED_BY, HANDLER_COMPONENT) == ("gpufaas", "handler")


def test_a_policy_needs_a_fixed_forward_lane_port(helm: Any) -> None:
    """An ephemeral lane port cannot be opened by a policy: the render says so; no lane (-1)
    renders, with no lane rule."""
    done = helm(
        "template", "gf", str(CHART), "--set", "networkPolicy.enabled=true",
        "--set", "gateway.scaleOut.forwardLanePort=0",
    )  # fmt: skip
    assert done.returncode != 0 and "forwardLanePort" in done.stderr
    off = helm(
        "template", "gf", str(CHART), "--set", "networkPolicy.enabled=true",
        "--set", "gateway.scaleOut.forwardLanePort=-1",
    )  # fmt: skip
    assert off.returncode == 0, off.stderr
    assert "port: forward-lane" not in off.stdout and "name: forward-lane" not in off.stdout


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))
