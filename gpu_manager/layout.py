"""A model's weights as one arena in forward order, and modules rebuilt on top of an arena.

Every tensor a module holds (parameters, buffers, and a ``torch.export`` graph's constants) lives
in some storage. :func:`plan_layout` places each storage once (tied weights and views share it)
in one contiguous arena, aligned, in the order a forward pass first touches them, and cuts the
arena into *groups*: consecutive layers (tensors with the same owning module) merged until each
group is worth a copy of its own. A device load is then one copy per group, each with its event,
and a layer can compute as soon as its own group has landed.

The module itself becomes a *skeleton*: the same module with every tensor emptied. A replica for
a device is a deep copy of the skeleton (cheap: no weights in it) whose tensors are pointed at
views of the device's arena (:func:`build_replica`). This works alike for TorchScript modules
and ``torch.export`` graph modules, since both keep their weights as attributes.

:func:`probe` runs one forward pass on synthetic inputs under a dispatch mode that records the
order storages are first read and the peak bytes of activations alive at once: the measured
reserve a model needs beside its weights.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "ArrivalGate",
    "Layout",
    "ProbeResult",
    "StorageSlot",
    "TensorSlot",
    "build_replica",
    "byte_view",
    "fill_arena",
    "named_tensors",
    "plan_layout",
    "probe",
    "strip",
]


@dataclass(frozen=True)
class StorageSlot:
    start: int  # byte offset in the arena
    nbytes: int
    owner: str  # the module that owns its first tensor ("" for the root)


@dataclass(frozen=True)
class TensorSlot:
    names: tuple[str, ...]  # attribute paths of this tensor in the module (tied names share one)
    storage: int  # index into Layout.storages
    dtype: str  # torch dtype name, e.g. "float32"
    offset: int  # storage offset, in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a model lives in its arena, and the copy groups in forward order."""

    storages: tuple[StorageSlot, ...]
    tensors: tuple[TensorSlot, ...]
    groups: tuple[tuple[int, int], ...]  # [start, end) byte ranges tiling the arena
    group_owners: tuple[str, ...]  # the first layer of each group
    arena_bytes: int
    weights_bytes: int  # sum of storage sizes: what ``tensor_bytes`` counts
    alignment: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "storages": [[s.start, s.nbytes, s.owner] for s in self.storages],
                "tensors": [
                    [list(t.names), t.storage, t.dtype, t.offset, list(t.size), list(t.stride)]
                    for t in self.tensors
                ],
                "groups": [list(g) for g in self.groups],
                "group_owners": list(self.group_owners),
                "arena_bytes": self.arena_bytes,
                "weights_bytes": self.weights_bytes,
                "alignment": self.alignment,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Parse and check a layout; ``ValueError`` if it is malformed or inconsistent."""
        try:
            raw = json.loads(text)
            layout = cls(
                storages=tuple(StorageSlot(int(a), int(b), str(c)) for a, b, c in raw["storages"]),
                tensors=tuple(
                    TensorSlot(
                        tuple(str(n) for n in names),
                        int(storage),
                        str(dtype),
                        int(offset),
                        tuple(int(x) for x in size),
                        tuple(int(x) for x in stride),
                    )
                    for names, storage, dtype, offset, size, stride in raw["tensors"]
                ),
                groups=tuple((int(a), int(b)) for a, b in raw["groups"]),
                group_owners=tuple(str(o) for o in raw["group_owners"]),
                arena_bytes=int(raw["arena_bytes"]),
                weights_bytes=int(raw["weights_bytes"]),
                alignment=int(raw["alignment"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed layout: {e}") from None
        layout.check()
        return layout

    def check(self) -> None:
        """Raise ``ValueError`` unless every tensor lies inside its storage and the arena."""
        for s in self.storages:
            if s.start < 0 or s.nbytes < 0 or s.start + s.nbytes > self.arena_bytes:
                raise ValueError(f"storage at {s.start} (+{s.nbytes}) is outside the arena")
        for t in self.tensors:
            if not 0 <= t.storage < len(self.storages):
                raise ValueError(f"tensor {t.names} names storage {t.storage}, which is missing")
            dtype = dtype_from_name(t.dtype)
            item = torch.empty(0, dtype=dtype).element_size()
            extent = (
                0
                if any(n == 0 for n in t.size)
                else (
                    t.offset + 1 + sum((n - 1) * st for n, st in zip(t.size, t.stride, strict=True))
                )
            )
            if t.offset < 0 or extent * item > self.storages[t.storage].nbytes:
                raise ValueError(f"tensor {t.names} reaches outside its storage")
        ends = [0, *(end for _, end in self.groups)]
        if self.groups and (
            any(a != ends[i] or b < a for i, (a, b) in enumerate(self.groups))
            or ends[-1] != self.arena_bytes
        ):
            raise ValueError("copy groups do not tile the arena")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# --- tensors of a module ----------------------------------------------------------------------------


def named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the module holds with its attribute path, tied names included.

    The same set ``gpufaas.core.modelio.tensor_bytes`` counts: parameters, buffers, and the
    tensor constants that ``torch.export`` graphs reach with ``get_attr``.
    """
    found: dict[str, torch.Tensor] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        found.setdefault(name, parameter)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        found.setdefault(name, buffer)
    for path, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "get_attr":
                    value = _resolve(sub, str(node.target))
                    if isinstance(value, torch.Tensor):
                        found.setdefault(_join(path, str(node.target)), value)
    return list(found.items())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _resolve(module: Any, path: str) -> Any:
    value = module
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    pointer = storage.data_ptr()
    # Empty storages all sit at address 0; each is its own (zero-byte) storage.
    return (pointer, storage.nbytes()) if pointer else (0, id(storage))


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor`` as a flat ``uint8`` tensor (no copy)."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)


