"""Shard sets on nodes over real HTTP: deploy through the launch tree, fan out, gather.

The fast tests run shard nodes (the GPU manager's shard routes) in threads of this process;
the slow ones start real ``gpufaas gpu-manager`` processes and kill one mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gpufaas.core import node
from gpufaas.core.channelservers import NatsServer, S3Server
from gpufaas.core.commands import ManagerOptions
from gpufaas.core.layered import LayeredNet, dense_mlp, radix_net
from gpufaas.core.sharding import ChannelConfig, Parallelism
from gpufaas.scheduler.coordinator import Coordinator, LaunchFailed, ShardFailed, tree_rounds
from gpufaas.scheduler.local import free_port, run_manager_processes
from gpufaas.scheduler.partition import partition, shard_sizes, split


@pytest.mark.parametrize(("shards", "nodes"), [(2, 2), (4, 4), (4, 2)])
async def test_direct_channel_across_nodes_matches_the_reference(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray, shards: int, nodes: int
) -> None:
    urls = [n.url for n in thread_nodes[:nodes]]
    shard_set = await coordinator.deploy(
        "radix",
        net,
        Parallelism(shards=shards, strategy="intra-layer", channel="direct"),
        nodes=urls,
    )
    assert shard_set.launch is not None
    assert sorted(shard_set.launch.loaded) == list(range(shards))
    assert shard_set.launch.depth == tree_rounds(shards)  # a binary tree: O(log N) rounds
    for _ in range(2):  # a second request reuses the loaded shards (fresh request id)
        out = await coordinator.infer("radix", x)
        np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)


async def test_layer_strategy_pipelines_across_nodes(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    await coordinator.deploy(
        "pipe", net, Parallelism(shards=4, strategy="layer"), nodes=[n.url for n in thread_nodes]
    )
    out = await coordinator.infer("pipe", x)
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)


async def test_concurrent_requests_do_not_mix(
    thread_nodes: Any, coordinator: Coordinator, net: Any
) -> None:
    await coordinator.deploy(
        "radix",
        net,
        Parallelism(shards=2, strategy="intra-layer"),
        nodes=[n.url for n in thread_nodes[:2]],
    )
    rng = np.random.default_rng(8)
    batches = [rng.random((2, 512)).astype(np.float32) for _ in range(6)]
    outs = await asyncio.gather(*(coordinator.infer("radix", b) for b in batches))
    for b, out in zip(batches, outs, strict=True):
        np.testing.assert_allclose(out, net.forward(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shards", "nodes"), [(2, 2), (4, 4)])
async def test_concurrent_requests_of_different_batch_sizes_share_passes_and_match_the_reference(
    thread_nodes: Any, coordinator: Coordinator, net: Any, shards: int, nodes: int
) -> None:
    """Requests in flight together run as shared passes (scheduler/passes.py), and each gets
    the unsharded reference's output for its own rows, whatever the others' sizes."""
    coordinator.batching = True
    await coordinator.deploy(
        "radix", net, Parallelism(shards=shards, strategy="intra-layer"),
        nodes=[n.url for n in thread_nodes[:nodes]],
    )  # fmt: skip
    rng = np.random.default_rng(9)
    sizes = [1, 5, 2, 8, 3, 1, 4]
    batches = [rng.random((b, 512)).astype(np.float32) for b in sizes]
    first = [asyncio.ensure_future(coordinator.infer("radix", b)) for b in batches[:3]]
    await asyncio.sleep(0.005)  # some arrive while the first pass runs
    rest = [asyncio.ensure_future(coordinator.infer("radix", b)) for b in batches[3:]]
    outs = await asyncio.gather(*first, *rest)
    for b, out in zip(batches, outs, strict=True):
        assert out.shape == (b.shape[0], 512)
        np.testing.assert_allclose(out, net.forward(b), rtol=1e-5, atol=1e-5)
    stats = coordinator.passes("radix").stats
    assert stats.requests == len(sizes) and stats.samples == sum(sizes)
    assert stats.passes < len(sizes)  # batched: fewer passes than requests


async def test_an_evicted_set_is_relaunched_and_the_request_served(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    nodes = thread_nodes[:2]
    await coordinator.deploy(
        "radix", net, Parallelism(shards=2, strategy="intra-layer"), nodes=[n.url for n in nodes]
    )
    host = nodes[1].host
    future = asyncio.run_coroutine_threadsafe(host.evict_set("radix"), _loop_of(nodes[1]))
    assert future.result(timeout=10) == [1]
    out = await coordinator.infer("radix", x)
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)
    assert "radix/1" in host.shards


async def test_a_shard_set_over_one_node_budget_evicts_whole_sets(
    thread_nodes: Any, coordinator: Coordinator, net: Any
) -> None:
    node = thread_nodes[0]
    node.shrink(int(net.weight_bytes * 1.2))
    await coordinator.deploy(
        "a", net, Parallelism(shards=2, strategy="intra-layer"), nodes=[node.url]
    )
    assert {"a/0", "a/1"} <= set(node.host.shards)
    await coordinator.deploy(
        "b", net, Parallelism(shards=2, strategy="intra-layer"), nodes=[node.url]
    )
    assert not any(k.startswith("a/") for k in node.host.shards)  # set a left whole
    assert {"b/0", "b/1"} <= set(node.host.shards)


async def test_a_set_too_large_for_the_nodes_fails_to_launch_naming_shards(
    thread_nodes: Any, coordinator: Coordinator, net: Any
) -> None:
    node = thread_nodes[0]
    node.shrink(net.weight_bytes // 3)
    with pytest.raises(LaunchFailed, match=r"shard 0: .*"):
        await coordinator.deploy(
            "big", net, Parallelism(shards=2, strategy="intra-layer"), nodes=[node.url]
        )


async def test_nats_channel_across_nodes(
    thread_nodes: Any, coordinator: Coordinator, nats_server: NatsServer, net: Any, x: np.ndarray
) -> None:
    channel = ChannelConfig(kind="nats", nats_url=nats_server.url)
    await coordinator.deploy(
        "radix", net, Parallelism(shards=4, strategy="intra-layer", channel="nats"), nodes=[n.url for n in thread_nodes],
        channel=channel,
    )  # fmt: skip
    out = await coordinator.infer("radix", x)
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)


async def test_s3_channel_across_nodes(
    thread_nodes: Any, coordinator: Coordinator, s3_channel_server: S3Server, x: np.ndarray
) -> None:
    small = radix_net(512, 4, weights="random", seed=6)
    s3 = s3_channel_server
    channel = ChannelConfig(
        kind="s3", s3_endpoint=s3.endpoint_url, s3_bucket=s3.bucket, s3_key=s3.key,
        s3_secret=s3.secret,
    )  # fmt: skip
    await coordinator.deploy(
        "radix", small, Parallelism(shards=2, strategy="intra-layer", channel="s3"),
        nodes=[n.url for n in thread_nodes[:2]], channel=channel,
    )  # fmt: skip
    out = await coordinator.infer("radix", x)
    np.testing.assert_allclose(out, small.forward(x), rtol=1e-5, atol=1e-5)


async def test_unreachable_nats_fails_the_launch_naming_the_channel(
    thread_nodes: Any, coordinator: Coordinator, net: Any
) -> None:
    channel = ChannelConfig(kind="nats", nats_url=f"nats://127.0.0.1:{free_port()}")
    with pytest.raises(LaunchFailed, match=r"the nats channel at nats://127\.0\.0\.1"):
        await coordinator.deploy(
            "radix", net, Parallelism(shards=2, strategy="intra-layer", channel="nats"),
            nodes=[n.url for n in thread_nodes[:2]], channel=channel,
        )  # fmt: skip


def _loop_of(node: Any) -> asyncio.AbstractEventLoop:
    """The event loop of a thread node's uvicorn server."""
    for server in node.server.servers:
        return server.get_loop()  # type: ignore[no-any-return]
    raise RuntimeError("the node has no server")


