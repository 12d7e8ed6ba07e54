"""Overload: bounded queues refuse with 429 + Retry-After, passed deadlines get
504, and under twice the saturating load every request gets exactly one answer.

The system runs as real processes with small bounds (one request at a time
per device, two waiting per device, four in flight per function), so that
saturation comes quickly on a 2-core machine. Load is bounded in count and
time and stays on loopback.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from local_up import running_up

from gpufaas.core.protocol import decode_response, encode_request, parse_header_length

pytestmark = pytest.mark.slow

MAX_PENDING = 4


@pytest.fixture(scope="module")
def bounded_server(
    tmp_path_factory: pytest.TempPathFactory, example_models_dir: Path
) -> Iterator[str]:
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path_factory.mktemp("home")),
        "GPUFAAS_MODELS": str(example_models_dir),
    }
    args = [
        "--cpu-devices", "1", "--device-concurrency", "1", "--max-queue-per-device", "2",
        "--max-pending-per-function", str(MAX_PENDING),
    ]  # fmt: skip
    with running_up(args, env=env) as url:
        yield url


def minilm_body(request_id: str, *, tokens: int) -> tuple[bytes, dict[str, str]]:
    rng = np.random.default_rng(len(request_id))
    ids = rng.integers(1000, 20000, size=(4, tokens), dtype=np.int64)
    mask = np.ones((4, tokens), dtype=np.int64)
    return encode_request(
        {"input_ids": (ids, "INT64"), "attention_mask": (mask, "INT64")}, request_id=request_id
    )


async def send(client: httpx.AsyncClient, url: str, request_id: str, *, tokens: int = 64,
               timeout_ms: float | None = None) -> httpx.Response:  # fmt: skip
    body, headers = minilm_body(request_id, tokens=tokens)
    if timeout_ms is not None:
        headers["X-Gpufaas-Timeout-Ms"] = str(timeout_ms)
    return await client.post(f"{url}/v2/models/minilm/infer", content=body, headers=headers)


def answered_id(response: httpx.Response) -> str | None:
    document, _ = decode_response(
        response.content,
        header_length=parse_header_length(response.headers.get("inference-header-content-length")),
    )
    return document.id


async def _burst(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return list(await asyncio.gather(*(send(client, url, f"r{i}") for i in range(count))))


def test_a_burst_past_the_bounds_gets_429_with_retry_after(bounded_server: str) -> None:
    responses = asyncio.run(_burst(bounded_server, 12))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, codes
    assert codes[429] > 0 and codes[200] > 0
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "limit" in response.json()["error"]
    ok_ids = [answered_id(r) for r in responses if r.status_code == 200]
    assert len(ok_ids) == len(set(ok_ids))


async def _deadline_case(url: str) -> tuple[httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        slow = asyncio.create_task(send(client, url, "slow", tokens=256))
        await asyncio.sleep(0.2)  # the slow one holds the only slot
        late = await send(client, url, "late", timeout_ms=50)
        return await slow, late


def test_a_request_whose_deadline_passes_in_the_queue_gets_504(bounded_server: str) -> None:
    slow, late = asyncio.run(_deadline_case(bounded_server))
    assert slow.status_code == 200
    assert late.status_code == 504
    assert "deadline" in late.json()["error"]


def test_invalid_timeout_is_400(bounded_server: str) -> None:
    body, headers = minilm_body("x", tokens=8)
    headers["X-Gpufaas-Timeout-Ms"] = "soon"
    response = httpx.post(
        f"{bounded_server}/v2/models/minilm/infer", content=body, headers=headers, timeout=30
    )
    assert response.status_code == 400


async def _open_loop(
    url: str, *, rate_per_s: float, count: int
) -> list[tuple[str, httpx.Response]]:
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(send(client, url, f"load-{i}", tokens=32)))
            await asyncio.sleep(1 / rate_per_s)
        responses = await asyncio.gather(*tasks)
    return [(f"load-{i}", r) for i, r in enumerate(responses)]


async def _saturation(url: str, *, seconds: float) -> float:
    """Closed-loop throughput with as many clients as the bounds admit."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient, index: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            if (await send(client, url, f"sat-{index}", tokens=32)).status_code == 200:
                done += 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client, i) for i in range(2)))
    return done / seconds


def test_twice_saturation_loses_nothing_and_answers_once(bounded_server: str) -> None:
    saturation = asyncio.run(_saturation(bounded_server, seconds=3))
    assert saturation > 0
    rate = 2 * saturation
    count = min(120, max(20, int(rate * 4)))
    results = asyncio.run(_open_loop(bounded_server, rate_per_s=rate, count=count))
    assert len(results) == count  # every request got an answer
    codes = Counter(r.status_code for _, r in results)
    assert set(codes) <= {200, 429}, codes  # fast, honest refusals; nothing else
    for sent_id, response in results:
        if response.status_code == 200:
            assert answered_id(response) == sent_id  # each answer is its own request's
    assert codes[200] > 0
