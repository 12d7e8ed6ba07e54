"""Fixtures shared by all test packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


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
