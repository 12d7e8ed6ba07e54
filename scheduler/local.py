"""Local mode: the whole system on one machine, without Kubernetes.

``gpufaas up`` starts one GPU-manager process per simulated node, waits until
each is ready, and then runs the gateway in this process. Ctrl-C (or SIGTERM)
stops the gateway and then the managers, within a bounded time. The managers run as
``python -m gpufaas.gpu_manager``: this module imports nothing of the GPU manager. With
``--node-transport inprocess`` the first node runs on the gateway's own event loop instead
(:func:`colocated_manager`, found through :mod:`gpufaas.core.colocated`'s entry points).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from gpufaas.core.colocated import ColocatedNode, ColocatedOptions, colocated_node
from gpufaas.core.commands import MANAGER_MODULE, ManagerOptions
from gpufaas.core.sockets import listening_socket

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now; another process may take it before it is used. A
    server this module starts gets a :func:`listener` instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listener(host: str = "127.0.0.1") -> socket.socket:
    """A socket listening on a free port of ``host``, for a server started from here: the port
    is held from this moment on, so no other process can take it between its choice and the
    server's start (the child inherits it, see ``--listen-fd``)."""
    return listening_socket(host, 0, shared=False)


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a
    killed ``gpufaas up`` never leaves GPU managers running on their own."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def manager_command(
    *,
    name: str,
    port: int,
    options: ManagerOptions,
    framed_socket: Path | None = None,
    listen_fd: int | None = None,
) -> list[str]:
    """The GPU manager's command line: a subprocess of its own, nothing of it imported here.
    ``framed_socket``: the Unix socket of its framed inference lane (``docs/dataplane.md``).
    ``listen_fd``: it serves HTTP on this inherited socket, already listening on ``port``."""
    framed = ["--framed-socket", str(framed_socket)] if framed_socket is not None else []
    inherited = ["--listen-fd", str(listen_fd)] if listen_fd is not None else []
    return [
        sys.executable, "-m", MANAGER_MODULE,
        "--name", name,
        "--host", "127.0.0.1",
        "--port", str(port),
        *inherited,
        *framed,
        *options.to_argv(),
    ]  # fmt: skip


