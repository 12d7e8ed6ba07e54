"""Fixtures for the GPU manager's tests: real torch models, CPU devices, runtimes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from gm_support import (
    X16,
    Y4,
    Deep,
    Lookup,
    Model,
    RowSum,
    ScriptedBackend,
    Tied,
    WithConstant,
    devices,
    make_spec,
)

from gpufaas.core.api import ModelFormat
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.examples import build_examples
from gpufaas.core.modelio import save_model
from gpufaas.gpu_manager import loader
from gpufaas.gpu_manager.inventory import DeviceInfo
from gpufaas.gpu_manager.runtime import NodeRuntime


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    out = tmp_path_factory.mktemp("gm-models")
    built = build_examples(out, names=("tiny-mlp", "small-cnn"), progress=False)
    ts, ex = ModelFormat.TORCHSCRIPT, ModelFormat.TORCH_EXPORT
    example = (torch.zeros(2, 16),)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        save_model(Deep().eval(), out / "deep.pt", format=ts, example_inputs=example)
        save_model(Tied().eval(), out / "tied.pt", format=ts, example_inputs=example)
        save_model(
            WithConstant().eval(),
            out / "constant.pt2",
            format=ex,
            example_inputs=example,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        )
        save_model(torch.jit.script(RowSum()), out / "row-sum.pt", format=ts, example_inputs=())
        save_model(torch.jit.script(Lookup()), out / "lookup.pt", format=ts, example_inputs=())
    return {
        "tiny-mlp": Model(
            "tiny-mlp",
            built["tiny-mlp"],
            ts,
            make_spec(built["tiny-mlp"], ts, inputs=X16, outputs=Y4),
        ),
        "small-cnn": Model(
            "small-cnn",
            built["small-cnn"],
            ex,
            make_spec(
                built["small-cnn"],
                ex,
                inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
                outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
            ),
        ),
        "deep": Model(
            "deep", out / "deep.pt", ts, make_spec(out / "deep.pt", ts, inputs=X16, outputs=Y4)
        ),
        "tied": Model(
            "tied", out / "tied.pt", ts, make_spec(out / "tied.pt", ts, inputs=X16, outputs=Y4)
        ),
        "constant": Model(
            "constant",
            out / "constant.pt2",
            ex,
            make_spec(out / "constant.pt2", ex, inputs=X16, outputs=Y4),
        ),
        "row-sum": Model(
            "row-sum",
            out / "row-sum.pt",
            ts,
            make_spec(
                out / "row-sum.pt",
                ts,
                inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
                batching={"maxBatchSize": 16, "maxDelayMs": 300},
            ),
        ),
        "lookup": Model(
            "lookup",
            out / "lookup.pt",
            ts,
            make_spec(
                out / "lookup.pt",
                ts,
                inputs=[{"name": "ids", "datatype": "INT64", "shape": [-1, 4]}],
                outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
                batching={"maxBatchSize": 8, "maxDelayMs": 300},
            ),
        ),
    }


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Callable[..., NodeRuntime]:
    def make(
        *,
        device_list: list[DeviceInfo] | None = None,
        host_capacity: int = 1 << 30,
        scripted: bool | dict[str, Any] = False,
        register: Sequence[Model] = (),
        **options: Any,
    ) -> NodeRuntime:
        infos = device_list if device_list is not None else devices()
        backends = None
        if scripted is not False:
            kwargs = scripted if isinstance(scripted, dict) else {}
            backends = {d.id: ScriptedBackend(d, **kwargs) for d in infos}
        # Registration prepares sidecars in the background; tests of the request path start
        # without that race unless they ask for it (test_chain.py covers it).
        options.setdefault("prepare_on_register", False)
        runtime = NodeRuntime(
            devices=infos,
            store=ArtifactStore(tmp_path / "artifacts"),
            host_capacity_bytes=host_capacity,
            backends=backends,
            **options,
        )
        for model in register:
            runtime.register(model.name, model.spec)
        return runtime

    return make


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names the forward passes that went through a worker thread."""
    calls: list[str] = []
    real = loader.asyncio.to_thread

    async def counted(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(function, "__name__", "?"))
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(loader.asyncio, "to_thread", counted)
    return calls
