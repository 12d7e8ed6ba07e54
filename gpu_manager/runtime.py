"""The node runtime: functions, the two cache tiers, and running requests.

One :class:`NodeRuntime` per GPU-manager process. It keeps

- a host tier: each function's module loaded once into host memory, bounded
  in bytes (:class:`gpufaas.cache.ByteLRU`);
- a device tier per device: private copies on the device, bounded in bytes,
  where an entry in use is pinned and never a victim.

Loads are single-flight per (device, function) and run concurrently for
different functions. HTTP lives in :mod:`gpufaas.gpu_manager.server`; this
module raises :class:`RuntimeFailure` with the status and message to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from gpufaas.cache import ByteLRU, CacheStats, InsufficientCapacity, SingleFlight
from gpufaas.core.api import InferenceFunctionSpec
from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.modelio import ModelLoadError, load_model, tensor_bytes
from gpufaas.gpu_manager.devices import DeviceInfo, instantiate_on, is_out_of_memory

logger = logging.getLogger(__name__)


class RuntimeFailure(Exception):
    """A request that cannot be served; ``status`` and the message go to the caller."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class DeviceModel:
    """A function's module resident on one device."""

    module: torch.nn.Module
    size_bytes: int


@dataclass
class HostModel:
    """A function's module in host memory: the source for device loads."""

    module: torch.nn.Module
    size_bytes: int
    spec_fingerprint: str


@dataclass
class InferOutcome:
    outputs: dict[str, tuple[NDArray[Any], str]]
    cache_hit: bool
    load_ms: float
    compute_ms: float
    size_bytes: int


@dataclass
class _Device:
    info: DeviceInfo
    cache: ByteLRU[DeviceModel]
    slots: asyncio.Semaphore
    outstanding: int = 0
    loads: SingleFlight[str, None] = field(default_factory=SingleFlight)


def spec_fingerprint(spec: InferenceFunctionSpec) -> str:
    """What identifies a function's weights: a change invalidates cached copies."""
    return f"{spec.model.uri}|{spec.model.format}|{spec.model.sha256}"


