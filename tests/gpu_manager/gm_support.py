"""Models, specs and steerable CPU backends shared by the GPU manager's tests."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpufaas.core.api import InferenceFunctionSpec, ModelFormat, parse_spec
from gpufaas.core.examples import example_inputs
from gpufaas.core.modelio import load_model
from gpufaas.gpu_manager.devices import CpuBackend, CpuTransfer, Transfer
from gpufaas.gpu_manager.inventory import DeviceInfo, cpu_devices


class Deep(nn.Module):
    """``x`` [batch, 16] -> [batch, 4]; declared in the opposite order to the one it runs in."""

    def __init__(self, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, 4)
        self.inp = nn.Linear(16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        out: torch.Tensor = self.out(h)
        return out


class Tied(nn.Module):
    """Tied weights (one storage under two names), a buffer, odd sizes (alignment padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 13, bias=False)
        self.mid = nn.Linear(13, 13)
        self.head = nn.Linear(13, 4, bias=False)
        self.tail = nn.Linear(13, 4, bias=False)
        self.tail.weight = self.head.weight
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(self.embed(x)))
        out: torch.Tensor = self.head(h) * self.scale + self.tail(h)
        return out


class WithConstant(nn.Module):
    """torch.export lifts the literal tensor into a graph constant (a get_attr)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) + torch.tensor([1.0, 2.0, 3.0, 4.0])
        return out


class RowSum(nn.Module):
    """``x`` [batch, any] -> [batch, 1]: rows of different widths cannot share a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True) * self.scale


class Lookup(nn.Module):
    """``ids`` INT64 [batch, 4] -> [batch, 3]: an id out of range is the model's error."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.table(ids).sum(dim=1)
        return out


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    path: Path
    format: ModelFormat
    spec: InferenceFunctionSpec

    def inputs(self, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
        if self.name in ("tiny-mlp", "small-cnn"):
            return list(example_inputs(self.name, batch=batch, seed=seed).values())
        rng = np.random.default_rng(seed)
        shape = [batch if d == -1 else d for d in self.spec.inputs[0].shape]
        if self.name == "row-sum":
            shape = [batch, 3]
        if self.name == "lookup":
            return [rng.integers(0, 10, size=(batch, 4), dtype=np.int64)]
        return [rng.standard_normal(shape, dtype=np.float32)]

    def reference(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        module = load_model(self.path, format=self.format)
        with torch.inference_mode():
            result = module(*(torch.from_numpy(a) for a in inputs))
        return np.asarray(result.numpy())

    def with_spec(self, **changes: Any) -> Model:
        raw = self.spec.model_dump(mode="json", by_alias=True)
        raw.update(changes)
        return dataclasses.replace(self, spec=parse_spec(raw))


def make_spec(
    path: Path,
    fmt: ModelFormat,
    *,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    batching: dict[str, Any] | None = None,
) -> InferenceFunctionSpec:
    return parse_spec(
        {
            "model": {"uri": path.resolve().as_uri(), "format": fmt.value},
            "inputs": inputs,
            "outputs": outputs,
            "batching": batching or {"maxBatchSize": 1},
        }
    )


X16 = [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
Y4 = [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]


# --- CPU backends that let a test watch and steer copies and compute ------------------------------


class LoggedTransfer(CpuTransfer):
    """A CPU transfer that logs each layer wait of the compute side."""

    def __init__(self, log: list[tuple[str, int]], *args: Any) -> None:
        self.log = log
        super().__init__(*args)

    def wait_group(self, group: int) -> None:
        self.log.append(("wait", group))
        super().wait_group(group)


class ScriptedBackend(CpuBackend):
    """Copies each layer as its own group, logging ("copied", g); the last group is copied
    only once the compute side waits for it (or after ``hold_s``), so a load that computes
    before its last layer lands shows it in the log."""

    min_group_bytes = 0

    def __init__(self, info: DeviceInfo, *, hold_last: bool = True, hold_s: float = 10.0) -> None:
        super().__init__(info)
        self.log: list[tuple[str, int]] = []
        self.hold_last = hold_last
        self.hold_s = hold_s
        self.fail_group: int | None = None
        self.computing = 0
        self.peak_computing = 0
        self.gate = threading.Event()
        self.gate.set()  # compute runs freely unless a test clears it
        self._lock = threading.Lock()

    def start_transfer(
        self, dst: torch.Tensor, src: torch.Tensor, groups: Any, *, source: Any = None
    ) -> Transfer:
        last = len(groups) - 1

        def copy_group(group: int, start: int, end: int) -> None:
            if group == self.fail_group:
                raise OSError("simulated copy failure")
            if self.hold_last and group == last and group > 0:
                _wait_until(lambda: ("wait", last) in self.log, timeout_s=self.hold_s)
            dst[start:end].copy_(src[start:end])
            self.log.append(("copied", group))

        return LoggedTransfer(self.log, groups, copy_group)

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        with self._lock:
            self.computing += 1
            self.peak_computing = max(self.peak_computing, self.computing)
        try:
            if not self.gate.wait(30):
                raise TimeoutError("the test never released compute")
            yield
        finally:
            with self._lock:
                self.computing -= 1


def _wait_until(condition: Callable[[], bool], *, timeout_s: float) -> bool:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return True
        event.wait(0.005)
    return condition()


def devices(count: int = 2, *, capacity: int = 1 << 30, peers: bool = True) -> list[DeviceInfo]:
    found = cpu_devices(count, device_memory=capacity)
    return found if peers else [dataclasses.replace(d, peers=()) for d in found]
