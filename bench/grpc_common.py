"""What the gRPC benches share: ports, a process tree's CPU, the example requests in both
protocols' bytes, manifests for ``gpufaas up``, and the goal's own comparison
(``tritonclient.grpc`` against ``tritonclient.http`` with binary tensors, 1 client).

``bench/grpc_echo.py`` and ``bench/grpc_peers.py`` import it; nothing here starts a server.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MANIFEST = """apiVersion: gpufaas.dev/v1alpha1
kind: InferenceFunction
metadata: {{name: {name}}}
spec:
  model: {{uri: "file://{models}/{file}", format: {format}}}
  inputs: {inputs}
  outputs: {outputs}
  batching: {{maxBatchSize: 1, maxDelayMs: 0}}
"""
# family: (artifact file, format, inputs, outputs), as the bundled examples declare them
FAMILIES = {
    "tiny-mlp": ("tiny-mlp.pt", "torchscript", "[{name: x, datatype: FP32, shape: [-1, 16]}]",
                 "[{name: y, datatype: FP32, shape: [-1, 4]}]"),
    "small-cnn": ("small-cnn.pt2", "torch-export",
                  "[{name: image, datatype: FP32, shape: [-1, 3, 32, 32]}]",
                  "[{name: logits, datatype: FP32, shape: [-1, 10]}]"),
}  # fmt: skip
OUTPUT = {"tiny-mlp": "y", "small-cnn": "logits"}
_DATATYPES = {"int64": "INT64", "float32": "FP32"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (those that have exited count nothing)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids.extend(tree(int(child)))
    return pids


def settled(pids: list[int], *, max_s: float = 120) -> float:
    """Wait until ``pids`` are idle (under 5% of a core over a second): a server's start-up
    work in the background would otherwise count as serving CPU. Returns the seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        before = cpu_seconds(pids)
        time.sleep(1.0)
        if cpu_seconds(pids) - before < 0.05:
            break
    return time.monotonic() - start


def write_manifests(folder: Path, models: Path) -> None:
    """One manifest per family in ``folder`` (batching off), its artifact in ``models``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (file, fmt, inputs, outputs) in FAMILIES.items():
        text = MANIFEST.format(
            name=name, models=models, file=file, format=fmt, inputs=inputs, outputs=outputs
        )
        (folder / f"{name}.yaml").write_text(text)


def body_arrays(family: str) -> dict[str, npt.NDArray[Any]]:
    from gpufaas.core.examples import example_inputs

    return example_inputs(family, batch=1)


def body_for(family: str) -> tuple[bytes, dict[str, str]]:
    """The binary-extension HTTP body and headers of one request for ``family``."""
    from gpufaas.core.protocol import encode_request

    arrays = body_arrays(family)
    tensors = {k: (a, _DATATYPES[str(a.dtype)]) for k, a in arrays.items()}
    return encode_request(tensors, binary_outputs=True)


def grpc_request(family: str) -> bytes:
    """The same request as a serialized ``ModelInferRequest`` (``raw_input_contents``)."""
    body, headers = body_for(family)
    return grpc_request_from(family, body, headers)


def grpc_request_from(name: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A binary-extension HTTP request (``body``, ``headers``) for ``name`` as a serialized
    ``ModelInferRequest``: the same tensors, each in ``raw_input_contents``."""
    from tritonclient.grpc import service_pb2 as pb

    header_length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:header_length])
    request = pb.ModelInferRequest(model_name=name)
    offset = header_length
    for tensor in header["inputs"]:
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        size = tensor["parameters"]["binary_data_size"]
        request.raw_input_contents.append(body[offset : offset + size])
        offset += size
    data: bytes = request.SerializeToString()
    return data


@dataclass(frozen=True)
class Target:
    """One served model and where to call it over each protocol."""

    http: str  # host:port
    grpc: str
    model: str
    arrays: dict[str, npt.NDArray[Any]]
    output: str


