"""torch.export.load is not thread-safe by itself; load_model must be."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import load_model


def test_concurrent_torch_export_loads_all_succeed(example_models: dict[str, Path]) -> None:
    path = example_models["small-cnn"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        modules = list(
            pool.map(lambda _: load_model(path, format=ModelFormat.TORCH_EXPORT), range(16))
        )
    assert len(modules) == 16 and all(m is not None for m in modules)
