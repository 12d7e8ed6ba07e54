"""The GPU manager's HTTP API, in process: what the gateway sends and reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from gm_support import Model, devices
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.http import (
    BATCH_SIZE_HEADER,
    CACHE_HEADER,
    DEVICE_HEADER,
    EVICT_FIRST_HEADER,
    LOAD_SOURCE_HEADER,
    MODEL_BYTES_HEADER,
    REASON_HEADER,
)
from gpufaas.core.modelio import load_model, tensor_bytes
from gpufaas.core.node import STATE, Residency
from gpufaas.core.protocol import decode_response, encode_request
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app
from gpufaas.scheduler.cluster import Cluster

Factory = Callable[..., NodeRuntime]


@pytest.fixture
def runtime(runtime_factory: Factory) -> NodeRuntime:
    return runtime_factory(device_list=devices(2))


@pytest.fixture
async def client(runtime: NodeRuntime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as c:
        yield c


async def put(client: httpx.AsyncClient, model: Model) -> None:
    body = model.spec.model_dump(mode="json", by_alias=True)
    response = await client.put(f"/v2/gpufaas/functions/{model.name}", json=body)
    assert response.status_code == 204


async def infer(
    client: httpx.AsyncClient, model: Model, inputs: list[np.ndarray], device: str
) -> httpx.Response:
    tensors = {t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, inputs, strict=True)}
    content, headers = encode_request(tensors)
    return await client.post(
        f"/v2/models/{model.name}/infer",
        content=content,
        headers={**headers, DEVICE_HEADER: device},
    )


def outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    _document, arrays = decode_response(response.content, header_length=_header_length(response))
    return arrays


def _header_length(response: httpx.Response) -> int | None:
    value = response.headers.get("inference-header-content-length")
    return int(value) if value is not None else None


async def test_infer_reports_the_cache_and_the_state_shows_both_tiers_byte_exact(
    client: httpx.AsyncClient, runtime: NodeRuntime, models: dict[str, Model]
) -> None:
    model = models["small-cnn"]
    await put(client, model)
    inputs = model.inputs(batch=2)

    miss = await infer(client, model, inputs, "cpu:0")
    await runtime.settle()  # the load commits in the background after the first answer
    hit = await infer(client, model, inputs, "cpu:0")
    peer = await infer(client, model, inputs, "cpu:1")
    await runtime.settle()

    assert miss.status_code == hit.status_code == peer.status_code == 200
    assert (miss.headers[CACHE_HEADER], miss.headers[LOAD_SOURCE_HEADER]) == ("miss", "host")
    assert (hit.headers[CACHE_HEADER], hit.headers[LOAD_SOURCE_HEADER]) == ("hit", "device")
    assert peer.headers[LOAD_SOURCE_HEADER] == "peer:cpu:0"
    assert hit.headers[BATCH_SIZE_HEADER] == "1"
    np.testing.assert_allclose(
        outputs(hit)["logits"], model.reference(inputs), rtol=1e-5, atol=1e-6
    )

    state = (await client.get("/v2/gpufaas/state")).json()
    weights = tensor_bytes(load_model(model.path, format=model.format))
    device = state["devices"][0]
    assert (device["id"], device["capacity_bytes"]) == ("cpu:0", 1 << 30)
    (row,) = device["residents"]
    assert row["model"] == model.name and row["state"] == "resident" and row["pins"] == 0
    assert row["weights_bytes"] == weights
    assert row["size_bytes"] == int(miss.headers[MODEL_BYTES_HEADER])
    assert row["size_bytes"] == row["arena_bytes"] + row["reserve_bytes"]
    assert device["used_bytes"] == row["size_bytes"]
    (host_row,) = state["host"]["residents"]
    assert host_row["size_bytes"] == row["arena_bytes"] and host_row["weights_bytes"] == weights
    assert state["host"]["used_bytes"] == host_row["size_bytes"]
    assert state["host"]["skeletons"][model.name]["arena_bytes"] == row["arena_bytes"]


async def test_metrics_show_devices_links_and_tiers(
    client: httpx.AsyncClient, runtime: NodeRuntime, models: dict[str, Model]
) -> None:
    await put(client, models["tiny-mlp"])
    await infer(client, models["tiny-mlp"], models["tiny-mlp"].inputs(), "cpu:0")
    await runtime.settle()  # the load is logged when it commits, in the background
    text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        samples[
            (
                "gpufaas_device_capacity_bytes",
                (("device", "cpu:0"), ("kind", "cpu"), ("name", "cpu")),
            )
        ]
        == 1 << 30
    )
    assert (
        samples[
            ("gpufaas_device_peer", (("device", "cpu:0"), ("link", "memory"), ("peer", "cpu:1")))
        ]
        == 1
    )
    assert samples[("gpufaas_device_resident_models", (("device", "cpu:0"),))] == 1
    assert samples[("gpufaas_host_tier_models", ())] == 1
    info = [k for k in samples if k[0] == "gpufaas_device_info"]
    assert len(info) == 2
    assert samples[("gpufaas_manager_load_bytes_total", (("path", "host->device"),))] > 0


async def test_repository_load_and_unload_and_function_removal(
    client: httpx.AsyncClient, models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    await put(client, model)
    loaded = await client.post(
        f"/v2/repository/models/{model.name}/load", headers={DEVICE_HEADER: "cpu:1"}
    )
    assert loaded.json() == {"model": model.name, "device": "cpu:1"}
    state = (await client.get("/v2/gpufaas/state")).json()
    assert [r["model"] for r in state["devices"][1]["residents"]] == [model.name]

    unloaded = await client.post(f"/v2/repository/models/{model.name}/unload")
    assert unloaded.json() == {"model": model.name, "unloaded_from": ["cpu:1"]}
    assert (await client.delete(f"/v2/gpufaas/functions/{model.name}")).status_code == 204
    gone = await infer(client, model, model.inputs(), "cpu:0")
    assert gone.status_code == 404 and gone.headers[REASON_HEADER] == "UnknownModel"


async def test_errors_are_json_with_a_reason_and_the_manager_keeps_serving(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    infos = devices(2)
    infos[0] = type(infos[0])(**{**infos[0].to_dict(), "capacity_bytes": 1000, "peers": ()})
    runtime = runtime_factory(device_list=infos)
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        model = models["tiny-mlp"]
        await put(client, model)

        too_big = await infer(client, model, model.inputs(), "cpu:0")
        assert too_big.status_code == 503
        assert too_big.headers[REASON_HEADER] == "InsufficientMemory"
        assert "needs" in too_big.json()["error"]

        bad_device = await infer(client, model, model.inputs(), "cuda:9")
        assert bad_device.status_code == 400 and "cuda:9" in bad_device.json()["error"]
        bad_spec = await client.put("/v2/gpufaas/functions/x", json={"model": {}})
        assert bad_spec.status_code == 400 and "spec.model" in bad_spec.json()["error"]
        not_json = await client.put("/v2/gpufaas/functions/x", content=b"{")
        assert not_json.status_code == 400

        fine = await infer(client, model, model.inputs(), "cpu:1")
        assert fine.status_code == 200


async def test_concurrent_requests_are_batched_over_http(
    client: httpx.AsyncClient, models: dict[str, Model]
) -> None:
    import asyncio

    model = models["tiny-mlp"].with_spec(batching={"maxBatchSize": 4, "maxDelayMs": 300})
    await put(client, model)
    requests: list[list[np.ndarray]] = [model.inputs(batch=1, seed=i) for i in range(4)]
    responses = await asyncio.gather(*(infer(client, model, r, "cpu:0") for r in requests))
    assert {r.headers[BATCH_SIZE_HEADER] for r in responses} == {"4"}
    for response, inputs in zip(responses, requests, strict=True):
        np.testing.assert_allclose(
            outputs(response)["y"], model.reference(inputs), rtol=1e-5, atol=1e-6
        )


async def test_with_a_token_only_health_and_metrics_are_open(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    app = create_app(runtime_factory(), token="s3cret")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        refused = await client.get("/v2/gpufaas/state")
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        wrong = await client.get("/v2/gpufaas/state", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        client.headers["Authorization"] = "Bearer s3cret"
        await put(client, models["tiny-mlp"])
        response = await infer(client, models["tiny-mlp"], models["tiny-mlp"].inputs(), "cpu:0")
        assert response.status_code == 200


async def test_a_malformed_eviction_hint_is_a_400_and_a_good_one_is_taken(
    client: httpx.AsyncClient, models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    await put(client, model)
    tensors = {
        t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, model.inputs(), strict=True)
    }
    content, headers = encode_request(tensors)
    path = f"/v2/models/{model.name}/infer"
    for bad in ("../etc", "a,,b", ",".join(f"m{i}" for i in range(65))):
        response = await client.post(
            path,
            content=content,
            headers={**headers, DEVICE_HEADER: "cpu:0", EVICT_FIRST_HEADER: bad},
        )
        assert response.status_code == 400, bad
        assert EVICT_FIRST_HEADER in response.json()["error"]
    fine = await client.post(
        path,
        content=content,
        headers={**headers, DEVICE_HEADER: "cpu:0", EVICT_FIRST_HEADER: "a, b"},
    )
    assert fine.status_code == 200


async def test_the_gateways_cluster_reads_the_node_through_the_typed_contract(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(device_list=devices(2), register=[model])
    await runtime.infer(model.name, model.inputs(), device_id="cpu:1")
    await runtime.settle()  # committed: the node reports it resident
    cluster = Cluster(manager_urls={"n1": "http://manager"})
    node = cluster.nodes["n1"]
    await node.client.aclose()
    node.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://manager"
    )
    try:
        assert await cluster.sync_node(node)
        size = runtime.state().device("cpu:1").residents[0].size_bytes
        assert cluster.directory.residents("n1/cpu:1") == [(model.name, Residency.RESIDENT, size)]
        assert cluster.directory.residents("n1/cpu:0") == []
        await cluster.push_function(node, "other", model.spec)  # the FUNCTION route, filled
        assert "other" in runtime.functions
    finally:
        await cluster.close()


async def test_a_state_that_breaks_the_contract_marks_the_node_down() -> None:
    async def bad_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["path"] == STATE
        body = b'{"devices": [{"id": "cpu:0"}], "host": {}}'  # required fields missing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    cluster = Cluster(manager_urls={"n1": "http://manager"})
    node = cluster.nodes["n1"]
    node.healthy = True
    await node.client.aclose()
    node.client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=bad_state), base_url="http://manager"
    )
    try:
        assert not await cluster.sync_node(node)
        assert not node.healthy
    finally:
        await cluster.close()


class _ClosesFirst(httpx.AsyncBaseTransport):
    """The first request meets a connection the server closed while idle; later ones reach
    the app (as httpx reports uvicorn's keep-alive timeout racing a reuse)."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.closed_once = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.closed_once:
            self.closed_once = True
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return await self.inner.handle_async_request(request)


async def test_a_kept_alive_connection_closed_under_the_sync_does_not_call_the_node_down(
    runtime_factory: Factory, models: dict[str, Model]
) -> None:
    runtime = runtime_factory(device_list=devices(1), register=[models["tiny-mlp"]])
    cluster = Cluster(manager_urls={"n1": "http://manager"})
    node = cluster.nodes["n1"]
    await node.client.aclose()
    transport = _ClosesFirst(create_app(runtime))
    node.client = httpx.AsyncClient(transport=transport, base_url="http://manager")
    try:
        assert await cluster.sync_node(node)
        assert transport.closed_once and node.healthy
    finally:
        await cluster.close()
