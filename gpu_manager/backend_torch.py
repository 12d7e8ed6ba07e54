"""TorchScript and ``torch.export`` models: arenas copied layer group by layer group.

Preparing loads the artifact safely (:func:`gpufaas.core.modelio.load_model`), probes one forward
pass for the order layers run in and the activation peak, and lays the weights out as one arena
(:func:`gpufaas.gpu_manager.host_tier.prepare_model`). Starting on a device allocates the device
arena, starts the grouped copy and builds a replica over it at once
(:mod:`gpufaas.gpu_manager.loader`), so a request can compute while the last layers land.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.gpu_manager.backends import CopySource
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.host_tier import PreparedModel, prepare_model
from gpufaas.gpu_manager.loader import (
    DeviceModel,
    ForwardResult,
    build_module,
    run_forward,
    start_copy,
)

__all__ = ["TORCH", "TorchBackend"]


class TorchBackend:
    name = "torch"
    peer_copies = True

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
        return prepare_model(
            path,
            spec,
            fingerprint=fingerprint,
            alignment=alignment,
            min_group_bytes=min_group_bytes,
            variable_dim=variable_dim,
        )

    def start(
        self, model: DeviceModel, device: DeviceBackend, *, source: CopySource, in_use_bytes: int
    ) -> None:
        start_copy(
            model,
            device,
            source_arena=source.arena,
            source_backend=source.device,
            in_use_bytes=in_use_bytes,
        )
        build_module(model)

    def run(
        self,
        model: DeviceModel,
        inputs: Sequence[NDArray[Any]],
        spec: InferenceFunctionSpec,
        device: DeviceBackend,
    ) -> ForwardResult:
        return run_forward(model, inputs, spec, device)


TORCH = TorchBackend()
