"""``gpufaas gpu-manager`` (also ``python -m gpufaas.gpu_manager``): run the node agent.

Its device options are :class:`gpufaas.core.commands.ManagerOptions`, the contract the local
launcher writes; it is an entry point of the ``gpufaas.commands`` group.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gpufaas.core.commands import ManagerOptions
from gpufaas.core.config import artifact_dir
from gpufaas.core.sockets import inherited_listener
from gpufaas.core.units import parse_bytes
from gpufaas.core.uripolicy import UriPolicy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpufaas gpu-manager", description="Run a GPU manager (node agent)."
    )
    parser.add_argument("--name", default=os.environ.get("NODE_NAME", "node-0"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument(
        "--listen-fd",
        type=int,
        default=-1,
        help="serve HTTP on this inherited, already listening socket instead of binding "
        "--host:--port (how gpufaas up starts managers: no port race); -1: bind",
    )
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        help="refuse file:// outside allowed roots and internal hosts",
    )
    parser.add_argument(
        "--allowed-file-root",
        type=Path,
        action="append",
        default=[],
        help="with --kubernetes: file:// root",
    )
    ManagerOptions.add_arguments(parser)
    parser.add_argument(
        "--device-concurrency",
        type=int,
        default=4,
        help="requests running per device, from all gateway replicas together (0: no bound)",
    )
    # The gateway's fast lane (gpu_manager/framed.py): framed inference, no HTTP per request.
    parser.add_argument(
        "--framed-socket",
        type=Path,
        default=None,
        help="also serve framed inference on this Unix socket (a gateway on the same host)",
    )
    parser.add_argument(
        "--framed-port",
        type=int,
        default=-1,
        help="also serve framed inference on this TCP port of --host (-1: none, 0: any free)",
    )
    # The disk tier: loading-optimised sidecars on node-local disk, within this budget.
    parser.add_argument(
        "--disk-cache",
        default="32Gi",
        help="disk-tier budget for model sidecars on node-local disk (0: no sidecars)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a GPU manager (node agent)."""
    from gpufaas.gpu_manager.main import build_runtime, serve
    from gpufaas.gpu_manager.server import FramedListen

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        device_memory = parse_bytes(args.device_memory)
        host_memory = parse_bytes(args.host_memory)
        disk_cache = parse_bytes(args.disk_cache)
    except ValueError as e:
        print(f"gpufaas gpu-manager: {e}", file=sys.stderr)
        return 2
    try:
        listen = inherited_listener(args.listen_fd) if args.listen_fd >= 0 else None
    except OSError as e:
        print(f"gpufaas gpu-manager: --listen-fd: {e}", file=sys.stderr)
        return 2
    from gpufaas.gpu_manager.inventory import DeviceSetupError

    try:
        runtime = build_runtime(
            cpu_devices=args.cpu_devices,
            device_memory_bytes=device_memory,
            host_memory_bytes=host_memory,
            disk_cache_bytes=disk_cache,
            artifact_dir=args.artifact_dir or artifact_dir(),
            force_cpu=args.force_cpu,
            # In a cluster, manifest authors choose the URIs: no local files, no internal hosts.
            uri_policy=UriPolicy.for_kubernetes(file_roots=args.allowed_file_root)
            if args.kubernetes
            else None,
        )
    except DeviceSetupError as e:  # no silent CPU fall-back: say why, exit non-zero
        print(f"gpufaas gpu-manager: {e}", file=sys.stderr)
        return 2
    serve(
        runtime=runtime,
        host=args.host,
        port=args.port,
        listener=listen,
        name=args.name,
        device_concurrency=args.device_concurrency or None,
        framed=FramedListen(
            unix_path=args.framed_socket,
            host=args.host,
            port=None if args.framed_port < 0 else args.framed_port,
        )
        if args.framed_socket is not None or args.framed_port >= 0
        else None,
    )
    return 0
