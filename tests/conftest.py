"""Fixtures shared by all test packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# grpcio 1.81+ (grpc/grpc#43055): with a channel open in this process, a subprocess started
# with preexec_fn (fork, then close_fds) can abort (SIGABRT) before its exec, when grpc's
# post-fork handler restarts a poller whose epoll fd close_fds then closes. The e2e tests hold
# tritonclient.grpc channels while they start `gpufaas up` (die_with_parent is a preexec_fn);
# 9 of 1,000 such starts aborted here, none with fork support off. Read when grpc is first
# imported, so it is set before any test module imports it. The gateway itself opens no grpcio
# channel (its gRPC server is scheduler/grpc_h2.py), so a served process is not exposed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three example models, built once per test session."""
    from gpufaas.core.examples import build_examples

    return build_examples(tmp_path_factory.mktemp("models"), progress=False)


@pytest.fixture(scope="session")
def example_models_dir(example_models: dict[str, Path]) -> Path:
    return next(iter(example_models.values())).parent


@pytest.fixture
def gpufaas_env(tmp_path: Path, example_models_dir: Path) -> Iterator[dict[str, str]]:
    """Environment for a gpufaas process: private home, prebuilt example models."""
    yield {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path / "home"),
        "GPUFAAS_MODELS": str(example_models_dir),
        "PYTHONUNBUFFERED": "1",
    }
