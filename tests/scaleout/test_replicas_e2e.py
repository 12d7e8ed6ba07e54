"""Gateway replicas as real processes: the cluster-wide device bound, a replica SIGKILLed
mid-run, and membership that follows replicas coming and going.

Each test starts real GPU managers and real ``gpufaas gateway`` replicas (the commands
``gpufaas up --gateways N`` runs), drives them with httpx on 127.0.0.1, and stops them. Every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from gpufaas.core.commands import ManagerOptions
from gpufaas.core.manifests import bundled_functions_dir
from gpufaas.core.node import STATE, NodeState, Residency
from gpufaas.core.protocol import RepositoryIndexEntry, encode_request
from gpufaas.scheduler.local import (
    GatewayReplicaOptions,
    die_with_parent,
    free_port,
    gateway_command,
    manager_command,
    stop_processes,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 3


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def _ready(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/v2/health/ready", timeout=1)
    except httpx.HTTPError:
        return None
    body: dict[str, Any] = response.json()
    return body if response.status_code == 200 else None


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


class Cluster:
    """One GPU manager and gateway replicas, each a real process."""

    def __init__(self, *, env: dict[str, str], tmp: Path, functions: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.functions = functions
        self.procs: list[subprocess.Popen[bytes]] = []
        self.manager_url = ""

    def start_manager(self, *, device_concurrency: int, cpu_devices: int = 1) -> None:
        port = free_port()
        options = ManagerOptions(
            cpu_devices=cpu_devices,
            device_memory="1Gi",
            host_memory="1Gi",
            artifact_dir=self.tmp / "artifacts",
            device_concurrency=device_concurrency,
        )
        self.procs.append(
            subprocess.Popen(
                manager_command(name="node-0", port=port, options=options),
                env=self.env,
                preexec_fn=die_with_parent,
            )
        )
        self.manager_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(self.manager_url) is not None, timeout_s=90, what="the manager")

    def start_gateway(
        self,
        port: int,
        peers: list[str],
        *,
        sync_s: float,
        device_concurrency: int = CONCURRENCY,
        forwarding: str = "request",
    ) -> subprocess.Popen[bytes]:
        options = GatewayReplicaOptions(
            host="127.0.0.1",
            shared_port=self.shared_port,
            functions=(self.functions,),
            gateway_args=(
                "--policy", "lalb",
                "--sync-interval", str(sync_s),
                "--device-concurrency", str(device_concurrency),
                "--replica-forward", forwarding,
            ),
        )  # fmt: skip
        proc = subprocess.Popen(
            gateway_command(
                port=port, peers=peers, managers={"node-0": self.manager_url}, options=options
            ),
            env=self.env,
            preexec_fn=die_with_parent,
        )
        self.procs.append(proc)
        return proc

    shared_port = 0

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
def functions(tmp_path: Path) -> Path:
    """Twelve copies of tiny-mlp (each its own function) and MiniLM."""
    folder = tmp_path / "functions"
    folder.mkdir()
    template = yaml.safe_load((bundled_functions_dir() / "tiny-mlp.yaml").read_text())
    for i in range(12):
        template["metadata"]["name"] = f"tiny-{i:02d}"
        (folder / f"tiny-{i:02d}.yaml").write_text(yaml.safe_dump(template))
    (folder / "minilm.yaml").write_text((bundled_functions_dir() / "minilm.yaml").read_text())
    return folder


@pytest.fixture
def cluster(tmp_path: Path, gpufaas_env: dict[str, str], functions: Path) -> Iterator[Cluster]:
    running = Cluster(
        env={**gpufaas_env, "GPUFAAS_PEER_TOKEN": "peer-secret"}, tmp=tmp_path, functions=functions
    )
    running.shared_port = free_port()
    try:
        yield running
    finally:
        running.stop()


def _two_replicas(
    cluster: Cluster,
    *,
    sync_s: float,
    device_concurrency: int = CONCURRENCY,
    forwarding: str = "request",
) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [
        cluster.start_gateway(
            p, urls, sync_s=sync_s, device_concurrency=device_concurrency, forwarding=forwarding
        )
        for p in ports
    ]
    for url in urls:
        wait_for(
            lambda url=url: (_ready(url) or {}).get("replica", {}).get("mode") == "coordinated",
            timeout_s=90,
            what=f"replica {url} to see its peer",
        )
    return urls, procs


def tiny_request() -> tuple[bytes, dict[str, str]]:
    return encode_request({"x": (np.ones((1, 16), dtype=np.float32), "FP32")})


def minilm_request(request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    ids = np.random.default_rng(0).integers(1000, 20000, size=(4, 64), dtype=np.int64)
    return encode_request(
        {"input_ids": (ids, "INT64"), "attention_mask": (np.ones_like(ids), "INT64")},
        request_id=request_id,
    )


def _drive(
    urls: list[str], name: str, body: bytes, headers: dict[str, str], *, per_url: int, each: int
) -> list[int]:
    codes: list[int] = []

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(each):
                codes.append(
                    c.post(f"/v2/models/{name}/infer", content=body, headers=headers).status_code
                )

    threads = [threading.Thread(target=client, args=(u,)) for u in urls for _ in range(per_url)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client got no answer"
    return codes


@pytest.mark.parametrize("manager_bound", [1, 0], ids=["bounded", "unbounded-control"])
def test_no_device_runs_more_than_the_bound_across_two_replicas(
    cluster: Cluster, manager_bound: int
) -> None:
    """--device-concurrency 1 and two replicas, each taking ceil(1 / 2) = 1 slot of the device:
    together they could run 2; the GPU manager keeps it to 1. The control run (no bound at the
    manager) shows that the same load does run 2 at once."""
    cluster.start_manager(device_concurrency=manager_bound)
    urls, _ = _two_replicas(cluster, sync_s=5, device_concurrency=1)
    body, headers = minilm_request()
    waiting: list[float] = []  # requests waiting at the manager, polled during the drive
    driving = threading.Event()
    driving.set()

    def poll() -> None:
        while driving.is_set():
            with contextlib.suppress(httpx.HTTPError):
                waiting.append(metric(cluster.manager_url, "gpufaas_manager_device_waiting"))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        codes = _drive(urls, "minilm", body, headers, per_url=6, each=4)
    finally:
        driving.clear()
        poller.join(timeout=10)
    assert codes == [200] * len(codes)
    peak = metric(cluster.manager_url, "gpufaas_manager_device_running_peak", {"device": "cpu:0"})
    if manager_bound:
        assert peak == 1
        # Not vacuous: the two replicas did send more at once than the bound, and the
        # manager held the excess back (without its bound they run 2 at once: the control).
        assert max(waiting, default=0) >= 1, "no request ever waited at the manager"
    else:
        assert peak > 1


def test_a_replica_killed_mid_run(cluster: Cluster) -> None:
    """The placement owner is frozen with forwards from the other replica in flight, then
    SIGKILLed: the survivor answers each of its requests once, requests sent to the dead one
    fail at the connection, and the survivor never stalls (it serves hits meanwhile)."""
    cluster.start_manager(device_concurrency=CONCURRENCY, cpu_devices=2)
    urls, procs = _two_replicas(cluster, sync_s=60)  # no heartbeat during the test
    health = _ready(urls[0])
    assert health is not None
    owner = health["replica"]["placement_owner"]
    survivor = next(u for u in urls if u != owner)
    owner_proc = procs[urls.index(owner)]
    names = [f"tiny-{i:02d}" for i in range(12)]
    warm, cold = names[:4], names[4:]
    body, headers = tiny_request()
    for name in warm:  # placed by the owner, published to the survivor
        assert (
            httpx.post(
                f"{owner}/v2/models/{name}/infer", content=body, headers=headers, timeout=60
            ).status_code
            == 200
        )
    wait_for(
        lambda: (
            metric(survivor, "gpufaas_replica_residency_events_total", {"direction": "applied"})
            >= len(warm)
        ),
        timeout_s=30,
        what="the survivor to learn the owner's placements",
    )

    owner_proc.send_signal(signal.SIGSTOP)
    results: dict[str, Any] = {}

    def call(key: str, url: str, name: str) -> None:
        try:
            results[key] = httpx.post(
                f"{url}/v2/models/{name}/infer", content=body, headers=headers, timeout=120
            ).status_code
        except httpx.TransportError as e:
            results[key] = e

    forwarded = [threading.Thread(target=call, args=(f"fwd:{n}", survivor, n)) for n in cold]
    to_owner = [threading.Thread(target=call, args=(f"dead:{n}", owner, n)) for n in names[:3]]
    for t in forwarded + to_owner:
        t.start()
    wait_for(
        lambda: metric(survivor, "gpufaas_replica_forwarded_requests_total") >= len(cold),
        timeout_s=30,
        what="the survivor to forward the cold functions to the owner",
    )
    # The survivor serves hits while the owner hangs (one at a time: each finds a free slot on
    # the holder, where concurrent ones might make LALB replicate, a placement for the owner).
    for name in warm:
        call(f"hit:{name}", survivor, name)
    assert [results[f"hit:{n}"] for n in warm] == [200] * len(warm)
    # Not vacuous: the forwards are still unanswered (the owner is frozen) when it dies.
    assert not any(f"fwd:{n}" in results or f"dead:{n}" in results for n in names)

    owner_proc.send_signal(signal.SIGKILL)
    owner_proc.wait(timeout=10)
    for t in forwarded + to_owner:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in forwarded + to_owner), "a client got no answer"
    assert [results[f"fwd:{n}"] for n in cold] == [200] * len(cold)
    assert all(isinstance(results[f"dead:{n}"], httpx.TransportError) for n in names[:3])
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{owner}/v2/models/tiny-00/infer", content=body, headers=headers, timeout=10)
    assert metric(survivor, "gpufaas_replica_forward_failures_total") >= 1
    health = _ready(survivor)
    assert health is not None and health["replica"]["mode"] == "local"
    assert health["replica"]["placement_owner"] == survivor
    assert metric(survivor, "gpufaas_replica_mode", {"mode": "local"}) == 1
    for name in names:  # every function is served by the survivor alone now
        assert (
            httpx.post(
                f"{survivor}/v2/models/{name}/infer", content=body, headers=headers, timeout=60
            ).status_code
            == 200
        )


def test_a_forward_cut_after_the_owner_dispatched_runs_once(cluster: Cluster) -> None:
    """The survivor forwards a cold MiniLM request to the placement owner, the owner sends it
    to the manager, and is SIGKILLed while the manager loads the model: the survivor's forward
    breaks mid-request. It must not run the request a second time: it finds the answer at the
    manager by the forward's request key (or, running it again, would be joined to the run in
    flight by the same key). The manager's execution count for the request id is 1. (Forwarding
    ``request``, the default: with ``decision`` the owner never dispatches a peer's request.)"""
    cluster.start_manager(device_concurrency=CONCURRENCY)
    urls, procs = _two_replicas(cluster, sync_s=60)  # no heartbeat during the test
    health = _ready(urls[0])
    assert health is not None
    owner = health["replica"]["placement_owner"]
    survivor = next(u for u in urls if u != owner)
    body, headers = minilm_request("once-1")
    result: dict[str, Any] = {}

    def call() -> None:
        result["response"] = httpx.post(
            f"{survivor}/v2/models/minilm/infer", content=body, headers=headers, timeout=120
        )

    client = threading.Thread(target=call)
    client.start()
    wait_for(
        lambda: metric(cluster.manager_url, "gpufaas_manager_device_running") >= 1,
        timeout_s=60,
        what="the owner to dispatch the forwarded request to the manager",
    )
    owner_proc = procs[urls.index(owner)]
    owner_proc.send_signal(signal.SIGKILL)  # mid-request: the manager is still on it
    owner_proc.wait(timeout=10)
    client.join(timeout=120)
    assert not client.is_alive(), "the client got no answer"
    response = result["response"]
    assert response.status_code == 200
    json_part = response.content[: int(response.headers["inference-header-content-length"])]
    assert json.loads(json_part)["id"] == "once-1"
    assert metric(survivor, "gpufaas_replica_forward_failures_total") == 1
    # The forward went over the owner's keyed-forward lane (forward_lane.py), which its
    # heartbeat advertised at start-up: the lane's cut is recovered by the key as HTTP's is.
    assert metric(survivor, "gpufaas_replica_lane_forwards_total") == 1
    executions = httpx.get(f"{cluster.manager_url}/v2/gpufaas/executions", timeout=10).json()
    assert executions["executions"] == {"once-1": 1}


