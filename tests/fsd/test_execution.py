"""Sharded execution matches the unsharded reference; deadlines, request ids and overlap."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import threading
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufaas.core.channels import (
    Envelope,
    LocalChannel,
    Mailbox,
    ShardTimeout,
)
from gpufaas.core.layered import Layer, LayeredNet, dense_mlp, load_shard, radix_net, save_shard
from gpufaas.gpu_manager.shards import ShardExecutor
from gpufaas.scheduler.partition import partition, split

RunSplit = Callable[..., Awaitable[np.ndarray]]


@pytest.fixture(scope="module")
def sparse_net() -> Any:
    return radix_net(1024, 16, weights="random", seed=1)


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return (np.random.default_rng(0).random((6, 1024)) < 0.3).astype(np.float32)


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("method", ["hypergraph", "random", "block", "layer"])
async def test_sharded_output_matches_the_reference(
    sparse_net: Any, inputs: np.ndarray, shards: int, method: str, run_split: RunSplit
) -> None:
    reference = sparse_net.forward(inputs)
    assert np.abs(reference).max() > 0.01  # the net does not collapse to zeros
    sharded = await run_split(sparse_net, shards, method, inputs)
    np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [2, 4])
async def test_challenge_weights_with_clipping_match_the_reference(
    inputs: np.ndarray, shards: int, run_split: RunSplit
) -> None:
    net = radix_net(1024, 12)  # weights 1/16, bias -0.3, outputs clipped at 32
    reference = net.forward(inputs)
    sharded = await run_split(net, shards, "hypergraph", inputs)
    # Values grow to ~30 over 12 layers: float32 sums in another order differ by ~1e-4.
    np.testing.assert_allclose(sharded, reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("shards", "method"), [(2, "block"), (4, "block"), (2, "layer")])
async def test_a_dense_mlp_splits_too(shards: int, method: str, run_split: RunSplit) -> None:
    mlp = dense_mlp([96, 128, 64, 10], seed=2)
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(
        await run_split(mlp, shards, method, x), mlp.forward(x), rtol=1e-4, atol=1e-5
    )


def test_a_shard_artifact_round_trips(tmp_path: Any, sparse_net: Any) -> None:
    spec = split(sparse_net, partition(sparse_net, 4, method="block"))[2]
    save_shard(tmp_path / "s.safetensors", spec)
    again = load_shard(tmp_path / "s.safetensors")
    assert (again.shard, again.shards, again.widths) == (2, 4, spec.widths)
    for a, b in zip(spec.layers, again.layers, strict=True):
        np.testing.assert_array_equal(a.owned, b.owned)
        np.testing.assert_array_equal(a.own.values, b.own.values)
        assert sorted(a.send) == sorted(b.send)
        assert sorted(a.remote) == sorted(b.remote)


class _Recording(LocalChannel):
    """A local channel with a list for the test to note events in."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []


def _mostly_local_net() -> LayeredNet:
    """8 neurons, 3 layers, split in halves: layers 0 and 2 read nothing across the halves,
    layer 1 reads neurons 0 and 4 across, so layer 0 has boundary and interior rows."""
    rng = np.random.default_rng(3)
    pairs = np.arange(8) ^ 1  # a neighbour in the same half

    def layer(extra_rows: list[int], extra_cols: list[int], *, base: np.ndarray) -> Layer:
        rows = np.concatenate([np.arange(8), np.arange(8), extra_rows]).astype(np.int64)
        cols = np.concatenate([np.arange(8), base, extra_cols]).astype(np.int64)
        values = rng.standard_normal(rows.size).astype(np.float32)
        return Layer(8, 8, rows, cols, values, rng.standard_normal(8).astype(np.float32))

    return LayeredNet((layer([], [], base=pairs), layer([0, 4], [4, 0], base=pairs),
                       layer([], [], base=pairs)))  # fmt: skip


