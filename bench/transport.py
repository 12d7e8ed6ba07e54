"""The gateway -> GPU manager transport on its own: httpx, the pooled httptools client, frames.

A trivial echo server (as a warm tiny inference would answer 100 bytes) runs in a subprocess:
an ASGI app under uvicorn (httptools, uvloop) on loopback TCP, and the node's framed listener
(``gpu_manager/framed.py``) on a Unix socket and a TCP port, in the same loop. This process sends
``--requests`` calls of ``--size`` bytes, one at a time and then 8 at a time, with each client,
and reports the client's own CPU per request (``time.process_time``: what the gateway pays), the
server's (``/proc/<pid>/stat``: what the node pays for the hop), and the latency percentiles.

    python bench/transport.py --requests 3000

``--node`` measures the node's half of a warm request instead of an echo: a real GPU manager
(``python -m gpufaas.gpu_manager``, 1 CPU device, tiny-mlp registered, batching off) is sent
warm tiny-mlp INFER frames over its Unix socket, one at a time, and its CPU per call is what the
manager pays for a request in ``gpufaas up`` (the framed hop, the decode, the forward pass, the
encode), without the gateway. ``--baseline-path`` runs an older ``gpufaas`` tree (with
``--baseline-python``) in the same run, alternating ``--rounds`` times::

    python bench/transport.py --node --requests 3000 --rounds 3 \
        --baseline-path /tmp/base --baseline-python /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop

from gpufaas.core.examples import build_examples, example_inputs
from gpufaas.core.frames import InferHead
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.protocol import HEADER_LENGTH, encode_request
from gpufaas.scheduler.local import free_port, wait_ready
from gpufaas.scheduler.transport import FramedPool, NodePool

SERVER = """
import asyncio, uvicorn, uvloop
from gpufaas.gpu_manager.framed import FramedServer
from pathlib import Path
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        m = await receive(); body += m.get("body", b""); more = m.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    await send({"type": "http.response.body", "body": body})
async def echo(call, body):
    return 200, [(b"content-type", b"application/octet-stream")], bytes(body)
async def main():
    framed = FramedServer(echo, token=None, max_body_bytes=1 << 20)
    await framed.start(unix_path=Path("SOCK"), host="127.0.0.1", port=FPORT)
    config = uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning",
                            access_log=False, http="httptools", loop="none", lifespan="off")
    await uvicorn.Server(config).serve()
