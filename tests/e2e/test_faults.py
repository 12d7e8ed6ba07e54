"""Faults with real processes: a GPU manager killed mid-request, a manager that
comes back, and a gateway restart that rebuilds its directory.

Two GPU-manager processes and a gateway process run as in production. A slow
request (MiniLM on long sequences) is in flight when its manager is killed
with SIGKILL; the client must still get exactly one correct answer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gpufaas.core.manifests import bundled_functions_dir
from gpufaas.core.protocol import decode_response, encode_request, parse_header_length
from gpufaas.scheduler.local import (
    ManagerOptions,
    die_with_parent,
    free_port,
    manager_command,
    stop_processes,
)

pytestmark = pytest.mark.slow

SYNC_INTERVAL_S = 0.5


def wait_for(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"process exited with {proc.returncode}: {proc.args}"
    return True


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class System:
    """Two managers and a gateway, each a real process that tests may kill."""

    def __init__(
        self, *, env: dict[str, str], options: ManagerOptions, sockets: Path | None = None
    ) -> None:
        self.env = env
        self.options = options
        self.sockets = sockets  # the managers' framed Unix sockets here; None: HTTP only
        self.manager_ports = {f"node-{i}": free_port() for i in range(2)}
        self.managers: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway_port = free_port()
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def manager_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.manager_ports[name]}"

    def start_manager(self, name: str) -> None:
        framed = self.sockets / f"{name}.sock" if self.sockets is not None else None
        command = manager_command(
            name=name, port=self.manager_ports[name], options=self.options, framed_socket=framed
        )
        proc = self.managers[name] = subprocess.Popen(
            command, env=self.env, preexec_fn=die_with_parent
        )
        wait_for(
            lambda: _alive(proc) and _ready(self.manager_url(name)),
            timeout_s=60,
            what=f"manager {name}",
        )

    def start_gateway(self, *, sync_interval_s: float = SYNC_INTERVAL_S) -> None:
        managers = ",".join(f"{n}={self.manager_url(n)}" for n in self.manager_ports)
        self.gateway = subprocess.Popen(
            [
                sys.executable, "-m", "gpufaas.core.cli", "gateway",
                "--managers", managers, "--functions", str(bundled_functions_dir()),
                "--port", str(self.gateway_port), "--sync-interval", str(sync_interval_s),
                "--grpc-port", "-1",  # no gRPC here: the default 8081 may be taken
            ],
            env=self.env,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        gateway = self.gateway
        wait_for(lambda: _alive(gateway) and _ready(self.url), timeout_s=60, what="the gateway")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def cluster(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v2/gpufaas/cluster", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def manager_functions(self, name: str) -> list[str]:
        response = httpx.get(f"{self.manager_url(name)}/v2/gpufaas/state", timeout=5)
        response.raise_for_status()
        functions: list[str] = response.json()["functions"]
        return functions

    def node_health(self) -> dict[str, bool]:
        return {n["name"]: n["healthy"] for n in self.cluster()["nodes"]}

    def stop(self) -> None:
        stop_processes([p for p in [self.gateway, *self.managers.values()] if p is not None])


@pytest.fixture(params=["framed", "http"])
def system(
    tmp_path: Path, gpufaas_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[System]:
    """The gateway -> manager calls over the managers' framed Unix sockets (as ``gpufaas up``),
    or over HTTP."""
    options = ManagerOptions(
        cpu_devices=1, device_memory="1Gi", host_memory="1Gi", artifact_dir=tmp_path / "artifacts"
    )
    sockets = tmp_path if request.param == "framed" else None
    running = System(env=gpufaas_env, options=options, sockets=sockets)
    try:
        for name in running.manager_ports:
            running.start_manager(name)
        running.start_gateway()
        yield running
    finally:
        running.stop()


def minilm_request(*, batch: int, tokens: int) -> tuple[bytes, dict[str, str]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, tokens), dtype=np.int64)
    mask = np.ones((batch, tokens), dtype=np.int64)
    return encode_request({"input_ids": (ids, "INT64"), "attention_mask": (mask, "INT64")})


def infer(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/minilm/infer", content=body, headers=headers, timeout=120)


def embeddings(response: httpx.Response) -> np.ndarray[Any, Any]:
    _, outputs = decode_response(
        response.content,
        header_length=parse_header_length(response.headers.get("inference-header-content-length")),
    )
    return outputs["embedding"]


def test_manager_killed_mid_request_is_retried_elsewhere_then_resynced(system: System) -> None:
    body, headers = minilm_request(batch=16, tokens=256)
    reference = embeddings(infer(system.url, *minilm_request(batch=16, tokens=256)))

    responses: list[httpx.Response] = []
    client = threading.Thread(target=lambda: responses.append(infer(system.url, body, headers)))
    client.start()

    def busy_node() -> str | None:
        for device in system.cluster()["devices"]:
            if device["outstanding"] > 0:
                return str(device["key"]).split("/")[0]
        return None

    wait_for(lambda: busy_node() is not None, timeout_s=30, what="the request to be in flight")
    victim = busy_node()
    assert victim is not None
    system.kill(system.managers[victim])
    client.join(timeout=120)
    assert not client.is_alive(), "the client got no answer"

    assert len(responses) == 1
    assert responses[0].status_code == 200, responses[0].text
    np.testing.assert_allclose(embeddings(responses[0]), reference, rtol=1e-4, atol=1e-5)
    health = system.node_health()
    assert health[victim] is False and sum(health.values()) == 1
    devices = {d["key"]: d for d in system.cluster()["devices"]}
    assert all(not d["residents"] for k, d in devices.items() if k.startswith(f"{victim}/"))

    system.start_manager(victim)  # the node comes back, empty
    wait_for(lambda: system.node_health()[victim], timeout_s=10, what="the re-sync")
    # The re-sync pushed every function to it (asked of the node itself: the routing policy,
    # LALB by default, would keep sending minilm to the node that holds it, never noticing).
    wait_for(
        lambda: "minilm" in system.manager_functions(victim),
        timeout_s=10,
        what="the functions pushed to the returned node",
    )
    for _ in range(6):  # each must succeed, wherever the policy sends it
        assert infer(system.url, *minilm_request(batch=1, tokens=8)).status_code == 200


def test_gateway_restart_rebuilds_the_directory(system: System) -> None:
    assert infer(system.url, *minilm_request(batch=1, tokens=8)).status_code == 200
    before = {k for d in system.cluster()["devices"] for k in (r[0] for r in d["residents"])}
    assert "minilm" in before
    assert system.gateway is not None
    system.kill(system.gateway)
    # No periodic sync for an hour: only the rebuild at start-up, before the gateway reports
    # ready, can fill the directory (with the 0.5 s sync it would fill a moment later anyway).
    system.start_gateway(sync_interval_s=3600)
    after = {k for d in system.cluster()["devices"] for k in (r[0] for r in d["residents"])}
    assert "minilm" in after


def test_all_managers_down_is_a_fast_503(system: System) -> None:
    for proc in system.managers.values():
        system.kill(proc)
    started = time.monotonic()
    response = infer(system.url, *minilm_request(batch=1, tokens=8))
    assert response.status_code == 503
    assert "no GPU manager" in response.json()["error"]
    assert response.headers.get("retry-after")
    assert time.monotonic() - started < 30
    wait_for(lambda: httpx.get(f"{system.url}/v2/health/ready", timeout=2).status_code == 503,
             timeout_s=10, what="readiness to drop")  # fmt: skip
