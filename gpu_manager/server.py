"""The GPU manager's HTTP API: the data plane for one node.

The gateway pushes function specs here, then sends binary-encoded inference
requests naming the device to run on (``X-Gpufaas-Device``). A miss loads the
model on that device. ``/v2/gpufaas/state`` reports devices and every tier
with byte-exact sizes as a :class:`gpufaas.core.node.NodeState`; the route
paths come from :mod:`gpufaas.core.node` too, which the gateway's cluster
client shares. ``/metrics`` exports the same as gauges.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufaas.core import node
from gpufaas.core.api import InferenceFunctionSpec, ManifestError, parse_spec
from gpufaas.core.colocated import InferNode
from gpufaas.core.counting import LoopCounter
from gpufaas.core.framelisten import error_answer
from gpufaas.core.frames import InferHead
from gpufaas.core.http import (
    BATCH_SIZE_HEADER,
    CACHE_HEADER,
    COMPUTE_MS_HEADER,
    DEVICE_HEADER,
    EVICT_FIRST_HEADER,
    LOAD_MS_HEADER,
    LOAD_SOURCE_HEADER,
    MODEL_BYTES_HEADER,
    REQUEST_KEY_HEADER,
    add_metrics_route,
    error_response,
    install_error_handlers,
    match_fast_post,
    parse_evict_first,
    read_body,
    token_auth,
)
from gpufaas.core.protocol import (
    HEADER_LENGTH,
    Limits,
    ProtocolError,
    decode_request,
    encode_answer,
    parse_header_length,
    validate_inputs,
)
from gpufaas.gpu_manager.admission import (
    AdmissionCollector,
    AdmissionFull,
    DeviceAdmission,
    RequestOnce,
)
from gpufaas.gpu_manager.backends import NoBackend, backend_for
from gpufaas.gpu_manager.devices import device_free_bytes
from gpufaas.gpu_manager.framed import Answer, FramedAnswer, FramedServer
from gpufaas.gpu_manager.load_orders import LoadOrderFastPath, add_load_order_routes
from gpufaas.gpu_manager.prefetch import add_prefetch_routes
from gpufaas.gpu_manager.runtime import InferOutcome, NodeRuntime, RuntimeFailure
from gpufaas.gpu_manager.shards import ShardFastPath, shard_host, shard_router
from gpufaas.gpu_manager.text import model_spec, text_inputs, tokenize

logger = logging.getLogger(__name__)


class _StateCollector(Collector):
    """Device, link and tier gauges read from the runtime at scrape time."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        def gauge(name: str, help: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help, labels=labels)

        info = gauge(
            "gpufaas_device_info",
            "One per device: its identity (NVML UUID, name, MIG instance or not)",
            ["device", "kind", "name", "uuid", "mig"],
        )
        capacity = gauge(
            "gpufaas_device_capacity_bytes",
            "Model-cache capacity per device",
            ["device", "kind", "name"],
        )
        total = gauge("gpufaas_device_total_bytes", "Device memory", ["device"])
        free = gauge(
            "gpufaas_device_free_bytes",
            "Free device memory (NVML/CUDA, all processes); CPU stand-ins: free cache bytes",
            ["device"],
        )
        used = gauge("gpufaas_device_used_bytes", "Bytes of resident models", ["device"])
        residents = gauge("gpufaas_device_resident_models", "Resident models", ["device"])
        pcie_generation = gauge(
            "gpufaas_device_pcie_generation", "PCIe link generation (current)", ["device"]
        )
        pcie_width = gauge("gpufaas_device_pcie_width", "PCIe link width (current)", ["device"])
        pcie_limit = gauge(
            "gpufaas_device_pcie_gbps",
            "PCIe per-direction limit at the best link, GB/s",
            ["device"],
        )
        peer = gauge(
            "gpufaas_device_peer",
            "1 for each device pair with direct copies (link: nvlink, p2p, or host memory)",
            ["device", "peer", "link"],
        )
        host = gauge("gpufaas_host_tier_bytes", "Host tier bytes", ["kind"])
        host_residents = gauge("gpufaas_host_tier_models", "Models in the host tier", [])
        disk = gauge("gpufaas_disk_tier_bytes", "Disk tier (sidecar) bytes", ["kind"])
        host_held = CounterMetricFamily(
            "gpufaas_host_tier_gb_seconds",
            "Host-tier memory-time: bytes held x seconds, in GB-s (#13)",
            value=self.runtime.host.gb_seconds(),
        )
        device_held = CounterMetricFamily(
            "gpufaas_device_tier_gb_seconds",
            "Device memory-time: bytes of models held (loading included) x seconds, in GB-s (#13)",
            labels=["device"],
        )
        load_bytes = CounterMetricFamily(
            "gpufaas_manager_load_bytes", "Bytes copied onto devices, per path", labels=["path"]
        )
        load_seconds = CounterMetricFamily(
            "gpufaas_manager_load_copy_seconds", "Seconds spent copying, per path", labels=["path"]
        )
        for d in self.runtime.devices.values():
            i = d.info
            info.add_metric([i.id, i.kind, i.name, i.uuid, str(i.mig).lower()], 1)
            capacity.add_metric([i.id, i.kind, i.name], i.capacity_bytes)
            total.add_metric([i.id], i.total_bytes)
            live_free = device_free_bytes(i)
            free.add_metric([i.id], live_free if live_free is not None else d.tier.lru.free_bytes)
            used.add_metric([i.id], d.tier.lru.used_bytes)
            residents.add_metric([i.id], len(d.tier))
            device_held.add_metric([i.id], d.gb_seconds())
            if "generation" in i.pcie:
                pcie_generation.add_metric([i.id], i.pcie["generation"])
            if "width" in i.pcie:
                pcie_width.add_metric([i.id], i.pcie["width"])
            if i.pcie_gbps is not None:
                pcie_limit.add_metric([i.id], i.pcie_gbps)
            for other in i.peers:
                link = (
                    "nvlink" if other in i.nvlink_peers else "p2p" if i.kind == "cuda" else "memory"
                )
                peer.add_metric([i.id, other, link], 1)
        host_lru = self.runtime.host.tier.lru
        host.add_metric(["capacity"], host_lru.capacity_bytes)
        host.add_metric(["used"], host_lru.used_bytes)
        host.add_metric(["pooled"], self.runtime.memory.pool.pooled_bytes)
        host_residents.add_metric([], len(self.runtime.host.tier))
        disk.add_metric(["capacity"], self.runtime.disk.lru.capacity_bytes)
        disk.add_metric(["used"], self.runtime.disk.lru.used_bytes)
        for path, totals in self.runtime.loads.totals.items():
            load_bytes.add_metric([path], totals.nbytes)
            load_seconds.add_metric([path], totals.seconds)
        yield from (info, capacity, total, free, used, residents, pcie_generation, pcie_width)
        yield from (pcie_limit, peer, host, host_residents, disk, load_bytes, load_seconds)
        yield from (host_held, device_held)


