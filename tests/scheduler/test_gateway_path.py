"""The gateway's request path against a real GPU manager served over TCP in-process.

The gateway inspects only the request header and forwards the body untouched over its pooled
keep-alive transport; a header that lies about sizes is refused before anything reaches a
manager; nothing is logged at INFO per request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tiny_manager import tiny_mlp_manager

from gpufaas.core.protocol import HEADER_LENGTH, decode_response, encode_request
from gpufaas.scheduler.gateway import Gateway, create_app
from gpufaas.scheduler.main import build_gateway

TIMEOUT = 60


@dataclass
class Recorder:
    """ASGI middleware in front of the manager: the bodies of the infer calls it received."""

    app: Any
    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.bodies.append(body)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass
class System:
    gateway: Gateway
    client: httpx.AsyncClient
    recorder: Recorder


@pytest.fixture
async def system(tmp_path: Path, example_models_dir: Path) -> AsyncIterator[System]:
    recorder: Recorder | None = None

    def record(app: Any) -> Recorder:
        nonlocal recorder
        recorder = Recorder(app)
        return recorder

    async with tiny_mlp_manager(tmp_path, example_models_dir, wrap=record) as (url, functions):
        assert recorder is not None
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gateway"
        )
        try:
            yield System(gateway, client, recorder)
        finally:
            await client.aclose()
            await gateway.stop()


def lying_body(*, size: int, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    body = header + b"\x00" * size + extra
    return body, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("size", "extra", "needle"),
    [(60, b"\x00" * 4, "needs 64 bytes"), (64, b"\x00" * 8, "8 bytes of binary data")],
    ids=["size-against-shape", "sizes-against-body"],
)
async def test_a_header_that_lies_about_sizes_is_400_before_any_manager_sees_it(
    system: System, size: int, extra: bytes, needle: str
) -> None:
    body, headers = lying_body(size=size, extra=extra)
    response = await system.client.post("/v2/models/tiny-mlp/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert (needle in response.json()["error"] and "'x'" in response.json()["error"]) or (
        needle in response.json()["error"]
    )
    assert system.recorder.bodies == []
    # ... and the gateway keeps serving.
    good, headers = encode_request({"x": (np.ones((1, 16), np.float32), "FP32")})
    ok = await system.client.post("/v2/models/tiny-mlp/infer", content=good, headers=headers)
    assert ok.status_code == 200


async def test_the_body_reaches_the_manager_as_the_client_sent_it(system: System) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    binary, binary_headers = encode_request({"x": (x, "FP32")}, request_id="b-1")
    as_json = json.dumps(
        {"id": "j-1", "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                  "data": x.reshape(-1).tolist()}]}
    ).encode()  # fmt: skip
    answers = []
    for body, headers in [
        (binary, binary_headers),
        (as_json, {"Content-Type": "application/json"}),
        (as_json, {}),  # tritonclient sends no Content-Type for JSON
    ]:
        response = await system.client.post(
            "/v2/models/tiny-mlp/infer", content=body, headers=headers
        )
        assert response.status_code == 200, response.text
        _, outputs = decode_response(
            response.content, header_length=_length(response.headers.get(HEADER_LENGTH))
        )
        answers.append(outputs["y"])
    assert system.recorder.bodies == [binary, as_json, as_json]
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-6)


def _length(value: str | None) -> int | None:
    return None if value is None else int(value)


async def test_warm_requests_reuse_pooled_connections_and_log_nothing_at_info(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    body, headers = encode_request({"x": (np.ones((1, 16), np.float32), "FP32")})
    first = await system.client.post("/v2/models/tiny-mlp/infer", content=body, headers=headers)
    assert first.status_code == 200
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            response = await system.client.post(
                "/v2/models/tiny-mlp/infer", content=body, headers=headers
            )
            assert response.status_code == 200
    # The test's own client (httpx, to http://gateway) logs its calls; nothing else may.
    ours = [r for r in caplog.records if "http://gateway/" not in r.getMessage()]
    assert [r.getMessage() for r in ours if r.levelno >= logging.INFO] == []
    pool = system.gateway.lanes.http["node-0"]
    assert pool.idle == 1  # one client, one request at a time: one connection, kept alive
