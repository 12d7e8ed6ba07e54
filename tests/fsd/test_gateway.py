"""A function with ``spec.parallelism`` through the gateway: deployed as a shard set, served.

The fast tests drive the real :class:`~gpufaas.scheduler.gateway.Gateway` (its ``infer``,
which both the HTTP and the gRPC front ends call, and its HTTP app) over shard nodes served
in threads; the slow one runs ``gpufaas up`` with two real GPU managers and asks with
tritonclient (HTTP and gRPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gpufaas.core.api import InferenceFunction
from gpufaas.core.layered import LayeredNet, load_net, radix_net, save_net
from gpufaas.scheduler.cluster import Cluster
from gpufaas.scheduler.gateway import Gateway, create_app
from gpufaas.scheduler.local import die_with_parent, free_port
from gpufaas.scheduler.policy import make_policy

WIDTH = 256


@pytest.fixture(scope="module")
def net() -> LayeredNet:
    return radix_net(WIDTH, 8, weights="random", seed=3)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(4).random((3, WIDTH)).astype(np.float32)


def sharded_function(
    name: str,
    uri: str,
    *,
    shards: int = 2,
    strategy: str = "intra-layer",
    channel: str = "direct",
    width: int = WIDTH,
    model_format: str = "layered",
) -> InferenceFunction:
    return InferenceFunction.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                # A gpufaas.layered/v1 safetensors file (save_net).
                "model": {"uri": uri, "format": model_format},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
                "parallelism": {"shards": shards, "strategy": strategy, "channel": channel},
            },
        }
    )


def infer_body(x: np.ndarray) -> bytes:
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                           "data": x.ravel().tolist()}]}  # fmt: skip
    return json.dumps(request).encode()


def output(body: bytes) -> np.ndarray:
    (out,) = json.loads(body)["outputs"]
    assert out["name"] == "y"
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture
async def gateway(thread_nodes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A gateway over two shard nodes, marked healthy (they serve only the shard routes)."""
    monkeypatch.setenv("GPUFAAS_HOME", str(tmp_path / "home"))
    urls = {f"n{i}": node.url for i, node in enumerate(thread_nodes[:2])}
    gw = Gateway(cluster=Cluster(manager_urls=urls), policy=make_policy("lb"))
    for node in gw.cluster.nodes.values():
        node.healthy = True
    yield gw
    await gw.sharded.close()
    await gw.cluster.close()


def test_a_net_artifact_round_trips_through_safetensors(tmp_path: Path, net: LayeredNet) -> None:
    path = tmp_path / "net.safetensors"
    save_net(path, net)
    back = load_net(path)
    assert back.widths == net.widths
    x = np.random.default_rng(0).random((2, WIDTH)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert b"pickle" not in path.read_bytes()[:200]  # a safetensors header, no pickle


async def test_a_sharded_function_is_deployed_and_served_through_the_gateway(
    gateway: Gateway, thread_nodes: Any, tmp_path: Path, net: LayeredNet, x: np.ndarray
) -> None:
    save_net(tmp_path / "radix.safetensors", net)
    function = sharded_function("radix", (tmp_path / "radix.safetensors").as_uri())
    await gateway.add_function(function)
    assert gateway.sharded.error("radix") is None
    # The nodes hold its shards; none was given the function as a single-device model.
    for index, node in enumerate(thread_nodes[:2]):
        assert list(node.host.shards) == [node.host.key("radix", index)]
    reply = await gateway.infer("radix", infer_body(x), header_length=None)
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(output(reply.body), net.forward(x), rtol=1e-5, atol=1e-5)
    # The HTTP front end takes the same path.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gateway"
    ) as client:
        response = await client.post("/v2/models/radix/infer", content=infer_body(x))
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(output(response.content), net.forward(x), rtol=1e-5, atol=1e-5)
        wrong = await client.post("/v2/models/radix/infer", content=infer_body(x[:, :8]))
        assert wrong.status_code == 400
        thread_nodes[1].stop()  # shard 1's node goes away (the gateway still thinks it healthy)
        gone = await client.post("/v2/models/radix/infer", content=infer_body(x))
    assert gone.status_code == 503
    assert gone.headers["x-gpufaas-reason"] == "ShardFailed"
    assert "shard 1 of radix" in gone.json()["error"]
    await gateway.remove_function("radix")
    assert not list(thread_nodes[0].host.shards)


