"""End to end: ``gpufaas up --node-transport inprocess`` as a user starts it.

node-0 runs in the gateway's process and is called in-process; node-1 is a process of its own,
called framed. Answers match torch, bad input gets the same errors, the server keeps serving,
and Ctrl-C stops it cleanly (``running_up``).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from local_up import running_up

from gpufaas.core.api import ModelFormat
from gpufaas.core.examples import example_inputs
from gpufaas.core.modelio import load_model

pytestmark = pytest.mark.slow


def test_up_with_the_node_in_process_serves_and_fails_as_framed(
    gpufaas_env: dict[str, str], example_models_dir: Path
) -> None:
    x = example_inputs("tiny-mlp", batch=3)["x"]
    model = load_model(example_models_dir / "tiny-mlp.pt", format=ModelFormat.TORCHSCRIPT)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    args = ["--node-transport", "inprocess", "--nodes", "2", "--cpu-devices", "1"]
    with running_up(args, env=gpufaas_env) as url, httpx.Client(base_url=url, timeout=60) as c:
        nodes = c.get("/v2/gpufaas/cluster").json()["nodes"]
        assert sorted((n["name"], n["healthy"]) for n in nodes) == [
            ("node-0", True),
            ("node-1", True),
        ]
        request = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ]
        }
        for _ in range(3):
            answer = c.post("/v2/models/tiny-mlp/infer", json=request)
            assert answer.status_code == 200, answer.text
            (y,) = answer.json()["outputs"]
            np.testing.assert_allclose(
                np.array(y["data"], dtype=np.float32).reshape(y["shape"]), expected, rtol=1e-5
            )
        unknown = c.post("/v2/models/nope/infer", json=request)
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        wrong = c.post(
            "/v2/models/tiny-mlp/infer",
            json={"inputs": [{"name": "z", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        )
        assert wrong.status_code == 400 and "z" in wrong.json()["error"]
        assert c.post("/v2/models/tiny-mlp/infer", json=request).status_code == 200
        decisions = [
            line
            for line in c.get("/metrics").text.splitlines()
            if line.startswith("gpufaas_route_decisions_total{")
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in decisions) == 4  # every 200
