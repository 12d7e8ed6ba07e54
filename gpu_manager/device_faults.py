"""What goes wrong on a device, and what the node does about it.

An allocation that fails (:class:`DeviceOutOfMemory`, :func:`is_out_of_memory`) or a copy that
fails (:class:`TransferFailed`) is answered with a clear error, and the node keeps serving. A
sticky CUDA error (:func:`is_fatal_device_error`: a device-side assert, an illegal access) poisons
the device's context for good: :class:`NodeHealth` marks the node not ready and ends the process,
so the supervisor restarts it while the gateway retries elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

import torch

__all__ = [
    "EXIT_DEVICE_FAILED",
    "DeviceFailed",
    "DeviceOutOfMemory",
    "NodeHealth",
    "TransferFailed",
    "is_fatal_device_error",
    "is_out_of_memory",
    "terminate_process",
]

logger = logging.getLogger(__name__)


class DeviceOutOfMemory(Exception):
    """A device (or host) allocation failed: the caller answers with a clear error and keeps serving."""


class TransferFailed(Exception):
    """Copying a model's weights to a device failed; the message says why."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure on a device or the host (never a crash to propagate)."""
    if isinstance(error, DeviceOutOfMemory | MemoryError | torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


# --- fatal device errors ----------------------------------------------------------------------------

# CUDA errors that leave the context unusable ("sticky"): every later call on it fails too.
_STICKY_CUDA_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "hardware stack error",
    "invalid program counter",
    "the launch timed out and was terminated",
    "cudaerrorassert",
    "cudaerrorillegaladdress",
)

EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: the supervisor restarts the manager
_FORCE_EXIT_AFTER_S = 15.0  # a graceful shutdown stuck on a dead GPU is cut short


class DeviceFailed(Exception):
    """A device's CUDA context is poisoned: the node stops serving and the process exits."""

    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"device {device_id} failed: {message}")
        self.device_id = device_id

    @classmethod
    def from_error(cls, device_id: str, error: BaseException) -> DeviceFailed:
        """The failure of ``device_id`` that ``error`` means, told by the line of its message
        that names the sticky error (else its first line)."""
        return cls(device_id, _first_line(error))


def is_fatal_device_error(error: BaseException) -> bool:
    """True for a sticky CUDA error (device-side assert, illegal memory access, ...).

    TorchScript wraps the error in its own RuntimeError and puts the CUDA message inside, so
    the whole message is searched, and so are chained causes.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DeviceFailed):
            return True
        message = str(current).lower()
        if any(marker in message for marker in _STICKY_CUDA_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False


def terminate_process(message: str) -> None:
    """Stop serving: SIGTERM to ourselves (uvicorn shuts down and the process exits non-zero),
    and a hard exit with :data:`EXIT_DEVICE_FAILED` if that has not happened in 15 s."""
    timer = threading.Timer(_FORCE_EXIT_AFTER_S, os._exit, (EXIT_DEVICE_FAILED,))
    timer.daemon = True
    timer.start()
    signal.raise_signal(signal.SIGTERM)


class NodeHealth:
    """Whether this node may serve. A fatal device error makes it not ready, for good.

    The first :meth:`device_failed` logs, records the failure and calls ``on_fatal`` once (by
    default :func:`terminate_process`): the supervisor restarts the manager, and the gateway,
    seeing 503s and a failing readiness probe, retries elsewhere meanwhile.
    """

    def __init__(self, *, on_fatal: Callable[[str], None] = terminate_process) -> None:
        self._on_fatal = on_fatal
        self._lock = threading.Lock()
        self.failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.failure is None

    def device_failed(self, device_id: str, error: BaseException) -> DeviceFailed:
        """Record a fatal error on ``device_id``; returns the exception to answer with."""
        failed = (
            error if isinstance(error, DeviceFailed) else DeviceFailed.from_error(device_id, error)
        )
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = str(failed)
        if first:
            logger.critical("%s; the node is not ready and the manager exits", failed)
            self._on_fatal(str(failed))
        return failed


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = next(
        (line for line in lines if any(m in line.lower() for m in _STICKY_CUDA_ERRORS)), None
    )
    return (marker or (lines[0] if lines else type(error).__name__))[:300]
