"""Where a replica's keyed-forward lane listens (``gpufaas gateway --forward-lane-port``): a fixed
port is served and advertised to the peers; a port it cannot listen on leaves the replica
serving without a lane (peers forward over HTTP), said in the log; the CLI refuses a port out of
range or equal to the gateway's others before anything starts."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from tiny_manager import tiny_mlp_manager

from gpufaas.scheduler.cli import gateway_command
from gpufaas.scheduler.forward_lane import LANE_PORT_KEY
from gpufaas.scheduler.local import free_port
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.peers import static_peers
from gpufaas.scheduler.replica_setup import attach_replicas

SELF = "http://127.0.0.1:9"


async def _advertised(replicas: object, *, within_s: float = 5.0) -> object:
    """The lane port in this replica's heartbeat once its listener is up (None if it never is)."""
    membership = replicas.membership  # type: ignore[attr-defined]
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        port = membership.heartbeat().get(LANE_PORT_KEY)
        if port is not None:
            return port
        await asyncio.sleep(0.02)
    return None


async def test_a_fixed_lane_port_is_served_and_advertised(
    tmp_path: Path, example_models_dir: Path
) -> None:
    port = free_port()
    async with tiny_mlp_manager(tmp_path, example_models_dir) as (url, functions):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        replicas = attach_replicas(
            gateway, self_url=SELF, discover=static_peers([SELF]), token="t", forward_lane_port=port
        )
        await gateway.start()
        try:
            assert await _advertised(replicas) == port
            _, writer = await asyncio.open_connection("127.0.0.1", port)  # listening there
            writer.close()
        finally:
            await replicas.calls.close()
            await replicas.membership.close()
            await gateway.stop()


async def test_a_lane_port_in_use_leaves_the_replica_serving_over_http(
    tmp_path: Path, example_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        async with tiny_mlp_manager(tmp_path, example_models_dir) as (url, functions):
            gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
            replicas = attach_replicas(
                gateway,
                self_url=SELF,
                discover=static_peers([SELF]),
                token="t",
                forward_lane_port=port,
            )
            with caplog.at_level(logging.ERROR, logger="gpufaas.scheduler.forward_lane"):
                await gateway.start()
                try:
                    assert await _advertised(replicas, within_s=0.5) is None  # none advertised
                    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
                    assert "Traceback" not in caplog.text
                    assert not any(r.exc_info for r in caplog.records)
                    assert gateway.functions  # still serving
                finally:
                    await replicas.calls.close()
                    await replicas.membership.close()
                    await gateway.stop()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--forward-lane-port", "70000"], "must be -1 (no lane)"),
        (["--forward-lane-port", "-2"], "must be -1 (no lane)"),
        (["--port", "8600", "--forward-lane-port", "8600"], "must differ"),
        (["--grpc-port", "8601", "--forward-lane-port", "8601"], "must differ"),
    ],
)
def test_the_cli_refuses_a_lane_port_it_cannot_use(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--managers", "http://127.0.0.1:9", "--peers", "http://127.0.0.1:9", *extra]
    assert gateway_command(argv) == 2
    assert message in capsys.readouterr().err
