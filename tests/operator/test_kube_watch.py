"""The gateway's Kubernetes mode (gpufaas.scheduler.kube) against KMock over HTTP."""

from __future__ import annotations

import asyncio
import http.server
import threading
from typing import Any

import pytest
from kmock_harness import GatewayStandIn, Kube, function_body

from gpufaas.core.api import InferenceFunction
from gpufaas.scheduler.kube import (
    KubeConnection,
    decide,
    discover_gpu_managers,
    gpu_manager_urls,
    manager_urls,
    watch_functions,
)
from gpufaas.scheduler.peers import kubernetes_peers

pytestmark = pytest.mark.timeout(60)


def _ready_status(generation: int, ready: str = "True") -> dict[str, Any]:
    return {"status": {"ready": ready, "observedGeneration": generation, "phase": "Ready"}}


class Recorder:
    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()

    async def on_ready(self, function: InferenceFunction) -> None:
        await self.events.put(("ready", function.name, function.spec.model.uri))

    async def on_gone(self, name: str) -> None:
        await self.events.put(("gone", name))

    async def next(self) -> tuple[str, ...]:
        return await asyncio.wait_for(self.events.get(), timeout=10)


async def test_watch_reports_ready_functions_only(cluster: tuple[Kube, GatewayStandIn]) -> None:
    kube, _ = cluster
    ns = "watch"
    connection = KubeConnection.load()  # from $KUBECONFIG, as the gateway does outside a cluster
    assert connection.authorization() == "Bearer test-token"

    pre = function_body("pre", handler=False) | _ready_status(1)
    kube.create(kube.fn_path(ns), pre)
    kube.create(kube.fn_path("elsewhere"), function_body("other", handler=False) | _ready_status(1))
    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(
        watch_functions(
            namespace=ns,
            on_ready=recorder.on_ready,
            on_gone=recorder.on_gone,
            stop=stop,
            connection=connection,
        )
    )
    try:
        assert await recorder.next() == ("ready", "pre", "file:///models/m.pt")

        # Not ready yet: nothing; then the operator marks it Ready.
        kube.create(kube.fn_path(ns), function_body("late", handler=False))
        kube.patch(kube.fn_path(ns, "late") + "/status", _ready_status(1))
        assert await recorder.next() == ("ready", "late", "file:///models/m.pt")

        # A new generation the operator has not seen yet keeps the old decision...
        kube.patch(kube.fn_path(ns, "late"), {"spec": {"model": {"uri": "file:///models/v2.pt"}}})
        # ...until it has verified it.
        kube.patch(kube.fn_path(ns, "late") + "/status", _ready_status(2))
        assert await recorder.next() == ("ready", "late", "file:///models/v2.pt")

        kube.patch(kube.fn_path(ns, "late") + "/status", _ready_status(2, ready="False"))
        assert await recorder.next() == ("gone", "late")

        kube.delete(kube.fn_path(ns, "pre"))
        assert await recorder.next() == ("gone", "pre")
        assert recorder.events.empty()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_watch_retries_a_failing_api_server_until_stopped() -> None:
    hits: list[str] = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    recorder, stop = Recorder(), asyncio.Event()
    try:
        task = asyncio.create_task(
            watch_functions(
                namespace=None,
                on_ready=recorder.on_ready,
                on_gone=recorder.on_gone,
                stop=stop,
                connection=KubeConnection(base_url=f"http://127.0.0.1:{server.server_address[1]}"),
                backoff_s=(0.01, 0.05),
            )
        )
        for _ in range(200):  # bounded: at most ~10 s
            if len(hits) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(hits) >= 3, "the watcher should re-list after each failure"
        assert all(h.startswith("/apis/gpufaas.dev/v1alpha1/inferencefunctions") for h in hits)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert recorder.events.empty()