def test_a_peers_placement_is_decided_by_the_owner_and_sent_by_the_peer(cluster: Cluster) -> None:
    """Forwarding ``decision``: a cold request at the replica that does not own
    placements is placed where the owner decides (the owner notes it in its own view), and is
    dispatched by the replica that received it: the owner never handles the request itself."""
    cluster.start_manager(device_concurrency=CONCURRENCY, cpu_devices=2)
    # No sync during the test: the views move by events alone.
    urls, _ = _two_replicas(cluster, sync_s=60, forwarding="decision")
    health = _ready(urls[0])
    assert health is not None
    owner = health["replica"]["placement_owner"]
    peer = next(u for u in urls if u != owner)
    body, headers = tiny_request()
    response = httpx.post(
        f"{peer}/v2/models/tiny-07/infer", content=body, headers=headers, timeout=60
    )
    assert response.status_code == 200
    assert float(response.headers["x-gpufaas-forward-ms"]) > 0  # the question's round trip
    # The owner ordered the load at the manager as it answered (gpu_manager/load_orders.py).
    # The request joined it in flight (a miss), or found it landed (a hit at the manager, and
    # the order's claim says "landed"), or came first and loaded it itself (the order found it
    # there: "present"). Which one is the machine's timing; each is counted once.
    wait_for(
        lambda: metric(owner, "gpufaas_replica_load_orders_total") == 1,
        timeout_s=30,
        what="the manager's answer to the owner's load order",
    )
    manager = cluster.manager_url
    started = metric(manager, "gpufaas_manager_load_orders_total", {"result": "started"})
    present = metric(manager, "gpufaas_manager_load_orders_total", {"result": "present"})
    assert started + present == 1
    claims = "gpufaas_manager_load_order_claims_total"
    landed = metric(manager, claims, {"how": "landed"})
    assert response.headers["x-gpufaas-cache"] in ("hit", "miss")
    assert metric(manager, claims, {"how": "joined"}) + landed == started
    assert metric(owner, "gpufaas_replica_forwarded_in_requests_total") == 1
    assert metric(peer, "gpufaas_gateway_misses_total", {"cause": "placed_by_owner"}) == 1
    # The owner decided (and noted) the load, but neither dispatched nor answered the request.
    assert _held_in_view(owner, "tiny-07")
    assert metric(owner, "gpufaas_gateway_misses_total") == 0
    assert metric(owner, "gpufaas_requests_total") == 0
    # The model is where the owner put it: the owner's next request for it is a hit.
    wait_for(
        lambda: _committed_at_manager(cluster.manager_url, "tiny-07"),
        timeout_s=30,
        what="the manager to commit tiny-07",
    )
    again = httpx.post(
        f"{owner}/v2/models/tiny-07/infer", content=body, headers=headers, timeout=60
    )
    assert again.status_code == 200 and again.headers["x-gpufaas-cache"] == "hit"