# -------------------------------------------------------------------------------------------
# Real GPU-manager processes
# -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def managers(
    tmp_path: Path, count: int, *, device_memory: str, cpu_devices: int = 1
) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    def options(index: int) -> ManagerOptions:
        return ManagerOptions(
            cpu_devices=cpu_devices, device_memory=device_memory, host_memory="256Mi",
            artifact_dir=tmp_path / f"artifacts{index}", force_cpu=True,
        )  # fmt: skip

    with run_manager_processes(
        nodes=count, options=options, log_dir=tmp_path, stop_timeout_s=15
    ) as procs:
        yield [m.url for m in procs], [m.process for m in procs]


async def _deploy_split_refused_whole(
    coordinator: Coordinator, mlp: LayeredNet, urls: list[str], *, shards: int
) -> None:
    """Unsplit, the model fits no device (refused); split ``shards`` ways by block, it deploys."""
    with pytest.raises(LaunchFailed):
        await coordinator.deploy(
            "mlp-1", mlp, Parallelism(shards=1, strategy="intra-layer"), nodes=urls[:1]
        )
    await coordinator.deploy(
        "mlp", mlp, Parallelism(shards=shards, strategy="intra-layer"), nodes=urls, method="block"
    )


@pytest.mark.slow
async def test_a_model_four_times_one_device_serves_on_four_managers(tmp_path: Path) -> None:
    """The device is as large as the largest of the four block shards and no larger, so the
    model is as many times one device as four shards can hold (just under 4x: the four
    shards' weights add up to the model's, and the 10-row last layer splits 3, 3, 2, 2)."""
    mlp = dense_mlp([1024, 2048, 2048, 1024, 10], seed=9)  # ~32 MiB of weights
    device = max(shard_sizes(split(mlp, partition(mlp, 4, method="block"))))
    assert mlp.weight_bytes >= 3.99 * device
    x = np.random.default_rng(1).standard_normal((8, 1024)).astype(np.float32)
    with managers(tmp_path, 4, device_memory=str(device)) as (urls, _):
        coordinator = Coordinator(artifact_base=str(tmp_path / "shards"), timeout_s=60)
        try:
            await _deploy_split_refused_whole(coordinator, mlp, urls, shards=4)
            out = await coordinator.infer("mlp", x)
            async with httpx.AsyncClient(timeout=10) as client:
                states = [(await client.get(url + node.SHARDS)).json() for url in urls]
        finally:
            await coordinator.close()
    np.testing.assert_allclose(out, mlp.forward(x), rtol=1e-4, atol=1e-4)
    # the shards talked over same-host links; each node, stopped, removed its link socket
    sockets = [Path(state["link"]["socket"]) for state in states]
    assert len(sockets) == 4
    assert not [s for s in sockets if s.parent.exists()], "link sockets left behind"


