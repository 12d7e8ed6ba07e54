"""Loading a model onto a device layer by layer, and running it while its last layers land.

:func:`start_copy` allocates the model's arena on the device and starts copying the source arena
(host memory, or a neighbouring device's arena) group by group in forward order, one event per
group (:class:`gpufaas.gpu_manager.devices.Transfer`). It then builds the replica module over
the arena right away. :func:`run_forward` runs a request on a model; while the model is still
arriving, an :class:`~gpufaas.gpu_manager.layout.ArrivalGate` makes each operator wait only for
the group holding the weights it reads, so compute starts as soon as the first layer is there
(the PipeSwitch scheme). Once the copy is done, requests run with no gate at all.

The same code runs on GPUs and CPU stand-ins; only the backend differs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.gpu_manager.devices import DeviceBackend, Transfer, TransferFailed
from gpufaas.gpu_manager.host_tier import Skeleton
from gpufaas.gpu_manager.layout import ArrivalGate, build_replica
from gpufaas.gpu_manager.tensors import name_outputs, to_tensor

__all__ = ["DeviceModel", "ForwardResult", "build_module", "run_forward", "start_copy"]


@dataclass(eq=False)
class DeviceModel:
    """A model on one device: its arena, the replica over it, and the copy that fills it."""

    name: str
    fingerprint: str
    skeleton: Skeleton
    size_bytes: int  # the cache entry: arena + activation reserve
    source: str  # where the weights came from: "host" or "peer:<device id>"
    arena: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    transfer: Transfer | None = None
    holds: int = 0
    drain_key: str | None = None
    arrived: bool = False
    error: str | None = None

    @property
    def weights_bytes(self) -> int:
        return self.skeleton.layout.weights_bytes

    @property
    def arena_bytes(self) -> int:
        return self.skeleton.layout.arena_bytes

    @property
    def reserve_bytes(self) -> int:
        return self.size_bytes - self.arena_bytes


def start_copy(
    model: DeviceModel,
    backend: DeviceBackend,
    *,
    source_arena: torch.Tensor,
    source_backend: DeviceBackend | None,
    in_use_bytes: int,
) -> None:
    """Allocate ``model``'s arena on ``backend``'s device and start the grouped copy into it.

    Raises :class:`~gpufaas.gpu_manager.devices.DeviceOutOfMemory` if the arena does not fit.
    The copy runs on a copy stream (or thread) of its own; ``model.transfer`` tracks it.
    """
    layout = model.skeleton.layout
    arena, _reused = backend.allocate(layout.arena_bytes, in_use_bytes=in_use_bytes)
    model.arena = arena
    model.transfer = backend.start_transfer(
        arena, source_arena, layout.groups, source=source_backend
    )


def build_module(model: DeviceModel) -> None:
    """Build the replica over the (possibly still arriving) arena. Blocking, cheap: run in a thread."""
    if model.arena is None:
        raise RuntimeError(f"{model.name}: the arena is not allocated")
    model.module = build_replica(model.skeleton.module, model.skeleton.layout, model.arena)


@dataclass(frozen=True)
class ForwardResult:
    outputs: dict[str, tuple[NDArray[Any], str]]
    compute_ms: float
    gated: bool  # whether the model was still arriving when the request started


def run_forward(
    model: DeviceModel,
    inputs: Sequence[NDArray[Any]],
    spec: InferenceFunctionSpec,
    backend: DeviceBackend,
) -> ForwardResult:
    """Run one (possibly batched) request on ``model``. Blocking: run it in a thread.

    Exceptions from the model propagate; :class:`~gpufaas.gpu_manager.devices.TransferFailed`
    means the weights never arrived.
    """
    if model.module is None:
        # A race with an unload or a failed build, not the caller's input: a retryable 503.
        raise TransferFailed(f"{model.name}: the replica is not built")
    transfer = model.transfer
    if model.error is not None:
        raise TransferFailed(model.error)
    gated = not model.arrived and transfer is not None and not transfer.done()
    if not model.arrived and transfer is not None and not gated:
        transfer.wait_all()  # finished: returns at once, or raises if the copy failed
    started = time.perf_counter()
    with backend.compute():
        tensors = [
            to_tensor(array, tensor_spec.datatype, backend.device)
            for array, tensor_spec in zip(inputs, spec.inputs, strict=True)
        ]
        gate: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if gated and transfer is not None and model.arena is not None:
            gate = ArrivalGate(model.arena, transfer.groups, transfer.wait_group)
        with torch.inference_mode(), gate:
            try:
                result = model.module(*tensors)
            except Exception:
                # TorchScript wraps the gate's TransferFailed in a RuntimeError: a failed copy
                # must surface as a load failure (503), not as the model rejecting the input.
                if gated and transfer is not None:
                    transfer.wait_all()
                raise
        outputs = name_outputs(result, spec)  # copies to host: the device work is done
    return ForwardResult(outputs, (time.perf_counter() - started) * 1000, gated)
