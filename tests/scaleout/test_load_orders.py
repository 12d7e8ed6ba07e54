"""Load orders at the GPU manager (forwarding ``decision``, gpu_manager/load_orders.py): the
placement owner orders a load as it answers a peer's question, and the peer's request joins it.

A real :class:`NodeRuntime` with CPU devices and a real example model, behind the manager's own
app (``create_app``, over httpx's ASGI transport). A copy is held on an event the test opens,
never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gpufaas.core.api import parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.examples import build_examples
from gpufaas.core.http import CACHE_HEADER, DEVICE_HEADER
from gpufaas.core.node import LOAD_ORDER
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager import load_orders
from gpufaas.gpu_manager.admission import DeviceAdmission
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.inventory import DeviceInfo, cpu_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app

DEVICE = "cpu:0"
MODELS = ("a", "b", "c")  # one artifact under three names


class HeldCopy(CpuBackend):
    """A CPU device whose copies run only once the test sets ``copying``; ``fail`` fails them."""

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.copying = threading.Event()
        self.copying.set()
        self.fail = False

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        if not self.copying.wait(60):
            raise TimeoutError("the test never let the copy run")
        if self.fail:
            raise OSError("simulated copy failure")
        super()._copy_group(dst, src, group, start, end)


@dataclass
class Node:
    runtime: NodeRuntime
    backend: HeldCopy
    admission: DeviceAdmission
    client: httpx.AsyncClient


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = build_examples(tmp_path_factory.mktemp("models"), names=("tiny-mlp",), progress=False)
    return built["tiny-mlp"]


def _runtime(artifact: Path, root: Path, *, device_memory: int) -> tuple[NodeRuntime, HeldCopy]:
    (info,) = cpu_devices(1, device_memory=device_memory)
    backend = HeldCopy(info)
    runtime = NodeRuntime(
        devices=[info],
        store=ArtifactStore(root / "artifacts"),
        host_capacity_bytes=1 << 30,
        backends={info.id: backend},
        prepare_on_register=False,
    )
    spec = parse_spec(
        {
            "model": {"uri": artifact.resolve().as_uri(), "format": "torchscript"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            "batching": {"maxBatchSize": 1},
        }
    )
    for name in MODELS:
        runtime.register(name, spec)
    return runtime, backend


@pytest.fixture
async def make_node(artifact: Path, tmp_path: Path) -> AsyncIterator[Callable[..., Node]]:
    """A node with one device that holds ``room`` of the models at once (2 by default)."""
    made: list[Node] = []
    probe, _ = _runtime(artifact, tmp_path / "probe", device_memory=1 << 30)
    await probe.load("a", device_id=DEVICE)
    await probe.settle()
    size = probe.state().device(DEVICE).residents[0].size_bytes

    def make(*, room: int = 2, concurrency: int = 4, token: str | None = None) -> Node:
        runtime, backend = _runtime(
            artifact, tmp_path / f"node{len(made)}", device_memory=size * room + size // 2
        )
        admission = DeviceAdmission(concurrency=concurrency)
        app = create_app(runtime, admission=admission, token=token)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m")
        made.append(Node(runtime, backend, admission, client))
        return made[-1]

    yield make
    for node in made:
        node.backend.copying.set()
        await node.runtime.settle()
        await node.client.aclose()


async def _infer(node: Node, model: str) -> httpx.Response:
    content, headers = encode_request({"x": (np.ones((1, 16), dtype=np.float32), "FP32")})
    return await node.client.post(
        f"/v2/models/{model}/infer", content=content, headers={**headers, DEVICE_HEADER: DEVICE}
    )


async def _order(node: Node, model: str, *, victims: tuple[str, ...] = ()) -> httpx.Response:
    body = {"model": model, "device": DEVICE, "victims": list(victims)}
    return await node.client.post(LOAD_ORDER, json=body)


async def _counts(node: Node) -> dict[str, float]:
    """The node's load orders by result, their claims by how, and requests by cache."""
    found: dict[str, float] = {}
    text = (await node.client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpufaas_manager_load_orders_total":
                found[sample.labels["result"]] = sample.value
            elif sample.name == "gpufaas_manager_load_order_claims_total":
                found[f"claim:{sample.labels['how']}"] = sample.value
            elif sample.name == "gpufaas_manager_requests_total":
                key = f"request:{sample.labels['cache']}"
                found[key] = found.get(key, 0.0) + sample.value
    return found


def _residents(node: Node) -> set[str]:
    return {r.model for r in node.runtime.state().device(DEVICE).residents}


async def _order_landed(node: Node, model: str, **victims: tuple[str, ...]) -> httpx.Response:
    """An order of ``model``, once its load's last step has run (landed and committed, or
    failed): the runtime's settle listeners are told, as a prefetch waiting for it is."""
    landed = asyncio.Event()
    node.runtime.on_settle(lambda _device: landed.set())
    ordered = await _order(node, model, **victims)
    await asyncio.wait_for(landed.wait(), 60)
    await node.runtime.settle()
    return ordered


async def _until(condition: Callable[[], bool], *, what: str) -> None:
    """Let the loop run until ``condition`` holds: bounded in loop turns, never in time."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} never happened")


async def test_a_request_joins_the_ordered_load_in_flight_and_the_model_loads_once(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    node.backend.copying.clear()  # the ordered copy stays under way until the request is in
    used = asyncio.Queue[str]()
    node.runtime.on_use(lambda model, _device: used.put_nowait(model))

    ordered = await _order(node, "a")
    assert ordered.status_code == 202 and ordered.json() == {"result": "started"}
    # The ordered load holds one of the device's slots while it loads (the cluster's bound).
    assert node.admission.running(DEVICE) == 1
    request = asyncio.create_task(_infer(node, "a"))
    assert await asyncio.wait_for(used.get(), 60) == "a"  # it holds the copy under way
    assert node.admission.running(DEVICE) == 2  # the request's slot, and the order's
    node.backend.copying.set()
    answer = await asyncio.wait_for(request, 60)
    await node.runtime.settle()

    assert answer.status_code == 200 and answer.headers[CACHE_HEADER] == "miss"
    assert [r.model for r in node.runtime.loads.recent] == ["a"]  # one load, the order's
    assert await _counts(node) == {"started": 1.0, "claim:joined": 1.0, "request:miss": 1.0}
    await _until(lambda: node.admission.running(DEVICE) == 0, what="the order's slot back")


async def test_a_request_after_the_ordered_load_landed_claims_it_as_landed(
    make_node: Callable[..., Node],
) -> None:
    """The manager counts that request a hit (it waited for no load), but the load was made
    for it: the claim says so, and the benchmark counts it a miss."""
    node = make_node()
    assert (await _order_landed(node, "a")).json() == {"result": "started"}
    answer = await _infer(node, "a")
    assert answer.status_code == 200 and answer.headers[CACHE_HEADER] == "hit"
    assert await _counts(node) == {"started": 1.0, "claim:landed": 1.0, "request:hit": 1.0}
    # Claimed once: the model's next request is a plain hit.
    await _infer(node, "a")
    assert (await _counts(node)).get("claim:landed") == 1.0


async def test_an_ordered_load_evicts_the_owners_victims_as_the_requests_own_load_would(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(room=2)
    for model in ("a", "b"):  # a is the least recently used: LRU alone would evict it
        assert (await _infer(node, model)).status_code == 200
    await node.runtime.settle()
    assert (await _order_landed(node, "c", victims=("b",))).json() == {"result": "started"}
    assert _residents(node) == {"a", "c"}


async def test_an_order_for_a_model_there_already_starts_nothing(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    assert (await _infer(node, "a")).status_code == 200
    await node.runtime.settle()
    assert (await _order(node, "a")).json() == {"result": "present"}
    assert [r.model for r in node.runtime.loads.recent] == ["a"]
    assert (await _counts(node)).get("present") == 1.0


async def test_an_order_on_a_device_with_no_free_slot_is_busy_and_starts_nothing(
    make_node: Callable[..., Node],
) -> None:
    """The device runs its bound already: the order starts nothing (the request, when it
    comes, waits for a slot and loads the model itself, as without an order)."""
    node = make_node(concurrency=1)
    slot = node.admission.take_now(DEVICE)
    assert slot is not None
    try:
        assert (await _order(node, "a")).json() == {"result": "busy"}
        assert node.runtime.devices[DEVICE].tier.current("a") is None
        assert node.admission.running(DEVICE) == 1
    finally:
        node.admission.release(slot)
    assert (await _counts(node)).get("busy") == 1.0


async def test_an_order_that_fails_never_fails_the_request_which_loads_it_itself(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    node.backend.fail = True
    assert (await _order_landed(node, "a")).json() == {"result": "started"}  # and failed
    assert _residents(node) == set()
    node.backend.fail = False
    answer = await _infer(node, "a")
    assert answer.status_code == 200 and answer.headers[CACHE_HEADER] == "miss"
    await node.runtime.settle()
    assert _residents(node) == {"a"}
    assert node.admission.running(DEVICE) == 0
    # The failed order's copy is not the one the request used: no claim of it.
    assert await _counts(node) == {"started": 1.0, "failed": 1.0, "request:miss": 1.0}


async def test_an_order_nobody_claims_leaves_the_model_loaded_and_is_counted(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asker gave up: the model stays loaded, as a prefetch's would, counted unclaimed;
    a later request for it is a plain hit, not a claim."""
    monkeypatch.setattr(load_orders, "CLAIM_S", 0.0)
    node = make_node()
    assert (await _order_landed(node, "a")).json() == {"result": "started"}
    for _ in range(1_000):  # until its claim window (0 s) has ended: loop turns, no clock
        if (await _counts(node)).get("claim:unclaimed"):
            break
    assert _residents(node) == {"a"}
    answer = await _infer(node, "a")
    assert answer.headers[CACHE_HEADER] == "hit"
    assert await _counts(node) == {"started": 1.0, "claim:unclaimed": 1.0, "request:hit": 1.0}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not a load order"),
        (b'{"device": "cpu:0"}', 400, "model"),
        (b'{"model": "a", "device": "cpu:0", "victims": "b"}', 400, "victims"),
        (b'{"model": "a", "device": "cpu:0", "extra": 1}', 400, "extra"),
        (b'{"model": "a", "device": "cpu:9"}', 400, "unknown device 'cpu:9'"),
        (b'{"model": "nope", "device": "cpu:0"}', 404, "unknown model 'nope'"),
    ],
)
async def test_a_bad_order_is_a_clear_error_and_starts_nothing(
    make_node: Callable[..., Node], body: bytes, status: int, says: str
) -> None:
    node = make_node()
    answer = await node.client.post(
        LOAD_ORDER, content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == status
    assert says in answer.json()["error"]
    assert not node.runtime.loads.recent
    assert node.admission.running(DEVICE) == 0


async def test_an_order_too_large_or_compressed_is_refused_before_it_is_read(
    make_node: Callable[..., Node],
) -> None:
    """Answered ahead of FastAPI (``LoadOrderFastPath``), with the body's bound of the node's
    other fast paths: 413 past 256 KiB, 415 for a compressed body."""
    node = make_node()
    huge = b'{"model": "a", "device": "cpu:0", "victims": ["' + b"v" * (300 << 10) + b'"]}'
    too_large = await node.client.post(
        LOAD_ORDER, content=huge, headers={"content-type": "application/json"}
    )
    assert too_large.status_code == 413
    compressed = await node.client.post(
        LOAD_ORDER,
        content=b'{"model": "a", "device": "cpu:0"}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert compressed.status_code == 415
    assert not node.runtime.loads.recent and node.admission.running(DEVICE) == 0


async def test_a_load_order_needs_the_nodes_token(make_node: Callable[..., Node]) -> None:
    node = make_node(token="secret")
    assert (await _order(node, "a")).status_code == 401
    authorised = await node.client.post(
        LOAD_ORDER,
        json={"model": "a", "device": DEVICE},
        headers={"Authorization": "Bearer secret"},
    )
    assert authorised.status_code == 202


async def test_a_request_that_joined_the_ordered_load_claims_it_as_joined_however_far_it_got(
    make_node: Callable[..., Node],
) -> None:
    """A request that found no copy started or joined the load (the manager counts it a miss),
    even if the copy had landed by the time it held it: its claim says ``joined``, never
    ``landed`` (which the benchmark would count a second time). The join is what
    ``DeviceLoads.join`` tells its listeners; here it is told as a request's join tells it,
    after the ordered copy landed, so that the rule is checked apart from the loop's timing."""
    node = make_node()
    assert (await _order_landed(node, "a")).json() == {"result": "started"}
    for listener in node.runtime.devices[DEVICE].loads.listeners:
        listener("a", "joined")  # a request's join of the load, as it starts
    assert (await _infer(node, "a")).status_code == 200
    counts = await _counts(node)
    assert counts.get("claim:joined") == 1.0 and "claim:landed" not in counts
