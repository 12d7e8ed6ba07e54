"""kopf handlers for InferenceFunction: thin glue over :mod:`gpufaas.operator.reconcile`.

Every trigger runs the same idempotent ``reconcile_function`` under a per-object
lock: creation and spec updates (``on.create``/``on.update``), a per-object
resync daemon (every ``GPUFAAS_RESYNC_SECONDS``; it also runs once at operator
start, which covers resuming), and changes to our children (Jobs, Deployments,
Services labelled ``app.kubernetes.io/managed-by=gpufaas``), so a finished
model check or a child deleted by hand is handled within moments.

Deletion goes through kopf's finalizer (``gpufaas.dev/finalizer``): the delete
handler asks the gateway to unload the model, with bounded retries, then lets
the object go; Kubernetes' garbage collector removes the children.

Run with ``gpufaas operator`` (:mod:`gpufaas.operator.main`), or
``kopf run -A --standalone -m gpufaas.operator.handlers``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from gpufaas.core.api import (
    API_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    InferenceFunctionSpec,
    ManifestError,
    parse_spec,
)
from gpufaas.core.kubeclient import KubeConnection
from gpufaas.operator.kubeapi import (
    DEPLOYMENTS,
    JOBS,
    PODS,
    SERVICES,
    Conflict,
    Kind,
    KubeApi,
)
from gpufaas.operator.placement import fetch_devices, plan_shards
from gpufaas.operator.reconcile import (
    CHECK_COMPONENT,
    COMPONENT_LABEL,
    FUNCTION_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NO_HANDLER,
    CheckResult,
    CheckState,
    Owner,
    Readiness,
    check_result,
    desired_check_job,
    desired_handler_deployment,
    desired_handler_service,
    desired_status,
    handler_name,
    handler_readiness,
    is_controlled_by,
    status_patch,
    transition_events,
    update_patch,
)
from gpufaas.operator.settings import OperatorSettings
from gpufaas.operator.unload import unload_model

FUNCTIONS = Kind(API_VERSION, PLURAL)
FINALIZER = "gpufaas.dev/finalizer"
# A 409 means someone changed the object between our read and our write: re-read, retry.
CONFLICT_ATTEMPTS = 5
MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}
_MEMO_KEY = "gpufaas"

JSON = dict[str, Any]
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class OperatorState:
    """Shared by all handlers of one operator run (kept in kopf's global memo)."""

    settings: OperatorSettings
    api: KubeApi
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def lock_for(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault((namespace, name), asyncio.Lock())


def _state(memo: Mapping[str, Any]) -> OperatorState:
    state = memo.get(_MEMO_KEY)
    if not isinstance(state, OperatorState):
        raise kopf.PermanentError("operator state missing: the startup handler did not run")
    return state


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- lifecycle -----------------------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    """kopf settings (standalone, state in annotations) and our own from the environment."""
    settings.peering.standalone = True  # one replica (Recreate strategy): no peering CRD needed
    # The CRD is installed before the operator (Helm's crds/): no need to watch CRDs or namespaces,
    # and no RBAC for them. Namespaces given with --namespace are exact names, not globs.
    settings.scanning.disabled = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpufaas.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="gpufaas.dev", key="last-handled-configuration"
    )
    # Our own Events (kopf.event) always post; kopf's log-derived Events only from warnings up.
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 30.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    ours = OperatorSettings.from_env(os.environ)
    memo[_MEMO_KEY] = OperatorState(settings=ours, api=KubeApi(KubeConnection.load()))
    logger.info("gpufaas operator: image %s, gateway %s", ours.image, ours.gateway_base)


@kopf.on.cleanup()
async def close(memo: Any, **_: Any) -> None:
    state = memo.get(_MEMO_KEY)
    if isinstance(state, OperatorState):
        await state.api.aclose()


# -- triggers ------------------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_change(name: str, namespace: str | None, memo: Any, logger: Logger, **_: Any) -> None:
    await reconcile_named(_state(memo), namespace=namespace or "default", name=name, logger=logger)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def resync(
    name: str,
    namespace: str | None,
    memo: Any,
    stopped: kopf.DaemonStopped,
    logger: Logger,
    **_: Any,
) -> None:
    """Re-reconcile periodically: the safety net for any missed child event."""
    state = _state(memo)
    while not stopped:
        try:
            await reconcile_named(state, namespace=namespace or "default", name=name, logger=logger)
        except Exception as e:  # keep the loop alive; the next round retries
            logger.warning("resync of %s/%s failed: %s", namespace, name, e)
        await stopped.wait(state.settings.resync_seconds)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
async def on_child_event(type: str, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    """A child changed or vanished: reconcile its function (recreates, reads results)."""
    if type not in {"MODIFIED", "DELETED"}:
        return  # ADDED is our own create or the initial listing; the daemon covers startup
    owner_name = body.get("metadata", {}).get("labels", {}).get(FUNCTION_LABEL)
    namespace = body.get("metadata", {}).get("namespace")
    if owner_name and namespace:
        await reconcile_named(_state(memo), namespace=namespace, name=owner_name, logger=logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(name: str, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    """Unload the model through the gateway, then let the object go (even if that failed)."""
    settings = _state(memo).settings
    result = await unload_model(
        settings.unload_url_for(name),
        attempts=settings.unload_attempts,
        timeout_s=settings.unload_timeout_seconds,
        backoff_s=settings.unload_backoff_seconds,
        token=settings.admin_token.get_secret_value() if settings.admin_token else None,
    )
    if result.done:
        logger.info("unloaded %s from the gateway (%s)", name, result.detail)
        return
    message = f"gateway unload failed after {result.attempts} attempt(s): {result.detail}; deleting anyway"
    logger.warning(message)
    kopf.warn(body, reason="UnloadFailed", message=message)


# -- reconciliation (I/O edge) -------------------------------------------------------------------


async def reconcile_named(
    state: OperatorState, *, namespace: str, name: str, logger: Logger
) -> None:
    """Fetch the function fresh and reconcile it, one reconcile per function at a time.

    Writes carry the resourceVersion they were computed from. On a 409 (the function or
    a child changed meanwhile) everything is read again and reconciled from that, a
    bounded number of times; the next trigger or resync takes over after that.
    """
    async with state.lock_for(namespace, name):
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            body = await state.api.get(FUNCTIONS, namespace, name)
            if body is None or body.get("metadata", {}).get("deletionTimestamp"):
                return
            try:
                await reconcile_function(state.api, state.settings, body, logger=logger)
                return
            except Conflict as e:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                logger.info("conflict reconciling %s/%s (%s); re-reading", namespace, name, e)


async def reconcile_function(
    api: KubeApi, settings: OperatorSettings, body: Mapping[str, Any], *, logger: Logger
) -> None:
    owner = Owner.from_body(body)
    previous: Mapping[str, Any] = body.get("status") or {}
    try:
        spec = parse_spec(body.get("spec") or {})
    except ManifestError as e:
        status = desired_status(
            owner=owner, settings=settings, spec_error=str(e), check=None, handler=NO_HANDLER,
            previous=previous, now=_now(),
        )  # fmt: skip
        await _write_status(api, body, owner, previous, status, logger=logger)
        return

    check = await _ensure_check(api, settings, owner, spec, logger=logger)
    handler, replicas = await _ensure_handler(api, settings, owner, spec, logger=logger)
    shards = await _plan_shards(settings, spec, previous)
    status = desired_status(
        owner=owner, settings=settings, spec_error=None, check=check, handler=handler,
        previous=previous, now=_now(), handler_replicas=replicas, shards=shards,
    )  # fmt: skip
    await _write_status(api, body, owner, previous, status, logger=logger)


async def _write_status(
    api: KubeApi,
    body: Mapping[str, Any],
    owner: Owner,
    previous: Mapping[str, Any],
    status: JSON,
    *,
    logger: Logger,
) -> None:
    patch = status_patch(previous, status)
    if patch is None:
        return
    # Only a status computed from the function as it is now may land (409 otherwise).
    version = body.get("metadata", {}).get("resourceVersion")
    precondition = {"metadata": {"resourceVersion": version}} if version else {}
    await api.patch(
        FUNCTIONS, owner.namespace, owner.name, {**precondition, "status": patch},
        subresource="status",
    )  # fmt: skip
    for event in transition_events(previous.get("conditions") or [], status["conditions"]):
        log = logger.warning if event.type == "Warning" else logger.info
        log("%s: %s", event.reason, event.message)
        kopf.event(
            kopf.Body(cast(kopf.RawBody, dict(body))),
            type=event.type,
            reason=event.reason,
            message=event.message,
        )


async def _ensure(
    api: KubeApi,
    kind: Kind,
    owner: Owner,
    desired: JSON,
    actual: JSON | None,
    *,
    logger: Logger,
) -> JSON | None:
    """Create the child if missing, patch it if it drifted; the object as it is now.

    None while a previous copy is still being deleted (its DELETED event brings us back).
    An object with our name that gpufaas does not manage is left alone.
    """
    name = desired["metadata"]["name"]
    if actual is not None and actual.get("metadata", {}).get("deletionTimestamp"):
        return None
    if actual is None:
        try:
            created = await api.create(kind, owner.namespace, desired)
        except Conflict:
            actual = await api.get(kind, owner.namespace, name)
            if actual is None:
                return None
        else:
            logger.info("created %s %s", desired["kind"], name)
            return created
    labels = actual.get("metadata", {}).get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY and not is_controlled_by(actual, owner):
        logger.warning(
            "%s %s exists and is not managed by gpufaas; leaving it alone", desired["kind"], name
        )
        return actual
    patch = update_patch(desired, actual)
    if patch is None:
        return actual
    logger.info("updating %s %s", desired["kind"], name)
    return await api.patch(kind, owner.namespace, name, patch)


async def _ensure_check(
    api: KubeApi,
    settings: OperatorSettings,
    owner: Owner,
    spec: InferenceFunctionSpec,
    *,
    logger: Logger,
) -> CheckResult:
    desired = desired_check_job(owner, spec, settings)
    name = desired["metadata"]["name"]
    job = await _ensure(
        api, JOBS, owner, desired, await api.get(JOBS, owner.namespace, name), logger=logger
    )
    # Checks of an older model of this function are obsolete.
    mine = {FUNCTION_LABEL: owner.name, COMPONENT_LABEL: CHECK_COMPONENT}
    for other in await api.list(JOBS, owner.namespace, labels=mine):
        other_name = other.get("metadata", {}).get("name")
        if other_name != name and is_controlled_by(other, owner):
            logger.info("deleting obsolete model check %s", other_name)
            await api.delete(JOBS, owner.namespace, other_name)
    if job is None:
        return CheckResult(CheckState.RUNNING, message="waiting for the previous check Job to go")
    outcome = check_result(job, [])
    if outcome.state == CheckState.RUNNING:
        return outcome
    pods = await api.list(PODS, owner.namespace, labels={"job-name": name})
    return check_result(job, pods)


async def _ensure_handler(
    api: KubeApi,
    settings: OperatorSettings,
    owner: Owner,
    spec: InferenceFunctionSpec,
    *,
    logger: Logger,
) -> tuple[Readiness, int | None]:
    """The handler's readiness, and its replica count now (None without a handler)."""
    name = handler_name(owner)
    deployment = await api.get(DEPLOYMENTS, owner.namespace, name)
    service = await api.get(SERVICES, owner.namespace, name)
    if spec.handler is None:
        for kind, child in ((DEPLOYMENTS, deployment), (SERVICES, service)):
            if child is not None and is_controlled_by(child, owner):
                logger.info("deleting handler %s %s: spec.handler was removed", kind.plural, name)
                await api.delete(kind, owner.namespace, name)
        return NO_HANDLER, None
    current = None if deployment is None else deployment.get("spec", {}).get("replicas")
    desired = desired_handler_deployment(owner, spec.handler, settings, current_replicas=current)
    deployment = await _ensure(api, DEPLOYMENTS, owner, desired, deployment, logger=logger)
    await _ensure(
        api, SERVICES, owner, desired_handler_service(owner, spec.handler), service, logger=logger
    )
    readiness = handler_readiness(deployment, scale_from_zero=spec.handler.min_replicas == 0)
    replicas = None if deployment is None else deployment.get("spec", {}).get("replicas")
    return readiness, None if replicas is None else int(replicas)


async def _plan_shards(
    settings: OperatorSettings, spec: InferenceFunctionSpec, previous: Mapping[str, Any]
) -> list[JSON]:
    """``status.shards`` for a parallel function: planned over the gateway's healthy devices.

    When the gateway cannot be asked, the last plan stands (a new plan needs its devices).
    """
    if spec.parallelism is None:
        return []
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    devices = await fetch_devices(settings.gateway_base, token=token)
    if devices is None:
        kept: list[JSON] = list(previous.get("shards") or [])
        return kept if len(kept) == spec.parallelism.shards else []
    return plan_shards(devices, spec.parallelism.shards)
