"""The InferenceFunction CustomResourceDefinition, generated from :mod:`gpufaas.core.api`.

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural*
OpenAPI v3 schema: every node typed, no ``$ref``, no ``anyOf`` with ``null``
(an optional field is simply not required: the API server prunes a ``null`` it is
given, so ``null`` and absent mean the same, for CEL's ``has()`` too), boolean ``exclusiveMinimum``, and no
``additionalProperties: false`` (the API server prunes unknown fields instead).
This module does that conversion, so the CRD in ``crds/`` can never drift from
the models: ``gpufaas crd > crds/inferencefunctions.gpufaas.dev.yaml``.

The cross-field checks travel with the models: each pydantic validator that the API
server can express has its CEL twin in the model's ``x-kubernetes-validations``
(see :func:`gpufaas.core.api.cel`), and tensor lists are ``x-kubernetes-list-type: map``
keyed by name, so the API server refuses what pydantic refuses.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from gpufaas.core.api import (
    GROUP,
    KIND,
    NAME_PATTERN,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    InferenceFunctionSpec,
    InferenceFunctionStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CATEGORIES = ("gpufaas",)

# JSON Schema keywords that have no place (or a different meaning) in a CRD schema.
_DROPPED_KEYS = frozenset({"title", "additionalProperties", "$defs", "definitions", "$schema"})

# The API server lets a CRD constrain only name and generateName in metadata.
_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": NAME_PATTERN},
    },
}


class SchemaConversionError(ValueError):
    """The pydantic schema uses a construct with no structural equivalent."""


def to_structural(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a pydantic JSON schema (with ``$defs``) into a structural OpenAPI v3 schema."""
    defs: Mapping[str, Any] = schema.get("$defs", {})
    return _convert(schema, defs=defs, path="<root>")


def _resolve(node: Mapping[str, Any], *, defs: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Inline a ``$ref``; sibling keys (description, default) override the target's."""
    ref = node["$ref"]
    prefix = "#/$defs/"
    if not isinstance(ref, str) or not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaConversionError(f"{path}: unresolvable $ref {ref!r}")
    target = dict(defs[ref[len(prefix) :]])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _convert(node: Mapping[str, Any], *, defs: Mapping[str, Any], path: str) -> dict[str, Any]:
    while "$ref" in node:
        node = _resolve(node, defs=defs, path=path)

    if "anyOf" in node:
        node = _collapse_nullable(node, path=path)
        while "$ref" in node:
            node = _resolve(node, defs=defs, path=path)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "default" and value is None:
            continue  # "absent" already means null; a null default fails structural checks
        if key == "default":
            out[key] = _without_nulls(value)
            continue
        if key == "properties":
            out[key] = {
                name: _convert(sub, defs=defs, path=f"{path}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            out[key] = _convert(value, defs=defs, path=f"{path}[]")
        elif key == "exclusiveMinimum" or key == "exclusiveMaximum":
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key in {"oneOf", "allOf", "not", "const", "prefixItems"}:
            raise SchemaConversionError(f"{path}: {key!r} has no structural CRD equivalent")
        else:
            out[key] = copy.deepcopy(value)

    if "type" not in out:
        if "properties" in out:
            out["type"] = "object"
        elif "enum" in out and all(isinstance(v, str) for v in out["enum"]):
            out["type"] = "string"
        else:
            raise SchemaConversionError(f"{path}: schema node has no type")
    # type and description first: the order people read `kubectl get crd -o yaml` in.
    head = {k: out.pop(k) for k in ("type", "description") if k in out}
    return head | out


def _without_nulls(value: Any) -> Any:
    """A default with its null members dropped (the API server defaults nested fields itself)."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return copy.deepcopy(value)


def _collapse_nullable(node: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    """``anyOf: [X, {type: null}]`` -> ``X``: every optional field defaults to None, so null
    is the same as absent, and the API server prunes it (pydantic's ``_prune_nulls`` agrees)."""
    options = list(node["anyOf"])
    non_null = [o for o in options if o.get("type") != "null"]
    if len(non_null) != 1 or len(options) != 2:
        raise SchemaConversionError(f"{path}: only 'X or null' unions are supported, got {options}")
    merged = dict(non_null[0])
    merged.update({k: v for k, v in node.items() if k != "anyOf"})
    return merged


def _status_schema() -> dict[str, Any]:
    status = to_structural(InferenceFunctionStatus.model_json_schema(by_alias=True))
    status["description"] = "Observed state, written by the operator and the gateway."
    conditions = status["properties"]["conditions"]
    # Conditions are keyed by type, as in every built-in Kubernetes resource.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return status


def _spec_schema() -> dict[str, Any]:
    spec = to_structural(InferenceFunctionSpec.model_json_schema(by_alias=True))
    spec["description"] = "One model served as a function: where it is, its tensors, its policy."
    return spec


def openapi_schema() -> dict[str, Any]:
    """The whole object's schema: apiVersion, kind, metadata, spec, status."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "An InferenceFunction serves one model through the gpufaas gateway.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": copy.deepcopy(_METADATA_SCHEMA),
            "spec": _spec_schema(),
            "status": _status_schema(),
        },
    }
    return schema


def build_crd() -> dict[str, Any]:
    """The ``apiextensions.k8s.io/v1`` CustomResourceDefinition for InferenceFunction."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "gpufaas"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
                        {"name": "Size", "type": "integer", "jsonPath": ".status.modelBytes"},
                        {
                            "name": "Resident",
                            "type": "integer",
                            "jsonPath": ".status.residentCount",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        # -o wide: the handler's replicas now (0: scaled to zero), shard count.
                        {
                            "name": "Handler",
                            "type": "integer",
                            "jsonPath": ".status.handlerReplicas",
                            "priority": 1,
                        },
                        {
                            "name": "Shards",
                            "type": "integer",
                            "jsonPath": ".spec.parallelism.shards",
                            "priority": 1,
                        },
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


_HEADER = (
    "# Generated from gpufaas.core.api by `gpufaas crd` (gpufaas.core.crd.render_crd_yaml).\n"
    "# Do not edit: change the pydantic models, then regenerate.\n"
)


def render_crd_yaml() -> str:
    """The CRD as deterministic YAML (stable key order), with a do-not-edit header."""
    body = yaml.safe_dump(build_crd(), sort_keys=False, default_flow_style=False, width=120)
    return _HEADER + body
