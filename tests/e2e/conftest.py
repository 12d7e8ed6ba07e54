"""A running local system (``gpufaas up``) shared by the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as triton
from local_up import running_up

from gpufaas.scheduler.local import free_port

MAX_REQUEST_BYTES = 1 << 20
MANAGER_TOKEN = "e2e-manager-secret"


@pytest.fixture(scope="module")
def grpc_port() -> int:
    """The gRPC port of the ``server`` fixture's gateway."""
    return free_port()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, example_models_dir: Path, grpc_port: int
) -> Iterator[str]:
    """``gpufaas up`` on a free port; stopped with Ctrl-C (SIGINT) at the end."""
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path_factory.mktemp("home")),
        "GPUFAAS_MODELS": str(example_models_dir),
        "PYTHONUNBUFFERED": "1",
        "GPUFAAS_MANAGER_TOKEN": MANAGER_TOKEN,
    }
    args = [
        "--cpu-devices",
        "2",
        "--device-memory",
        "1Gi",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--grpc-port",
        str(grpc_port),
    ]
    with running_up(args, env=env) as url:
        yield url


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
