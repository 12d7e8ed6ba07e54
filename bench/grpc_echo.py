"""Bare echo servers: what a gRPC or HTTP front costs before any of our work (the floor under
``bench/dataplane.py``'s gRPC and HTTP rows).

Each server answers every call with the bytes it received, in a process of its own, on uvloop:

* ``grpc-aio``: grpcio's ``grpc.aio`` server, a generic handler with raw-bytes (de)serializers
  (the gateway's gRPC front before #17's second pass); ``grpc-aio-tuned``: the same with
  :data:`TUNED` options and compression off;
* ``grpc-aio-thread``: ``grpc.aio`` on a loop in a thread of its own, each call handed to the
  main loop (where the gateway would run) with ``run_coroutine_threadsafe`` and back;
* ``grpc-sync``: grpcio's thread-pool server (4 workers), the same handler;
  ``grpc-sync-bridge``: the same, each call run on the main loop by ``run_coroutine_threadsafe``;
* ``grpc-h2``: the gateway's own HTTP/2 gRPC front, ``scheduler/grpc_h2.py``;
* ``uvicorn``: uvicorn with httptools, a bare ASGI app (the gateway's HTTP front).

The client is 1 blocking caller in this process: grpc's blocking stub for the gRPC servers (the
way ``tritonclient.grpc`` calls), ``http.client`` keep-alive for uvicorn. Per server: p50/p90
latency, the client's CPU per call, and the server process's CPU per call (``/proc``).
Servers alternate in rounds so that drift in the machine's load falls on all alike.

    python bench/grpc_echo.py --calls 3000 --rounds 3

Servers bind 127.0.0.1 and are stopped at the end; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SERVERS = (
    "grpc-aio",
    "grpc-aio-tuned",
    "grpc-aio-thread",
    "grpc-sync",
    "grpc-sync-bridge",
    "grpc-h2",
    "uvicorn",
)
# the grpc.aio server options a latency tuning would try
TUNED = [
    ("grpc.so_reuseport", 0),
    ("grpc.optimization_target", "latency"),
    ("grpc.max_concurrent_streams", 100),
    ("grpc.http2.bdp_probe", 0),
]
METHOD = "/inference.GRPCInferenceService/ModelInfer"
PAYLOAD = b"\x01" * 200


def serve(kind: str, port: int) -> None:
    import uvloop

    async def echo_handler(data: bytes, *_: Any) -> bytes:
        return data

    def generic(handler: Any) -> Any:
        import grpc

        method = grpc.unary_unary_rpc_method_handler(handler)
        return grpc.method_handlers_generic_handler(METHOD.split("/")[1], {"ModelInfer": method})

    async def grpc_aio() -> None:
        import grpc

        if kind == "grpc-aio-tuned":
            server = grpc.aio.server(options=TUNED, compression=grpc.Compression.NoCompression)
        else:
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        if kind == "grpc-aio-thread":
            gateway_loop = main_loop()

            async def hop(data: bytes, context: Any) -> bytes:
                future = asyncio.run_coroutine_threadsafe(echo_handler(data), gateway_loop)
                return await asyncio.wrap_future(future)

            server.add_generic_rpc_handlers((generic(hop),))
        else:
            server.add_generic_rpc_handlers((generic(echo_handler),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    def main_loop() -> asyncio.AbstractEventLoop:
        """A uvloop running in a thread: the gateway's loop in the bridged variants."""
        import threading

        loop = uvloop.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        return loop

    if kind in ("grpc-sync", "grpc-sync-bridge"):
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        def bridged(data: bytes, context: Any) -> bytes:
            return asyncio.run_coroutine_threadsafe(echo_handler(data), gateway_loop).result()

        gateway_loop = main_loop()
        handler = bridged if kind == "grpc-sync-bridge" else (lambda data, context: data)
        sync = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        sync.add_generic_rpc_handlers((generic(handler),))
        sync.add_insecure_port(f"127.0.0.1:{port}")
        sync.start()
        print("ready", flush=True)
        sync.wait_for_termination()
        return

    async def grpc_h2() -> None:
        from gpufaas.scheduler.grpc_h2 import GrpcH2Server

        server = GrpcH2Server(
            {METHOD: echo_handler}, host="127.0.0.1", port=port, max_message_bytes=2**26
        )
        await server.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        length = str(len(body)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", length)]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    if kind == "uvicorn":
        import uvicorn

        print("ready", flush=True)  # uvicorn binds before it accepts; the client retries
        uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                    log_level="warning", access_log=False)  # fmt: skip
    else:
        uvloop.run(grpc_h2() if kind == "grpc-h2" else grpc_aio())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def caller(kind: str, port: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A blocking call to the server, and how to close the client."""
    if kind == "uvicorn":
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def post() -> None:
            connection.request("POST", "/echo", body=PAYLOAD)
            response = connection.getresponse()
            if response.read() != PAYLOAD:
                raise RuntimeError("uvicorn echo answered other bytes")

        return post, connection.close
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary(METHOD)

    def call() -> None:
        if stub(PAYLOAD, timeout=30) != PAYLOAD:
            raise RuntimeError(f"{kind} echo answered other bytes")

    return call, channel.close


def measure(kind: str, *, calls: int, warmup: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        call, close = _connected(kind, port)
        try:
            for _ in range(warmup):
                call()
            latencies = []
            server_before, client_before = cpu_seconds(proc.pid), time.process_time()
            deadline = time.monotonic() + 120
            for _ in range(calls):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - t0)
            client = time.process_time() - client_before
            server = cpu_seconds(proc.pid) - server_before
        finally:
            close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    latencies.sort()
    n = len(latencies)
    return {
        "p50_us": latencies[n // 2] * 1e6,
        "p90_us": latencies[int(n * 0.9)] * 1e6,
        "client_cpu_us": client / n * 1e6,
        "server_cpu_us": server / n * 1e6,
        "calls": n,
    }


def _connected(kind: str, port: int) -> tuple[Callable[[], None], Callable[[], None]]:
    deadline = time.monotonic() + 30
    while True:
        call, close = caller(kind, port)
        try:
            call()
            return call, close
        except Exception:
            close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stages(*, calls: int) -> dict[str, float]:
    """Our own work per tiny-mlp ModelInfer on the gateway, in this process (µs per call, best
    of 3 x ``calls``): the HTTP/2 front (frames in, a task, frames out, around an echo handler,
    fed the bytes a grpc client sends), the protobuf parse, the binary-extension body, and the
    answer cut into a ModelInferResponse and serialized. The gateway's own path (header check,
    policy, dispatcher, the hop to the node) is the HTTP path's and is not counted here."""
    import timeit

    import numpy as np
    import uvloop
    from hpack import Encoder
    from tritonclient.grpc import service_pb2 as pb

    from gpufaas.scheduler.grpc_h2 import PREFACE, GrpcH2Server, _Connection
    from gpufaas.scheduler.grpc_server import infer_body, infer_response_bytes
    from gpufaas.scheduler.transport import NodeReply

    request = pb.ModelInferRequest(model_name="tiny-mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    request.outputs.add(name="y")
    data = request.SerializeToString()
    header = b'{"model_name":"tiny-mlp","outputs":[{"name":"y","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":16}}]}'
    reply = NodeReply(
        200, {"inference-header-content-length": str(len(header))}, header + b"\0" * 16
    )

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=calls, repeat=3)) / calls * 1e6

    out = {
        "protobuf parse (FromString)": best(lambda: pb.ModelInferRequest.FromString(data)),
        "binary-extension body (infer_body)": best(lambda: infer_body(request)),
        "answer to a serialized ModelInferResponse": best(
            lambda: infer_response_bytes("tiny-mlp", reply)
        ),
    }

    class Sink:
        def write(self, data: bytes) -> None: ...
        def writelines(self, data: list[bytes]) -> None: ...
        def close(self) -> None: ...

    async def echo(message: bytes, *_: Any) -> bytes:
        return message

    encoder = Encoder()
    fields = [(":method", "POST"), (":scheme", "http"), (":path", METHOD),
              (":authority", "127.0.0.1"), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    body = b"\0" + len(data).to_bytes(4, "big") + data

    def call_frames(stream: int) -> bytes:
        block = encoder.encode(fields)
        return (len(block).to_bytes(3, "big") + b"\x01\x04" + stream.to_bytes(4, "big") + block
                + len(body).to_bytes(3, "big") + b"\x00\x01" + stream.to_bytes(4, "big") + body)  # fmt: skip

    async def front() -> float:
        server = GrpcH2Server({METHOD: echo}, host="127.0.0.1", port=0, max_message_bytes=2**26)
        connection = _Connection(server)
        connection.connection_made(Sink())  # type: ignore[arg-type]
        connection.data_received(PREFACE + b"\0\0\0\x04\0\0\0\0\0")
        spent = []
        for _ in range(3):
            frames = [call_frames(connection.last_stream + 2 * (i + 1)) for i in range(calls)]
            started = time.perf_counter()
            for chunk in frames:
                connection.data_received(chunk)
                await asyncio.sleep(0)  # the call's task runs and answers
            spent.append((time.perf_counter() - started) / calls * 1e6)
        server.socket.close()
        return min(spent)

    out["HTTP/2 front: frames in, task, frames out"] = uvloop.run(front())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--stages", action="store_true", help="only our own per-call work on the gateway"
    )
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    if args.stages:
        print(json.dumps(stages(calls=args.calls), indent=1))
        return 0
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in SERVERS}
    for _ in range(args.rounds):
        for kind in SERVERS:
            runs[kind].append(measure(kind, calls=args.calls, warmup=args.warmup))
    summary = {
        kind: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for kind, rounds in runs.items()
    }
    print(json.dumps({"rounds": runs, "median_of_rounds": summary}, indent=1))
    print("| server | p50 µs | p90 µs | client CPU µs/call | server CPU µs/call |", file=sys.stderr)
    print("| --- | --- | --- | --- | --- |", file=sys.stderr)
    for kind, s in summary.items():
        print(f"| {kind} | {s['p50_us']:.0f} | {s['p90_us']:.0f} | {s['client_cpu_us']:.0f} | "
              f"{s['server_cpu_us']:.0f} |", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
