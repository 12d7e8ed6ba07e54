"""One validation, two enforcers: pydantic and the generated CRD accept and refuse alike.

Each manifest of the corpus goes through :func:`gpufaas.core.api.parse_manifest` and
through the CRD as an API server applies it (:mod:`apiserver_schema`: null pruning,
structural defaults, the OpenAPI schema, list-map keys, then every CEL rule through
cel-python). Each case also states the expected verdict, so both enforcers
accepting everything (or refusing everything) fails.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apiserver_schema import ApiServerSchema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufaas.core.api import ManifestError, parse_manifest
from gpufaas.core.crd import build_crd

BASE: dict[str, Any] = {
    "apiVersion": "gpufaas.dev/v1alpha1",
    "kind": "InferenceFunction",
    "metadata": {"name": "fn", "namespace": "ml"},
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
_DELETE = object()


def put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: set (or, with _DELETE, remove) the value at a dotted path."""

    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[int(last) if last.isdigit() else last]
        elif last.isdigit() and int(last) == len(node):
            node.append(value)
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def build(*mutations: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for mutate in mutations:
        mutate(doc)
    return doc


def tensor(name: str, shape: list[Any], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


VALID, INVALID = True, False
# (id, manifest, should it be accepted)
CORPUS: list[tuple[str, dict[str, Any], bool]] = [
    ("base", build(), VALID),
    ("minimal", build(put("spec.batching", _DELETE), put("spec.slo", _DELETE),
                      put("spec.resources", _DELETE), put("spec.handler", _DELETE)), VALID),
    # metadata.name
    ("name-underscore", build(put("metadata.name", "Not_A_DNS_Name")), INVALID),
    ("name-dotted", build(put("metadata.name", "a.b")), INVALID),
    ("name-64-chars", build(put("metadata.name", "a" * 64)), INVALID),
    ("name-63-chars", build(put("metadata.name", "a" * 63)), VALID),
    # model
    ("uri-ftp", build(put("spec.model.uri", "ftp://x/y")), INVALID),
    ("uri-empty", build(put("spec.model.uri", "")), INVALID),
    ("uri-too-long", build(put("spec.model.uri", "s3://b/" + "k" * 2048)), INVALID),
    ("uri-missing", build(put("spec.model.uri", _DELETE)), INVALID),
    ("format-unknown", build(put("spec.model.format", "pickle")), INVALID),
    ("format-torch-export", build(put("spec.model.format", "torch-export")), VALID),
    ("format-layered-sharded", build(put("spec.model.format", "layered"),
                                     put("spec.parallelism", {"shards": 2})), VALID),
    ("format-layered-unsharded", build(put("spec.model.format", "layered")), INVALID),
    ("sha256-short", build(put("spec.model.sha256", "abc")), INVALID),
    ("sha256-upper", build(put("spec.model.sha256", "A" * 64)), INVALID),
    ("sha256-null", build(put("spec.model.sha256", None)), VALID),
    ("model-extra-field", build(put("spec.model.weights", "x")), INVALID),
    ("model-missing", build(put("spec.model", _DELETE)), INVALID),
    # inputs / outputs
    ("inputs-empty", build(put("spec.inputs", [])), INVALID),
    ("inputs-65", build(put("spec.inputs", [tensor(f"t{i}", [-1]) for i in range(65)]),
                        put("spec.batching", _DELETE)), INVALID),
    ("inputs-duplicate-names", build(put("spec.inputs.1", tensor("x", [-1, 2]))), INVALID),
    ("outputs-duplicate-names", build(put("spec.outputs.1", tensor("y", [-1, 2]))), INVALID),
    ("same-name-input-and-output", build(put("spec.outputs.0.name", "x")), VALID),
    ("two-inputs", build(put("spec.inputs.1", tensor("z", [-1, 3], "INT64"))), VALID),
    ("tensor-name-digit", build(put("spec.inputs.0.name", "1x")), INVALID),
    ("tensor-name-empty", build(put("spec.inputs.0.name", "")), INVALID),
    ("tensor-name-129", build(put("spec.inputs.0.name", "x" * 129)), INVALID),
    ("tensor-name-newline", build(put("spec.inputs.0.name", "x\n")), INVALID),
    ("datatype-fp8", build(put("spec.inputs.0.datatype", "FP8")), INVALID),
    ("datatype-missing", build(put("spec.outputs.0.datatype", _DELETE)), INVALID),
    ("shape-zero", build(put("spec.inputs.0.shape", [-1, 0])), INVALID),
    ("shape-minus-two", build(put("spec.inputs.0.shape", [-1, -2])), INVALID),
    ("shape-string", build(put("spec.inputs.0.shape", [-1, "16"])), INVALID),
    ("shape-float", build(put("spec.inputs.0.shape", [-1, 16.0])), INVALID),
    ("shape-17-dims", build(put("spec.inputs.0.shape", [-1] * 17)), INVALID),
    ("shape-scalar", build(put("spec.inputs.0.shape", []), put("spec.batching", _DELETE)), VALID),
    ("tensor-extra-field", build(put("spec.outputs.0.layout", "NCHW")), INVALID),
    ("outputs-missing", build(put("spec.outputs", _DELETE)), INVALID),
    # batching
    ("batch-size-zero", build(put("spec.batching.maxBatchSize", 0)), INVALID),
    ("batch-size-4097", build(put("spec.batching.maxBatchSize", 4097)), INVALID),
    ("batch-size-string", build(put("spec.batching.maxBatchSize", "8")), INVALID),
    ("batch-size-bool", build(put("spec.batching.maxBatchSize", True)), INVALID),
    ("delay-negative", build(put("spec.batching.maxDelayMs", -1)), INVALID),
    ("delay-10001", build(put("spec.batching.maxDelayMs", 10_001), put("spec.slo", _DELETE)),
     INVALID),
    ("delay-float", build(put("spec.batching.maxDelayMs", 2.5)), VALID),
    ("batching-null", build(put("spec.batching", None)), VALID),
    ("delay-without-batches", build(put("spec.batching.maxBatchSize", 1)), INVALID),
    ("batch-of-one-no-delay", build(put("spec.batching", {"maxBatchSize": 1})), VALID),
    ("batch-fixed-first-dim", build(put("spec.inputs.0.shape", [4, 16])), INVALID),
    ("batch-fixed-output-dim", build(put("spec.outputs.0.shape", [1, 4])), INVALID),
    ("no-batch-fixed-dims", build(put("spec.batching", _DELETE),
                                  put("spec.inputs.0.shape", [4, 16])), VALID),
    # slo
    ("latency-zero", build(put("spec.slo.latencyMs", 0)), INVALID),
    ("latency-negative", build(put("spec.slo.latencyMs", -5)), INVALID),
    ("latency-string", build(put("spec.slo.latencyMs", "50")), INVALID),
    ("latency-null", build(put("spec.slo.latencyMs", None)), VALID),
    ("delay-equals-latency", build(put("spec.slo.latencyMs", 2)), INVALID),
    ("delay-below-latency", build(put("spec.slo.latencyMs", 2.5)), VALID),
    # resources
    ("gpu-memory-words", build(put("spec.resources.gpuMemory", "lots")), INVALID),
    ("gpu-memory-newline", build(put("spec.resources.gpuMemory", "1Gi\n")), INVALID),
    ("gpu-memory-number", build(put("spec.resources.gpuMemory", 5)), INVALID),
    ("gpu-memory-decimal", build(put("spec.resources.gpuMemory", "1.5G")), VALID),
    ("resources-extra-field", build(put("spec.resources.cpu", "1")), INVALID),
    # handler
    ("handler-null", build(put("spec.handler", None)), VALID),
    ("handler-image-empty", build(put("spec.handler.image", "")), INVALID),
    ("handler-image-missing", build(put("spec.handler.image", _DELETE)), INVALID),
    ("handler-min-negative", build(put("spec.handler.minReplicas", -1)), INVALID),
    ("handler-max-zero", build(put("spec.handler.maxReplicas", 0)), INVALID),
    ("handler-min-over-max", build(put("spec.handler.minReplicas", 4)), INVALID),
    ("handler-min-over-default-max", build(put("spec.handler", {"image": "i", "minReplicas": 2})),
     INVALID),
    ("handler-scale-from-zero", build(put("spec.handler.minReplicas", 0)), VALID),
    ("handler-port-zero", build(put("spec.handler.port", 0)), INVALID),
    ("handler-port-70000", build(put("spec.handler.port", 70_000)), INVALID),
    ("handler-idle-zero", build(put("spec.handler.idleSeconds", 0)), INVALID),
    ("handler-idle-60", build(put("spec.handler.idleSeconds", 60)), VALID),
    # parallelism
    ("parallel-layer", build(put("spec.parallelism", {"shards": 64})), VALID),
    ("parallel-intra-4", build(put("spec.parallelism",
                                   {"shards": 4, "strategy": "intra-layer", "channel": "nats"})),
     VALID),
    ("parallel-intra-more-shards-than-rows", build(put("spec.parallelism",
                                                       {"shards": 8, "strategy": "intra-layer"})),
     INVALID),
    ("parallel-intra-variable-features", build(
        put("spec.parallelism", {"shards": 32, "strategy": "intra-layer", "channel": "s3"}),
        put("spec.inputs.0.shape", [-1, -1]), put("spec.outputs.0.shape", [-1, -1])), VALID),
    ("parallel-shards-zero", build(put("spec.parallelism", {"shards": 0})), INVALID),
    ("parallel-shards-257", build(put("spec.parallelism", {"shards": 257})), INVALID),
    ("parallel-shards-missing", build(put("spec.parallelism", {"strategy": "layer"})), INVALID),
    ("parallel-strategy-unknown", build(put("spec.parallelism", {"shards": 2, "strategy": "tensor"})),
     INVALID),
    ("parallel-channel-unknown", build(put("spec.parallelism", {"shards": 2, "channel": "kafka"})),
     INVALID),
    ("parallel-extra-field", build(put("spec.parallelism", {"shards": 2, "tree": True})), INVALID),
    ("parallel-null", build(put("spec.parallelism", None)), VALID),
    # the spec itself
    ("spec-unknown-field", build(put("spec.replicas", 3)), INVALID),
    ("spec-missing", build(put("spec", _DELETE)), INVALID),
]  # fmt: skip

SERVER = ApiServerSchema(build_crd())


def pydantic_accepts(doc: dict[str, Any]) -> bool:
    try:
        parse_manifest(doc)
    except ManifestError:
        return False
    return True


def test_the_corpus_is_large_and_two_sided() -> None:
    verdicts = [valid for _, _, valid in CORPUS]
    assert len(CORPUS) >= 30
    assert verdicts.count(VALID) >= 10 and verdicts.count(INVALID) >= 30
    assert len({case_id for case_id, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("case_id", "doc", "valid"), CORPUS, ids=[c[0] for c in CORPUS])
def test_pydantic_and_the_crd_agree(case_id: str, doc: dict[str, Any], valid: bool) -> None:
    server_errors = SERVER.admit(doc)
    assert pydantic_accepts(doc) is valid, f"pydantic: expected {'valid' if valid else 'invalid'}"
    assert (not server_errors) is valid, (
        f"CRD: expected {'valid' if valid else 'invalid'}: {server_errors}"
    )


def test_cross_field_refusals_come_from_cel_rules() -> None:
    """The rules themselves, not the schema, refuse these (so each rule is live)."""
    for case_id, message in [
        ("inputs-duplicate-names", "Duplicate value"),
        ("shape-zero", "dimensions must be positive"),
        ("delay-without-batches", "maxDelayMs needs maxBatchSize > 1"),
        ("batch-fixed-first-dim", "variable (-1) first dimension"),
        ("delay-equals-latency", "below slo.latencyMs"),
        ("handler-min-over-default-max", "minReplicas must not exceed maxReplicas"),
        ("parallel-intra-more-shards-than-rows", "parallelism.shards exceeds"),
        ("format-layered-unsharded", "'layered' needs parallelism"),
    ]:
        doc = next(d for c, d, _ in CORPUS if c == case_id)
        errors = SERVER.admit(doc)
        assert any(message in e for e in errors), (case_id, errors)


def test_parallelism_error_names_the_field() -> None:
    doc = next(d for c, d, _ in CORPUS if c == "parallel-intra-more-shards-than-rows")
    with pytest.raises(ManifestError, match=r"parallelism\.shards \(8\).*'y' \(4\)"):
        parse_manifest(doc)
    (error,) = SERVER.admit(doc)
    assert error.startswith("<root>.spec.parallelism.shards:")


# Random manifests around the base: single-field changes to values drawn from each field's
# neighbourhood (bounds, wrong types, nulls). The verdicts must agree on every one.
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=5000),
    st.sampled_from([0.0, 0.5, 2.0, 16.0, 1e4, 1e4 + 1]),
    st.sampled_from(
        ["", "x", "8", "1Gi", "FP32", "layer", "intra-layer", "nats", "layered", "a" * 64]
    ),
    st.lists(st.integers(min_value=-2, max_value=32), max_size=4),
)
_PATHS = [
    "spec.batching.maxBatchSize", "spec.batching.maxDelayMs", "spec.slo.latencyMs",
    "spec.resources.gpuMemory", "spec.handler.minReplicas", "spec.handler.maxReplicas",
    "spec.handler.port", "spec.handler.idleSeconds", "spec.handler.image",
    "spec.inputs.0.shape", "spec.outputs.0.shape", "spec.inputs.0.name", "spec.inputs.0.datatype",
    "spec.model.format", "spec.model.sha256", "spec.parallelism",
]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(_PATHS),
    value=_VALUES,
    parallel=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {
                "shards": st.integers(min_value=0, max_value=20),
                "strategy": st.sampled_from(["layer", "intra-layer"]),
            }
        ),
    ),
)
def test_random_single_field_changes_agree(path: str, value: Any, parallel: Any) -> None:
    doc = build(put("spec.parallelism", parallel), put(path, value))
    assert pydantic_accepts(doc) is (not SERVER.admit(doc)), SERVER.admit(doc)


def test_the_example_manifests_pass_both() -> None:
    import yaml

    examples = sorted(
        (Path(__file__).resolve().parents[2] / "examples" / "functions").glob("*.yaml")
    )
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            assert pydantic_accepts(doc), path.name
            assert SERVER.admit(doc) == [], path.name
