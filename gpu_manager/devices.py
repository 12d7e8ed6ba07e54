"""The device layer: the one place that knows about CUDA and NVML.

Discovery reads NVML: every GPU with its UUID, name, total and free memory, PCIe link, which pairs
have NVLink or peer-to-peer access, and MIG instances, each of which becomes a device of its own.
GPUs are matched to torch's CUDA ordinals by UUID (NVML counts in PCI order, CUDA may not).
Without NVML or CUDA, the node gets ``cpu_devices`` CPU stand-ins with a configured memory budget,
so the rest of the GPU manager runs unchanged on a laptop or in CI.

A :class:`DeviceBackend` per device does everything device-specific the loader and the runtime
need: allocate an arena, copy an arena in forward-order groups with one event per group
(:class:`Transfer`), and give each request its own compute context. :class:`CudaBackend` copies on a
dedicated copy stream with non-blocking copies from page-locked memory and records a CUDA event per
group; compute runs on per-request streams that wait on a group's event before using it (as in
PipeSwitch). :class:`CpuBackend` runs the same protocol with a copy thread, plain copies and
``threading.Event`` s, so every code path above this layer is exercised on the CPU.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from gpufaas.gpu_manager.memory import BufferPool, anonymous_buffer

logger = logging.getLogger(__name__)

DeviceKind = Literal["cuda", "cpu"]

# Usable bandwidth per lane and direction after line coding, GB/s, by PCIe generation.
PCIE_LANE_GBPS: Mapping[int, float] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}

TRANSFER_TIMEOUT_S = (
    600.0  # a copy that takes longer is reported as failed, never waited on forever
)


class DeviceOutOfMemory(Exception):
    """A device (or host) allocation failed: the caller answers with a clear error and keeps serving."""


class TransferFailed(Exception):
    """Copying a model's weights to a device failed; the message says why."""


@dataclass(frozen=True)
class DeviceInfo:
    """One schedulable device: a GPU, a MIG instance, or a CPU stand-in."""

    id: str  # stable within the node: "cuda:0", "cpu:1"
    kind: DeviceKind
    index: int  # torch's ordinal for CUDA; a counter for CPU stand-ins
    name: str
    uuid: str
    total_bytes: int
    capacity_bytes: int  # what the model cache may use on it
    free_bytes: int | None = None  # free at discovery (NVML); None for CPU stand-ins
    pcie: dict[str, int] = field(
        default_factory=dict
    )  # generation, width, max_generation, max_width
    pcie_gbps: float | None = None  # per-direction limit of the widest, fastest link it supports
    peers: tuple[str, ...] = ()  # devices whose memory this one can copy from directly
    nvlink_peers: tuple[str, ...] = ()  # the subset of peers joined by NVLink
    mig: bool = False  # a MIG instance (its parent GPU is not a device itself)
    parent_uuid: str | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index) if self.kind == "cuda" else torch.device("cpu")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- discovery ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvmlDevice:
    """What NVML reports about one GPU or MIG instance."""

    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    pcie: dict[str, int]
    gpu_index: int  # NVML's index of the physical GPU
    mig_index: int | None = None  # slot of a MIG instance on its GPU
    parent_uuid: str | None = None
    mig_mode: bool = False  # a physical GPU split into MIG instances
    nvlink_to: tuple[str, ...] = ()  # physical GPUs (UUIDs) reachable over NVLink
    p2p_to: tuple[str, ...] = ()  # physical GPUs (UUIDs) readable peer to peer


