"""Measure the example models: bytes, load times and inference time, on the CPU or a GPU.

For each example model (:mod:`gpufaas.core.examples`) this times what the GPU manager does:

- ``artifact_ms``: artifact file -> host module (:func:`gpufaas.core.modelio.load_model`);
- ``load_ms``: host module -> device copy (:func:`gpufaas.gpu_manager.devices.instantiate_on`,
  synchronised): the cost of a device-tier miss when the host tier holds the model, which is the
  steady state of the experiment (the host tier holds every model);
- ``infer_ms``: one batch-1 request on the device, inputs copied in and outputs copied out.

Each is the median of repeated runs after a warm-up. ``size_bytes`` is
:func:`gpufaas.core.modelio.tensor_bytes` of the module.

Sets written to ``profiles.json`` (each model's ``load_ms`` is what a device-tier miss costs):

- ``cpu``: artifact -> host -> device, all measured here (the simulator's default);
- ``cpu-host-tier``: host -> device only (the host tier already holds the model);
- ``gpu-pcie4-scaled``: ``cpu`` plus ``size_bytes`` over 25 GB/s, the PCIe 4.0 x16
  host-to-device copy a GPU node adds; inference times stay as measured on the CPU;
- ``gpu``: with ``--device cuda`` on a GPU machine, host -> device and inference on the GPU.
"""

from __future__ import annotations

import argparse
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


def _median_ms(fn: Callable[[], object], *, repeats: int, sync: Callable[[], None]) -> float:
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def measure_models(
    *, device: str = "cpu", repeats: int = 15, random_minilm: bool = False
) -> dict[str, Any]:
    import torch

    from gpufaas.core.api import ModelFormat
    from gpufaas.core.examples import (
        EXAMPLES,
        MiniLM,
        build_examples,
        example_inputs,
        model_filename,
    )
    from gpufaas.core.modelio import load_model, save_model, tensor_bytes
    from gpufaas.gpu_manager.devices import DeviceInfo, instantiate_on, synchronize

    torch.set_grad_enabled(False)
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        info = DeviceInfo(
            id="cuda:0", kind="cuda", index=0, name=name, uuid="", total_bytes=0, capacity_bytes=0
        )
    else:
        name = platform.processor() or platform.machine()
        info = DeviceInfo(
            id="cpu:0", kind="cpu", index=0, name="cpu", uuid="", total_bytes=0, capacity_bytes=0
        )

    def sync() -> None:
        synchronize(info)

    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        names = [n for n in EXAMPLES if not (random_minilm and n == "minilm")]
        paths = build_examples(out, names=names, progress=False)
        if random_minilm:
            # Same architecture and bytes as the real encoder, random weights: same timings.
            paths["minilm"] = out / model_filename("minilm")
            inputs = tuple(torch.from_numpy(a) for a in example_inputs("minilm").values())
            save_model(
                torch.jit.script(MiniLM().eval()),
                paths["minilm"],
                format=ModelFormat.TORCHSCRIPT,
                example_inputs=inputs,
            )
        formats = {"tiny-mlp": ModelFormat.TORCHSCRIPT, "small-cnn": ModelFormat.TORCH_EXPORT}
        for example in EXAMPLES:
            path = paths[example]
            fmt = formats.get(example, ModelFormat.TORCHSCRIPT)
            load_model(path, format=fmt)  # warm the file cache and torch's loaders
            artifact_ms = _median_ms(
                lambda p=path, f=fmt: load_model(p, format=f),
                repeats=max(3, repeats // 3),
                sync=lambda: None,
            )
            module = load_model(path, format=fmt)
            size = tensor_bytes(module)
            for _ in range(3):  # warm-up: CUDA context, allocator pools
                instantiate_on(module, info)
            sync()
            load_ms = _median_ms(
                lambda m=module: instantiate_on(m, info), repeats=repeats, sync=sync
            )
            replica = instantiate_on(module, info)
            arrays = list(example_inputs(example, batch=1).values())

            def infer(r: torch.nn.Module = replica, a: list[Any] = arrays) -> None:
                tensors = [torch.from_numpy(x).to(info.torch_device) for x in a]
                with torch.inference_mode():
                    result = r(*tensors)
                result.detach().to("cpu").numpy()

            for _ in range(10):
                infer()
            infer_ms = _median_ms(infer, repeats=max(repeats, 30), sync=sync)
            models[example] = {
                "size_bytes": size,
                "artifact_ms": round(artifact_ms, 4),
                "load_ms": round(load_ms, 4),
                "infer_ms": round(infer_ms, 4),
            }
    return {
        "device": name,
        "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d"),
        "minilm_weights": "random (same shapes)" if random_minilm else "all-MiniLM-L6-v2",
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
            "minilm_weights": measured["minilm_weights"],
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
    extra.add_argument("--repeats", type=int, default=15)
    extra.add_argument("--random-minilm", action="store_true")
    extra.add_argument("--out", type=Path, default=PROFILES_FILE)
    options = extra.parse_args(argv)
    result = measure_models(
        device=options.device, repeats=options.repeats, random_minilm=options.random_minilm
    )
    if options.device == "cuda":
        sets = {
            "gpu": {**profile_sets(result)["cpu-host-tier"], "description": "measured on a GPU"}
        }
    else:
        sets = profile_sets(result)
    document: dict[str, Any] = {"sets": {}}
    if options.out.is_file():
        document = json.loads(options.out.read_text())
    document.setdefault("sets", {}).update(sets)
    options.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(sets, indent=2))
    return 0
