"""The gateway -> GPU manager transport on its own: httpx vs the pooled httptools client.

A trivial ASGI app (echoes the body, as a warm tiny inference would answer 100 bytes) runs
under uvicorn (httptools, uvloop) in a subprocess on loopback; this process sends ``--requests``
binary POSTs of ``--size`` bytes, one at a time and then 8 at a time, with each client, and
reports the client's own CPU per request (``time.process_time``) and the latency percentiles.
The server's CPU is the same for both clients; the client's is what the gateway pays.

    python bench/transport.py --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import uvloop

from gpufaas.scheduler.transport import NodePool

SERVER = """
import uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        m = await receive(); body += m.get("body", b""); more = m.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning", access_log=False,
            http="httptools", loop="uvloop", lifespan="off")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(
    send: Callable[[], Awaitable[Any]], *, clients: int, count: int
) -> dict[str, float]:
    latencies: list[float] = []
    left = count

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - t0)

    for _ in range(min(200, count)):
        await send()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ms = np.array(latencies) * 1000
    return {
        "client_cpu_us_per_request": cpu / count * 1e6,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": count / wall,
    }


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    body = bytes(args.size)
    headers = {"Content-Type": "application/octet-stream", "X-Gpufaas-Device": "cpu:0"}
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(
        base_url=url, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
    ) as client:

        async def with_httpx() -> None:
            response = await client.post("/infer", content=body, headers=headers)
            assert response.status_code == 200

        for clients in (1, 8):
            results[f"httpx, {clients} client(s)"] = await run(
                with_httpx, clients=clients, count=args.requests
            )
    pool = NodePool(url, size=8)

    async def with_pool() -> None:
        reply = await pool.post("/infer", body, headers)
        assert reply.status == 200

    for clients in (1, 8):
        results[f"pooled httptools, {clients} client(s)"] = await run(
            with_pool, clients=clients, count=args.requests
        )
    await pool.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--size", type=int, default=200, help="request body bytes")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER.replace("PORT", str(port))])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.post(url, content=b"x", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(json.dumps(uvloop.run(measure(url, args)), indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