@pytest.mark.slow
async def test_a_model_over_four_times_one_device_serves_on_four_two_device_managers(
    tmp_path: Path,
) -> None:
    """``--nodes 4 --cpu-devices 2``, each device's budget a quarter of the model's weights
    (rounded down: the model is at least 4x one device). Unsplit it fits no device, and a
    4-way split cannot fit either (its largest shard is over a quarter: the last layer's 10
    rows split 3, 3, 2, 2). Split 8 ways, a node puts its two shards on its two devices
    (``device_for``), one shard per device, and the set serves the reference's output."""
    mlp = dense_mlp([1024, 2048, 2048, 1024, 10], seed=9)  # ~32 MiB of weights
    budget = mlp.weight_bytes // 4
    assert mlp.weight_bytes >= 4 * budget
    assert max(shard_sizes(split(mlp, partition(mlp, 4, method="block")))) > budget
    assert max(shard_sizes(split(mlp, partition(mlp, 8, method="block")))) <= budget
    x = np.random.default_rng(11).standard_normal((8, 1024)).astype(np.float32)
    with managers(tmp_path, 4, device_memory=str(budget), cpu_devices=2) as (urls, _):
        coordinator = Coordinator(artifact_base=str(tmp_path / "shards"), timeout_s=60)
        try:
            with pytest.raises(LaunchFailed):  # 4 ways: the largest shard is over a device
                await coordinator.deploy(
                    "mlp-4", mlp, Parallelism(shards=4, strategy="intra-layer"), nodes=urls,
                    method="block",
                )  # fmt: skip
            async with httpx.AsyncClient(timeout=10) as client:
                left = [(await client.get(url + node.SHARDS)).json()["shards"] for url in urls]
            # a failed launch leaves none of its shards holding a device
            assert [key for shards in left for key in shards] == []
            await _deploy_split_refused_whole(coordinator, mlp, urls, shards=8)
            outs = [await coordinator.infer("mlp", x) for _ in range(2)]
            async with httpx.AsyncClient(timeout=10) as client:
                states = [(await client.get(url + node.SHARDS)).json() for url in urls]
        finally:
            await coordinator.close()
    for out in outs:
        np.testing.assert_allclose(out, mlp.forward(x), rtol=1e-4, atol=1e-4)
    placed = {
        int(key.split("/")[1]): (where, shard["device"])
        for where, state in enumerate(states)
        for key, shard in state["shards"].items()
    }
    # shard p on node p mod 4, the node's two shards on its two devices: one per device
    assert placed == {p: (p % 4, f"cpu:{p // 4}") for p in range(8)}


