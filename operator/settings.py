"""The operator's own configuration, read once from ``GPUFAAS_*`` environment variables.

The Helm chart sets these on the operator Deployment. Every value has a default
that works in a cluster installed by the chart into the ``gpufaas`` namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, ValidationError

# A Kubernetes Quantity in any form the API server accepts ("0.1", "100m", "131072Ki");
# the operator compares them by value with what the server stores (its canonical form).
Quantity = Annotated[
    str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[numkMGTPE]|[eE][0-9]+)?$")
]

ENV_PREFIX = "GPUFAAS_"


class SettingsError(ValueError):
    """A ``GPUFAAS_*`` variable with a bad value; the message names the variable."""


class OperatorSettings(BaseModel):
    """What the operator needs to build children and to talk to the gateway."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The gpufaas image; the model-check Job runs `gpufaas check-model` in it.
    image: str = Field(default="ghcr.io/gpufaas/gpufaas:0.1.0", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Handed to handler pods and written to status.endpoint; also where unload is sent.
    gateway_url: str = Field(
        default="http://gpufaas-gateway.gpufaas.svc:8080", pattern=r"^https?://"
    )
    # Safety-net re-reconcile period per function (children are also watched).
    resync_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Model-check Job.
    check_deadline_seconds: int = Field(default=900, ge=10)
    check_backoff_limit: int = Field(default=1, ge=0, le=10)
    check_cpu_request: Quantity = "250m"
    check_memory_request: Quantity = "512Mi"
    check_memory_limit: Quantity = "8Gi"
    # Optional Secret with object-store credentials (AWS_* for s3://), mounted into the check Job.
    artifact_secret: str | None = None
    # Handler Deployment.
    handler_cpu_request: Quantity = "100m"
    handler_memory_request: Quantity = "128Mi"
    handler_memory_limit: Quantity = "1Gi"
    # Bearer token of the gateway's admin API (/v2/repository/...), shared through a Secret.
    admin_token: SecretStr | None = None
    # Unload on delete: bounded attempts, each with a timeout, exponential backoff between.
    unload_attempts: int = Field(default=5, ge=1, le=20)
    unload_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    unload_backoff_seconds: float = Field(default=1.0, ge=0, le=30)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """Read ``GPUFAAS_<FIELD>`` variables; unset or empty ones keep the default."""
        values = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if environ.get(ENV_PREFIX + name.upper())
        }
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(
                f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}" for err in e.errors()
            )
            raise SettingsError(f"invalid operator settings: {problems}") from None

    @property
    def gateway_base(self) -> str:
        return self.gateway_url.rstrip("/")

    def endpoint_for(self, name: str) -> str:
        return f"{self.gateway_base}/v2/models/{name}"

    def unload_url_for(self, name: str) -> str:
        return f"{self.gateway_base}/v2/repository/models/{name}/unload"
