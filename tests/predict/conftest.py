"""Fixtures shared by the predictive-residency tests: a real tiny-mlp model built once per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufaas.core.examples import build_examples


@pytest.fixture(scope="module")
def tiny_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = build_examples(tmp_path_factory.mktemp("models"), names=("tiny-mlp",), progress=False)
    return built["tiny-mlp"]