@pytest.mark.parametrize(
    ("obj", "decision"),
    [
        (
            {"metadata": {"generation": 2}, "status": {"ready": "True", "observedGeneration": 2}},
            "ready",
        ),
        (
            {"metadata": {"generation": 2}, "status": {"ready": "True", "observedGeneration": 1}},
            "pending",
        ),
        (
            {"metadata": {"generation": 2}, "status": {"ready": "False", "observedGeneration": 2}},
            "not-ready",
        ),
        ({"metadata": {"generation": 1}}, "pending"),
        (
            {"metadata": {"generation": 1, "deletionTimestamp": "t"}, "status": {"ready": "True"}},
            "not-ready",
        ),
    ],
)
def test_decide(obj: dict[str, Any], decision: str) -> None:
    assert decide(obj) == decision


def _slice(service: str, port: int, endpoints: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


async def test_discover_gpu_managers_reads_ready_endpoints(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    kube, _ = cluster
    ns, service = "gpufaas", "gpufaas-gpu-manager"
    slices = kube.path("discovery.k8s.io/v1", "endpointslices", ns)
    endpoints = [
        {"addresses": ["10.0.0.1"], "nodeName": "gpu-a", "conditions": {"ready": True}},
        {"addresses": ["10.0.0.2"], "nodeName": "gpu-b", "conditions": {"ready": False}},
        {"addresses": ["10.0.0.3"], "nodeName": "gpu-c", "conditions": {}},
    ]
    kube.create(slices, _slice(service, 8090, endpoints, "mgr-1"))
    kube.create(slices, _slice("someone-else", 80, [{"addresses": ["10.9.9.9"]}], "other-1"))
    connection = KubeConnection.load()
    assert await discover_gpu_managers(namespace=ns, service=service, connection=connection) == [
        "http://10.0.0.1:8090",
        "http://10.0.0.3:8090",
    ]
    by_node = await gpu_manager_urls(namespace=ns, service=service, connection=connection)
    assert by_node == {"gpu-a": "http://10.0.0.1:8090", "gpu-c": "http://10.0.0.3:8090"}
    # The gateway only looks in its own namespace (its Role is there): no slices, no managers.
    assert await discover_gpu_managers(namespace=ns, service="no-such", connection=connection) == []


async def test_gateway_peers_follow_the_headless_services_ready_endpoints(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    """#16's Kubernetes discovery (``scheduler.peers.kubernetes_peers``) against KMock: the
    ready endpoints of the gateway's headless Service are the replicas, and a scale-up, a
    replica going unready and one removed show on the next discovery (one sync interval).
    The module's RBAC check covers the gateway's list call."""
    kube, _ = cluster
    ns, service = "gpufaas", "gpufaas-gateway-peers"
    slices = kube.path("discovery.k8s.io/v1", "endpointslices", ns)
    ready = {"ready": True}
    kube.create(
        slices,
        _slice(
            service,
            8080,
            [
                {"addresses": ["10.1.0.1"], "conditions": ready},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
            ],
            "gw-1",
        ),
    )
    kube.create(slices, _slice("gpufaas-gateway", 8080, [{"addresses": ["10.9.0.9"]}], "gw-svc"))
    discover = kubernetes_peers(namespace=ns, service=service)
    assert await discover() == ["http://10.1.0.1:8080"]

    # Scale up (a second slice, as the EndpointSlice controller adds one past its size) and
    # the unready replica turning ready.
    kube.patch(
        kube.path("discovery.k8s.io/v1", "endpointslices", ns, "gw-1"),
        {
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": ready},
                {"addresses": ["10.1.0.2"], "conditions": ready},
            ]
        },
    )
    kube.create(
        slices, _slice(service, 8080, [{"addresses": ["10.1.0.3"], "conditions": ready}], "gw-2")
    )
    assert await discover() == [
        "http://10.1.0.1:8080",
        "http://10.1.0.2:8080",
        "http://10.1.0.3:8080",
    ]

    # A replica killed: its endpoint goes unready, then its slice is gone.
    kube.patch(
        kube.path("discovery.k8s.io/v1", "endpointslices", ns, "gw-1"),
        {
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": False}},
                {"addresses": ["10.1.0.2"], "conditions": ready},
            ]
        },
    )
    kube.delete(kube.path("discovery.k8s.io/v1", "endpointslices", ns, "gw-2"))
    assert await discover() == ["http://10.1.0.2:8080"]


def test_manager_urls_bracket_ipv6_and_match_the_port_by_name() -> None:
    slices = [
        {
            "ports": [{"name": "metrics", "port": 9100}, {"name": "http", "port": 8090}],
            "endpoints": [{"addresses": ["fd00::1"]}],
        }
    ]
    assert manager_urls(slices) == {"fd00::1": "http://[fd00::1]:8090"}
    assert manager_urls(slices, port_name="grpc") == {}


# -- recovery: 410 Gone and bookmarks ------------------------------------------------------------

FUNCTION_RESOURCE = "gpufaas.dev/v1alpha1/inferencefunctions"


def _function_calls(kube: Kube, start: int) -> list[tuple[str, str | None]]:
    """(verb, resourceVersion) of the gateway's InferenceFunction calls since ``start``."""
    return [
        (c.verb, dict(c.params).get("resourceVersion"))
        for c in kube.calls_by("gpufaas-gateway")[start:]
        if c.resource == "inferencefunctions"
    ]


async def _eventually(predicate: Any, what: str) -> None:
    for _ in range(200):  # bounded: at most ~10 s
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_gateway_watch_relists_after_410_and_resumes_from_the_new_version(
    cluster: tuple[Kube, GatewayStandIn], caplog: pytest.LogCaptureFixture
) -> None:
    kube, _ = cluster
    ns = "gone"
    kube.create(kube.fn_path(ns), function_body("before", handler=False) | _ready_status(1))
    recorder, stop = Recorder(), asyncio.Event()
    start = len(kube.calls_by("gpufaas-gateway"))
    task = asyncio.create_task(
        watch_functions(
            namespace=ns, on_ready=recorder.on_ready, on_gone=recorder.on_gone, stop=stop,
            connection=KubeConnection.load(),
        )
    )  # fmt: skip
    try:
        assert await recorder.next() == ("ready", "before", "file:///models/m.pt")
        await _eventually(lambda: len(_function_calls(kube, start)) == 2, "the first watch")
        # The server forgets old versions: the resumed watch is refused with 410 Gone.
        kube.emulator.expire_watches["inferencefunctions"] = 1
        kube.end_watches(FUNCTION_RESOURCE, namespace=ns)
        await _eventually(lambda: len(_function_calls(kube, start)) >= 5, "re-list and re-watch")
        first_list_rv = kube.emulator.listed_versions[-2]
        relist_rv = kube.emulator.listed_versions[-1]
        assert _function_calls(kube, start)[:5] == [
            ("list", None),
            ("watch", first_list_rv),
            ("watch", first_list_rv),  # resumed after the stream ended: 410 Gone
            ("list", None),
            ("watch", relist_rv),  # from the re-list's version
        ]
        # And it works: a function made Ready afterwards is served.
        kube.create(kube.fn_path(ns), function_body("after", handler=False) | _ready_status(1))
        assert await recorder.next() == ("ready", "after", "file:///models/m.pt")
        # 410 is routine (no error path, no backoff): nothing was logged as a failure.
        assert not [r for r in caplog.records if r.name == "gpufaas.scheduler.kube"]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_gateway_watch_resumes_from_a_bookmark_without_relisting(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    kube, _ = cluster
    ns = "bookmarks"
    recorder, stop = Recorder(), asyncio.Event()
    start = len(kube.calls_by("gpufaas-gateway"))
    task = asyncio.create_task(
        watch_functions(
            namespace=ns, on_ready=recorder.on_ready, on_gone=recorder.on_gone, stop=stop,
            connection=KubeConnection.load(),
        )
    )  # fmt: skip
    try:
        await _eventually(lambda: len(_function_calls(kube, start)) == 2, "the first watch")
        kube.bookmark(FUNCTION_RESOURCE, "987654", namespace=ns)
        kube.end_watches(FUNCTION_RESOURCE, namespace=ns)
        await _eventually(lambda: len(_function_calls(kube, start)) >= 3, "the resumed watch")
        assert _function_calls(kube, start)[2] == ("watch", "987654")
        assert [verb for verb, _ in _function_calls(kube, start)].count("list") == 1
        assert recorder.events.empty()  # a bookmark is not a function
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
