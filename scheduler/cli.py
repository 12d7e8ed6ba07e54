"""The composition root: ``gpufaas up`` (the whole system locally) and ``gpufaas gateway``.

``up`` runs the gateway in this process and each GPU manager as a subprocess
(``python -m gpufaas.gpu_manager``, see :mod:`gpufaas.scheduler.local`), so the gateway and the
node still meet only over the wire. Both are entry points of the ``gpufaas.commands`` group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpufaas.core.api import ManifestError
from gpufaas.core.commands import ManagerOptions
from gpufaas.core.config import models_dir
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.sockets import inherited_listener
from gpufaas.core.units import parse_bytes

if TYPE_CHECKING:
    from gpufaas.core.api import InferenceFunction
    from gpufaas.core.colocated import ColocatedNode
    from gpufaas.scheduler.gateway import Gateway, GatewayConfig

DEFAULT_PORT = 8080
DEFAULT_GRPC_PORT = 8081
# The best routing policy measured (bench/RESULTS.md, "LALB"): the chart's default too.
DEFAULT_POLICY = "lalb-o3"


def _add_gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help="port of the OIP v2 gRPC service (KServe GRPCInferenceService); -1: none",
    )
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="lb, lalb or lalb-o3")
    parser.add_argument("--max-request-bytes", default="64Mi", help="largest request body accepted")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        help="open client connections to the HTTP front at most; one more is answered 503 "
        "and closed (0: no cap)",
    )
    parser.add_argument(
        "--shard-passes",
        choices=("single", "shared"),
        default="single",
        help="sharded models (spec.parallelism): one pass per request (single), or concurrent "
        "requests joining one pass through the shard set (shared; docs/distributed.md)",
    )
    parser.add_argument(
        "--node-transport",
        choices=("framed", "http", "inprocess"),
        default="framed",
        help="inference calls to the GPU managers: frames where a manager serves them "
        "(docs/dataplane.md), else HTTP; http: always HTTP; inprocess (gpufaas up): node-0 "
        "runs in the gateway's process and is called in-process, the others framed",
    )
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


def _add_prefetch_options(parser: argparse.ArgumentParser) -> None:
    # Predictive residency (#13, docs/prediction.md).
    parser.add_argument(
        "--prefetch",
        choices=("off", "predictive", "hybrid", "keepalive"),
        default="off",
        help="learn arrivals; demote and prefetch models ahead of requests (keepalive: demote "
        "after a fixed idle time, never prefetch)",
    )
    parser.add_argument(
        "--prefetch-state", type=Path, default=None, help="file the arrival model persists to"
    )
    parser.add_argument(
        "--prefetch-param",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="a parameter of the residency policy, e.g. device_price=0.1 or keepalive_s=600; "
        "predictive's break-even floor and LRU-veto victims are on by default, break_even=0 / "
        "lru_veto=0 turn them off "
        "(repeatable; docs/prediction.md)",
    )
    parser.add_argument(
        "--prefetch-time-scale",
        type=float,
        default=1.0,
        help="run the policy's clock this many times faster than wall time (a compressed trace "
        "replay, bench/predict_live.py); 1: real time",
    )
    parser.add_argument(
        "--prefetch-demote-only",
        action="store_true",
        help="learn and demote, never prefetch (the ablation of the warm-p99 goal)",
    )


def prefetch_params(items: Sequence[str]) -> dict[str, float]:
    """``["name=number", ...]`` -> ``{name: number}``; a clear error for anything else."""
    params: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            params[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--prefetch-param: expected NAME=NUMBER, got {item!r}") from None
    return params


def enable_prefetch_option(gateway: Gateway, args: argparse.Namespace) -> None:
    if args.prefetch == "off":
        return
    from gpufaas.cache.arrivals import ArrivalError
    from gpufaas.cache.arrivals import make_policy as make_residency_policy
    from gpufaas.scheduler.prefetch import enable_prefetch

    # the options added for the live replay (#13) have defaults for callers that predate them
    time_scale = float(getattr(args, "prefetch_time_scale", 1.0))
    if not (time_scale > 0 and time_scale < float("inf")):
        raise SystemExit(f"--prefetch-time-scale must be > 0, got {time_scale}")
    try:
        params = prefetch_params(getattr(args, "prefetch_param", []))
        policy = make_residency_policy(args.prefetch, **params)
    except (ArrivalError, TypeError) as e:
        raise SystemExit(f"--prefetch {args.prefetch}: {e}") from None
    enable_prefetch(
        gateway,
        policy=policy,
        state_file=args.prefetch_state,
        time_scale=time_scale,
        prefetch=not getattr(args, "prefetch_demote_only", False),
    )


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
        transport=_TRANSPORTS[args.node_transport],
        max_connections=args.max_connections or None,
        shard_shared_passes=args.shard_passes == "shared",
    )


_TRANSPORTS: dict[str, Literal["framed", "inprocess", "pooled"]] = {
    "framed": "framed",
    "inprocess": "inprocess",
    "http": "pooled",
}


def parse_managers(text: str) -> dict[str, str]:
    """``name=url,url,...`` -> ``{name: url}`` (unnamed ones are ``node-<i>``)."""
    urls: dict[str, str] = {}
    for i, item in enumerate(part.strip() for part in text.split(",") if part.strip()):
        name, _, url = item.rpartition("=") if "=" in item else (f"node-{i}", "", item)
        urls[name] = url
    return urls


def _add_replica_options(parser: argparse.ArgumentParser) -> None:
    """Scale-out (#16): this gateway as one of several replicas."""
    parser.add_argument(
        "--listen-fd",
        type=int,
        default=-1,
        help="with --peers: serve this replica's own port on this inherited, already listening "
        "socket instead of binding --host:--port (how gpufaas up starts replicas); -1: bind",
    )
    parser.add_argument(
        "--grpc-listen-fd",
        type=int,
        default=-1,
        help="with --peers and --grpc-port: serve gRPC on this inherited, already listening "
        "socket instead of binding --host:--grpc-port (how gpufaas up starts replicas); -1: bind",
    )
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
        "--forward-lane-port",
        type=int,
        default=0,
        help="with replicas: the port of this replica's keyed-forward lane, on the host of "
        "--replica-url (0: an ephemeral port, advertised to the peers; -1: no lane, peers "
        "forward here over HTTP). Fix it where a NetworkPolicy lists the ports",
    )
    _add_placement_option(parser)


