"""The ``gpufaas`` command line.

``gpufaas up`` runs everything locally; the other subcommands are the entry
points of each component's container (``gateway``, ``gpu-manager``,
``operator``, ``check-model``) and small tools (``crd``, ``validate``,
``build-examples``).

The CLI is the composition root: it is the one module in ``core`` that reaches
into the components, and it imports each one only inside its own subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufaas.core.api import ManifestError
from gpufaas.core.config import artifact_dir, models_dir
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.units import parse_bytes
from gpufaas.core.uripolicy import UriPolicy

if TYPE_CHECKING:
    from gpufaas.scheduler.gateway import GatewayConfig

DEFAULT_PORT = 8080


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-devices", type=int, default=2, help="CPU stand-in devices when no GPU is found"
    )
    parser.add_argument(
        "--device-memory", default="2Gi", help="model-cache capacity of each CPU device"
    )
    parser.add_argument("--host-memory", default="4Gi", help="capacity of the host-memory tier")
    parser.add_argument("--artifact-dir", type=Path, default=None, help="node-local artifact cache")
    parser.add_argument(
        "--force-cpu", action="store_true", help="use CPU devices even if GPUs are present"
    )


def _add_gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="lb", help="lb, lalb or lalb-o3")
    parser.add_argument("--max-request-bytes", default="64Mi", help="largest request body accepted")
    parser.add_argument(
        "--sync-interval", type=float, default=5.0, help="seconds between full re-syncs"
    )
    parser.add_argument(
        "--device-concurrency", type=int, default=4, help="requests running per device"
    )
    parser.add_argument(
        "--max-queue-per-device",
        type=int,
        default=256,
        help="waiting requests per device; past it, 429",
    )
    parser.add_argument(
        "--max-pending-per-function",
        type=int,
        default=512,
        help="requests in flight per function; past it, 429",
    )


def _add_replica_options(parser: argparse.ArgumentParser) -> None:
    """Scale-out (#16): this gateway as one of several replicas."""
    parser.add_argument(
        "--peers", default="", help="comma-separated URLs of the gateway replicas (static list)"
    )
    parser.add_argument(
        "--peer-service",
        default=None,
        help="with --kubernetes: the gateways' headless Service, to find the replicas",
    )
    parser.add_argument(
        "--replica-url",
        default=os.environ.get("GPUFAAS_REPLICA_URL") or None,
        help="how the peers reach this replica (default: http://HOST:PORT)",
    )
    parser.add_argument(
        "--shared-port",
        type=int,
        default=None,
        help="also listen on this port, shared with the other replicas (SO_REUSEPORT)",
    )
    parser.add_argument(
        "--placement-owner",
        choices=("leader", "function"),
        default="leader",
        help="which replica places models: one for all (leader) or each function's owner",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufaas", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the gateway and GPU manager(s) locally")
    up.add_argument(
        "--functions",
        type=Path,
        action="append",
        help="manifest file or folder (repeatable); default: the bundled examples",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--nodes", type=int, default=1, help="GPU-manager processes to start")
    # Scale-out (#16): N gateway processes sharing --port (SO_REUSEPORT), each on its own too.
    up.add_argument(
        "--gateways", type=int, default=1, help="gateway replicas behind --port (default 1)"
    )
    up.add_argument(
        "--placement-owner",
        choices=("leader", "function"),
        default="leader",
        help="with --gateways N: which replica places models (docs/scheduling.md, Scale-out)",
    )
    _add_gateway_options(up)
    _add_device_options(up)

    gateway = sub.add_parser("gateway", help="run the gateway")
    gateway.add_argument(
        "--managers", default="", help="comma-separated GPU-manager URLs (name=url or url)"
    )
    gateway.add_argument("--functions", type=Path, action="append", default=[])
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=DEFAULT_PORT)
    _add_gateway_options(gateway)
    gateway.add_argument(
        "--kubernetes", action="store_true", help="learn functions and managers from the cluster"
    )
    gateway.add_argument(
        "--watch-namespace", default=None, help="namespace to watch (default: all)"
    )
    gateway.add_argument("--manager-service", default="gpufaas-gpu-manager")
    gateway.add_argument("--manager-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    _add_replica_options(gateway)

    manager = sub.add_parser("gpu-manager", help="run a GPU manager (node agent)")
    manager.add_argument("--name", default=os.environ.get("NODE_NAME", "node-0"))
    manager.add_argument("--host", default="127.0.0.1")
    manager.add_argument("--port", type=int, default=8090)
    manager.add_argument(
        "--kubernetes",
        action="store_true",
        help="refuse file:// outside allowed roots and internal hosts",
    )
    manager.add_argument(
        "--allowed-file-root",
        type=Path,
        action="append",
        default=[],
        help="with --kubernetes: file:// root",
    )
    manager.add_argument(
        "--device-concurrency",
        type=int,
        default=4,
        help="requests running per device, from all gateway replicas together (0: no bound)",
    )
    _add_device_options(manager)

    sub.add_parser("crd", help="print the InferenceFunction CRD")

    validate = sub.add_parser("validate", help="validate InferenceFunction manifests")
    validate.add_argument("paths", type=Path, nargs="+")

    examples = sub.add_parser("build-examples", help="build the example models")
    examples.add_argument("--out", type=Path, default=None)
    examples.add_argument("--force", action="store_true")

    sub.add_parser(
        "check-model", help="fetch and verify a model (the operator's Job)", add_help=False
    )
    sub.add_parser("operator", help="run the Kubernetes operator", add_help=False)
    return parser


def _cmd_up(args: argparse.Namespace) -> int:
    from gpufaas.core.examples import build_examples
    from gpufaas.core.local import ManagerOptions, run_managers
    from gpufaas.scheduler.main import build_gateway, serve

    paths = args.functions or [bundled_functions_dir()]
    if not args.functions:
        build_examples(models_dir())
    functions = load_manifests(paths)
    options = ManagerOptions(
        cpu_devices=args.cpu_devices,
        device_memory=args.device_memory,
        host_memory=args.host_memory,
        artifact_dir=args.artifact_dir or artifact_dir(),
        force_cpu=args.force_cpu,
        device_concurrency=args.device_concurrency,
    )
    # Managers listen on loopback, but other local users could reach them: share a secret.
    token = os.environ.get("GPUFAAS_MANAGER_TOKEN") or secrets.token_urlsafe(32)
    if args.gateways > 1:
        return _up_replicas(args, paths=paths, options=options, token=token)
    with run_managers(nodes=args.nodes, options=options, token=token) as urls:
        gateway = build_gateway(
            manager_urls=urls,
            functions=functions,
            policy=args.policy,
            config=_gateway_config(args),
            manager_token=token,
        )
        print(
            f"gpufaas is serving {len(functions)} function(s) on http://{args.host}:{args.port}: "
            + ", ".join(f.name for f in functions),
            flush=True,
        )
        serve(gateway=gateway, host=args.host, port=args.port)
    return 0


def _up_replicas(
    args: argparse.Namespace, *, paths: Sequence[Path], options: Any, token: str
) -> int:
    """``gpufaas up --gateways N``: N gateway processes behind ``--port``."""
    from gpufaas.core.local import GatewayReplicaOptions, run_gateways, run_managers

    if args.gateways < 1:
        raise ValueError("--gateways must be at least 1")
    replica_options = GatewayReplicaOptions(
        host=args.host,
        shared_port=args.port,
        functions=tuple(paths),
        gateway_args=tuple(_gateway_args(args)),
    )
    with (
        run_managers(nodes=args.nodes, options=options, token=token) as urls,
        run_gateways(
            replicas=args.gateways, managers=urls, options=replica_options, token=token
        ) as replica_urls,
    ):
        print(
            f"gpufaas is serving on http://{args.host}:{args.port} through "
            f"{len(replica_urls)} gateway replicas: " + ", ".join(replica_urls),
            flush=True,
        )
        wait_for_signal()
    return 0


def _gateway_args(args: argparse.Namespace) -> list[str]:
    """The gateway options of ``up``, for its gateway processes."""
    return [
        "--policy", args.policy,
        "--max-request-bytes", args.max_request_bytes,
        "--sync-interval", str(args.sync_interval),
        "--device-concurrency", str(args.device_concurrency),
        "--max-queue-per-device", str(args.max_queue_per_device),
        "--max-pending-per-function", str(args.max_pending_per_function),
        "--placement-owner", args.placement_owner,
    ]  # fmt: skip


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    import signal

    wanted = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # children started before keep them
    try:
        received = signal.sigwait(wanted)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
    logging.getLogger(__name__).info("stopping on %s", signal.Signals(received).name)


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    from gpufaas.core.protocol import Limits
    from gpufaas.scheduler.gateway import GatewayConfig

    return GatewayConfig(
        limits=Limits(max_body_bytes=parse_bytes(args.max_request_bytes)),
        sync_interval_s=args.sync_interval,
        admin_token=os.environ.get("GPUFAAS_ADMIN_TOKEN") or None,
        device_concurrency=args.device_concurrency,
        max_queue_per_device=args.max_queue_per_device,
        max_pending_per_function=args.max_pending_per_function,
    )


def _parse_managers(text: str) -> dict[str, str]:
    urls: dict[str, str] = {}
    for i, item in enumerate(part.strip() for part in text.split(",") if part.strip()):
        name, _, url = item.rpartition("=") if "=" in item else (f"node-{i}", "", item)
        urls[name] = url
    return urls


def _cmd_gateway(args: argparse.Namespace) -> int:
    from gpufaas.scheduler.main import build_gateway, enable_kubernetes, serve

    urls = _parse_managers(args.managers)
    if not urls and not args.kubernetes:
        print("gpufaas gateway: give --managers URL[,URL...] or --kubernetes", file=sys.stderr)
        return 2
    functions = load_manifests(args.functions) if args.functions else []
    gateway = build_gateway(
        manager_urls=urls,
        functions=functions,
        policy=args.policy,
        config=_gateway_config(args),
        manager_token=os.environ.get("GPUFAAS_MANAGER_TOKEN") or None,
    )
    if args.kubernetes:
        enable_kubernetes(
            gateway,
            watch_namespace=args.watch_namespace,
            manager_service=args.manager_service,
            manager_namespace=args.manager_namespace,
        )
    if args.peers or args.peer_service:
        from gpufaas.scheduler.replicas import enable_replicas, serve_replica

        enable_replicas(
            gateway,
            self_url=args.replica_url or f"http://{args.host}:{args.port}",
            peers=[u for u in args.peers.split(",") if u.strip()],
            peer_service=args.peer_service if args.kubernetes else None,
            namespace=args.manager_namespace,
            ownership=args.placement_owner,
        )
        serve_replica(gateway=gateway, host=args.host, port=args.port, shared_port=args.shared_port)
        return 0
    serve(gateway=gateway, host=args.host, port=args.port)
    return 0


def _cmd_gpu_manager(args: argparse.Namespace) -> int:
    from gpufaas.gpu_manager.main import build_runtime, serve

    runtime = build_runtime(
        cpu_devices=args.cpu_devices,
        device_memory_bytes=parse_bytes(args.device_memory),
        host_memory_bytes=parse_bytes(args.host_memory),
        artifact_dir=args.artifact_dir or artifact_dir(),
        force_cpu=args.force_cpu,
        # In a cluster, manifest authors choose the URIs: no local files, no internal hosts.
        uri_policy=UriPolicy.for_kubernetes(file_roots=args.allowed_file_root)
        if args.kubernetes
        else None,
    )
    serve(
        runtime=runtime,
        host=args.host,
        port=args.port,
        name=args.name,
        device_concurrency=args.device_concurrency or None,
    )
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from gpufaas.core.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    functions = load_manifests(args.paths, variables={"GPUFAAS_MODELS": "/models"})
    for function in functions:
        print(f"{function.name}: valid")
    return 0


def _cmd_build_examples(args: argparse.Namespace) -> int:
    from gpufaas.core.examples import build_examples

    for name, path in build_examples(args.out or models_dir(), force=args.force).items():
        print(f"{name}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands that own their argument parsing.
    if argv[:1] == ["check-model"]:
        from gpufaas.core.modelcheck import run_check_model_cli

        return run_check_model_cli(argv[1:])
    if argv[:1] == ["operator"]:
        from gpufaas.operator.main import run_operator

        return run_operator(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "up": _cmd_up,
        "gateway": _cmd_gateway,
        "gpu-manager": _cmd_gpu_manager,
        "crd": _cmd_crd,
        "validate": _cmd_validate,
        "build-examples": _cmd_build_examples,
    }
    try:
        return commands[args.command](args)
    except (ManifestError, ValueError) as e:
        print(f"gpufaas {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