def wait_ready(
    urls: Sequence[str],
    *,
    timeout_s: float,
    procs: Sequence[subprocess.Popen[bytes]],
    what: str = "GPU manager",
) -> None:
    """Poll each process's readiness; fail fast if one exits."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a {what} exited during start-up with code {proc.returncode}")
        url = pending[0]
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} at {url} was not ready within {timeout_s:.0f} s")
        time.sleep(0.1)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], *, timeout_s: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class ManagerProcess:
    """One GPU manager started by :func:`run_manager_processes`."""

    name: str
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def run_manager_processes(
    *,
    nodes: int,
    options: Callable[[int], ManagerOptions],
    token: str | None = None,
    sockets: Path | None = None,
    log_dir: Path | None = None,
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 10.0,
    first: int = 0,
) -> Iterator[list[ManagerProcess]]:
    """Start ``nodes`` GPU-manager processes (``node-<first>`` ...), ``options(i)`` for the i-th;
    yields them once every one is ready, and stops them on the way out.

    ``token``: each accepts work only from callers presenting it (none: any caller, whatever
    this process's environment says). ``sockets``: a folder for their framed lanes' Unix
    sockets. ``log_dir``: each writes ``manager<i>.log`` there instead of to this stdout.
    """
    procs: list[ManagerProcess] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GPUFAAS_MANAGER_TOKEN", None)
    if token:
        env["GPUFAAS_MANAGER_TOKEN"] = token
    try:
        for i in range(first, first + nodes):
            name = f"node-{i}"
            with contextlib.ExitStack() as files:
                # held here until the child has its own copy: the port is never free between
                listen = files.enter_context(listener())
                port = port_of(listen)
                command = manager_command(
                    name=name,
                    port=port,
                    options=options(i),
                    framed_socket=sockets / f"{name}.sock" if sockets is not None else None,
                    listen_fd=listen.fileno(),
                )
                log = (
                    files.enter_context((log_dir / f"manager{i}.log").open("wb"))
                    if log_dir is not None
                    else None
                )
                process = subprocess.Popen(
                    command,
                    env=env,
                    preexec_fn=die_with_parent,
                    pass_fds=(listen.fileno(),),
                    stdout=log,
                    stderr=subprocess.STDOUT if log is not None else None,
                )
            procs.append(ManagerProcess(name, f"http://127.0.0.1:{port}", process))
        wait_ready(
            [m.url for m in procs],
            timeout_s=start_timeout_s,
            procs=[m.process for m in procs],
        )
        yield procs
    finally:
        stop_processes([m.process for m in procs], timeout_s=stop_timeout_s)


@contextlib.contextmanager
def run_managers(
    *,
    nodes: int,
    options: ManagerOptions,
    token: str | None = None,
    start_timeout_s: float = 120.0,
    first: int = 0,
) -> Iterator[dict[str, str]]:
    """Start ``nodes`` GPU-manager processes (``node-<first>`` on); yields ``{node name: base
    URL}``.

    With ``token``, each manager accepts work only from callers presenting it.
    """
    # The managers share this host with the gateway: each also serves frames on a Unix socket.
    sockets = Path(tempfile.mkdtemp(prefix="gpufaas-sockets-"))  # 0700: this user only
    try:
        with run_manager_processes(
            nodes=nodes,
            options=lambda _: options,
            token=token,
            sockets=sockets,
            start_timeout_s=start_timeout_s,
            first=first,
        ) as procs:
            yield {m.name: m.url for m in procs}
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


@contextlib.contextmanager
def colocated_manager(
    *, name: str, host: str, options: ManagerOptions, token: str | None
) -> Iterator[ColocatedNode]:
    """A GPU manager for this process's event loop (``--node-transport inprocess``), built by
    whichever package offers one (:func:`gpufaas.core.colocated.colocated_node`: nothing of the
    GPU manager is imported here); not started. It also serves its HTTP API on a free port and
    frames on a Unix socket in a private folder, as a manager process would."""
    sockets = Path(tempfile.mkdtemp(prefix="gpufaas-sockets-"))  # 0700: this user only
    try:
        with listener(host) as listen:  # its port held from here on
            yield colocated_node(
                ColocatedOptions(
                    name=name,
                    host=host,
                    port=port_of(listen),
                    options=options,
                    framed_socket=sockets / f"{name}.sock",
                    token=token,
                    listener=listen,
                )
            )
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


# -- scale-out: several gateway replicas (#16) -----------------------------------------------------


@dataclass(frozen=True)
class GatewayReplicaOptions:
    host: str
    shared_port: int  # every replica listens here too (SO_REUSEPORT): the one address for clients
    functions: tuple[Path, ...]
    gateway_args: tuple[str, ...] = ()  # policy, bounds, sync interval: the same for each
    grpc: bool = False  # each replica serves gRPC too, on a port of its own


@dataclass(frozen=True)
class GatewayReplica:
    """One running replica: its own HTTP URL and, with gRPC on, its own gRPC port."""

    url: str
    grpc_port: int | None = None


def gateway_command(
    *,
    port: int,
    peers: Sequence[str],
    managers: dict[str, str],
    options: GatewayReplicaOptions,
    grpc_port: int | None = None,
    listen_fd: int | None = None,
    grpc_listen_fd: int | None = None,
) -> list[str]:
    """A replica's command line; ``listen_fd``: it serves its own port on this inherited
    socket, already listening on ``port`` (``grpc_listen_fd``: the same for ``grpc_port``)."""
    command = [
        sys.executable, "-m", "gpufaas.core.cli", "gateway",
        "--host", options.host,
        "--port", str(port),
        "--listen-fd", str(-1 if listen_fd is None else listen_fd),
        "--shared-port", str(options.shared_port),
        "--replica-url", f"http://{options.host}:{port}",
        "--peers", ",".join(peers),
        "--managers", ",".join(f"{name}={url}" for name, url in managers.items()),
        # Each replica its own gRPC port (-1: none): gRPC clients pick a replica themselves.
        "--grpc-port", str(-1 if grpc_port is None else grpc_port),
        "--grpc-listen-fd", str(-1 if grpc_listen_fd is None else grpc_listen_fd),
        *options.gateway_args,
    ]  # fmt: skip
    for path in options.functions:
        command += ["--functions", str(path)]
    return command


@contextlib.contextmanager
def run_gateways(
    *,
    replicas: int,
    managers: dict[str, str],
    options: GatewayReplicaOptions,
    token: str | None = None,
    start_timeout_s: float = 120.0,
) -> Iterator[list[GatewayReplica]]:
    """Start ``replicas`` gateway processes, each on its own port and on the shared one (and
    with ``options.grpc`` on a gRPC port of its own); yields them once every one is ready.
    They find each other from the list of their URLs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if token:
        env["GPUFAAS_MANAGER_TOKEN"] = token
    # Peers talk over the replicas' own ports: other local users must not post residency events.
    env["GPUFAAS_PEER_TOKEN"] = os.environ.get("GPUFAAS_PEER_TOKEN") or _token()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Each replica's own port is held from its choice on; the parent's copies close once
        # every replica has its own.
        with contextlib.ExitStack() as held:
            listens = [held.enter_context(listener(options.host)) for _ in range(replicas)]
            ports = [port_of(sock) for sock in listens]
            urls = [f"http://{options.host}:{port}" for port in ports]
            grpc_listens = [
                held.enter_context(listener(options.host)) if options.grpc else None
                for _ in range(replicas)
            ]
            grpc_ports = [None if g is None else port_of(g) for g in grpc_listens]
            for listen, grpc_listen, port, grpc_port in zip(
                listens, grpc_listens, ports, grpc_ports, strict=True
            ):
                held_fds = [s.fileno() for s in (listen, grpc_listen) if s is not None]
                command = gateway_command(
                    port=port,
                    peers=urls,
                    managers=managers,
                    options=options,
                    grpc_port=grpc_port,
                    listen_fd=listen.fileno(),
                    grpc_listen_fd=None if grpc_listen is None else grpc_listen.fileno(),
                )
                procs.append(
                    subprocess.Popen(
                        command, env=env, preexec_fn=die_with_parent, pass_fds=held_fds
                    )
                )
        wait_ready(urls, timeout_s=start_timeout_s, procs=procs, what="gateway replica")
        yield [GatewayReplica(u, g) for u, g in zip(urls, grpc_ports, strict=True)]
    finally:
        stop_processes(procs)


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)
