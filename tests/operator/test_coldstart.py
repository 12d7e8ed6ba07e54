"""Handlers from zero: the gateway wakes a scaled-to-zero handler and holds the request.

KMock is the API server (the activator reads the Deployment and patches its scale
subresource over HTTP, so its calls are RBAC-checked like every other); a thread
plays the Deployment controller; a real HTTP server on 127.0.0.1 is the handler.
Requests go through the real gateway app (the hook in scheduler/gateway.py).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kmock_harness import GatewayStandIn, Kube, function_body, operator_running

from gpufaas.core.api import InferenceFunction, parse_manifest
from gpufaas.core.kubeclient import KubeConnection
from gpufaas.scheduler.coldstart import HandlerActivator, KubeDeployments, kubernetes_activator
from gpufaas.scheduler.gateway import create_app
from gpufaas.scheduler.main import build_gateway

pytestmark = pytest.mark.timeout(60)
TIMEOUT = "X-Gpufaas-Timeout-Ms"


class HandlerStandIn:
    """The user's handler container: answers every POST with what it got."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen.append(self.path)
                body = json.dumps(
                    {"path": self.path, "got": json.loads(self.rfile.read(length) or b"null")}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def handler_server() -> Iterator[HandlerStandIn]:
    server = HandlerStandIn()
    yield server
    server.close()


def _function(kube: Kube, ns: str, name: str, **handler: Any) -> InferenceFunction:
    body = function_body(name)
    body["metadata"]["namespace"] = ns
    body["spec"]["handler"] = {"image": "registry.test/pre:1", "minReplicas": 0, "maxReplicas": 2}
    body["spec"]["handler"].update(handler)
    return parse_manifest(body)


def _deployment(kube: Kube, ns: str, name: str, *, replicas: int, ready: int) -> str:
    path = kube.path("apps/v1", "deployments", ns)
    kube.create(
        path,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": f"ifn-{name}-handler"},
            "spec": {"replicas": replicas},
        },
    )
    full = f"{path}/ifn-{name}-handler"
    kube.patch(full + "/status", {"status": {"readyReplicas": ready}})
    return full


