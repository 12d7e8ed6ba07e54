"""The gateway's command line: a gRPC port in use is a clear error, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_a_grpc_port_in_use_exits_2_naming_it() -> None:
    with socket.socket() as busy, socket.socket() as spare:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        spare.bind(("127.0.0.1", 0))
        http_port = spare.getsockname()[1]
        spare.close()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "gpufaas.core.cli", "gateway",
                "--managers", "http://127.0.0.1:1",
                "--port", str(http_port), "--grpc-port", str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot bind the gRPC port 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
