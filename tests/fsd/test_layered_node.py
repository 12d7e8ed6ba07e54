"""A ``format: layered`` spec pushed straight to a GPU manager: a layered net is served only
as a shard set (the gateway splits it and loads the shards, docs/distributed.md), so the node
refuses it at registration with a 400 naming ``spec.model.format``, instead of accepting it
and failing at inference."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gpufaas.core.api import ModelFormat
from gpufaas.core.http import REASON_HEADER
from gpufaas.core.layered import radix_net, save_net
from gpufaas.core.node import STATE
from gpufaas.gpu_manager.backends import NoBackend, backend_for
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.server import create_app


def test_layered_has_no_single_device_backend_and_says_so() -> None:
    with pytest.raises(NoBackend, match=r"spec\.model\.format 'layered'.*spec\.parallelism"):
        backend_for(ModelFormat.LAYERED)
    for served in (ModelFormat.TORCHSCRIPT, ModelFormat.TORCH_EXPORT, ModelFormat.ONNX):
        assert backend_for(served).name


async def test_a_layered_spec_pushed_to_a_node_is_refused_at_registration(tmp_path: Path) -> None:
    artifact = tmp_path / "net.safetensors"
    save_net(artifact, radix_net(64, 2, weights="random"))
    runtime = build_runtime(
        cpu_devices=1, device_memory_bytes=16 << 20, host_memory_bytes=16 << 20,
        artifact_dir=tmp_path / "artifacts", disk_cache_bytes=0, force_cpu=True,
    )  # fmt: skip
    body = {
        "model": {"uri": artifact.as_uri(), "format": "layered"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 64]}],
        "parallelism": {"shards": 2, "strategy": "intra-layer", "channel": "direct"},
    }
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        response = await client.put("/v2/gpufaas/functions/radix", json=body)
        assert response.status_code == 400, response.text
        assert response.headers[REASON_HEADER] == "InvalidSpec"
        assert "spec.model.format 'layered'" in response.json()["error"]
        state = (await client.get(STATE)).json()
    assert "radix" not in runtime.functions
    assert "radix" not in str(state)