@pytest.mark.parametrize("where", ["loop", "worker"])
async def test_boundary_rows_are_sent_before_the_interior_rows_are_computed(where: str) -> None:
    """Overlap: a shard hands layer l's boundary rows to the channel before it finishes its
    interior rows, in layers that read remote values ("loop": a radix net split in blocks;
    finished in the trip after their remote parts arrive) and in runs of layers that read
    nothing remote ("worker")."""
    if where == "loop":
        net, shards = radix_net(256, 8, weights="random"), 4
    else:
        net, shards = _mostly_local_net(), 2
    specs = split(net, partition(net, shards, method="block"))
    channel = _Recording()
    executors = []
    for spec in specs:
        mailbox = Mailbox()
        await channel.attach("net", spec.shard, mailbox)
        executors.append(ShardExecutor(spec, set_name="net", channel=channel, mailbox=mailbox))
    groups = {
        id(g): (e.spec.shard, layer, rank)
        for e in executors
        for layer, op in enumerate(e.ops)
        for rank, g in enumerate(op.groups)
    }
    original = ShardExecutor._finish
    original_send = ShardExecutor._hand_over
    lock = threading.Lock()

    def noting(self: ShardExecutor, out: Any, g: Any, z: Any, activation: str) -> Any:
        with lock:
            channel.events.append(("finish", *groups[id(g)]))
        return original(self, out, g, z, activation)

    def handing_over(
        self: ShardExecutor, request_id: str, layer: int, *args: Any, **kwargs: Any
    ) -> Any:
        with lock:  # the moment the values are handed to the channel
            channel.events.append(("send", self.spec.shard, layer))
        return original_send(self, request_id, layer, *args, **kwargs)

    ShardExecutor._finish = noting  # type: ignore[method-assign]
    ShardExecutor._hand_over = handing_over  # type: ignore[method-assign]
    try:
        x = np.ones((2, net.widths[0]), dtype=np.float32)
        await asyncio.gather(
            *(
                e.run("r", x.T[s.inputs], timeout_s=30)
                for e, s in zip(executors, specs, strict=False)
            )
        )
    finally:
        ShardExecutor._finish = original  # type: ignore[method-assign]
        ShardExecutor._hand_over = original_send  # type: ignore[method-assign]
        for e in executors:
            e.close()
    events: list[Any] = channel.events
    checked = 0
    for e in executors:
        p = e.spec.shard
        for layer, op in enumerate(e.ops):
            if len(op.groups) == 2 and op.send_next and bool(op.sources) == (where == "loop"):
                first_send = events.index(("send", p, layer + 1))
                interior_done = events.index(("finish", p, layer, 1))
                assert first_send < interior_done, (p, layer)
                checked += 1
    assert checked > 0, f"no layer with boundary and interior rows computed on the {where}"


