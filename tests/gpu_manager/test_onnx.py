"""ONNX models behind the backend seam: real graphs built with onnx.helper, run by onnxruntime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from gm_support import Model, make_spec
from onnx import TensorProto, helper, numpy_helper

from gpufaas.core.api import InferenceFunctionSpec, ModelFormat, TensorSpec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.http import REASON_HEADER
from gpufaas.core.modelcheck import ModelCheckError, check_model, run_check_model_cli
from gpufaas.core.protocol import encode_request
from gpufaas.gpu_manager.runtime import NodeRuntime, RuntimeFailure
from gpufaas.gpu_manager.server import create_app

Factory = Callable[..., NodeRuntime]

X16 = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
Y4 = [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return (
        rng.standard_normal((16, 4), dtype=np.float32),
        rng.standard_normal(4, dtype=np.float32),
    )


def _save(path: Path, nodes: list[onnx.NodeProto], *, check: bool = True) -> Path:
    weight, bias = _weights()
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def linear_relu(path: Path) -> Path:
    return _save(
        path,
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
    )


def with_unknown_op(path: Path, *, domain: str = "acme.ops") -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("FancyOp", ["h"], ["z"], domain=domain),
        helper.make_node("Add", ["z", "b"], ["y"]),
    ]
    return _save(path, nodes, check=False)


def reference(x: np.ndarray) -> np.ndarray:
    weight, bias = _weights()
    return np.maximum(x @ weight + bias, 0)


def onnx_spec(path: Path, **batching: int) -> InferenceFunctionSpec:
    return make_spec(path, ModelFormat.ONNX, inputs=X16, outputs=Y4, batching=batching or None)


async def test_an_onnx_model_serves_and_batches(runtime_factory: Factory, tmp_path: Path) -> None:
    path = linear_relu(tmp_path / "linear.onnx")
    runtime = runtime_factory()
    runtime.register("lin", onnx_spec(path, maxBatchSize=4, maxDelayMs=200))
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((1, 16), dtype=np.float32) for _ in range(3)]

    outcomes = await asyncio.gather(
        *(runtime.infer("lin", [x], device_id="cpu:0") for x in requests)
    )

    for outcome, x in zip(outcomes, requests, strict=True):
        np.testing.assert_allclose(outcome.outputs["y"][0], reference(x), rtol=1e-5, atol=1e-5)
    assert [o.batch_size for o in outcomes] == [3, 3, 3]
    await runtime.settle()  # the load commits in the background after the batch's answer
    state = runtime.state()
    row = state.device("cpu:0").residents[0]
    assert row.model == "lin" and row.weights_bytes == 16 * 4 * 4 + 4 * 4
    assert state.host.skeletons["lin"].backend == "onnx"
    hit = await runtime.infer("lin", [requests[0]], device_id="cpu:0")
    assert hit.cache_hit


async def test_an_unknown_operator_is_a_503_naming_it_and_other_models_keep_serving(
    runtime_factory: Factory, models: dict[str, Model], tmp_path: Path
) -> None:
    good = models["tiny-mlp"]
    runtime = runtime_factory(register=[good])
    runtime.register("fancy", onnx_spec(with_unknown_op(tmp_path / "fancy.onnx")))
    app = create_app(runtime)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://manager"
    ) as client:
        content, headers = encode_request({"x": (np.zeros((1, 16), np.float32), "FP32")})
        response = await client.post("/v2/models/fancy/infer", content=content, headers=headers)
    assert response.status_code == 503
    assert response.headers[REASON_HEADER] == "ModelLoadFailed"
    assert "acme.ops:FancyOp" in response.json()["error"]

    served = await runtime.infer(good.name, good.inputs(), device_id="cpu:0")
    np.testing.assert_allclose(
        next(iter(served.outputs.values()))[0], good.reference(good.inputs()), rtol=1e-5, atol=1e-6
    )


async def test_an_operator_missing_from_the_default_domain_is_named(
    runtime_factory: Factory, tmp_path: Path
) -> None:
    runtime = runtime_factory()
    runtime.register("odd", onnx_spec(with_unknown_op(tmp_path / "odd.onnx", domain="")))
    with pytest.raises(RuntimeFailure) as failure:
        await runtime.infer("odd", [np.zeros((1, 16), np.float32)], device_id="cpu:0")
    assert failure.value.status == 503 and "FancyOp" in str(failure.value)


def test_the_model_check_verifies_onnx_and_names_an_unknown_operator(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache")
    good = onnx_spec(linear_relu(tmp_path / "good.onnx"))
    report = check_model(good, store=store)
    assert report.format is ModelFormat.ONNX and report.smoke_tested
    assert report.tensor_bytes == 16 * 4 * 4 + 4 * 4

    wrong = good.model_copy(
        update={"outputs": [TensorSpec(name="y", datatype="FP32", shape=[-1, 5])]}
    )
    with pytest.raises(ModelCheckError, match="shape"):
        check_model(wrong, store=store)

    bad = onnx_spec(with_unknown_op(tmp_path / "bad.onnx"))
    with pytest.raises(ModelCheckError, match=r"acme\.ops:FancyOp"):
        check_model(bad, store=store)

    log = tmp_path / "termination-log"
    log.write_text("")
    spec_json = json.dumps(bad.model_dump(mode="json", by_alias=True))
    code = run_check_model_cli(
        [
            "--spec-json",
            spec_json,
            "--cache-dir",
            str(tmp_path / "c2"),
            "--termination-log",
            str(log),
        ]
    )
    outcome = json.loads(log.read_text())
    assert code == 1 and outcome["ok"] is False and "FancyOp" in outcome["error"]


def test_external_data_is_refused(tmp_path: Path) -> None:
    path = linear_relu(tmp_path / "ext.onnx")
    model = onnx.load(str(path))
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    onnx.save_model(model, str(tmp_path / "ext2.onnx"))
    with pytest.raises(ModelCheckError, match="external data"):
        check_model(onnx_spec(tmp_path / "ext2.onnx"), store=ArtifactStore(tmp_path / "c"))
