"""The host tier: model weights in (page-locked) host memory, ready to be copied to a device.

A model enters the host tier from its artifact once: :func:`prepare_model` loads it (safely, with
:func:`gpufaas.core.modelio.load_model`), probes one forward pass for the order its layers run in
and its activation peak, lays its storages out as one arena in that order
(:mod:`gpufaas.gpu_manager.layout`), and leaves a weightless :class:`Skeleton` to build device
replicas from. The arena lives in a host buffer, page-locked when CUDA is present (so host to
device copies run at the PCIe limit with no staging copy), plain memory otherwise.

After the first fill, the arena is also written to a *sidecar*: a safetensors file holding the
arena as one ``uint8`` tensor, with the layout in its metadata. When the host tier later evicts
the model and needs it again, the refill is one ``readinto`` from the (usually page-cached) sidecar
straight into the host buffer: no unzip, no unpickling, no second copy. The sidecar is checked
against the artifact's size and modification time and the skeleton's layout before it is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.modelio import ModelLoadError, load_model
from gpufaas.gpu_manager.layout import (
    Layout,
    ProbeResult,
    fill_arena,
    named_tensors,
    plan_layout,
    probe,
    script_device_constants,
    strip,
)
from gpufaas.gpu_manager.memory import SlabAllocator, anonymous_buffer
from gpufaas.gpu_manager.pinned import cuda_available, register_host, unregister_host
from gpufaas.gpu_manager.tensors import TensorError, synthetic_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "HostModel",
    "HostSlab",
    "PreparedModel",
    "SidecarError",
    "Skeleton",
    "prepare_model",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]


SIDECAR_TENSOR = "arena"
SIDECAR_VERSION = "1"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
# Without a probe, activations are assumed to need this share of the weights.
FALLBACK_RESERVE_FRACTION = 0.25


class SidecarError(Exception):
    """A sidecar that cannot be used (missing, stale, corrupt); the artifact is read instead."""


@dataclass(eq=False)
class Skeleton:
    """A model without its weights: what a device replica is copied from, plus its layout."""

    module: torch.nn.Module  # every tensor emptied
    layout: Layout
    reserve_bytes: int  # measured activation reserve (inputs + peak intermediates)
    probe: ProbeResult
    fingerprint: str
    artifact: Path
    artifact_stat: tuple[int, int]  # size, mtime_ns: what the sidecar was made from
    sidecar: Path | None = None  # set once the sidecar is written
    reserve_measured: bool = False  # reserve_bytes measured on a GPU, not the CPU probe's

    def describe(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.layout.weights_bytes,
            "arena_bytes": self.layout.arena_bytes,
            "reserve_bytes": self.reserve_bytes,
            "groups": len(self.layout.groups),
            "tensors": len(self.layout.tensors),
            "probe_error": self.probe.error,
            "sidecar": str(self.sidecar) if self.sidecar else None,
        }


@dataclass(eq=False)
class HostModel:
    """A model's arena in host memory (an entry of the host tier)."""

    skeleton: Skeleton
    arena: torch.Tensor  # uint8, layout.arena_bytes long
    pinned: bool  # page-locked
    source: str  # "artifact" or "sidecar"
    cached: bool = False  # an entry of the host tier (else a one-off copy for one load)
    holds: int = 0  # device copies reading it, plus its own load
    drain_key: str | None = None

    @property
    def fingerprint(self) -> str:
        return self.skeleton.fingerprint

    @property
    def size_bytes(self) -> int:
        return self.skeleton.layout.arena_bytes


_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0  # no swap reservation