async def test_a_silent_peer_ends_the_request_at_the_deadline_naming_it(sparse_net: Any) -> None:
    specs = split(sparse_net, partition(sparse_net, 2, method="block"))
    channel = LocalChannel()
    mailboxes = [Mailbox(), Mailbox()]
    for spec, mailbox in zip(specs, mailboxes, strict=True):
        await channel.attach("net", spec.shard, mailbox)
    only = ShardExecutor(specs[0], set_name="net", channel=channel, mailbox=mailboxes[0])
    try:
        with pytest.raises(ShardTimeout, match=r"shard 1 of net sent no layer-0 activations"):
            await asyncio.wait_for(
                only.run("r", np.ones((1024 // 2, 2), np.float32), timeout_s=30, stall_s=0.3),
                timeout=20,
            )
    finally:
        only.close()


async def test_messages_of_an_older_request_never_mix_into_a_newer_one() -> None:
    mailbox = Mailbox()
    old = Envelope("net", "old", 3, 1, 0)
    new = Envelope("net", "new", 3, 1, 0)
    mailbox.open("old")
    mailbox.close("old")
    mailbox.open("new")
    assert not mailbox.deliver(old, np.full((2, 1), 7.0, np.float32))  # stale: dropped
    assert mailbox.dropped_stale == 1
    assert mailbox.deliver(new, np.full((2, 1), 1.0, np.float32))
    got = await mailbox.take("new", 3, 1, timeout_s=1, channel="local", set_name="net")
    assert got.tolist() == [[1.0], [1.0]]


async def test_a_message_before_its_request_waits_and_expires_unclaimed() -> None:
    mailbox = Mailbox(early_ttl_s=0.05)
    early = Envelope("net", "later", 1, 1, 0)
    assert mailbox.deliver(early, np.zeros((1, 1), np.float32))
    mailbox.open("later")
    assert (await mailbox.take("later", 1, 1, timeout_s=1, channel="l", set_name="net")).size == 1
    orphan = Envelope("net", "never", 1, 1, 0)
    mailbox.deliver(orphan, np.zeros((1, 1), np.float32))
    await asyncio.sleep(0.1)
    mailbox.deliver(Envelope("net", "other", 1, 1, 0), np.zeros((1, 1), np.float32))
    assert not mailbox.deliver(orphan, np.zeros((1, 1), np.float32))  # expired: now stale


async def test_chunked_messages_reassemble_in_order() -> None:
    from gpufaas.core.channels import chunked

    mailbox = Mailbox()
    mailbox.open("r")
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    parts = chunked(Envelope("net", "r", 2, 1, 0), values, 3 * 16)
    assert len(parts) == 4
    for envelope, chunk in reversed(parts):
        mailbox.deliver(envelope, chunk)
    got = await mailbox.take("r", 2, 1, timeout_s=1, channel="nats", set_name="net")
    np.testing.assert_array_equal(got, values)


@st.composite
def _nets_and_splits(draw: st.DrawFn) -> tuple[LayeredNet, int, str]:
    width = draw(st.integers(4, 20))
    depth = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    density = draw(st.floats(0.05, 0.7))
    layers = []
    for index in range(depth):
        rows, cols = np.nonzero(rng.random((width, width)) < density)
        layers.append(
            Layer(
                width, width, rows.astype(np.int64), cols.astype(np.int64),
                rng.uniform(-1, 1, rows.size).astype(np.float32),
                rng.uniform(-0.5, 0.5, width).astype(np.float32),
                "none" if index == depth - 1 else "relu",
            )
        )  # fmt: skip
    method = draw(st.sampled_from(["random", "block", "layer"]))
    shards = draw(st.integers(1, min(4, depth) if method == "layer" else 4))
    return LayeredNet(tuple(layers)), shards, method


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_nets_and_splits(), batch=st.integers(1, 3))
def test_any_split_of_any_sparse_net_matches_the_reference(
    case: tuple[LayeredNet, int, str], batch: int, run_split: RunSplit
) -> None:
    net, shards, method = case
    x = np.random.default_rng(batch).standard_normal((batch, net.widths[0])).astype(np.float32)
    sharded = asyncio.run(run_split(net, shards, method, x))
    np.testing.assert_allclose(sharded, net.forward(x), rtol=1e-5, atol=1e-5)


async def test_a_shard_computes_on_its_device_backend_in_its_compute_context(
    sparse_net: Any, tmp_path: Any
) -> None:
    """The executor takes the device layer's path (gpu_manager/devices.py): its weights live on
    the backend's device and every multiply runs inside ``backend.compute()`` (a CUDA stream
    on a GPU). On this machine the backend is a CPU stand-in; the routing is the same."""
    from gpufaas.gpu_manager.devices import CpuBackend
    from gpufaas.gpu_manager.inventory import cpu_devices

    entered = []

    class Recording(CpuBackend):
        def compute(self) -> Any:
            entered.append(threading.get_ident())
            return super().compute()

    backend = Recording(cpu_devices(1, device_memory=1 << 20)[0])
    specs = split(sparse_net, partition(sparse_net, 2, method="block"))
    channel = LocalChannel()
    executors = []
    for spec in specs:
        mailbox = Mailbox()
        await channel.attach("net", spec.shard, mailbox)
        executors.append(
            ShardExecutor(spec, set_name="net", channel=channel, mailbox=mailbox, backend=backend)
        )
    x = np.random.default_rng(1).random((3, sparse_net.widths[0])).astype(np.float32)
    try:
        outs = await asyncio.gather(
            *(
                e.run("r", x.T[s.inputs], timeout_s=30)
                for e, s in zip(executors, specs, strict=True)
            )
        )
    finally:
        for e in executors:
            e.close()
    y = np.zeros((sparse_net.widths[-1], 3), dtype=np.float32)
    for spec, out in zip(specs, outs, strict=True):
        y[spec.outputs] = out
    np.testing.assert_allclose(y.T, sparse_net.forward(x), rtol=1e-5, atol=1e-5)
    assert entered and threading.get_ident() not in entered  # in the workers, never the loop
    assert all(g.own.device == backend.device for e in executors for op in e.ops for g in op.groups)


@settings(max_examples=40, deadline=None)
@given(
    row_tiles=st.integers(1, 6),
    col_tiles=st.integers(1, 6),
    fill=st.floats(0.5, 1.0),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_dense_tile_products_equal_csr_products(
    row_tiles: int, col_tiles: int, fill: float, batch: int, seed: int
) -> None:
    """Any matrix of whole 16 x 16 tiles, tile rows of different lengths (padded) and tiles
    in any order, multiplies like the CSR form the reference uses."""
    from gpufaas.core.layered import TILE, TiledMatrix, matrix, tiled

    rng = np.random.default_rng(seed)
    present = rng.random((row_tiles, col_tiles)) < fill
    present[rng.integers(row_tiles), rng.integers(col_tiles)] = True
    tr, tc = np.nonzero(present)
    order = rng.permutation(tr.size)  # COO entries in any order
    local = np.arange(TILE)
    rows = (tr[order, None, None] * TILE + local[None, :, None]).repeat(TILE, axis=2).ravel()
    cols = (tc[order, None, None] * TILE + local[None, None, :]).repeat(TILE, axis=1).ravel()
    values = rng.standard_normal(rows.size).astype(np.float32)
    shape = (row_tiles * TILE, col_tiles * TILE)
    found = tiled(rows.astype(np.int64), cols.astype(np.int64), values, shape)
    if present.any(axis=1).sum() * present.sum(axis=1).max() > 2 * present.sum():
        assert found is None  # too much padding: CSR
        return
    assert isinstance(found, TiledMatrix)
    a = torch.from_numpy(rng.standard_normal((shape[1], batch)).astype(np.float32))
    expected = matrix(rows.astype(np.int64), cols.astype(np.int64), values, shape) @ a
    np.testing.assert_allclose((found @ a).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_splits_that_keep_the_blocks_whole_run_as_tiles_and_the_rest_as_csr(
    sparse_net: Any,
) -> None:
    """Block and hypergraph splits of a RadiX-Net keep its 16 x 16 blocks whole, so their
    products run as dense tiles (which the allclose tests above then check); a random split
    cuts them and stays on CSR (as do products with no weights at all)."""
    from gpufaas.core.layered import TiledMatrix
    from gpufaas.gpu_manager.shards import prepare

    def kinds(method: str) -> set[type]:
        spec = split(sparse_net, partition(sparse_net, 2, method=method, seed=0))[0]
        groups = [g for op in prepare(spec, torch.device("cpu")) for g in op.groups]
        products = [g.own for g in groups] + [m for g in groups for m in g.remote.values()]
        return {type(m) for m in products if not (isinstance(m, torch.Tensor) and m.is_sparse_csr
                                                 and m.values().numel() == 0)}  # fmt: skip

    assert kinds("hypergraph") == {TiledMatrix}
    assert kinds("block") == {TiledMatrix}
    assert TiledMatrix not in kinds("random")


def test_a_hand_over_of_one_range_of_rows_is_a_view_and_of_any_other_a_gather() -> None:
    """Send positions that are one range (a hypergraph split's boundary rows, first and in
    order) hand over a view of the layer's output, with no copy; others gather their rows."""
    from gpufaas.core.channels import LocalChannel, Mailbox
    from gpufaas.gpu_manager.shards import ShardExecutor, _positions

    cpu = torch.device("cpu")
    assert _positions(np.arange(3, 9), cpu) == slice(3, 9)
    scattered = _positions(np.array([0, 2, 5]), cpu)
    assert isinstance(scattered, torch.Tensor)
    net = radix_net(64, 2, weights="random", seed=1)
    spec = split(net, partition(net, 2, method="block"))[0]
    executor = ShardExecutor(spec, set_name="s", channel=LocalChannel(), mailbox=Mailbox())
    try:
        values = torch.arange(40, dtype=torch.float32).reshape(10, 4)
        (_, ranged, here), (_, gathered, _) = executor._hand_over(
            "r", 1, values, {1: slice(3, 9), 2: scattered}
        )
        assert here is None  # no shard on this node: through the channel, on the host
        assert isinstance(ranged, np.ndarray) and isinstance(gathered, np.ndarray)
        assert np.shares_memory(ranged, values.numpy())
        np.testing.assert_array_equal(ranged, values.numpy()[3:9])
        assert not np.shares_memory(gathered, values.numpy())
        np.testing.assert_array_equal(gathered, values.numpy()[[0, 2, 5]])
    finally:
        executor.close()


async def test_a_request_whose_trip_the_closing_executor_drops_fails_at_once() -> None:
    """The loop does not wait on each trip (it queues them and waits once for the request's
    end), so a trip the executor drops unrun when it closes must fail its request: without
    that, a request with no remote parts to time out on would wait forever."""
    net = radix_net(64, 2, weights="random", seed=1)
    (spec,) = split(net, partition(net, 1, method="block"))
    executor = ShardExecutor(spec, set_name="s", channel=LocalChannel(), mailbox=Mailbox())
    release = threading.Event()
    executor._pool.submit(release.wait, 10)  # the worker is busy: the request's trip queues
    try:
        running = asyncio.ensure_future(
            executor.run("r", np.zeros((64, 2), np.float32), timeout_s=30)
        )
        await asyncio.sleep(0.05)
        executor.close()  # drops the queued trip
        with pytest.raises(ExceptionGroup) as failed:  # the run's task group carries it
            await asyncio.wait_for(running, 2)
        assert failed.group_contains(RuntimeError, match="closed before its request ended")
    finally:
        release.set()


def _openmp_threads() -> Callable[[], int]:
    """The calling thread's OpenMP thread count (``omp_get_max_threads`` of the OpenMP runtime
    torch loaded into this process)."""
    try:
        count = ctypes.CDLL(None).omp_get_max_threads
    except AttributeError:
        pytest.skip("no OpenMP runtime in this process's global symbols (torch without OpenMP)")
    count.restype = ctypes.c_int
    return cast(Callable[[], int], count)


def test_a_shards_worker_thread_multiplies_with_the_processs_thread_count() -> None:
    """The sixteenth session's anomaly (N = 4 random on 1,024 x 120: one request 7-16 s, four
    at once 0.35 s): OpenMP's thread count is per thread and a new thread starts at one per
    core, so a shard's worker ran MKL's CSR products as a team of two on a process set to one
    thread, and on a shared 2-core box each team's barrier spun while its partner waited for
    a core. The worker must start at the process's count, before its first product (MKL's
    sparse products do not ask torch, which would set it lazily)."""
    omp_threads = _openmp_threads()
    with concurrent.futures.ThreadPoolExecutor(1) as fresh:
        default = fresh.submit(omp_threads).result()  # what a new thread starts with here
    wanted = 1 if default != 1 else 2  # a count no new thread starts with
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        net = radix_net(64, 2, weights="random", seed=1)
        spec = split(net, partition(net, 2, method="random"))[0]
        executor = ShardExecutor(spec, set_name="s", channel=LocalChannel(), mailbox=Mailbox())
        try:
            assert executor._pool.submit(omp_threads).result(timeout=60) == wanted
        finally:
            executor.close()
    finally:
        torch.set_num_threads(before)
