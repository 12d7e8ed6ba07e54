"""A CRD's validation as a Kubernetes API server applies it, for tests.

The order is the API server's: prune ``null`` where the schema does not allow it,
apply structural defaults, check the OpenAPI schema (here through ``jsonschema``,
with unknown fields refused as ``kubectl apply``'s strict field validation does),
enforce ``x-kubernetes-list-type: map`` keys, then evaluate every
``x-kubernetes-validations`` rule with a real CEL evaluator (``cel-python``).
Values are typed for CEL by the schema (``number`` is a double even when written
as 1), as the API server types them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import jsonschema
from celpy import celtypes


class ApiServerSchema:
    """Admission of custom objects against one CRD version's ``openAPIV3Schema``."""

    def __init__(self, crd: Mapping[str, Any], *, version: int = 0) -> None:
        self.schema: dict[str, Any] = crd["spec"]["versions"][version]["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft4Validator(_to_draft4(self.schema, path=()))
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def default(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """``document`` as the API server would store it: nulls pruned, defaults applied."""
        obj = copy.deepcopy(dict(document))
        _prune_nulls(obj, self.schema)
        _apply_defaults(obj, self.schema)
        return obj

    def admit(self, document: Mapping[str, Any]) -> list[str]:
        """The reasons the API server would refuse ``document`` (empty: it is stored)."""
        obj = self.default(document)
        errors = [
            f"{_path(e.absolute_path)}: {e.message}" for e in self._validator.iter_errors(obj)
        ]
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not _is_dns_subdomain(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
        if errors:  # rules only run on objects of the right shape
            return errors
        errors += list(_list_map_errors(obj, self.schema, "<root>"))
        errors += list(self._rule_errors(obj, self.schema, "<root>"))
        return errors

    def _rule_errors(self, value: Any, schema: Mapping[str, Any], path: str) -> Iterator[str]:
        if value is None:
            return
        for rule in schema.get("x-kubernetes-validations") or []:
            try:
                ok = self._program(rule["rule"]).evaluate({"self": _to_cel(value, schema)})
            except celpy.CELEvalError as e:  # an evaluation error refuses the object
                yield f"{path}: {rule['rule']!r} failed to evaluate: {e}"
                continue
            if not isinstance(ok, celtypes.BoolType) or not bool(ok):  # errors, non-bools: refuse
                yield f"{path}{rule.get('fieldPath', '')}: {rule['message']}"
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                if name in value:
                    yield from self._rule_errors(value[name], sub, f"{path}.{name}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                yield from self._rule_errors(item, schema["items"], f"{path}[{i}]")

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self._env.program(self._env.compile(rule))
        return self._programs[rule]


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts) or "<root>"


def _to_draft4(node: Mapping[str, Any], *, path: tuple[str, ...]) -> dict[str, Any]:
    """OpenAPI v3 (structural) -> JSON Schema draft 4, with the API server's semantics."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in {"nullable", "default", "description"}:
            continue
        if key == "properties":
            out[key] = {n: _to_draft4(s, path=(*path, n)) for n, s in value.items()}
        elif key == "items":
            out[key] = _to_draft4(value, path=(*path, "[]"))
        elif key == "pattern":
            # ECMA/RE2 "$" ends the text; Python's also matches before a final newline.
            out[key] = value.replace("$", r"\Z")
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    # Strict field validation (kubectl's default): unknown fields are errors, except in
    # metadata, which the API server validates itself.
    if node.get("type") == "object" and "properties" in node and path != ("metadata",):
        out["additionalProperties"] = False
    return out


def _prune_nulls(value: Any, schema: Mapping[str, Any]) -> None:
    """Drop ``null`` fields the schema does not mark nullable (they take their default)."""
    if not isinstance(value, dict):
        if isinstance(value, list) and "items" in schema:
            for item in value:
                _prune_nulls(item, schema["items"])
        return
    for name, sub in (schema.get("properties") or {}).items():
        if name in value:
            if value[name] is None and not sub.get("nullable"):
                del value[name]
            else:
                _prune_nulls(value[name], sub)


def _apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Structural defaulting: absent fields with a default get it, recursively."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(item, schema["items"])


def _list_map_errors(value: Any, schema: Mapping[str, Any], path: str) -> Iterator[str]:
    if isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                key = tuple(item.get(k) for k in keys)
                if key in seen:
                    yield f"{path}[{i}]: Duplicate value: {dict(zip(keys, key, strict=True))}"
                seen.add(key)
        for i, item in enumerate(value):
            yield from _list_map_errors(item, schema.get("items") or {}, f"{path}[{i}]")
    elif isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from _list_map_errors(value[name], sub, f"{path}.{name}")


def _to_cel(value: Any, schema: Mapping[str, Any]) -> Any:
    """A JSON value as the API server hands it to CEL, typed by its schema."""
    kind = schema.get("type")
    if value is None:
        return None
    if kind == "object":
        props = schema.get("properties") or {}
        return celtypes.MapType(
            {
                celtypes.StringType(k): _to_cel(v, props.get(k, {}))
                for k, v in value.items()
                if k in props or not props
            }
        )
    if kind == "array":
        return celtypes.ListType([_to_cel(v, schema.get("items") or {}) for v in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "string":
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)


def _is_dns_subdomain(name: str) -> bool:
    """The API server's own check of every custom object's name."""
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    return len(name) <= 253 and re.fullmatch(rf"{label}(\.{label})*", name) is not None
