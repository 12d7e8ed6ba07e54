"""The operator end to end: real kopf, our handlers, KMock's API server over HTTP.

One operator runs for the module; each test uses its own namespace. KMock has no
controllers, so tests complete Jobs and ready Deployments themselves, and no
garbage collector, so ownership is asserted on the ownerReferences.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kmock_harness import (
    GatewayStandIn,
    Kube,
    function_body,
    operator_running,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

JOBS = ("batch/v1", "jobs")
DEPLOYMENTS = ("apps/v1", "deployments")
SERVICES = ("v1", "services")


@pytest.fixture(scope="module")
def env(cluster: tuple[Kube, GatewayStandIn]) -> Iterator[tuple[Kube, GatewayStandIn]]:
    with operator_running():
        yield cluster


@pytest.fixture()
def ns(env: tuple[Kube, GatewayStandIn], request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace per test; its functions are deleted afterwards so resyncs don't pile up."""
    kube, _ = env
    namespace = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    yield namespace
    for body in kube.list(kube.fn_path(namespace)):
        kube.delete(kube.fn_path(namespace, body["metadata"]["name"]))
    wait_for(
        lambda: not kube.list(kube.fn_path(namespace)),
        what=f"functions in {namespace} to be deleted",
    )


def _jobs(kube: Kube, ns: str, fn: str) -> list[dict[str, Any]]:
    return kube.list(kube.path(*JOBS, ns), **{"gpufaas.dev/function": fn})


def _one_job(kube: Kube, ns: str, fn: str) -> dict[str, Any]:
    return wait_for(lambda: (_jobs(kube, ns, fn) or [None])[0], what=f"the model-check Job of {fn}")


def _deployment(kube: Kube, ns: str, fn: str) -> dict[str, Any] | None:
    return kube.get(kube.path(*DEPLOYMENTS, ns, f"ifn-{fn}-handler"))


def _service(kube: Kube, ns: str, fn: str) -> dict[str, Any] | None:
    return kube.get(kube.path(*SERVICES, ns, f"ifn-{fn}-handler"))


def _status_is(kube: Kube, ns: str, fn: str, type_: str, status: str) -> dict[str, Any] | None:
    cond = kube.condition(ns, fn, type_)
    return cond if cond is not None and cond["status"] == status else None


def _make_ready(kube: Kube, ns: str, fn: str) -> dict[str, Any]:
    """Complete the check and ready the handler; the function's body once Ready=True."""
    job = _one_job(kube, ns, fn)
    kube.complete_check(ns, job["metadata"]["name"], tensor_bytes=4096)
    wait_for(lambda: _deployment(kube, ns, fn), what="handler Deployment")
    kube.make_deployment_ready(ns, f"ifn-{fn}-handler")
    wait_for(lambda: _status_is(kube, ns, fn, "Ready", "True"), what=f"{fn} Ready=True")
    body = kube.function(ns, fn)
    assert body is not None
    return body


