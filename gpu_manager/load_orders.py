"""Loads ordered ahead of a request (scale-out #16, forwarding ``decision``; docs/scheduling.md,
"Scale-out", step 4): the placement owner orders the load as it answers a peer's question, and
the peer's request, one hop later, joins that load in flight.

``POST LOAD_ORDER`` (:class:`~gpufaas.core.node.LoadOrder`: model, device, victims) starts
loading ``model`` onto ``device`` at once, evicting ``victims`` first if room must be made, as
the request's own load would, through the device's one load per model
(:meth:`DeviceLoads.join <gpufaas.gpu_manager.device_loads.DeviceLoads.join>`): a request that
arrives while it loads joins it (or uses the copy under way), and never starts a second one. The
answer is 202 :class:`~gpufaas.core.node.LoadOrderTaken`, at once:

- ``started``: the load is under way. It holds one of the device's admission slots
  (:class:`~gpufaas.gpu_manager.admission.DeviceAdmission`, the cluster-wide bound) from the
  order until its copy has landed, so a device never runs more than its bound, loads included;
- ``present``: the model is resident or arriving there already (or an order for it is
  pending): nothing is started;
- ``busy``: the device has no free slot now (or requests wait for one): nothing is started, and
  the request loads it itself, as without an order.

An order is never the request: a load it starts that fails is logged and counted (``failed``),
and the request, arriving after, starts a load of its own (one that joined it meanwhile shares
its outcome, as it would share any load's). Bad input is a clear error, never a 500: a body
that is not a load order, or an unknown device, 400; an unknown model, 404.

**Whose miss.** The request an order was for is the one that would have loaded the model. The
first request to use the model on that device after the order (``gpufaas_manager_load_order_claims
_total{how}``) *claims* it: ``joined`` when the ordered copy had not landed yet (the manager
counts that request a miss, as it waited for a load), ``landed`` when it had (the manager counts
it a hit, although the load was made for it: a benchmark adds these to the managers' misses).
An order that no request claims within :data:`CLAIM_S` (its asker gave up, or sent the request
elsewhere) leaves the model loaded, as a prefetch would, and is counted ``unclaimed``; so is one
whose copy left the device before any request used it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufaas.core import node
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.http import error_response, match_fast_post
from gpufaas.core.node import LoadOrder, LoadOrderTaken
from gpufaas.core.protocol import ProtocolError
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.chain import RuntimeFailure
from gpufaas.gpu_manager.device_loads import LoadJoin
from gpufaas.gpu_manager.device_memory import as_model
from gpufaas.gpu_manager.device_tier import DeviceTier
from gpufaas.gpu_manager.loader import DeviceModel
from gpufaas.gpu_manager.runtime import NodeRuntime

__all__ = ["CLAIM_S", "LoadOrderFastPath", "LoadOrders", "add_load_order_routes", "answer_order"]

logger = logging.getLogger(__name__)

# How long an ordered load waits to be claimed by a request before it counts as unclaimed (the
# longest a placement question is held: the asker's request comes well within it).
CLAIM_S = 30.0
_ORDER_PATH = re.compile("^" + re.escape(node.LOAD_ORDER) + "$")
_MAX_ORDER_BYTES = 256 << 10


@dataclass(eq=False)
class _Order:
    """One order pending its request: its copy once the load is under way."""

    copy: DeviceModel | None = None
    timer: asyncio.TimerHandle | None = None
    joined: bool = False  # a request joined its load as it started (the manager's miss)


class LoadOrders:
    """The node's load orders: started, pending their request, claimed or not."""

    def __init__(
        self,
        runtime: NodeRuntime,
        *,
        admission: DeviceAdmission,
        registry: CollectorRegistry,
        claim_s: float = CLAIM_S,
    ) -> None:
        self.runtime = runtime
        self.admission = admission
        self.claim_s = claim_s
        self._pending: dict[tuple[str, str], _Order] = {}  # (device, model) -> its order
        self._landing: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.results = Counter(
            "gpufaas_manager_load_orders",
            "Load orders by result: started, present (nothing to load), busy (no free slot: "
            "not started), failed (started, and the load failed)",
            ["result"],
            registry=registry,
        )
        self.claims = Counter(
            "gpufaas_manager_load_order_claims",
            "Started load orders by how their request found the copy: joined (still loading: "
            "counted a miss), landed (loaded: counted a hit, though loaded for it), unclaimed",
            ["how"],
            registry=registry,
        )
        runtime.on_use(self._used)
        for device_id, device in runtime.devices.items():
            device.loads.listeners.append(functools.partial(self._joining, device_id))
            device.loads.landed.append(functools.partial(self._landed, device_id))

    def take(self, order: LoadOrder) -> str:
        """Start ``order``'s load (in the background) if it is to be started; its result
        (``started``, ``present``, ``busy``). Raises :class:`RuntimeFailure` for an unknown
        model (404) or device (400)."""
        spec = self.runtime.spec(order.model)
        device = self.runtime.device(order.device)
        key = (order.device, order.model)
        if key in self._pending or device.tier.current(order.model) is not None:
            self.results.labels("present").inc()
            return "present"
        slot = self.admission.take_now(order.device)
        if slot is None:
            self.results.labels("busy").inc()
            return "busy"
        pending = self._pending[key] = _Order()
        loop = asyncio.get_running_loop()
        pending.timer = loop.call_later(self.claim_s, self._unclaimed, key, pending)
        try:
            task = loop.create_task(self._load(key, pending, device, spec, order.victims))
        except BaseException:
            self.admission.release(slot)
            raise
        task.add_done_callback(lambda _: self.admission.release(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.results.labels("started").inc()
        return "started"

    async def _load(
        self,
        key: tuple[str, str],
        pending: _Order,
        device: DeviceTier,
        spec: InferenceFunctionSpec,
        victims: Sequence[str],
    ) -> None:
        """The ordered load, as a request's would start it; done (its slot given back) once
        its copy has landed or failed."""
        model = key[1]
        try:
            copy = await device.loads.join(model, spec, prefer=victims)
        except Exception as e:  # never the request's failure: it loads the model itself
            logger.info("a load order of %s onto %s failed: %s", model, key[0], e)
            self.results.labels("failed").inc()
            self._forget(key, pending)
            return
        pending.copy = copy
        if not (copy.arrived or copy.error is not None):
            landing = self._landing[key] = asyncio.get_running_loop().create_future()
            try:
                await landing  # DeviceLoads.landed: the copy's last step has run
            finally:
                if self._landing.get(key) is landing:
                    del self._landing[key]
        if copy.error is not None:  # its copy failed: the request, if it comes, loads anew
            logger.info("a load order of %s onto %s failed: %s", model, key[0], copy.error)
            self.results.labels("failed").inc()
            self._forget(key, pending)

    def _landed(self, device_id: str, model: str) -> None:
        landing = self._landing.get((device_id, model))
        if landing is not None and not landing.done():
            landing.set_result(None)

    def _joining(self, device_id: str, model: str, how: LoadJoin) -> None:
        """A caller starts or joins a load of ``model`` on ``device_id`` (it found no copy
        there: a request doing so is counted a miss). While an order is pending there, a
        caller that joins the load under way means a request's miss counts that load already
        (the joining request's, or, when the order joined a load a request started, that
        request's): the order's claim is then ``joined``. The order's own start is told as
        ``started``, never as a join (:meth:`DeviceLoads.join
        <gpufaas.gpu_manager.device_loads.DeviceLoads.join>` says which)."""
        if how != "joined":
            return
        pending = self._pending.get((device_id, model))
        if pending is not None:
            pending.joined = True

    def _used(self, model: str, device_id: str) -> None:
        """A request holds ``model`` on ``device_id``: it claims a pending order there."""
        key = (device_id, model)
        pending = self._pending.get(key)
        if pending is None:
            return
        self._forget(key, pending)
        copy = pending.copy
        if pending.joined or copy is None:  # it joined the ordered load as it started
            self.claims.labels("joined").inc()
            return
        current = as_model(self.runtime.devices[device_id].tier.current(model))
        if current is not copy:  # the ordered copy left before any request used it
            self.claims.labels("unclaimed").inc()
        elif copy.arrived or (
            copy.error is None and (copy.transfer is None or copy.transfer.landed())
        ):  # as the request found it (DeviceTier._present): resident, or every byte landed
            self.claims.labels("landed").inc()
        else:
            self.claims.labels("joined").inc()

    def _unclaimed(self, key: tuple[str, str], pending: _Order) -> None:
        if self._pending.get(key) is pending:
            self._forget(key, pending)
            self.claims.labels("unclaimed").inc()

    def _forget(self, key: tuple[str, str], pending: _Order) -> None:
        if self._pending.get(key) is pending:
            del self._pending[key]
        if pending.timer is not None:
            pending.timer.cancel()


def add_load_order_routes(
    app: FastAPI,
    runtime: NodeRuntime,
    *,
    admission: DeviceAdmission,
    registry: CollectorRegistry,
) -> LoadOrders:
    """``POST LOAD_ORDER`` on ``app`` (for its API docs; :class:`LoadOrderFastPath` answers it
    ahead of FastAPI); the orders."""
    orders = LoadOrders(runtime, admission=admission, registry=registry, claim_s=CLAIM_S)

    @app.post(node.LOAD_ORDER, status_code=202)
    async def load_order(request: Request) -> Response:
        return answer_order(orders, await request.body())

    return orders


def answer_order(orders: LoadOrders, body: bytes) -> Response:
    """The answer to one load order's body: 202 with its result, or a clear error (a body
    that is not a load order, or an unknown device: 400; an unknown model: 404)."""
    try:
        order = LoadOrder.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        return error_response(400, f"not a load order: {problems}", reason="InvalidRequest")
    try:
        result = orders.take(order)
    except RuntimeFailure as e:
        return error_response(e.status, str(e), reason=e.reason)
    return JSONResponse(LoadOrderTaken(result=result).model_dump(), status_code=202)


class LoadOrderFastPath:
    """``POST LOAD_ORDER`` answered as a bare ASGI app, ahead of FastAPI's routing and
    ``Request`` (an order is on a miss's path at the node); anything else goes on to ``app``.
    Behind the node's token like every node path (it sits inside the token check)."""

    def __init__(self, app: ASGIApp, orders: LoadOrders) -> None:
        self.app = app
        self.orders = orders

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = match_fast_post(scope, receive, path=_ORDER_PATH, max_bytes=_MAX_ORDER_BYTES)
        if post is None:
            await self.app(scope, receive, send)
            return
        try:
            response = answer_order(self.orders, await post.read())
        except ProtocolError as e:  # too large, compressed, or cut short
            response = error_response(e.status_code, str(e), reason="InvalidRequest")
        await response(scope, receive, send)