uvloop.run(main())
"""


def server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(
    send: Callable[[], Awaitable[Any]], *, clients: int, count: int, server: int
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
    cpu, wall, served = time.process_time(), time.perf_counter(), server_cpu_s(server)
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    served = server_cpu_s(server) - served
    ms = np.array(latencies) * 1000
    return {
        "client_cpu_us_per_request": cpu / count * 1e6,
        "server_cpu_us_per_request": served / count * 1e6,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": count / wall,
    }


async def measure(
    url: str, sock: str, framed_port: int, server: int, args: argparse.Namespace
) -> dict[str, Any]:
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
                with_httpx, clients=clients, count=args.requests, server=server
            )
    pool = NodePool(url, size=8)

    async def with_pool() -> None:
        reply = await pool.post("/infer", body, headers)
        assert reply.status == 200

    for clients in (1, 8):
        results[f"pooled httptools, {clients} client(s)"] = await run(
            with_pool, clients=clients, count=args.requests, server=server
        )
    await pool.close()
    call = InferHead("echo", "cpu:0")
    for where, framed in (
        ("unix", FramedPool(unix_path=sock, size=8)),
        ("tcp", FramedPool(host="127.0.0.1", port=framed_port, size=8)),
    ):

        async def with_frames(framed: FramedPool = framed) -> None:
            reply = await framed.infer(call, body)
            assert reply.status == 200

        for clients in (1, 8):
            results[f"frames over {where}, {clients} client(s)"] = await run(
                with_frames, clients=clients, count=args.requests, server=server
            )
        await framed.close()
    return results


async def node_calls(sock: str, server: int, args: argparse.Namespace) -> dict[str, float]:
    """Warm tiny-mlp calls over the manager's framed Unix socket, one client."""
    arrays = example_inputs("tiny-mlp", batch=1)
    body, headers = encode_request({"x": (arrays["x"], "FP32")}, binary_outputs=True)
    call = InferHead("tiny-mlp", "cpu:0", header_length=int(headers[HEADER_LENGTH]))
    pool = FramedPool(unix_path=sock, size=1)

    async def infer() -> None:
        reply = await pool.infer(call, body)
        if reply.status != 200:
            raise RuntimeError(f"the manager answered {reply.status}: {bytes(reply.body)!r}")

    for _ in range(args.requests // 4):  # warm: the inline passes' window, caches, allocator
        await infer()
    await asyncio.sleep(0.5)  # the manager's background work after registration is done
    try:
        return await run(infer, clients=1, count=args.requests, server=server)
    finally:
        await pool.close()


def node_half(python: str, pythonpath: str | None, args: argparse.Namespace) -> dict[str, float]:
    """One GPU manager process with tiny-mlp registered, measured by :func:`node_calls`; its
    models, artifacts and socket in a folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="gpufaas-node-half-") as folder:
        return _node_half(python, pythonpath, args, Path(folder))


def _node_half(
    python: str, pythonpath: str | None, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    models = Path(os.environ.get("GPUFAAS_MODELS", work / "models"))
    build_examples(models, names=("tiny-mlp",), progress=False)
    (function,) = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"], variables={"GPUFAAS_MODELS": str(models)}
    )
    off = function.spec.batching.model_copy(update={"max_batch_size": 1, "max_delay_ms": 0.0})
    spec = function.spec.model_copy(update={"batching": off})  # every call its own pass
    port, sock = free_port(), str(work / "node.sock")
    env = {**os.environ, "GPUFAAS_HOME": str(work)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [python, "-m", "gpufaas.gpu_manager", "--port", str(port), "--cpu-devices", "1",
               "--artifact-dir", str(work / "artifacts"), "--framed-socket", sock]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready([url], timeout_s=120, procs=[server], what="GPU manager")
        response = httpx.put(
            f"{url}/v2/gpufaas/functions/tiny-mlp",
            json=spec.model_dump(mode="json", by_alias=True),
            timeout=30,
        )
        response.raise_for_status()
        return uvloop.run(node_calls(sock, server.pid, args))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--size", type=int, default=200, help="request body bytes")
    parser.add_argument("--node", action="store_true", help="the node's half: a real manager")
    parser.add_argument("--rounds", type=int, default=1, help="--node: alternate this often")
    parser.add_argument("--baseline-path", default=None, help="--node: an older gpufaas tree")
    parser.add_argument("--baseline-python", default=sys.executable)
    args = parser.parse_args()
    if args.node:
        systems = {"this": (sys.executable, None)}
        if args.baseline_path:
            systems = {"baseline": (args.baseline_python, args.baseline_path), **systems}
        rows: dict[str, list[dict[str, float]]] = {label: [] for label in systems}
        for _ in range(args.rounds):
            for label, (python, path) in systems.items():
                rows[label].append(node_half(python, path, args))
        print(json.dumps(rows, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpufaas-transport-") as folder:
        return echo_servers(Path(folder) / "echo.sock", args)


def echo_servers(path: Path, args: argparse.Namespace) -> int:
    """The echo servers (HTTP, framed TCP, framed on the Unix socket ``path``), measured."""
    port, framed_port = free_port(), free_port()
    sock = str(path)
    script = SERVER.replace("FPORT", str(framed_port)).replace("PORT", str(port))
    server = subprocess.Popen([sys.executable, "-c", script.replace("SOCK", sock)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.post(url, content=b"x", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        results = uvloop.run(measure(url, sock, framed_port, server.pid, args))
        print(json.dumps(results, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
