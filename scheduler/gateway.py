"""The gateway: the Open Inference Protocol (KServe v2) front end over the GPU managers.

An inference request takes one straight path (:meth:`Gateway.infer`), the same for HTTP and
gRPC (:mod:`gpufaas.scheduler.grpc_server`):

1. find the function (404 if unknown);
2. parse and check the request's header only (:func:`~gpufaas.core.protocol.inspect_request`):
   names, datatypes and shapes against the function's signature, byte counts against the body;
   the tensor data are neither decoded nor copied;
3. route (:meth:`Gateway.forward`): the policy decides the device, and the reason and victims
   with it (a :class:`~gpufaas.scheduler.policy.Decision`); the device's dispatcher queue admits
   the request; the body goes to that device's GPU manager untouched, over a pooled keep-alive
   connection (:mod:`gpufaas.scheduler.transport`);
4. learn from the answer (cache hit, load and compute times, the model's size), and pass the
   answer back as it came.

A manager that cannot be reached is marked down and the request tried on another device
(inference is idempotent). Errors are :class:`GatewayError` (and
:class:`~gpufaas.core.protocol.ProtocolError`), each with its HTTP status; the gRPC front end
maps the same statuses to gRPC codes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufaas.cache import InsufficientCapacity, Residency
from gpufaas.core import node as node_api
from gpufaas.core.api import InferenceFunction, is_valid_name
from gpufaas.core.counting import LoopCounter, LoopHistogram
from gpufaas.core.frames import InferHead
from gpufaas.core.http import (
    BATCH_SIZE_HEADER,
    CACHE_HEADER,
    COMPUTE_MS_HEADER,
    LOAD_MS_HEADER,
    LOAD_SOURCE_HEADER,
    MODEL_BYTES_HEADER,
    REASON_HEADER,
    TIMEOUT_HEADER,
    add_metrics_route,
    error_response,
    inline_schema,
    install_error_handlers,
    install_token_auth,
    json_safe,
    match_fast_post,
    read_body,
)
from gpufaas.core.peerhttp import header_pairs
from gpufaas.core.protocol import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    InferenceRequest,
    Limits,
    ModelMetadata,
    ProtocolError,
    RepositoryIndexEntry,
    ServerMetadata,
    check_signature,
    inspect_request,
    parse_header_length,
)
from gpufaas.scheduler.cluster import Cluster, Device, Node
from gpufaas.scheduler.coldstart import HandlerActivator, handler_router
from gpufaas.scheduler.coordinator import ShardedFunctions
from gpufaas.scheduler.dispatch import DeviceGone, DeviceLoad, Dispatcher, Job, QueueFull
from gpufaas.scheduler.estimates import Estimates
from gpufaas.scheduler.forwards import DeadlinePassed
from gpufaas.scheduler.lanes import NodeCall, NodeLanes
from gpufaas.scheduler.misses import MissCauses
from gpufaas.scheduler.policy import Decision, NoDevice, Policy, RouteRequest
from gpufaas.scheduler.prefetch import PrefetchDriver
from gpufaas.scheduler.replicas import FORWARD_MS_HEADER, OWNER_MS_HEADER
from gpufaas.scheduler.transport import NodeReply, NodeUnreachable

if TYPE_CHECKING:
    from gpufaas.scheduler.replicas import Replicas

logger = logging.getLogger(__name__)

SERVER_NAME = "gpufaas"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"  # a function has one version: its current spec
EXTENSIONS = ("binary_tensor_data", "model_repository")
ADMIN_PATHS = ("/v2/repository", "/v2/gpufaas")
_PASSTHROUGH_HEADERS = (
    "content-type",
    "retry-after",
    HEADER_LENGTH.lower(),
    CACHE_HEADER,
    LOAD_MS_HEADER,
    COMPUTE_MS_HEADER,  # the forward pass's share of the latency, for clients and benchmarks
    BATCH_SIZE_HEADER,  # requests that shared the pass: a batching histogram from the client
    REASON_HEADER,
    FORWARD_MS_HEADER,  # scale-out: a forwarded request's hop, as its sender and owner saw it
    OWNER_MS_HEADER,
)
_PLATFORMS = {"torchscript": "pytorch_torchscript", "torch-export": "pytorch_export"}


# -- errors ----------------------------------------------------------------------------------------


class GatewayError(Exception):
    """A request the gateway answers itself; ``status`` is the HTTP status, ``reason`` goes in
    ``X-Gpufaas-Reason``, ``retry_after_s`` (if any) in ``Retry-After``."""

    status = 500
    reason = "InternalError"
    retry_after_s: int | None = None


class UnknownModel(GatewayError):
    status, reason = 404, "UnknownModel"


class Overloaded(GatewayError):
    """A bounded queue is full: the client should retry after ``retry_after_s``."""

    status, reason = 429, "Overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before it could run."""

    status, reason = 504, "DeadlineExceeded"