def test_membership_follows_replicas_and_a_lonely_replica_serves_locally(cluster: Cluster) -> None:
    cluster.start_manager(device_concurrency=CONCURRENCY)
    ports = [free_port(), free_port()]
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    cluster.start_gateway(ports[0], [a, b], sync_s=1)
    wait_for(lambda: _ready(a) is not None, timeout_s=90, what="replica A")
    wait_for(
        lambda: _ready(a)["replica"]["mode"] == "local", timeout_s=10, what="A to give up on B"
    )  # type: ignore[index]
    body, headers = tiny_request()
    assert (
        httpx.post(
            f"{a}/v2/models/tiny-00/infer", content=body, headers=headers, timeout=60
        ).status_code
        == 200
    )
    assert metric(a, "gpufaas_replica_mode", {"mode": "local"}) == 1
    assert _ready(a)["replica"]["peers"] == {b: "unreachable"}  # type: ignore[index]

    b_proc = cluster.start_gateway(ports[1], [a, b], sync_s=1)  # scale up
    wait_for(
        lambda: (_ready(a) or {}).get("replica", {}).get("mode") == "coordinated",
        timeout_s=30,
        what="A to see B",
    )
    assert metric(a, "gpufaas_replica_mode", {"mode": "coordinated"}) == 1
    codes = _drive([a, b], "tiny-03", body, headers, per_url=2, each=5)
    assert codes == [200] * 20

    b_proc.send_signal(signal.SIGTERM)  # scale down
    b_proc.wait(timeout=30)
    wait_for(lambda: _ready(a)["replica"]["mode"] == "local", timeout_s=10, what="A to drop B")  # type: ignore[index]
    assert (
        httpx.post(
            f"{a}/v2/models/tiny-05/infer", content=body, headers=headers, timeout=60
        ).status_code
        == 200
    )


