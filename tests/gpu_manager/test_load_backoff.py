"""A model that fails to load is not retried on every request: failures back
off exponentially, requests fail fast with Retry-After, and new weights get a
fresh try."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gm_support import X16, Y4, Model, make_spec

from gpufaas.core.api import ModelFormat
from gpufaas.gpu_manager.runtime import NodeRuntime, RuntimeFailure

Factory = Callable[..., NodeRuntime]


def _count_fetches(runtime: NodeRuntime) -> list[str]:
    fetched: list[str] = []
    real_fetch = runtime.artifacts.store.fetch

    def fetch(uri: str, **kwargs: Any) -> Path:
        fetched.append(uri)
        return real_fetch(uri, **kwargs)

    runtime.artifacts.store.fetch = fetch  # type: ignore[method-assign]
    return fetched


async def test_corrupt_artifact_fails_fast_until_its_backoff_ends(
    runtime_factory: Factory, models: dict[str, Model], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a TorchScript archive")
    runtime = runtime_factory()
    runtime.register("broken", make_spec(corrupt, ModelFormat.TORCHSCRIPT, inputs=X16, outputs=Y4))
    fetched = _count_fetches(runtime)
    x = [np.zeros((1, 16), np.float32)]

    with pytest.raises(RuntimeFailure) as first:
        await runtime.infer("broken", x, device_id="cpu:0")
    assert first.value.status == 503 and first.value.reason == "ModelLoadFailed"
    assert "broken" in str(first.value) and first.value.retry_after_s is not None

    for _ in range(5):  # a burst of retries: none fetches or loads again
        with pytest.raises(RuntimeFailure) as again:
            await runtime.infer("broken", x, device_id="cpu:0")
        assert again.value.reason == "ModelLoadFailed"
        assert "next try in" in str(again.value)
    assert len(fetched) == 1

    good = models["deep"]
    runtime.register("broken", good.spec)  # fixed weights: tried at once
    outcome = await runtime.infer("broken", good.inputs(), device_id="cpu:0")
    assert outcome.outputs