class NodeRuntime:
    """Serves registered functions on this node's devices."""

    def __init__(
        self,
        *,
        devices: Sequence[DeviceInfo],
        store: ArtifactStore,
        host_capacity_bytes: int,
        max_concurrency_per_device: int = 4,
    ) -> None:
        if not devices:
            raise ValueError("a GPU manager needs at least one device")
        self.store = store
        self.functions: dict[str, InferenceFunctionSpec] = {}
        self.devices: dict[str, _Device] = {
            d.id: _Device(
                info=d,
                cache=ByteLRU(capacity_bytes=d.capacity_bytes),
                slots=asyncio.Semaphore(max_concurrency_per_device),
            )
            for d in devices
        }
        self.host: ByteLRU[HostModel] = ByteLRU(capacity_bytes=host_capacity_bytes)
        self._host_loads: SingleFlight[str, HostModel] = SingleFlight()
        self.stats = CacheStats()

    # -- functions ---------------------------------------------------------------

    def register(self, name: str, spec: InferenceFunctionSpec) -> None:
        """Add or update a function; changed weights drop every cached copy."""
        old = self.functions.get(name)
        self.functions[name] = spec
        if old is not None and spec_fingerprint(old) != spec_fingerprint(spec):
            self.drop_everywhere(name)

    def unregister(self, name: str) -> None:
        self.functions.pop(name, None)
        self.drop_everywhere(name)

    def spec(self, name: str) -> InferenceFunctionSpec:
        try:
            return self.functions[name]
        except KeyError:
            raise RuntimeFailure(
                f"unknown model {name!r} on this GPU manager", status=404, reason="UnknownModel"
            ) from None

    def drop_everywhere(self, name: str) -> list[str]:
        """Unload ``name`` from every device and the host tier (pins are respected
        by callers finishing; a pinned copy is dropped from the index right away)."""
        dropped = []
        for device in self.devices.values():
            if device.cache.discard(name) is not None:
                dropped.append(device.info.id)
        self.host.discard(name)
        return dropped

    def unload(self, name: str, *, device_id: str | None = None) -> list[str]:
        if device_id is None:
            return self.drop_everywhere(name)
        device = self.device(device_id)
        return [device_id] if device.cache.discard(name) is not None else []

    # -- devices -----------------------------------------------------------------

    def device(self, device_id: str | None) -> _Device:
        if device_id is None:
            return min(self.devices.values(), key=lambda d: d.outstanding)
        try:
            return self.devices[device_id]
        except KeyError:
            known = ", ".join(self.devices)
            raise RuntimeFailure(
                f"unknown device {device_id!r}; this node has {known}",
                status=400,
                reason="UnknownDevice",
            ) from None

    # -- loading -----------------------------------------------------------------

    async def _host_model(self, name: str) -> HostModel:
        spec = self.spec(name)
        fingerprint = spec_fingerprint(spec)
        entry = self.host.get(name)
        if entry is not None and entry.value is not None:
            if entry.value.spec_fingerprint == fingerprint:
                self.stats.record_hit("host")
                return entry.value
            self.host.discard(name)
        self.stats.record_miss("host")
        return await self._host_loads.do(name, lambda: self._load_to_host(name, spec))

    async def _load_to_host(self, name: str, spec: InferenceFunctionSpec) -> HostModel:
        try:
            path = await asyncio.to_thread(
                self.store.fetch, spec.model.uri, sha256=spec.model.sha256
            )
            module = await asyncio.to_thread(load_model, path, format=spec.model.format)
        except (ArtifactError, ModelLoadError) as e:
            raise RuntimeFailure(
                f"model {name!r} failed to load: {e}", status=503, reason="ModelLoadFailed"
            ) from None
        module.eval()
        size = tensor_bytes(module)
        model = HostModel(module=module, size_bytes=size, spec_fingerprint=spec_fingerprint(spec))
        try:
            self.host.make_room(size)
            self.host.put(name, model, size_bytes=size)
            self.stats.record_move("disk", "host", size)
        except InsufficientCapacity:
            logger.info(
                "host tier cannot hold %s (%d bytes); serving without caching it", name, size
            )
        return model

    async def ensure_loaded(self, name: str, device: _Device) -> bool:
        """Make ``name`` resident on ``device``; True when it already was (a hit)."""
        entry = device.cache.get(name)
        if entry is not None and entry.value is not None:
            self.stats.record_hit("device")
            return True
        self.stats.record_miss("device")
        await device.loads.do(name, lambda: self._load_to_device(name, device))
        return False

    async def _load_to_device(self, name: str, device: _Device) -> None:
        if name in device.cache:  # another flight finished between our check and now
            return
        host = await self._host_model(name)
        size = host.size_bytes
        try:
            for victim in device.cache.make_room(size):
                self.stats.record_eviction("device", victim.size_bytes)
            device.cache.reserve(name, size_bytes=size)
        except InsufficientCapacity as e:
            raise RuntimeFailure(
                f"model {name!r} needs {size} bytes on {device.info.id}, "
                f"which cannot be freed now: {e}",
                status=503,
                reason="InsufficientMemory",
            ) from None
        try:
            module = await asyncio.to_thread(instantiate_on, host.module, device.info)
        except Exception as e:
            device.cache.discard(name)
            if is_out_of_memory(e):
                raise RuntimeFailure(
                    f"device {device.info.id} ran out of memory loading {name!r}",
                    status=503,
                    reason="InsufficientMemory",
                ) from None
            raise
        device.cache.commit(name, DeviceModel(module=module, size_bytes=size))
        device.cache.unpin(name)
        self.stats.record_move("host", "device", size)

    async def load(self, name: str, *, device_id: str | None = None) -> str:
        device = self.device(device_id)
        await self.ensure_loaded(name, device)
        return device.info.id

    @contextlib.asynccontextmanager
    async def _use(
        self, name: str, device: _Device
    ) -> AsyncIterator[tuple[DeviceModel, bool, float]]:
        """Pin ``name`` on ``device`` for the duration of a request."""
        started = time.perf_counter()
        while True:
            hit = await self.ensure_loaded(name, device)
            entry = device.cache.peek(name)
            if entry is not None and entry.value is not None:
                break
            hit = False  # evicted between load and pin: load again
        load_ms = (time.perf_counter() - started) * 1000
        device.cache.pin(name)
        try:
            yield entry.value, hit, load_ms
        finally:
            # Unpin only our entry: it may have been dropped and reloaded meanwhile.
            if device.cache.peek(name) is entry:
                device.cache.unpin(name)

    # -- inference ---------------------------------------------------------------

    async def infer(
        self, name: str, inputs: Sequence[NDArray[Any]], *, device_id: str | None = None
    ) -> InferOutcome:
        spec = self.spec(name)
        device = self.device(device_id)
        device.outstanding += 1
        try:
            async with self._use(name, device) as (model, hit, load_ms), device.slots:
                started = time.perf_counter()
                outputs = await asyncio.to_thread(_forward, model.module, inputs, spec, device.info)
                compute_ms = (time.perf_counter() - started) * 1000
        finally:
            device.outstanding -= 1
        return InferOutcome(
            outputs=outputs,
            cache_hit=hit,
            load_ms=load_ms,
            compute_ms=compute_ms,
            size_bytes=model.size_bytes,
        )

    # -- state -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Both tiers with byte-exact sizes, in LRU order (least recent first)."""
        return {
            "devices": [
                {
                    **d.info.to_dict(),
                    "used_bytes": d.cache.used_bytes,
                    "outstanding": d.outstanding,
                    "residents": _residents(d.cache),
                }
                for d in self.devices.values()
            ],
            "host": {
                "capacity_bytes": self.host.capacity_bytes,
                "used_bytes": self.host.used_bytes,
                "residents": _residents(self.host),
            },
            "functions": sorted(self.functions),
            "stats": self.stats.snapshot(),
        }


