"""The access rules of docs/reliability.md, each checked on the real apps (in process).

- With an admin token, every admin route of the gateway (``/v2/repository/*``,
  ``/v2/gpufaas/*``, found by walking the app's routes, so a new one is covered too) refuses a
  caller without it, or with a wrong one, with 401, and lets the token through.
- With a manager token, every route of a GPU manager but health and metrics refuses a caller
  without it; the gateway's client to the managers presents it.
- A compressed body (``Content-Encoding: gzip``) is refused with 415 by the gateway and the
  GPU manager, and never decompressed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Route

from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.server import create_app as create_manager_app
from gpufaas.scheduler.gateway import ADMIN_PATHS, GatewayConfig
from gpufaas.scheduler.gateway import create_app as create_gateway_app
from gpufaas.scheduler.main import build_gateway

ADMIN = "admin-s3cret"
MANAGER = "manager-s3cret"
OPEN_ON_MANAGER = ("/v2/health/", "/metrics")


def _routes(app: object) -> list[tuple[str, str]]:
    """Every (method, path) of the app, path parameters filled with a valid name (through any
    ASGI wrapper around the FastAPI app, such as the gateway's inference fast path)."""
    while not isinstance(app, FastAPI):
        app = app.app  # type: ignore[attr-defined]
    out = []
    for route in app.routes:
        if isinstance(route, Route) and not route.path.startswith(("/docs", "/redoc", "/openapi")):
            path = re.sub(r"\{[^}]+\}", "m", route.path)
            out.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")
    return out


def _tiny_mlp_body() -> bytes:
    document = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
    return json.dumps(document).encode()


@pytest.fixture
def functions(example_models_dir: Path) -> list[object]:
    return list(
        load_manifests(
            [bundled_functions_dir()], variables={"GPUFAAS_MODELS": str(example_models_dir)}
        )
    )


@pytest.fixture
def gateway_client(functions: list[object]) -> Iterator[TestClient]:
    gateway = build_gateway(
        manager_urls={}, functions=functions, config=GatewayConfig(admin_token=ADMIN)
    )  # type: ignore[arg-type]
    with TestClient(create_gateway_app(gateway)) as client:
        yield client


@pytest.fixture
def manager_client(tmp_path: Path, functions: list[object]) -> Iterator[TestClient]:
    runtime = build_runtime(
        cpu_devices=1,
        device_memory_bytes=256 * 2**20,
        host_memory_bytes=256 * 2**20,
        artifact_dir=tmp_path / "artifacts",
        force_cpu=True,
    )
    for function in functions:
        runtime.register(function.name, function.spec)  # type: ignore[attr-defined]
    with TestClient(create_manager_app(runtime, token=MANAGER)) as client:
        yield client


def test_every_admin_route_of_the_gateway_needs_the_admin_token(
    gateway_client: TestClient,
) -> None:
    admin = [(m, p) for m, p in _routes(gateway_client.app) if p.startswith(ADMIN_PATHS)]
    paths = {p for _, p in admin}
    # The routes docs/reliability.md names, /load included; more are covered as they appear.
    for expected in (
        "/v2/repository/index",
        "/v2/repository/models/m/load",
        "/v2/repository/models/m/unload",
        "/v2/gpufaas/cluster",
    ):
        assert expected in paths, f"{expected} is not an admin route any more"
    for method, path in admin:
        refused = gateway_client.request(method, path)
        assert refused.status_code == 401, (method, path, refused.status_code)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        wrong = gateway_client.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, (method, path)
        allowed = gateway_client.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})
        assert allowed.status_code != 401, (method, path)
    # Inference and health stay open to callers without the admin token.
    assert gateway_client.get("/v2/health/live").status_code == 200
    assert gateway_client.post("/v2/models/nope/infer", content=b"{}").status_code == 404


def test_every_manager_route_needs_the_manager_token(manager_client: TestClient) -> None:
    routes = _routes(manager_client.app)
    guarded = [(m, p) for m, p in routes if not p.startswith(OPEN_ON_MANAGER)]
    assert ("POST", "/v2/models/m/infer") in guarded and ("GET", "/v2/gpufaas/state") in guarded
    for method, path in guarded:
        refused = manager_client.request(method, path)
        assert refused.status_code == 401, (method, path, refused.status_code)
        wrong = manager_client.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, (method, path)
    auth = {"Authorization": f"Bearer {MANAGER}"}
    assert manager_client.get("/v2/gpufaas/state", headers=auth).status_code == 200
    answer = manager_client.post(
        "/v2/models/tiny-mlp/infer", content=_tiny_mlp_body(), headers=auth
    )
    assert answer.status_code == 200, answer.text
    assert manager_client.get("/v2/health/live").status_code == 200


def test_the_gateways_manager_client_presents_the_token(manager_client: TestClient) -> None:
    """The gateway's Cluster reads a manager's state with the shared token (a manager that
    requires it answers 200, and 401 to a cluster built without it)."""
    from gpufaas.scheduler.cluster import Cluster

    async def sync(token: str | None) -> int:
        cluster = Cluster(manager_urls={"node-0": "http://manager"}, manager_token=token)
        node = cluster.nodes["node-0"]
        node.client._transport = _asgi(manager_client.app)  # type: ignore[arg-type]
        try:
            response = await node.client.get("/v2/gpufaas/state")
            return response.status_code
        finally:
            await cluster.close()

    assert asyncio.run(sync(MANAGER)) == 200
    assert asyncio.run(sync(None)) == 401


def _asgi(app: FastAPI) -> object:
    import httpx

    return httpx.ASGITransport(app=app)


def test_a_gzip_body_is_refused_with_415_not_decompressed(
    gateway_client: TestClient, manager_client: TestClient
) -> None:
    body = gzip.compress(_tiny_mlp_body())
    for client, headers in (
        (gateway_client, {}),
        (manager_client, {"Authorization": f"Bearer {MANAGER}"}),
    ):
        response = client.post(
            "/v2/models/tiny-mlp/infer",
            content=body,
            headers={**headers, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert response.status_code == 415, (response.status_code, response.text)
        assert "Content-Encoding" in response.json()["error"]
    # The same body uncompressed is a valid request: the 415 is about the encoding alone.
    plain = manager_client.post(
        "/v2/models/tiny-mlp/infer",
        content=_tiny_mlp_body(),
        headers={"Authorization": f"Bearer {MANAGER}"},
    )
    assert plain.status_code == 200


def _streamed_request(chunks: int, size: int, *, declared: int | None) -> tuple[object, list[int]]:
    """A Starlette request whose body arrives in ``chunks`` pieces; the list counts reads."""
    from starlette.requests import Request

    reads = [0]

    async def receive() -> dict[str, object]:
        reads[0] += 1
        more = reads[0] < chunks
        return {"type": "http.request", "body": b"x" * size, "more_body": more}

    headers = [(b"content-length", str(declared).encode())] if declared is not None else []
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive), reads


@pytest.mark.parametrize("declared", [None, 10_000])
def test_an_oversized_body_is_refused_before_it_is_read(declared: int | None) -> None:
    """413 from Content-Length before any byte is read, and without one, as soon as the stream
    passes the limit: a client cannot make the server buffer a body larger than the limit."""
    from gpufaas.core.http import read_body
    from gpufaas.core.protocol import ProtocolError

    request, reads = _streamed_request(1000, 10, declared=declared)
    with pytest.raises(ProtocolError) as refused:
        asyncio.run(read_body(request, max_bytes=100))  # type: ignore[arg-type]
    assert refused.value.status_code == 413
    assert reads[0] <= (0 if declared is not None else 11), reads