async def test_a_set_on_a_manager_that_went_down_is_re_placed(
    gateway: Gateway, tmp_path: Path, net: LayeredNet, x: np.ndarray
) -> None:
    save_net(tmp_path / "radix.safetensors", net)
    await gateway.add_function(sharded_function("radix", (tmp_path / "radix.safetensors").as_uri()))
    second = gateway.cluster.nodes["n1"]
    second.healthy = False  # the gateway's sync saw it go
    reply = await gateway.infer("radix", infer_body(x), header_length=None)
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(output(reply.body), net.forward(x), rtol=1e-5, atol=1e-5)
    assert gateway.sharded._coordinator is not None
    placed = {load.node for load in gateway.sharded._coordinator.sets["radix"].loads}
    assert placed == {gateway.cluster.nodes["n0"].url}


@pytest.mark.parametrize(
    ("artifact", "width", "strategy", "named"),
    [
        ("torchscript", WIDTH, "intra-layer", "model.format is 'torchscript'"),
        ("garbage", WIDTH, "intra-layer", "not a safetensors file"),
        ("missing", WIDTH, "intra-layer", "not found"),
        (
            "net",
            128,
            "intra-layer",
            "spec.inputs[0] 'x' has last dimension 128, but the model's is 256",
        ),
        ("net", WIDTH, "layer", "parallelism.shards=16 exceeds the net's 8 layers"),
    ],
)
async def test_a_function_that_cannot_be_deployed_answers_503_naming_why(
    gateway: Gateway,
    tmp_path: Path,
    net: LayeredNet,
    artifact: str,
    width: int,
    strategy: str,
    named: str,
) -> None:
    path = tmp_path / "model.safetensors"
    if artifact == "garbage":
        path.write_bytes(b"\x80\x04not a safetensors file at all")
    elif artifact in ("net", "torchscript"):  # torchscript: a good net, declared otherwise
        save_net(path, net)
    shards = 16 if strategy == "layer" else 2
    function = sharded_function(
        "bad", path.as_uri(), shards=shards, strategy=strategy, width=width,
        model_format="torchscript" if artifact == "torchscript" else "layered",
    )  # fmt: skip
    await gateway.add_function(function)  # logs, does not raise
    assert gateway.sharded.error("bad") is not None
    x = np.zeros((1, width), dtype=np.float32)
    reply = await gateway.infer("bad", infer_body(x), header_length=None)
    assert reply.status == 503
    assert reply.headers["x-gpufaas-reason"] == "ShardDeployFailed"
    assert named in json.loads(reply.body)["error"]


async def test_no_healthy_manager_answers_503_not_a_hang(
    gateway: Gateway, tmp_path: Path, net: LayeredNet, x: np.ndarray
) -> None:
    save_net(tmp_path / "radix.safetensors", net)
    for node in gateway.cluster.nodes.values():
        node.healthy = False
    await gateway.add_function(sharded_function("radix", (tmp_path / "radix.safetensors").as_uri()))
    reply = await gateway.infer("radix", infer_body(x), header_length=None)
    assert reply.status == 503
    assert "no healthy GPU manager" in json.loads(reply.body)["error"]


