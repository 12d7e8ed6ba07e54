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
Servers alternate in rounds (the order flipping every round) so that drift in the machine's
load falls on all alike. ``--servers`` picks some of them, or bench-only variants of
``grpc_h2``'s answers (:func:`_variant`: ``grpc-h2-literal``, ``grpc-h2-quickack``);
``--paired`` runs the picked servers at once and calls them one call each in turn, and reports
each one's per-call differences from the first with bootstrap intervals (small effects on a busy
machine).

    python bench/grpc_echo.py --calls 3000 --rounds 3
    python bench/grpc_echo.py --paired --servers grpc-h2,grpc-h2-literal --calls 10000

Two more views of the gateway's own fronts (``docs/dataplane.md``, "gRPC"):

* ``--fronts``: in this process, CPU per tiny-mlp call of the gateway's HTTP front and of its
  gRPC front, on the real gateway with the node hop stubbed (a canned answer), each fed the
  bytes its client sends (the HTTP binary request; the gRPC call's HEADERS, DATA and the two
  WINDOW_UPDATEs grpc's client sends with it). No sockets, no client: the fronts alone.
* ``--replay``: a real ``gpufaas up`` (1 manager, 1 CPU device, warm) called by two raw-socket
  clients that do the same minimal work, one replaying a binary HTTP request and one a gRPC
  call's frames, in alternating blocks: the serving side's latency for each protocol, without
  either client library's own cost (``tritonclient.grpc``'s grpc core spends more per call than
  ``tritonclient.http``, which no server can change). ``--baseline PYTHON --baseline-path
  TREE`` runs another checkout's system in the same rounds.
* ``--client-cost``: whether ``tritonclient.grpc``'s own CPU per call depends on the server it
  calls: the gateway against grpcio's C-core server and our bare front, both answering every
  call at once with the gateway's own answer (:func:`client_cost`).

Servers bind 127.0.0.1 and are stopped at the end; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
# this process holds grpcio channels while it starts servers (docs/dataplane.md, "gRPC")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from grpc_common import (
    CLIENT_HEADERS,
    METHOD,
    RawGrpc,
    RawHttp,
    body_for,
    cpu_seconds,
    free_port,
    grpc_request,
    h2_frame,
    settled,
    tree,
    write_manifests,
)

SERVERS = (
    "grpc-aio",
    "grpc-aio-tuned",
    "grpc-aio-thread",
    "grpc-sync",
    "grpc-sync-bridge",
    "grpc-h2",
    "uvicorn",
)
# answer-side levers tried on our front (``docs/dataplane.md``, "gRPC", sixth pass): bench-only
# variants of ``grpc_h2``'s connection, not in the default run
VARIANTS = ("grpc-h2-literal", "grpc-h2-quickack", "grpc-h2-split", "grpc-h2-grpc-settings")
# the grpc.aio server options a latency tuning would try
TUNED = [
    ("grpc.so_reuseport", 0),
    ("grpc.optimization_target", "latency"),
    ("grpc.max_concurrent_streams", 100),
    ("grpc.http2.bdp_probe", 0),
]
PAYLOAD = b"\x01" * 200


def serve(kind: str, port: int, *, answer: bytes = b"", wait_s: float = 0.0) -> None:
    """Serve ``kind`` on ``port``: each call answered with its own bytes, or with ``answer``
    when one is given (``--client-cost``'s canned answers), after ``wait_s`` asleep (the loop
    blocked: one client calls, one call at a time)."""
    import uvloop

    async def echo_handler(data: bytes, *_: Any) -> bytes:
        if wait_s:
            time.sleep(wait_s)
        return answer or data

    if kind == "http-canned":
        uvloop.run(_http_canned(port, answer, wait_s=wait_s))
        return

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
        handler = bridged if kind == "grpc-sync-bridge" else (lambda data, _: answer or data)
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
        if kind == "grpc-h2":
            await server.start()
        else:
            connection = _variant(kind)
            loop = asyncio.get_running_loop()
            await loop.create_server(lambda: connection(server), sock=server.socket)
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
        uvloop.run(grpc_h2() if kind.startswith("grpc-h2") else grpc_aio())


