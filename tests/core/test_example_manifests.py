"""The bundled example manifests agree with the example models and their inputs."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gpufaas.core.api import InferenceFunction, TensorSpec, parse_manifest
from gpufaas.core.examples import EXAMPLES, FUNCTIONS, example_inputs, model_filename
from gpufaas.core.modelio import load_model

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "examples" / "functions"
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def _manifest(name: str) -> InferenceFunction:
    path = FUNCTIONS_DIR / f"{name}.yaml"
    return parse_manifest(yaml.safe_load(path.read_text()), source=str(path))


def _matches(spec: TensorSpec, dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> bool:
    """Same datatype and rank, and every fixed dimension equal (-1 matches any)."""
    return (
        np.dtype(NUMPY_TYPES[spec.datatype]) == dtype
        and len(spec.shape) == len(shape)
        and all(want in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
    )


def test_one_manifest_per_example() -> None:
    assert sorted(p.stem for p in FUNCTIONS_DIR.glob("*.yaml")) == sorted(FUNCTIONS)


def test_the_text_function_serves_minilms_model_with_its_token_inputs() -> None:
    from gpufaas.gpu_manager.text import model_spec

    text, tokens = _manifest("minilm-text").spec, _manifest("minilm").spec
    assert text.tokenizer is not None and text.model == tokens.model
    assert model_spec(text).inputs == tokens.inputs
    assert text.outputs == tokens.outputs


@pytest.mark.parametrize("name", EXAMPLES)
def test_manifest_parses_and_points_at_the_model(name: str) -> None:
    function = _manifest(name)
    assert function.name == name
    assert function.spec.model.uri == f"file://${{GPUFAAS_MODELS}}/{model_filename(name)}"
    suffix = {"torchscript": ".pt", "torch-export": ".pt2"}[function.spec.model.format.value]
    assert function.spec.model.uri.endswith(suffix)
    for tensor in (*function.spec.inputs, *function.spec.outputs):
        assert tensor.shape[0] == -1  # the batch dimension


@pytest.mark.parametrize("name", EXAMPLES)
def test_manifest_inputs_match_example_inputs(name: str) -> None:
    declared = _manifest(name).spec.inputs
    inputs = example_inputs(name, batch=3)
    assert [t.name for t in declared] == list(inputs)
    for spec in declared:
        array = inputs[spec.name]
        assert _matches(spec, array.dtype, array.shape), (spec, array.dtype, array.shape)


@pytest.mark.parametrize("name", EXAMPLES)
def test_manifest_outputs_match_the_built_model(name: str, example_models: dict[str, Path]) -> None:
    function = _manifest(name)
    uri = string.Template(function.spec.model.uri).substitute(
        GPUFAAS_MODELS=str(example_models[name].parent)
    )
    assert uri == example_models[name].as_uri()
    module = load_model(example_models[name], format=function.spec.model.format)
    inputs = [torch.from_numpy(example_inputs(name, batch=3)[t.name]) for t in function.spec.inputs]
    with torch.inference_mode():
        result = module(*inputs)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    assert len(outputs) == len(function.spec.outputs)
    for spec, tensor in zip(function.spec.outputs, outputs, strict=True):
        array = tensor.numpy()
        assert array.shape[0] == 3
        assert _matches(spec, array.dtype, array.shape), (spec, array.dtype, array.shape)
