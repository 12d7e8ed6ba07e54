"""Reading InferenceFunction manifests from files, as local mode does.

Local mode reads the same YAML a user would ``kubectl apply``. One extra rule
applies only here: ``${VAR}`` in ``spec.model.uri`` is expanded from the
environment, with ``GPUFAAS_MODELS`` defaulting to where the example models
are built, so the bundled examples work from any checkout.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpufaas.core.api import KIND, InferenceFunction, ManifestError, parse_manifest
from gpufaas.core.config import models_dir


def bundled_functions_dir() -> Path:
    """The example manifests shipped with the package."""
    return Path(str(resources.files("gpufaas.examples") / "functions"))


def _expand(document: dict[str, Any], variables: Mapping[str, str]) -> dict[str, Any]:
    model = document.get("spec", {}).get("model")
    if isinstance(model, dict) and isinstance(model.get("uri"), str):
        template = string.Template(model["uri"])
        missing = [name for name in template.get_identifiers() if name not in variables]
        if missing:
            raise ManifestError(
                f"spec.model.uri: undefined variable(s) {missing} in {model['uri']!r}"
            )
        model["uri"] = template.substitute(variables)
    return document


def _documents(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
    try:
        for index, document in enumerate(yaml.safe_load_all(text)):
            if document is not None:
                yield (f"{path}" if index == 0 else f"{path}#{index}"), document
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None


def load_manifests(
    paths: list[Path], *, variables: Mapping[str, str] | None = None
) -> list[InferenceFunction]:
    """Every InferenceFunction in the given files and folders (``*.yaml``/``*.yml``).

    Other kinds are skipped; an invalid manifest raises :class:`ManifestError`
    naming the file and the field. Names must be unique.
    """
    env = {**os.environ, "GPUFAAS_MODELS": str(models_dir()), **(variables or {})}
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"}))
        elif path.exists():
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or folder")
    functions: dict[str, InferenceFunction] = {}
    for file in files:
        for source, document in _documents(file):
            if not isinstance(document, dict):
                raise ManifestError(f"{source}: expected a mapping, got {type(document).__name__}")
            if document.get("kind") != KIND:
                continue
            function = parse_manifest(_expand(document, env), source=source)
            if function.name in functions:
                raise ManifestError(f"{source}: duplicate function name {function.name!r}")
            functions[function.name] = function
    return list(functions.values())