def failure_response(failure: RuntimeFailure) -> Response:
    headers = {}
    if failure.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(failure.retry_after_s)))
    return error_response(failure.status, str(failure), reason=failure.reason, headers=headers)


# -- executions per request id (issue #12: exactly-once made observable) -------------------------
EXECUTIONS_PATH = node.EXECUTIONS


class ExecutionCounts:
    """How many times this node ran a forward pass for each request id (the OIP ``id``).

    A request's execution is counted when its forward pass has finished here, before its
    answer is sent. Bounded: the oldest ids are dropped past ``max_ids`` (``dropped`` counts
    them), so a long-lived node's memory stays flat. Requests without an id are not counted.
    """

    def __init__(self, *, max_ids: int = 100_000) -> None:
        self.max_ids = max_ids
        self.counts: OrderedDict[str, int] = OrderedDict()
        self.dropped = 0

    def ran(self, request_id: str | None) -> None:
        if not request_id:
            return
        self.counts[request_id] = self.counts.get(request_id, 0) + 1
        self.counts.move_to_end(request_id)
        while len(self.counts) > self.max_ids:
            self.counts.popitem(last=False)
            self.dropped += 1

    def report(self) -> dict[str, object]:
        return {"executions": dict(self.counts), "dropped_ids": self.dropped}


# -- end of the execution counts ------------------------------------------------------------------


