"""The pure reconcile functions: desired children, drift detection, check results, status."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gpufaas.core.api import Handler, parse_spec
from gpufaas.operator.reconcile import (
    NO_HANDLER,
    CheckResult,
    CheckState,
    Owner,
    Readiness,
    check_job_name,
    check_result,
    child_name,
    clamp_replicas,
    desired_check_job,
    desired_handler_deployment,
    desired_handler_service,
    desired_status,
    handler_readiness,
    is_controlled_by,
    is_subset,
    model_key,
    status_patch,
    transition_events,
    update_patch,
)
from gpufaas.operator.settings import OperatorSettings

OWNER = Owner(name="fn", namespace="ns", uid="uid-1", generation=3)
SETTINGS = OperatorSettings(image="img:1", gateway_url="http://gw:8080/")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _spec(**overrides: Any) -> Any:
    raw: dict[str, Any] = {
        "model": {"uri": "s3://bucket/m.pt", "format": "torchscript"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "handler": {"image": "pre:1", "minReplicas": 1, "maxReplicas": 3, "port": 9000},
    }
    raw.update(overrides)
    return parse_spec(raw)


def _security_ok(container: dict[str, Any], pod: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "owner", ["fn", "0-starts-with-digit", "a" * 63, "b" * 40 + "-" + "c" * 22]
)
def test_child_names_are_dns_1035_labels(owner: str) -> None:
    for suffix in ("handler", "check-0123456789"):
        name = child_name(owner, suffix)
        assert len(name) <= 63
        assert DNS_1035.match(name), name
        assert name.endswith(suffix)


def test_long_owner_names_stay_distinct() -> None:
    a, b = "x" * 62 + "a", "x" * 62 + "b"
    assert child_name(a, "handler") != child_name(b, "handler")


def test_model_key_tracks_the_model_and_signature_only() -> None:
    base = _spec()
    assert model_key(base) == model_key(
        _spec(handler={"image": "other:2"}, batching={"maxBatchSize": 8})
    )
    assert model_key(base) != model_key(
        _spec(model={"uri": "s3://bucket/m2.pt", "format": "torchscript"})
    )
    assert model_key(base) != model_key(
        _spec(inputs=[{"name": "x", "datatype": "FP16", "shape": [-1, 4]}])
    )


# -- desired children ----------------------------------------------------------------------------


def test_check_job_runs_check_model_on_the_spec() -> None:
    spec = _spec()
    job = desired_check_job(OWNER, spec, SETTINGS)
    assert job["metadata"]["name"] == check_job_name(OWNER, spec)
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "gpufaas.dev/v1alpha1",
            "kind": "InferenceFunction",
            "name": "fn",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpufaas"
    assert job["metadata"]["labels"]["gpufaas.dev/function"] == "fn"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "img:1"
    assert container["command"] == ["gpufaas"]
    args = container["args"]
    assert args[0] == "check-model"
    assert "--kubernetes" in args  # the cluster URI policy: no file://, no loopback/metadata hosts
    checked = parse_spec(json.loads(args[args.index("--spec-json") + 1]))
    assert (checked.model, checked.inputs, checked.outputs) == (
        spec.model,
        spec.inputs,
        spec.outputs,
    )
    assert checked.handler is None  # not part of the check, nor of the Job's name
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert "envFrom" not in container
    _security_ok(container, pod)


def test_check_job_mounts_the_artifact_secret_when_configured() -> None:
    settings = SETTINGS.model_copy(update={"artifact_secret": "s3-creds"})
    container = desired_check_job(OWNER, _spec(), settings)["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": True}}]


@pytest.mark.parametrize(
    ("minimum", "maximum", "current", "expected"),
    [
        (1, 3, None, 1),
        (0, 3, None, 1),
        (2, 3, None, 2),
        (1, 3, 2, 2),  # an autoscaler's choice within bounds is kept
        (1, 3, 7, 3),
        (2, 3, 0, 2),
        (0, 1, 0, 0),
    ],
)
def test_replicas_are_clamped(
    minimum: int, maximum: int, current: int | None, expected: int
) -> None:
    handler = Handler(image="x", min_replicas=minimum, max_replicas=maximum)
    assert clamp_replicas(handler, current) == expected


def test_handler_deployment_and_service() -> None:
    handler = _spec().handler
    assert handler is not None
    deployment = desired_handler_deployment(OWNER, handler, SETTINGS, current_replicas=9)
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "pre:1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GPUFAAS_GATEWAY_URL"] == "http://gw:8080"
    assert env["GPUFAAS_MODEL_ENDPOINT"] == "http://gw:8080/v2/models/fn"
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    _security_ok(container, pod)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    service = desired_handler_service(OWNER, handler)
    assert service["metadata"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["port"] == 9000
    assert is_controlled_by(service, OWNER)
    assert not is_controlled_by(service, Owner(name="fn", namespace="ns", uid="other"))


# -- drift ---------------------------------------------------------------------------------------


def test_server_defaults_are_not_drift() -> None:
    handler = _spec().handler
    assert handler is not None
    desired = desired_handler_service(OWNER, handler)
    actual = json.loads(json.dumps(desired))
    actual["metadata"].update({"uid": "u", "resourceVersion": "7", "creationTimestamp": "t"})
    actual["spec"].update({"clusterIP": "10.0.0.7", "sessionAffinity": "None"})
    actual["spec"]["ports"][0]["nodePort"] = None
    actual["status"] = {"loadBalancer": {}}
    assert update_patch(desired, actual) is None


def test_drift_is_patched_back_with_lists_replaced() -> None:
    handler = _spec().handler
    assert handler is not None
    desired = desired_handler_deployment(OWNER, handler, SETTINGS, current_replicas=None)
    actual = json.loads(json.dumps(desired))
    actual["spec"]["template"]["spec"]["containers"][0]["image"] = "tampered:1"
    patch = update_patch(desired, actual)
    assert patch is not None
    assert patch["spec"] == desired["spec"]
    assert "metadata" not in patch


def test_job_specs_are_immutable_so_only_metadata_is_patched() -> None:
    desired = desired_check_job(OWNER, _spec(), SETTINGS)
    actual = json.loads(json.dumps(desired))
    actual["spec"]["backoffLimit"] = 99
    assert update_patch(desired, actual) is None
    actual["metadata"]["ownerReferences"] = [{"uid": "previous-incarnation", "controller": True}]
    patch = update_patch(desired, actual)
    assert patch is not None and set(patch) == {"metadata"}
    assert patch["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_quantities_compare_by_value_not_text() -> None:
    handler = _spec().handler
    assert handler is not None
    settings = SETTINGS.model_copy(
        update={"handler_cpu_request": "0.1", "handler_memory_limit": "1024Mi"}
    )
    desired = desired_handler_deployment(OWNER, handler, settings, current_replicas=None)
    stored = json.loads(json.dumps(desired))
    resources = stored["spec"]["template"]["spec"]["containers"][0]["resources"]
    resources["requests"]["cpu"] = "100m"  # what the API server keeps
    resources["limits"]["memory"] = "1Gi"
    assert update_patch(desired, stored) is None
    resources["limits"]["memory"] = "2Gi"  # a real change is still drift
    assert update_patch(desired, stored) is not None
    assert not is_subset({"image": "0.1"}, {"image": "100m"})  # only in requests/limits


def test_drift_patch_carries_the_resource_version() -> None:
    handler = _spec().handler
    assert handler is not None
    desired = desired_handler_deployment(OWNER, handler, SETTINGS, current_replicas=None)
    stored = json.loads(json.dumps(desired))
    stored["metadata"]["resourceVersion"] = "41"
    stored["spec"]["template"]["spec"]["containers"][0]["image"] = "tampered:1"
    patch = update_patch(desired, stored)
    assert patch is not None and patch["metadata"] == {"resourceVersion": "41"}


def test_subset_semantics() -> None:
    assert is_subset({"a": 1}, {"a": 1, "b": 2})
    assert not is_subset({"a": 1}, {"a": "1"})
    assert not is_subset({"a": True}, {"a": 1})
    assert is_subset({"a": 1}, {"a": 1.0})
    assert not is_subset({"l": [1, 2]}, {"l": [1, 2, 3]})
    assert is_subset({"l": [{"n": 1}]}, {"l": [{"n": 1, "extra": 0}]})
    assert not is_subset({"a": {"b": 1}}, {"a": None})


# -- results of children -------------------------------------------------------------------------


def _job(condition: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if condition:
        status["conditions"] = [
            {"type": condition, "status": "True", "reason": "BackoffLimitExceeded"}
        ]
    return {"status": status}


def _pod(message: str, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "metadata": {"creationTimestamp": created},
        "status": {
            "containerStatuses": [{"name": "check", "state": {"terminated": {"message": message}}}]
        },
    }


REPORT = json.dumps(
    {
        "ok": True,
        "report": {
            "uri": "s3://b/m.pt",
            "format": "torchscript",
            "sha256": "a" * 64,
            "sizeBytes": 10,
            "tensorBytes": 8,
        },
    }
)


def test_check_result_running_and_succeeded() -> None:
    assert check_result(_job(None), []).state is CheckState.RUNNING
    done = check_result(_job("Complete"), [_pod(REPORT)])
    assert done.state is CheckState.SUCCEEDED
    assert done.model_bytes == 8
    gone = check_result(_job("Complete"), [])
    assert gone.state is CheckState.SUCCEEDED and gone.model_bytes is None


def test_check_result_failure_reasons() -> None:
    error = json.dumps({"ok": False, "error": "sha256 mismatch"})
    assert check_result(_job("Failed"), [_pod(error)]).message == "sha256 mismatch"
    # No JSON (a crash): the log tail that FallbackToLogsOnError left is the reason.
    logs = check_result(_job("Failed"), [_pod("Traceback...\nMemoryError")])
    assert logs.state is CheckState.FAILED and "MemoryError" in logs.message
    # No pod at all (deadline exceeded before it started): the Job's own condition.
    assert "BackoffLimitExceeded" in check_result(_job("Failed"), []).message
    newest = check_result(
        _job("Failed"),
        [
            _pod('{"ok": false, "error": "old"}', "2026-01-01T00:00:00Z"),
            _pod('{"ok": false, "error": "new"}', "2026-01-02T00:00:00Z"),
        ],
    )
    assert newest.message == "new"


def _deployment(
    replicas: int, ready: int, updated: int, generation: int = 2, observed: int | None = 2
) -> dict[str, Any]:
    status: dict[str, Any] = {"readyReplicas": ready, "updatedReplicas": updated}
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": status,
    }


@pytest.mark.parametrize(
    ("deployment", "status", "reason"),
    [
        (None, "False", "Creating"),
        (_deployment(2, 2, 2, observed=1), "False", "RollingOut"),
        (_deployment(2, 2, 2, observed=None), "False", "RollingOut"),
        (_deployment(2, 0, 1), "False", "RollingOut"),
        (_deployment(2, 1, 2), "False", "Unavailable"),
        (_deployment(0, 0, 0), "False", "ScaledToZero"),  # minReplicas > 0: must come back
        (_deployment(2, 2, 2), "True", "Available"),
    ],
)
def test_handler_readiness(deployment: dict[str, Any] | None, status: str, reason: str) -> None:
    readiness = handler_readiness(deployment)
    assert (readiness.status, readiness.reason) == (status, reason)


def test_a_handler_scaled_to_zero_by_design_is_ready() -> None:
    idle = _deployment(0, 0, 0, generation=3, observed=2)
    readiness = handler_readiness(idle, scale_from_zero=True)
    assert (readiness.status, readiness.reason) == ("True", "ScaledToZero")
    waking = handler_readiness(_deployment(1, 0, 1), scale_from_zero=True)
    assert (waking.status, waking.reason) == ("True", "Waking")
    awake = handler_readiness(_deployment(2, 1, 2), scale_from_zero=True)
    assert (awake.status, awake.reason) == ("True", "Available")
    # Without scale-from-zero a replica short is still not ready.
    assert handler_readiness(_deployment(1, 0, 1)).reason == "Unavailable"


# -- status --------------------------------------------------------------------------------------


def _status(**kwargs: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "owner": OWNER,
        "settings": SETTINGS,
        "spec_error": None,
        "check": CheckResult(CheckState.SUCCEEDED, model_bytes=64, message="ok"),
        "handler": Readiness("True", "Available", "1/1"),
        "previous": {},
        "now": "2026-01-01T00:00:00Z",
    }
    defaults.update(kwargs)
    return desired_status(**defaults)


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_ready_needs_a_verified_model_and_a_ready_handler() -> None:
    ready = _status()
    assert ready["phase"] == "Ready" and ready["ready"] == "True"
    assert ready["modelBytes"] == 64
    assert ready["observedGeneration"] == 3
    assert ready["endpoint"] == "http://gw:8080/v2/models/fn"
    assert all(c["observedGeneration"] == 3 for c in ready["conditions"])

    waiting = _status(handler=Readiness("False", "Unavailable", "0/1"))
    assert _conditions(waiting)["Ready"] == ("False", "HandlerNotReady")
    assert waiting["phase"] == "Pending"

    no_handler = _status(handler=NO_HANDLER)
    assert no_handler["ready"] == "True"

    verifying = _status(check=CheckResult(CheckState.RUNNING), previous={"modelBytes": 64})
    assert _conditions(verifying)["ModelVerified"] == ("Unknown", "Verifying")
    assert verifying["modelBytes"] is None  # the old model's size is not this model's

    failed = _status(check=CheckResult(CheckState.FAILED, message="bad zip"))
    assert failed["phase"] == "Failed"
    assert _conditions(failed)["Ready"] == ("False", "ModelCheckFailed")


def test_invalid_spec_status_names_the_field() -> None:
    status = _status(spec_error="spec.inputs[0].shape: dimensions must be positive", check=None)
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"].startswith("spec.inputs[0].shape")


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = _status(handler=Readiness("False", "Unavailable", "0/1"), now="t1")
    same = _status(handler=Readiness("False", "RollingOut", "0/1"), previous=first, now="t2")
    flipped = _status(previous=first, now="t3")
    by_type = lambda s: {c["type"]: c["lastTransitionTime"] for c in s["conditions"]}  # noqa: E731
    assert by_type(same)["HandlerReady"] == "t1"
    assert by_type(flipped)["HandlerReady"] == "t3"
    assert by_type(flipped)["ModelVerified"] == "t1"


def test_status_patch_only_carries_differences() -> None:
    desired = _status()
    assert status_patch(desired, desired) is None
    current = {**desired, "residentCount": 2, "ready": "False"}
    assert status_patch(current, desired) == {"ready": "True"}
    assert status_patch({}, {"modelBytes": None, "ready": "True"}) == {"ready": "True"}
    assert status_patch({"modelBytes": 5}, {"modelBytes": None}) == {"modelBytes": None}


def test_events_fire_on_transitions_only() -> None:
    pending = _status(
        check=CheckResult(CheckState.RUNNING), handler=Readiness("False", "Creating", "")
    )
    ready = _status(previous=pending)
    events = transition_events(pending["conditions"], ready["conditions"])
    assert {(e.type, e.reason) for e in events} == {
        ("Normal", "ModelVerified"),
        ("Normal", "Ready"),
    }
    assert transition_events(ready["conditions"], _status(previous=ready)["conditions"]) == []

    invalid = _status(spec_error="spec.model: bad", check=None)
    (event,) = transition_events([], invalid["conditions"])
    assert (event.type, event.reason, event.message) == (
        "Warning",
        "InvalidSpec",
        "spec.model: bad",
    )
    again = _status(spec_error="spec.inputs: bad", check=None, previous=invalid)
    assert [e.message for e in transition_events(invalid["conditions"], again["conditions"])] == [
        "spec.inputs: bad"
    ]
