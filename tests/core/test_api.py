"""The InferenceFunction API: valid manifests parse, invalid ones name the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufaas.core.api import ManifestError, parse_manifest, parse_spec
from gpufaas.core.cli import main
from gpufaas.core.units import format_bytes, parse_bytes

VALID: dict[str, Any] = {
    "apiVersion": "gpufaas.dev/v1alpha1",
    "kind": "InferenceFunction",
    "metadata": {"name": "fn"},
    "spec": {
        "model": {"uri": "s3://models/fn.pt", "format": "torchscript", "sha256": "a" * 64},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "batching": {"maxBatchSize": 8, "maxDelayMs": 2},
        "slo": {"latencyMs": 50},
        "resources": {"gpuMemory": "1Gi"},
        "handler": {"image": "ghcr.io/acme/pre:1", "minReplicas": 1, "maxReplicas": 3},
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return document


_DELETE = object()


def test_valid_manifest_round_trips_with_camel_case() -> None:
    function = parse_manifest(VALID)
    assert function.name == "fn"
    assert function.spec.batching.max_batch_size == 8
    assert function.spec.resources.gpu_memory_bytes() == 2**30
    assert function.model_dump(by_alias=True, exclude_none=True, exclude={"status"})["spec"][
        "slo"
    ] == {"latencyMs": 50}


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.model.uri", "ftp://x/y", "spec.model.uri"),
        ("spec.model.format", "tensorflow-savedmodel", "spec.model.format"),
        ("spec.model.sha256", "xyz", "spec.model.sha256"),
        ("spec.inputs.0.datatype", "FP8", "spec.inputs[0].datatype"),
        ("spec.inputs.0.shape", [0, 4], "spec.inputs[0].shape"),
        ("spec.inputs.0.shape", [-2], "spec.inputs[0].shape[0]"),
        ("spec.batching.maxBatchSize", 0, "spec.batching.maxBatchSize"),
        ("spec.slo.latencyMs", -1, "spec.slo.latencyMs"),
        ("spec.resources.gpuMemory", "lots", "spec.resources.gpuMemory"),
        ("spec.handler.minReplicas", 5, "spec.handler"),
        ("spec.outputs", [], "spec.outputs"),
        ("spec.model", _DELETE, "spec.model"),
        ("spec.unknownField", 1, "spec.unknownField"),
        ("metadata.name", "Not_A_DNS_Name", "metadata.name"),
    ],
)
def test_invalid_manifest_names_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(_with(path, value), source="fn.yaml")
    assert f"{field}:" in str(info.value)
    assert str(info.value).startswith("fn.yaml: ")


def test_duplicate_tensor_names_are_rejected() -> None:
    spec = copy.deepcopy(VALID["spec"])
    spec["inputs"].append({"name": "x", "datatype": "INT64", "shape": [1]})
    with pytest.raises(ManifestError, match=r"duplicate tensor names \['x'\]"):
        parse_spec(spec)


def test_validate_command_reports_the_field_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(VALID))
    assert main(["validate", str(good)]) == 0
    assert "fn: valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("spec.inputs.0.datatype", "FP8")))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "spec.inputs[0].datatype" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4Gi", 4 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("1000", 1000),
        ("2k", 2000),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "4 GB", "-1", "Gi", "1.2.3"])
def test_parse_bytes_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="byte quantity"):
        parse_bytes(text)


def test_format_bytes() -> None:
    assert format_bytes(1536) == "1.5Ki"
    assert format_bytes(512) == "512"