class HostSlab:
    """The host tier's memory: one buffer for the node, page-locked once at start-up.

    Page-locking (``cudaHostRegister``) faults in and locks every page, which takes seconds per
    tens of GiB; doing it per refill stalled whoever called it. Here it happens once, in the
    constructor, and each arena is a range of the slab (:class:`SlabAllocator`, best fit). A
    range goes back to the slab when the last tensor viewing it is freed, so an arena still
    read by a copy is never handed out twice.

    When the slab is too fragmented for an arena, a plain buffer outside it is used, and
    :meth:`is_pinned` says so: the reported pinned flag is the truth for each arena.

    The interface matches :class:`~gpufaas.gpu_manager.memory.BufferPool` (``take``, ``give``,
    ``trim``, ``pooled_bytes``). Thread-safe.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        pin: bool,
        register: Callable[[int, int], bool] | None = None,
        unregister: Callable[[int], None] | None = None,
        alignment: int = 4096,
    ) -> None:
        register = register or register_host
        unregister = unregister or unregister_host
        self.allocator = SlabAllocator(capacity_bytes, alignment=alignment)
        size = self.allocator.capacity_bytes
        self._lock = threading.Lock()
        self._mapping: mmap.mmap | None = None
        self.base = 0
        self.pinned = False
        self.pin_seconds = 0.0
        self.fallbacks = 0  # arenas served outside the slab (fragmentation)
        if size:
            self._mapping = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            )
            with contextlib.suppress(OSError, AttributeError):
                self._mapping.madvise(mmap.MADV_HUGEPAGE)
            self.base = ctypes.addressof(ctypes.c_uint8.from_buffer(self._mapping))
        if pin and size:
            started = time.perf_counter()
            self.pinned = register(self.base, size)
            self.pin_seconds = time.perf_counter() - started
            if self.pinned:
                weakref.finalize(self, unregister, self.base)
                logger.info("host slab: %d MiB page-locked in %.1f s", size >> 20, self.pin_seconds)

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity_bytes

    @property
    def pooled_bytes(self) -> int:
        return 0  # free ranges are part of the slab, not memory kept beside it

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self.allocator.used_bytes

    def take(self, nbytes: int, *, in_use_bytes: int = 0) -> tuple[torch.Tensor, bool]:
        """An arena of exactly ``nbytes`` (zeroed only the first time its pages are used) and
        whether it came from the slab's warm memory. Never pins: fast enough for the loop."""
        if nbytes == 0 or self._mapping is None:
            return anonymous_buffer(nbytes), False
        with self._lock:
            offset = self.allocator.allocate(nbytes)
        if offset is None:
            self.fallbacks += 1
            logger.warning(
                "host slab has no hole of %d bytes (largest %d); using unpinned memory",
                nbytes,
                self.allocator.largest_free,
            )
            return anonymous_buffer(nbytes), False
        # A subclass of the ctypes array takes weak references: the finalizer frees the range
        # once torch drops the storage (which keeps the block alive) with the last view.
        block_type: Any = type("SlabBlock", (ctypes.c_uint8 * nbytes,), {})
        block = block_type.from_buffer(self._mapping, offset)
        weakref.finalize(block, self._free, offset)
        return torch.frombuffer(block, dtype=torch.uint8), True

    def _free(self, offset: int) -> None:
        with self._lock:
            self.allocator.free(offset)

    def give(self, buffer: torch.Tensor, *, in_use_bytes: int = 0) -> bool:
        """Nothing to do: a range returns to the slab when its last tensor is freed."""
        return False

    def trim(self, keep_bytes: int = 0) -> int:
        return 0

    def is_pinned(self, buffer: torch.Tensor) -> bool:
        """Whether ``buffer`` lies in the page-locked slab."""
        if not self.pinned or buffer.numel() == 0:
            return False
        offset = buffer.data_ptr() - self.base
        return offset >= 0 and offset + buffer.numel() <= self.capacity_bytes


@dataclass(eq=False)
class PreparedModel:
    """A loaded, probed and laid-out model whose weights still sit in the loaded module."""

    skeleton: Skeleton  # its module still holds the weights until :meth:`fill`
    views: list[torch.Tensor]  # each storage's bytes, in arena order
    notes: list[str] = field(default_factory=list)

    def fill(self, arena: torch.Tensor) -> None:
        """Copy the weights into ``arena`` and strip the module, which becomes the skeleton."""
        fill_arena(arena, self.skeleton.layout, self.views)
        self.views.clear()
        strip(self.skeleton.module)