def _add_placement_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--placement-owner",
        choices=("leader", "function"),
        default="leader",
        help="with replicas: which one places models, one for all (leader) or each function's "
        "owner (docs/scheduling.md, Scale-out)",
    )
    parser.add_argument(
        "--replica-slots",
        choices=("full", "share"),
        default="full",
        help="with replicas: each may use all of a device's --device-concurrency slots, the GPU "
        "manager bounding them cluster-wide (full), or ceil(slots / replicas) each (share)",
    )
    parser.add_argument(
        "--replica-forward",
        choices=("request", "decision"),
        default="request",
        help="with replicas: for a placement, forward the whole request to the placement owner "
        "(request), or ask it for its decision and dispatch here (decision; docs/scheduling.md)",
    )


def _up_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpufaas up", description="Run the gateway and GPU manager(s) locally."
    )
    parser.add_argument(
        "--functions",
        type=Path,
        action="append",
        help="manifest file or folder (repeatable); default: the bundled examples",
    )
    parser.add_argument("--nodes", type=int, default=1, help="GPU-manager processes to start")
    # Scale-out (#16): N gateway processes sharing --port (SO_REUSEPORT), each on its own too.
    parser.add_argument(
        "--gateways", type=int, default=1, help="gateway replicas behind --port (default 1)"
    )
    _add_placement_option(parser)
    parser.add_argument(
        "--channel",
        choices=["direct", "nats", "s3"],
        default="direct",
        help="channel of sharded models; nats/s3 start a local server (docs/distributed.md)",
    )
    _add_gateway_options(parser)
    _add_prefetch_options(parser)
    ManagerOptions.add_arguments(parser)
    return parser