class Unavailable(GatewayError):
    """No GPU manager could serve the request (now)."""

    status, reason, retry_after_s = 503, "NoDevice", 1


# -- configuration and metrics ---------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayConfig:
    limits: Limits = field(default_factory=Limits)
    sync_interval_s: float = 5.0
    max_attempts: int = 3
    # When set (Kubernetes mode), the repository and cluster endpoints need this bearer token.
    admin_token: str | None = None
    # Requests running on one device at a time; the rest wait in its bounded queue.
    device_concurrency: int = 4
    max_queue_per_device: int = 256
    # Requests in the gateway for one function (queued or running); past it, 429.
    max_pending_per_function: int = 512
    # O3: a request is passed at most this often, or held at most this long.
    o3_max_passes: int = 8
    o3_max_hold_ms: float = 500.0
    # The hot path to the managers: "framed" (transport.FramedPool to a node that serves frames,
    # else "pooled"), "inprocess" (a node attached to gateway.lanes runs on this loop: its answer
    # function is called; others as "framed"), "pooled" (transport.NodePool, HTTP) or "httpx"
    # (each node's client; in-process tests mount a manager app on it).
    transport: Literal["framed", "inprocess", "pooled", "httpx"] = "framed"
    node_timeout_s: float = 120.0
    # Open client connections to the HTTP front at most (scheduler/front.py); one more is
    # answered 503 with Retry-After and closed. None: no cap.
    max_connections: int | None = 2048
    # Sharded models (coordinator.py): concurrent requests to a shard set share passes
    # (scheduler/passes.py). Off: on this CPU box larger passes ran slower (bench/RESULTS.md, #15).
    shard_shared_passes: bool = False


