"""Pure reconciliation: an InferenceFunction (plus what exists) -> what should exist.

No I/O here. :mod:`gpufaas.operator.handlers` reads the cluster, calls these
functions, and writes back only what differs, so reconciling twice changes
nothing the second time.

Children of a function ``NAME`` (all controlled by it through an ownerReference):

* Job ``ifn-NAME-check-KEY`` runs ``gpufaas check-model``; KEY hashes the model
  source and tensor signature, so a new model gets a new Job (Jobs are immutable).
* Deployment and Service ``ifn-NAME-handler`` when ``spec.handler`` is set.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.utils.quantity import parse_quantity

from gpufaas.core.api import (
    API_VERSION,
    KIND,
    Handler,
    InferenceFunctionSpec,
    Phase,
    child_name,
)
from gpufaas.core.api import handler_name as function_handler_name
from gpufaas.core.modelcheck import parse_check_message
from gpufaas.operator.settings import OperatorSettings

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "gpufaas"
FUNCTION_LABEL = "gpufaas.dev/function"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MODEL_KEY_ANNOTATION = "gpufaas.dev/model-key"
CHECK_COMPONENT = "model-check"
HANDLER_COMPONENT = "handler"
CHECK_CONTAINER = "check"
HANDLER_CONTAINER = "handler"

# Condition types.
MODEL_VERIFIED = "ModelVerified"
HANDLER_READY = "HandlerReady"
READY = "Ready"

# The uid the project's images run as; pods we create run as it too.
RUN_AS_USER = 10001
CACHE_MOUNT = "/var/cache/gpufaas"

ConditionStatus = Literal["True", "False", "Unknown"]
JSON = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The identifying bits of an InferenceFunction that its children refer to."""

    name: str
    namespace: str
    uid: str
    generation: int | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body.get("metadata", {})
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid", ""),
            generation=meta.get("generation"),
        )


# -- names, labels, references -------------------------------------------------------------------


def handler_name(owner: Owner) -> str:
    return function_handler_name(owner.name)


_CHECKED_FIELDS = {"model", "inputs", "outputs"}


def model_key(spec: InferenceFunctionSpec) -> str:
    """Hash of what the model check depends on: the source and the tensor signature."""
    relevant = spec.model_dump(mode="json", by_alias=True, include=_CHECKED_FIELDS)
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def check_job_name(owner: Owner, spec: InferenceFunctionSpec) -> str:
    return child_name(owner.name, f"check-{model_key(spec)}")


def child_labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        MANAGED_BY_LABEL: MANAGED_BY,
        PART_OF_LABEL: "gpufaas",
        COMPONENT_LABEL: component,
        FUNCTION_LABEL: owner.name,
    }


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    return {FUNCTION_LABEL: owner.name, COMPONENT_LABEL: component}


def owner_reference(owner: Owner) -> JSON:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    owner: Owner, name: str, component: str, annotations: Mapping[str, str] | None = None
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": owner.namespace,
        "labels": child_labels(owner, component),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def is_controlled_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid and ref.get("controller") for ref in refs)


# -- security ------------------------------------------------------------------------------------


def _pod_security_context() -> JSON:
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security_context() -> JSON:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


# -- desired children ----------------------------------------------------------------------------


