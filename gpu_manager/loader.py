"""Loading a model onto a device layer by layer, and running it while its last layers land.

:func:`start_copy` allocates the model's arena on the device and starts copying the source arena
(host memory, or a neighbouring device's arena) group by group in forward order, one event per
group (:class:`gpufaas.gpu_manager.devices.Transfer`). It then builds the replica module over
the arena right away. :func:`run_forward` runs a request on a model; while the model is still
arriving, an :class:`~gpufaas.gpu_manager.layout.ArrivalGate` makes each operator wait only for
the group holding the weights it reads, so compute starts as soon as the first layer is there
(the PipeSwitch scheme). Once the copy is done, requests run with no gate at all.

Before a request's tensors go to the device, integer inputs the probe saw indexing a weight
(token ids into an embedding) are checked against that weight's size: an id out of range is a
400 naming the input, never a device-side assert. A sticky CUDA error during a request raises
:class:`~gpufaas.gpu_manager.device_faults.DeviceFailed`: the node must stop serving.

The same code runs on GPUs and CPU stand-ins; only the backend differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.gpu_manager.device_faults import (
    DeviceFailed,
    TransferFailed,
    is_fatal_device_error,
    is_out_of_memory,
)
from gpufaas.gpu_manager.devices import DeviceBackend, Transfer, start_held_back_transfer
from gpufaas.gpu_manager.host_tier import Skeleton
from gpufaas.gpu_manager.layout import ArrivalGate, build_replica
from gpufaas.gpu_manager.process_setup import script_fusion_possible
from gpufaas.gpu_manager.tensors import (
    TensorError,
    check_index_inputs,
    name_outputs,
    synthetic_inputs,
    to_tensor,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceModel",
    "ForwardResult",
    "GateCheck",
    "build_module",
    "forward_retrying_oom",
    "gate_check",
    "measure_device_reserve",
    "run_forward",
    "start_copy",
]


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
    began_at: float | None = None  # when its load began (perf_counter): its whole time's start

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

    Raises :class:`~gpufaas.gpu_manager.device_faults.DeviceOutOfMemory` if the arena does not fit.
    The copy runs on a copy stream (or thread) of its own; ``model.transfer`` tracks it.
    Blocking (allocation may wait for the driver, issuing a copy may too): call it from a
    worker thread, never on the event loop.
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

    Exceptions from the model propagate; :class:`~gpufaas.gpu_manager.device_faults.TransferFailed`
    means the weights never arrived.
    """
    if model.module is None:
        # A race with an unload or a failed build, not the caller's input: a retryable 503.
        raise TransferFailed(f"{model.name}: the replica is not built")
    transfer = model.transfer
    if model.error is not None:
        raise TransferFailed(model.error)
    check_index_inputs(inputs, spec.inputs, model.skeleton.probe.index_bounds)
    gated = not model.arrived and transfer is not None and not transfer.done()
    if gated and _gate_blind(model.module, backend.device):
        gated = False  # fused TorchScript kernels would read weights the gate never saw
    if not model.arrived and transfer is not None and not gated:
        transfer.wait_all()  # returns once every group has landed, or raises if the copy failed
    started = time.perf_counter()
    try:
        with backend.compute():
            device = backend.device  # a property that builds a torch.device: once per pass
            tensors = [
                to_tensor(array, tensor_spec.datatype, device)
                for array, tensor_spec in zip(inputs, spec.inputs, strict=True)
            ]
            gate: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if gated and transfer is not None and model.arena is not None:
                gate = ArrivalGate(model.arena, transfer.groups, transfer.wait_group)
            # torch.inference_mode()'s own C++ guard, without its Python wrapper (~1.4 µs a pass)
            with torch._C._InferenceMode(True), gate:
                try:
                    result = model.module(*tensors)
                except Exception as e:
                    # TorchScript wraps the gate's TransferFailed in a RuntimeError: a failed
                    # copy must surface as a load failure (503), not as the model rejecting
                    # the input.
                    if gated and transfer is not None and not is_fatal_device_error(e):
                        transfer.wait_all()
                    raise
            outputs = name_outputs(result, spec)  # copies to host: the device work is done
    except (TensorError, TransferFailed, DeviceFailed):
        raise
    except Exception as e:
        if is_fatal_device_error(e):
            raise DeviceFailed(str(backend.device), _sticky_line(e)) from e
        raise
    return ForwardResult(outputs, (time.perf_counter() - started) * 1000, gated)