class Metrics:
    """The gateway's request metrics. Those counted per request are plain numbers turned into
    metric families when scraped (:mod:`gpufaas.core.counting`: no lock, no checks per count)."""

    def __init__(self, *, policy: str) -> None:
        self.registry = CollectorRegistry()
        self.policy = policy
        self.requests = LoopCounter(
            "gpufaas_requests",
            "Inference requests by outcome",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = LoopHistogram(
            "gpufaas_request_seconds",
            "End-to-end inference latency at the gateway",
            ["model"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.cache = LoopCounter(
            "gpufaas_cache_lookups",
            "Device-cache lookups by result",
            ["policy", "result"],
            registry=self.registry,
        )
        self.load = Histogram(
            "gpufaas_load_seconds",
            "Model load time seen on misses",
            ["policy"],
            registry=self.registry,
        )
        self.queue_wait = LoopHistogram(
            "gpufaas_queue_wait_seconds",
            "Time a request waited in its device's queue at the gateway",
            ["policy"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.slo = LoopCounter(
            "gpufaas_slo_requests",
            "Answered requests of functions with an SLO, by whether it was met",
            ["policy", "met"],
            registry=self.registry,
        )
        self.decisions = LoopCounter(
            "gpufaas_route_decisions",
            "Routing decisions by why the device was chosen: holder (it has the model), load, "
            "replicate (a holder was too busy), fallback (no room anywhere), least-loaded (lb)",
            ["policy", "reason"],
            registry=self.registry,
        )
        self.overtakes = Gauge(
            "gpufaas_dispatch_overtakes",
            "Requests started ahead of an older waiting one (O3), since the gateway started",
            registry=self.registry,
        )

    @staticmethod
    def child(metric: LoopCounter | LoopHistogram, *labels: str) -> Any:
        """``metric.labels(*labels)``: one dict lookup (the children are kept by their labels)."""
        return metric.labels(*labels)

    def answered(self, name: str, status: int, *, elapsed_s: float, slo_ms: float | None) -> None:
        """Count one answered inference request (any front end)."""
        self.child(self.requests, name, str(status)).inc()
        if status != 200:
            return
        self.child(self.latency, name).observe(elapsed_s)
        if slo_ms is not None:
            met = "true" if elapsed_s * 1000 <= slo_ms else "false"
            self.child(self.slo, self.policy, met).inc()


# -- what travels to a manager ---------------------------------------------------------------------


_JSON_HEADERS = {"Content-Type": JSON_CONTENT_TYPE}


def infer_call(name: str, body: bytes | memoryview, *, header_length: int | None) -> NodeCall:
    """The node's infer call for a body the gateway has inspected, forwarded as it is."""
    path = node_api.MODEL_INFER.format(name=name)
    framed = InferHead(model=name, header_length=header_length)
    if header_length is None:
        return NodeCall(path, body, _JSON_HEADERS, framed)
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(header_length)}
    return NodeCall(path, body, headers, framed)


@dataclass(frozen=True)
class ModelStatus:
    """Whether a function can be served now, and separately where it is resident.

    ``ready``: it is registered and a GPU manager is reachable (a cold one loads on the first
    request). ``/v2/models/{name}/ready``, the repository index and gRPC ModelReady all answer
    from this.
    """

    ready: bool
    reason: str  # why not ready; "" when ready
    resident_on: list[str]  # device keys holding it
    loading_on: list[str]  # device keys loading it


class Gateway:
    """Functions, the cluster of GPU managers, the routing policy, and the request path."""

    def __init__(
        self, *, cluster: Cluster, policy: Policy, config: GatewayConfig | None = None
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.config = config or GatewayConfig()
        self.functions: dict[str, InferenceFunction] = {}
        self.model_bytes: dict[str, int] = {}
        self.metrics = Metrics(policy=policy.name)
        self.misses = MissCauses(self.metrics.registry)  # each miss's cause (scale-out, #16)
        self.estimates: Estimates = getattr(policy, "estimates", None) or Estimates()
        self.dispatcher = Dispatcher(
            mode=policy.dispatch,
            concurrency=self.config.device_concurrency,
            max_queue=self.config.max_queue_per_device,
            max_passes=self.config.o3_max_passes,
            max_hold_ms=self.config.o3_max_hold_ms,
            is_resident=self._is_resident,
        )
        dispatcher = self.dispatcher
        self.metrics.overtakes.set_function(
            lambda: sum(dispatcher.stats(key).overtakes for key in dispatcher.devices())
        )
        self.pending: dict[str, int] = {}
        # device key -> models routed there and not answered yet (queued here or running)
        self.in_flight: dict[str, collections.Counter[str]] = {}
        self.lanes = NodeLanes(
            transport=self.config.transport,
            device_concurrency=self.config.device_concurrency,
            timeout_s=self.config.node_timeout_s,
            token=cluster.manager_token,
        )
        self._sync_task: asyncio.Task[None] | None = None
        # Kubernetes mode: where the managers are, and tasks that feed the functions.
        self.discover_managers: Callable[[], Awaitable[Mapping[str, str]]] | None = None
        self.background: list[Callable[[asyncio.Event], Awaitable[None]]] = []
        self._stopping = asyncio.Event()
        self._background_tasks: list[asyncio.Task[None]] = []
        # Kubernetes mode: /v2/handlers/... wakes scaled-to-zero handlers (coldstart.py).
        self.handler_activator: HandlerActivator | None = None
        # Scale-out (scheduler/replicas.py): set when this gateway is one of several replicas.
        self.replicas: Replicas | None = None
        # Functions with spec.parallelism: shard sets over the managers (coordinator.py).
        self.sharded = ShardedFunctions.for_cluster(
            self.cluster,
            limits=self.config.limits,
            shared_passes=self.config.shard_shared_passes,
            registry=self.metrics.registry,
        )
        # Predictive residency (scheduler/prefetch.py: enable_prefetch), off unless attached.
        self.prefetch: PrefetchDriver | None = None

    def _is_resident(self, device_key: str, model: str) -> bool:
        return self.cluster.directory.state(device_key, model) is Residency.RESIDENT

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        await self.sync()
        self.sharded.deploy_all(self.functions.values())
        self._sync_task = asyncio.create_task(self._sync_forever(), name="gpufaas-sync")
        self._background_tasks = [asyncio.create_task(self._guard(run)) for run in self.background]

    async def _guard(self, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        try:
            await run(self._stopping)
        except Exception:
            logger.exception("background task %s failed", getattr(run, "__name__", run))

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [t for t in [self._sync_task, *self._background_tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sharded.close()
        await self.lanes.close()
        await self.cluster.close()

    async def sync(self) -> None:
        """Re-sync every node; a node that comes (back) up gets all functions."""
        if self.discover_managers is not None:
            try:
                await self.cluster.set_managers(await self.discover_managers())
            except Exception as e:  # keep the last membership; the next sync tries again
                logger.warning("GPU-manager discovery failed: %s", e)
        await self.lanes.forget_absent(self.cluster.nodes)
        for node in self.cluster.nodes.values():
            was_healthy = node.healthy
            if await self.cluster.sync_node(node) and not was_healthy:
                try:
                    await self.cluster.push_functions(
                        node,
                        {n: f.spec for n, f in self.functions.items() if not f.spec.parallelism},
                    )
                except httpx.HTTPError as e:
                    logger.warning("could not push functions to %s: %s", node.name, e)
                    self.cluster.mark_down(node)
        self._track_health()
        for key in self.cluster.directory.devices():
            for model, _, size in self.cluster.directory.residents(key):
                self.model_bytes[model] = size
        self._renote_in_flight()

    def _renote_in_flight(self) -> None:
        """After a sync, put back what the managers cannot know: requests still queued here.

        Without this, a cold model whose requests wait in a device's queue looks absent after
        the sync, and the next request for it loads it a second time elsewhere.
        """
        directory = self.cluster.directory
        for key, models in self.in_flight.items():
            if key not in directory:
                continue
            for model in models:
                with contextlib.suppress(InsufficientCapacity):
                    directory.note_dispatch(key, model, size_bytes=self.model_bytes.get(model, 0))

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval_s)
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one bad sync
                logger.exception("cluster sync failed")

    # -- functions -----------------------------------------------------------------

    def register(self, function: InferenceFunction) -> None:
        """Serve ``function``; its declared ``resources.gpuMemory`` sizes it until a GPU manager
        reports what it really takes (the policy plans room for it by that size)."""
        self.functions[function.name] = function
        hint = function.spec.resources.gpu_memory_bytes()
        if hint is not None and function.name not in self.model_bytes:
            self.model_bytes[function.name] = hint

    async def add_function(self, function: InferenceFunction) -> None:
        """:meth:`register`, and push the function to every healthy GPU manager."""
        self.register(function)
        if function.spec.parallelism is not None:  # a shard set, not a model on one device
            return await self.sharded.deploy(function)
        for node in self.cluster.nodes.values():
            if node.healthy:
                try:
                    await self.cluster.push_function(node, function.name, function.spec)
                except httpx.HTTPError as e:
                    logger.warning("could not push %s to %s: %s", function.name, node.name, e)

    async def remove_function(self, name: str) -> None:
        self.functions.pop(name, None)
        self.model_bytes.pop(name, None)
        await self.sharded.remove(name)
        await self.cluster.delete_function(name)

    def function(self, name: str) -> InferenceFunction | None:
        return self.functions.get(name)

    def require(self, name: str) -> InferenceFunction:
        function = self.functions.get(name)
        if function is None:
            raise UnknownModel(f"unknown model {name[:100]!r}; see POST /v2/repository/index")
        return function

    # -- the request path ------------------------------------------------------------

    async def infer(
        self,
        name: str,
        body: bytes | memoryview,
        *,
        header_length: int | None,
        timeout_ms: float | None = None,
    ) -> NodeReply:
        """Serve one inference request (the body as the client sent it); the manager's answer.

        Raises :class:`GatewayError` or :class:`~gpufaas.core.protocol.ProtocolError`.
        """
        function = self.require(name)
        if self.prefetch is not None:
            self.prefetch.observe(name)
        header = inspect_request(body, header_length=header_length, limits=self.config.limits)
        check_signature(header.signature(), function.spec.inputs)
        deadline = request_deadline(timeout_ms, header.parameters)
        if function.spec.parallelism is not None:
            with self._admitted(name):  # the per-function bound holds for shard sets too
                return await self.sharded.infer(
                    function, body, header_length=header_length, deadline=deadline
                )
        call = infer_call(name, body, header_length=header_length)
        return await self.forward(name, call, deadline=deadline)

    async def forward(
        self, name: str, call: NodeCall, *, deadline: float | None = None
    ) -> NodeReply:
        """Route ``call`` for ``name``, queue it on the device, send it; on a dead node, mark it
        down and try another device.

        Raises :class:`Overloaded` when the function's or the device's bound is reached,
        :class:`DeadlineExceeded` when the deadline passes first, :class:`Unavailable` when no
        device is left to try.
        """
        if self.replicas is not None:  # counted for the peers; a forwarded key goes on
            call = self.replicas.begin(name, call)
        with self._admitted(name):
            tried: set[str] = set()
            last_error: Exception | None = None
            for _ in range(self.config.max_attempts):
                try:
                    decision = self._route(name, exclude=tried)
                except NoDevice as e:
                    last_error = last_error or e
                    break
                device = self.cluster.devices[decision.device]
                tried.add(device.key)
                directory = self.cluster.directory
                view = directory.state(device.key, name)  # for the miss's cause (misses.py)
                held_elsewhere = view is None and len(directory.holder_ids(name)) > 0
                forward_failed = by_owner = False
                if self.replicas is not None and view is None:
                    # A residency decision: the placement owner makes it (scale-out).
                    size = self.model_bytes.get(name, 0)
                    try:
                        placed = await self.replicas.place(
                            name,
                            device.key,
                            call=call,
                            size_bytes=size,
                            victims=decision.victims,
                            tried=frozenset(tried - {device.key}),
                            deadline=deadline,
                        )
                    except DeadlinePassed as e:  # not the owner's failure: nothing is retried
                        raise DeadlineExceeded(f"{e} (the request for {name!r})") from None
                    if placed.reply is not None:
                        return placed.reply
                    call = placed.call  # keyed, if a forward failed: a manager runs it once
                    forward_failed = placed.forward_failed
                    if placed.decided is not None:  # the owner's device, dispatched from here
                        device = self.cluster.devices[placed.decided.device]
                        tried.add(device.key)
                        decision = dataclasses.replace(
                            decision, device=device.key, victims=placed.decided.victims
                        )
                        by_owner = True
                elif self.replicas is not None:
                    self.replicas.touched(device.key, name)  # the peers' LRU orders follow it
                try:
                    reply = await self._run_on(device, name, decision, call, deadline=deadline)
                except DeviceGone as e:
                    last_error = e
                    continue
                except NodeUnreachable as e:
                    logger.warning(
                        "GPU manager %s failed mid-request (%s); retrying elsewhere",
                        device.node.name,
                        e,
                    )
                    self.node_down(device.node)
                    last_error = e
                    continue
                hit = learn_from_reply(self, device, name, reply)
                if reply.status == 200 and not hit:
                    self.misses.note(
                        view=view,
                        held_elsewhere=held_elsewhere,
                        forwarded_in=self.replicas is not None and self.replicas.forwarded_in(),
                        forward_failed=forward_failed,
                        by_owner=by_owner,
                    )
                return reply if self.replicas is None else self.replicas.answered(reply)
        raise Unavailable(f"no GPU manager could serve {name!r}: {last_error}")

    def _admitted(self, name: str) -> _Admitted:
        """Count the request against its function's bound for as long as it is here."""
        if self.pending.get(name, 0) >= self.config.max_pending_per_function:
            raise Overloaded(
                f"{name!r} has {self.pending[name]} requests in flight "
                f"(the limit is {self.config.max_pending_per_function})"
            )
        return _Admitted(self.pending, name)

    def _route(self, name: str, *, exclude: set[str]) -> Decision:
        """The policy's decision for a request: the device, the reason, and the victims the GPU
        manager evicts first if it loads the model there (cheapest expected reloads)."""
        decision = self.policy.choose(
            RouteRequest(model=name, size_bytes=self.model_bytes.get(name, 0)),
            self.loads(exclude),
            self.cluster.directory,
            # Popularity from each replica's own ingress: a forwarded request was counted there.
            observe=self.replicas is None or not self.replicas.forwarded_in(),
        )
        self.metrics.child(self.metrics.decisions, self.policy.name, decision.reason).inc()
        if decision.victims and self.prefetch is not None:  # the residency policy's order
            victims = self.prefetch.victims(
                decision.device,
                decision.victims,
                size_bytes=self.model_bytes.get(name, 0),
                model=name,
            )
            decision = dataclasses.replace(decision, victims=victims)
        return decision

    def loads(self, exclude: set[str]) -> Sequence[DeviceLoad]:
        """The healthy devices' loads for the policy: the dispatcher's own table (O(1), kept
        current as jobs come and go), or on a retry a list without the devices tried."""
        if not exclude:
            return self.dispatcher.table
        return [
            self.dispatcher.load(d.key)
            for d in self.cluster.healthy_devices()
            if d.key not in exclude
        ]

    async def _run_on(
        self,
        device: Device,
        name: str,
        decision: Decision,
        call: NodeCall,
        *,
        deadline: float | None,
    ) -> NodeReply:
        """Queue on the device's dispatcher, then send. The directory notes the model there at
        routing, not at send: a burst for a cold model must see it loading here (the manager's
        answer and the next sync correct the view)."""
        size = self.model_bytes.get(name, 0)
        with contextlib.suppress(InsufficientCapacity):
            self.cluster.directory.note_dispatch(
                device.key, name, size_bytes=size, prefer=decision.victims
            )
        routed = self.in_flight.setdefault(device.key, collections.Counter())
        routed[name] += 1
        send = functools.partial(
            self._send,
            device,
            name,
            call,
            victims=decision.victims,
            deadline=deadline,
            queued_at=time.monotonic(),
        )
        try:
            return await self.dispatcher.submit(device.key, self._job(name, device), send)
        except QueueFull as e:
            raise Overloaded(str(e)) from None
        finally:
            routed[name] -= 1
            if not routed[name]:
                del routed[name]
                if not routed:
                    self.in_flight.pop(device.key, None)

    def _job(self, name: str, device: Device) -> Job:
        function = self.functions.get(name)
        size = self.model_bytes.get(name, 0)
        return Job(
            model=name,
            slo_ms=function.spec.slo.latency_ms if function else None,
            expected_ms=self.estimates.service_ms(
                name, size_bytes=size, resident=self._is_resident(device.key, name)
            ),
        )

    def _send(
        self,
        device: Device,
        name: str,
        call: NodeCall,
        *,
        victims: Sequence[str],
        deadline: float | None,
        queued_at: float,
    ) -> Awaitable[NodeReply]:
        """The call on its lane, once the dispatcher gave it a slot (its checks run then; the
        lane's coroutine is awaited by the dispatcher, with no layer of its own between)."""
        waited = time.monotonic() - queued_at
        self.metrics.child(self.metrics.queue_wait, self.policy.name).observe(waited)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"the deadline of the request for {name!r} passed while it waited"
            )
        return self.lanes.send(device.node, device.device_id, call, victims=victims)

    def _track_health(self) -> None:
        """Keep the dispatcher's devices (and so its table) the healthy ones, and no other: a
        device that left fails its waiting requests with DeviceGone, and they retry elsewhere."""
        healthy = {d.key for d in self.cluster.healthy_devices()}
        known = set(self.dispatcher.devices())
        for key in known - healthy:
            self.dispatcher.remove_device(key)
        for key in healthy - known:
            self.dispatcher.add_device(key)

    def node_down(self, node: Node) -> None:
        """Forget a dead node: its devices leave the directory, its waiting requests retry."""
        self.cluster.mark_down(node)
        self._track_health()


class _Admitted:
    """A request counted in ``pending`` until the ``with`` block ends (a class, not a
    generator-based context manager: it is entered on every request)."""

    __slots__ = ("name", "pending")

    def __init__(self, pending: dict[str, int], name: str) -> None:
        self.pending, self.name = pending, name

    def __enter__(self) -> None:
        self.pending[self.name] = self.pending.get(self.name, 0) + 1

    def __exit__(self, *exc: object) -> None:
        left = self.pending[self.name] - 1
        if left:
            self.pending[self.name] = left
        else:
            del self.pending[self.name]


# -- the repository's views (OIP metadata, readiness, the index), for HTTP and gRPC alike ----------


def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS))


def server_ready(gateway: Gateway) -> bool:
    """Whether any GPU manager is reachable."""
    return any(n.healthy for n in gateway.cluster.nodes.values())


def model_metadata(gateway: Gateway, name: str) -> ModelMetadata:
    function = gateway.require(name)
    return ModelMetadata.from_spec(
        name,
        function.spec,
        platform=_PLATFORMS.get(str(function.spec.model.format), "pytorch"),
        versions=[MODEL_VERSION],
    )


def model_status(gateway: Gateway, name: str) -> ModelStatus:
    """Readiness (registered, and a GPU manager reachable) and, apart, residency."""
    gateway.require(name)
    holders = gateway.cluster.directory.holders(name)
    resident = sorted(k for k, s in holders.items() if s is Residency.RESIDENT)
    loading = sorted(k for k, s in holders.items() if s is not Residency.RESIDENT)
    ready = server_ready(gateway)
    reason = "" if ready else "no GPU manager is reachable"
    return ModelStatus(ready=ready, reason=reason, resident_on=resident, loading_on=loading)


def repository_index(gateway: Gateway) -> list[RepositoryIndexEntry]:
    entries = []
    for name in sorted(gateway.functions):
        status = model_status(gateway, name)
        entries.append(
            RepositoryIndexEntry(
                name=name,
                version=MODEL_VERSION,
                state="READY" if status.ready else "UNAVAILABLE",
                reason=status.reason,
                resident_on=status.resident_on,
                loading_on=status.loading_on,
            )
        )
    return entries


# -- what each answer teaches the gateway (directory, estimates, metrics) --------------------------


def learn_from_reply(gateway: Gateway, device: Device, name: str, reply: NodeReply) -> bool:
    """Correct the gateway's directory and estimates from the manager's answer (its headers
    read as the bytes they came as: nothing decoded but the numbers); whether it was a hit."""
    headers = dict(header_pairs(reply.headers))
    directory = gateway.cluster.directory
    # The node may have been called down while this request ran (a sync failed): its devices
    # left the directory, and the next sync that reaches it reads them afresh. The answer stands.
    known = device.key in directory
    if reply.status != 200:
        if known and headers.get(_REASON) in (b"ModelLoadFailed", b"InsufficientMemory"):
            directory.note_evicted(device.key, name)
        return False
    hit = headers.get(_CACHE) == b"hit"
    gateway.metrics.child(
        gateway.metrics.cache, gateway.policy.name, "hit" if hit else "miss"
    ).inc()
    if gateway.prefetch is not None:
        source = headers.get(_LOAD_SOURCE)
        gateway.prefetch.note_response(
            device.key, name, hit=hit, source=None if source is None else source.decode("latin-1")
        )
    size = headers.get(_MODEL_BYTES)
    if size is not None:
        size_bytes = int(size)
        # A warm answer of a model the view holds resident at the size it knew teaches
        # nothing: routing already marked it used (note_dispatch). Only news is written
        # (note_loaded is ~10% of the gateway's own Python per request).
        news = (
            gateway.model_bytes.get(name) != size_bytes
            or directory.state(device.key, name) is not Residency.RESIDENT
        )
        gateway.model_bytes[name] = size_bytes
        if known and news:
            directory.note_loaded(device.key, name, size_bytes=size_bytes)
    compute_ms = _header_ms(headers, _COMPUTE_MS)
    if compute_ms is not None:
        gateway.estimates.observe_infer(name, infer_ms=compute_ms)
    load_ms = _header_ms(headers, _LOAD_MS)
    if not hit and load_ms is not None:
        gateway.metrics.load.labels(gateway.policy.name).observe(load_ms / 1000)
        gateway.estimates.observe_load(
            name, size_bytes=gateway.model_bytes.get(name, 0), load_ms=load_ms
        )
    return hit


_REASON, _CACHE, _LOAD_SOURCE, _MODEL_BYTES, _COMPUTE_MS, _LOAD_MS = (
    h.encode()
    for h in (
        REASON_HEADER,
        CACHE_HEADER,
        LOAD_SOURCE_HEADER,
        MODEL_BYTES_HEADER,
        COMPUTE_MS_HEADER,
        LOAD_MS_HEADER,
    )
)


# -- the repository extension's Load and Unload ---------------------------------------------------


async def load_model(gateway: Gateway, name: str) -> None:
    """Make ``name`` resident on a device the policy chooses (the repository's load)."""
    gateway.require(name)
    reply = await gateway.forward(name, NodeCall(node_api.MODEL_LOAD.format(name=name)))
    if reply.status != 200:
        raise NodeFailed(reply)
    await gateway.sync()


async def unload_model(gateway: Gateway, name: str) -> None:
    """Unload everywhere; idempotent, so a function already removed unloads too."""
    if not is_valid_name(name):
        raise UnknownModel(f"unknown model {name[:100]!r}")

    async def one(node_client: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await node_client.post(node_api.MODEL_UNLOAD.format(name=name))

    await asyncio.gather(*(one(n.client) for n in gateway.cluster.nodes.values() if n.healthy))
    for key in gateway.cluster.directory.devices():
        gateway.cluster.directory.note_evicted(key, name)


class NodeFailed(GatewayError):
    """A GPU manager answered with an error; its answer goes back to the client as it is."""

    def __init__(self, reply: NodeReply) -> None:
        super().__init__(reply.body.decode("utf-8", "replace")[:1000])
        self.reply = reply
        self.status = reply.status
        self.reason = reply.headers.get(REASON_HEADER, "NodeError")


def request_deadline(timeout_ms: float | None, parameters: Mapping[str, Any]) -> float | None:
    """A monotonic deadline from ``timeout_ms`` (``X-Gpufaas-Timeout-Ms``, or gRPC's deadline)
    and Triton's ``timeout`` request parameter (microseconds), the sooner of the two; None when
    there is neither."""
    given = [] if timeout_ms is None else [timeout_ms]
    if isinstance(parameters.get("timeout"), int | float):
        given.append(float(parameters["timeout"]) / 1000)
    if not given:
        return None
    if not min(given) > 0:
        raise ProtocolError("the timeout must be positive")
    return time.monotonic() + min(given) / 1000


def _timeout_ms(header: str | None) -> float | None:
    """The value of ``X-Gpufaas-Timeout-Ms``, if given."""
    if header is None:
        return None
    try:
        return float(header)
    except ValueError:
        raise ProtocolError(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None


def _header_ms(headers: Mapping[bytes, bytes], name: bytes) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


def gateway_error_response(error: GatewayError) -> Response:
    if isinstance(error, NodeFailed):
        return _passthrough(error.reply)
    headers = {} if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return error_response(error.status, str(error), reason=error.reason, headers=headers)


def _passthrough(reply: NodeReply) -> Response:
    return _response(_passthrough_answer(reply))


def _response(answer: Answer) -> Response:
    """An :data:`Answer` as a Starlette response (the routes outside the fast path)."""
    status, headers, content = answer
    text = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    return Response(content, status_code=status, headers=text)


# -- the HTTP front end ----------------------------------------------------------------------------


def create_app(gateway: Gateway) -> ASGIApp:
    """The gateway's HTTP app: :class:`InferFastPath` for inference, FastAPI for the rest."""
    app = InferFastPath(create_api(gateway), gateway=gateway)
    # Scale-out: the replicas' ingress marker goes in front of the hot path (replicas.py).
    return app if gateway.replicas is None else gateway.replicas.ingress(app)


def create_api(gateway: Gateway) -> FastAPI:
    """Every endpoint (inference too, for the OpenAPI document) as a FastAPI app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="gpufaas gateway", version=SERVER_VERSION, lifespan=lifespan)
    app.state.gateway = gateway
    install_error_handlers(app)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return gateway_error_response(exc)

    add_metrics_route(app, gateway.metrics.registry)
    if gateway.replicas is not None:
        gateway.replicas.install(app)
    if gateway.config.admin_token:
        install_token_auth(
            app,
            token=gateway.config.admin_token,
            protect=lambda path: path.startswith(ADMIN_PATHS),
            realm="the gpufaas admin API",
        )

    if gateway.handler_activator is not None:  # handlers, held while they start (coldstart.py)
        app.include_router(handler_router(gateway.handler_activator, gateway.function))

    @app.get("/v2")
    async def get_server_metadata() -> dict[str, Any]:
        return server_metadata().model_dump()

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if server_ready(gateway):
            replica = {} if gateway.replicas is None else {"replica": gateway.replicas.health()}
            return JSONResponse({"ready": True, **replica})
        return error_response(503, "no GPU manager is reachable", reason="NoDevice")

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def get_model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(model_metadata(gateway, name).model_dump(exclude_none=True))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        status = model_status(gateway, name)
        if not status.ready:
            return error_response(503, status.reason, reason="NoDevice")
        return JSONResponse({"name": name, "ready": True})

    infer_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(InferenceRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    # Served by InferFastPath ahead of the router; declared here for the OpenAPI document, and
    # served the same way if the app runs without the middleware.
    @app.post("/v2/models/{name}/infer", openapi_extra=infer_body)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=infer_body)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        max_bytes = gateway.config.limits.max_body_bytes
        return _response(
            await answer_infer(
                gateway, name, lambda: read_body(request, max_bytes=max_bytes), request.headers
            )
        )

    @app.post("/v2/repository/index")
    async def get_repository_index() -> JSONResponse:
        return JSONResponse([e.model_dump() for e in repository_index(gateway)])

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> Response:
        await load_model(gateway, name)
        return JSONResponse({}, status_code=200)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> Response:
        await unload_model(gateway, name)
        return JSONResponse({}, status_code=200)

    @app.get("/v2/gpufaas/cluster")
    async def cluster_state() -> JSONResponse:
        directory = gateway.cluster.directory
        return JSONResponse(
            json_safe(
                {
                    "policy": gateway.policy.name,
                    "nodes": [
                        {"name": n.name, "url": n.url, "healthy": n.healthy}
                        for n in gateway.cluster.nodes.values()
                    ],
                    "devices": [
                        {
                            "key": d.key,
                            "outstanding": gateway.dispatcher.queued(d.key)
                            + gateway.dispatcher.running(d.key),
                            "capacity_bytes": d.capacity_bytes,
                            "residents": directory.residents(d.key)
                            if d.key in directory.devices()
                            else [],
                        }
                        for d in gateway.cluster.devices.values()
                    ],
                }
            )
        )

    return app


INFER_PATH = node_api.MODEL_INFER_PATH  # the route contract's pattern


class InferFastPath:
    """The hot path as a bare ASGI app in front of FastAPI: ``POST .../infer`` is answered here,
    without middleware, routing, dependency solving or a Request object, which cost more than
    half of the gateway's CPU per warm request (``docs/dataplane.md``). Everything else
    (lifespan included) goes on to FastAPI.
    """

    def __init__(self, app: ASGIApp, *, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = match_fast_post(
            scope, receive, path=INFER_PATH, max_bytes=self.gateway.config.limits.max_body_bytes
        )
        if post is None:
            await self.app(scope, receive, send)
            return
        match, headers, read = post.match, post.headers, post.read
        status, out, content = await answer_infer(self.gateway, match["name"], read, headers)
        raw = [*out, (b"content-length", b"%d" % len(content))]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})


# status, headers as the front writes them (raw pairs, names lower-case), body
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


async def answer_infer(
    gateway: Gateway,
    name: str,
    read_body: Callable[[], Awaitable[bytes]],
    headers: Mapping[str, str],
) -> Answer:
    """One HTTP inference request: status, headers and body to send back, errors included
    (``{"error": ...}`` with the status of its kind), and its metrics counted."""
    started = time.perf_counter()
    try:
        body = await read_body()
        reply = await gateway.infer(
            name,
            body,
            header_length=parse_header_length(headers.get(HEADER_LENGTH.lower())),
            timeout_ms=_timeout_ms(headers.get(TIMEOUT_HEADER)),
        )
        answer = _passthrough_answer(reply)
    except NodeFailed as e:
        answer = _passthrough_answer(e.reply)
    except GatewayError as e:
        extra = [] if e.retry_after_s is None else [("retry-after", str(e.retry_after_s))]
        answer = error_answer(e.status, str(e), e.reason, extra)
    except ProtocolError as e:
        answer = error_answer(e.status_code, str(e), "InvalidRequest", [])
    except Exception as e:  # as FastAPI's handlers do: a message, never a traceback
        logger.exception("unhandled error on an inference request for %r", name[:100])
        answer = error_answer(
            500, f"internal error ({type(e).__name__}); see the server log", "InternalError", []
        )
    function = gateway.function(name)
    gateway.metrics.answered(
        name if function is not None else "_unknown",
        answer[0],
        elapsed_s=time.perf_counter() - started,
        slo_ms=function.spec.slo.latency_ms if function else None,
    )
    return answer


def _passthrough_answer(reply: NodeReply) -> Answer:
    """The node's answer as it goes to the client: its headers, as the bytes they came as,
    less those that are the gateway's business only."""
    passing = _PASSING
    return (
        reply.status,
        [(k, v) for k, v in header_pairs(reply.headers) if k in passing],
        reply.body,
    )


_PASSING = frozenset(h.lower().encode("latin-1") for h in _PASSTHROUGH_HEADERS)


def error_answer(status: int, message: str, reason: str, extra: list[tuple[str, str]]) -> Answer:
    headers = [
        (b"content-type", _JSON),
        (_REASON, reason.encode("latin-1")),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra),
    ]
    return status, headers, json.dumps({"error": message}).encode()


_JSON = JSON_CONTENT_TYPE.encode()