def up_command(argv: Sequence[str]) -> int:
    """Run the gateway and GPU manager(s) locally."""
    from gpufaas.core.examples import build_examples
    from gpufaas.scheduler.local import run_managers
    from gpufaas.scheduler.main import build_gateway

    args = _up_parser().parse_args(list(argv))
    if args.node_transport == "inprocess" and (args.gateways != 1 or args.nodes < 1):
        print(
            "gpufaas up: --node-transport inprocess runs node-0 in the one gateway's process: "
            "it needs --gateways 1 and --nodes of at least 1",
            file=sys.stderr,
        )
        return 2
    if args.gateways != 1 and args.prefetch_state is not None:  # one file per replica (#13)
        print("gpufaas up: --prefetch-state needs --gateways 1", file=sys.stderr)
        return 2
    try:
        paths = args.functions or [bundled_functions_dir()]
        if not args.functions:
            build_examples(models_dir())
        functions = load_manifests(paths)
        config = _gateway_config(args)
    except (ManifestError, ValueError) as e:
        print(f"gpufaas up: {e}", file=sys.stderr)
        return 2
    # Managers listen on loopback, but other local users could reach them: share a secret.
    token = os.environ.get("GPUFAAS_MANAGER_TOKEN") or secrets.token_urlsafe(32)
    options = ManagerOptions.from_args(args)
    # Sharded models' channel server (FSD-Inference): started here, stopped on exit.
    from gpufaas.core.channelservers import CHANNEL_ENV, run_channel
    from gpufaas.core.config import artifact_dir

    channel = contextlib.ExitStack()
    os.environ[CHANNEL_ENV] = run_channel(args.channel, artifact_dir().parent / "channel", channel)
    if args.gateways != 1:  # scale-out (#16): N gateway processes
        with channel:
            return _up_replicas(args, paths=paths, options=options, token=token)
    if config.transport == "inprocess":
        with channel:
            return _up_colocated(
                args, functions=functions, config=config, options=options, token=token
            )
    with channel, run_managers(nodes=args.nodes, options=options, token=token) as urls:
        gateway = build_gateway(
            manager_urls=urls,
            functions=functions,
            policy=args.policy,
            config=config,
            manager_token=token,
        )
        enable_prefetch_option(gateway, args)
        print(
            f"gpufaas is serving {len(functions)} function(s) on http://{args.host}:{args.port}"
            + ("" if args.grpc_port < 0 else f" and grpc {args.host}:{args.grpc_port}")
            + ": "
            + ", ".join(f.name for f in functions),
            flush=True,
        )
        return _serve(gateway, args, command="up")


def _up_colocated(
    args: argparse.Namespace,
    *,
    functions: Sequence[InferenceFunction],
    config: GatewayConfig,
    options: ManagerOptions,
    token: str,
) -> int:
    """``gpufaas up --node-transport inprocess``: node-0 on the gateway's event loop, called
    in-process; any further nodes as processes, called framed."""
    from gpufaas.core.colocated import NoColocatedNode
    from gpufaas.scheduler.local import colocated_manager, run_managers
    from gpufaas.scheduler.main import build_gateway

    try:
        local_node = colocated_manager(
            name="node-0", host="127.0.0.1", options=options, token=token
        )
        with (
            local_node as node,
            run_managers(nodes=args.nodes - 1, first=1, options=options, token=token) as urls,
        ):
            gateway = build_gateway(
                manager_urls={node.name: node.url, **urls},
                functions=functions,
                policy=args.policy,
                config=config,
                manager_token=token,
            )
            gateway.lanes.attach(node.name, node.answer)
            enable_prefetch_option(gateway, args)
            print(
                f"gpufaas is serving {len(functions)} function(s) on http://{args.host}:{args.port}"
                f" with {node.name} in-process: " + ", ".join(f.name for f in functions),
                flush=True,
            )
            return _serve(gateway, args, command="up", colocated=[node])
    except NoColocatedNode as e:
        print(f"gpufaas up: {e}", file=sys.stderr)
        return 2


