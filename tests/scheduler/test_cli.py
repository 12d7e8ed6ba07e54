"""The gateway's command line: a gRPC port in use is a clear error, not a traceback; so is an
in-process node where there cannot be one."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from gpufaas.scheduler.cli import gateway_command, up_command


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


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        (up_command, ["--gateways", "2"], "needs --gateways 1 and --nodes of at least 1"),
        (up_command, ["--nodes", "0"], "needs --gateways 1 and --nodes of at least 1"),
        (gateway_command, ["--managers", "http://127.0.0.1:1"], "is for gpufaas up"),
    ],
    ids=["up-replicas", "up-no-node", "gateway"],
)
def test_an_inprocess_node_where_there_can_be_none_exits_2_naming_why(
    command: object, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(command)
    assert command(["--node-transport", "inprocess", *argv]) == 2
    assert message in capsys.readouterr().err