# -------------------------------------------------------------------------------------------
# End to end: gpufaas up, two real GPU managers, tritonclient
# -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gpufaas_up(args: list[str], *, env: dict[str, str], log: Path, grpc_port: int) -> Iterator[str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpufaas.core.cli", "up", "--port", str(port),
             "--grpc-port", str(grpc_port), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "gpufaas up was not ready within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_gpufaas_up_serves_a_sharded_function_to_tritonclient(
    tmp_path: Path, net: LayeredNet, x: np.ndarray
) -> None:
    import os

    import tritonclient.http as triton
    import yaml

    save_net(tmp_path / "radix.safetensors", net)
    manifest = sharded_function("radix", (tmp_path / "radix.safetensors").as_uri())
    functions = tmp_path / "functions"
    functions.mkdir()
    document = {"apiVersion": "gpufaas.dev/v1alpha1", "kind": "InferenceFunction",
                **manifest.model_dump(mode="json", by_alias=True, exclude_none=True)}  # fmt: skip
    (functions / "radix.yaml").write_text(yaml.safe_dump(document))
    env = {**os.environ, "GPUFAAS_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    args = ["--nodes", "2", "--functions", str(functions), "--device-memory", "64Mi",
            "--host-memory", "128Mi"]  # fmt: skip
    grpc_port = free_port()
    with gpufaas_up(args, env=env, log=tmp_path / "up.log", grpc_port=grpc_port) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("radix", [tensor])
        np.testing.assert_allclose(result.as_numpy("y"), net.forward(x), rtol=1e-5, atol=1e-5)
        bad = triton.InferInput("x", [1, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
        with pytest.raises(triton.InferenceServerException):
            client.infer("radix", [bad])
        client.close()
        # gRPC's ModelInfer takes the same path.
        import tritonclient.grpc as triton_grpc

        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        grpc_tensor = triton_grpc.InferInput("x", list(x.shape), "FP32")
        grpc_tensor.set_data_from_numpy(x)
        answer = grpc_client.infer("radix", [grpc_tensor], client_timeout=60)
        np.testing.assert_allclose(answer.as_numpy("y"), net.forward(x), rtol=1e-5, atol=1e-5)
        grpc_client.close()


async def test_a_sharded_function_over_its_pending_limit_answers_429_with_retry_after(
    gateway: Gateway, tmp_path: Path, net: LayeredNet, x: np.ndarray
) -> None:
    """The per-function bound of the gateway holds for shard sets too: with room for one
    request, a second one arriving while the first runs is refused, not queued."""
    import asyncio
    import dataclasses

    save_net(tmp_path / "radix.safetensors", net)
    await gateway.add_function(sharded_function("radix", (tmp_path / "radix.safetensors").as_uri()))
    gateway.config = dataclasses.replace(gateway.config, max_pending_per_function=1)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gateway"
    ) as client:
        first, second = await asyncio.gather(
            client.post("/v2/models/radix/infer", content=infer_body(x)),
            client.post("/v2/models/radix/infer", content=infer_body(x)),
        )
        assert first.status_code == 200, first.text
        assert second.status_code == 429, second.text
        assert second.headers["retry-after"] == "1"
        assert "requests in flight" in second.json()["error"]
        again = await client.post("/v2/models/radix/infer", content=infer_body(x))
        assert again.status_code == 200  # the slot is free once the first one is done
    assert gateway.pending == {}


async def test_shard_passes_shared_on_the_command_line_batches_the_gateways_sharded_requests(
    thread_nodes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, net: LayeredNet
) -> None:
    """``gpufaas gateway --shard-passes shared`` reaches the coordinator: concurrent requests
    through the gateway share passes, each still answered with its own rows."""
    from gpufaas.scheduler.cli import _gateway_config, _gateway_parser

    monkeypatch.setenv("GPUFAAS_HOME", str(tmp_path / "home"))
    config = _gateway_config(_gateway_parser().parse_args(["--shard-passes", "shared"]))
    urls = {f"n{i}": node.url for i, node in enumerate(thread_nodes[:2])}
    gw = Gateway(cluster=Cluster(manager_urls=urls), policy=make_policy("lb"), config=config)
    for node in gw.cluster.nodes.values():
        node.healthy = True
    try:
        save_net(tmp_path / "radix.safetensors", net)
        await gw.add_function(sharded_function("radix", (tmp_path / "radix.safetensors").as_uri()))
        rng = np.random.default_rng(5)
        batches = [rng.random((b, WIDTH)).astype(np.float32) for b in (1, 3, 2, 4)]
        replies = await asyncio.gather(
            *(gw.infer("radix", infer_body(b), header_length=None) for b in batches)
        )
        for b, reply in zip(batches, replies, strict=True):
            assert reply.status == 200, reply.body
            np.testing.assert_allclose(output(reply.body), net.forward(b), rtol=1e-5, atol=1e-5)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gateway"
        ) as client:
            scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        counts = _pass_metrics(scraped.text, "radix")
        assert counts["gpufaas_shard_pass_requests_total"] == len(batches)
        # the default ("single") runs one pass per request
        assert counts["gpufaas_shard_passes_total"] < len(batches)
        assert counts["gpufaas_shard_pass_samples_total"] == sum(b.shape[0] for b in batches)
        assert counts["gpufaas_shard_passes_in_flight"] == 0
        assert counts["gpufaas_shard_pass_max_samples"] > 0
    finally:
        await gw.sharded.close()
        await gw.cluster.close()


def _pass_metrics(text: str, model: str) -> dict[str, float]:
    """The shard-pass samples of ``model`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("gpufaas_shard_pass")
        for sample in family.samples
        if sample.labels.get("model") == model and not sample.name.endswith("_created")
    }