def _grpc_infer(address: str, name: str) -> None:
    import tritonclient.grpc as tgrpc

    client = tgrpc.InferenceServerClient(address)
    try:
        wait_for(client.is_server_ready, timeout_s=30, what=f"gRPC at {address}")
        tensor = tgrpc.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
        result = client.infer(name, [tensor])
        response = result.get_response()
        assert response.model_name == name and len(response.outputs) >= 1
    finally:
        client.close()


def _resident_in_view(url: str, name: str) -> bool:
    response = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10)
    entries = [RepositoryIndexEntry.model_validate(e) for e in response.json()]
    return any(e.name == name and e.resident_on for e in entries)


def _committed_at_manager(manager_url: str, name: str) -> bool:
    """Whether the manager has committed ``name``: a load's last step runs in the background
    after the first answer, and only then is the next request a hit."""
    state = NodeState.model_validate_json(httpx.get(f"{manager_url}{STATE}", timeout=10).content)
    rows = [r for device in state.devices for r in device.residents]
    return any(r.model == name and r.state is Residency.RESIDENT for r in rows)


def _held_in_view(url: str, name: str) -> bool:
    response = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10)
    entries = [RepositoryIndexEntry.model_validate(e) for e in response.json()]
    return any(e.name == name and (e.resident_on or e.loading_on) for e in entries)


