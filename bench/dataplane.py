"""The data plane's own figures: warm latency, throughput, gRPC vs HTTP, serving CPU per request.

Starts ``gpufaas up`` (1 GPU manager, 1 CPU device) from one or more Python environments (so the
same run can hold a baseline checkout next to this one), and drives each with a light client on
loopback: keep-alive HTTP/1.1 with binary tensors (the gateway's own pooled transport used as a
client, so the client's cost stays small next to the server's), and gRPC with pre-serialized
``ModelInferRequest`` bytes.

Figures per system:

* ``warm_p50_ms`` / ``warm_p99_ms``: 1 client, tiny-mlp and small-cnn, batching off;
* ``grpc_p50_ms``: the same over gRPC (systems that have it), grpc.aio client;
  ``grpc_sync_p50_ms``: with grpc's blocking stub, the way ``tritonclient.grpc`` calls;
  ``tc_grpc_p50_ms`` / ``tc_http_p50_ms``: ``tritonclient.grpc`` vs ``tritonclient.http``
  (binary tensors), alternating blocks, each with its client CPU and serving CPU per request
  and the gateway's own mean time per request (``tc_*_gateway_mean_ms``: its
  ``gpufaas_request_seconds`` over the block, from reading the body to the answer)
  (``--only grpc``: these 1-client rows alone), and the client's context switches per call
  (``tc_*_client_switches``, all its threads); ``--client-grpc-experiments`` runs this client
  process with grpc's ``GRPC_EXPERIMENTS`` set (the servers without it), recorded as
  ``client_grpc_experiments``;
* ``rps_8``: 8 clients, tiny-mlp with dynamic batching on (maxBatchSize 8, maxDelayMs 2);
* ``cpu_us_per_request``: user+system CPU of the gateway and manager processes over a
  1-client warm tiny-mlp phase, divided by its request count (``/proc/<pid>/stat``), measured
  once the servers are idle after start-up (``settled_after_s``: the manager's background
  preparation of every function would otherwise be counted);
* ``minilm_overhead``: warm 1-client p50 end to end minus the node's median forward-pass time
  (``X-Gpufaas-Compute-Ms``), as a fraction of that forward pass (MiniLM, 1 x 128 tokens).

    python bench/dataplane.py                         # this checkout: framed and HTTP node hop
    python bench/dataplane.py --baseline /work/main/.venv/bin/python   # and a baseline, same run
    python bench/dataplane.py --only http --baseline /work/main/.venv/bin/python \
        --node-transports framed --requests 1000 --rounds 3   # serving CPU, before and after
    python bench/dataplane.py --front uvicorn,protocol --requests 5000 --rounds 3

``--front``: the gateway's HTTP front alone, each kind in its own process with the node hop
answered in-process by a canned tiny-mlp answer (no manager, no routing: ``Gateway.forward``
stubbed), 1 keep-alive client; the server process's CPU per request. ``uvicorn`` is the front
before (uvicorn + httptools + the bare-ASGI ``InferFastPath``), ``protocol`` the
``scheduler/front.py`` one.

``--node-transports framed,http`` (the default) runs this checkout twice per round: the gateway's
inference calls to the node over its framed Unix socket (``framed``, what ``gpufaas up`` does)
and over pooled HTTP/1.1 (``http``, the path before it), so before and after share one run.
``inprocess`` runs the node in the gateway's process (``gpufaas up --node-transport inprocess``);
its serving CPU is then that one process's (``processes``: how many were counted)::

    python bench/dataplane.py --only serving --node-transports framed,inprocess --rounds 3
    python bench/dataplane.py --only serving --node-transports framed,inprocess --rounds 2 \
        --baseline .venv/bin/python --baseline-path OLD_TREE --baseline-transports framed,inprocess

``--pins split,together`` (exploratory) also runs each two-process transport with its processes
pinned once ready: the gateway on CPU 0 and its manager on CPU 1 (``split``; the client free, or
with ``split-client-gateway`` / ``split-client-node`` on one of theirs), or both servers on CPU 0
and the client on CPU 1 (``together``); ``docs/dataplane.md``, "Eleventh session".

Every loop is bounded in count and time; servers bind 127.0.0.1 and are stopped at the end, and
every folder a run makes is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from grpc_common import cpu_seconds, free_port, grpc_request_from, grpc_sender, http_sender, tree
from tritonclient.utils import InferenceServerException

from gpufaas.core.examples import build_examples, example_inputs
from gpufaas.core.protocol import encode_request
from gpufaas.scheduler.local import stop_processes, wait_ready
from gpufaas.scheduler.transport import NodePool, NodeReply, NodeUnreachable

MANIFEST = """apiVersion: gpufaas.dev/v1alpha1
kind: InferenceFunction
metadata: {{name: {name}}}
spec:
  model: {{uri: "file://{models}/{file}", format: {format}}}
  inputs: {inputs}
  outputs: {outputs}
  batching: {{maxBatchSize: {batch}, maxDelayMs: {delay}}}