async def _http_canned(port: int, answer: bytes, *, wait_s: float) -> None:
    """The least an HTTP/1.1 server can do: read a request by its Content-Length, write
    ``answer`` (a whole response, head and body, as the gateway wrote it) in one write."""

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].lower()
                at = head.find(b"content-length:")
                length = 0 if at < 0 else int(head[at + 15 :].split(b"\r\n", 1)[0])
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                if wait_s:
                    time.sleep(wait_s)
                self.transport.write(answer)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Canned, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await asyncio.Event().wait()


def _variant(kind: str) -> Callable[[Any], asyncio.Protocol]:
    """A ``grpc_h2`` connection that answers differently (bench-only, never served):

    * ``grpc-h2-literal``: the answers' ``content-type`` and ``grpc-status: 0`` as literals on
      every answer, never indexed (``grpc_h2`` before its sixth pass; ``grpc_h2`` now adds them
      to the client's HPACK table once and sends one byte each after that);
    * ``grpc-h2-quickack``: ``TCP_QUICKACK`` set again on every read (the kernel clears it),
      so the request is acknowledged at once rather than with the answer;
    * ``grpc-h2-split``: each answer's HEADERS, DATA and trailers in three writes (three
      segments) instead of one: does one write save the client wake-ups (eighth pass)?
    * ``grpc-h2-grpc-settings``: the SETTINGS and connection WINDOW_UPDATE that grpc's own C++
      server sends (NVIDIA Triton's, decoded by ``bench/grpc_wire.py``: 4 MiB windows and
      frames, true binary metadata allowed) instead of ours (256 streams, 16 MiB windows): does
      anything in them change the client's work per call (eighth pass)?
    """
    import socket

    from gpufaas.scheduler import grpc_h2

    class Literal(grpc_h2._Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.answer_fields.limit = 0  # too small a table to index in: literals

    class QuickAck(grpc_h2._Connection):
        def data_received(self, data: bytes) -> None:
            if self.transport is not None:
                sock = self.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            super().data_received(data)

    class Split(grpc_h2._Connection):
        def _drain(self) -> None:
            out, self.out = self.out, []
            if self.transport is None:
                return
            # an answer is queued as 7 pieces: HEADERS (2), DATA (3), trailers (2)
            for start, stop in ((0, 2), (2, 5), (5, len(out))) if len(out) == 7 else ((0, None),):
                self.transport.write(b"".join(out[start:stop]))

    class GrpcSettings(grpc_h2._Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            window, frame = 4_194_304, 4_194_304
            settings = (
                (4).to_bytes(2, "big") + window.to_bytes(4, "big")
                + (5).to_bytes(2, "big") + frame.to_bytes(4, "big")
                + (6).to_bytes(2, "big") + (16_384).to_bytes(4, "big")
                + (0xFE03).to_bytes(2, "big") + (1).to_bytes(4, "big")
            )  # fmt: skip
            self.transport = cast(asyncio.Transport, transport)
            self.server.connections.add(self)
            self.transport.write(
                h2_frame(grpc_h2.SETTINGS, 0, 0, settings)
                + h2_frame(grpc_h2.WINDOW_UPDATE, 0, 0, (window - 65_535).to_bytes(4, "big"))
            )

    variants: dict[str, type[grpc_h2._Connection]] = {
        "grpc-h2-literal": Literal,
        "grpc-h2-quickack": QuickAck,
        "grpc-h2-split": Split,
        "grpc-h2-grpc-settings": GrpcSettings,
    }
    return variants[kind]


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
            server_before, client_before = cpu_seconds([proc.pid]), time.process_time()
            deadline = time.monotonic() + 120
            for _ in range(calls):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - t0)
            client = time.process_time() - client_before
            server = cpu_seconds([proc.pid]) - server_before
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


def paired(kinds: list[str], *, calls: int, warmup: int) -> dict[str, Any]:
    """``--paired``: the servers all up at once and called in turn, one call each, so that a
    change in the machine's load falls on every server alike even on a busy machine. Per
    server: p50/p90 and this process's CPU per call (grpc's client threads included: each call
    is finished before the next starts); and each server's p50 and mean CPU against the
    first's, with 95% bootstrap intervals of the per-call differences' median and mean."""
    import numpy as np

    procs, clients = [], []
    for kind in kinds:
        port = free_port()
        command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        proc.stdout.readline()
        clients.append(_connected(kind, port))
    try:
        latency = np.zeros((len(kinds), calls))
        cpu = np.zeros((len(kinds), calls))
        for call, _ in clients:
            for _ in range(warmup):
                call()
        deadline = time.monotonic() + 300
        done = 0
        for i in range(calls):
            if time.monotonic() > deadline:
                break
            order = range(len(kinds)) if i % 2 == 0 else reversed(range(len(kinds)))
            for k in order:
                c0, t0 = time.process_time(), time.perf_counter()
                clients[k][0]()
                latency[k, i] = time.perf_counter() - t0
                cpu[k, i] = time.process_time() - c0
            done = i + 1
    finally:
        for _, close in clients:
            close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    latency, cpu = latency[:, :done] * 1e6, cpu[:, :done] * 1e6
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"calls": done}
    for k, kind in enumerate(kinds):
        out[kind] = {
            "p50_us": float(np.median(latency[k])),
            "p90_us": float(np.percentile(latency[k], 90)),
            "client_cpu_us": float(cpu[k].mean()),
        }
        if k:
            d_lat, d_cpu = latency[k] - latency[0], cpu[k] - cpu[0]
            picks = rng.integers(0, done, size=(1000, done))
            out[kind][f"minus_{kinds[0]}"] = {
                "latency_median_us": float(np.median(d_lat)),
                "latency_median_ci": np.percentile(
                    np.median(d_lat[picks], axis=1), [2.5, 97.5]
                ).tolist(),
                "client_cpu_mean_us": float(d_cpu.mean()),
                "client_cpu_mean_ci": np.percentile(
                    d_cpu[picks].mean(axis=1), [2.5, 97.5]
                ).tolist(),
            }
    return out


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
        block: bytes = encoder.encode(fields)
        return h2_frame(1, 4, stream, block) + h2_frame(0, 1, stream, body)

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