def _gate_blind(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether the arrival gate cannot see every weight read: a TorchScript module while its
    fusers may run (the manager turns them off at start-up; this guards any other caller)."""
    return isinstance(module, torch.jit.ScriptModule) and script_fusion_possible(device)


def _sticky_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")[
        :300
    ]


async def forward_retrying_oom(
    forward: Callable[[], ForwardResult],
    *,
    backend: DeviceBackend,
    evict_unheld: Callable[[], int],
    inline: bool = False,
) -> ForwardResult:
    """Run ``forward`` in a worker thread (``inline``: on the loop, for a pass measured to be
    cheaper than the hop; see ``inline.py``); if the device runs out of memory, evict every
    model not in use (``evict_unheld``, on the loop: the tiers are the loop's), hand cached
    blocks back to the driver in a worker thread, and try once more in a worker thread. A
    second OOM propagates."""
    try:
        return forward() if inline else await asyncio.to_thread(forward)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        logger.warning(
            "%s ran out of memory computing (%s); evicting and retrying", backend.info.id, e
        )
    evicted = evict_unheld()
    await asyncio.to_thread(backend.trim)
    logger.info("%s: evicted %d model(s) not in use; retrying once", backend.info.id, evicted)
    return await asyncio.to_thread(forward)


def measure_device_reserve(
    skeleton: Skeleton,
    host_arena: torch.Tensor,
    spec: InferenceFunctionSpec,
    backend: DeviceBackend,
    *,
    variable_dim: int,
) -> int | None:
    """The activation reserve measured on the device itself, at the declared maximum dims.

    A temporary replica is loaded and run once on zero inputs with ``maxBatchSize`` rows and
    ``variable_dim`` for other variable dimensions, and the device's peak allocation during
    the forward pass (inputs, activations, workspaces, allocator rounding) is returned; the
    replica's arena is freed before returning. None where the device does not track memory
    (CPU stand-ins keep the probe's figure). Blocking; raises on OOM (the caller keeps the
    probe's figure).
    """
    layout = skeleton.layout
    arena, _ = backend.allocate(layout.arena_bytes, in_use_bytes=layout.arena_bytes)
    try:
        backend.start_transfer(arena, host_arena, layout.groups).wait_all()
        module = build_replica(skeleton.module, layout, arena)
        inputs = synthetic_inputs(
            spec.inputs, rows=spec.batching.max_batch_size, variable_dim=variable_dim
        )

        def forward() -> None:
            with backend.compute(), torch.inference_mode():
                module(*(t.to(backend.device) for t in inputs))

        return backend.peak_bytes_during(forward)
    finally:
        del arena


# --- the gate check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateCheck:
    """One forward pass run while the late groups of a model were still NaN and held back."""

    gated: bool
    late_groups: int
    max_abs_error: float  # against the reference output (nan if the output has NaN)
    has_nan: bool
    waited_groups: int  # late groups the gate made the forward wait for

    @property
    def passed(self) -> bool:
        return not self.has_nan and self.max_abs_error <= 1e-4


def gate_check(
    skeleton: Skeleton,
    host_arena: torch.Tensor,
    backend: DeviceBackend,
    inputs: Sequence[torch.Tensor],
    reference: torch.Tensor,
    *,
    gated: bool,
    cuda_delay_s: float = 0.2,
) -> GateCheck:
    """Check that the arrival gate holds a forward pass back until its layers have landed.

    The device arena is filled with NaN, the first half of the groups is copied at once, and
    the late half is held back: on the CPU the copy thread waits until the forward asks for a
    late group (or has finished, for the control); on CUDA a sleep kernel of ``cuda_delay_s``
    is queued on the copy stream before them. With ``gated`` the forward runs under the
    :class:`ArrivalGate` and must match ``reference``; without it (the control), it reads NaN
    weights and must not. Blocking; used by the tests and by ``make gpu-check``.
    """
    layout = skeleton.layout
    arena, _ = backend.allocate(layout.arena_bytes, in_use_bytes=layout.arena_bytes)
    arena.fill_(0xFF)  # all-ones bytes: NaN in every float format
    first_late = max(1, len(layout.groups) // 2)
    backend.start_transfer(arena, host_arena, layout.groups[:first_late]).wait_all()
    release = threading.Event()
    late = start_held_back_transfer(
        backend,
        arena,
        host_arena,
        layout.groups[first_late:],
        release=release,
        cuda_delay_s=cuda_delay_s,
    )
    module = build_replica(skeleton.module, layout, arena)
    waited: set[int] = set()

    def wait_group(group: int) -> None:
        if group >= first_late:
            waited.add(group)
            release.set()
            late.wait_group(group - first_late)

    try:
        with backend.compute(), torch.inference_mode():
            device_inputs = [t.to(backend.device) for t in inputs]
            gate: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if gated:
                gate = ArrivalGate(arena, layout.groups, wait_group)
            with gate:
                output = module(*device_inputs)
            result = output.detach().to("cpu", copy=True)
    finally:
        release.set()
        late.wait_all()
    has_nan = bool(torch.isnan(result).any())
    error = float("nan") if has_nan else float((result - reference).abs().max())
    return GateCheck(gated, len(layout.groups) - first_late, error, has_nan, len(waited))
