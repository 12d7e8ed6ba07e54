"""The InferenceFunction API (``gpufaas.dev/v1alpha1``): the one source of truth.

Pydantic models for the spec and status of an InferenceFunction. The CRD in
``crds/`` is generated from these models (:mod:`gpufaas.core.crd`), local mode
reads manifests through them, and the operator validates with them, so a field
is defined exactly once. Field names are camelCase on the wire, snake_case in
Python.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

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
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_TENSOR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"
_QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|[kmgtpe])?$"

Name = Annotated[str, StringConstraints(pattern=_NAME_PATTERN, max_length=63)]


class _Model(BaseModel):
    """Shared config: camelCase aliases, unknown fields rejected, population by name."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class ModelFormat(enum.StrEnum):
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    ONNX = "onnx"


class ModelSource(_Model):
    """Where the model's weights live and how they are packaged."""

    uri: Annotated[str, StringConstraints(pattern=_URI_PATTERN, max_length=2048)] = Field(
        description="Artifact location: file://, http(s):// or s3://.",
    )
    format: ModelFormat = Field(description="torchscript, torch-export or onnx.")
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None, description="Hex SHA-256 of the artifact; verified when given."
    )


class TensorSpec(_Model):
    """One named input or output tensor. ``-1`` marks a variable dimension."""

    name: Annotated[str, StringConstraints(pattern=_TENSOR_NAME_PATTERN, max_length=128)]
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=-1)]] = Field(max_length=16)

    @field_validator("shape")
    @classmethod
    def _no_zero_dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 for d in shape):
            raise ValueError("dimensions must be positive or -1 (variable), not 0")
        return shape


class Batching(_Model):
    """Dynamic batching of concurrent requests for the same function."""

    max_batch_size: int = Field(default=1, ge=1, le=4096)
    max_delay_ms: float = Field(default=0.0, ge=0, le=10_000)


class SLO(_Model):
    latency_ms: float | None = Field(default=None, gt=0, description="Target end-to-end latency.")


class Resources(_Model):
    gpu_memory: Annotated[str, StringConstraints(pattern=_QUANTITY_PATTERN)] | None = Field(
        default=None, description="A size hint such as 2Gi; the measured size wins."
    )

    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else parse_bytes(self.gpu_memory)


class Handler(_Model):
    """An optional container for the function's own pre/post-processing."""

    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=1, ge=1, le=1000)
    port: int = Field(default=8080, ge=1, le=65535)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> Handler:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})"
            )
        return self


class InferenceFunctionSpec(_Model):
    model: ModelSource
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    batching: Batching = Field(default_factory=Batching)
    slo: SLO = Field(default_factory=SLO)
    resources: Resources = Field(default_factory=Resources)
    handler: Handler | None = None

    @model_validator(mode="after")
    def _unique_tensor_names(self) -> InferenceFunctionSpec:
        for side in ("inputs", "outputs"):
            names = [t.name for t in getattr(self, side)]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{side}: duplicate tensor names {dupes}")
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


def is_valid_name(name: str) -> bool:
    return re.fullmatch(_NAME_PATTERN, name) is not None and len(name) <= 63
