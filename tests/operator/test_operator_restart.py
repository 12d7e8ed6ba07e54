"""Restarting the operator: it resumes existing functions without duplicating children."""

from __future__ import annotations

import pytest
from kmock_harness import GatewayStandIn, Kube, function_body, operator_running, wait_for

pytestmark = pytest.mark.timeout(120)


def _creates(kube: Kube) -> list[tuple[str, str]]:
    return [m for m in kube.mutations("jobs", "deployments", "services") if m[0] == "POST"]


def test_restart_resumes_without_duplicating_children(cluster: tuple[Kube, GatewayStandIn]) -> None:
    kube, _ = cluster
    ns, fn = "restart", "fn-restart"
    jobs = kube.path("batch/v1", "jobs", ns)
    deployment = kube.path("apps/v1", "deployments", ns, f"ifn-{fn}-handler")
    service = kube.path("v1", "services", ns, f"ifn-{fn}-handler")

    with operator_running():
        kube.create(kube.fn_path(ns), function_body(fn))
        job = wait_for(lambda: kube.list(jobs), what="the check Job")[0]
        wait_for(lambda: kube.get(deployment), what="the handler Deployment")
        wait_for(lambda: kube.get(service), what="the handler Service")
        wait_for(lambda: kube.condition(ns, fn, "Ready"), what="a status")
    creates_before = _creates(kube)
    assert len(creates_before) == 3

    # While the operator is down: the check finishes and someone deletes the Service.
    kube.complete_check(ns, job["metadata"]["name"])
    kube.make_deployment_ready(ns, f"ifn-{fn}-handler")
    kube.delete(service)

    with operator_running():
        wait_for(lambda: kube.get(service), what="the Service to be recreated on resume")
        ready = wait_for(
            lambda: (c := kube.condition(ns, fn, "ModelVerified")) and c["status"] == "True" and c,
            what="the finished check to be read after the restart",
        )
        assert ready["reason"] == "Verified"
        fetches = kube.requests_to("GET", kube.fn_path(ns, fn))
        wait_for(
            lambda: kube.requests_to("GET", kube.fn_path(ns, fn)) >= fetches + 2,
            what="two more resyncs",
        )
    creates_after = _creates(kube)

    assert creates_after == [*creates_before, ("POST", kube.path("v1", "services", ns))]
    assert len(kube.list(jobs)) == 1
    assert len(kube.list(kube.path("apps/v1", "deployments", ns))) == 1
    assert len(kube.list(kube.path("v1", "services", ns))) == 1
