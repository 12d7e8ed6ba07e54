"""The HTTP front of a gateway whose node is in its own process (``--node-transport inprocess``):
inference is started at once and becomes a task only if it waits (``scheduler/front.py``).

A warm small model's request never waits there (the node answers in-process, its forward pass
inline), so it runs from the parser's callback to the answer's write with no task at all. These
tests check that it does, that it still takes the gateway's one path (the policy decides each
request), and that pipelined requests answered at once do not nest one in another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_front import Connection, post
from test_inprocess import node_in_this_process, output, tiny_request

from gpufaas.core.manifests import load_manifests
from gpufaas.core.protocol import HEADER_LENGTH
from gpufaas.scheduler import front as front_module
from gpufaas.scheduler.front import FrontSettings, HttpFront
from gpufaas.scheduler.gateway import Gateway, GatewayConfig, create_app
from gpufaas.scheduler.main import build_gateway

INFER = "/v2/models/tiny-mlp/infer"
# Batching off, as a function that serves one request at a time: nothing of it waits to batch.
TINY = """apiVersion: gpufaas.dev/v1alpha1
kind: InferenceFunction
metadata: {{name: tiny-mlp}}
spec:
  model: {{uri: "file://{models}/tiny-mlp.pt", format: torchscript}}
  inputs: [{{name: x, datatype: FP32, shape: [-1, 16]}}]
  outputs: [{{name: y, datatype: FP32, shape: [-1, 4]}}]
  batching: {{maxBatchSize: 1, maxDelayMs: 0}}
"""


@contextlib.asynccontextmanager
async def inprocess_front(tmp_path: Path, models_dir: Path) -> AsyncIterator[tuple[Gateway, int]]:
    node = node_in_this_process(tmp_path, cpu_devices=1)
    (tmp_path / "tiny-mlp.yaml").write_text(TINY.format(models=models_dir))
    gateway = build_gateway(
        manager_urls={node.name: node.url},
        functions=load_manifests([tmp_path / "tiny-mlp.yaml"]),
        config=GatewayConfig(transport="inprocess"),
    )
    gateway.lanes.attach(node.name, node.answer)
    await node.start()
    front = HttpFront(
        create_app(gateway), gateway=gateway, settings=FrontSettings(max_body_bytes=1 << 20)
    )
    await front.start(host="127.0.0.1", port=0)  # its lifespan starts the gateway
    try:
        yield gateway, front.ports[0]
    finally:
        await front.close()
        await node.stop()


async def connect(port: int) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Connection(reader, writer)


def binary_post(rows: int = 1, value: float = 1.0) -> bytes:
    body, length = tiny_request(rows, value=value)
    return post(INFER, body, **{HEADER_LENGTH: str(length)})


def decisions(gateway: Gateway) -> float:
    total = 0.0
    for metric in gateway.metrics.registry.collect():
        if metric.name == "gpufaas_route_decisions":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_warm_requests_run_without_a_task_and_the_policy_decides_each(
    tmp_path: Path, example_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with inprocess_front(tmp_path, example_models_dir) as (gateway, port):
        conn = await connect(port)
        for _ in range(50):  # the first passes run on a worker thread (they are the measure)
            await conn.send(binary_post())
            assert (await conn.reply()).status == 200
        made: list[bool] = []
        start = front_module.start_eagerly

        def counted(coro: Any) -> Any:
            task = start(coro)
            made.append(task is not None)
            return task

        monkeypatch.setattr(front_module, "start_eagerly", counted)
        tasks: list[Any] = []
        infer = gateway.infer

        async def spy(*args: Any, **kwargs: Any) -> Any:
            tasks.append(asyncio.current_task())
            return await infer(*args, **kwargs)

        monkeypatch.setattr(gateway, "infer", spy)
        before = decisions(gateway)
        count = 50
        for i in range(count):
            await conn.send(binary_post(value=float(i)))
            reply = await conn.reply()
            assert reply.status == 200
            headers = {k.decode(): v.decode() for k, v in reply.headers.items()}
            y = output(reply.body, headers)
            assert y.shape == (1, 4) and np.isfinite(y).all()
        assert tasks == [None] * count  # each started in the parser's callback, no task
        assert sum(made) <= count // 3  # most never needed one (a slow pass takes a thread)
        assert decisions(gateway) - before == count  # and each one routed by the policy
        await conn.close()


async def test_thousands_of_warm_pipelined_requests_are_answered_in_order_without_nesting(
    tmp_path: Path, example_models_dir: Path
) -> None:
    async with inprocess_front(tmp_path, example_models_dir) as (_, port):
        conn = await connect(port)
        for _ in range(20):
            await conn.send(binary_post())
            assert (await conn.reply()).status == 200
        count = 3000
        await conn.send(
            b"".join(
                binary_post(value=float(i)) if i % 3 else post("/v2/models/absent/infer", b"{}")
                for i in range(count)
            )
        )
        statuses = [(await conn.reply()).status for _ in range(count)]
        assert statuses == [404 if i % 3 == 0 else 200 for i in range(count)]
        await conn.send(binary_post())  # and the connection serves on
        assert (await conn.reply()).status == 200
        await conn.close()