"""
GRPC_EXPERIMENTS = "GRPC_EXPERIMENTS"  # grpc's switch for its experiments, read once at start
FAMILIES = {
    "tiny-mlp": ("tiny-mlp.pt", "torchscript", '[{name: x, datatype: FP32, shape: [-1, 16]}]',
                 '[{name: y, datatype: FP32, shape: [-1, 4]}]'),
    "small-cnn": ("small-cnn.pt2", "torch-export",
                  '[{name: image, datatype: FP32, shape: [-1, 3, 32, 32]}]',
                  '[{name: logits, datatype: FP32, shape: [-1, 10]}]'),
    "minilm": ("minilm.pt", "torchscript",
               '[{name: input_ids, datatype: INT64, shape: [-1, -1]}, '
               '{name: attention_mask, datatype: INT64, shape: [-1, -1]}]',
               '[{name: embedding, datatype: FP32, shape: [-1, 384]}]'),
}  # fmt: skip


def write_manifests(folder: Path, models: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for family, (file, fmt, inputs, outputs) in FAMILIES.items():
        for name, batch, delay in ((family, 1, 0), (f"{family}-batched", 8, 2)):
            if family == "minilm" and batch > 1:
                continue
            text = MANIFEST.format(name=name, models=models, file=file, format=fmt,
                                   inputs=inputs, outputs=outputs, batch=batch, delay=delay)  # fmt: skip
            (folder / f"{name}.yaml").write_text(text)


def body_arrays(name: str, *, rows: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    family = name.removesuffix("-batched")
    if family == "minilm":
        ids = np.full((rows, 128), 2000, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return example_inputs(family, batch=rows)


def body_for(name: str, *, rows: int = 1) -> tuple[bytes, dict[str, str]]:
    arrays = body_arrays(name, rows=rows)
    datatypes = {"int64": "INT64", "float32": "FP32"}
    tensors = {k: (a, datatypes[str(a.dtype)]) for k, a in arrays.items()}
    return encode_request(tensors, binary_outputs=True)


def grpc_request(name: str) -> bytes:
    body, headers = body_for(name)
    return grpc_request_from(name, body, headers)


def sync_grpc_latencies(port: int, data: bytes, *, args: argparse.Namespace) -> list[float]:
    """1 client on grpc's blocking stub, as ``tritonclient.grpc`` calls it (no asyncio in the
    client's path); run in a thread of its own, bounded like the rest."""
    latencies: list[float] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        deadline = time.monotonic() + 120
        for i in range(args.warmup + args.requests):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            call(data, timeout=30)
            if i >= args.warmup:
                latencies.append(time.perf_counter() - t0)
    return latencies