# tritonclient.grpc's own channel options (``InferenceServerClient`` with no ``channel_args``)
TRITONCLIENT_CHANNEL = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
]
# the same with grpc's transparent retries off: a client's choice, for comparison only
NO_RETRIES_CHANNEL = [*TRITONCLIENT_CHANNEL, ("grpc.enable_retries", 0)]


def http_sender(
    client: Any, *, model: str, output: str, arrays: dict[str, npt.NDArray[Any]]
) -> Callable[[], object]:
    """One blocking ``tritonclient.http`` inference per call, binary tensors both ways, the
    inputs built per call as a user of the client writes it."""
    import tritonclient.http as thttp

    def call() -> object:
        inputs = []
        for key, array in arrays.items():
            tensor = thttp.InferInput(key, list(array.shape), _DATATYPES[str(array.dtype)])
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        outputs = [thttp.InferRequestedOutput(output, binary_data=True)]
        return client.infer(model, inputs, outputs=outputs).as_numpy(output)

    return call


def grpc_sender(
    client: Any, *, model: str, output: str, arrays: dict[str, npt.NDArray[Any]]
) -> Callable[[], object]:
    """The same with ``tritonclient.grpc`` (raw contents both ways)."""
    import tritonclient.grpc as tgrpc

    def call() -> object:
        inputs = []
        for key, array in arrays.items():
            tensor = tgrpc.InferInput(key, list(array.shape), _DATATYPES[str(array.dtype)])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [tgrpc.InferRequestedOutput(output)]
        return client.infer(model, inputs, outputs=outputs).as_numpy(output)

    return call


