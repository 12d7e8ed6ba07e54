"""The GPU manager's HTTP API: the data plane for one node.

The gateway pushes function specs here, then sends binary-encoded inference
requests naming the device to run on (``X-Gpufaas-Device``). A miss loads the
model on that device. ``/v2/gpufaas/state`` reports devices and both cache
tiers with byte-exact sizes; ``/metrics`` exports the same as gauges.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufaas.core.api import InferenceFunctionSpec, ManifestError, parse_spec
from gpufaas.core.http import (
    CACHE_HEADER,
    COMPUTE_MS_HEADER,
    DEVICE_HEADER,
    LOAD_MS_HEADER,
    MODEL_BYTES_HEADER,
    add_metrics_route,
    error_response,
    header_length,
    install_error_handlers,
    json_safe,
    read_body,
)
from gpufaas.core.protocol import Limits, decode_request, encode_response, validate_inputs
from gpufaas.gpu_manager.runtime import NodeRuntime, RuntimeFailure

logger = logging.getLogger(__name__)


class _StateCollector(Collector):
    """Device and tier gauges read from the runtime at scrape time."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        capacity = GaugeMetricFamily(
            "gpufaas_device_capacity_bytes",
            "Model-cache capacity per device",
            labels=["device", "kind", "name"],
        )
        used = GaugeMetricFamily(
            "gpufaas_device_used_bytes", "Bytes of resident models", labels=["device"]
        )
        total = GaugeMetricFamily("gpufaas_device_total_bytes", "Device memory", labels=["device"])
        residents = GaugeMetricFamily(
            "gpufaas_device_resident_models", "Resident models", labels=["device"]
        )
        for d in self.runtime.devices.values():
            capacity.add_metric([d.info.id, d.info.kind, d.info.name], d.info.capacity_bytes)
            used.add_metric([d.info.id], d.cache.used_bytes)
            total.add_metric([d.info.id], d.info.total_bytes)
            residents.add_metric([d.info.id], len(d.cache))
        host = GaugeMetricFamily("gpufaas_host_tier_bytes", "Host tier bytes", labels=["kind"])
        host.add_metric(["capacity"], self.runtime.host.capacity_bytes)
        host.add_metric(["used"], self.runtime.host.used_bytes)
        yield from (capacity, used, total, residents, host)


def create_app(runtime: NodeRuntime, *, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="gpufaas GPU manager", version="v1alpha1")
    install_error_handlers(app)
    registry = CollectorRegistry()
    registry.register(_StateCollector(runtime))
    requests = Counter(
        "gpufaas_manager_requests",
        "Inference requests",
        ["model", "device", "cache"],
        registry=registry,
    )
    load_seconds = Histogram(
        "gpufaas_manager_load_seconds",
        "Time to make a model resident",
        ["device"],
        registry=registry,
    )
    add_metrics_route(app, registry)
    app.state.runtime = runtime

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/gpufaas/state")
    async def state() -> JSONResponse:
        return JSONResponse(json_safe(runtime.state()))

    @app.put("/v2/gpufaas/functions/{name}")
    async def put_function(name: str, request: Request) -> Response:
        body = await request.json()
        try:
            spec = parse_spec(body)
        except ManifestError as e:
            return error_response(400, str(e), reason="InvalidSpec")
        runtime.register(name, spec)
        return Response(status_code=204)

    @app.delete("/v2/gpufaas/functions/{name}")
    async def delete_function(name: str) -> Response:
        runtime.unregister(name)
        return Response(status_code=204)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        try:
            spec: InferenceFunctionSpec = runtime.spec(name)
            body = await read_body(request, max_bytes=limits.max_body_bytes)
            decoded = decode_request(body, header_length=header_length(request), limits=limits)
            arrays = validate_inputs(decoded, spec.inputs)
            outcome = await runtime.infer(
                name, list(arrays.values()), device_id=request.headers.get(DEVICE_HEADER)
            )
        except RuntimeFailure as e:
            return error_response(e.status, str(e), reason=e.reason)
        device_id = request.headers.get(DEVICE_HEADER) or "auto"
        requests.labels(name, device_id, "hit" if outcome.cache_hit else "miss").inc()
        if not outcome.cache_hit:
            load_seconds.labels(device_id).observe(outcome.load_ms / 1000)
        outputs = outcome.outputs
        if decoded.requested_outputs is not None:
            unknown = [o for o in decoded.requested_outputs if o not in outputs]
            if unknown:
                return error_response(
                    400,
                    f"unknown output(s) {unknown}; the model has {list(outputs)}",
                    reason="InvalidRequest",
                )
            outputs = {o: outputs[o] for o in decoded.requested_outputs}
        payload, headers = encode_response(
            model_name=name,
            model_version=None,
            request_id=decoded.id,
            outputs=outputs,
            binary=decoded.binary_outputs,
        )
        headers[CACHE_HEADER] = "hit" if outcome.cache_hit else "miss"
        headers[LOAD_MS_HEADER] = f"{outcome.load_ms:.3f}"
        headers[COMPUTE_MS_HEADER] = f"{outcome.compute_ms:.3f}"
        headers[MODEL_BYTES_HEADER] = str(outcome.size_bytes)
        return Response(payload, headers=headers)

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        try:
            device_id = await runtime.load(name, device_id=request.headers.get(DEVICE_HEADER))
        except RuntimeFailure as e:
            return error_response(e.status, str(e), reason=e.reason)
        return JSONResponse({"model": name, "device": device_id})

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        try:
            devices = runtime.unload(name, device_id=request.headers.get(DEVICE_HEADER))
        except RuntimeFailure as e:
            return error_response(e.status, str(e), reason=e.reason)
        return JSONResponse({"model": name, "unloaded_from": devices})

    return app
