"""The gateway: an Open Inference Protocol (KServe v2 REST) front end.

It validates each request against its function's declared signature at the
edge, asks the routing policy for a device, and forwards the request
binary-encoded to that device's GPU manager. The manager's response is passed
through as it is. A manager that cannot be reached is marked down, and the
request is retried on another device (inference is idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gpufaas.cache import InsufficientCapacity, Residency
from gpufaas.core.api import InferenceFunction, is_valid_name
from gpufaas.core.http import (
    CACHE_HEADER,
    COMPUTE_MS_HEADER,
    DEVICE_HEADER,
    EVICT_FIRST_HEADER,
    LOAD_MS_HEADER,
    MODEL_BYTES_HEADER,
    REASON_HEADER,
    add_metrics_route,
    error_response,
    format_evict_first,
    header_length,
    inline_schema,
    install_error_handlers,
    install_token_auth,
    json_safe,
    read_body,
)
from gpufaas.core.protocol import (
    HEADER_LENGTH,
    InferenceRequest,
    Limits,
    ProtocolError,
    decode_request,
    encode_request,
    validate_inputs,
)
from gpufaas.scheduler.cluster import Cluster, Device, Node
from gpufaas.scheduler.dispatch import DeviceGone, Dispatcher, Job, QueueFull, directory_residency
from gpufaas.scheduler.estimates import Estimates
from gpufaas.scheduler.policy import DeviceLoad, NoDevice, Policy, RouteRequest

if TYPE_CHECKING:
    from gpufaas.scheduler.replicas import Replicas

logger = logging.getLogger(__name__)

SERVER_NAME = "gpufaas"
SERVER_VERSION = "0.1.0"
ADMIN_PATHS = ("/v2/repository", "/v2/gpufaas")
_PASSTHROUGH_HEADERS = (
    "content-type",
    "retry-after",
    HEADER_LENGTH.lower(),
    CACHE_HEADER,
    LOAD_MS_HEADER,
    REASON_HEADER,
)


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


class Overloaded(Exception):
    """A bounded queue is full: the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could run."""


class Metrics:
    def __init__(self, *, policy: str) -> None:
        self.registry = CollectorRegistry()
        self.policy = policy
        self.requests = Counter(
            "gpufaas_requests",
            "Inference requests by outcome",
            ["model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gpufaas_request_seconds",
            "End-to-end inference latency at the gateway",
            ["model"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.cache = Counter(
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
        self.queue_wait = Histogram(
            "gpufaas_queue_wait_seconds",
            "Time a request waited in its device's queue at the gateway",
            ["policy"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.slo = Counter(
            "gpufaas_slo_requests",
            "Answered requests of functions with an SLO, by whether it was met",
            ["policy", "met"],
            registry=self.registry,
        )
        self.decisions = Counter(
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


class Gateway:
    """Functions, the cluster of GPU managers, and the routing policy."""

    def __init__(
        self, *, cluster: Cluster, policy: Policy, config: GatewayConfig | None = None
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.config = config or GatewayConfig()
        self.functions: dict[str, InferenceFunction] = {}
        self.model_bytes: dict[str, int] = {}
        self.metrics = Metrics(policy=policy.name)
        self.estimates: Estimates = getattr(policy, "estimates", None) or Estimates()
        self.dispatcher = Dispatcher(
            mode=policy.dispatch,
            concurrency=self.config.device_concurrency,
            max_queue=self.config.max_queue_per_device,
            max_passes=self.config.o3_max_passes,
            max_hold_ms=self.config.o3_max_hold_ms,
            is_resident=directory_residency(cluster.directory),
        )
        dispatcher = self.dispatcher
        self.metrics.overtakes.set_function(
            lambda: sum(dispatcher.stats(key).overtakes for key in dispatcher.devices())
        )
        self.pending: dict[str, int] = {}
        # device key -> models routed there and not answered yet (queued here or running)
        self.in_flight: dict[str, collections.Counter[str]] = {}
        self._sync_task: asyncio.Task[None] | None = None
        # Kubernetes mode: where the managers are, and tasks that feed the functions.
        self.discover_managers: Callable[[], Awaitable[Mapping[str, str]]] | None = None
        self.background: list[Callable[[asyncio.Event], Awaitable[None]]] = []
        self._stopping = asyncio.Event()
        self._background_tasks: list[asyncio.Task[None]] = []
        # Scale-out (scheduler/replicas.py): set when this gateway is one of several replicas.
        self.replicas: Replicas | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        await self.sync()
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
        await self.cluster.close()

    async def sync(self) -> None:
        """Re-sync every node; a node that comes (back) up gets all functions."""
        if self.discover_managers is not None:
            try:
                await self.cluster.set_managers(await self.discover_managers())
            except Exception as e:  # keep the last membership; the next sync tries again
                logger.warning("GPU-manager discovery failed: %s", e)
        for node in self.cluster.nodes.values():
            was_healthy = node.healthy
            if await self.cluster.sync_node(node) and not was_healthy:
                try:
                    await self.cluster.push_functions(
                        node, {n: f.spec for n, f in self.functions.items()}
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
        for node in self.cluster.nodes.values():
            if node.healthy:
                try:
                    await self.cluster.push_function(node, function.name, function.spec)
                except httpx.HTTPError as e:
                    logger.warning("could not push %s to %s: %s", function.name, node.name, e)

    async def remove_function(self, name: str) -> None:
        self.functions.pop(name, None)
        self.model_bytes.pop(name, None)
        await self.cluster.delete_function(name)

    def function(self, name: str) -> InferenceFunction | None:
        return self.functions.get(name)

    # -- routing -------------------------------------------------------------------

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

    def _choose(self, name: str, exclude: set[str]) -> tuple[Device, list[str]]:
        """The device for a request, and the victims the policy chose for a load there (the
        GPU manager evicts them first: cheapest expected reloads, not least recently used)."""
        key = self.policy.choose(
            RouteRequest(model=name, size_bytes=self.model_bytes.get(name, 0)),
            self.loads(exclude),
            self.cluster.directory,
        )
        # LALB explains its choice (a Decision); LB has nothing to explain.
        decision = getattr(self.policy, "last", None)
        reason = getattr(decision, "reason", "least-loaded")
        self.metrics.decisions.labels(self.policy.name, reason).inc()
        victims = list(decision.victims) if decision is not None and decision.device == key else []
        return self.cluster.devices[key], victims

    def _job(self, name: str, device: Device) -> Job:
        function = self.functions.get(name)
        size = self.model_bytes.get(name, 0)
        resident = self.cluster.directory.state(device.key, name) is Residency.RESIDENT
        return Job(
            model=name,
            slo_ms=function.spec.slo.latency_ms if function else None,
            expected_ms=self.estimates.service_ms(name, size_bytes=size, resident=resident),
        )

    async def _post(
        self,
        device: Device,
        name: str,
        *,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        evict_first: Sequence[str],
        deadline: float | None,
        queued_at: float,
    ) -> httpx.Response:
        self.metrics.queue_wait.labels(self.policy.name).observe(time.monotonic() - queued_at)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"the deadline of the request for {name!r} passed while it waited"
            )
        extra = {DEVICE_HEADER: device.device_id}
        if evict_first:
            extra[EVICT_FIRST_HEADER] = format_evict_first(evict_first)
        return await device.node.client.post(path, content=content, headers={**headers, **extra})

    async def forward(
        self,
        name: str,
        *,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        deadline: float | None = None,
    ) -> httpx.Response:
        """Queue on the chosen device and send; on a dead node, mark it down and try another.

        Raises :class:`Overloaded` when the function's or the device's bound is reached,
        :class:`DeadlineExceeded` when the deadline passes first, :class:`NoDevice` when
        no device is left to try.
        """
        if self.pending.get(name, 0) >= self.config.max_pending_per_function:
            raise Overloaded(
                f"{name!r} has {self.pending[name]} requests in flight "
                f"(the limit is {self.config.max_pending_per_function})"
            )
        self.pending[name] = self.pending.get(name, 0) + 1
        try:
            return await self._forward(
                name, path=path, content=content, headers=headers, deadline=deadline
            )
        finally:
            self.pending[name] -= 1
            if not self.pending[name]:
                del self.pending[name]

    async def _forward(
        self,
        name: str,
        *,
        path: str,
        content: bytes,
        headers: Mapping[str, str],
        deadline: float | None,
    ) -> httpx.Response:
        tried: set[str] = set()
        last_error: Exception | None = None
        for _ in range(self.config.max_attempts):
            try:
                device, evict_first = self._choose(name, tried)
            except NoDevice as e:
                last_error = last_error or e
                break
            tried.add(device.key)
            if self.replicas is not None and self.cluster.directory.state(device.key, name) is None:
                # A residency decision: the function's owner replica makes it (scale-out).
                size = self.model_bytes.get(name, 0)
                placed = await self.replicas.place(
                    name, device.key, path=path, content=content, headers=headers,
                    size_bytes=size, victims=evict_first,
                )  # fmt: skip
                if placed is not None:
                    return placed
            # Noted at routing, not at send: a burst for a cold model must see it loading here
            # (the manager's answer and the next sync correct the view).
            with contextlib.suppress(InsufficientCapacity):
                self.cluster.directory.note_dispatch(
                    device.key, name, size_bytes=self.model_bytes.get(name, 0), prefer=evict_first
                )
            routed = self.in_flight.setdefault(device.key, collections.Counter())
            routed[name] += 1
            try:
                response = await self.dispatcher.submit(
                    device.key,
                    self._job(name, device),
                    functools.partial(
                        self._post,
                        device,
                        name,
                        path=path,
                        content=content,
                        headers=headers,
                        evict_first=evict_first,
                        deadline=deadline,
                        queued_at=time.monotonic(),
                    ),
                )
            except QueueFull as e:
                raise Overloaded(str(e)) from None
            except DeviceGone as e:
                last_error = e
                continue
            except httpx.TransportError as e:
                logger.warning(
                    "GPU manager %s failed mid-request (%s); retrying elsewhere",
                    device.node.name,
                    e,
                )
                self.node_down(device.node)
                last_error = e
                continue
            finally:
                routed[name] -= 1
                if not routed[name]:
                    del routed[name]
                    if not routed:
                        self.in_flight.pop(device.key, None)
            self._learn(device, name, response)
            return response
        raise NoDevice(f"no GPU manager could serve {name!r}: {last_error}")

    def _learn(self, device: Device, name: str, response: httpx.Response) -> None:
        """Correct the directory from the manager's answer."""
        if response.status_code != 200:
            if response.headers.get(REASON_HEADER) in {"ModelLoadFailed", "InsufficientMemory"}:
                self.cluster.directory.note_evicted(device.key, name)
            return
        hit = response.headers.get(CACHE_HEADER) == "hit"
        self.metrics.cache.labels(self.policy.name, "hit" if hit else "miss").inc()
        size = response.headers.get(MODEL_BYTES_HEADER)
        if size is not None:
            self.model_bytes[name] = int(size)
            self.cluster.directory.note_loaded(device.key, name, size_bytes=int(size))
        compute_ms = _header_ms(response, COMPUTE_MS_HEADER)
        if compute_ms is not None:
            self.estimates.observe_infer(name, infer_ms=compute_ms)
        load_ms = _header_ms(response, LOAD_MS_HEADER)
        if not hit and load_ms is not None:
            self.metrics.load.labels(self.policy.name).observe(load_ms / 1000)
            self.estimates.observe_load(
                name, size_bytes=self.model_bytes.get(name, 0), load_ms=load_ms
            )

    async def infer(self, name: str, request: Request) -> Response:
        function = self.function(name)
        if function is None:
            return error_response(
                404, f"unknown model {name!r}; see POST /v2/repository/index", reason="UnknownModel"
            )
        limits = self.config.limits
        body = await read_body(request, max_bytes=limits.max_body_bytes)
        decoded = decode_request(body, header_length=header_length(request), limits=limits)
        arrays = validate_inputs(decoded, function.spec.inputs)
        content, headers = encode_request(
            {t.name: (arrays[t.name], t.datatype) for t in function.spec.inputs},
            request_id=decoded.id,
            outputs=decoded.requested_outputs,
            binary_outputs=decoded.binary_outputs,
            parameters=decoded.parameters or None,
        )
        if self.replicas is not None:
            headers = self.replicas.admit(name, request.headers, headers)
        try:
            response = await self.forward(
                name,
                path=f"/v2/models/{name}/infer",
                content=content,
                headers=headers,
                deadline=request_deadline(request, decoded.parameters),
            )
        except NoDevice as e:
            return error_response(503, str(e), reason="NoDevice", headers={"Retry-After": "1"})
        except Overloaded as e:
            return error_response(
                429, str(e), reason="Overloaded", headers={"Retry-After": str(e.retry_after_s)}
            )
        except DeadlineExceeded as e:
            return error_response(504, str(e), reason="DeadlineExceeded")
        passthrough = {
            k: v for k, v in response.headers.items() if k.lower() in _PASSTHROUGH_HEADERS
        }
        return Response(response.content, status_code=response.status_code, headers=passthrough)

    # -- repository extension ------------------------------------------------------

    def repository_index(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.functions):
            holders = self.cluster.directory.holders(name)
            state = (
                "READY" if any(str(s) == "resident" for s in holders.values()) else "UNAVAILABLE"
            )
            out.append(
                {
                    "name": name,
                    "version": "1",
                    "state": state,
                    "reason": "" if holders else "not resident",
                }
            )
        return out

    async def load(self, name: str) -> Response:
        if name not in self.functions:
            return error_response(404, f"unknown model {name!r}", reason="UnknownModel")
        try:
            response = await self.forward(
                name, path=f"/v2/repository/models/{name}/load", content=b"", headers={}
            )
        except (NoDevice, Overloaded) as e:
            return error_response(503, str(e), reason="NoDevice", headers={"Retry-After": "1"})
        if response.status_code != 200:
            return Response(
                response.content, status_code=response.status_code, media_type="application/json"
            )
        await self.sync()
        return JSONResponse({}, status_code=200)

    async def unload(self, name: str) -> Response:
        """Unload everywhere; idempotent, so a function already removed unloads too."""
        if not is_valid_name(name):
            return error_response(404, f"unknown model {name[:100]!r}", reason="UnknownModel")

        async def one(node_client: httpx.AsyncClient) -> None:
            with contextlib.suppress(httpx.HTTPError):
                await node_client.post(f"/v2/repository/models/{name}/unload")

        await asyncio.gather(*(one(n.client) for n in self.cluster.nodes.values() if n.healthy))
        for key in self.cluster.directory.devices():
            self.cluster.directory.note_evicted(key, name)
        return JSONResponse({}, status_code=200)

    def model_metadata(self, function: InferenceFunction) -> dict[str, Any]:
        spec = function.spec
        return {
            "name": function.name,
            "versions": ["1"],
            "platform": "pytorch_torchscript"
            if spec.model.format == "torchscript"
            else "pytorch_export",
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in spec.inputs
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in spec.outputs
            ],
        }