def _serve(
    gateway: Gateway,
    args: argparse.Namespace,
    *,
    command: str,
    colocated: Sequence[ColocatedNode] = (),
) -> int:
    from gpufaas.scheduler.main import serve

    try:
        serve(
            gateway=gateway,
            host=args.host,
            port=args.port,
            grpc_port=_grpc_port(args),
            colocated=colocated,
        )
    except OSError as e:  # a port in use: say which, no traceback
        print(f"gpufaas {command}: {e}", file=sys.stderr)
        return 2
    return 0


def _up_replicas(
    args: argparse.Namespace, *, paths: Sequence[Path], options: Any, token: str
) -> int:
    """``gpufaas up --gateways N``: N gateway processes behind ``--port``."""
    from gpufaas.scheduler.local import GatewayReplicaOptions, run_gateways, run_managers

    if args.gateways < 1:
        print("gpufaas up: --gateways must be at least 1", file=sys.stderr)
        return 2
    replica_options = GatewayReplicaOptions(
        host=args.host,
        shared_port=args.port,
        functions=tuple(paths),
        gateway_args=tuple(_gateway_args(args)),
        grpc=args.grpc_port >= 0,
    )
    with (
        run_managers(nodes=args.nodes, options=options, token=token) as urls,
        run_gateways(
            replicas=args.gateways, managers=urls, options=replica_options, token=token
        ) as replicas,
    ):
        print(
            f"gpufaas is serving on http://{args.host}:{args.port} through "
            f"{len(replicas)} gateway replicas: " + ", ".join(r.url for r in replicas),
            flush=True,
        )
        if args.grpc_port >= 0:  # each replica its own gRPC port (clients choose a replica)
            print(
                "gateway replicas' gRPC (KServe v2): "
                + ", ".join(f"{args.host}:{r.grpc_port}" for r in replicas),
                flush=True,
            )
        wait_for_signal()
    return 0


def _gateway_args(args: argparse.Namespace) -> list[str]:
    """The gateway options of ``up``, for its gateway processes."""
    return [
        "--policy", args.policy,
        "--max-request-bytes", args.max_request_bytes,
        "--max-connections", str(args.max_connections),
        "--shard-passes", args.shard_passes,
        "--sync-interval", str(args.sync_interval),
        "--device-concurrency", str(args.device_concurrency),
        "--max-queue-per-device", str(args.max_queue_per_device),
        "--max-pending-per-function", str(args.max_pending_per_function),
        "--placement-owner", args.placement_owner,
        "--replica-slots", args.replica_slots,
        "--replica-forward", args.replica_forward,
        *_prefetch_args(args),
    ]  # fmt: skip


def _prefetch_args(args: argparse.Namespace) -> list[str]:
    """The prefetch options of ``up``, for its gateway processes (#13; docs/prediction.md)."""
    if args.prefetch == "off":
        return []
    params = [x for item in args.prefetch_param for x in ("--prefetch-param", item)]
    demote_only = ["--prefetch-demote-only"] if args.prefetch_demote_only else []
    return [
        "--prefetch", args.prefetch,
        "--prefetch-time-scale", str(args.prefetch_time_scale),
        *params,
        *demote_only,
    ]  # fmt: skip


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    import logging
    import signal

    wanted = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # children started before keep them
    try:
        received = signal.sigwait(wanted)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
    logging.getLogger(__name__).info("stopping on %s", signal.Signals(received).name)


def _grpc_port(args: argparse.Namespace) -> int | None:
    return None if args.grpc_port < 0 else int(args.grpc_port)