# -- the fronts alone, in this process ------------------------------------------------------------

_ANSWER_HEADER = (
    b'{"model_name":"tiny-mlp","outputs":[{"name":"y","datatype":"FP32","shape":[1,4],'
    b'"parameters":{"binary_data_size":16}}]}'
)


def fronts(*, calls: int, rounds: int) -> dict[str, list[float]]:
    """``--fronts``: CPU µs per call of each front (best of 5 x ``calls`` per round)."""
    import tempfile

    import uvloop
    from hpack import Encoder

    from gpufaas.core.manifests import load_manifests
    from gpufaas.scheduler import front, grpc_h2
    from gpufaas.scheduler.gateway import create_app
    from gpufaas.scheduler.grpc_server import make_server
    from gpufaas.scheduler.main import build_gateway
    from gpufaas.scheduler.transport import NodeReply

    with tempfile.TemporaryDirectory(prefix="grpc-fronts-") as name:
        folder = Path(name)
        write_manifests(folder, folder)  # no model is loaded: the node hop is stubbed
        functions = load_manifests([folder / "tiny-mlp.yaml"])
    gateway = build_gateway(manager_urls={}, functions=functions)
    reply = NodeReply(
        200,
        {"inference-header-content-length": str(len(_ANSWER_HEADER))},
        _ANSWER_HEADER + bytes(16),
    )

    async def forward(name: str, call: Any, *, deadline: float | None = None) -> NodeReply:
        return reply

    gateway.forward = forward  # type: ignore[method-assign]

    class Sink:  # a transport that counts writes
        writes = 0

        def write(self, data: bytes) -> None:
            self.writes += 1

        def writelines(self, data: list[bytes]) -> None:
            self.writes += 1

        def is_closing(self) -> bool:
            return False

        def close(self) -> None: ...
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    async def timed(feed: Callable[[], None], sink: Sink) -> float:
        spent = []
        for _ in range(5):
            before = sink.writes
            started = time.process_time()
            for _ in range(calls):
                feed()
                await asyncio.sleep(0)  # the call's task runs and answers
                await asyncio.sleep(0)
            spent.append((time.process_time() - started) / calls * 1e6)
            if sink.writes - before != calls:
                raise RuntimeError(f"{calls} calls, {sink.writes - before} answers")
        return min(spent)

    async def http() -> float:
        settings = front.FrontSettings(max_body_bytes=gateway.config.limits.max_body_bytes)
        http_front = front.HttpFront(create_app(gateway), gateway=gateway, settings=settings)
        connection = front._Connection(http_front)
        sink = Sink()
        connection.connection_made(sink)  # type: ignore[arg-type]
        body, headers = body_for("tiny-mlp")
        head = "POST /v2/models/tiny-mlp/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        return await timed(lambda: connection.data_received(request), sink)

    async def grpc() -> float:
        server, _ = make_server(gateway, host="127.0.0.1", port=0)
        connection = grpc_h2._Connection(server)
        sink = Sink()
        connection.connection_made(sink)  # type: ignore[arg-type]
        connection.data_received(grpc_h2.PREFACE + h2_frame(4, 0, 0))
        message = grpc_request("tiny-mlp")
        data = b"\0" + len(message).to_bytes(4, "big") + message
        encoder = Encoder()
        first = encoder.encode(CLIENT_HEADERS)
        block = encoder.encode(CLIENT_HEADERS)  # every later call: indexed fields only
        streams = iter(range(1, 2**31, 2))

        def call() -> None:
            sid = next(streams)
            connection.data_received(
                h2_frame(1, 4, sid, first if sid == 1 else block)
                + h2_frame(8, 0, sid, (5).to_bytes(4, "big"))
                + h2_frame(0, 1, sid, data)
                + h2_frame(8, 0, 0, (60).to_bytes(4, "big"))
            )

        try:
            return await timed(call, sink)
        finally:
            server.socket.close()

    async def run() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"http_front_cpu_us": [], "grpc_front_cpu_us": []}
        for _ in range(rounds):
            out["http_front_cpu_us"].append(await http())
            out["grpc_front_cpu_us"].append(await grpc())
        return out

    return uvloop.run(run())