def tritonclient_senders(
    target: Target, *, no_retries: bool = False
) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """One blocking inference per call for each protocol, as a user of ``tritonclient`` writes
    it (binary tensors both ways), and how to close the clients. ``no_retries``: also
    ``grpc_noretry``, a ``tritonclient.grpc`` client with grpc's retries off (``channel_args``)."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    http = thttp.InferenceServerClient(target.http)
    grpc_client = tgrpc.InferenceServerClient(target.grpc)
    lean = tgrpc.InferenceServerClient(target.grpc, channel_args=NO_RETRIES_CHANNEL)

    def via(client: tgrpc.InferenceServerClient) -> Callable[[], object]:
        return grpc_sender(client, model=target.model, output=target.output, arrays=target.arrays)

    def close() -> None:
        http.close()
        grpc_client.close()
        lean.close()

    via_http = http_sender(http, model=target.model, output=target.output, arrays=target.arrays)
    senders = {"http": via_http, "grpc": via(grpc_client)}
    if no_retries:
        senders["grpc_noretry"] = via(lean)
    return senders, close


def alternate(
    senders: dict[str, Callable[[], object]],
    pids: list[int],
    *,
    requests: int,
    warmup: int,
    blocks: int = 8,
    max_s: float = 240,
) -> dict[str, float]:
    """1 client, each sender in turn, ``blocks`` alternating blocks (the order flips every
    block, so drift in the machine's load falls on both alike): per sender p50/p99 (ms), this
    process's CPU and ``pids``' CPU per call (µs), and gRPC's p50 over HTTP's. The client's CPU
    is also split: ``_client_caller_cpu_us`` is the calling thread's, the rest is other threads'
    (grpc's poller and workers; ``tritonclient.http`` has none busy)."""
    for send in senders.values():
        for _ in range(warmup):
            send()
    keys = list(senders)
    latencies: dict[str, list[float]] = {k: [] for k in keys}
    client_cpu = dict.fromkeys(keys, 0.0)
    caller_cpu = dict.fromkeys(keys, 0.0)
    serving_cpu = dict.fromkeys(keys, 0.0)
    deadline = time.monotonic() + max_s
    for block in range(blocks):
        for key in keys if block % 2 == 0 else keys[::-1]:
            send, theirs = senders[key], cpu_seconds(pids)
            mine, caller = time.process_time(), time.thread_time()
            for _ in range(requests // blocks):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                send()
                latencies[key].append(time.perf_counter() - t0)
            client_cpu[key] += time.process_time() - mine
            caller_cpu[key] += time.thread_time() - caller
            serving_cpu[key] += cpu_seconds(pids) - theirs
    out: dict[str, float] = {}
    for key, values in latencies.items():
        ms = np.array(values) * 1e3
        n = max(len(values), 1)
        out[f"{key}_p50_ms"] = float(np.percentile(ms, 50))
        out[f"{key}_p99_ms"] = float(np.percentile(ms, 99))
        out[f"{key}_client_cpu_us"] = client_cpu[key] / n * 1e6
        out[f"{key}_client_caller_cpu_us"] = caller_cpu[key] / n * 1e6
        out[f"{key}_serving_cpu_us"] = serving_cpu[key] / n * 1e6
        out[f"{key}_calls"] = len(values)
    for key in keys:  # each gRPC client over its HTTP peer (grpc_raw over http_raw), else http
        if key.startswith("grpc"):
            http = f"http{key[4:]}" if f"http{key[4:]}" in senders else "http"
            out[f"{key}_over_http_p50"] = out[f"{key}_p50_ms"] / out[f"{http}_p50_ms"]
    return out


# -- raw-socket clients: the serving side's latency without either client library --------------

METHOD = "/inference.GRPCInferenceService/ModelInfer"
# what grpc's Python client sends as a call's headers (tritonclient.grpc's calls carry these)
CLIENT_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", METHOD),
    (":authority", "127.0.0.1:8081"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
    ("user-agent", "grpc-python/1.85.4 grpc-c/58.0.0 (linux; chttp2)"),
]


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


class RawHttp:
    """A keep-alive HTTP/1.1 client that replays one binary-extension request of ``family``
    to the model ``model`` (default: the family's name)."""

    def __init__(self, port: int, family: str, model: str | None = None) -> None:
        body, headers = body_for(family)
        name = model or family
        head = f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self) -> None:
        self.sock.sendall(self.request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._recv()
        head, _, body = received.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"HTTP answered {head[:200]!r}")
        at = head.lower().index(b"content-length:")
        length = int(head[at + 15 : head.index(b"\r\n", at)])
        while len(body) < length:
            body += self._recv()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("the server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


class RawGrpc(RawHttp):
    """An HTTP/2 client that replays one ModelInfer call per stream, with the frames grpc's
    client sends (indexed headers after the first call; the answers' DATA acknowledged with the
    next call)."""

    def __init__(self, port: int, family: str, model: str | None = None) -> None:
        from hpack import Encoder

        body, headers = body_for(family)
        message = grpc_request_from(model or family, body, headers)
        self.data = b"\0" + len(message).to_bytes(4, "big") + message
        encoder = Encoder()
        self.first = encoder.encode(CLIENT_HEADERS)
        self.block = encoder.encode(CLIENT_HEADERS)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0))
        self.stream = -1
        self.buffer = bytearray()
        self.unacknowledged = 0

    def call(self) -> None:
        self.stream += 2
        sid = self.stream
        out = h2_frame(1, 4, sid, self.first if sid == 1 else self.block)
        out += h2_frame(0, 1, sid, self.data)
        if self.unacknowledged:
            out += h2_frame(8, 0, 0, self.unacknowledged.to_bytes(4, "big"))
            self.unacknowledged = 0
        self.sock.sendall(out)
        answered = False
        buffer = self.buffer
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                buffer += self._recv()
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big")
            payload = bytes(buffer[9 : 9 + length])
            del buffer[: 9 + length]
            if kind == 4 and not flags & 1:  # SETTINGS
                self.sock.sendall(h2_frame(4, 1, 0))
            elif kind == 6 and not flags & 1:  # PING
                self.sock.sendall(h2_frame(6, 1, 0, payload))
            elif stream != sid:
                continue
            elif kind == 0:
                self.unacknowledged += length
                answered = True
            elif kind == 1 and flags & 1:  # trailers
                if not answered:
                    raise RuntimeError(f"gRPC answered an error: {payload!r}")
                return
            elif kind == 3:
                raise RuntimeError("gRPC reset the call")