def _assert_owned(child: dict[str, Any], fn_body: dict[str, Any]) -> None:
    refs = child["metadata"]["ownerReferences"]
    assert refs == [
        {
            "apiVersion": "gpufaas.dev/v1alpha1",
            "kind": "InferenceFunction",
            "name": fn_body["metadata"]["name"],
            "uid": fn_body["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = child["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "gpufaas"
    assert labels["gpufaas.dev/function"] == fn_body["metadata"]["name"]


def test_create_builds_owned_children_and_conditions(
    env: tuple[Kube, GatewayStandIn], ns: str
) -> None:
    kube, gateway = env
    fn = "fn-create"
    created = kube.create(kube.fn_path(ns), function_body(fn))

    job = _one_job(kube, ns, fn)
    deployment = wait_for(lambda: _deployment(kube, ns, fn), what="handler Deployment")
    service = wait_for(lambda: _service(kube, ns, fn), what="handler Service")
    for child in (job, deployment, service):
        _assert_owned(child, created)

    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.test/gpufaas:test"
    assert container["args"][:3] == ["check-model", "--kubernetes", "--spec-json"]
    handler = deployment["spec"]["template"]["spec"]["containers"][0]
    assert handler["image"] == "registry.test/pre:1"
    assert {"name": "GPUFAAS_GATEWAY_URL", "value": gateway.url} in handler["env"]
    assert handler["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["replicas"] == 1

    verifying = wait_for(
        lambda: _status_is(kube, ns, fn, "ModelVerified", "Unknown"), what="ModelVerified"
    )
    assert verifying["reason"] == "Verifying"
    assert _status_is(kube, ns, fn, "Ready", "False")

    body = _make_ready(kube, ns, fn)
    status = body["status"]
    assert status["phase"] == "Ready"
    assert status["ready"] == "True"
    assert status["modelBytes"] == 4096
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"{gateway.url}/v2/models/{fn}"
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types == {"ModelVerified": "True", "HandlerReady": "True", "Ready": "True"}
    reasons = wait_for(
        lambda: (
            {e["reason"] for e in kube.events(ns)} >= {"ModelVerified", "Ready"} and kube.events(ns)
        ),
        what="ModelVerified and Ready events",
    )
    assert reasons


def test_update_rolls_out_to_children(env: tuple[Kube, GatewayStandIn], ns: str) -> None:
    kube, _ = env
    fn = "fn-update"
    kube.create(kube.fn_path(ns), function_body(fn))
    _make_ready(kube, ns, fn)
    first_job = _one_job(kube, ns, fn)["metadata"]["name"]

    kube.patch(
        kube.fn_path(ns, fn),
        {
            "spec": {
                "model": {"uri": "file:///models/m2.pt", "format": "torchscript"},
                "handler": {"image": "registry.test/pre:2", "minReplicas": 2, "maxReplicas": 4},
            }
        },
    )

    def rolled_out() -> dict[str, Any] | None:
        d = _deployment(kube, ns, fn)
        image = d["spec"]["template"]["spec"]["containers"][0]["image"] if d else None
        return d if image == "registry.test/pre:2" and d and d["spec"]["replicas"] == 2 else None

    wait_for(rolled_out, what="the handler Deployment to roll out image :2 with 2 replicas")
    # A new model means a new check; the obsolete one is deleted.
    new_job = wait_for(
        lambda: [j for j in _jobs(kube, ns, fn) if j["metadata"]["name"] != first_job] or None,
        what="the new model check Job",
    )[0]
    wait_for(
        lambda: all(j["metadata"]["name"] != first_job for j in _jobs(kube, ns, fn)),
        what="old Job deleted",
    )
    assert "m2.pt" in " ".join(new_job["spec"]["template"]["spec"]["containers"][0]["args"])

    verifying = wait_for(
        lambda: _status_is(kube, ns, fn, "ModelVerified", "Unknown"), what="re-verification"
    )
    assert verifying["observedGeneration"] == 2
    kube.complete_check(ns, new_job["metadata"]["name"], tensor_bytes=8192)
    kube.make_deployment_ready(ns, f"ifn-{fn}-handler")
    wait_for(lambda: _status_is(kube, ns, fn, "Ready", "True"), what="Ready again")
    body = kube.function(ns, fn)
    assert body is not None
    assert body["status"]["modelBytes"] == 8192
    assert body["status"]["observedGeneration"] == 2


def test_invalid_spec_fails_with_condition_and_event(
    env: tuple[Kube, GatewayStandIn], ns: str
) -> None:
    kube, _ = env
    fn = "fn-invalid"
    body = function_body(fn)
    body["spec"]["inputs"][0]["shape"] = [0, 4]
    # The API server refuses this now (CEL); an object stored before the rule existed is
    # still reported by the operator.
    kube.emulator.admission = False
    try:
        kube.create(kube.fn_path(ns), body)
    finally:
        kube.emulator.admission = True

    ready = wait_for(lambda: _status_is(kube, ns, fn, "Ready", "False"), what="Ready=False")
    assert ready["reason"] == "InvalidSpec"
    assert "spec.inputs[0].shape" in ready["message"]
    current = kube.function(ns, fn)
    assert current is not None
    assert current["status"]["phase"] == "Failed"
    event = wait_for(
        lambda: next((e for e in kube.events(ns) if e.get("reason") == "InvalidSpec"), None),
        what="an InvalidSpec Event",
    )
    assert event["type"] == "Warning"
    assert "spec.inputs[0].shape" in event["message"]
    assert _jobs(kube, ns, fn) == []
    assert _deployment(kube, ns, fn) is None


def test_the_api_server_refuses_what_the_operator_would_and_defaults_the_rest(
    env: tuple[Kube, GatewayStandIn], ns: str
) -> None:
    kube, _ = env
    body = function_body("fn-dupes")
    body["spec"]["inputs"].append({"name": "x", "datatype": "INT64", "shape": [-1]})
    refused = kube.http.post(kube.fn_path(ns), json=body)
    assert refused.status_code == 422
    assert "Duplicate value" in refused.json()["message"]
    assert kube.function(ns, "fn-dupes") is None

    created = kube.create(kube.fn_path(ns), function_body("fn-defaults", handler=False))
    assert created["spec"]["batching"] == {"maxBatchSize": 1, "maxDelayMs": 0.0}
    too_many = kube.http.patch(
        kube.fn_path(ns, "fn-defaults"),
        json={"spec": {"parallelism": {"shards": 8, "strategy": "intra-layer"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert too_many.status_code == 422
    assert "parallelism.shards" in too_many.json()["message"]


def test_failed_model_check_is_reported(env: tuple[Kube, GatewayStandIn], ns: str) -> None:
    kube, _ = env
    fn = "fn-checkfail"
    kube.create(kube.fn_path(ns), function_body(fn, handler=False))
    job = _one_job(kube, ns, fn)
    kube.fail_or_complete(
        ns,
        job["metadata"]["name"],
        message='{"ok": false, "error": "cannot load file:///models/m.pt as torchscript: bad zip"}',
        succeeded=False,
    )
    cond = wait_for(
        lambda: _status_is(kube, ns, fn, "ModelVerified", "False"), what="ModelVerified=False"
    )
    assert cond["reason"] == "CheckFailed"
    assert "bad zip" in cond["message"]
    current = kube.function(ns, fn)
    assert current is not None
    assert current["status"]["phase"] == "Failed"
    assert wait_for(
        lambda: [e for e in kube.events(ns) if e.get("reason") == "ModelCheckFailed"],
        what="ModelCheckFailed event",
    )


def test_function_without_handler_is_ready_once_verified(
    env: tuple[Kube, GatewayStandIn], ns: str
) -> None:
    kube, _ = env
    fn = "fn-nohandler"
    kube.create(kube.fn_path(ns), function_body(fn, handler=False))
    job = _one_job(kube, ns, fn)
    kube.complete_check(ns, job["metadata"]["name"])
    wait_for(lambda: _status_is(kube, ns, fn, "Ready", "True"), what="Ready=True")
    handler = kube.condition(ns, fn, "HandlerReady")
    assert handler is not None and handler["reason"] == "NotRequired"
    assert _deployment(kube, ns, fn) is None
    assert _service(kube, ns, fn) is None


def test_child_deleted_by_hand_is_recreated(env: tuple[Kube, GatewayStandIn], ns: str) -> None:
    kube, _ = env
    fn = "fn-recreate"
    kube.create(kube.fn_path(ns), function_body(fn))
    _make_ready(kube, ns, fn)
    service = _service(kube, ns, fn)
    deployment = _deployment(kube, ns, fn)
    assert service is not None and deployment is not None

    kube.delete(kube.path(*SERVICES, ns, service["metadata"]["name"]))
    kube.delete(kube.path(*DEPLOYMENTS, ns, deployment["metadata"]["name"]))

    new_service = wait_for(
        lambda: (
            (s := _service(kube, ns, fn))
            and s["metadata"]["uid"] != service["metadata"]["uid"]
            and s
        ),
        what="the Service to be recreated",
    )
    new_deployment = wait_for(
        lambda: (
            (d := _deployment(kube, ns, fn))
            and d["metadata"]["uid"] != deployment["metadata"]["uid"]
            and d
        ),
        what="the Deployment to be recreated",
    )
    body = kube.function(ns, fn)
    assert body is not None
    _assert_owned(new_service, body)
    _assert_owned(new_deployment, body)
    # The recreated Deployment is not ready yet, and the status says so.
    wait_for(lambda: _status_is(kube, ns, fn, "HandlerReady", "False"), what="HandlerReady=False")


def test_reconciling_again_changes_nothing(env: tuple[Kube, GatewayStandIn], ns: str) -> None:
    kube, _ = env
    fn = "fn-idem"
    kube.create(kube.fn_path(ns), function_body(fn))
    _make_ready(kube, ns, fn)
    fn_path = kube.fn_path(ns, fn)
    before_children = kube.mutations("jobs", "deployments", "services")
    before_status = [m for m in kube.mutations(f"{fn}/status")]
    fetches = kube.requests_to("GET", fn_path)
    # The resync daemon fetches the function at the start of each reconcile: wait for three.
    wait_for(
        lambda: kube.requests_to("GET", fn_path) >= fetches + 3,
        timeout=20,
        what="three more reconciles",
    )
    own = [
        m for m in kube.mutations("jobs", "deployments", "services") if f"/namespaces/{ns}/" in m[1]
    ]
    assert [m for m in before_children if f"/namespaces/{ns}/" in m[1]] == own
    assert kube.mutations(f"{fn}/status") == before_status


def test_delete_unloads_through_the_gateway_then_lets_go(
    env: tuple[Kube, GatewayStandIn], ns: str
) -> None:
    kube, gateway = env
    fn = "fn-delete"
    kube.create(kube.fn_path(ns), function_body(fn, handler=False))
    wait_for(
        lambda: (
            "gpufaas.dev/finalizer"
            in ((kube.function(ns, fn) or {}).get("metadata", {}).get("finalizers") or [])
        ),
        what="the finalizer",
    )
    kube.delete(kube.fn_path(ns, fn))
    wait_for(lambda: kube.function(ns, fn) is None, what="the function to be gone")
    call = gateway.calls.index(f"/v2/repository/models/{fn}/unload")
    assert gateway.authorizations[call] == "Bearer admin-secret"
