"""Between the wire's numpy arrays and a model's torch tensors, in both directions.

Also the synthetic inputs a model is probed with when it enters the host tier (to learn the
order its layers run in and how much memory its activations take).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from gpufaas.core.api import InferenceFunctionSpec, TensorSpec
from gpufaas.gpu_manager.pinned import stage_for

__all__ = [
    "TORCH_DTYPES",
    "TensorError",
    "check_index_inputs",
    "name_outputs",
    "synthetic_inputs",
    "to_array",
    "to_tensor",
]

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
    "INT32": torch.int32, "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32,
    "FP64": torch.float64, "BF16": torch.bfloat16, "UINT16": torch.uint16,
    "UINT32": torch.uint32, "UINT64": torch.uint64,
}  # fmt: skip


class TensorError(Exception):
    """Inputs or outputs that do not fit the function's declared tensors."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def check_index_inputs(
    inputs: Sequence[NDArray[Any]],
    specs: Sequence[TensorSpec],
    bounds: Sequence[tuple[int, int]],
) -> None:
    """Raise a 400 naming the input when an index input (token ids) leaves ``[0, bound)``.

    ``bounds`` are the probe's ``(input position, bound)`` pairs: inputs seen indexing a
    weight. Checked on the host before upload: on a GPU an out-of-range id is a device-side
    assert that poisons the CUDA context for every later request.
    """
    for position, bound in bounds:
        if position >= len(inputs) or inputs[position].size == 0:
            continue
        array = inputs[position]
        if array.dtype.kind not in "iub":
            continue
        low, high = int(np.min(array)), int(np.max(array))
        if low < 0 or high >= bound:
            bad = low if low < 0 else high
            where = tuple(int(i) for i in np.argwhere(array == bad)[0])
            name = specs[position].name if position < len(specs) else f"#{position}"
            raise TensorError(
                f"input {name!r} holds {bad} at index {list(where)}, outside the model's "
                f"range [0, {bound}) (the size of the table it indexes)",
                status=400,
                reason="InvalidInput",
            )


def to_tensor(array: NDArray[Any], datatype: str, device: torch.device) -> torch.Tensor:
    if datatype == "BYTES":
        raise TensorError(
            "BYTES tensors cannot be fed to a torch model; tokenize or decode them in a handler",
            status=400,
            reason="InvalidInput",
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if datatype == "BF16":  # carried as raw uint16 bits
        tensor = tensor.view(torch.bfloat16)
    if device.type == "cpu":  # the decoded array's memory is the tensor: no copy, no dispatch
        return tensor
    # CUDA: through a pinned staging buffer, so the copy is asynchronous.
    return stage_for(tensor, device).to(device, non_blocking=True)


def to_array(tensor: torch.Tensor, datatype: str) -> NDArray[Any]:
    # Each step only where it does something: both cost a dispatch per output (~1 µs).
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.to("cpu")
    if datatype == "BF16":
        return tensor.contiguous().view(torch.uint16).numpy()
    expected = TORCH_DTYPES.get(datatype)
    if expected is not None and tensor.dtype != expected:
        tensor = tensor.to(expected)
    return tensor.numpy()


def name_outputs(result: Any, spec: InferenceFunctionSpec) -> dict[str, tuple[NDArray[Any], str]]:
    """The model's result as ``{output name: (array, datatype)}`` in the declared order."""
    if isinstance(result, torch.Tensor):
        values: list[Any] = [result]
    elif isinstance(result, Mapping):
        values = [result[o.name] for o in spec.outputs]
    else:
        values = list(result)
    if len(values) != len(spec.outputs):
        raise TensorError(
            f"the model returned {len(values)} outputs but the function declares "
            f"{len(spec.outputs)} ({', '.join(o.name for o in spec.outputs)})",
            status=500,
            reason="OutputMismatch",
        )
    return {
        o.name: (to_array(v, o.datatype), o.datatype)
        for o, v in zip(spec.outputs, values, strict=True)
    }


def synthetic_inputs(
    inputs: Sequence[TensorSpec], *, rows: int, variable_dim: int
) -> list[torch.Tensor]:
    """Zero tensors in the declared shapes: ``rows`` for a variable first (batch) dimension,
    ``variable_dim`` for other variable dimensions. Zeros are valid token ids and masks too."""
    tensors = []
    for spec in inputs:
        shape = [
            (rows if axis == 0 else variable_dim) if size == -1 else size
            for axis, size in enumerate(spec.shape)
        ]
        dtype = TORCH_DTYPES.get(spec.datatype)
        if dtype is None:
            raise TensorError(
                f"input {spec.name!r} is {spec.datatype}, which a torch model cannot take",
                status=400,
                reason="InvalidInput",
            )
        tensors.append(torch.zeros(shape, dtype=dtype))
    return tensors