def tritonclient_p50s(
    http_port: int, grpc_port: int, name: str, pids: list[int], *, args: argparse.Namespace
) -> dict[str, float]:
    """The goal's own comparison: ``tritonclient.grpc`` vs ``tritonclient.http`` with binary
    tensors, 1 client, the same warm model and servers, in alternating blocks (so drift in the
    machine's load falls on both alike). Also each protocol's client CPU (this process) and
    serving CPU (gateway + manager) per request."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    arrays = body_arrays(name)
    output = {"tiny-mlp": "y", "small-cnn": "logits"}[name.removesuffix("-batched")]
    http = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
    grpc_client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    via_http = http_sender(http, model=name, output=output, arrays=arrays)
    via_grpc = grpc_sender(grpc_client, model=name, output=output, arrays=arrays)

    senders = {"http": via_http, "grpc": via_grpc}
    latencies: dict[str, list[float]] = {k: [] for k in senders}
    client_cpu = dict.fromkeys(senders, 0.0)
    serving_cpu = dict.fromkeys(senders, 0.0)
    held = {k: [0.0, 0.0] for k in senders}  # the gateway's own time: seconds, requests
    switches = dict.fromkeys(senders, 0)  # this process's context switches, all its threads
    for send in senders.values():
        for _ in range(args.warmup):
            send()
    blocks = 8
    deadline = time.monotonic() + 240
    for _ in range(blocks):
        for key, send in senders.items():
            at_gateway = gateway_seconds(http_port, name)  # outside the CPU window
            mine, theirs = time.process_time(), cpu_seconds(pids)
            before = context_switches()
            for _ in range(args.requests // blocks):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                send()
                latencies[key].append(time.perf_counter() - t0)
            client_cpu[key] += time.process_time() - mine
            switches[key] += context_switches() - before
            serving_cpu[key] += cpu_seconds(pids) - theirs
            after = gateway_seconds(http_port, name)
            held[key][0] += after[0] - at_gateway[0]
            held[key][1] += after[1] - at_gateway[1]
    http.close()
    grpc_client.close()
    out: dict[str, float] = {}
    for key, values in latencies.items():
        out[f"tc_{key}_p50_ms"] = pct(values, 50)
        out[f"tc_{key}_p99_ms"] = pct(values, 99)
        out[f"tc_{key}_client_cpu_us"] = client_cpu[key] / max(len(values), 1) * 1e6
        out[f"tc_{key}_client_switches"] = switches[key] / max(len(values), 1)
        out[f"tc_{key}_serving_cpu_us"] = serving_cpu[key] / max(len(values), 1) * 1e6
        seconds, count = held[key]
        out[f"tc_{key}_gateway_mean_ms"] = seconds / count * 1000 if count else float("nan")
    return out


def context_switches() -> int:
    """This process's voluntary and involuntary context switches so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def gateway_seconds(http_port: int, name: str) -> tuple[float, float]:
    """The gateway's own ``gpufaas_request_seconds`` sum and count for ``name`` (its time from
    reading a request's body to its answer, either front end), from ``/metrics``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {"_sum": 0.0, "_count": 0.0}
    label = f'{{model="{name}"}}'
    for line in text.splitlines():
        for suffix in found:
            if line.startswith(f"gpufaas_request_seconds{suffix}{label} "):
                found[suffix] = float(line.rsplit(" ", 1)[1])
    return found["_sum"], found["_count"]


async def closed_loop(
    send: Any, *, clients: int, count: int, max_s: float
) -> tuple[list[float], float]:
    latencies: list[float] = []
    deadline = time.monotonic() + max_s
    left = count

    async def client() -> None:
        nonlocal left
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            t0 = time.perf_counter()
            try:
                await send()
            except NodeUnreachable as e:  # counted, not timed; a few are tolerated
                FAILURES.append(str(e))
                if len(FAILURES) > 5:
                    raise
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


FAILURES: list[str] = []  # requests that got no answer, over the whole run


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


async def settled(pids: list[int], *, max_s: float = 120) -> float:
    """Wait until the servers are idle (under 5% of a core over a second): after start-up the
    manager prepares every function's sidecar in the background, which would otherwise be
    counted as serving CPU. Returns the seconds it took (bounded by ``max_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        before = cpu_seconds(pids)
        await asyncio.sleep(1.0)
        if cpu_seconds(pids) - before < 0.05:
            break
    return time.monotonic() - start


async def measure(
    url: str, grpc_port: int | None, pids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    pool = NodePool(url, size=16, timeout_s=10)
    out: dict[str, Any] = {"settled_after_s": await settled(pids), "processes": len(pids)}

    def http_sender(name: str) -> Any:
        body, headers = body_for(name)
        path = f"/v2/models/{name}/infer"

        async def send() -> Any:
            reply = await pool.post(path, body, headers)
            if reply.status != 200:
                raise RuntimeError(f"{name}: {reply.status} {reply.body[:200]!r}")
            return reply

        return send

    for name in ("tiny-mlp", "small-cnn"):
        try:
            out[name] = {}
            print(f"{url}: {name}", file=sys.stderr, flush=True)
            send = http_sender(name)
            await closed_loop(send, clients=1, count=args.warmup, max_s=60)
            before = cpu_seconds(pids), cpu_seconds(pids[:1])
            lat, _ = await closed_loop(send, clients=1, count=args.requests, max_s=120)
            cpu = cpu_seconds(pids) - before[0]
            gateway_cpu = cpu_seconds(pids[:1]) - before[1]
            out[name] = {"warm_p50_ms": pct(lat, 50), "warm_p99_ms": pct(lat, 99), "n": len(lat)}
            if name == "tiny-mlp" and args.only != "grpc":
                out[name]["cpu_us_per_request"] = cpu / len(lat) * 1e6
                out[name]["gateway_cpu_us_per_request"] = gateway_cpu / len(lat) * 1e6
                out[name]["node_cpu_us_per_request"] = (cpu - gateway_cpu) / len(lat) * 1e6
            if grpc_port is not None and args.only not in ("http", "serving"):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    data = grpc_request(name)

                    async def grpc_send(call: Any = call, data: bytes = data) -> Any:
                        return await call(data, timeout=30)

                    await closed_loop(grpc_send, clients=1, count=args.warmup, max_s=60)
                    lat, _ = await closed_loop(grpc_send, clients=1, count=args.requests, max_s=120)
                    out[name]["grpc_p50_ms"] = pct(lat, 50)
                lat = await asyncio.to_thread(
                    sync_grpc_latencies, grpc_port, grpc_request(name), args=args
                )
                out[name]["grpc_sync_p50_ms"] = pct(lat, 50)
                http_port = int(url.rsplit(":", 1)[1])
                out[name].update(
                    await asyncio.to_thread(
                        tritonclient_p50s, http_port, grpc_port, name, pids, args=args
                    )
                )
        except (NodeUnreachable, grpc.RpcError, InferenceServerException, RuntimeError) as e:
            # a system that stops answering or fails a call: say so, go on
            out[name] = {**out.get(name, {}), "error": str(e), "unanswered": list(FAILURES)}
        FAILURES.clear()
    if args.only in ("grpc", "http"):
        await pool.close()
        return out
    try:
        await later_phases(out, pool, http_sender, args)
    except NodeUnreachable as e:
        out["error"] = str(e)
    await pool.close()
    return out


async def later_phases(
    out: dict[str, Any], pool: NodePool, http_sender: Any, args: argparse.Namespace
) -> None:
    """8 clients with batching on, then MiniLM's overhead over its forward pass."""
    send = http_sender("tiny-mlp-batched")
    await closed_loop(send, clients=8, count=args.warmup, max_s=60)
    lat, wall = await closed_loop(send, clients=8, count=args.requests * 4, max_s=120)
    out.setdefault("tiny-mlp", {})
    out["tiny-mlp"]["rps_8_batched"] = len(lat) / wall
    out["tiny-mlp"]["p50_8_batched_ms"] = pct(lat, 50)
    # MiniLM: overhead over the node's own forward pass.
    body, headers = body_for("minilm")
    computes: list[float] = []

    async def minilm() -> None:
        reply = await pool.post("/v2/models/minilm/infer", body, headers)
        assert reply.status == 200, reply.body[:200]
        if "x-gpufaas-compute-ms" in reply.headers:  # a baseline may not pass it through
            computes.append(float(reply.headers["x-gpufaas-compute-ms"]))

    await closed_loop(minilm, clients=1, count=10, max_s=120)
    computes.clear()
    lat, _ = await closed_loop(minilm, clients=1, count=args.minilm_requests, max_s=180)
    forward = statistics.median(computes) if computes else None
    out["minilm"] = {
        "warm_p50_ms": pct(lat, 50),
        "forward_ms": forward,
        "overhead": None if forward is None else (pct(lat, 50) - forward) / forward,
    }


def run_system(
    python: str,
    label: str,
    functions: Path,
    models: Path,
    args: argparse.Namespace,
    *,
    pythonpath: str | None = None,
    extra: tuple[str, ...] = (),
    pin: str = "",
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpufaas-home-", ignore_cleanup_errors=True) as home:
        return _run_system(
            python, label, functions, models, args, home=home, pythonpath=pythonpath,
            extra=extra, pin=pin,
        )  # fmt: skip


def _run_system(
    python: str,
    label: str,
    functions: Path,
    models: Path,
    args: argparse.Namespace,
    *,
    home: str,
    pythonpath: str | None,
    extra: tuple[str, ...],
    pin: str,
) -> dict[str, Any]:
    port, grpc_port = free_port(), free_port()
    command = [python, "-m", "gpufaas.core.cli", "up", "--port", str(port),
               "--functions", str(functions), "--cpu-devices", "1", "--policy", args.policy,
               *extra]  # fmt: skip
    env = server_env(os.environ, models=models, home=home, pythonpath=pythonpath)
    has_grpc = (
        "--grpc-port"
        in subprocess.run(
            [python, "-m", "gpufaas.core.cli", "up", "--help"],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )
    if has_grpc:
        command += ["--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    client_cpus = os.sched_getaffinity(0)
    try:
        wait_ready([url], timeout_s=180, procs=[proc], what=label)
        pin_processes(tree(proc.pid), pin)
        if args.syscalls:
            return syscall_counts(port, tree(proc.pid), calls=args.syscalls)
        result = asyncio.run(measure(url, grpc_port if has_grpc else None, tree(proc.pid), args))
        result["python"] = python
        result["pythonpath"] = pythonpath
        result["pin"] = pin
        return result
    finally:
        if pin:  # the client back where it was
            pin_threads([os.getpid()], client_cpus)
        stop_processes([proc], timeout_s=30)


PINS = ("split", "split-client-gateway", "split-client-node", "together")


def server_env(base: Any, *, models: Path, home: str, pythonpath: str | None) -> dict[str, str]:
    """The servers' environment: ``base`` with the run's folders, and without
    ``GRPC_EXPERIMENTS``: ``--client-grpc-experiments`` is the client's setting alone, so a
    server never inherits it."""
    env = {k: v for k, v in base.items() if k != GRPC_EXPERIMENTS}
    env.update(GPUFAAS_MODELS=str(models), GPUFAAS_HOME=home)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def client_exec(environ: Any, experiments: str | None) -> dict[str, str] | None:
    """The environment to re-run this bench in so that its client process (this one) starts
    grpc with ``GRPC_EXPERIMENTS=experiments``, or None when it already runs with it (or none
    is asked for). grpc reads the variable once, when it starts, so the process is replaced
    rather than the variable set late."""
    if experiments is None or environ.get(GRPC_EXPERIMENTS) == experiments:
        return None
    return {**environ, GRPC_EXPERIMENTS: experiments}


def pin_threads(pids: list[int], cpus: Any) -> None:
    """Every thread of ``pids`` onto ``cpus`` (``sched_setaffinity`` sets one thread's)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), set(cpus))


def pin_processes(pids: list[int], pin: str) -> None:
    """``--pins``: the gateway (``pids[0]``) on CPU 0, its managers on CPU 1; the client (this
    process) left free (``split``) or on the gateway's or the node's CPU. ``together``: the
    gateway and its managers on CPU 0, the client on CPU 1."""
    if not pin:
        return
    if pin == "together":
        pin_threads(pids, [0])
        pin_threads([os.getpid()], [1])
        return
    pin_threads(pids[:1], [0])
    pin_threads(pids[1:], [1])
    if pin != "split":
        pin_threads([os.getpid()], [0 if pin == "split-client-gateway" else 1])


def syscall_counts(port: int, pids: list[int], *, calls: int) -> dict[str, Any]:
    """``--syscalls N``: system calls per warm tiny-mlp request of each server process (the
    gateway, then its manager), from ``strace -f -c`` attached once both are warm, over ``N``
    requests from a blocking keep-alive client in this process (not traced). It counts, it
    does not time (strace slows every call), so it needs no quiet lock; as
    ``bench/grpc_wire.py`` does for gRPC."""
    import http.client

    body, headers = body_for("tiny-mlp")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(count: int) -> None:
        for _ in range(count):
            connection.request("POST", "/v2/models/tiny-mlp/infer", body, headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"syscalls: answered {answer.status}")

    with tempfile.TemporaryDirectory(prefix="dataplane-strace-") as folder:
        return _traced(Path(folder), pids, send, connection, calls=calls)


def _traced(
    work: Path, pids: list[int], send: Any, connection: Any, *, calls: int
) -> dict[str, Any]:
    """Trace each of ``pids`` (into ``work``) over ``calls`` warm requests."""
    import signal

    from grpc_wire import syscalls_per_call

    send(300)
    tracers = [
        subprocess.Popen(
            ["strace", "-f", "-c", "-o", str(work / f"{pid}.txt"), "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    try:
        time.sleep(2.0)  # strace attaches to every thread
        send(calls)
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
    finally:
        for tracer in tracers:
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait(timeout=10)
        connection.close()
    return {
        "calls": calls,
        "syscalls_per_request": {
            str(pid): syscalls_per_call(work / f"{pid}.txt", calls) for pid in pids
        },
    }


def node_app_cpu(functions: Path, *, requests: int, inline: bool) -> float:
    """CPU per warm tiny-mlp request of the GPU manager's app alone, called as ASGI in this
    process (no HTTP server, no client): ``time.process_time`` over ``requests`` after 100."""
    from gpufaas.core.artifacts import ArtifactStore
    from gpufaas.core.manifests import load_manifests
    from gpufaas.gpu_manager.inventory import cpu_devices
    from gpufaas.gpu_manager.runtime import NodeRuntime

    (function,) = load_manifests([functions / "tiny-mlp.yaml"])
    with tempfile.TemporaryDirectory(prefix="gpufaas-node-app-") as store:
        return _node_app_cpu(
            NodeRuntime(
                devices=cpu_devices(1, device_memory=1 << 30),
                store=ArtifactStore(Path(store)),
                host_capacity_bytes=1 << 30,
            ),
            function.spec,
            requests=requests,
            inline=inline,
        )


def _node_app_cpu(runtime: Any, spec: Any, *, requests: int, inline: bool) -> float:
    """:func:`node_app_cpu` on ``runtime``, its artifact store a folder the caller removes."""
    from gpufaas.gpu_manager.server import create_app

    runtime.register("tiny-mlp", spec)
    for device in runtime.devices.values():
        if not inline and hasattr(device, "inline"):  # a baseline has no inline passes
            device.inline.max_ms = 0
    app = create_app(runtime)
    body, headers = body_for("tiny-mlp")
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"content-length", b"%d" % len(body)), (b"x-gpufaas-device", b"cpu:0")]
    path = "/v2/models/tiny-mlp/infer"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": raw, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2), "state": {}}  # fmt: skip

    async def one() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)
        if statuses != [200]:
            raise RuntimeError(f"node app answered {statuses}")

    async def run() -> float:
        for _ in range(100):
            await one()
        started = time.process_time()
        for _ in range(requests):
            await one()
        spent = time.process_time() - started
        await runtime.settle()
        return spent / requests * 1e6

    return asyncio.run(run())


def colocated_loop_cpu(
    functions: Path, *, requests: int, lane: Literal["inprocess", "framed"] = "inprocess"
) -> dict[str, Any]:
    """``--colocated-loop``: a gateway and a co-located GPU manager on this process's loop, as
    ``gpufaas up --node-transport inprocess`` wires them; CPU per warm tiny-mlp request
    (``time.process_time``, ``requests`` after 300, batching off) of the gateway's request path
    without its HTTP front (``answer_infer``: inspection, policy, dispatcher, the in-process
    call, learning, metrics), and of the node's answer function alone (the in-process call).

    ``lane="framed"`` (``--loop-lane framed``): the gateway calls the same node over its framed
    Unix socket instead, both ends still on this one loop: the gateway path then holds both
    ends of the framed lane and their system calls, with no second process (no context switch
    and no wake-up of another process), which is what two processes add on top."""
    with tempfile.TemporaryDirectory(prefix="gpufaas-colocated-") as folder:
        return _colocated_loop_cpu(functions, Path(folder), requests=requests, lane=lane)


def _colocated_loop_cpu(
    functions: Path, work: Path, *, requests: int, lane: Literal["inprocess", "framed"]
) -> dict[str, Any]:
    """:func:`colocated_loop_cpu` with the node's artifacts and socket in ``work``."""
    from gpufaas.core.colocated import ColocatedOptions, colocated_node
    from gpufaas.core.commands import ManagerOptions
    from gpufaas.core.frames import InferHead
    from gpufaas.core.manifests import load_manifests
    from gpufaas.scheduler.gateway import GatewayConfig, answer_infer
    from gpufaas.scheduler.main import build_gateway

    node = colocated_node(
        ColocatedOptions(
            name="node-0",
            host="127.0.0.1",
            port=free_port(),
            options=ManagerOptions(
                cpu_devices=1, device_memory="1Gi", host_memory="1Gi", artifact_dir=work
            ),
            framed_socket=work / "node-0.sock",
        )
    )
    gateway = build_gateway(
        manager_urls={node.name: node.url},
        functions=load_manifests([functions / "tiny-mlp.yaml"]),
        config=GatewayConfig(transport=lane),
    )
    if lane == "inprocess":
        gateway.lanes.attach(node.name, node.answer)
    body, headers = body_for("tiny-mlp")
    lower = {k.lower(): v for k, v in headers.items()}
    head = InferHead("tiny-mlp", "cpu:0", int(headers["Inference-Header-Content-Length"]), "")

    async def read() -> bytes:
        return body

    async def through_gateway() -> None:
        status, _, content = await answer_infer(gateway, "tiny-mlp", read, lower)
        if status != 200:
            raise RuntimeError(f"colocated: {status} {content[:200]!r}")

    async def node_alone() -> None:
        status, _, content = await node.answer(head, body)
        if status != 200:
            raise RuntimeError(f"colocated node: {status} {bytes(content)[:200]!r}")

    async def run() -> dict[str, Any]:
        await node.start()
        await gateway.start()
        out: dict[str, Any] = {"lane": lane}
        try:
            for label, one in (("gateway_path", through_gateway), ("node_answer", node_alone)):
                for _ in range(300):
                    await one()
                started = time.process_time()
                for _ in range(requests):
                    await one()
                out[f"{label}_cpu_us"] = (time.process_time() - started) / requests * 1e6
        finally:
            await gateway.stop()
            await node.stop()
        return out

    return asyncio.run(run())


FRONTS = ("uvicorn", "protocol")


def serve_front(kind: str, fd: int, functions: Path) -> None:
    """``--serve-front``: a gateway whose node hop is a canned answer, behind the front
    ``kind``, on the listening socket ``fd``, until SIGINT or SIGTERM."""
    from gpufaas.core.manifests import load_manifests
    from gpufaas.scheduler.main import build_gateway

    gateway = build_gateway(
        manager_urls={}, functions=load_manifests([functions / "tiny-mlp.yaml"])
    )
    answer = NodeReply(200, {"content-type": "application/json"}, b'{"outputs": []}')

    async def forward(name: str, call: Any, *, deadline: float | None = None) -> NodeReply:
        return answer

    gateway.forward = forward  # type: ignore[method-assign]
    if kind == "uvicorn":  # as scheduler/main.py served it before scheduler/front.py
        import uvicorn

        from gpufaas.scheduler.gateway import create_app

        # Not uvicorn's own fd=: it takes the socket for a Unix one (no TCP_NODELAY, 40 ms p50)
        config = uvicorn.Config(create_app(gateway), log_level="warning", access_log=False,
                                http="httptools", loop="uvloop", proxy_headers=False)  # fmt: skip
        uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])
        return
    from gpufaas.scheduler.main import serve_on

    serve_on(gateway=gateway, host="127.0.0.1", sockets=[socket.socket(fileno=fd)])


def front_cpu(kinds: list[str], functions: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--front``: server CPU per request and p50 of each front kind, alternated ``rounds``
    times."""
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    body, headers = body_for("tiny-mlp")
    for _ in range(args.rounds):
        for kind in kinds:
            # The socket listens before the server starts: the client's first calls wait in its
            # backlog, no readiness polling.
            with socket.create_server(("127.0.0.1", 0)) as listener:
                port = listener.getsockname()[1]
                command = [sys.executable, __file__, "--serve-front", kind,
                           "--fd", str(listener.fileno()), "--functions-dir", str(functions)]  # fmt: skip
                proc = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, pass_fds=[listener.fileno()]
                )
            try:
                results[kind].append(asyncio.run(_front_phase(port, proc.pid, body, headers, args)))
            finally:
                stop_processes([proc], timeout_s=30)
    return results


async def _front_phase(
    port: int, pid: int, body: bytes, headers: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    pool = NodePool(f"http://127.0.0.1:{port}", size=1, timeout_s=60)  # the first waits start-up

    async def send() -> Any:
        reply = await pool.post("/v2/models/tiny-mlp/infer", body, headers)
        if reply.status != 200:
            raise RuntimeError(f"front: {reply.status} {reply.body[:200]!r}")
        return reply

    async def index() -> Any:  # a route the ASGI app answers (through the bridge, or uvicorn)
        reply = await pool.post("/v2/repository/index", b"")
        if reply.status != 200:
            raise RuntimeError(f"front: {reply.status} {reply.body[:200]!r}")
        return reply

    out: dict[str, float] = {}
    for label, call in (("infer", send), ("index", index)):
        await closed_loop(call, clients=1, count=args.warmup, max_s=60)
        await settled([pid])
        before = cpu_seconds([pid])
        lat, _ = await closed_loop(call, clients=1, count=args.requests, max_s=120)
        cpu = cpu_seconds([pid]) - before
        out[f"{label}_server_cpu_us"] = cpu / len(lat) * 1e6
        out[f"{label}_p50_ms"] = pct(lat, 50)
        out[f"{label}_n"] = len(lat)
    await pool.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="python of a baseline checkout's venv")
    parser.add_argument(
        "--baseline-path", default=None, help="PYTHONPATH for the baseline (a gpufaas/ tree)"
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--minilm-requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--policy", default="lalb-o3")
    parser.add_argument(
        "--only",
        choices=("grpc", "http", "serving"),
        default=None,
        help="grpc: only the 1-client rows (binary HTTP, gRPC, tritonclient.http vs .grpc); "
        "http: only the 1-client binary HTTP rows and the serving CPU; serving: those, then "
        "8 clients with batching and MiniLM's overhead (no gRPC)",
    )
    parser.add_argument(
        "--baseline-transports",
        default="",
        help="the baseline's gateway->node hops, comma-separated, each a system of its own "
        "(baseline-framed, baseline-inprocess, ...); empty: one run with its default",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternate the systems this often")
    parser.add_argument(
        "--round-offset",
        type=int,
        default=0,
        help="number the rounds from this (an odd one runs the systems in reverse order): to "
        "split one alternating run into invocations that each print their figures",
    )
    parser.add_argument(
        "--node-transports",
        default="framed,http",
        help="this checkout's gateway->node hops to run, comma-separated (framed, http, "
        "inprocess: the node in the gateway's process)",
    )
    parser.add_argument(
        "--node-app",
        choices=("inline", "thread"),
        default=None,
        help="only the GPU manager's app in this process, CPU per warm tiny-mlp request "
        "(thread: no forward pass inline); run it with a baseline's PYTHONPATH to compare",
    )
    parser.add_argument(
        "--colocated-loop",
        action="store_true",
        help="only a gateway and a co-located GPU manager in this process, called in a tight "
        "loop: CPU per warm tiny-mlp request of the gateway's path (no HTTP front) and of the "
        "node's answer alone",
    )
    parser.add_argument(
        "--loop-lane",
        choices=("inprocess", "framed"),
        default="inprocess",
        help="with --colocated-loop: the gateway calls the node in-process (as `up "
        "--node-transport inprocess`) or over its framed Unix socket, on the same loop",
    )
    parser.add_argument(
        "--front",
        default=None,
        help="only the gateway's HTTP front, node hop stubbed: kinds, comma-separated "
        f"({', '.join(FRONTS)})",
    )
    parser.add_argument(
        "--syscalls",
        type=int,
        default=0,
        help="count each server process's system calls per warm request over this many "
        "(strace -c; counts, not timings)",
    )
    parser.add_argument(
        "--pins",
        default="",
        help="exploratory: also run each of this checkout's transports with its processes "
        f"pinned, each mode a system of its own ({', '.join(PINS)}; comma-separated)",
    )
    parser.add_argument(
        "--client-grpc-experiments",
        default=None,
        help="run this bench's client process (tritonclient.grpc, grpc.aio) with "
        "GRPC_EXPERIMENTS set to this (e.g. -event_engine_client); the servers never get it; "
        "recorded in the JSON as client_grpc_experiments",
    )
    parser.add_argument("--serve-front", choices=FRONTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--functions-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    env = client_exec(os.environ, args.client_grpc_experiments)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.serve_front:
        serve_front(args.serve_front, args.fd, Path(args.functions_dir))
        return 0
    # Every run removes what it made (the example models alone are ~90 MB).
    with tempfile.TemporaryDirectory(prefix="gpufaas-dataplane-") as folder:
        return run(args, Path(folder))


def run(args: argparse.Namespace, work: Path) -> int:
    """The figures ``args`` asks for, with the models and manifests under ``work``."""
    models = Path(os.environ.get("GPUFAAS_MODELS", work / "models"))
    build_examples(models, progress=False)
    write_manifests(work / "functions", models)
    if args.front:
        kinds = [k for k in args.front.split(",") if k]
        print(json.dumps(front_cpu(kinds, work / "functions", args), indent=1))
        return 0
    if args.colocated_loop:
        import torch
        import uvloop

        torch.set_num_threads(1)  # as the GPU manager does
        uvloop.install()  # as gpufaas up serves
        loop = colocated_loop_cpu(work / "functions", requests=args.requests, lane=args.loop_lane)
        print(json.dumps(loop))
        return 0
    if args.node_app:
        import torch

        torch.set_num_threads(1)  # as the GPU manager does
        cpu = node_app_cpu(
            work / "functions", requests=args.requests, inline=args.node_app == "inline"
        )
        print(json.dumps({"node_app_cpu_us_per_request": cpu, "mode": args.node_app}))
        return 0
    # label -> (python, extra `gpufaas up` arguments)
    systems: dict[str, tuple[str, tuple[str, ...], str]] = {}
    if args.baseline and args.baseline_transports:
        for transport in args.baseline_transports.split(","):
            systems[f"baseline-{transport}"] = (args.baseline, ("--node-transport", transport), "")
    elif args.baseline:
        systems["baseline"] = (args.baseline, (), "")
    for transport in args.node_transports.split(","):
        systems[transport] = (sys.executable, ("--node-transport", transport), "")
        for pin in (p for p in args.pins.split(",") if p and transport != "inprocess"):
            systems[f"{transport}-{pin}"] = (sys.executable, ("--node-transport", transport), pin)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in systems}
    for round_ in range(args.rounds):
        order = list(systems.items())
        # alternate the order too: what runs first in a round may run warmer
        if (round_ + args.round_offset) % 2:
            order.reverse()
        for label, (python, extra, pin) in order:
            path = args.baseline_path if label.startswith("baseline") else None
            results[label].append(
                run_system(
                    python,
                    label,
                    work / "functions",
                    models,
                    args,
                    pythonpath=path,
                    extra=extra,
                    pin=pin,
                )
            )
    client = {
        "client_grpc_experiments": os.environ.get(GRPC_EXPERIMENTS),
        "grpcio": grpc.__version__,
    }
    print(json.dumps({**results, "unanswered": FAILURES, **client}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