def read_nvml_inventory(nvml: Any) -> list[NvmlDevice]:
    """Every GPU and MIG instance NVML sees. ``nvml`` is the ``pynvml`` module, initialised.

    Optional facts (PCIe, MIG mode, P2P) that a driver does not support are left out; a failure
    of the basic queries raises ``nvml.NVMLError``.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    devices: list[NvmlDevice] = []
    for i, handle in enumerate(handles):
        pcie = _pcie(nvml, handle)
        mig_mode = _mig_enabled(nvml, handle)
        nvlink, p2p = [], []
        for j, other in enumerate(handles):
            if j == i or mig_mode:
                continue
            if _p2p_ok(nvml, handle, other, "NVML_P2P_CAPS_INDEX_NVLINK"):
                nvlink.append(uuids[j])
            if _p2p_ok(nvml, handle, other, "NVML_P2P_CAPS_INDEX_READ"):
                p2p.append(uuids[j])
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        devices.append(
            NvmlDevice(
                uuid=uuids[i],
                name=_text(nvml.nvmlDeviceGetName(handle)),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
                pcie=pcie,
                gpu_index=i,
                mig_mode=mig_mode,
                nvlink_to=tuple(nvlink),
                p2p_to=tuple(p2p),
            )
        )
        if mig_mode:
            devices.extend(_mig_instances(nvml, handle, gpu_index=i, parent=uuids[i], pcie=pcie))
    return devices


def _mig_instances(
    nvml: Any, handle: Any, *, gpu_index: int, parent: str, pcie: dict[str, int]
) -> Iterator[NvmlDevice]:
    try:
        slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except nvml.NVMLError:
        return
    for slot in range(slots):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # an empty slot
            continue
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        yield NvmlDevice(
            uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
            name=_text(nvml.nvmlDeviceGetName(mig)),
            total_bytes=int(memory.total),
            free_bytes=int(memory.free),
            pcie=pcie,  # instances share their GPU's link
            gpu_index=gpu_index,
            mig_index=slot,
            parent_uuid=parent,
        )


def _pcie(nvml: Any, handle: Any) -> dict[str, int]:
    queries = {
        "generation": "nvmlDeviceGetCurrPcieLinkGeneration",
        "width": "nvmlDeviceGetCurrPcieLinkWidth",
        "max_generation": "nvmlDeviceGetMaxPcieLinkGeneration",
        "max_width": "nvmlDeviceGetMaxPcieLinkWidth",
    }
    pcie = {}
    for key, function in queries.items():
        with contextlib.suppress(nvml.NVMLError, AttributeError):
            pcie[key] = int(getattr(nvml, function)(handle))
    return pcie


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (nvml.NVMLError, AttributeError):  # not a MIG-capable GPU
        return False
    return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)


def _p2p_ok(nvml: Any, a: Any, b: Any, capability: str) -> bool:
    try:
        status = nvml.nvmlDeviceGetP2PStatus(a, b, getattr(nvml, capability))
    except (nvml.NVMLError, AttributeError):
        return False
    return bool(status == nvml.NVML_P2P_STATUS_OK)


def pcie_gbps(pcie: Mapping[str, int]) -> float | None:
    """The per-direction limit of a PCIe link: the best it negotiates, not its idle state."""
    generation = pcie.get("max_generation", pcie.get("generation"))
    width = pcie.get("max_width", pcie.get("width"))
    if generation is None or width is None or generation not in PCIE_LANE_GBPS:
        return None
    return round(PCIE_LANE_GBPS[generation] * width, 3)


def normal_uuid(uuid: str) -> str:
    """A UUID as torch prints it: NVML's ``GPU-``/``MIG-`` prefix dropped, lower case."""
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix) :]
    return uuid


