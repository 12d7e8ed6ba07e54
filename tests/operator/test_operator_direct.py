"""One reconcile at a time, called directly against KMock (no kopf loop to retry for us).

So each test sees exactly what a single ``reconcile_named`` call does: a 409 is
re-read and retried within the call, a scaled-to-zero handler is reported and left
at zero, and a parallel function's shards get a placement in status.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kmock_harness import Fault, GatewayStandIn, Kube, function_body

from gpufaas.core.kubeclient import KubeConnection
from gpufaas.operator.handlers import OperatorState, reconcile_named
from gpufaas.operator.kubeapi import KubeApi
from gpufaas.operator.settings import OperatorSettings

pytestmark = pytest.mark.timeout(60)
LOGGER = logging.getLogger("test-operator-direct")


@pytest.fixture()
async def state(cluster: tuple[Kube, GatewayStandIn]) -> AsyncIterator[OperatorState]:
    import kopf
    from kopf._core.engines import posting  # Events go to kopf's queue, as inside kopf

    queue: asyncio.Queue[Any] = asyncio.Queue()
    tokens = (
        posting.event_queue_var.set(queue),
        posting.event_queue_loop_var.set(asyncio.get_running_loop()),
        posting.settings_var.set(kopf.OperatorSettings()),
    )
    api = KubeApi(KubeConnection.load())
    yield OperatorState(settings=OperatorSettings.from_env(os.environ), api=api)
    await api.aclose()
    posting.settings_var.reset(tokens[2])
    posting.event_queue_loop_var.reset(tokens[1])
    posting.event_queue_var.reset(tokens[0])


def _condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in body["status"]["conditions"] if c["type"] == type_)


async def test_a_409_is_reread_and_retried_within_the_reconcile(
    cluster: tuple[Kube, GatewayStandIn], state: OperatorState
) -> None:
    kube, _ = cluster
    ns, fn = "conflict", "fn-conflict"
    kube.create(kube.fn_path(ns), function_body(fn, handler=False))
    status_path = kube.fn_path(ns, fn) + "/status"
    kube.emulator.faults.append(Fault("PATCH", status_path, 409))
    start = len(kube.emulator.log)

    await reconcile_named(state, namespace=ns, name=fn, logger=LOGGER)
    requests = list(kube.emulator.log[start:])

    body = kube.function(ns, fn)
    assert body is not None and body["status"]["observedGeneration"] == 1
    assert _condition(body, "ModelVerified")["reason"] == "Verifying"
    to_fn = [(m, p) for m, p in requests if p.startswith(kube.fn_path(ns, fn))]
    # read, write (409), read again, write again (accepted).
    assert to_fn == [
        ("GET", kube.fn_path(ns, fn)),
        ("PATCH", status_path),
        ("GET", kube.fn_path(ns, fn)),
        ("PATCH", status_path),
    ]
    assert kube.emulator.faults[-1].times == 0


async def test_a_stale_resource_version_is_refused_by_the_server(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    """The emulator's 409 on a stale resourceVersion is what the status write relies on."""
    kube, _ = cluster
    ns, fn = "conflict", "fn-stale"
    created = kube.create(kube.fn_path(ns), function_body(fn, handler=False))
    kube.patch(kube.fn_path(ns, fn), {"metadata": {"labels": {"touched": "yes"}}})
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}}
    response = kube.http.patch(
        kube.fn_path(ns, fn) + "/status",
        json={**stale, "status": {"phase": "Ready"}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 409


async def test_scaled_to_zero_handler_is_reported_and_left_at_zero(
    cluster: tuple[Kube, GatewayStandIn], state: OperatorState
) -> None:
    kube, _ = cluster
    ns, fn = "zero", "fn-zero"
    body = function_body(fn)
    body["spec"]["handler"] = {"image": "registry.test/pre:1", "minReplicas": 0, "maxReplicas": 2}
    kube.create(kube.fn_path(ns), body)
    await reconcile_named(state, namespace=ns, name=fn, logger=LOGGER)
    deployment_path = kube.path("apps/v1", "deployments", ns, f"ifn-{fn}-handler")
    deployment = kube.get(deployment_path)
    assert deployment is not None and deployment["spec"]["replicas"] == 1  # first deploy: awake
    job = kube.list(kube.path("batch/v1", "jobs", ns))[0]
    kube.complete_check(ns, job["metadata"]["name"])

    # The gateway scaled it to zero after its idle window.
    kube.patch(deployment_path, {"spec": {"replicas": 0}})
    patches_before = kube.mutations("deployments")
    await reconcile_named(state, namespace=ns, name=fn, logger=LOGGER)

    current = kube.function(ns, fn)
    assert current is not None
    handler = _condition(current, "HandlerReady")
    assert (handler["status"], handler["reason"]) == ("True", "ScaledToZero")
    assert current["status"]["handlerReplicas"] == 0
    assert current["status"]["ready"] == "True"  # still served: the gateway wakes it
    assert kube.mutations("deployments") == patches_before  # not scaled back up


async def test_parallel_shards_are_placed_over_the_gateways_devices(
    cluster: tuple[Kube, GatewayStandIn], state: OperatorState
) -> None:
    kube, gateway = cluster
    gateway.cluster_state = {
        "nodes": [
            {"name": "gpu-a", "healthy": True},
            {"name": "gpu-b", "healthy": True},
            {"name": "gpu-c", "healthy": False},
        ],
        "devices": [
            {"key": "gpu-a/cuda:0"},
            {"key": "gpu-a/cuda:1"},
            {"key": "gpu-b/cuda:0"},
            {"key": "gpu-c/cuda:0"},
        ],
    }
    ns, fn = "shards", "fn-shards"
    body = function_body(fn, handler=False, parallelism={"shards": 3, "strategy": "layer"})
    kube.create(kube.fn_path(ns), body)
    await reconcile_named(state, namespace=ns, name=fn, logger=LOGGER)

    current = kube.function(ns, fn)
    assert current is not None
    assert current["status"]["shards"] == [
        {"index": 0, "node": "gpu-a", "device": "cuda:0"},
        {"index": 1, "node": "gpu-b", "device": "cuda:0"},
        {"index": 2, "node": "gpu-a", "device": "cuda:1"},
    ]
    assert gateway.cluster_reads[-1] == "Bearer admin-secret"

    # The gateway goes away: the last plan stands rather than flapping to nothing.
    gateway.cluster_state = None
    await reconcile_named(state, namespace=ns, name=fn, logger=LOGGER)
    again = kube.function(ns, fn)
    assert again is not None and again["status"]["shards"] == current["status"]["shards"]
