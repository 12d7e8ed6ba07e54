"""Node-side prefetch and demotion, at the lowest priority, for the gateway's prefetch driver.

``POST PREFETCH_PATH`` ``{"model", "device", "size_bytes"}`` queues a load of ``model`` onto
``device`` ahead of a predicted request; ``POST DEMOTE_PATH`` ``{"model", "device"}`` drops the
device copy (the host tier keeps the model, so a later miss copies from host memory).

A prefetch has the lowest priority: one runs at a time per node, in the background, and only
when, at its start, the device has no load in flight and enough free cache bytes for the model
(``size_bytes``) without evicting anything. Otherwise it is skipped (the gateway asks again on
its next tick if the model is still wanted). A request for the model during the prefetch uses
the copy under way. A request's load of *another* model on the same device preempts a prefetch
that has not begun copying (filling the host tier, claiming room): the prefetch is cancelled,
releasing what it held, and counted ``preempted``; the gateway asks again later. A copy already
under way finishes (a transfer cannot be paused). A failed prefetch (artifact gone, no room, any load error) is logged and
counted in ``gpufaas_manager_prefetch_total{result}``; it never reaches a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from gpufaas.cache import Residency
from gpufaas.core import node
from gpufaas.core.http import error_response
from gpufaas.core.node import NodeState

logger = logging.getLogger(__name__)

PREFETCH_PATH = node.PREFETCH
DEMOTE_PATH = node.DEMOTE
MAX_QUEUED = 64


class PrefetchRuntime(Protocol):
    """The part of the GPU manager's runtime API (CONTRACTS.md seam 1) a prefetch uses."""

    async def load(self, name: str, *, device_id: str | None) -> str: ...

    def on_load(self, listener: Callable[[str, str], None]) -> None: ...

    def cancel_load(self, name: str, *, device_id: str) -> bool: ...

    def unload(self, name: str, *, device_id: str | None) -> list[str]: ...

    def state(self) -> NodeState: ...


@dataclasses.dataclass(frozen=True)
class PrefetchJob:
    model: str
    device: str
    size_bytes: int


def device_room(state: NodeState, device: str) -> tuple[bool, int] | None:
    """``(quiet, free cache bytes)`` of ``device``: quiet when no load is in flight there;
    None if the node has no such device."""
    try:
        row = state.device(device)
    except KeyError:
        return None
    loading = any(r.state is Residency.LOADING or r.arrived is False for r in row.residents)
    return not loading, row.free_cache_bytes


class Prefetcher:
    """A bounded queue of prefetches run one at a time, and demotions run at once."""

    def __init__(self, runtime: PrefetchRuntime, *, registry: CollectorRegistry) -> None:
        self.runtime = runtime
        self.queue: asyncio.Queue[PrefetchJob] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.running: PrefetchJob | None = None
        self._preempted = False
        runtime.on_load(self._yield_to)
        self.results = Counter(
            "gpufaas_manager_prefetch",
            "Prefetches by outcome: loaded, busy (a load in flight), no-room, failed, dropped,"
            " preempted (a request's load came first)",
            ["result"],
            registry=registry,
        )
        self.demotions = Counter(
            "gpufaas_manager_demotions", "Device copies demoted to the host tier", registry=registry
        )

    def submit(self, job: PrefetchJob) -> bool:
        """Queue ``job``; False (counted as dropped) when the queue is full."""
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=MAX_QUEUED)
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work(self.queue))
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.results.labels("dropped").inc()
            return False
        return True

    async def _work(self, queue: asyncio.Queue[PrefetchJob]) -> None:
        while True:
            job = await queue.get()
            try:
                self.results.labels(await self.run(job)).inc()
            finally:
                queue.task_done()

    async def run(self, job: PrefetchJob) -> str:
        """One prefetch, now: its outcome (never raises)."""
        try:
            room = device_room(self.runtime.state(), job.device)
            if room is None:
                logger.warning("prefetch of %s: no device %s on this node", job.model, job.device)
                return "failed"
            quiet, free = room
            if not quiet:
                return "busy"
            if job.size_bytes <= 0 or free < job.size_bytes:
                return "no-room"
            self.running, self._preempted = job, False
            try:
                await self.runtime.load(job.model, device_id=job.device)
            finally:
                self.running = None
        except asyncio.CancelledError:
            if not self._preempted:
                raise  # the worker itself is being cancelled
            logger.info("prefetch of %s onto %s preempted by a request", job.model, job.device)
            return "preempted"
        except Exception as e:  # artifact gone, out of memory, unknown model: never a request's
            logger.warning("prefetch of %s onto %s failed: %s", job.model, job.device, e)
            return "failed"
        return "loaded"

    def _yield_to(self, model: str, device: str) -> None:
        """A load of ``model`` started on ``device``: a prefetch of another model there that
        has not begun copying is cancelled (the request's load takes the link and the room)."""
        job = self.running
        if job is None or job.device != device or job.model == model:
            return
        if self.runtime.cancel_load(job.model, device_id=job.device):
            self._preempted = True

    def demote(self, model: str, device: str) -> list[str]:
        dropped = self.runtime.unload(model, device_id=device)
        if dropped:
            self.demotions.inc()
        return dropped


async def _json_body(request: Request) -> dict[str, Any] | Response:
    try:
        body = await request.json()
    except ValueError as e:
        return error_response(400, f"the body is not JSON: {e}", reason="InvalidRequest")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return error_response(
            400, 'expected a JSON object with "model" and "device"', reason="InvalidRequest"
        )
    if not isinstance(body.get("device"), str):
        return error_response(400, '"device" must be a device id string', reason="InvalidRequest")
    return body


def add_prefetch_routes(
    app: FastAPI, runtime: PrefetchRuntime, *, registry: CollectorRegistry
) -> Prefetcher:
    prefetcher = Prefetcher(runtime, registry=registry)

    @app.post(PREFETCH_PATH)
    async def prefetch(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        size = body.get("size_bytes", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return error_response(
                400, '"size_bytes" must be an integer >= 0', reason="InvalidRequest"
            )
        queued = prefetcher.submit(PrefetchJob(body["model"], body["device"], size))
        return JSONResponse({"queued": queued}, status_code=202 if queued else 429)

    @app.post(DEMOTE_PATH)
    async def demote(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        try:
            dropped = prefetcher.demote(body["model"], body["device"])
        except Exception as e:  # an unknown device: a clear 400, never a traceback
            return error_response(400, str(e), reason="InvalidRequest")
        return JSONResponse({"model": body["model"], "demoted_from": dropped})

    return prefetcher
