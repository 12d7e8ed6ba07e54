"""Node-side prefetch and demotion, at the lowest priority, for the gateway's prefetch driver.

``POST PREFETCH_PATH`` ``{"model", "device", "size_bytes"}`` queues a load of ``model`` onto
``device`` ahead of a predicted request (202 ``{"queued": true, "ticket": n}``; 429 when the queue
is full); ``POST DEMOTE_PATH`` ``{"model", "device"}`` drops the device copy (the host tier keeps
the model, so a later miss copies from host memory).

``GET PREFETCH_PATH/<ticket>?wait_s=W`` answers a queued prefetch's outcome once it has one,
waiting up to ``W`` seconds (at most :data:`OUTCOME_WAIT_S`) for it: 200 ``{"result": ...}`` (an
outcome below), 202 ``{"result": null}`` if it has none yet, 404 for a ticket not known (the last
:data:`MAX_OUTCOMES` are kept), 400 for a malformed one. The gateway reads it so that its view
drops a prefetch the node dropped at once, not at its next sync.

A prefetch has the lowest priority: one runs at a time per node, in the background, and only
when, at its start, the device has no load in flight, no request in flight (for a CPU device: on
no CPU device of the node, since they share the host's cores) and enough free cache bytes for the
model (``size_bytes``) without evicting anything. A prefetch whose device is not quiet at its turn
waits for it to go quiet, holding the node's queue: it is woken when a request ends or a load
lands on the node, a request's load included (its commit, which runs in the background after the
request was answered; the runtime's ``on_settle``; no polling), starts as soon as the device is
quiet, and is dropped as ``busy`` if not started within ``wait_s`` (one gateway prefetch tick by
default; the gateway asks again on its next tick if the model is still wanted). One without
room is skipped at once (``no-room``). A request for the model during the prefetch uses
the copy under way. A request's load of *another* model on the same device preempts a prefetch
that has not begun copying (filling the host tier, claiming room): the prefetch is cancelled,
releasing what it held, and counted ``preempted``; the gateway asks again later. A copy already
under way finishes (a transfer cannot be paused). A failed prefetch (artifact gone, no room, any load error) is logged and
counted in ``gpufaas_manager_prefetch_total{result}``; it never reaches a request.

Precision is counted here too: ``gpufaas_manager_prefetch_used_total`` counts loaded prefetches
whose copy a request used on that device before it left (a request that joined the copy while it
was still loading counts); over ``gpufaas_manager_prefetch_total{result="loaded"}`` that is the
fraction of prefetches that paid off. A copy that left unused (demoted, or evicted: the model's
next request on that device had to load it again) is counted in
``gpufaas_manager_prefetch_unused_total{why}``; one evicted and never asked for there again is in
neither, so used / loaded is the precision and unused a lower bound of the waste.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from gpufaas.cache import Residency
from gpufaas.core import node
from gpufaas.core.http import error_response
from gpufaas.core.node import NodeState, PrefetchOutcome, PrefetchQueued

logger = logging.getLogger(__name__)

PREFETCH_PATH = node.PREFETCH
DEMOTE_PATH = node.DEMOTE
MAX_QUEUED = 64
WAIT_S = 5.0  # how long a prefetch waits for a quiet device: the gateway's prefetch tick
MAX_OUTCOMES = 256  # queued prefetches whose outcome can be asked for (the oldest forgotten)
OUTCOME_WAIT_S = 60.0  # the longest one ask for an outcome waits for it


class PrefetchRuntime(Protocol):
    """The part of the GPU manager's runtime API (CONTRACTS.md seam 1) a prefetch uses."""

    async def load(self, name: str, *, device_id: str | None) -> str: ...

    def on_load(self, listener: Callable[[str, str], None]) -> None: ...

    def on_use(self, listener: Callable[[str, str], None]) -> None: ...

    def on_settle(self, listener: Callable[[str], None]) -> None: ...

    def cancel_load(self, name: str, *, device_id: str) -> bool: ...

    def unload(self, name: str, *, device_id: str | None) -> list[str]: ...

    def state(self) -> NodeState: ...


@dataclasses.dataclass(frozen=True)
class PrefetchJob:
    model: str
    device: str
    size_bytes: int
    ticket: int = 0  # its number, to ask for its outcome (0: none)