def devices_from_inventory(
    inventory: Sequence[NvmlDevice],
    *,
    torch_index_by_uuid: Mapping[str, int],
    peer_access: Callable[[int, int], bool],
    memory_fraction: float,
) -> list[DeviceInfo]:
    """The devices this process can run on: GPUs not split by MIG, and MIG instances.

    A device is matched to torch's ordinal by UUID; one torch cannot see (outside
    ``CUDA_VISIBLE_DEVICES``) is left out. ``peers`` are the devices ``peer_access`` (torch's
    ``can_device_access_peer``) allows; ``nvlink_peers`` those of them NVML reports NVLink to.
    """
    usable = [d for d in inventory if not d.mig_mode]
    matched: list[tuple[NvmlDevice, int]] = []
    for device in usable:
        index = torch_index_by_uuid.get(normal_uuid(device.uuid))
        if index is None:
            logger.info("GPU %s (%s) is not visible to this process", device.uuid, device.name)
        else:
            matched.append((device, index))
    result = []
    for device, index in matched:
        peers, nvlink = [], []
        for other, other_index in matched:
            if other is device or device.mig_index is not None or other.mig_index is not None:
                continue  # MIG instances have no peer-to-peer access
            if peer_access(index, other_index):
                peers.append(f"cuda:{other_index}")
                if other.uuid in device.nvlink_to:
                    nvlink.append(f"cuda:{other_index}")
        result.append(
            DeviceInfo(
                id=f"cuda:{index}",
                kind="cuda",
                index=index,
                name=device.name,
                uuid=device.uuid,
                total_bytes=device.total_bytes,
                capacity_bytes=int(device.total_bytes * memory_fraction),
                free_bytes=device.free_bytes,
                pcie=dict(device.pcie),
                pcie_gbps=pcie_gbps(device.pcie),
                peers=tuple(peers),
                nvlink_peers=tuple(nvlink),
                mig=device.mig_index is not None,
                parent_uuid=device.parent_uuid,
            )
        )
    return sorted(result, key=lambda d: d.index)


def cpu_devices(count: int, *, device_memory: int) -> list[DeviceInfo]:
    """CPU stand-ins; they share host memory, so each can copy from every other."""
    if count < 1:
        raise ValueError(f"--cpu-devices must be at least 1, got {count}")
    if device_memory < 1:
        raise ValueError(f"--device-memory must be positive, got {device_memory}")
    ids = [f"cpu:{i}" for i in range(count)]
    return [
        DeviceInfo(
            id=ids[i],
            kind="cpu",
            index=i,
            name="cpu",
            uuid=f"cpu-{i}",
            total_bytes=device_memory,
            capacity_bytes=device_memory,
            peers=tuple(p for p in ids if p != ids[i]),
        )
        for i in range(count)
    ]


def discover_devices(
    *,
    cpu_devices: int = 1,
    device_memory: int = 4 * 2**30,
    memory_fraction: float = 0.9,
    force_cpu: bool = False,
) -> list[DeviceInfo]:
    """The node's GPUs via NVML, or ``cpu_devices`` CPU stand-ins of ``device_memory`` bytes."""
    if not force_cpu:
        gpus = _discover_nvml(memory_fraction=memory_fraction)
        if gpus:
            return gpus
    return _cpu_devices(cpu_devices, device_memory=device_memory)


_cpu_devices = cpu_devices  # the parameter of discover_devices shadows the function's name


def _discover_nvml(*, memory_fraction: float) -> list[DeviceInfo]:
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        logger.info("NVML unavailable (%s); using CPU devices", e)
        return []
    try:
        inventory = read_nvml_inventory(pynvml)
    except pynvml.NVMLError as e:
        logger.warning("NVML failed while listing devices (%s); using CPU devices", e)
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not torch.cuda.is_available():
        logger.warning(
            "NVML sees %d GPU(s) but torch has no CUDA; using CPU devices", len(inventory)
        )
        return []
    by_uuid = _torch_cuda_uuids()
    devices = devices_from_inventory(
        inventory,
        torch_index_by_uuid=by_uuid,
        peer_access=torch.cuda.can_device_access_peer,
        memory_fraction=memory_fraction,
    )
    for device in devices:
        logger.info(
            "%s: %s, %d MiB, PCIe %s, peers %s",
            device.id,
            device.name,
            device.total_bytes >> 20,
            device.pcie,
            ", ".join(device.peers) or "none",
        )
    return devices


def _torch_cuda_uuids() -> dict[str, int]:
    by_uuid = {}
    for index in range(torch.cuda.device_count()):
        with contextlib.suppress(Exception):
            by_uuid[normal_uuid(str(torch.cuda.get_device_properties(index).uuid))] = index
    return by_uuid


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- memory ---------------------------------------------------------------------------------------


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


