"""End to end: ``gpufaas up`` serves every example function to a real client.

The system runs as real processes (gateway + GPU manager) exactly as a user
starts it. tritonclient calls each example in JSON and binary mode, and the
answers must match running the same torch model directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from gpufaas.core.api import ModelFormat
from gpufaas.core.examples import EXAMPLE_SENTENCES, EXAMPLES, FUNCTIONS, example_inputs
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.modelio import load_model

pytestmark = pytest.mark.slow


def _expected(name: str, inputs: dict[str, np.ndarray], models_dir: Path) -> list[np.ndarray]:
    function = next(f for f in load_manifests([bundled_functions_dir()]) if f.name == name)
    path = models_dir / Path(function.spec.model.uri.removeprefix("file://")).name
    module = load_model(path, format=ModelFormat(function.spec.model.format))
    with torch.inference_mode():
        result = module(*(torch.from_numpy(inputs[t.name]) for t in function.spec.inputs))
    results = [result] if isinstance(result, torch.Tensor) else list(result)
    return [r.numpy() for r in results]


def _infer(
    client: triton.InferenceServerClient, name: str, inputs: dict[str, np.ndarray], *, binary: bool
) -> dict[str, np.ndarray]:
    metadata = client.get_model_metadata(name)
    request = []
    for spec in metadata["inputs"]:
        array = inputs[spec["name"]]
        tensor = triton.InferInput(spec["name"], list(array.shape), spec["datatype"])
        tensor.set_data_from_numpy(array, binary_data=binary)
        request.append(tensor)
    outputs = [
        triton.InferRequestedOutput(o["name"], binary_data=binary) for o in metadata["outputs"]
    ]
    result = client.infer(name, request, outputs=outputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_matches_torch(
    client: triton.InferenceServerClient, example_models_dir: Path, name: str, binary: bool
) -> None:
    inputs = example_inputs(name, batch=3)
    got = _infer(client, name, inputs, binary=binary)
    expected = _expected(name, inputs, example_models_dir)
    assert len(got) == len(expected)
    for actual, want in zip(got.values(), expected, strict=True):
        assert actual.shape == want.shape
        np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-5)


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "gpufaas"
    index = {m["name"] for m in client.get_model_repository_index()}
    assert index == set(FUNCTIONS)
    for name in FUNCTIONS:
        assert client.is_model_ready(name)


def _status(error: InferenceServerException) -> int:
    return int(str(error.status()))


def test_unknown_model_is_404(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [tensor])
    assert _status(info.value) == 404
    assert "no-such-model" in info.value.message()


@pytest.mark.parametrize(
    ("shape", "datatype", "array", "needle"),
    [
        ([1, 15], "FP32", np.zeros((1, 15), np.float32), "shape"),
        ([1, 16], "INT32", np.zeros((1, 16), np.int32), "datatype"),
    ],
    ids=["wrong-shape", "wrong-datatype"],
)
def test_wrong_input_is_400_naming_the_tensor(
    client: triton.InferenceServerClient,
    shape: list[int],
    datatype: str,
    array: np.ndarray,
    needle: str,
) -> None:
    tensor = triton.InferInput("x", shape, datatype)
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-mlp", [tensor])
    assert _status(info.value) == 400
    assert "'x'" in info.value.message() and needle in info.value.message().lower()


def test_malformed_json_is_400(server: str) -> None:
    response = httpx.post(f"{server}/v2/models/tiny-mlp/infer", content=b'{"inputs": [', timeout=30)
    assert response.status_code == 400
    assert "json" in response.json()["error"].lower()


def test_body_over_limit_is_413(server: str, request_limit: int) -> None:
    response = httpx.post(
        f"{server}/v2/models/tiny-mlp/infer", content=b" " * (request_limit + 1), timeout=30
    )
    assert response.status_code == 413
    assert str(request_limit) in response.json()["error"]


def test_server_keeps_serving_after_bad_input(
    client: triton.InferenceServerClient, server: str
) -> None:
    httpx.post(f"{server}/v2/models/tiny-mlp/infer", content=b"\x00\xff garbage", timeout=30)
    inputs = example_inputs("tiny-mlp", batch=1)
    assert _infer(client, "tiny-mlp", inputs, binary=True)["y"].shape == (1, 4)


def test_metrics_are_exported(
    server: str, client: triton.InferenceServerClient, manager_token: str
) -> None:
    _infer(client, "tiny-mlp", example_inputs("tiny-mlp", batch=1), binary=False)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'gpufaas_requests_total{code="200",model="tiny-mlp"}' in text
    for family in (
        "gpufaas_cache_lookups_total",
        "gpufaas_queue_wait_seconds_count",
        "gpufaas_slo_requests_total",
    ):
        assert f"{family}{{" in text and 'policy="lalb-o3"' in text, family  # the default
    assert 'gpufaas_route_decisions_total{policy="lalb-o3",reason="' in text
    assert "gpufaas_dispatch_overtakes " in text
    cluster = httpx.get(f"{server}/v2/gpufaas/cluster", timeout=10).json()
    residents = {r[0] for d in cluster["devices"] for r in d["residents"]}
    assert "tiny-mlp" in residents
    manager = cluster["nodes"][0]["url"]
    assert "gpufaas_device_capacity_bytes" in httpx.get(f"{manager}/metrics", timeout=10).text
    assert httpx.get(f"{manager}/v2/gpufaas/state", timeout=10).status_code == 401
    infer = httpx.post(f"{manager}/v2/models/tiny-mlp/infer", content=b"{}", timeout=10)
    assert infer.status_code == 401  # managers take work only from the gateway
    auth = {"Authorization": f"Bearer {manager_token}"}
    state = httpx.get(f"{manager}/v2/gpufaas/state", headers=auth, timeout=10).json()
    on_device = [r for d in state["devices"] for r in d["residents"] if r["model"] == "tiny-mlp"]
    on_host = [r for r in state["host"]["residents"] if r["model"] == "tiny-mlp"]
    assert on_device and on_host
    assert on_device[0]["size_bytes"] >= on_host[0]["size_bytes"] > 0


def test_model_repository_unload_and_load(server: str) -> None:
    assert (
        httpx.post(f"{server}/v2/repository/models/small-cnn/unload", timeout=30).status_code == 200
    )
    index = {m["name"]: m for m in httpx.post(f"{server}/v2/repository/index", timeout=30).json()}
    # Servable (it loads on the next request) though resident nowhere: readiness and
    # residency are separate fields, and the index agrees with /ready.
    assert index["small-cnn"]["state"] == "READY"
    assert index["small-cnn"]["resident_on"] == [] and index["small-cnn"]["loading_on"] == []
    assert httpx.get(f"{server}/v2/models/small-cnn/ready", timeout=30).status_code == 200
    assert (
        httpx.post(f"{server}/v2/repository/models/small-cnn/load", timeout=60).status_code == 200
    )
    index = {m["name"]: m for m in httpx.post(f"{server}/v2/repository/index", timeout=30).json()}
    assert index["small-cnn"]["state"] == "READY" and index["small-cnn"]["resident_on"]
    assert json.loads(httpx.post(f"{server}/v2/repository/models/nope/load", timeout=30).text)[
        "error"
    ]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_text_in_through_the_gateway_equals_the_token_id_function(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    from gpufaas.core.api import Tokenizer, Vocabulary
    from gpufaas.gpu_manager.text import tokenize

    texts = np.array([s.encode() for s in EXAMPLE_SENTENCES], dtype=object)
    from_text = _infer(client, "minilm-text", {"text": texts}, binary=binary)["embedding"]
    ids, mask = tokenize(texts, Tokenizer(input="text", vocabulary=Vocabulary.ALL_MINILM_L6_V2))
    from_ids = _infer(client, "minilm", {"input_ids": ids, "attention_mask": mask}, binary=True)[
        "embedding"
    ]
    assert from_text.shape == (len(EXAMPLE_SENTENCES), 384)
    np.testing.assert_allclose(from_text, from_ids, rtol=1e-5, atol=1e-6)