def device_room(state: NodeState, device: str) -> tuple[bool, int] | None:
    """``(quiet, free cache bytes)`` of ``device``: quiet when no load is in flight there and
    no request is being served on it, or, for a CPU device, on any CPU device of the node (they
    compute on the same host cores; a CUDA device's neighbours have their own); None if the
    node has no such device."""
    try:
        row = state.device(device)
    except KeyError:
        return None
    loading = any(r.state is Residency.LOADING or r.arrived is False for r in row.residents)
    sharing = [d for d in state.devices if d.kind == "cpu"] if row.kind == "cpu" else [row]
    serving = any(d.outstanding for d in sharing)
    return not (loading or serving), row.free_cache_bytes


def holds(state: NodeState, device: str, model: str) -> bool:
    """Whether ``model`` is on ``device`` (resident or arriving)."""
    try:
        return any(r.model == model for r in state.device(device).residents)
    except KeyError:
        return False


class Prefetcher:
    """A bounded queue of prefetches run one at a time, and demotions run at once."""

    def __init__(
        self, runtime: PrefetchRuntime, *, registry: CollectorRegistry, wait_s: float = WAIT_S
    ) -> None:
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s!r}")
        self.runtime = runtime
        self.wait_s = wait_s
        # set when a request ends or a load lands on the node: a waiting prefetch looks again
        self._settled: asyncio.Event | None = None
        self.queue: asyncio.Queue[PrefetchJob] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.running: PrefetchJob | None = None
        self._preempted = False
        # prefetched copies (model, device) no request has used yet; the running prefetch's
        # key once a request joined it
        self.unused: set[tuple[str, str]] = set()
        self._joined: set[tuple[str, str]] = set()
        # the outcomes of the latest queued prefetches, by ticket
        self._outcomes: collections.OrderedDict[int, asyncio.Future[str]] = (
            collections.OrderedDict()
        )
        self._tickets = itertools.count(1)
        runtime.on_load(self._yield_to)
        runtime.on_use(self._used)
        runtime.on_settle(self._wake)
        self.results = Counter(
            "gpufaas_manager_prefetch",
            "Prefetches by outcome: loaded, busy (a load or request in flight throughout its wait),"
            " no-room, failed,"
            " dropped, preempted (a request's load came first), resident (already there)",
            ["result"],
            registry=registry,
        )
        self.demotions = Counter(
            "gpufaas_manager_demotions", "Device copies demoted to the host tier", registry=registry
        )
        self.used = Counter(
            "gpufaas_manager_prefetch_used",
            "Prefetched copies a request used on their device before they left it (precision:"
            " over prefetches loaded)",
            registry=registry,
        )
        self.wasted = Counter(
            "gpufaas_manager_prefetch_unused",
            "Prefetched copies that left their device before any request used them: demoted, or"
            " evicted (seen when the model's next request there had to load it again)",
            ["why"],
            registry=registry,
        )

    def submit(self, job: PrefetchJob) -> int | None:
        """Queue ``job``; its ticket (:meth:`outcome`), or None (counted as dropped) when the
        queue is full."""
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=MAX_QUEUED)
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work(self.queue))
        ticket = next(self._tickets)
        try:
            self.queue.put_nowait(dataclasses.replace(job, ticket=ticket))
        except asyncio.QueueFull:
            self.results.labels("dropped").inc()
            return None
        self._outcomes[ticket] = loop.create_future()
        while len(self._outcomes) > MAX_OUTCOMES:
            self._outcomes.popitem(last=False)
        return ticket

    async def outcome(self, ticket: int, *, wait_s: float) -> str | None:
        """The outcome of the prefetch queued as ``ticket`` once it has one, waiting up to
        ``wait_s`` for it (None if it has none by then); KeyError for a ticket not known."""
        found = self._outcomes[ticket]
        if not found.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(found), wait_s)
        return found.result() if found.done() else None

    async def _work(self, queue: asyncio.Queue[PrefetchJob]) -> None:
        while True:
            job = await queue.get()
            try:
                result = await self.run(job)
                self.results.labels(result).inc()
                self._settle(job, loaded=result == "loaded")
                found = self._outcomes.get(job.ticket)
                if found is not None and not found.done():
                    found.set_result(result)
            finally:
                queue.task_done()

    def _settle(self, job: PrefetchJob, *, loaded: bool) -> None:
        """After a prefetch: used already if a request joined it, else awaiting its first use."""
        key = (job.model, job.device)
        joined = key in self._joined
        self._joined.discard(key)
        if not loaded:
            return
        if joined:
            self.used.inc()
        else:
            self.unused.add(key)

    def _used(self, model: str, device: str) -> None:
        """A request holds ``model`` on ``device``."""
        key = (model, device)
        job = self.running
        if job is not None and (job.model, job.device) == key:
            self._joined.add(key)  # it joined the copy under way
        elif key in self.unused:
            self.unused.discard(key)
            self.used.inc()

    async def run(self, job: PrefetchJob) -> str:
        """One prefetch, now: its outcome (never raises)."""
        try:
            state = self.runtime.state()
            room = device_room(state, job.device)
            if room is None:
                logger.warning("prefetch of %s: no device %s on this node", job.model, job.device)
                return "failed"
            if holds(state, job.device, job.model):
                return "resident"  # a request loaded it first: nothing to prefetch
            quiet, free = room
            if not quiet:
                waited = await self._wait_quiet(job)
                if isinstance(waited, str) or waited is None:
                    return waited or "busy"
                free = waited
            if job.size_bytes <= 0 or free < job.size_bytes:
                return "no-room"
            self.running, self._preempted = job, False
            started = time.perf_counter()
            logger.info("prefetch of %s onto %s started", job.model, job.device)
            try:
                await self.runtime.load(job.model, device_id=job.device)
            finally:
                self.running = None
            logger.info(
                "prefetch of %s onto %s loaded in %.1f ms",
                job.model,
                job.device,
                (time.perf_counter() - started) * 1000,
            )
        except asyncio.CancelledError:
            if not self._preempted:
                raise  # the worker itself is being cancelled
            logger.info("prefetch of %s onto %s preempted by a request", job.model, job.device)
            return "preempted"
        except Exception as e:  # artifact gone, out of memory, unknown model: never a request's
            logger.warning("prefetch of %s onto %s failed: %s", job.model, job.device, e)
            return "failed"
        return "loaded"

    def _wake(self, _device: str) -> None:
        if self._settled is not None:
            self._settled.set()

    async def _wait_quiet(self, job: PrefetchJob) -> int | str | None:
        """Wait, at most ``wait_s``, for ``job``'s device to go quiet, looking again each time
        a request ends or a load lands on the node: its free bytes then, ``"resident"`` if a
        request loaded the model meanwhile, or None when the wait ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        settled = self._settled = asyncio.Event()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(settled.wait(), remaining)
                except TimeoutError:
                    return None
                settled.clear()
                state = self.runtime.state()
                if holds(state, job.device, job.model):
                    return "resident"
                room = device_room(state, job.device)
                if room is not None and room[0]:
                    return room[1]
        finally:
            self._settled = None

    def _yield_to(self, model: str, device: str) -> None:
        """A load of ``model`` started on ``device``: a prefetch of another model there that
        has not begun copying is cancelled (the request's load takes the link and the room)."""
        job = self.running
        if (model, device) in self.unused and (
            job is None or (job.model, job.device) != (model, device)
        ):
            # the model loads there again: the prefetched copy left before any request used it
            self.unused.discard((model, device))
            self.wasted.labels("evicted").inc()
        if job is None or job.device != device or job.model == model:
            return
        if self.runtime.cancel_load(job.model, device_id=job.device):
            self._preempted = True

    def demote(self, model: str, device: str) -> list[str]:
        dropped = self.runtime.unload(model, device_id=device)
        if dropped:
            self.demotions.inc()
        if (model, device) in self.unused:
            self.unused.discard((model, device))
            self.wasted.labels("demoted").inc()
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
        ticket = prefetcher.submit(PrefetchJob(body["model"], body["device"], size))
        if ticket is None:
            return JSONResponse(PrefetchQueued(queued=False).model_dump(), status_code=429)
        return JSONResponse(
            PrefetchQueued(queued=True, ticket=ticket).model_dump(), status_code=202
        )

    @app.get(PREFETCH_PATH + "/{ticket}")
    async def prefetch_outcome(ticket: str, wait_s: str = "0") -> Response:
        try:
            number, wait = int(ticket), float(wait_s)
        except ValueError:
            number, wait = -1, -1.0
        if number < 1 or not 0 <= wait <= OUTCOME_WAIT_S:
            return error_response(
                400,
                f"expected a ticket >= 1 and 0 <= wait_s <= {OUTCOME_WAIT_S:g}, got "
                f"{ticket!r} and {wait_s!r}",
                reason="InvalidRequest",
            )
        try:
            result = await prefetcher.outcome(number, wait_s=wait)
        except KeyError:
            return error_response(
                404, f"no prefetch ticket {number} (not issued, or forgotten)", reason="NotFound"
            )
        return JSONResponse(
            PrefetchOutcome(result=result).model_dump(),
            status_code=200 if result is not None else 202,
        )

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
