"""A running local system (``gpufaas up``) shared by the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton

from gpufaas.core.local import die_with_parent, free_port

MAX_REQUEST_BYTES = 1 << 20
MANAGER_TOKEN = "e2e-manager-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, example_models_dir: Path) -> Iterator[str]:
    """``gpufaas up`` on a free port; stopped with Ctrl-C (SIGINT) at the end."""
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(home),
        "GPUFAAS_MODELS": str(example_models_dir),
        "PYTHONUNBUFFERED": "1",
        "GPUFAAS_MANAGER_TOKEN": MANAGER_TOKEN,
    }
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gpufaas.core.cli", "up",
            "--port", str(port), "--cpu-devices", "2", "--device-memory", "1Gi",
            "--max-request-bytes", str(MAX_REQUEST_BYTES),
        ],
        env=env,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"gpufaas up exited early with {proc.returncode}"
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "gpufaas up was not ready within 120 s"
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("gpufaas up did not stop within 30 s of Ctrl-C")
    assert code in (0, 130, -signal.SIGINT), f"unclean exit code {code}"


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(
        server.removeprefix("http://"), connection_timeout=60, network_timeout=120
    )
    yield c
    c.close()


@pytest.fixture(scope="session")
def request_limit() -> int:
    """The --max-request-bytes the ``server`` fixture runs with."""
    return MAX_REQUEST_BYTES


@pytest.fixture(scope="session")
def manager_token() -> str:
    """The secret the ``server`` fixture's gateway and GPU managers share."""
    return MANAGER_TOKEN