def test_gpufaas_up_with_two_gateways_serves_on_one_port(
    tmp_path: Path, gpufaas_env: dict[str, str], functions: Path
) -> None:
    """``gpufaas up --gateways 2``: two replicas behind one port, their own ports printed,
    both coordinated, each serving gRPC on a port of its own (tritonclient.grpc against the
    second); Ctrl-C stops everything."""
    import re
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gpufaas.core.cli", "up", "--gateways", "2",
            "--port", str(port), "--functions", str(functions), "--cpu-devices", "1",
            "--device-memory", "1Gi", "--sync-interval", "1", "--grpc-port", "0",
        ],
        env=gpufaas_env,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = ""
        for _ in range(400):  # the managers and replicas log to stderr; this line to stdout
            line = proc.stdout.readline().decode()
            if "gateway replicas" in line or not line:
                break
        found = re.search(r"through 2 gateway replicas: (.*)$", line)
        assert found, f"no replica list printed: {line!r}"
        replicas = [u.strip() for u in found.group(1).split(",")]
        grpc_line = proc.stdout.readline().decode()
        grpc_found = re.search(r"gRPC \(KServe v2\): (.*)$", grpc_line)
        assert grpc_found, f"no gRPC ports printed: {grpc_line!r}"
        grpc_addresses = [a.strip() for a in grpc_found.group(1).split(",")]
        assert len(set(grpc_addresses)) == 2
        for url in replicas:
            wait_for(
                lambda url=url: (_ready(url) or {}).get("replica", {}).get("mode") == "coordinated",
                timeout_s=30,
                what=f"replica {url}",
            )
        body, headers = tiny_request()
        shared = f"http://127.0.0.1:{port}"
        for i in range(8):  # a new connection each time: the kernel spreads them
            response = httpx.post(
                f"{shared}/v2/models/tiny-{i:02d}/infer", content=body, headers=headers, timeout=60
            )
            assert response.status_code == 200
        owned = sum(metric(u, "gpufaas_replica_owned_requests_total") for u in replicas)
        assert owned >= 1
        _grpc_infer(grpc_addresses[1], "tiny-09")  # not the first replica
        # gRPC's ingress counts like HTTP's: with tiny-09 resident in both replicas' views
        # (hits: nothing is forwarded), one call to each replica is one call to the owner.
        for url in replicas:
            wait_for(
                lambda url=url: _resident_in_view(url, "tiny-09"),
                timeout_s=30,
                what=f"tiny-09 resident in {url}'s view",
            )
        before = sum(metric(u, "gpufaas_replica_owned_requests_total") for u in replicas)
        for address in grpc_addresses:
            _grpc_infer(address, "tiny-09")
        after = sum(metric(u, "gpufaas_replica_owned_requests_total") for u in replicas)
        assert after - before >= 1, "a gRPC call to the owner was not counted as owned"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("gpufaas up --gateways 2 did not stop within 60 s") from None
    assert code in (0, 130, -signal.SIGINT)