TIMEOUT_HEADER = "x-gpufaas-timeout-ms"


def request_deadline(request: Request, parameters: Mapping[str, Any]) -> float | None:
    """A monotonic deadline from ``X-Gpufaas-Timeout-Ms`` or Triton's ``timeout``
    request parameter (microseconds); None when the client gave none."""
    timeout_ms: float | None = None
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            timeout_ms = float(header)
        except ValueError:
            raise ProtocolError(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    elif isinstance(parameters.get("timeout"), int | float):
        timeout_ms = float(parameters["timeout"]) / 1000
    if timeout_ms is None:
        return None
    if not timeout_ms > 0:
        raise ProtocolError("the timeout must be positive")
    return time.monotonic() + timeout_ms / 1000


def _header_ms(response: httpx.Response, header: str) -> float | None:
    try:
        return float(response.headers[header])
    except (KeyError, ValueError):
        return None


def create_app(gateway: Gateway) -> FastAPI:
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

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data", "model_repository"],
        }

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if any(n.healthy for n in gateway.cluster.nodes.values()):
            replica = {} if gateway.replicas is None else {"replica": gateway.replicas.health()}
            return JSONResponse({"ready": True, **replica})
        return error_response(503, "no GPU manager is reachable", reason="NoDevice")

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        function = gateway.function(name)
        if function is None:
            return error_response(404, f"unknown model {name!r}", reason="UnknownModel")
        return JSONResponse(gateway.model_metadata(function))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        if gateway.function(name) is None:
            return error_response(404, f"unknown model {name!r}", reason="UnknownModel")
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

    @app.post("/v2/models/{name}/infer", openapi_extra=infer_body)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=infer_body)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        response = await gateway.infer(name, request)
        gateway.metrics.requests.labels(
            name if name in gateway.functions else "_unknown", str(response.status_code)
        ).inc()
        if response.status_code == 200:
            elapsed = time.perf_counter() - started
            gateway.metrics.latency.labels(name).observe(elapsed)
            function = gateway.function(name)
            slo_ms = function.spec.slo.latency_ms if function else None
            if slo_ms is not None:
                met = "true" if elapsed * 1000 <= slo_ms else "false"
                gateway.metrics.slo.labels(gateway.policy.name, met).inc()
        return response

    @app.post("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        return JSONResponse(gateway.repository_index())

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> Response:
        return await gateway.load(name)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> Response:
        return await gateway.unload(name)

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
