"""Drift with canonical values: non-canonical Quantities make no patch loop.

The operator runs with handler resources written the way people write them
("0.1" CPU, "131072Ki", "1024Mi"); the emulator stores them canonically, as the API
server does ("100m", "128Mi", "1Gi"), and fills in the fields the server defaults
(strategy, probe timeouts, clusterIP, ...). Comparing text, or whole objects, would
patch the Deployment on every reconcile; a reconcile of an unchanged object is a no-op.
"""

from __future__ import annotations

import pytest
from kmock_harness import (
    GatewayStandIn,
    Kube,
    function_body,
    operator_running,
    patched_environ,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

NON_CANONICAL = {
    "GPUFAAS_HANDLER_CPU_REQUEST": "0.1",
    "GPUFAAS_HANDLER_MEMORY_REQUEST": "131072Ki",
    "GPUFAAS_HANDLER_MEMORY_LIMIT": "1024Mi",
    "GPUFAAS_CHECK_CPU_REQUEST": "0.25",
}


def test_unchanged_object_with_non_canonical_quantities_makes_zero_patches(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    kube, _ = cluster
    ns, fn = "drift", "fn-drift"
    deployment_path = kube.path("apps/v1", "deployments", ns, f"ifn-{fn}-handler")
    with patched_environ(NON_CANONICAL), operator_running():
        kube.create(kube.fn_path(ns), function_body(fn))
        job = wait_for(lambda: kube.list(kube.path("batch/v1", "jobs", ns)), what="the Job")[0]
        kube.complete_check(ns, job["metadata"]["name"])
        wait_for(lambda: kube.get(deployment_path), what="the handler Deployment")
        kube.make_deployment_ready(ns, f"ifn-{fn}-handler")
        wait_for(
            lambda: (c := kube.condition(ns, fn, "Ready")) and c["status"] == "True",
            what="Ready=True",
        )
        deployment = kube.get(deployment_path)
        assert deployment is not None
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        # Stored canonically, so the text differs from what the operator asked for.
        assert resources == {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "1Gi"},
        }

        ours = f"/namespaces/{ns}/"
        before = [m for m in kube.mutations("deployments", "services", "jobs") if ours in m[1]]
        fetches = kube.requests_to("GET", kube.fn_path(ns, fn))
        wait_for(
            lambda: kube.requests_to("GET", kube.fn_path(ns, fn)) >= fetches + 3,
            timeout=20,
            what="three more reconciles",
        )
        after = [m for m in kube.mutations("deployments", "services", "jobs") if ours in m[1]]
        status_writes = [m for m in kube.mutations(f"{fn}/status") if m[0] == "PATCH"]
        status_before = len(status_writes)
        wait_for(
            lambda: kube.requests_to("GET", kube.fn_path(ns, fn)) >= fetches + 5,
            timeout=20,
            what="two more reconciles",
        )
    assert after == before, f"patches of an unchanged object: {after[len(before) :]}"
    assert [m for m in kube.mutations(f"{fn}/status") if m[0] == "PATCH"][:status_before] == (
        status_writes
    )
    assert len([m for m in kube.mutations(f"{fn}/status") if m[0] == "PATCH"]) == status_before