# -- the serving side of a real system, seen by identical raw-socket clients ------------------------


def _models_and_functions(work: Path) -> Path:
    """The example models (``$GPUFAAS_MODELS``, else built under ``work``) and the
    benchmark's manifests in ``work/functions``; the models' folder."""
    from gpufaas.core.examples import build_examples

    models = Path(os.environ.get("GPUFAAS_MODELS", work / "models"))
    build_examples(models, progress=False)
    write_manifests(work / "functions", models)
    return models


@contextlib.contextmanager
def _system(
    work: Path,
    models: Path,
    *,
    python: str = sys.executable,
    path: str | None = None,
    what: str = "gpufaas",
) -> Iterator[tuple[int, int, list[int]]]:
    """A fresh ``gpufaas up`` (1 CPU device, LALB-O3, ``work/functions``) run by ``python``
    (``path``: its PYTHONPATH) in a home of its own: its HTTP and gRPC ports and process tree
    once ready; stopped, and its home removed, afterwards."""
    import tempfile

    from gpufaas.scheduler.local import stop_processes, wait_ready

    port, grpc_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="grpc-bench-home-", ignore_cleanup_errors=True) as home:
        env = {**os.environ, "GPUFAAS_MODELS": str(models), "GPUFAAS_HOME": home}
        if path:
            env["PYTHONPATH"] = path
        command = [python, "-m", "gpufaas.core.cli", "up", "--port", str(port),
                   "--grpc-port", str(grpc_port), "--functions", str(work / "functions"),
                   "--cpu-devices", "1", "--policy", "lalb-o3"]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        try:
            wait_ready([f"http://127.0.0.1:{port}"], timeout_s=180, procs=[proc], what=what)
            yield port, grpc_port, tree(proc.pid)
        finally:
            stop_processes([proc], timeout_s=30)


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """``--replay``: per system and round, each model's raw-client p50/p90 and serving CPU;
    every folder it makes (models, manifests, each system's home) is removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="grpc-replay-") as folder:
        return _replay(args, Path(folder))


def _replay(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dataplane import gateway_seconds

    models = _models_and_functions(work)
    systems = {"this": (sys.executable, None)}
    if args.baseline:
        systems = {"baseline": (args.baseline, args.baseline_path), **systems}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in systems}
    for _ in range(args.rounds):
        for label, (python, path) in systems.items():
            with _system(work, models, python=python, path=path, what=label) as ready:
                port, grpc_port, pids = ready
                # the manager's start-up work in the background would count as serving CPU
                round_out: dict[str, Any] = {"settled_after_s": settled(pids)}
                for name in ("tiny-mlp", "small-cnn"):
                    clients = {"http": RawHttp(port, name), "grpc": RawGrpc(grpc_port, name)}
                    try:
                        round_out[name] = _alternate(
                            clients, pids, cpu_seconds, args=args,
                            held=functools.partial(gateway_seconds, port, name),
                        )  # fmt: skip
                    finally:
                        for client in clients.values():
                            client.close()
                results[label].append(round_out)
    return results


def _alternate(
    clients: dict[str, RawHttp], pids: list[int], cpu: Callable[[list[int]], float], *,
    args: argparse.Namespace, held: Callable[[], tuple[float, float]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """8 alternating blocks per client after a warm-up: p50, p90, serving CPU per call, and
    with ``held`` (the gateway's ``gpufaas_request_seconds`` sum and count, read outside the
    timed calls) the gateway's own mean time per call."""
    for client in clients.values():
        for _ in range(args.warmup):
            client.call()
    latencies: dict[str, list[float]] = {key: [] for key in clients}
    serving = dict.fromkeys(clients, 0.0)
    at_gateway = {key: [0.0, 0.0] for key in clients}
    deadline = time.monotonic() + 120
    for _ in range(8):
        for key, client in clients.items():
            start = held() if held is not None else (0.0, 0.0)
            before = cpu(pids)
            for _ in range(args.calls // 8):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                client.call()
                latencies[key].append(time.perf_counter() - t0)
            serving[key] += cpu(pids) - before
            if held is not None:
                end = held()
                at_gateway[key][0] += end[0] - start[0]
                at_gateway[key][1] += end[1] - start[1]
    out: dict[str, float] = {}
    for key, (seconds, count) in at_gateway.items():
        if count:
            out[f"{key}_gateway_mean_us"] = seconds / count * 1e6
    for key, values in latencies.items():
        values.sort()
        n = len(values)
        out[f"{key}_p50_us"] = values[n // 2] * 1e6
        out[f"{key}_p90_us"] = values[int(n * 0.9)] * 1e6
        out[f"{key}_serving_cpu_us"] = serving[key] / n * 1e6
    out["grpc_over_http_p50"] = out["grpc_p50_us"] / out["http_p50_us"]
    return out


# -- the client's cost per call, by the server it calls -----------------------------------------

# --client-cost's targets: (label, the client library, which server); a canned server answers
# every call at once (or after --wait-us asleep: "-wait") with the gateway's own answer to it
COST_TARGETS = (
    ("http-gateway", "http", "gateway"),
    ("grpc-gateway", "grpc", "gateway"),
    ("http-canned", "http", "http-canned"),
    ("grpc-h2-canned", "grpc", "grpc-h2"),
    ("grpc-grpcio-canned", "grpc", "grpc-sync"),
    ("http-canned-wait", "http", "http-canned-wait"),
    ("grpc-h2-canned-wait", "grpc", "grpc-h2-wait"),
)


def client_cost(args: argparse.Namespace) -> dict[str, Any]:
    """``--client-cost``: does ``tritonclient.grpc`` spend more of its own CPU per call on our
    gateway than on a server that costs it nothing extra? Per round and model, one blocking
    client calls in alternating blocks: the gateway over HTTP (``tritonclient.http``, binary)
    and over gRPC, and over gRPC two servers that answer every call at once with the gateway's
    own answer to it, byte for byte: grpcio's C-core server (``grpc-sync``) and our HTTP/2
    front (``grpc-h2``). Per target: p50, the client's CPU per call (all its threads, and the
    calling thread alone), its context switches per call (all threads) and the server's CPU.
    Every folder it makes is removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="grpc-client-cost-") as folder:
        return _client_cost(args, Path(folder))


def _client_cost(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import grpc

    models = _models_and_functions(work)
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        with _system(work, models) as (port, grpc_port, pids):
            round_out: dict[str, Any] = {"settled_after_s": settled(pids)}
            for name in ("tiny-mlp", "small-cnn"):
                with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    answer = channel.unary_unary(METHOD)(grpc_request(name), timeout=30)
                (work / "grpc-answer").write_bytes(answer)
                (work / "http-answer").write_bytes(_http_answer(port, name))
                wait = ["--wait-us", str(300 if args.wait_us is None else args.wait_us)]
                canned = {
                    "grpc-sync": _start(["grpc-sync"], work / "grpc-answer"),
                    "grpc-h2": _start(["grpc-h2"], work / "grpc-answer"),
                    "grpc-h2-wait": _start(["grpc-h2", *wait], work / "grpc-answer"),
                    "http-canned": _start(["http-canned"], work / "http-answer"),
                    "http-canned-wait": _start(["http-canned", *wait], work / "http-answer"),
                }
                try:
                    servers = {"gateway": (port, grpc_port, pids)}
                    for kind, (server_port, server) in canned.items():
                        servers[kind] = (server_port, server_port, [server.pid])
                    round_out[name] = _cost_blocks(name, servers, args=args)
                finally:
                    for _, server in canned.values():
                        server.terminate()
                        server.wait(timeout=10)
            rounds.append(round_out)
    return {"rounds": rounds}


def _start(serve_args: list[str], answer: Path) -> tuple[int, subprocess.Popen[str]]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", *serve_args, "--port", str(port),
               "--answer", str(answer)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    return port, proc


def _http_answer(port: int, name: str) -> bytes:
    """The gateway's whole HTTP response (head and body) to one binary request for ``name``."""
    client = RawHttp(port, name)
    try:
        client.sock.sendall(client.request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += client._recv()
        head, _, body = received.partition(b"\r\n\r\n")
        at = head.lower().index(b"content-length:")
        length = int(head[at + 15 : head.index(b"\r\n", at)])
        while len(body) < length:
            body += client._recv()
        return head + b"\r\n\r\n" + body
    finally:
        client.close()


def _switches() -> int:
    """Voluntary and involuntary context switches of every thread of this process so far."""
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            text = status.read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        for line in text.splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split()[-1])
    return total


def _cost_blocks(
    name: str, servers: dict[str, tuple[int, int, list[int]]], *, args: argparse.Namespace
) -> dict[str, Any]:
    """16 alternating blocks of ``args.calls // 16`` calls per target after ``args.warmup``:
    per target p50 (µs), client CPU, the calling thread's CPU, client context switches and the
    server's CPU per call, each also per block (for paired differences between targets)."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from grpc_common import OUTPUT, body_arrays, grpc_sender, http_sender

    arrays, output = body_arrays(name), OUTPUT[name]
    closers: list[Callable[[], None]] = []
    senders: dict[str, tuple[Callable[[], object], list[int]]] = {}
    for label, library, server in COST_TARGETS:
        http_port, grpc_port, pids = servers[server]
        if library == "http":
            http = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")

            via_http = http_sender(http, model=name, output=output, arrays=arrays)
            senders[label] = (via_http, pids)
            closers.append(http.close)
        else:
            client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")

            via_grpc = grpc_sender(client, model=name, output=output, arrays=arrays)
            senders[label] = (via_grpc, pids)
            closers.append(client.close)
    try:
        for send, _ in senders.values():
            for _ in range(args.warmup):
                if send() is None:
                    raise RuntimeError("no output")
        keys = list(senders)
        latencies: dict[str, list[float]] = {k: [] for k in keys}
        per_block: dict[str, dict[str, list[float]]] = {
            k: {"client": [], "caller": [], "switches": [], "server": []} for k in keys
        }
        deadline = time.monotonic() + 240
        blocks = 16
        for block in range(blocks):
            for key in keys if block % 2 == 0 else keys[::-1]:
                send, pids = senders[key]
                switches, theirs = _switches(), cpu_seconds(pids)
                mine, caller = time.process_time(), time.thread_time()
                count = 0
                for _ in range(args.calls // blocks):
                    if time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    send()
                    latencies[key].append(time.perf_counter() - t0)
                    count += 1
                n = max(count, 1)
                per_block[key]["client"].append((time.process_time() - mine) / n * 1e6)
                per_block[key]["caller"].append((time.thread_time() - caller) / n * 1e6)
                per_block[key]["server"].append((cpu_seconds(pids) - theirs) / n * 1e6)
                per_block[key]["switches"].append((_switches() - switches) / n)
    finally:
        for close in closers:
            close()
    out: dict[str, Any] = {}
    for key in keys:
        values = sorted(latencies[key])
        out[key] = {
            "p50_us": values[len(values) // 2] * 1e6,
            "calls": len(values),
            **{f"{k}_per_call": statistics.fmean(v) for k, v in per_block[key].items()},
            "blocks": per_block[key],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--stages", action="store_true", help="only our own per-call work on the gateway"
    )
    parser.add_argument(
        "--fronts", action="store_true", help="CPU per call of the HTTP and gRPC fronts alone"
    )
    parser.add_argument(
        "--replay", action="store_true", help="a real system's latency per protocol, raw clients"
    )
    parser.add_argument("--baseline", default=None, help="--replay: a baseline checkout's python")
    parser.add_argument("--baseline-path", default=None, help="--replay: its PYTHONPATH")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="--servers all up at once, called one call each in turn (a busy machine's drift cancels)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"echo servers to compare (also: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--client-cost",
        action="store_true",
        help="tritonclient.grpc's own CPU per call on the gateway and on servers that answer "
        "at once (grpcio's C-core server, our front), tritonclient.http's on the gateway",
    )
    parser.add_argument(
        "--wait-us",
        type=int,
        default=None,
        help="--client-cost: the -wait servers' wait per call (default 300)",
    )
    parser.add_argument(
        "--serve", choices=(*SERVERS, *VARIANTS, "http-canned"), help=argparse.SUPPRESS
    )
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        answer = args.answer.read_bytes() if args.answer else b""
        serve(args.serve, args.port, answer=answer, wait_s=(args.wait_us or 0) * 1e-6)
        return 0
    if args.client_cost:
        print(json.dumps(client_cost(args), indent=1))
        return 0
    if args.stages:
        print(json.dumps(stages(calls=args.calls), indent=1))
        return 0
    if args.fronts:
        print(json.dumps(fronts(calls=args.calls, rounds=args.rounds), indent=1))
        return 0
    if args.replay:
        print(json.dumps(replay(args), indent=1))
        return 0
    kinds = args.servers.split(",")
    unknown = set(kinds) - set(SERVERS + VARIANTS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}")
    if args.paired:
        print(json.dumps(paired(kinds, calls=args.calls, warmup=args.warmup), indent=1))
        return 0
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
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
