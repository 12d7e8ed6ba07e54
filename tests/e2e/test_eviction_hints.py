"""End to end: LALB's eviction hint reaches the GPU manager, which evicts what it names.

One GPU manager with one CPU device that holds two tiny-mlp copies. ``copy-a`` is asked for
often and ``copy-b`` once, so ``copy-a`` is the least recently used model when ``copy-c``
arrives, but the cheaper one to lose is ``copy-b`` (its expected reloads are fewer). A GPU
manager evicting plain LRU would drop ``copy-a``; with the gateway's hint it drops ``copy-b``.
The directory's prediction and the manager's own state must agree on that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from local_up import running_up

from gpufaas.core.manifests import bundled_functions_dir
from gpufaas.core.protocol import encode_request

pytestmark = pytest.mark.slow

COPIES = ("copy-a", "copy-b", "copy-c")
TOKEN = "hint-test-secret"
COPY_BYTES = 5_264  # a tiny-mlp copy on a CPU device: weights and activation reserve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, example_models_dir: Path) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("functions")
    template = yaml.safe_load((bundled_functions_dir() / "tiny-mlp.yaml").read_text())
    # Declared as users should: a model the gateway has never seen loaded is planned by it.
    template["spec"]["resources"] = {"gpuMemory": str(COPY_BYTES)}
    for name in COPIES:
        template["metadata"]["name"] = name
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(template))
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path_factory.mktemp("home")),
        "GPUFAAS_MODELS": str(example_models_dir),
        "GPUFAAS_MANAGER_TOKEN": TOKEN,
    }
    args = [
        "--functions", str(folder), "--policy", "lalb", "--cpu-devices", "1",
        "--device-memory", str(2 * COPY_BYTES + 100), "--host-memory", "1Ki",
    ]  # fmt: skip
    with running_up(args, env=env) as url:
        yield url


def infer(url: str, name: str) -> httpx.Response:
    x = np.ones((1, 16), dtype=np.float32)
    content, headers = encode_request({"x": (x, "FP32")})
    response = httpx.post(
        f"{url}/v2/models/{name}/infer", content=content, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response


def gateway_view(url: str) -> list[str]:
    cluster: dict[str, Any] = httpx.get(f"{url}/v2/gpufaas/cluster", timeout=5).json()
    (device,) = cluster["devices"]
    return sorted(model for model, _state, _size in device["residents"])


def manager_residents(url: str) -> list[dict[str, Any]]:
    cluster: dict[str, Any] = httpx.get(f"{url}/v2/gpufaas/cluster", timeout=5).json()
    (node,) = cluster["nodes"]
    state = httpx.get(
        f"{node['url']}/v2/gpufaas/state",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    ).json()
    (device,) = state["devices"]
    residents: list[dict[str, Any]] = device["residents"]
    return residents


def manager_view(url: str) -> list[str]:
    return sorted(r["model"] for r in manager_residents(url))


def wait_committed(url: str, name: str) -> None:
    """Wait until the manager has committed ``name``: its load's last step runs in the
    background after the first answer, and a copy still arriving is never a victim."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(r["model"] == name and r["state"] == "resident" for r in manager_residents(url)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} was not committed on the manager within 30 s")


def test_the_manager_evicts_the_hinted_victim_not_the_lru_one(server: str) -> None:
    for _ in range(6):
        infer(server, "copy-a")
    assert infer(server, "copy-b").headers["x-gpufaas-cache"] == "miss"
    assert gateway_view(server) == ["copy-a", "copy-b"]
    wait_committed(server, "copy-b")

    assert infer(server, "copy-c").headers["x-gpufaas-cache"] == "miss"
    assert manager_view(server) == ["copy-a", "copy-c"]  # LRU alone would have kept copy-b
    assert gateway_view(server) == ["copy-a", "copy-c"]  # and the prediction agrees
    assert infer(server, "copy-a").headers["x-gpufaas-cache"] == "hit"
    metrics = httpx.get(f"{server}/metrics", timeout=5).text
    assert 'gpufaas_route_decisions_total{policy="lalb",reason="holder"}' in metrics
    assert 'gpufaas_route_decisions_total{policy="lalb",reason="load"} 3.0' in metrics
