"""The tiny-mlp function spec the node-side prediction tests register (one request at a time)."""

from __future__ import annotations

from pathlib import Path


def tiny_mlp_spec(path: Path) -> dict[str, object]:
    return {
        "model": {"uri": path.resolve().as_uri(), "format": "torchscript"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "batching": {"maxBatchSize": 1},
    }
