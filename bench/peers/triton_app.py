"""PyTriton peer: the benchmark's models on Triton Inference Server.

PyTriton runs Triton with explicit model control and registers one Triton model per
benchmark model. Each model's Python callable gets its torch module from one LRU
shared by all of them, holding at most ``--capacity`` modules (the same capacity the
other systems get); a miss loads the artifact with ``gpufaas.core.modelio.load_model``
from the same file gpufaas serves. A load holds only its own model's lock, never the
LRU's: requests for resident models, and loads of other models, go on meanwhile. Batching is off
(each request is one forward, as on the other systems), except for the models whose spec
names a ``batching``: those get PyTriton's documented dynamic batching
(``ModelConfig(batching=True, max_batch_size=..., batcher=DynamicBatcher(
max_queue_delay_microseconds=...))`` and the ``@batch`` decorator, which hands the callable
the requests Triton's dynamic batcher merged, as one array per input, and splits the
outputs back). Everything else is PyTriton's defaults. HTTP, gRPC and metrics bind 127.0.0.1.

Triton's Python backend needs ``LD_LIBRARY_PATH`` to include the running Python's
``lib`` folder (``run.py`` sets it). Usage::

    python triton_app.py --specs SPECS.json --port P --capacity C --ready-file F
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pytriton.decorators import batch  # type: ignore[import-not-found, unused-ignore]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found, unused-ignore]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found, unused-ignore]

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import load_model

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
          "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}  # fmt: skip


class SharedLRU:
    """At most ``capacity`` loaded modules across all models, least recently used evicted.

    ``lock`` guards only the LRU's bookkeeping (microseconds); a load runs under its own
    model's lock alone, so one model's load never blocks requests for another (single-flight
    per model: a second request for a model being loaded waits for that load).
    """

    def __init__(self, models: dict[str, dict[str, str]], *, capacity: int) -> None:
        self.models = models
        self.capacity = capacity
        self.loaded: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.lock = threading.Lock()
        self.load_locks = {name: threading.Lock() for name in models}

    def _lookup(self, name: str) -> torch.nn.Module | None:
        with self.lock:
            module = self.loaded.get(name)
            if module is not None:
                self.loaded.move_to_end(name)
            return module

    def get(self, name: str) -> torch.nn.Module:
        module = self._lookup(name)
        if module is not None:
            return module
        with self.load_locks[name]:
            module = self._lookup(name)  # loaded while we waited for its lock
            if module is not None:
                return module
            entry = self.models[name]
            module = load_model(Path(entry["path"]), format=ModelFormat(entry["format"]))
            with contextlib.suppress(NotImplementedError):  # exported programs: no eval()
                module.eval()
            with self.lock:
                while len(self.loaded) >= self.capacity:
                    self.loaded.popitem(last=False)
                self.loaded[name] = module
            return module


def make_infer(
    name: str, cache: SharedLRU, *, input_names: list[str], output_names: list[str]
) -> Callable[[list[Any]], list[dict[str, npt.NDArray[Any]]]]:
    def infer(requests: list[Any]) -> list[dict[str, npt.NDArray[Any]]]:
        module = cache.get(name)
        responses = []
        for request in requests:
            with torch.inference_mode():
                result = module(*(torch.from_numpy(np.asarray(request[n])) for n in input_names))
            results = [result] if isinstance(result, torch.Tensor) else list(result)
            responses.append({n: r.numpy() for n, r in zip(output_names, results, strict=True)})
        return responses

    return infer


def make_batched_infer(
    name: str, cache: SharedLRU, *, input_names: list[str], output_names: list[str]
) -> Callable[..., dict[str, npt.NDArray[Any]]]:
    """One forward over the batch Triton's dynamic batcher formed (``@batch`` joins the
    requests' arrays along the first axis and splits the outputs back per request)."""

    @batch  # type: ignore[misc, untyped-decorator, unused-ignore]
    def infer(**inputs: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        module = cache.get(name)
        with torch.inference_mode():
            result = module(*(torch.from_numpy(np.asarray(inputs[n])) for n in input_names))
        results = [result] if isinstance(result, torch.Tensor) else list(result)
        return {n: r.numpy() for n, r in zip(output_names, results, strict=True)}

    return infer  # type: ignore[no-any-return]


def binding(
    name: str,
    entry: dict[str, Any],
    cache: SharedLRU,
    *,
    specs: dict[str, Any],
) -> dict[str, Any]:
    """``Triton.bind`` arguments for one model: batching off, or PyTriton's dynamic batching."""
    input_names = [t["name"] for t in specs["inputs"]]
    output_names = [t["name"] for t in specs["outputs"]]
    batching = entry.get("batching")

    def tensors(side: str) -> list[Tensor]:
        # With batching on, Triton's shapes leave out the batch dimension (the first).
        return [
            Tensor(
                name=t["name"],
                dtype=_NUMPY[t["datatype"]],
                shape=tuple(t["shape"][1:] if batching else t["shape"]),
            )
            for t in specs[side]
        ]

    if batching:
        infer: Callable[..., Any] = make_batched_infer(
            name, cache, input_names=input_names, output_names=output_names
        )
        config = ModelConfig(
            batching=True,
            max_batch_size=int(batching["max_batch_size"]),
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=int(batching["max_delay_ms"] * 1000)
            ),
        )
    else:
        infer = make_infer(name, cache, input_names=input_names, output_names=output_names)
        config = ModelConfig(batching=False)
    return {
        "model_name": name,
        "infer_func": infer,
        "inputs": tensors("inputs"),
        "outputs": tensors("outputs"),
        "config": config,
        "strict": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--torch-threads", type=int, default=1, help="as every system gets")
    args = parser.parse_args()
    specs = json.loads(args.specs.read_text())
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.torch_threads)

    cache = SharedLRU(specs["models"], capacity=args.capacity)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=_free_port(),
        metrics_address="127.0.0.1",
        metrics_port=_free_port(),
        allow_metrics=False,
        log_verbose=0,
    )
    stop = threading.Event()
    with Triton(config=config) as triton:
        for name, entry in specs["models"].items():
            triton.bind(**binding(name, entry, cache, specs=specs))
        triton.run()
        # PyTriton's default security restricts the statistics API to a token it makes up;
        # the bench reads the batch-size statistics with it (systems.PyTriton.executions).
        args.ready_file.with_suffix(".token").write_text(triton.get_access_token() or "")
        args.ready_file.write_text("ready\n")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait(timeout=6 * 3600)  # bounded even if nobody stops us
        time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
