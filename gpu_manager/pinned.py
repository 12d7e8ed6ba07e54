"""Page-locked host memory: host arenas the GPUs can read by DMA, and request tensors staged
for their copy to a device.

Host arenas are registered with ``cudaHostRegister`` (exact sizes; torch's pinned allocator rounds
up to a power of two); a request's tensors come from torch's caching host allocator. Without CUDA
every function here hands back plain (pageable) memory, so the callers run unchanged on the CPU.
The buffers themselves come from :mod:`gpufaas.gpu_manager.memory`, which knows nothing of CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from gpufaas.gpu_manager.device_faults import DeviceOutOfMemory
from gpufaas.gpu_manager.memory import anonymous_buffer

__all__ = [
    "allocate_host",
    "cuda_available",
    "pinned_array",
    "register_host",
    "stage_for",
    "unregister_host",
]

logger = logging.getLogger(__name__)

_CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context, not only the current one


def cuda_available() -> bool:
    return torch.cuda.is_available()


def allocate_host(nbytes: int, *, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host buffer of exactly ``nbytes``, page-locked when ``pin`` and CUDA is present.

    Returns the ``uint8`` tensor and whether it is page-locked. The memory is registered with
    ``cudaHostRegister`` rather than taken from torch's pinned allocator, which rounds every
    allocation up to a power of two; it is unregistered when the tensor is freed.
    """
    try:
        buffer = anonymous_buffer(nbytes)
    except MemoryError as e:
        raise DeviceOutOfMemory(str(e)) from None
    if not pin or nbytes == 0 or not torch.cuda.is_available():
        return buffer, False
    pointer = buffer.data_ptr()
    error = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
        pointer, nbytes, 0
    )
    if int(error) != 0:
        logger.warning(
            "cannot page-lock %d bytes (CUDA error %s); using pageable memory", nbytes, error
        )
        return buffer, False
    weakref.finalize(buffer, _unregister_host, pointer)
    return buffer, True


def stage_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A request's host tensor, ready for its copy to ``device``.

    On a CUDA device: copied once into pinned memory from torch's caching host allocator, so the
    host-to-device copy that follows is a real asynchronous DMA (a pageable source makes the
    driver stage it through its own buffer, synchronously); the allocator reuses a staging
    block only once the copies that read it are done. Anywhere else: the tensor itself, no copy.
    """
    if device.type != "cuda" or tensor.is_pinned():
        return tensor
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staged.copy_(tensor)
    return staged


def pinned_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
    """An array in pinned host memory from torch's caching host allocator, for a request's
    tensor on a CUDA host: decoded straight into it (``decode_request(allocate=...)``), it goes
    to the device with no staging copy (:func:`stage_for` passes a pinned tensor through). The
    array holds its block; the request's compute stream is synchronized before the request (and
    so the array) ends, so the block is never reused while its copy is in flight."""
    return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True).numpy()


@functools.cache
def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def register_host(pointer: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` of host memory at ``pointer`` for all GPUs; False if CUDA refuses
    (or is absent). Blocking, and slow for large ranges (every page is faulted in and locked):
    done once per node at start-up, never per refill. Undo with :func:`unregister_host`."""
    if nbytes == 0 or not torch.cuda.is_available():
        return False
    error = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
        pointer, nbytes, _CUDA_HOST_REGISTER_PORTABLE
    )
    if int(error) != 0:
        logger.warning("cannot page-lock %d bytes (CUDA error %s)", nbytes, error)
        return False
    return True


def unregister_host(pointer: int) -> None:
    _unregister_host(pointer)


def _unregister_host(pointer: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(pointer)  # type: ignore[no-untyped-call]
