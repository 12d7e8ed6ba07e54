"""Measure the example models: bytes, load times and inference time, through the GPU manager.

For each example model (:mod:`gpufaas.core.examples`) this drives a real
:class:`gpufaas.gpu_manager.runtime.NodeRuntime` (built as ``gpufaas gpu-manager`` builds it, on
one CPU stand-in device, or a GPU with ``--device cuda``) and reads what it reports per request:

- ``artifact_ms``: a cold miss minus a host-tier miss: artifact file -> host tier;
- ``load_ms`` (host -> device): a miss whose model the host tier holds (the device copy is
  unloaded first), as the runtime reports it (``InferOutcome.load_ms``);
- ``infer_ms``: a hit's forward pass (``InferOutcome.compute_ms``);
- ``size_bytes``: what the model takes in the device tier (weights and activation reserve).

A cold miss uses a fresh function name each time (a copy of the model), so nothing of it is
cached but the artifact file. Each figure is the median over ``--repeats``.

Sets written to ``profiles.json`` (each model's ``load_ms`` is what a device-tier miss costs):

- ``<set>`` (default ``measured-<date>``): artifact -> host -> device, all measured here;
- ``<set>-host-tier``: host -> device only (the host tier already holds the model);
- ``<set>-pcie4-scaled``: ``<set>`` plus ``size_bytes`` over 25 GB/s, the PCIe 4.0 x16
  host-to-device copy a GPU node adds; inference times stay as measured on the CPU.

A measurement only ever adds sets: the committed ones behind the published figures (``cpu``,
``cpu-host-tier``, ``gpu-pcie4-scaled``, ``runtime``, ``runtime-host-tier``) are never
overwritten; naming a set that exists is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .workload import PROFILES_FILE

PCIE4_BYTES_PER_S = 25e9


async def _measure_one(
    runtime: Any, spec: Any, inputs: list[Any], *, kind: str, repeats: int
) -> dict[str, Any]:
    device = next(iter(runtime.devices))
    cold: list[float] = []
    host: list[float] = []
    infer: list[float] = []
    sizes: list[int] = []
    for i in range(repeats + 1):  # the first round warms torch up, and is dropped
        name = f"{kind}-measure-{i}"
        runtime.register(name, spec)
        first = await runtime.infer(name, inputs, device_id=device)
        runtime.unload(name, device_id=device)  # the host tier keeps it
        second = await runtime.infer(name, inputs, device_id=device)
        hits = [await runtime.infer(name, inputs, device_id=device) for _ in range(5)]
        runtime.unregister(name)
        if i == 0:
            continue
        cold.append(first.load_ms)
        host.append(second.load_ms)
        infer.extend(h.compute_ms for h in hits if h.cache_hit)
        sizes.append(first.size_bytes)
    host_ms = statistics.median(host)
    return {
        "size_bytes": max(sizes),
        "artifact_ms": round(max(0.0, statistics.median(cold) - host_ms), 4),
        "load_ms": round(host_ms, 4),
        "infer_ms": round(statistics.median(infer), 4),
    }


def measure_models(*, device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    import torch

    from gpufaas.core.examples import EXAMPLES, build_examples, example_inputs
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests
    from gpufaas.gpu_manager.main import build_runtime

    torch.set_num_threads(1)  # as the GPU manager runs
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_examples(root / "models", progress=False)
        functions = {
            f.name: f.spec
            for f in load_manifests(
                [bundled_functions_dir()], variables={"GPUFAAS_MODELS": str(root / "models")}
            )
        }

        async def run() -> None:
            runtime = build_runtime(
                cpu_devices=1,
                device_memory_bytes=2 * 2**30,
                host_memory_bytes=4 * 2**30,
                artifact_dir=root / "artifacts",
                force_cpu=device == "cpu",
            )
            for kind in EXAMPLES:
                inputs = list(example_inputs(kind, batch=1).values())
                models[kind] = await _measure_one(
                    runtime, functions[kind], inputs, kind=kind, repeats=repeats
                )

        asyncio.run(run())
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d"),
        "method": "NodeRuntime.infer on one device: cold miss, host-tier miss, hits",
        "models": models,
    }


def profile_sets(measured: dict[str, Any]) -> dict[str, Any]:
    """The simulator's profile sets derived from one machine's measurements."""

    def derived(description: str, load: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
        return {
            "description": description,
            "device": measured["device"],
            "torch": measured["torch"],
            "measured": measured["measured"],
            "method": measured["method"],
            "models": {
                example: {
                    "size_bytes": m["size_bytes"],
                    "load_ms": round(load(m), 4),
                    "infer_ms": m["infer_ms"],
                    "artifact_ms": m["artifact_ms"],
                    "host_to_device_ms": m["load_ms"],
                }
                for example, m in measured["models"].items()
            },
        }

    return {
        "cpu": derived(
            "measured on this machine's CPU; a miss loads artifact -> host -> device",
            lambda m: m["artifact_ms"] + m["load_ms"],
        ),
        "cpu-host-tier": derived(
            "measured on this machine's CPU; a miss copies host -> device (host tier hit)",
            lambda m: m["load_ms"],
        ),
        "gpu-pcie4-scaled": derived(
            "scaled: a miss loads artifact -> host -> device as measured on the CPU, plus"
            " size / 25 GB/s for the PCIe 4.0 x16 host-to-device copy; inference as measured"
            " on the CPU (not scaled)",
            lambda m: m["artifact_ms"] + m["load_ms"] + m["size_bytes"] / PCIE4_BYTES_PER_S * 1000,
        ),
    }


def main(argv: list[str]) -> int:
    extra = argparse.ArgumentParser(prog="lalb.py measure", description=__doc__.split("\n\n")[0])
    extra.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    extra.add_argument("--repeats", type=int, default=5)
    extra.add_argument(
        "--set",
        default=f"measured-{time.strftime('%Y%m%d-%H%M%S')}",
        help="name of the NEW profile set to write (existing sets are never overwritten)",
    )
    extra.add_argument("--out", type=Path, default=PROFILES_FILE)
    options = extra.parse_args(argv)
    if options.repeats < 1:
        extra.error("--repeats must be >= 1")
    document: dict[str, Any] = {"sets": {}}
    if options.out.is_file():
        document = json.loads(options.out.read_text())
    names = [options.set, f"{options.set}-host-tier", f"{options.set}-pcie4-scaled"]
    taken = sorted(set(names) & set(document.get("sets", {})))
    if taken:
        extra.error(f"profile set(s) {taken} exist in {options.out}; choose a new --set name")
    result = measure_models(device=options.device, repeats=options.repeats)
    derived = profile_sets(result)
    kinds = ("cpu", "cpu-host-tier", "gpu-pcie4-scaled")
    sets = dict(zip(names, (derived[k] for k in kinds), strict=True))
    document.setdefault("sets", {}).update(sets)
    options.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(sets, indent=2))
    return 0
