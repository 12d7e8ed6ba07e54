"""Request tensors on their way to a device: pinned staging on CUDA, nothing on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gpufaas.gpu_manager import pinned as devices
from gpufaas.gpu_manager.tensors import to_tensor


def test_on_the_cpu_a_request_tensor_is_the_decoded_array_itself() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = to_tensor(array, "FP32", torch.device("cpu"))
    assert tensor.data_ptr() == array.ctypes.data  # no staging copy, no device copy
    source = torch.from_numpy(array)
    assert devices.stage_for(source, torch.device("cpu")) is source


def test_for_a_cuda_device_the_tensor_is_copied_into_pinned_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No GPU here: torch's allocator is asked for pinned memory (it would pin on a CUDA host)
    and the staged tensor holds the request's values in a buffer of its own."""
    asked: list[dict[str, Any]] = []
    real_empty = torch.empty

    def empty(*shape: Any, **kwargs: Any) -> torch.Tensor:
        asked.append(kwargs)
        return real_empty(*shape, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(devices.torch, "empty", empty)
    source = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    staged = devices.stage_for(source, torch.device("cuda", 0))
    assert asked == [{"dtype": torch.int64, "pin_memory": True}]
    assert torch.equal(staged, source) and staged.data_ptr() != source.data_ptr()