@dataclass(frozen=True)
class _InferMetrics:
    requests: LoopCounter  # counted per request: plain numbers (core/counting.py)
    load_seconds: Histogram
    # Scale-out (#16): the cluster-wide per-device bound, whichever gateway replica sends.
    admission: DeviceAdmission
    executions: ExecutionCounts  # forward passes per request id (EXECUTIONS_PATH)
    once: RequestOnce  # scale-out (#16): a forwarded request's key runs once
    children: dict[tuple[str, str, bool], Any] = field(default_factory=dict)

    def count(self, model: str, device: str, hit: bool) -> None:
        """One answered request in ``requests`` (its labelled child looked up once)."""
        key = (model, device, hit)
        child = self.children.get(key)
        if child is None:
            child = self.requests.labels(model, device, "hit" if hit else "miss")
            self.children[key] = child
        child.inc()


@dataclass(frozen=True)
class NodeApp:
    """The manager's ASGI app, and its inference answer for a caller in this process (a gateway
    on the same event loop, :mod:`gpufaas.core.colocated`): the framed lane's answer function,
    errors included, without the frame."""

    app: ASGIApp
    answer: InferNode


def create_app(
    runtime: NodeRuntime,
    *,
    limits: Limits | None = None,
    token: str | None = None,
    admission: DeviceAdmission | None = None,
    framed: FramedListen | None = None,
) -> ASGIApp:
    """The manager's app (:func:`create_node`'s, without its in-process answer)."""
    return create_node(runtime, limits=limits, token=token, admission=admission, framed=framed).app


def create_node(
    runtime: NodeRuntime,
    *,
    limits: Limits | None = None,
    token: str | None = None,
    admission: DeviceAdmission | None = None,
    framed: FramedListen | None = None,
) -> NodeApp:
    """The manager's app: :class:`InferFastPath` for inference, FastAPI for the rest; with
    ``token``, every path but health and metrics needs it as ``Authorization: Bearer <token>``
    (the gateway sends ``GPUFAAS_MANAGER_TOKEN``). ``admission`` bounds the inference requests
    running per device, whichever gateway replica sent them (``gpu_manager/admission.py``); by
    default 4, the gateway's default. ``framed``: also serve inference as frames
    (``gpu_manager/framed.py``) on a Unix socket and/or TCP port, for the app's lifetime; the
    endpoints are advertised in the node's state."""
    admission = admission or DeviceAdmission(concurrency=4)
    limits = limits or Limits()
    framed_server: FramedServer | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if framed_server is not None and framed is not None:
            await framed_server.start(
                unix_path=framed.unix_path, host=framed.host, port=framed.port
            )
        try:
            yield
        finally:
            if framed_server is not None:
                await framed_server.close()
            await shards.close()  # its shard sets, channels and same-host link socket

    app = FastAPI(title="gpufaas GPU manager", version="v1alpha1", lifespan=lifespan)
    install_error_handlers(app)
    registry = CollectorRegistry()
    registry.register(_StateCollector(runtime))
    registry.register(AdmissionCollector(admission))
    metrics = _InferMetrics(
        requests=LoopCounter(
            "gpufaas_manager_requests",
            "Inference requests",
            ["model", "device", "cache"],
            registry=registry,
        ),
        load_seconds=Histogram(
            "gpufaas_manager_load_seconds",
            "Per missed request, the whole time of the load it used, from the load's start to "
            "its copy's end (a load that several requests joined is counted once per request; "
            "the copies themselves: gpufaas_manager_load_copy_seconds_total, per path)",
            ["device"],
            registry=registry,
        ),
        admission=admission,
        executions=ExecutionCounts(),
        once=RequestOnce(),
    )
    add_metrics_route(app, registry)
    app.state.runtime = runtime
    app.state.prefetcher = add_prefetch_routes(app, runtime, registry=registry)  # #13
    orders = add_load_order_routes(app, runtime, admission=admission, registry=registry)  # #16
    # Shards of models split across nodes (FSD-Inference): routes and budget in shards.py.
    shards = shard_host(runtime, token=token, registry=registry)
    app.include_router(shard_router(shards))

    async def call_answer(call: InferHead, body: bytes | memoryview) -> Answer:
        async def read() -> bytes | memoryview:
            return body

        if call.request_key:  # scale-out (#16): a forwarded request's key runs once
            return await metrics.once.run(
                call.request_key, lambda: answer_call(runtime, call, read, limits, metrics)
            )
        return await answer_call(runtime, call, read, limits, metrics)

    if framed is not None:
        framed_server = FramedServer(call_answer, token=token, max_body_bytes=limits.max_body_bytes)
    app.state.framed = framed_server
    _add_routes(app, runtime, limits=limits, metrics=metrics, framed=framed_server)
    served: ASGIApp = InferFastPath(app, runtime=runtime, limits=limits, metrics=metrics)
    served = ShardFastPath(served, shards)  # direct-channel messages and shard requests
    served = LoadOrderFastPath(served, orders)  # #16: a placement owner's load orders
    if token:
        served = token_auth(
            served,
            token=token,
            protect=lambda path: path not in (node.HEALTH_LIVE, node.HEALTH_READY, "/metrics"),
            realm="the GPU manager",
        )
    return NodeApp(served, in_process_answer(call_answer, max_body_bytes=limits.max_body_bytes))


