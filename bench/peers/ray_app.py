"""Ray Serve peer: the benchmark's models behind ``@serve.multiplexed``.

One deployment is the HTTP ingress. The client names the model in the
``serve_multiplexed_model_id`` header, so Ray's router sends the request to a replica
that already holds it; each replica keeps at most ``--capacity`` models and evicts
the least recently used (``max_num_models_per_replica``). Models load with
``gpufaas.core.modelio.load_model`` from the same artifact files gpufaas serves, and the
body is the same KServe v2 binary-tensor payload (``wire.py``), answered in kind.
Everything else is Ray Serve's defaults, written the way its guides do: the model loads in
the ``@serve.multiplexed`` method, and blocking work leaves the replica's event loop
(``asyncio.to_thread``, as Ray's docs advise for CPU-bound code in async deployments): the
artifact load and the forward pass each run in a thread, so one request's load or forward
never stalls the replica's other requests. torch gets ``--torch-threads`` threads, as every
system does. Models whose spec names a ``batching`` go through Ray Serve's documented
dynamic batching: an async method under ``@serve.batch(max_batch_size=...,
batch_wait_timeout_s=...)`` gets the list of concurrent calls, joins their inputs along the
first axis, runs one forward (in a thread) and returns one result per call.

Ray listens on every interface whatever it is told, so run this only inside a private
network namespace (``run.py`` does: ``unshare -n``, loopback up). Usage::

    python ray_app.py --specs SPECS.json --port P --capacity C --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray  # type: ignore[import-not-found, unused-ignore]  # in the ray peer only
import torch
import wire
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import load_model


def _load(entry: dict[str, Any]) -> torch.nn.Module:
    module = load_model(Path(entry["path"]), format=ModelFormat(entry["format"]))
    with contextlib.suppress(NotImplementedError):  # exported programs: no eval()
        module.eval()
    return module


def _forward(model: torch.nn.Module, inputs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    with torch.inference_mode():
        result = model(*(torch.from_numpy(a.copy()) for a in inputs.values()))
    results = [result] if isinstance(result, torch.Tensor) else list(result)
    return {name: r.numpy() for name, r in zip(names, results, strict=True)}


def _forward_batch(
    calls: list[tuple[torch.nn.Module, dict[str, Any]]], names: list[str]
) -> list[dict[str, Any]]:
    """One forward per model over the calls' inputs joined on the first axis, split back."""
    results: list[dict[str, Any]] = [{} for _ in calls]
    groups: dict[int, list[int]] = {}
    for i, (model, _) in enumerate(calls):
        groups.setdefault(id(model), []).append(i)
    for members in groups.values():
        model = calls[members[0]][0]
        inputs = {
            name: np.concatenate([calls[i][1][name] for i in members])
            for name in calls[members[0]][1]
        }
        outputs = _forward(model, inputs, names)
        start = 0
        for i in members:
            rows = len(next(iter(calls[i][1].values())))
            results[i] = {name: value[start : start + rows] for name, value in outputs.items()}
            start += rows
    return results


def build_app(specs: dict[str, Any], *, capacity: int, replicas: int, torch_threads: int) -> Any:
    batching = next((m["batching"] for m in specs["models"].values() if m.get("batching")), None)
    max_batch_size = int(batching["max_batch_size"]) if batching else 1
    wait_s = float(batching["max_delay_ms"]) / 1000 if batching else 0.0

    @serve.deployment(num_replicas=replicas)
    class MultiplexedModels:
        def __init__(self, specs: dict[str, Any]) -> None:
            self.models: dict[str, dict[str, Any]] = specs["models"]
            self.output_names = [o["name"] for o in specs["outputs"]]
            torch.set_grad_enabled(False)
            torch.set_num_threads(torch_threads)

        @serve.multiplexed(max_num_models_per_replica=capacity)  # type: ignore[untyped-decorator]
        async def get_model(self, model_id: str) -> torch.nn.Module:
            return await asyncio.to_thread(_load, self.models[model_id])

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)  # type: ignore[untyped-decorator]
        async def forward_batched(
            self, calls: list[tuple[torch.nn.Module, dict[str, Any]]]
        ) -> list[dict[str, Any]]:
            return await asyncio.to_thread(_forward_batch, calls, self.output_names)

        async def __call__(self, request: Request) -> Response:
            model_id = serve.get_multiplexed_model_id()
            if model_id not in self.models:
                return Response(f"unknown model {model_id!r}", status_code=404)
            model = await self.get_model(model_id)
            body = await request.body()
            inputs = wire.decode(body, request.headers.get(wire.HEADER_LENGTH), key="inputs")
            if self.models[model_id].get("batching"):
                outputs = await self.forward_batched((model, inputs))
            else:
                outputs = await asyncio.to_thread(_forward, model, inputs, self.output_names)
            content, headers = wire.encode_response(model_id, outputs)
            return Response(content, headers=headers, media_type=wire.CONTENT_TYPE)

    return MultiplexedModels.bind(specs)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--torch-threads", type=int, default=1, help="as every system gets")
    args = parser.parse_args()
    specs = json.loads(args.specs.read_text())

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=os.cpu_count(),
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(
            build_app(
                specs,
                capacity=args.capacity,
                replicas=args.replicas,
                torch_threads=args.torch_threads,
            ),
            name="peers",
            route_prefix="/",
        )
        args.ready_file.write_text("ready\n")
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        deadline = time.monotonic() + 6 * 3600  # bounded even if nobody stops us
        while not stop and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call, unused-ignore]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
