"""The CRD generated from gpufaas.core.api: committed copy, structural schema, validity.

If ``test_committed_crd_is_current`` fails, regenerate the file:

    .venv/bin/gpufaas crd > crds/inferencefunctions.gpufaas.dev.yaml
    cp crds/inferencefunctions.gpufaas.dev.yaml charts/gpufaas/crds/
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpufaas.core.api import ModelFormat, Phase
from gpufaas.core.crd import SchemaConversionError, build_crd, render_crd_yaml, to_structural

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / "inferencefunctions.gpufaas.dev.yaml"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "<root>", node
    for name, child in (node.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


def test_committed_crd_is_current() -> None:
    assert COMMITTED.read_text() == render_crd_yaml(), (
        "crds/inferencefunctions.gpufaas.dev.yaml is stale: run "
        "`.venv/bin/gpufaas crd > crds/inferencefunctions.gpufaas.dev.yaml` (and copy it into charts/gpufaas/crds/)"
    )


def test_rendering_is_deterministic() -> None:
    assert render_crd_yaml() == render_crd_yaml()
    assert yaml.safe_load(render_crd_yaml()) == build_crd()


def test_schema_is_structural() -> None:
    forbidden = {
        "$ref",
        "$defs",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "title",
        "additionalProperties",
        "const",
    }
    for path, node in _nodes(_schema()):
        assert "type" in node, f"{path} has no type"
        assert not forbidden & node.keys(), f"{path} uses {forbidden & node.keys()}"
        assert node.get("default", "") is not None, f"{path} has a null default"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_constraints_survive_the_conversion() -> None:
    spec = _schema()["properties"]["spec"]
    status = _schema()["properties"]["status"]
    model = spec["properties"]["model"]
    assert model["required"] == ["uri", "format"]
    assert model["properties"]["format"]["enum"] == [f.value for f in ModelFormat]
    assert model["properties"]["uri"]["pattern"].startswith("^(file|https?|s3)")
    assert "nullable" not in model["properties"]["sha256"]  # null is pruned: the same as absent
    assert model["description"]
    assert spec["properties"]["inputs"]["minItems"] == 1
    assert spec["properties"]["inputs"]["items"]["properties"]["shape"]["items"]["minimum"] == -1
    latency = spec["properties"]["slo"]["properties"]["latencyMs"]
    assert (latency["minimum"], latency["exclusiveMinimum"]) == (0, True)
    handler = spec["properties"]["handler"]
    assert handler["required"] == ["image"]
    assert "minReplicas <= self.maxReplicas" in handler["x-kubernetes-validations"][0]["rule"]
    assert status["properties"]["phase"]["enum"] == [p.value for p in Phase]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_names_columns_and_subresources() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "inferencefunctions.gpufaas.dev"
    assert (names["kind"], names["plural"], names["singular"]) == (
        "InferenceFunction",
        "inferencefunctions",
        "inferencefunction",
    )
    assert names["shortNames"] == ["ifn"] and names["categories"] == ["gpufaas"]
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Ready": ("string", ".status.ready"),
        "Model": ("string", ".spec.model.uri"),
        "Size": ("integer", ".status.modelBytes"),
        "Resident": ("integer", ".status.residentCount"),
        "Age": ("date", ".metadata.creationTimestamp"),
        "Handler": ("integer", ".status.handlerReplicas"),
        "Shards": ("integer", ".spec.parallelism.shards"),
    }


@pytest.mark.parametrize("version", ["1.30", "1.33", kubernetes_validate.latest_version()])
def test_kubernetes_validate_accepts_the_crd(version: str) -> None:
    kubernetes_validate.validate(build_crd(), version, strict=True)


def test_unsupported_unions_are_refused() -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
    }
    with pytest.raises(SchemaConversionError, match=r"x: only 'X or null'"):
        to_structural(schema)
