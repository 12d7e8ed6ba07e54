"""The GPU manager counts the forward passes it ran per request id (issue #12), so that
exactly-once can be checked from the node's side (``bench/kill_run.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.server import EXECUTIONS_PATH, ExecutionCounts, create_app


def _body(request_id: str | None) -> bytes:
    document: dict[str, object] = {
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.25] * 16}]
    }
    if request_id is not None:
        document["id"] = request_id
    return json.dumps(document).encode()


def test_each_run_is_counted_under_its_request_id(tmp_path: Path, example_models_dir: Path) -> None:
    runtime = build_runtime(
        cpu_devices=1,
        device_memory_bytes=64 * 2**20,
        host_memory_bytes=64 * 2**20,
        artifact_dir=tmp_path / "artifacts",
        force_cpu=True,
    )
    for f in load_manifests(
        [bundled_functions_dir()], variables={"GPUFAAS_MODELS": str(example_models_dir)}
    ):
        runtime.register(f.name, f.spec)
    with TestClient(create_app(runtime, token="t")) as client:
        auth = {"Authorization": "Bearer t"}
        for request_id in ("a", "b", "a", None):
            answer = client.post(
                "/v2/models/tiny-mlp/infer", content=_body(request_id), headers=auth
            )
            assert answer.status_code == 200
        refused = client.post("/v2/models/nope/infer", content=_body("c"), headers=auth)
        assert refused.status_code == 404  # never ran: not counted
        report = client.get(EXECUTIONS_PATH, headers=auth).json()
        assert report == {"executions": {"b": 1, "a": 2}, "dropped_ids": 0}
        assert client.get(EXECUTIONS_PATH).status_code == 401  # behind the manager token


def test_the_counts_are_bounded() -> None:
    counts = ExecutionCounts(max_ids=2)
    for request_id in ("x", "y", "x", "z"):
        counts.ran(request_id)
    assert counts.report() == {"executions": {"x": 2, "z": 1}, "dropped_ids": 1}
