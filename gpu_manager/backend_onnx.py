"""ONNX models, run by onnxruntime: the CUDA execution provider on a GPU, the CPU one otherwise.

Preparing checks the model (:func:`gpufaas.core.onnxmodel.read_onnx`: no external data, every
operator known and runnable; otherwise a load failure naming the operator) and lays out its bytes
as a one-group arena, so the host and disk tiers cache it like any other model. Starting on a device
opens an onnxruntime session from the host arena: onnxruntime places the initializers on the
device itself, so there is no grouped copy to overlap with, and no peer copy. The activation
reserve is the inputs and outputs at ``maxBatchSize`` rows, measured by one run on the CPU, plus a
quarter of the weights for onnxruntime's own arena (it reports no activation peak).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.modelio import ModelLoadError
from gpufaas.core.onnxmodel import open_session, read_onnx, run
from gpufaas.gpu_manager.backends import CopySource
from gpufaas.gpu_manager.device_faults import TransferFailed
from gpufaas.gpu_manager.devices import DeviceBackend
from gpufaas.gpu_manager.host_tier import FALLBACK_RESERVE_FRACTION, PreparedModel, Skeleton
from gpufaas.gpu_manager.layout import Layout, ProbeResult, StorageSlot
from gpufaas.gpu_manager.loader import DeviceModel, ForwardResult
from gpufaas.gpu_manager.tensors import TensorError, synthetic_inputs

__all__ = ["ONNX", "OnnxBackend", "OnnxRunnable"]


class OnnxRunnable(torch.nn.Module):
    """An onnxruntime session as a device model's runnable (it holds no torch tensors)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session


class OnnxBackend:
    name = "onnx"
    peer_copies = False  # onnxruntime owns the device copy; there is no arena to copy from

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
        model = read_onnx(path)
        size = len(model.data)
        layout = Layout(
            storages=(StorageSlot(0, size, ""),),
            tensors=(),
            groups=((0, size),),
            group_owners=("",),
            arena_bytes=size,
            weights_bytes=model.initializer_bytes,
            alignment=alignment,
        )
        probe = _probe(model.data, spec, variable_dim=variable_dim, path=path)
        stat = path.stat()
        skeleton = Skeleton(
            module=torch.nn.Module(),
            layout=layout,
            reserve_bytes=probe.reserve_bytes
            + int(model.initializer_bytes * FALLBACK_RESERVE_FRACTION),
            probe=probe,
            fingerprint=fingerprint,
            artifact=path,
            artifact_stat=(stat.st_size, stat.st_mtime_ns),
        )
        view = torch.frombuffer(bytearray(model.data), dtype=torch.uint8)
        return PreparedModel(skeleton=skeleton, views=[view])

    def start(
        self, model: DeviceModel, device: DeviceBackend, *, source: CopySource, in_use_bytes: int
    ) -> None:
        size = model.skeleton.layout.arena_bytes
        data = source.arena[:size].numpy().tobytes()
        info = device.info
        model.module = OnnxRunnable(
            open_session(data, device_kind=info.kind, device_index=info.index)
        )

    def run(
        self,
        model: DeviceModel,
        inputs: Sequence[NDArray[Any]],
        spec: InferenceFunctionSpec,
        device: DeviceBackend,
    ) -> ForwardResult:
        runnable = model.module
        if not isinstance(runnable, OnnxRunnable):
            raise TransferFailed(f"{model.name}: the session is not open")
        if any(t.datatype == "BYTES" for t in spec.inputs):
            raise TensorError(
                "BYTES tensors cannot be fed to an ONNX model; tokenize them first",
                status=400,
                reason="InvalidInput",
            )
        started = time.perf_counter()
        results = run(runnable.session, inputs, names=[t.name for t in spec.inputs])
        if len(results) != len(spec.outputs):
            raise TensorError(
                f"the model returned {len(results)} outputs but the function declares "
                f"{len(spec.outputs)} ({', '.join(o.name for o in spec.outputs)})",
                status=500,
                reason="OutputMismatch",
            )
        outputs: dict[str, tuple[NDArray[Any], str]] = {
            o.name: (r, o.datatype) for o, r in zip(spec.outputs, results, strict=True)
        }
        return ForwardResult(outputs, (time.perf_counter() - started) * 1000, gated=False)


def _probe(
    data: bytes, spec: InferenceFunctionSpec, *, variable_dim: int, path: Path
) -> ProbeResult:
    """Input and output bytes of one CPU run at ``maxBatchSize`` rows."""
    try:
        inputs = [
            t.numpy()
            for t in synthetic_inputs(
                spec.inputs, rows=spec.batching.max_batch_size, variable_dim=variable_dim
            )
        ]
    except TensorError as e:
        return ProbeResult((), 0, 0, error=str(e))
    session = open_session(data, device_kind="cpu")
    try:
        outputs = run(session, inputs)
    except ModelLoadError:
        raise
    except Exception as e:
        return ProbeResult((), sum(a.nbytes for a in inputs), 0, error=f"{type(e).__name__}: {e}")
    return ProbeResult(
        (), sum(a.nbytes for a in inputs), sum(np.asarray(o).nbytes for o in outputs)
    )


ONNX = OnnxBackend()
