"""With an admin token, the gateway's repository and cluster endpoints need it;
inference and health stay open."""

from __future__ import annotations

from fastapi.testclient import TestClient

from gpufaas.scheduler.gateway import GatewayConfig, create_app
from gpufaas.scheduler.main import build_gateway


def test_admin_endpoints_need_the_token() -> None:
    gateway = build_gateway(
        manager_urls={}, functions=[], config=GatewayConfig(admin_token="s3cret")
    )
    with TestClient(create_app(gateway)) as client:
        for path in ("/v2/repository/index", "/v2/repository/models/m/unload"):
            refused = client.post(path)
            assert refused.status_code == 401
            assert "Bearer" in refused.json()["error"]
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v2/gpufaas/cluster").status_code == 401
        ok = client.post("/v2/repository/index", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == []
        assert client.get("/v2/health/live").status_code == 200
        assert client.post("/v2/models/m/infer", content=b"{}").status_code == 404  # not 401