def _controller(kube: Kube, path: str, *, delay_s: float) -> threading.Thread:
    """Play the Deployment controller: once scaled to >= 1, a replica is Ready after a while."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            body = kube.get(path) or {}
            if (body.get("spec") or {}).get("replicas", 0) >= 1:
                time.sleep(delay_s)
                kube.patch(path + "/status", {"status": {"readyReplicas": 1}})
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _client(activator: HandlerActivator, functions: list[InferenceFunction]) -> httpx.AsyncClient:
    gateway = build_gateway(manager_urls={}, functions=functions)
    gateway.handler_activator = activator
    app = create_app(gateway)  # not started: no managers needed for the handler route
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def _scale_patches(kube: Kube, ns: str) -> list[dict[str, Any]]:
    return [
        c.__dict__
        for c in kube.calls_by("gpufaas-gateway")
        if c.resource == "deployments/scale" and c.verb == "patch" and c.namespace == ns
    ]


async def test_first_request_to_a_scaled_to_zero_handler_is_answered_within_its_deadline(
    cluster: tuple[Kube, GatewayStandIn], handler_server: HandlerStandIn
) -> None:
    kube, _ = cluster
    ns, name = "cold", "fn-cold"
    path = _deployment(kube, ns, name, replicas=0, ready=0)
    fn = _function(kube, ns, name)
    deployments = KubeDeployments(KubeConnection.load())
    activator = HandlerActivator(deployments=deployments, handler_url=lambda f: handler_server.url)
    controller = _controller(kube, path, delay_s=0.3)
    async with _client(activator, [fn]) as client:
        # Five concurrent first requests: all held, one wake-up.
        answers = await asyncio.gather(
            *(
                client.post(
                    f"/v2/handlers/{name}/embed?x={i}", json={"i": i}, headers={TIMEOUT: "10000"}
                )
                for i in range(5)
            )
        )
    await deployments.aclose()
    controller.join(timeout=5)
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert sorted(a.json()["got"]["i"] for a in answers) == [0, 1, 2, 3, 4]
    assert answers[0].json()["path"].startswith("/embed?x=")
    # 200, not 504: each was answered within the 10 s deadline it gave.
    assert len(_scale_patches(kube, ns)) == 1  # one wake-up for all of them
    assert (kube.get(path) or {})["spec"]["replicas"] == 1


async def test_a_handler_that_never_gets_ready_gives_504_at_the_deadline(
    cluster: tuple[Kube, GatewayStandIn], handler_server: HandlerStandIn
) -> None:
    kube, _ = cluster
    ns, name = "cold-stuck", "fn-stuck"
    _deployment(kube, ns, name, replicas=0, ready=0)
    fn = _function(kube, ns, name)
    deployments = KubeDeployments(KubeConnection.load())
    activator = HandlerActivator(deployments=deployments, handler_url=lambda f: handler_server.url)
    async with _client(activator, [fn]) as client:
        answer = await client.post(f"/v2/handlers/{name}/x", json={}, headers={TIMEOUT: "300"})
        bad = await client.post(f"/v2/handlers/{name}/x", json={}, headers={TIMEOUT: "soon"})
        no_handler = await client.post("/v2/handlers/nobody/x", json={})
    await deployments.aclose()
    assert answer.status_code == 504
    assert "was not Ready within" in answer.json()["error"]
    assert bad.status_code == 400 and no_handler.status_code == 404
    assert len(_scale_patches(kube, ns)) == 1  # it was woken, it just did not come up
    assert not handler_server.requests or all("/x" not in r for r in handler_server.requests)


async def test_the_hold_buffer_is_bounded(
    cluster: tuple[Kube, GatewayStandIn], handler_server: HandlerStandIn
) -> None:
    kube, _ = cluster
    ns, name = "cold-full", "fn-full"
    _deployment(kube, ns, name, replicas=0, ready=0)
    fn = _function(kube, ns, name)
    deployments = KubeDeployments(KubeConnection.load())
    activator = HandlerActivator(
        deployments=deployments, handler_url=lambda f: handler_server.url, max_held_per_function=2
    )
    async with _client(activator, [fn]) as client:
        held = [
            asyncio.create_task(
                client.post(f"/v2/handlers/{name}/x", json={}, headers={TIMEOUT: "1500"})
            )
            for _ in range(2)
        ]
        for _ in range(100):  # bounded: until both are held
            if activator._held.get(f"{ns}/{name}") == 2:
                break
            await asyncio.sleep(0.02)
        overflow = await client.post(f"/v2/handlers/{name}/x", json={}, headers={TIMEOUT: "1500"})
        results = await asyncio.gather(*held)
    await deployments.aclose()
    assert overflow.status_code == 503 and overflow.headers["Retry-After"] == "1"
    assert [r.status_code for r in results] == [504, 504]


async def test_idle_handlers_scale_to_zero_and_busy_ones_do_not(
    cluster: tuple[Kube, GatewayStandIn], handler_server: HandlerStandIn
) -> None:
    kube, _ = cluster
    ns = "cold-idle"
    idle_path = _deployment(kube, ns, "fn-idle", replicas=1, ready=1)
    busy_path = _deployment(kube, ns, "fn-busy", replicas=1, ready=1)
    pinned_path = _deployment(kube, ns, "fn-pinned", replicas=1, ready=1)
    idle = _function(kube, ns, "fn-idle", idleSeconds=60)
    busy = _function(kube, ns, "fn-busy", idleSeconds=60)
    pinned = _function(kube, ns, "fn-pinned", minReplicas=1, idleSeconds=60)
    now = [1000.0]
    deployments = KubeDeployments(KubeConnection.load())
    activator = HandlerActivator(
        deployments=deployments, handler_url=lambda f: handler_server.url, clock=lambda: now[0]
    )
    everything = [idle, busy, pinned]
    assert await activator.scale_idle(everything) == []  # first seen: a full window first
    now[0] += 45
    async with _client(activator, everything) as client:
        assert (await client.post("/v2/handlers/fn-busy/x", json={})).status_code == 200
    now[0] += 30  # 75 s since first seen, 30 s since fn-busy's last request
    assert await activator.scale_idle(everything) == [f"{ns}/fn-idle"]
    await deployments.aclose()
    assert (kube.get(idle_path) or {})["spec"]["replicas"] == 0
    assert (kube.get(busy_path) or {})["spec"]["replicas"] == 1
    assert (kube.get(pinned_path) or {})["spec"]["replicas"] == 1


async def test_with_the_operator_idle_sleeps_and_the_next_request_wakes_it(
    cluster: tuple[Kube, GatewayStandIn], handler_server: HandlerStandIn
) -> None:
    """The whole loop: operator, gateway activator, and status along the way."""
    kube, _ = cluster
    ns, name = "cold-loop", "fn-loop"
    body = function_body(name)
    body["spec"]["handler"] = {"image": "registry.test/pre:1", "minReplicas": 0, "maxReplicas": 2}
    path = kube.path("apps/v1", "deployments", ns, f"ifn-{name}-handler")

    def handler_condition() -> tuple[str, str, Any]:
        current = kube.function(ns, name) or {}
        cond = next(
            (
                c
                for c in (current.get("status") or {}).get("conditions") or []
                if c["type"] == "HandlerReady"
            ),
            {},
        )
        return (
            cond.get("status"),
            cond.get("reason"),
            (current.get("status") or {}).get("handlerReplicas"),
        )

    async def until(predicate: Any, what: str) -> None:
        for _ in range(300):  # bounded: at most ~15 s
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {handler_condition()}")

    now = [1000.0]
    deployments = KubeDeployments(KubeConnection.load())
    activator = HandlerActivator(
        deployments=deployments, handler_url=lambda f: handler_server.url, clock=lambda: now[0]
    )
    with operator_running():
        kube.create(kube.fn_path(ns), body)
        await until(lambda: kube.list(kube.path("batch/v1", "jobs", ns)), "the check Job")
        job = kube.list(kube.path("batch/v1", "jobs", ns))[0]
        kube.complete_check(ns, job["metadata"]["name"])
        await until(lambda: kube.get(path), "the handler Deployment")
        kube.make_deployment_ready(ns, f"ifn-{name}-handler")
        await until(lambda: handler_condition() == ("True", "Available", 1), "Available")
        fn = parse_manifest(kube.function(ns, name) or {})

        # Idle past its window: the gateway scales it to zero; the operator reports it.
        assert await activator.scale_idle([fn]) == []
        now[0] += 301
        assert await activator.scale_idle([fn]) == [f"{ns}/{name}"]
        kube.patch(path + "/status", {"status": {"readyReplicas": 0}})  # the pods are gone
        await until(lambda: handler_condition() == ("True", "ScaledToZero", 0), "ScaledToZero")
        assert (kube.function(ns, name) or {})["status"]["ready"] == "True"
        fetches = kube.requests_to("GET", kube.fn_path(ns, name))
        await until(
            lambda: kube.requests_to("GET", kube.fn_path(ns, name)) >= fetches + 2, "resyncs"
        )
        assert (kube.get(path) or {})["spec"]["replicas"] == 0  # the operator kept it asleep

        # The next request wakes it and is answered; the status follows.
        controller = _controller(kube, path, delay_s=0.2)
        async with _client(activator, [fn]) as client:
            answer = await client.post(
                f"/v2/handlers/{name}/run", json={"a": 1}, headers={TIMEOUT: "10000"}
            )
        controller.join(timeout=5)
        assert answer.status_code == 200 and answer.json()["got"] == {"a": 1}
        await until(lambda: handler_condition() == ("True", "Available", 1), "Available again")
        kube.delete(kube.fn_path(ns, name))
        await until(lambda: kube.function(ns, name) is None, "the function deleted")
    await deployments.aclose()


def test_activator_settings_come_from_the_environment() -> None:
    connection = KubeConnection(base_url="http://127.0.0.1:1")
    activator = kubernetes_activator(
        connection, environ={"GPUFAAS_HANDLER_HOLD_SECONDS": "5", "GPUFAAS_HANDLER_MAX_HELD": "7"}
    )
    assert (activator.hold_timeout_s, activator.max_held_per_function) == (5.0, 7)
    with pytest.raises(ValueError, match="GPUFAAS_HANDLER_HOLD_SECONDS"):
        kubernetes_activator(connection, environ={"GPUFAAS_HANDLER_HOLD_SECONDS": "soon"})