# --- probing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    first_use: tuple[tuple[int, int], ...]  # storage keys in the order a forward first reads them
    input_bytes: int
    peak_activation_bytes: int  # most bytes of intermediate tensors alive at once
    error: str | None = None
    # (input position, exclusive upper bound): inputs used as indices into a weight (token ids
    # into an embedding table), which must lie in [0, bound) or a CUDA kernel asserts
    index_bounds: tuple[tuple[int, int], ...] = ()

    @property
    def reserve_bytes(self) -> int:
        return self.input_bytes + self.peak_activation_bytes


# Operators that index a tensor with another: name -> (indexed arg, index arg, dim arg or value).
_INDEXING: dict[str, tuple[int, int, int | None]] = {
    "embedding": (0, 1, 0),  # (weight, indices): rows of the table
    "index_select": (0, 2, None),  # (self, dim, index)
    "gather": (0, 2, None),  # (self, dim, index)
}
# Operators whose output holds the same values as their first argument (views, copies, casts):
# an index computed this way from an input is still that input's values.
_SAME_VALUES = frozenset(
    {
        "view", "_unsafe_view", "reshape", "_to_copy", "to", "clone", "contiguous", "unsqueeze",
        "squeeze", "expand", "slice", "select", "t", "transpose", "permute", "flatten", "alias",
        "detach", "lift_fresh", "lift_fresh_copy", "_reshape_alias",
    }
)  # fmt: skip