def _residents(cache: ByteLRU[Any]) -> list[dict[str, Any]]:
    out = []
    for key in cache.keys_lru():
        entry = cache.peek(key)
        if entry is not None:
            out.append(
                {
                    "model": key,
                    "state": str(entry.state),
                    "size_bytes": entry.size_bytes,
                    "pins": entry.pins,
                }
            )
    return out


_TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
    "INT32": torch.int32, "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32,
    "FP64": torch.float64, "BF16": torch.bfloat16, "UINT16": torch.uint16,
    "UINT32": torch.uint32, "UINT64": torch.uint64,
}  # fmt: skip


def to_tensor(array: NDArray[Any], datatype: str, device: torch.device) -> torch.Tensor:
    if datatype == "BYTES":
        raise RuntimeFailure(
            "BYTES tensors cannot be fed to a torch model; tokenize or decode them in a handler",
            status=400,
            reason="InvalidInput",
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if datatype == "BF16":  # carried as raw uint16 bits
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device, non_blocking=True)


def to_array(tensor: torch.Tensor, datatype: str) -> NDArray[Any]:
    tensor = tensor.detach().to("cpu")
    if datatype == "BF16":
        return tensor.contiguous().view(torch.uint16).numpy()
    expected = _TORCH_DTYPES.get(datatype)
    if expected is not None and tensor.dtype != expected:
        tensor = tensor.to(expected)
    return tensor.numpy()


def _forward(
    module: torch.nn.Module,
    inputs: Sequence[NDArray[Any]],
    spec: InferenceFunctionSpec,
    device: DeviceInfo,
) -> dict[str, tuple[NDArray[Any], str]]:
    tensors = [
        to_tensor(array, tensor_spec.datatype, device.torch_device)
        for array, tensor_spec in zip(inputs, spec.inputs, strict=True)
    ]
    try:
        with torch.inference_mode():
            result = module(*tensors)
    except Exception as e:
        if is_out_of_memory(e):
            raise RuntimeFailure(
                f"device {device.id} ran out of memory running the model",
                status=503,
                reason="InsufficientMemory",
            ) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeFailure(
            f"the model rejected the input: {first_line[:500]}", status=400, reason="ModelError"
        ) from None
    return _name_outputs(result, spec)


def _name_outputs(result: Any, spec: InferenceFunctionSpec) -> dict[str, tuple[NDArray[Any], str]]:
    if isinstance(result, torch.Tensor):
        values: list[Any] = [result]
    elif isinstance(result, Mapping):
        values = [result[o.name] for o in spec.outputs]
    else:
        values = list(result)
    if len(values) != len(spec.outputs):
        raise RuntimeFailure(
            f"the model returned {len(values)} outputs but the function declares "
            f"{len(spec.outputs)} ({', '.join(o.name for o in spec.outputs)})",
            status=500,
            reason="OutputMismatch",
        )
    return {
        o.name: (to_array(v, o.datatype), o.datatype)
        for o, v in zip(spec.outputs, values, strict=True)
    }