def in_process_answer(answer: FramedAnswer, *, max_body_bytes: int) -> InferNode:
    """``answer`` for a caller in this process, guarded as the framed listener guards it: a body
    over the node's limit is refused with the 413 a frame claiming it gets, and an error the
    answer raises is a 500 naming its kind (never a traceback to the caller)."""

    async def guarded(call: InferHead, body: bytes | memoryview) -> Answer:
        if len(body) > max_body_bytes:
            return error_answer(
                413,
                f"the call's body has {len(body)} bytes, more than the limit of {max_body_bytes}",
                "InvalidFrame",
            )
        try:
            return await answer(call, body)
        except Exception as e:
            logger.exception("unhandled error on an in-process call")
            return error_answer(500, f"internal error ({type(e).__name__})", "InternalError")

    return guarded


@dataclass(frozen=True)
class FramedListen:
    """Where to serve framed inference: a Unix socket path and/or ``host``:``port`` (0: any
    free port)."""

    unix_path: Path | None = None
    host: str | None = None
    port: int | None = None


def _add_routes(
    app: FastAPI,
    runtime: NodeRuntime,
    *,
    limits: Limits,
    metrics: _InferMetrics,
    framed: FramedServer | None,
) -> None:
    @app.get(EXECUTIONS_PATH)
    async def execution_counts() -> JSONResponse:
        return JSONResponse(metrics.executions.report())

    @app.get(node.REQUEST_ANSWER)
    async def request_answer(key: str, wait_s: float = 30.0) -> Response:
        # Scale-out (#16): a gateway whose forward failed asks whether this node ran it.
        answer = await metrics.once.lookup(key, wait_s=min(max(wait_s, 0.0), 120.0))
        if answer is None:
            return error_response(404, f"no answer for request key {key!r} here", reason="NotFound")
        return answer_response(answer)

    @app.get(node.HEALTH_LIVE)
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(node.HEALTH_READY, response_model=None)
    async def ready() -> dict[str, bool] | Response:
        if not runtime.health.ready:  # a fatal device error: the process is exiting
            return error_response(503, str(runtime.health.failure), reason="DeviceFailed")
        return {"ready": True}

    @app.get(node.STATE)
    async def state() -> Response:
        state = runtime.state()
        if framed is not None:
            state = state.model_copy(update={"framed": framed.endpoint})
        return Response(state.model_dump_json(), media_type="application/json")

    @app.put(node.FUNCTION)
    async def put_function(name: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as e:
            return error_response(400, f"the body is not JSON: {e}", reason="InvalidSpec")
        if not isinstance(body, dict):
            return error_response(
                400, "the body must be a JSON object (a spec)", reason="InvalidSpec"
            )
        try:
            spec = parse_spec(body)
        except ManifestError as e:
            return error_response(400, str(e), reason="InvalidSpec")
        try:  # a format this node cannot serve as a model is refused here, not at inference
            backend_for(spec.model.format)
        except NoBackend as e:
            return error_response(400, str(e), reason="InvalidSpec")
        runtime.register(name, model_spec(spec))  # a text function's model takes token ids
        return Response(status_code=204)

    @app.delete(node.FUNCTION)
    async def delete_function(name: str) -> Response:
        runtime.unregister(name)
        return Response(status_code=204)

    # Served by InferFastPath ahead of FastAPI; declared here for the OpenAPI document, and
    # served the same way if the app runs without it.
    @app.post(node.MODEL_INFER)
    async def infer(name: str, request: Request) -> Response:
        def read() -> Awaitable[bytes]:
            return read_body(request, max_bytes=limits.max_body_bytes)

        answer = await answer_infer(runtime, name, read, request.headers, limits, metrics)
        return answer_response(answer)

    @app.post(node.MODEL_LOAD)
    async def load(name: str, request: Request) -> Response:
        try:
            device_id = await runtime.load(name, device_id=request.headers.get(DEVICE_HEADER))
        except RuntimeFailure as e:
            return failure_response(e)
        return JSONResponse({"model": name, "device": device_id})

    @app.post(node.MODEL_UNLOAD)
    async def unload(name: str, request: Request) -> Response:
        try:
            devices = runtime.unload(name, device_id=request.headers.get(DEVICE_HEADER))
        except RuntimeFailure as e:
            return failure_response(e)
        return JSONResponse({"model": name, "unloaded_from": devices})


_INFER_PATH = re.compile("^" + node.MODEL_INFER.replace("{name}", "(?P<name>[^/]+)") + "$")


class InferFastPath:
    """The node's hot path as a bare ASGI app in front of FastAPI: ``POST .../infer`` is
    answered here, without FastAPI's middleware, routing, dependency solving or a Request
    object (``docs/dataplane.md``). Everything else (lifespan included) goes on to FastAPI."""

    def __init__(
        self, app: ASGIApp, *, runtime: NodeRuntime, limits: Limits, metrics: _InferMetrics
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = match_fast_post(
            scope, receive, path=_INFER_PATH, max_bytes=self.limits.max_body_bytes
        )
        if post is None:
            await self.app(scope, receive, send)
            return
        match, headers, read = post.match, post.headers, post.read

        try:
            answer = await self.metrics.once.run(  # scale-out (#16): a key runs once
                headers.get(REQUEST_KEY_HEADER),
                lambda: answer_infer(
                    self.runtime, match["name"], read, headers, self.limits, self.metrics
                ),
            )
        except Exception as e:  # as FastAPI's handlers do: a message, never a traceback
            logger.exception("unhandled error on POST %s", scope["path"])
            answer = _error(
                500, f"internal error ({type(e).__name__}); see the server log", "InternalError"
            )
        await send_answer(answer, send)


async def answer_infer(
    runtime: NodeRuntime,
    name: str,
    read: Callable[[], Awaitable[bytes | memoryview]],
    headers: Mapping[str, str],
    limits: Limits,
    metrics: _InferMetrics,
) -> Answer:
    """One HTTP inference request (``headers`` looked up by lower-case name): its call's fields
    from the headers, then :func:`answer_call`."""
    try:
        header_length = parse_header_length(headers.get(HEADER_LENGTH.lower()))
    except ProtocolError as e:
        return _error(e.status_code, str(e), "InvalidRequest")
    call = InferHead(
        model=name,
        device=headers.get(DEVICE_HEADER.lower()),
        header_length=header_length,
        evict_first=headers.get(EVICT_FIRST_HEADER.lower(), ""),
    )
    return await answer_call(runtime, call, read, limits, metrics)


async def answer_call(
    runtime: NodeRuntime,
    call: InferHead,
    read: Callable[[], Awaitable[bytes | memoryview]],
    limits: Limits,
    metrics: _InferMetrics,
) -> Answer:
    """One inference call, HTTP or framed: decode once, run, encode; errors as
    ``{"error": ...}`` with the status of their kind. Returns status, raw headers and body."""
    name, device_header = call.model, call.device
    try:
        spec: InferenceFunctionSpec = runtime.spec(name)
        body = await read()
        # The one decode: straight from the body's bytes into arrays (pinned ones for CUDA).
        decoded = decode_request(
            body,
            header_length=call.header_length,
            limits=limits,
            allocate=runtime.staging(device_header),
        )
        evict_first = parse_evict_first(call.evict_first)
        if spec.tokenizer is None:
            inputs = list(validate_inputs(decoded, spec.inputs).values())
        else:  # text in: sentences -> token ids and mask
            text = validate_inputs(decoded, text_inputs(spec.tokenizer))
            inputs = tokenize(text[spec.tokenizer.input], spec.tokenizer)
        outcome = None
        slot = metrics.admission.take_now(device_header or "auto")
        if slot is not None:  # the warm step: no wait, no coroutine below this one
            try:
                warm = runtime.infer_warm(name, spec, inputs, device_id=device_header)
                # its pass ran out of memory: the rest of it, counted once, under this slot
                outcome = warm if warm is None or isinstance(warm, InferOutcome) else await warm
            finally:
                metrics.admission.release(slot)
        if outcome is None:
            async with metrics.admission.slot(device_header or "auto"):
                outcome = await runtime.infer(
                    name, inputs, device_id=device_header, evict_first=evict_first
                )
    except RuntimeFailure as e:
        return _answer_of(failure_response(e))
    except AdmissionFull as e:
        return _error(429, str(e), "Overloaded", [(b"retry-after", b"1")])
    except ProtocolError as e:
        return _error(e.status_code, str(e), "InvalidRequest")
    metrics.executions.ran(decoded.id)
    device_id = device_header or "auto"
    metrics.count(name, device_id, outcome.cache_hit)
    if not outcome.cache_hit:
        metrics.load_seconds.labels(device_id).observe(outcome.load_ms / 1000)
    outputs = outcome.outputs
    if decoded.requested_outputs is not None:
        unknown = [o for o in decoded.requested_outputs if o not in outputs]
        if unknown:
            return _error(
                400, f"unknown output(s) {unknown}; the model has {list(outputs)}", "InvalidRequest"
            )
        outputs = {o: outputs[o] for o in decoded.requested_outputs}
    payload, answer_headers = encode_answer(
        model_name=name,
        model_version=None,
        request_id=decoded.id,
        outputs=outputs,
        binary=decoded.binary_outputs,
    )
    computed = (
        (_COMPUTE_MS, b"%.3f" % outcome.compute_ms),
        (_MODEL_BYTES, b"%d" % outcome.size_bytes),
    )
    if (
        outcome.cache_hit
        and outcome.batch_size == 1
        and outcome.load_ms == 0.0
        and outcome.load_source == "device"
    ):  # the usual answer, a warm hit alone: its other values are constants
        return 200, [*answer_headers, *_HIT_BEFORE, *computed, *_HIT_AFTER], payload
    raw = [
        *answer_headers,
        (_CACHE, b"hit" if outcome.cache_hit else b"miss"),
        (_LOAD_MS, b"%.3f" % outcome.load_ms),
        *computed,
        (_LOAD_SOURCE, outcome.load_source.encode("latin-1")),
        (_BATCH_SIZE, b"%d" % outcome.batch_size),
    ]
    return 200, raw, payload


_CACHE, _LOAD_MS, _COMPUTE_MS = (
    h.encode() for h in (CACHE_HEADER, LOAD_MS_HEADER, COMPUTE_MS_HEADER)
)
_MODEL_BYTES, _LOAD_SOURCE, _BATCH_SIZE = (
    h.encode() for h in (MODEL_BYTES_HEADER, LOAD_SOURCE_HEADER, BATCH_SIZE_HEADER)
)
_HIT_BEFORE = ((_CACHE, b"hit"), (_LOAD_MS, b"%.3f" % 0.0))
_HIT_AFTER = ((_LOAD_SOURCE, b"device"), (_BATCH_SIZE, b"1"))


def _answer_of(response: Response) -> Answer:
    """An error response (rare) as an :data:`Answer`, without its content-length (the sender
    adds its own)."""
    headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
    return response.status_code, headers, bytes(response.body)


def _error(
    status: int, message: str, reason: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> Answer:
    return _answer_of(
        error_response(
            status, message, reason=reason, headers={k.decode(): v.decode() for k, v in extra}
        )
    )


def answer_response(answer: Answer) -> Response:
    """An :data:`Answer` as a Starlette response (the FastAPI route)."""
    status, headers, body = answer
    response = Response(bytes(body), status_code=status)
    response.raw_headers = [*(h for h in headers), (b"content-length", b"%d" % len(body))]
    return response


async def send_answer(answer: Answer, send: Send) -> None:
    """An :data:`Answer` on a bare ASGI connection."""
    status, headers, body = answer
    raw = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
