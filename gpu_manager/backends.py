"""The model-format seam: how a format's artifact becomes a runnable on a device.

A :class:`ModelBackend` does three things for its formats:

1. :meth:`~ModelBackend.prepare`: read an artifact into a *host layout* (a
   :class:`~gpufaas.gpu_manager.host_tier.PreparedModel`: the weights as one arena plus a weightless
   skeleton and the measured activation reserve). The host and disk tiers cache that arena.
2. :meth:`~ModelBackend.start`: build a runnable for one device from a copy source (the host arena
   or a neighbour's device arena), possibly still arriving: the device tier calls it once per load.
3. :meth:`~ModelBackend.run`: run one (possibly batched) request on the runnable.

Everything else (tiers, admission, eviction, batching, HTTP) is format-agnostic. Adding a format is
one module implementing this protocol, a value in :class:`gpufaas.core.api.ModelFormat`, and its
line in :func:`backend_for`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec, ModelFormat
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.host_tier import PreparedModel
from gpufaas.gpu_manager.loader import DeviceModel, ForwardResult

__all__ = ["CopySource", "ModelBackend", "backend_for", "model_error_message"]


@dataclass(frozen=True)
class CopySource:
    """Where a device load reads a model's arena from."""

    arena: torch.Tensor
    device: DeviceBackend | None  # the neighbour's backend for a peer copy; None for host memory
    label: str  # "host" or "peer:<device id>"


class ModelBackend(Protocol):
    name: str
    # Whether a device's copy can serve as another device's source (an arena on the device).
    peer_copies: bool

    def prepare(
        self,
        path: Path,
        spec: InferenceFunctionSpec,
        *,
        fingerprint: str,
        alignment: int,
        min_group_bytes: int,
        variable_dim: int,
    ) -> PreparedModel:
        """Load and check the artifact and lay out its weights. Blocking: run in a thread.
        Raises :class:`gpufaas.core.modelio.ModelLoadError` naming what cannot be served."""
        ...

    def start(
        self, model: DeviceModel, device: DeviceBackend, *, source: CopySource, in_use_bytes: int
    ) -> None:
        """Allocate ``model`` on ``device``, start filling it from ``source`` and build its
        runnable (``model.module``). Blocking; raises ``DeviceOutOfMemory`` when it does not fit."""
        ...

    def run(
        self,
        model: DeviceModel,
        inputs: Sequence[NDArray[Any]],
        spec: InferenceFunctionSpec,
        device: DeviceBackend,
    ) -> ForwardResult:
        """Run one request. Blocking. Exceptions from the model propagate (the caller maps them
        to 400s); ``TransferFailed`` means the weights never arrived."""
        ...


class NoBackend(ValueError):
    """A format no node backend serves as a whole model (``layered``: a shard set's)."""


@functools.cache
def _backends() -> dict[ModelFormat, ModelBackend]:
    """Formats to backends, built once (the forward path asks per request); the backends are
    imported here, not at module level, so that a node imports onnxruntime only when asked."""
    from gpufaas.gpu_manager.backend_onnx import ONNX
    from gpufaas.gpu_manager.backend_torch import TORCH

    return {
        ModelFormat.TORCHSCRIPT: TORCH,
        ModelFormat.TORCH_EXPORT: TORCH,
        ModelFormat.ONNX: ONNX,
    }


def backend_for(format: ModelFormat) -> ModelBackend:
    """The backend that serves ``format``; :class:`NoBackend` for ``layered``, which a node
    serves only as shards (gpu_manager/shards.py), never as a model on one device."""
    backend = _backends().get(ModelFormat(format))
    if backend is None:
        raise NoBackend(
            f"spec.model.format {str(format)!r} is not served as a model on one device: a"
            " layered net is split across GPU managers through the gateway (spec.parallelism),"
            " which loads its shards; register it with the gateway, not a GPU manager"
        )
    return backend


def model_error_message(error: BaseException) -> str:
    """The line of a model's exception that says what went wrong (TorchScript puts it last,
    after its own traceback), at most 500 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("The following operation failed"):
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
                return line[:500]
    return lines[0][:500]
