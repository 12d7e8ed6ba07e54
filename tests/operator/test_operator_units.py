"""Operator settings, the gateway unload call, and the API client's URLs."""

from __future__ import annotations

import socket

import httpx
import pytest

from gpufaas.operator.kubeapi import DEPLOYMENTS, PODS, Kind
from gpufaas.operator.main import run_operator
from gpufaas.operator.settings import OperatorSettings, SettingsError
from gpufaas.operator.unload import unload_model


def test_settings_read_gpufaas_variables() -> None:
    settings = OperatorSettings.from_env(
        {
            "GPUFAAS_IMAGE": "img:2",
            "GPUFAAS_RESYNC_SECONDS": "2.5",
            "GPUFAAS_ARTIFACT_SECRET": "",
            "HOME": "/x",
        }
    )
    assert settings.image == "img:2"
    assert settings.resync_seconds == 2.5
    assert settings.artifact_secret is None  # empty means unset
    assert (
        settings.unload_url_for("f")
        == "http://gpufaas-gateway.gpufaas.svc:8080/v2/repository/models/f/unload"
    )


@pytest.mark.parametrize("quantity", ["0.1", "100m", "131072Ki", "1Gi", "1e3", "2", "1.5G"])
def test_settings_take_any_valid_quantity(quantity: str) -> None:
    settings = OperatorSettings.from_env({"GPUFAAS_HANDLER_CPU_REQUEST": quantity})
    assert settings.handler_cpu_request == quantity


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GPUFAAS_RESYNC_SECONDS": "soon"}, "GPUFAAS_RESYNC_SECONDS"),
        ({"GPUFAAS_GATEWAY_URL": "gateway:8080"}, "GPUFAAS_GATEWAY_URL"),
        ({"GPUFAAS_HANDLER_MEMORY_LIMIT": "lots"}, "GPUFAAS_HANDLER_MEMORY_LIMIT"),
        ({"GPUFAAS_HANDLER_MEMORY_LIMIT": "1KB"}, "GPUFAAS_HANDLER_MEMORY_LIMIT"),
        ({"GPUFAAS_IMAGE_PULL_POLICY": "Sometimes"}, "GPUFAAS_IMAGE_PULL_POLICY"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        OperatorSettings.from_env(env)


def test_operator_cli_refuses_bad_settings_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUFAAS_UNLOAD_ATTEMPTS", "0")
    assert run_operator([]) == 2
    assert "GPUFAAS_UNLOAD_ATTEMPTS" in capsys.readouterr().err


def test_kind_paths() -> None:
    assert PODS.path("ns") == "/api/v1/namespaces/ns/pods"
    assert DEPLOYMENTS.path("ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    fn = Kind("gpufaas.dev/v1alpha1", "inferencefunctions")
    assert (
        fn.path("ns", "f", "status")
        == "/apis/gpufaas.dev/v1alpha1/namespaces/ns/inferencefunctions/f/status"
    )
    assert fn.path(None) == "/apis/gpufaas.dev/v1alpha1/inferencefunctions"


def _transport(statuses: list[int], seen: list[str]) -> httpx.MockTransport:
    answers = iter(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(next(answers), json={})

    return httpx.MockTransport(handle)


URL = "http://gw.test/v2/repository/models/f/unload"


@pytest.mark.parametrize(
    ("statuses", "done", "attempts"),
    [
        ([200], True, 1),
        ([404], True, 1),  # the gateway does not know it: nothing left to unload
        ([503, 502, 200], True, 3),
        ([503, 503, 503], False, 3),
        ([400], False, 1),  # retrying cannot fix a client error
    ],
)
async def test_unload_retries_a_bounded_number_of_times(
    statuses: list[int], done: bool, attempts: int
) -> None:
    seen: list[str] = []
    result = await unload_model(
        URL, attempts=3, timeout_s=1, backoff_s=0, transport=_transport(statuses, seen)
    )
    assert (result.done, result.attempts) == (done, attempts)
    assert seen == ["POST /v2/repository/models/f/unload"] * attempts


async def test_unload_sends_the_admin_token() -> None:
    headers: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200)

    result = await unload_model(
        URL,
        attempts=1,
        timeout_s=1,
        backoff_s=0,
        token="s3cret",
        transport=httpx.MockTransport(handle),
    )
    assert result.done and headers == ["Bearer s3cret"]


def test_admin_token_is_read_but_never_shown() -> None:
    settings = OperatorSettings.from_env({"GPUFAAS_ADMIN_TOKEN": "s3cret"})
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


async def test_unload_gives_up_on_an_unreachable_gateway() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await unload_model(
        f"http://127.0.0.1:{port}/v2/repository/models/f/unload",
        attempts=2,
        timeout_s=1,
        backoff_s=0.01,
    )
    assert not result.done
    assert result.attempts == 2
    assert "ConnectError" in result.detail
