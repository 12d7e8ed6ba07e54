"""Subcommands over ``core`` alone (``crd``, ``validate``, ``build-examples``), and the GPU
manager's command-line contract (:class:`ManagerOptions`), which both the local launcher
(``scheduler``) and the node (``gpu_manager``) speak without importing each other.

Each ``*_command(argv) -> int`` is an entry point of the ``gpufaas.commands`` group
(see :mod:`gpufaas.core.cli`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufaas.core.api import ManifestError
from gpufaas.core.config import artifact_dir, models_dir
from gpufaas.core.manifests import load_manifests

MANAGER_MODULE = "gpufaas.gpu_manager"  # ``python -m`` runs the GPU manager


@dataclass(frozen=True)
class ManagerOptions:
    """The device options of a GPU manager: parsed by the node, written by the launcher."""

    cpu_devices: int = 2
    device_memory: str = "2Gi"
    host_memory: str = "4Gi"
    artifact_dir: Path | None = None
    force_cpu: bool = False
    # Requests running per device, from every gateway replica together (scale-out, #16).
    device_concurrency: int = 4

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cpu-devices", type=int, default=2, help="CPU stand-in devices when no GPU is found"
        )
        parser.add_argument(
            "--device-memory", default="2Gi", help="model-cache capacity of each CPU device"
        )
        parser.add_argument("--host-memory", default="4Gi", help="capacity of the host-memory tier")
        parser.add_argument(
            "--artifact-dir", type=Path, default=None, help="node-local artifact cache"
        )
        parser.add_argument(
            "--force-cpu", action="store_true", help="use CPU devices even if GPUs are present"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ManagerOptions:
        return cls(
            cpu_devices=args.cpu_devices,
            device_memory=args.device_memory,
            host_memory=args.host_memory,
            artifact_dir=args.artifact_dir or artifact_dir(),
            force_cpu=args.force_cpu,
            # The node's own option; in `gpufaas up`, the gateway's (the same bound).
            device_concurrency=getattr(args, "device_concurrency", 4),
        )

    def to_argv(self) -> list[str]:
        argv = [
            "--cpu-devices", str(self.cpu_devices),
            "--device-memory", self.device_memory,
            "--host-memory", self.host_memory,
            "--artifact-dir", str(self.artifact_dir or artifact_dir()),
        ]  # fmt: skip
        if self.force_cpu:
            argv.append("--force-cpu")
        argv += ["--device-concurrency", str(self.device_concurrency)]
        return argv


def _run(name: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    parser.prog = f"gpufaas {name}"
    return parser.parse_args(list(argv))


def crd_command(argv: Sequence[str]) -> int:
    """Print the InferenceFunction CRD."""
    from gpufaas.core.crd import render_crd_yaml

    _run("crd", argparse.ArgumentParser(description=crd_command.__doc__), argv)
    sys.stdout.write(render_crd_yaml())
    return 0


def validate_command(argv: Sequence[str]) -> int:
    """Validate InferenceFunction manifests."""
    parser = argparse.ArgumentParser(description=validate_command.__doc__)
    parser.add_argument("paths", type=Path, nargs="+")
    args = _run("validate", parser, argv)
    try:
        functions = load_manifests(args.paths, variables={"GPUFAAS_MODELS": "/models"})
    except (ManifestError, ValueError) as e:
        print(f"gpufaas validate: {e}", file=sys.stderr)
        return 2
    for function in functions:
        print(f"{function.name}: valid")
    return 0


def build_examples_command(argv: Sequence[str]) -> int:
    """Build the example models."""
    from gpufaas.core.examples import build_examples

    parser = argparse.ArgumentParser(description=build_examples_command.__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = _run("build-examples", parser, argv)
    for name, path in build_examples(args.out or models_dir(), force=args.force).items():
        print(f"{name}: {path}")
    return 0
