"""How a component reaches the Kubernetes API server: one place for both the
operator and the gateway.

:class:`KubeConnection` loads the in-cluster service account, or else the
kubeconfig (``$KUBECONFIG``), and makes ``httpx`` clients that send the bearer
token, re-read on each request so that rotated service-account tokens are
picked up. The ``kubernetes`` package is imported only to load the
configuration.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class KubeConnection:
    """Where the API server is and how to authenticate to it."""

    base_url: str
    verify: ssl.SSLContext | bool = True
    cert: tuple[str, str] | None = None
    authorization: Callable[[], str | None] = lambda: None

    @classmethod
    def load(cls, *, kubeconfig: str | None = None) -> KubeConnection:
        """In-cluster service account if present, else the kubeconfig (``$KUBECONFIG``)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            path = kubeconfig or os.environ.get("KUBECONFIG") or None
            config.load_kube_config(
                config_file=path, client_configuration=cfg, persist_config=False
            )  # type: ignore[no-untyped-call]
        verify: ssl.SSLContext | bool = bool(cfg.verify_ssl)
        if verify and cfg.ssl_ca_cert:
            verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file and cfg.key_file else None

        def authorization() -> str | None:
            # Re-read each time: the loaders refresh expiring tokens through this hook.
            token: str | None = cfg.get_api_key_with_prefix("BearerToken")
            return token

        return cls(base_url=str(cfg.host), verify=verify, cert=cert, authorization=authorization)

    def client(self, *, timeout: httpx.Timeout | float, user_agent: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            verify=self.verify,
            cert=self.cert,
            timeout=timeout,
            auth=_BearerAuth(self.authorization),
            headers={"Accept": "application/json", "User-Agent": user_agent},
        )


class _BearerAuth(httpx.Auth):
    def __init__(self, token: Callable[[], str | None]) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token()
        if token:
            request.headers["Authorization"] = token
        yield request