def _unregister_host(pointer: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(pointer)  # type: ignore[no-untyped-call]


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure on a device or the host (never a crash to propagate)."""
    if isinstance(error, DeviceOutOfMemory | MemoryError | torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


# --- copies and compute ---------------------------------------------------------------------------


class Transfer(abc.ABC):
    """One model's arena being copied onto a device, group by group in forward order.

    A compute context calls :meth:`wait_group` before it touches a group's weights: on CUDA
    that makes its stream wait on the group's event (the host does not block); on the CPU it
    blocks until the copy thread has copied the group.
    """

    def __init__(self, groups: Sequence[tuple[int, int]]) -> None:
        self.groups = tuple(groups)
        self.started_at = time.perf_counter()
        self.finished_at: float | None = None

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.groups)

    @abc.abstractmethod
    def wait_group(self, group: int) -> None: ...

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether every group has landed (or the copy failed)."""

    @abc.abstractmethod
    def wait_all(self) -> None:
        """Block until every group has landed; raise :class:`TransferFailed` if the copy failed."""

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at


class DeviceBackend(abc.ABC):
    """Everything device-specific that loading and running a model needs."""

    alignment = 64  # byte alignment of each storage inside an arena
    min_group_bytes = 0  # copies smaller than this are merged with the next layer's

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info

    @property
    def device(self) -> torch.device:
        return self.info.torch_device

    @abc.abstractmethod
    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        """An arena of ``nbytes`` on the device, and whether it was re-used memory.

        Raises :class:`DeviceOutOfMemory` when the device cannot hold it.
        """

    @abc.abstractmethod
    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """An arena nobody uses any more (the caller drops its references too)."""

    @abc.abstractmethod
    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        """Start copying ``src[a:b]`` to ``dst[a:b]`` for each group, in order.

        ``src`` is a host arena, or another device's arena when ``source`` is that device.
        """

    @abc.abstractmethod
    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The context one request computes in (its own stream on CUDA)."""

    def memory_allocated(self) -> int | None:
        """Bytes the device allocator holds for tensors now; None where it is not tracked."""
        return None

    def pooled_bytes(self) -> int:
        """Freed arenas kept for re-use (counted against the device's capacity)."""
        return 0

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all work on the device."""


class CpuTransfer(Transfer):
    def __init__(
        self,
        groups: Sequence[tuple[int, int]],
        copy_group: Callable[[int, int, int], None],
    ) -> None:
        super().__init__(groups)
        self._copy_group = copy_group
        self._landed = [threading.Event() for _ in self.groups]
        self._finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpufaas-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for group, (start, end) in enumerate(self.groups):
                self._copy_group(group, start, end)
                self._landed[group].set()
        except BaseException as e:  # reported to every waiter
            self.error = e
        finally:
            self.finished_at = time.perf_counter()
            for event in self._landed:
                event.set()
            self._finished.set()

    def wait_group(self, group: int) -> None:
        if not self._landed[group].wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(
                f"layer group {group} did not arrive in {TRANSFER_TIMEOUT_S:.0f} s"
            )
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")

    def done(self) -> bool:
        return self._finished.is_set()

    def wait_all(self) -> None:
        if not self._finished.wait(TRANSFER_TIMEOUT_S):
            raise TransferFailed(f"the weights did not arrive in {TRANSFER_TIMEOUT_S:.0f} s")
        if self.error is not None:
            raise TransferFailed(f"copying the weights failed: {self.error}")


class CpuBackend(DeviceBackend):
    """A CPU stand-in: its "device memory" is host memory, a copy is a memcpy on a copy thread.

    Freed arenas are pooled for re-use within the device's capacity, as the CUDA caching
    allocator keeps device memory.
    """

    min_group_bytes = 64 << 10  # below this, waking the compute thread costs more than it saves

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.pool = BufferPool(budget_bytes=info.capacity_bytes)

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.pool.take(nbytes, in_use_bytes=in_use_bytes)
        except MemoryError as e:
            raise DeviceOutOfMemory(f"{self.info.id}: {e}") from None

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        self.pool.give(arena, in_use_bytes=in_use_bytes)

    def pooled_bytes(self) -> int:
        return self.pool.pooled_bytes

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        return CpuTransfer(groups, lambda group, a, b: self._copy_group(dst, src, group, a, b))

    def _copy_group(
        self, dst: torch.Tensor, src: torch.Tensor, group: int, start: int, end: int
    ) -> None:
        dst[start:end].copy_(src[start:end])

    def compute(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Copies and compute are synchronous on the CPU: nothing to wait for."""


class CudaTransfer(Transfer):
    def __init__(
        self, groups: Sequence[tuple[int, int]], events: Sequence[Any], device: torch.device
    ) -> None:
        super().__init__(groups)
        self._events = list(events)
        self._device = device

    def wait_group(self, group: int) -> None:
        # Every event was recorded before this transfer was handed out, so the wait is never
        # on an unrecorded event (which CUDA would treat as already complete).
        torch.cuda.current_stream(self._device).wait_event(self._events[group])

    def done(self) -> bool:
        finished = not self._events or bool(self._events[-1].query())
        if finished and self.finished_at is None:
            self.finished_at = time.perf_counter()
        return finished

    def wait_all(self) -> None:
        try:
            if self._events:
                self._events[-1].synchronize()  # one stream: the last event implies the rest
        except RuntimeError as e:
            raise TransferFailed(f"copying the weights failed: {e}") from None
        finally:
            if self.finished_at is None:
                self.finished_at = time.perf_counter()


class CudaBackend(DeviceBackend):
    """A GPU: arenas from torch's caching allocator, copies on a dedicated stream.

    Host-to-device copies come from page-locked host arenas, issued ``non_blocking`` on the copy
    stream, one event recorded after each group. A device-to-device copy is issued on the
    *source* GPU's outbound stream (torch runs a cross-device copy on the source device's current
    stream and makes the destination's current stream wait for it), with this device's copy
    stream current, so the per-group events recorded on the copy stream follow the copies.
    Each request computes on a stream of its own from a small pool, so requests for different
    models overlap on the GPU.
    """

    alignment = 256  # what CUDA kernels' vectorised loads expect of a tensor's address
    min_group_bytes = 1 << 20  # smaller copies do not reach the link's bandwidth

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self.copy_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.outbound_stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._idle_streams: list[Any] = []
        self._lock = threading.Lock()

    def allocate(self, nbytes: int, *, in_use_bytes: int) -> tuple[torch.Tensor, bool]:
        for attempt in range(2):
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
                    return torch.empty(nbytes, dtype=torch.uint8, device=self.device), False
            except torch.OutOfMemoryError as e:
                if attempt:
                    raise DeviceOutOfMemory(f"{self.info.id}: {str(e).splitlines()[0]}") from None
                # Blocks cached for the compute streams (freed activations) count as used
                # until they are handed back to the driver.
                torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def start_transfer(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        *,
        source: DeviceBackend | None = None,
    ) -> Transfer:
        events = []
        peer = source.outbound_stream if isinstance(source, CudaBackend) else None
        with torch.cuda.device(self.device):
            # The arena may re-use memory that work on the default stream last touched.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with (
                torch.cuda.stream(self.copy_stream),
                torch.cuda.stream(peer) if peer is not None else contextlib.nullcontext(),
            ):
                for start, end in groups:
                    dst[start:end].copy_(src[start:end], non_blocking=True)
                    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    event.record(self.copy_stream)
                    events.append(event)
        return CudaTransfer(groups, events, self.device)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        with self._lock:
            stream = (
                self._idle_streams.pop()
                if self._idle_streams
                else torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            )
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                yield
        finally:
            # Idle before its request ends: the weights it read may be released right after.
            stream.synchronize()
            with self._lock:
                self._idle_streams.append(stream)

    def release(self, arena: torch.Tensor, *, in_use_bytes: int) -> None:
        """The caching allocator takes the memory back once the last reference is dropped."""

    def memory_allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def make_backend(info: DeviceInfo) -> DeviceBackend:
    return CudaBackend(info) if info.kind == "cuda" else CpuBackend(info)


def device_free_bytes(info: DeviceInfo) -> int | None:
    """Free memory on a GPU now (all processes counted); None for CPU stand-ins."""
    if info.kind != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(info.index)
    except RuntimeError:
        return None
    return int(free)
