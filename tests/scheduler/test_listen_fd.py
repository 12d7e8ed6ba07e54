"""The servers ``gpufaas up`` starts (GPU managers, gateway replicas) serve on a socket it bound
for them and passed down (``--listen-fd``): each port is held from its choice on, so no other
process can take it while the child starts."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient

from gpufaas.core.commands import ManagerOptions
from gpufaas.core.sockets import inherited_listener
from gpufaas.scheduler import local
from gpufaas.scheduler.local import GatewayReplicaOptions, run_gateways, run_manager_processes


def _held(url: str) -> bool:
    """Whether something holds ``url``'s port: a plain bind of it is refused."""
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False


def _check_ports_before_ready(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for each URL ``wait_ready`` is given, whether its port is held at that moment:
    the children are still importing Python then, long before they could bind anything."""
    seen: list[bool] = []
    real: Callable[..., None] = local.wait_ready

    def checking(urls: Sequence[str], **kwargs: Any) -> None:
        seen.extend(_held(u) for u in urls)
        real(urls, **kwargs)

    monkeypatch.setattr(local, "wait_ready", checking)
    return seen


def _options(tmp_path: Path) -> Callable[[int], ManagerOptions]:
    return lambda i: ManagerOptions(
        cpu_devices=1,
        device_memory="64Mi",
        host_memory="64Mi",
        artifact_dir=tmp_path / f"artifacts{i}",
        force_cpu=True,
    )


@pytest.mark.slow
def test_managers_and_replicas_ports_are_held_from_their_choice_until_they_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _check_ports_before_ready(monkeypatch)
    with run_manager_processes(nodes=2, options=_options(tmp_path), log_dir=tmp_path) as managers:
        assert seen == [True, True]
        for manager in managers:
            assert httpx.get(f"{manager.url}/v2/health/live", timeout=5).status_code == 200
        seen.clear()
        options = GatewayReplicaOptions(
            host="127.0.0.1", shared_port=local.free_port(), functions=()
        )
        with run_gateways(
            replicas=2, managers={m.name: m.url for m in managers}, options=options
        ) as replicas:
            assert seen == [True, True]
            for replica in replicas:
                assert httpx.get(f"{replica.url}/v2/health/live", timeout=5).status_code == 200


@pytest.mark.slow
def test_replicas_grpc_ports_are_held_from_their_choice_and_serve_grpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen: list[int | None] = []
    real_command: Callable[..., list[str]] = local.gateway_command

    def recording(**kwargs: Any) -> list[str]:
        chosen.append(kwargs["grpc_port"])
        return real_command(**kwargs)

    held_at_wait: list[bool] = []
    real_wait: Callable[..., None] = local.wait_ready

    def checking(urls: Sequence[str], **kwargs: Any) -> None:
        held_at_wait.extend(_held(f"http://127.0.0.1:{port}") for port in chosen if port)
        real_wait(urls, **kwargs)

    monkeypatch.setattr(local, "gateway_command", recording)
    monkeypatch.setattr(local, "wait_ready", checking)
    with run_manager_processes(nodes=1, options=_options(tmp_path), log_dir=tmp_path) as managers:
        options = GatewayReplicaOptions(
            host="127.0.0.1", shared_port=local.free_port(), functions=(), grpc=True
        )
        with run_gateways(
            replicas=2, managers={m.name: m.url for m in managers}, options=options
        ) as replicas:
            assert held_at_wait == [True, True]
            assert [r.grpc_port for r in replicas] == chosen
            for replica in replicas:
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{replica.grpc_port}")
                try:
                    assert client.is_server_live()
                finally:
                    client.close()


def test_an_inherited_descriptor_must_be_a_listening_tcp_socket(tmp_path: Path) -> None:
    with (tmp_path / "f").open("wb") as not_a_socket, pytest.raises(OSError, match="not a TCP"):
        inherited_listener(not_a_socket.fileno())
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match="not listening"):
            inherited_listener(bound.fileno())
        assert bound.fileno() >= 0  # left open: it was not the check's to close
    listening = socket.create_server(("127.0.0.1", 0))
    address = listening.getsockname()
    with inherited_listener(listening.detach()) as inherited:  # the descriptor is its now
        assert inherited.getsockname() == address


@pytest.mark.parametrize("command", ["gpu-manager", "gateway"])
def test_a_bad_listen_fd_is_refused_with_a_message_and_no_traceback(command: str) -> None:
    argv = [sys.executable, "-m", "gpufaas.core.cli", command, "--listen-fd", "0"]
    if command == "gateway":
        argv += ["--managers", "http://127.0.0.1:9", "--peers", "http://127.0.0.1:9"]
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "--listen-fd" in done.stderr or "descriptor 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_grpc_listen_fd_is_refused_with_a_message_and_no_traceback() -> None:
    argv = [
        sys.executable, "-m", "gpufaas.core.cli", "gateway", "--grpc-listen-fd", "0",
        "--managers", "http://127.0.0.1:9", "--peers", "http://127.0.0.1:9",
    ]  # fmt: skip
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "descriptor 0" in done.stderr
    assert "Traceback" not in done.stderr