@pytest.mark.slow
async def test_a_node_killed_mid_inference_fails_fast_naming_its_shard(tmp_path: Path) -> None:
    net = radix_net(4096, 120)  # ~0.3 s per request here: long enough to be killed inside one
    x = (np.random.default_rng(2).random((16, 4096)) < 0.2).astype(np.float32)
    with managers(tmp_path, 2, device_memory="512Mi") as (urls, procs):
        coordinator = Coordinator(artifact_base=str(tmp_path / "shards"), timeout_s=60)
        try:
            await coordinator.deploy(
                "radix", net, Parallelism(shards=2, strategy="intra-layer"), nodes=urls
            )
            np.testing.assert_allclose(
                await coordinator.infer("radix", x), net.forward(x), rtol=1e-3, atol=1e-3
            )
            outcomes: list[object] = []

            async def client() -> None:
                """Requests back to back until one fails: two of these keep requests in
                flight whenever the node is killed, however fast a request now is."""
                while True:
                    try:
                        await coordinator.infer("radix", x)
                    except Exception as e:
                        outcomes.append(e)
                        return
                    outcomes.append("ok")

            clients = [asyncio.ensure_future(client()) for _ in range(2)]
            await asyncio.sleep(0.3)
            procs[1].send_signal(signal.SIGKILL)  # shard 1's node dies mid-inference
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)  # none hangs
            failures = [r for r in outcomes if r != "ok"]
            assert len(failures) == 2, outcomes
            assert all(isinstance(f, ShardFailed) and f.shard == 1 for f in failures), [
                repr(f) for f in failures
            ]
            # Later requests fail at once too, naming the dead shard; none hangs.
            with pytest.raises(ShardFailed, match="shard 1 of radix"):
                await asyncio.wait_for(coordinator.infer("radix", x), timeout=60)
        finally:
            await coordinator.close()


async def test_the_coordinator_serves_kserve_v2_and_names_a_failed_shard(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        return await coordinator.serve(name, request)

    await coordinator.deploy(
        "radix",
        net,
        Parallelism(shards=2, strategy="intra-layer"),
        nodes=[n.url for n in thread_nodes[:2]],
    )
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        ok = await client.post("/v2/models/radix/infer", json=body)
        assert ok.status_code == 200, ok.text
        (output,) = ok.json()["outputs"]
        got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(got, net.forward(x), rtol=1e-5, atol=1e-5)
        wrong = {"inputs": [{**body["inputs"][0], "shape": [1, 3], "data": [1, 2, 3]}]}
        bad = await client.post("/v2/models/radix/infer", json=wrong)
        assert bad.status_code == 400 and "(batch, 512)" in bad.json()["error"]
        thread_nodes[1].stop()  # shard 1's node goes away
        gone = await client.post("/v2/models/radix/infer", json=body)
    assert gone.status_code == 503
    assert gone.headers["x-gpufaas-shard"] == "1"
    assert "shard 1 of radix" in gone.json()["error"]


def test_gpufaas_up_channel_block_starts_nats_and_exports_it(tmp_path: Path) -> None:
    import json

    from gpufaas.core.channelservers import ServerMissing, run_channel
    from gpufaas.core.sharding import CHANNEL_ENV, channel_for

    with contextlib.ExitStack() as stack:
        try:
            exported = run_channel("nats", tmp_path, stack)
        except ServerMissing as e:
            pytest.skip(str(e))
        config = channel_for("nats", {CHANNEL_ENV: exported})
        assert config.nats_url == json.loads(exported)["nats_url"]
        with socket_to(config.nats_url) as connected:
            assert connected
    assert channel_for("direct", {CHANNEL_ENV: exported}).kind == "direct"


@contextlib.contextmanager
def socket_to(url: str | None) -> Iterator[bool]:
    import socket
    import urllib.parse

    assert url is not None
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        yield sock.fileno() >= 0


async def test_a_shard_unloaded_mid_request_is_relaunched_and_released_after(
    thread_nodes: Any, coordinator: Coordinator
) -> None:
    """Unloading (or evicting) a serving shard: its peers' messages are refused (404), so
    the coordinator relaunches the set and retries; the orphaned run keeps its executor
    until its own wait ends, then releases it (no send on a closed client, no crash)."""
    big = radix_net(4096, 60, weights="random", seed=3)
    x = np.random.default_rng(4).random((16, 4096)).astype(np.float32)
    nodes = thread_nodes[:2]
    nodes[0].host.stall_s = 1.0
    await coordinator.deploy(
        "big", big, Parallelism(shards=2, strategy="intra-layer"), nodes=[n.url for n in nodes]
    )
    host = nodes[0].host
    loaded = host.loaded("big", 0)
    running = asyncio.ensure_future(coordinator.infer("big", x))
    for _ in range(2000):  # bounded: until shard 0 is serving (or the request is over)
        if loaded.running or running.done():
            break
        await asyncio.sleep(0.005)
    assert loaded.running, "the request ended before the unload: make the net larger"
    unloaded = asyncio.run_coroutine_threadsafe(host.unload("big", 0), _loop_of(nodes[0]))
    assert unloaded.result(timeout=10)
    assert loaded.dropped and not loaded.executor._pool._shutdown  # still serving
    out = await asyncio.wait_for(running, timeout=120)
    np.testing.assert_allclose(out, big.forward(x), rtol=1e-4, atol=1e-4)
    assert host.loaded("big", 0) is not loaded  # relaunched
    for _ in range(1000):  # bounded: the orphan's wait ends after stall_s
        if loaded.running == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert loaded.running == 0 and loaded.executor._pool._shutdown  # released after