def desired_check_job(
    owner: Owner, spec: InferenceFunctionSpec, settings: OperatorSettings
) -> JSON:
    """The Job that runs ``gpufaas check-model`` on the spec; its result is the pod's exit message."""
    # Only what the check uses (and what model_key hashes), so the Job matches its name.
    spec_json = spec.model_dump_json(by_alias=True, exclude_none=True, include=_CHECKED_FIELDS)
    container: JSON = {
        "name": CHECK_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["gpufaas"],
        # --kubernetes: the URI policy for cluster fetches (no file://, no loopback or metadata hosts).
        "args": [
            "check-model",
            "--kubernetes",
            "--spec-json",
            spec_json,
            "--cache-dir",
            CACHE_MOUNT,
        ],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "GPUFAAS_CACHE_DIR", "value": CACHE_MOUNT},
        ],
        "resources": {
            "requests": {
                "cpu": settings.check_cpu_request,
                "memory": settings.check_memory_request,
            },
            "limits": {"memory": settings.check_memory_limit},
        },
        "terminationMessagePath": "/dev/termination-log",
        # A crash before the report is written still leaves the last log lines as the reason.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security_context() | {"runAsUser": RUN_AS_USER},
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if settings.artifact_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.artifact_secret, "optional": True}}]
    name = check_job_name(owner, spec)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            owner, name, CHECK_COMPONENT, {MODEL_KEY_ANNOTATION: model_key(spec)}
        ),
        "spec": {
            "backoffLimit": settings.check_backoff_limit,
            "activeDeadlineSeconds": settings.check_deadline_seconds,
            "template": {
                "metadata": {"labels": child_labels(owner, CHECK_COMPONENT)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context() | {"fsGroup": RUN_AS_USER},
                    "containers": [container],
                    "volumes": [
                        {"name": "cache", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def clamp_replicas(handler: Handler, current: int | None) -> int:
    """Keep a replica count someone else chose (an autoscaler) if it is within [min, max]."""
    wanted = max(handler.min_replicas, 1) if current is None else current
    return max(handler.min_replicas, min(handler.max_replicas, wanted))


def desired_handler_deployment(
    owner: Owner, handler: Handler, settings: OperatorSettings, *, current_replicas: int | None
) -> JSON:
    name = handler_name(owner)
    labels = child_labels(owner, HANDLER_COMPONENT)
    probe_port = "http"
    container: JSON = {
        "name": HANDLER_CONTAINER,
        "image": handler.image,
        "ports": [{"name": "http", "containerPort": handler.port, "protocol": "TCP"}],
        "env": [
            {"name": "GPUFAAS_GATEWAY_URL", "value": settings.gateway_base},
            {"name": "GPUFAAS_FUNCTION", "value": owner.name},
            {"name": "GPUFAAS_MODEL_ENDPOINT", "value": settings.endpoint_for(owner.name)},
            {"name": "PORT", "value": str(handler.port)},
        ],
        "resources": {
            "requests": {
                "cpu": settings.handler_cpu_request,
                "memory": settings.handler_memory_request,
            },
            "limits": {"memory": settings.handler_memory_limit},
        },
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": probe_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": probe_port},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": _container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, HANDLER_COMPONENT),
        "spec": {
            "replicas": clamp_replicas(handler, current_replicas),
            "selector": {"matchLabels": selector_labels(owner, HANDLER_COMPONENT)},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def desired_handler_service(owner: Owner, handler: Handler) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, handler_name(owner), HANDLER_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner, HANDLER_COMPONENT),
            "ports": [
                {"name": "http", "port": handler.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


# -- desired vs actual ---------------------------------------------------------------------------


# Maps whose values are resource Quantities: the API server stores them canonically
# ("0.1" comes back as "100m", "1024Mi" as "1Gi"), so they are compared by value.
_QUANTITY_MAPS = frozenset({"requests", "limits"})


def is_subset(desired: Any, actual: Any, *, quantities: bool = False) -> bool:
    """Does ``actual`` contain everything in ``desired``? Extra keys (server defaults) are fine.

    Dicts compare key by key; lists must have the same length and match item by item.
    Values of ``requests``/``limits`` maps compare as Quantities (by value, not by text).
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual
            and is_subset(value, actual[key], quantities=quantities or key in _QUANTITY_MAPS)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    if type(desired) is type(actual) and desired == actual:
        return True
    if quantities:
        return same_quantity(desired, actual)
    return _same_number(desired, actual)


def same_quantity(a: Any, b: Any) -> bool:
    """``0.1`` and ``100m``, ``1024Mi`` and ``1Gi``: the same Quantity written two ways."""
    try:
        return bool(parse_quantity(a) == parse_quantity(b))  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        return False


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    both = isinstance(a, numbers) and isinstance(b, numbers)
    return both and not isinstance(a, bool) and not isinstance(b, bool) and a == b


def update_patch(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> JSON | None:
    """A JSON merge patch that brings ``actual`` to ``desired``, or None if nothing differs.

    Lists are replaced whole by merge patches, which is what a rollout wants. A Job's
    spec is immutable, so only its metadata is reconciled. The patch carries the
    resourceVersion it was computed from: if the object changed meanwhile (an
    autoscaler moved the replicas, say) the API server answers 409 and the operator
    re-reads instead of overwriting that change.
    """
    meta_keys = ("labels", "annotations", "ownerReferences")
    meta = {k: desired["metadata"][k] for k in meta_keys if k in desired["metadata"]}
    patch: JSON = {}
    if not is_subset(meta, actual.get("metadata", {})):
        patch["metadata"] = meta
    if desired.get("kind") != "Job" and not is_subset(
        desired.get("spec", {}), actual.get("spec", {})
    ):
        patch["spec"] = desired["spec"]
    if not patch:
        return None
    version = actual.get("metadata", {}).get("resourceVersion")
    if version:
        patch["metadata"] = {**patch.get("metadata", {}), "resourceVersion": version}
    return patch


# -- observing children --------------------------------------------------------------------------


class CheckState(enum.StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class CheckResult:
    state: CheckState
    model_bytes: int | None = None
    message: str = ""


def _job_condition(job: Mapping[str, Any], kind: str) -> bool:
    conditions = job.get("status", {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def _termination_messages(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Termination messages of the check container, newest pod first."""
    ordered = sorted(
        pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True
    )
    messages = []
    for pod in ordered:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if status.get("name") != CHECK_CONTAINER:
                continue
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                messages.append(str(terminated["message"]))
    return messages


def check_result(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> CheckResult:
    """What the model-check Job says: still running, verified (with the size), or failed (why)."""
    status = job.get("status", {})
    succeeded = _job_condition(job, "Complete") or (status.get("succeeded") or 0) > 0
    failed = _job_condition(job, "Failed")
    if not succeeded and not failed:
        return CheckResult(CheckState.RUNNING, message="the model check is running")
    messages = _termination_messages(pods)
    outcomes = [o for o in (parse_check_message(m) for m in messages) if o is not None]
    if succeeded:
        report = next((o.report for o in outcomes if o.ok and o.report is not None), None)
        if report is None:
            return CheckResult(
                CheckState.SUCCEEDED, message="verified (report no longer available)"
            )
        return CheckResult(
            CheckState.SUCCEEDED,
            model_bytes=report.tensor_bytes,
            message=f"loaded {report.format.value} model, {report.tensor_bytes} tensor bytes",
        )
    error = next((o.error for o in outcomes if not o.ok and o.error), None)
    if error is None:
        error = messages[0][-1000:] if messages else _failed_reason(job)
    return CheckResult(CheckState.FAILED, message=error)


def _failed_reason(job: Mapping[str, Any]) -> str:
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"model check Job failed: {c.get('reason', '')} {c.get('message', '')}".strip()
    return "model check Job failed"


@dataclass(frozen=True)
class Readiness:
    status: ConditionStatus
    reason: str
    message: str


NO_HANDLER = Readiness("True", "NotRequired", "no handler configured")


SCALED_TO_ZERO = "ScaledToZero"


def handler_readiness(
    deployment: Mapping[str, Any] | None, *, scale_from_zero: bool = False
) -> Readiness:
    """HandlerReady from the Deployment: every wanted replica updated and ready.

    With ``scale_from_zero`` (``minReplicas: 0``) the function stays servable while its
    handler sleeps or wakes: at zero replicas (``ScaledToZero``) or with none ready yet
    (``Waking``) the gateway holds requests until a replica is Ready, so withdrawing the
    function then would turn a cold start into 404s.
    """
    if deployment is None:
        return Readiness("False", "Creating", "the handler Deployment is being created")
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    wanted = int(spec.get("replicas", 1))
    if scale_from_zero:
        ready_now = int(status.get("readyReplicas") or 0)
        if wanted == 0:
            return Readiness(
                "True", SCALED_TO_ZERO, "scaled to zero while idle; the next request wakes it"
            )
        if ready_now == 0:
            return Readiness(
                "True", "Waking", "a replica is starting; the gateway holds requests meanwhile"
            )
        return Readiness("True", "Available", f"{ready_now}/{wanted} handler replicas ready")
    generation = deployment.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return Readiness("False", "RollingOut", "the handler Deployment is rolling out")
    if wanted == 0:
        return Readiness("False", SCALED_TO_ZERO, "the handler has 0 replicas")
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    if updated < wanted:
        return Readiness("False", "RollingOut", f"{updated}/{wanted} handler replicas updated")
    if ready < wanted:
        return Readiness("False", "Unavailable", f"{ready}/{wanted} handler replicas ready")
    return Readiness("True", "Available", f"{ready}/{wanted} handler replicas ready")


# -- status --------------------------------------------------------------------------------------


def _condition(
    type_: str, status: ConditionStatus, reason: str, message: str, *, generation: int | None,
    previous: Mapping[str, Mapping[str, Any]], now: str,
) -> JSON:  # fmt: skip
    before = previous.get(type_)
    unchanged = before is not None and before.get("status") == status
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        # The time the status last flipped, not the time we last looked.
        "lastTransitionTime": (before or {}).get("lastTransitionTime") if unchanged else now,
        "observedGeneration": generation,
    }


def desired_status(
    *,
    owner: Owner,
    settings: OperatorSettings,
    spec_error: str | None,
    check: CheckResult | None,
    handler: Readiness,
    previous: Mapping[str, Any],
    now: str,
    handler_replicas: int | None = None,
    shards: Sequence[Mapping[str, Any]] = (),
) -> JSON:
    """The operator's part of ``status`` (it leaves residentOn/residentCount to the gateway).

    ``handlerReplicas`` is the handler Deployment's replica count (0: scaled to zero);
    ``shards`` the planned placement of a parallel function's shards.
    """
    before = {
        c.get("type", ""): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)
    }
    gen = owner.generation
    verified: tuple[ConditionStatus, str, str]
    ready: tuple[ConditionStatus, str, str]
    if spec_error is not None:
        verified = ("Unknown", "InvalidSpec", "not checked: the spec is invalid")
        handler = Readiness("Unknown", "InvalidSpec", "not deployed: the spec is invalid")
        ready = ("False", "InvalidSpec", spec_error)
    else:
        verified = _verified(check)
        ready = _ready(verified[0], handler, check)

    model_bytes = previous.get("modelBytes")
    if check is not None and check.state == CheckState.SUCCEEDED and check.model_bytes is not None:
        model_bytes = check.model_bytes
    elif check is not None and check.state != CheckState.SUCCEEDED:
        model_bytes = None  # a new model is being checked or failed: the old size is wrong

    failed = spec_error is not None or (check is not None and check.state == CheckState.FAILED)
    phase = Phase.FAILED if failed else Phase.READY if ready[0] == "True" else Phase.PENDING
    return {
        "phase": phase.value,
        "conditions": [
            _condition(MODEL_VERIFIED, verified[0], verified[1], verified[2], generation=gen, previous=before, now=now),
            _condition(HANDLER_READY, handler.status, handler.reason, handler.message, generation=gen, previous=before, now=now),
            _condition(READY, ready[0], ready[1], ready[2], generation=gen, previous=before, now=now),
        ],
        "observedGeneration": gen,
        "modelBytes": model_bytes,
        "endpoint": settings.endpoint_for(owner.name),
        "ready": ready[0],
        "handlerReplicas": handler_replicas,
        "shards": [dict(s) for s in shards] or None,
    }  # fmt: skip


def _verified(check: CheckResult | None) -> tuple[ConditionStatus, str, str]:
    if check is None or check.state == CheckState.RUNNING:
        return ("Unknown", "Verifying", check.message if check else "the model check is starting")
    if check.state == CheckState.SUCCEEDED:
        return ("True", "Verified", check.message)
    return ("False", "CheckFailed", check.message)


def _ready(
    verified: str, handler: Readiness, check: CheckResult | None
) -> tuple[ConditionStatus, str, str]:
    if verified == "True" and handler.status == "True":
        return ("True", "Ready", "serving through the gateway")
    if verified == "False":
        return ("False", "ModelCheckFailed", check.message if check else "")
    if verified != "True":
        return ("False", "Verifying", "waiting for the model check")
    return ("False", "HandlerNotReady", handler.message)


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> JSON | None:
    """Merge patch for the keys that differ (None deletes), or None when all match."""
    patch = {
        k: v
        for k, v in desired.items()
        if current.get(k) != v and not (v is None and k not in current)
    }
    return patch or None


@dataclass(frozen=True)
class EventSpec:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


# (condition type, status, reason) -> event. Only these transitions are worth an Event.
_EVENTS: dict[tuple[str, str, str | None], tuple[Literal["Normal", "Warning"], str]] = {
    (READY, "False", "InvalidSpec"): ("Warning", "InvalidSpec"),
    (MODEL_VERIFIED, "False", None): ("Warning", "ModelCheckFailed"),
    (MODEL_VERIFIED, "True", None): ("Normal", "ModelVerified"),
    (READY, "True", None): ("Normal", "Ready"),
}


def transition_events(
    previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[EventSpec]:
    """Events for conditions that changed status or reason (or, when invalid, the message)."""
    before = {c.get("type"): c for c in previous}
    events = []
    for cond in current:
        old = before.get(cond["type"]) or {}
        fields = (
            ("status", "reason", "message")
            if cond["reason"] == "InvalidSpec"
            else ("status", "reason")
        )
        if all(old.get(f) == cond[f] for f in fields):
            continue
        key = (cond["type"], cond["status"], cond["reason"])
        wildcard = (cond["type"], cond["status"], None)
        rule = _EVENTS.get(key) or _EVENTS.get(wildcard)
        if rule is not None:
            events.append(EventSpec(type=rule[0], reason=rule[1], message=cond["message"]))
    return events