class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the first read of each weight storage, live bytes of everything else, and which
    inputs index into a weight (with the weight's size along that dimension)."""

    def __init__(self, weights: set[tuple[int, int]], inputs: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.weights = weights
        self.first_use: dict[tuple[int, int], None] = {}
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        # storage key -> the input position whose values it holds
        self._lineage: dict[tuple[int, int], int] = {
            _storage_key(t): i for i, t in enumerate(inputs) if not t.is_floating_point()
        }
        self.index_bounds: dict[int, int] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                key = _storage_key(leaf)
                if key in self.weights:
                    self.first_use.setdefault(key, None)
        name = func.overloadpacket.__name__.rstrip("_")
        if self._lineage:
            self._note_index(name, args)
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        if self._lineage and name in _SAME_VALUES:
            self._inherit(args, result)
        return result

    def _source(self, value: Any) -> int | None:
        if not isinstance(value, torch.Tensor) or value.is_floating_point():
            return None
        return self._lineage.get(_storage_key(value))

    def _note_index(self, name: str, args: tuple[Any, ...]) -> None:
        spec = _INDEXING.get(name)
        if spec is not None and len(args) > max(spec[0], spec[1]):
            table, index = args[spec[0]], args[spec[1]]
            dim = spec[2] if spec[2] is not None else args[1]
            self._bound(table, index, dim)
        elif name == "index" and len(args) >= 2 and isinstance(args[1], list | tuple):
            for dim, index in enumerate(args[1]):  # index.Tensor(self, [i0, i1, ...])
                if index is not None:
                    self._bound(args[0], index, dim)

    def _bound(self, table: Any, index: Any, dim: Any) -> None:
        source = self._source(index)
        if source is None or not isinstance(table, torch.Tensor) or not isinstance(dim, int):
            return
        if _storage_key(table) not in self.weights:
            return  # an activation's size may depend on the input: no fixed bound
        size = int(table.shape[dim])
        self.index_bounds[source] = min(size, self.index_bounds.get(source, size))

    def _inherit(self, args: tuple[Any, ...], result: Any) -> None:
        source = self._source(args[0]) if args else None
        if source is None or not isinstance(result, torch.Tensor):
            return
        key = _storage_key(result)
        if key not in self._lineage:
            self._lineage[key] = source
            weakref.finalize(result, self._lineage.pop, key, None)

    def _track(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        pointer = key[0]
        if not pointer or key in self.weights:
            return
        if pointer not in self._refs:
            self._refs[pointer] = 0
            self._sizes[pointer] = key[1]
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self._refs[pointer] += 1
        # A tensor's Python object lives as long as the tensor (PyObject preservation), so this
        # fires when the tensor is freed; a storage is freed with the last tensor viewing it.
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        self._refs[pointer] -= 1
        if self._refs[pointer] == 0:
            del self._refs[pointer]
            self.live -= self._sizes.pop(pointer)


def probe(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> ProbeResult:
    """Run ``module`` once on ``inputs`` and measure what :class:`ProbeResult` says.

    A model that rejects the synthetic inputs gives a result with ``error`` set, no order and
    no activation figure; the caller falls back to declaration order and an estimate.
    """
    weights = {_storage_key(t) for _, t in named_tensors(module)}
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    recorder = _Recorder(weights, inputs)
    try:
        with torch.inference_mode(), recorder:
            result = module(*inputs)
        del result
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return ProbeResult((), input_bytes, 0, error=first_line[:300])
    return ProbeResult(
        tuple(recorder.first_use),
        input_bytes,
        recorder.peak,
        index_bounds=tuple(sorted(recorder.index_bounds.items())),
    )


# --- layout -----------------------------------------------------------------------------------------


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def plan_layout(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    first_use: Sequence[tuple[int, int]] = (),
    alignment: int = 64,
    min_group_bytes: int = 0,
) -> tuple[Layout, list[torch.Tensor]]:
    """Place each storage of ``named`` once in an arena, in forward order.

    Storages in ``first_use`` come first, in that order; the rest follow in declaration order.
    Returns the layout and, in arena order, each storage's bytes (``uint8`` views, no copy).
    """
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    storage_index: dict[tuple[int, int], int] = {}
    sources: list[torch.Tensor] = []
    owners: list[str] = []
    by_tensor: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in named:
        key = _storage_key(tensor)
        if key not in storage_index:
            storage_index[key] = len(sources)
            sources.append(tensor)
            owners.append(name.rpartition(".")[0])
        by_tensor.setdefault(id(tensor), ([], tensor))[0].append(name)

    rank = {key: i for i, key in enumerate(first_use)}
    declared = list(storage_index)
    order = sorted(range(len(declared)), key=lambda i: (rank.get(declared[i], math.inf), i))
    position = {old: new for new, old in enumerate(order)}

    storages: list[StorageSlot] = []
    views: list[torch.Tensor] = []
    cursor = 0
    for old in order:
        view = byte_view(sources[old])
        start = _align(cursor, alignment)
        storages.append(StorageSlot(start, view.numel(), owners[old]))
        views.append(view)
        cursor = start + view.numel()
    arena_bytes = cursor

    tensors = []
    for names, tensor in by_tensor.values():
        tensors.append(
            TensorSlot(
                names=tuple(names),
                storage=position[storage_index[_storage_key(tensor)]],
                dtype=str(tensor.dtype).removeprefix("torch."),
                offset=int(tensor.storage_offset()),
                size=tuple(tensor.shape),
                stride=tuple(tensor.stride()),
            )
        )
    groups, group_owners = _groups(storages, arena_bytes, min_group_bytes)
    layout = Layout(
        storages=tuple(storages),
        tensors=tuple(tensors),
        groups=groups,
        group_owners=group_owners,
        arena_bytes=arena_bytes,
        weights_bytes=sum(s.nbytes for s in storages),
        alignment=alignment,
    )
    layout.check()
    return layout, views


def _groups(
    storages: Sequence[StorageSlot], arena_bytes: int, min_group_bytes: int
) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...]]:
    """Cut the arena at layer boundaries; merge a layer into the next while the group is small."""
    starts: list[int] = []
    owners: list[str] = []
    group_start: int | None = None
    previous_owner: str | None = None
    for slot in storages:
        new_layer = slot.owner != previous_owner
        previous_owner = slot.owner
        if group_start is None:
            group_start = 0
            starts.append(0)
            owners.append(slot.owner)
        elif new_layer and slot.start - group_start >= min_group_bytes:
            group_start = slot.start
            starts.append(slot.start)
            owners.append(slot.owner)
    ends = [*starts[1:], arena_bytes]
    return tuple(zip(starts, ends, strict=True)), tuple(owners)


def fill_arena(arena: torch.Tensor, layout: Layout, views: Sequence[torch.Tensor]) -> None:
    """Copy each storage's bytes to its place in ``arena`` (a ``uint8`` tensor)."""
    for slot, view in zip(layout.storages, views, strict=True):
        arena[slot.start : slot.start + slot.nbytes].copy_(view)


def strip(module: torch.nn.Module) -> None:
    """Empty every tensor of ``module`` in place, leaving a skeleton to copy replicas from."""
    for _, tensor in named_tensors(module):
        tensor.data = torch.empty(0, dtype=tensor.dtype)


def build_replica(
    skeleton: torch.nn.Module, layout: Layout, arena: torch.Tensor
) -> torch.nn.Module:
    """A copy of ``skeleton`` whose tensors are views of ``arena`` (on the arena's device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside fx deepcopy
        replica = copy.deepcopy(skeleton)
    storage = arena.untyped_storage()
    for slot in layout.tensors:
        dtype = dtype_from_name(slot.dtype)
        item = torch.empty(0, dtype=dtype).element_size()
        start = layout.storages[slot.storage].start
        view = torch.empty(0, dtype=dtype, device=arena.device).set_(
            storage, start // item + slot.offset, slot.size, slot.stride
        )
        for name in slot.names:
            tensor = _resolve(replica, name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"the model has no tensor at {name!r}")
            tensor.data = view
    retarget_graphs(replica, arena.device)
    replica.eval()
    return replica


def retarget_graphs(module: torch.nn.Module, device: torch.device) -> int:
    """Point every device argument an exported graph baked in (``arange(..., device=cpu)``,
    ``to(x, cuda:1)``, positional or keyword, nested in lists too) at ``device``, as
    ``torch.export.passes.move_to_device_pass`` does for programs. Returns the count rewritten."""
    rewritten = 0

    def retarget(value: Any) -> Any:
        nonlocal rewritten
        if isinstance(value, torch.device) and value != device:
            rewritten += 1
            return device
        if isinstance(value, list | tuple):
            return type(value)(retarget(v) for v in value)
        return value

    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        before = rewritten
        for node in sub.graph.nodes:
            if node.op != "call_function":
                continue
            node.args = tuple(retarget(a) for a in node.args)
            node.kwargs = {k: retarget(v) for k, v in node.kwargs.items()}
        if rewritten != before:
            sub.recompile()
    return rewritten


def script_device_constants(module: torch.nn.Module) -> list[str]:
    """The device constants a TorchScript module's code baked in (tracing records
    ``device="cpu"`` for every ``zeros``/``arange``/``to`` it saw): one line per constant."""
    if not isinstance(module, torch.jit.ScriptModule):
        return []
    found: list[str] = []
    for path, sub in module.named_modules():
        if not isinstance(sub, torch.jit.ScriptModule):
            continue
        for method in sub._c._method_names():
            graph = sub._c._get_method(method).graph
            for node in graph.findAllNodes("prim::Constant", True):
                output = node.output()
                if output.type().kind() != "DeviceObjType":
                    continue
                value = output.toIValue()
                where = f"{path or type(module).__name__}.{method}"
                found.append(f"{where}: device={str(value)!r}")
    return found


# --- waiting for layers -----------------------------------------------------------------------------


class ArrivalGate(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Makes each operator wait for the copy group holding the weights it reads.

    Active only while a model's arena is still arriving: an operator reading a tensor that
    lies in the arena looks up its group and calls ``wait_group`` once per group (a stream
    wait on CUDA, a blocking wait on the CPU); nothing else is delayed. Every operator passes
    through here, so the check is kept to an address comparison per tensor argument.
    """

    def __init__(
        self,
        arena: torch.Tensor,
        groups: Sequence[tuple[int, int]],
        wait_group: Callable[[int], None],
        *,
        on_wait: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.base = arena.data_ptr()
        self.size = arena.numel() * arena.element_size()
        self.starts = [start for start, _ in groups]
        self.pending = set(range(len(groups)))
        self.wait_group = wait_group
        self.on_wait = on_wait

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.pending:
            self._wait_for(args)
            if kwargs:
                self._wait_for(tuple(kwargs.values()))
        return func(*args, **(kwargs or {}))

    def _wait_for(self, values: tuple[Any, ...] | list[Any]) -> None:
        for value in values:
            if isinstance(value, torch.Tensor):
                offset = value.data_ptr() - self.base
                if 0 <= offset < self.size:
                    group = bisect.bisect_right(self.starts, offset) - 1
                    if group in self.pending:
                        if self.on_wait is not None:
                            self.on_wait(group)
                        self.wait_group(group)
                        self.pending.discard(group)
            elif isinstance(value, list | tuple):  # e.g. the tensor lists of cat, stack
                self._wait_for(value)