def prepare_model(
    path: Path,
    spec: InferenceFunctionSpec,
    *,
    fingerprint: str,
    alignment: int,
    min_group_bytes: int,
    variable_dim: int,
    device_type: str | None = None,
) -> PreparedModel:
    """Load an artifact, probe it, and plan its arena. Blocking: run it in a thread.

    The probe uses ``spec.batching.max_batch_size`` rows (the largest batch the manager forms)
    and ``variable_dim`` for other variable dimensions. ``device_type`` is where replicas will
    run ("cuda" or "cpu"; default: cuda when torch has it): a traced TorchScript model with
    baked-in CPU device constants cannot run on a GPU and is refused with
    :class:`~gpufaas.core.modelio.ModelLoadError` naming them.
    """
    stat = path.stat()
    module = load_model(path, format=spec.model.format)  # thread-safe for both formats
    module.eval()
    target = device_type or ("cuda" if cuda_available() else "cpu")
    if target == "cuda":
        baked = [c for c in script_device_constants(module) if "'cpu'" in c]
        if baked:
            raise ModelLoadError(
                path,
                spec.model.format,
                f"the TorchScript code has CPU device constants ({'; '.join(baked[:3])}), "
                "baked in by tracing, so it cannot run on a GPU; export it with torch.export "
                "(whose device arguments are retargeted), or script the code that creates "
                "tensors so it uses the input's device",
            )
    named = named_tensors(module)
    try:
        inputs = synthetic_inputs(
            spec.inputs, rows=spec.batching.max_batch_size, variable_dim=variable_dim
        )
        result = probe(module, inputs)
    except TensorError as e:
        result = ProbeResult((), 0, 0, error=str(e))
    layout, views = plan_layout(
        named, first_use=result.first_use, alignment=alignment, min_group_bytes=min_group_bytes
    )
    notes = []
    if result.error is None:
        reserve = result.reserve_bytes
    else:
        reserve = int(layout.weights_bytes * FALLBACK_RESERVE_FRACTION)
        notes.append(
            f"probe failed ({result.error}); layers copied in declaration order, "
            f"reserve estimated as {FALLBACK_RESERVE_FRACTION:.0%} of the weights"
        )
        logger.warning("model %s: %s", path.name, notes[-1])
    skeleton = Skeleton(
        module=module,
        layout=layout,
        reserve_bytes=reserve,
        probe=result,
        fingerprint=fingerprint,
        artifact=path,
        artifact_stat=(stat.st_size, stat.st_mtime_ns),
    )
    return PreparedModel(skeleton=skeleton, views=views, notes=notes)


# --- sidecars ---------------------------------------------------------------------------------------


def sidecar_path(directory: Path, *, fingerprint: str, artifact: Path) -> Path:
    digest = hashlib.sha256(f"{fingerprint}|{artifact.resolve()}".encode()).hexdigest()[:40]
    return directory / f"{digest}.safetensors"


def _metadata(skeleton: Skeleton) -> dict[str, str]:
    return {
        "gpufaas_sidecar": SIDECAR_VERSION,
        "fingerprint": skeleton.fingerprint,
        "artifact": str(skeleton.artifact.resolve()),
        "artifact_size": str(skeleton.artifact_stat[0]),
        "artifact_mtime_ns": str(skeleton.artifact_stat[1]),
        "torch": torch.__version__,
        "layout": skeleton.layout.to_json(),
    }


def write_sidecar(path: Path, skeleton: Skeleton, arena: torch.Tensor) -> None:
    """Write ``arena`` as a safetensors file (one ``U8`` tensor), atomically. Blocking."""
    nbytes = skeleton.layout.arena_bytes
    header = {
        "__metadata__": _metadata(skeleton),
        SIDECAR_TENSOR: {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]},
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            if nbytes:
                out.write(arena[:nbytes].numpy().data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_sidecar(
    path: Path,
    skeleton: Skeleton,
    arena: torch.Tensor,
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fill ``arena`` from a sidecar with one read into it; :class:`SidecarError` if unusable.

    The header is parsed and checked with safetensors' own reader; the data then goes straight
    from the file into the (page-locked) arena. Blocking.
    """
    from safetensors import safe_open

    nbytes = skeleton.layout.arena_bytes
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            keys = list(reader.keys())
        with path.open("rb", buffering=0) as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            if header_bytes > _MAX_HEADER_BYTES:
                raise SidecarError(f"{path}: header of {header_bytes} bytes is too large")
            header = json.loads(f.read(header_bytes))
            entry = header.get(SIDECAR_TENSOR, {})
            expected = _metadata(skeleton)
            stale = [k for k, v in expected.items() if k != "torch" and metadata.get(k) != v]
            if keys != [SIDECAR_TENSOR] or stale:
                raise SidecarError(f"{path} does not match the model ({', '.join(stale) or keys})")
            if entry.get("dtype") != "U8" or entry.get("data_offsets") != [0, nbytes]:
                raise SidecarError(f"{path}: the arena tensor has the wrong size or type")
            target = arena[:nbytes].numpy().data
            done = 0
            while done < nbytes:  # readinto may return short counts; bounded by the file size
                count = f.readinto(target[done:])
                if not count:
                    raise SidecarError(f"{path} is truncated ({done} of {nbytes} bytes)")
                done += count
                if progress is not None:
                    progress(done)
    except SidecarError:
        raise
    except (OSError, ValueError, struct.error) as e:
        raise SidecarError(f"{path}: {e}") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise SidecarError(f"{path}: {type(e).__name__}: {e}") from None
