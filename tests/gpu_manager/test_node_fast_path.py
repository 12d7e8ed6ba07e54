"""The node's infer route, answered by its bare ASGI fast path: auth, metrics, errors."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from gm_support import Model
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.http import DEVICE_HEADER, REASON_HEADER
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app


def request(model: Model) -> tuple[bytes, dict[str, str]]:
    tensors = {
        t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, model.inputs(), strict=True)
    }
    return encode_request(tensors)


async def test_infer_needs_the_token_like_every_other_route(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    app = create_app(runtime_factory(register=[model]), token="s3cret")
    content, headers = request(model)
    path = f"/v2/models/{model.name}/infer"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        refused = await client.post(path, content=content, headers=headers)
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        headers["Authorization"] = "Bearer s3cret"
        assert (await client.post(path, content=content, headers=headers)).status_code == 200


async def test_infer_counts_its_requests_and_names_its_errors(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    app = create_app(runtime)
    content, headers = request(model)
    headers[DEVICE_HEADER] = "cpu:0"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        for _ in range(2):
            ok = await client.post(
                f"/v2/models/{model.name}/infer", content=content, headers=headers
            )
            assert ok.status_code == 200
            await runtime.settle()  # the load commits in the background: the second is a hit
        unknown = await client.post("/v2/models/nope/infer", content=content, headers=headers)
        assert unknown.status_code == 404 and unknown.headers[REASON_HEADER]
        assert "nope" in unknown.json()["error"]
        garbled = await client.post(
            f"/v2/models/{model.name}/infer",
            content=b"{not json",
            headers={DEVICE_HEADER: "cpu:0", "content-type": "application/json"},
        )
        assert garbled.status_code == 400 and garbled.headers[REASON_HEADER] == "InvalidRequest"
        bad_device = {**headers, DEVICE_HEADER: "cpu:9"}
        wrong = await client.post(
            f"/v2/models/{model.name}/infer", content=content, headers=bad_device
        )
        assert wrong.status_code == 400 and wrong.headers[REASON_HEADER] == "UnknownDevice"
        text = (await client.get("/metrics")).text
    counted = {
        (s.labels["model"], s.labels["cache"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "gpufaas_manager_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert counted == {(model.name, "miss"): 1.0, (model.name, "hit"): 1.0}