def _gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufaas gateway", description="Run the gateway.")
    parser.add_argument(
        "--managers", default="", help="comma-separated GPU-manager URLs (name=url or url)"
    )
    parser.add_argument("--functions", type=Path, action="append", default=[])
    _add_gateway_options(parser)
    _add_prefetch_options(parser)
    parser.add_argument(
        "--kubernetes", action="store_true", help="learn functions and managers from the cluster"
    )
    parser.add_argument("--watch-namespace", default=None, help="namespace to watch (default: all)")
    parser.add_argument("--manager-service", default="gpufaas-gpu-manager")
    parser.add_argument("--manager-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    _add_replica_options(parser)
    return parser


def _forward_lane_port(args: argparse.Namespace) -> int | None:
    """``--forward-lane-port`` as ``enable_replicas`` takes it: None for no lane (-1)."""
    port: int = args.forward_lane_port
    if not -1 <= port <= 65535:
        raise ValueError(
            f"--forward-lane-port must be -1 (no lane), 0 (an ephemeral port) or a port up to "
            f"65535, got {port}"
        )
    if port > 0 and port in (args.port, args.grpc_port, args.shared_port):
        raise ValueError(f"--forward-lane-port {port} must differ from the gateway's other ports")
    return None if port < 0 else port


def gateway_command(argv: Sequence[str]) -> int:
    """Run the gateway."""
    from gpufaas.scheduler.main import build_gateway, enable_kubernetes

    args = _gateway_parser().parse_args(list(argv))
    if args.node_transport == "inprocess":
        print(
            "gpufaas gateway: --node-transport inprocess is for gpufaas up (a GPU manager in the "
            "gateway's process); a gateway on its own calls its managers framed or over HTTP",
            file=sys.stderr,
        )
        return 2
    urls = parse_managers(args.managers)
    if not urls and not args.kubernetes:
        print("gpufaas gateway: give --managers URL[,URL...] or --kubernetes", file=sys.stderr)
        return 2
    try:
        functions = load_manifests(args.functions) if args.functions else []
        config = _gateway_config(args)
        lane_port = _forward_lane_port(args)
    except (ManifestError, ValueError) as e:
        print(f"gpufaas gateway: {e}", file=sys.stderr)
        return 2
    gateway = build_gateway(
        manager_urls=urls,
        functions=functions,
        policy=args.policy,
        config=config,
        manager_token=os.environ.get("GPUFAAS_MANAGER_TOKEN") or None,
    )
    enable_prefetch_option(gateway, args)
    if args.kubernetes:
        enable_kubernetes(
            gateway,
            watch_namespace=args.watch_namespace,
            manager_service=args.manager_service,
            manager_namespace=args.manager_namespace,
        )
    if args.peers or args.peer_service:
        from gpufaas.scheduler.replica_setup import enable_replicas, serve_replica

        enable_replicas(
            gateway,
            self_url=args.replica_url or f"http://{args.host}:{args.port}",
            peers=[u for u in args.peers.split(",") if u.strip()],
            peer_service=args.peer_service if args.kubernetes else None,
            namespace=args.manager_namespace,
            ownership=args.placement_owner,
            slots=args.replica_slots,
            forwarding=args.replica_forward,
            forward_lane_port=lane_port,
        )
        try:
            serve_replica(
                gateway=gateway,
                host=args.host,
                port=args.port,
                own=inherited_listener(args.listen_fd) if args.listen_fd >= 0 else None,
                own_grpc=(
                    inherited_listener(args.grpc_listen_fd) if args.grpc_listen_fd >= 0 else None
                ),
                shared_port=args.shared_port,
                grpc_port=_grpc_port(args),
            )
        except OSError as e:  # a port in use: say which, no traceback
            print(f"gpufaas gateway: {e}", file=sys.stderr)
            return 2
        return 0
    return _serve(gateway, args, command="gateway")
