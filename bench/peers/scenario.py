"""What each system serves in one scenario: K named copies of one example model.

A scenario is one model family (``tiny-mlp``, ``small-cnn``, ``minilm``) served as
``K`` functions named ``<family>-00`` .. ``<family>-K-1``, each with its own artifact
file (a hard link to the built example), with room for ``C < K`` of them at a time.
Every system loads those files with ``gpufaas.core.modelio.load_model``. One family
per scenario keeps the models the same size, so a byte budget (gpufaas) and a model
count (Ray, PyTriton) mean the same capacity: gpufaas's device budget is C times the
bytes it charges per copy (measured from gpufaas itself) plus half a copy.

gpufaas gets manifests cloned from the bundled example's, changed only in name, in
a ``file://`` URI without ``sha256`` (used in place, like the peers do; with a digest
gpufaas would copy and hash it into its artifact cache once), and with batching off
(one forward per request, as on the peers), except for the models named in
``Scenario.batched``: those get every system's dynamic batching with the same bounds
(``BATCHING``, the bundled examples' own: at most 8 requests, waiting at most 2 ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy.typing as npt
import torch
import yaml

from gpufaas.core.api import ModelFormat, parse_manifest
from gpufaas.core.examples import EXAMPLES, build_examples, example_inputs
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.modelio import load_model, tensor_bytes


@dataclass(frozen=True)
class Batching:
    """Dynamic-batching bounds, the same for every system that batches a model."""

    max_batch_size: int = 8
    max_delay_ms: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "max_delay_ms": self.max_delay_ms}


# The bundled tiny-mlp and small-cnn manifests' own batching (examples/functions/*.yaml).
BATCHING = Batching()


@dataclass
class Scenario:
    family: str
    artifact: Path  # the built example; each copy is a hard link to it (see :func:`prepare`)
    paths: dict[str, Path]
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    models: list[str]
    capacity: int
    model_bytes: int
    sample: dict[str, npt.NDArray[Any]] = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)
    # bytes gpufaas charges a device per copy (weights arena + activation reserve), measured
    # by ``systems.measure_gpufaas_footprint``; None until then
    gpufaas_footprint: int | None = None
    # Off: every system holds C copies (gpufaas's host tier off). On: gpufaas keeps its host
    # tier, which holds all K copies in RAM, and the peers get the same: room for K modules.
    host_tier: bool = False
    torch_threads: int = 1  # every system's torch intra-op threads
    # models served with dynamic batching on (every system, the same bounds); the rest: off
    batched: tuple[str, ...] = ()
    batching: Batching = BATCHING

    @property
    def peer_capacity(self) -> int:
        """Modules a peer may hold: C, or all K when gpufaas's host tier is on."""
        return len(self.models) if self.host_tier else self.capacity

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def specs(self) -> dict[str, Any]:
        """What the peer apps read (``--specs``): model paths and the tensor signature."""
        return {
            "models": {
                m: {
                    "path": str(self.paths[m]),
                    "format": self.format,
                    "batching": self.batching.to_dict() if m in self.batched else None,
                }
                for m in self.models
            },
            "inputs": self.inputs,
            "outputs": self.outputs,
        }

    def device_memory_bytes(self) -> int:
        """A gpufaas device budget that holds exactly ``capacity`` copies."""
        per_copy = self.gpufaas_footprint or self.model_bytes
        return self.capacity * per_copy + per_copy // 2


def _base_manifest(family: str) -> dict[str, Any]:
    """The bundled example's manifest (``examples/functions/<family>.yaml``) as a document."""
    bundled = bundled_functions_dir()
    function = next((f for f in load_manifests([bundled]) if f.name == family), None)
    if function is None:
        raise ValueError(f"no manifest for {family!r} among the bundled examples in {bundled}")
    document = function.model_dump(mode="json", by_alias=True, exclude_none=True)
    document.pop("status", None)
    return document


def prepare(
    family: str,
    *,
    copies: int,
    capacity: int,
    models_dir: Path,
    host_tier: bool = False,
    torch_threads: int = 1,
    batched: int = 0,
) -> Scenario:
    """Build (once) the family's artifact and describe K copies of it with room for C.

    ``batched``: the last that many copies get dynamic batching on every system. With
    batched copies every copy may be resident at once (``capacity == copies``): that
    scenario measures warm serving, not the cache.
    """
    if not (1 <= capacity < copies or (batched and 1 <= capacity == copies)):
        raise ValueError(f"need 1 <= capacity < copies, got capacity={capacity}, copies={copies}")
    if not 0 <= batched <= copies:
        raise ValueError(f"need 0 <= batched <= copies, got batched={batched}")
    if family not in EXAMPLES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(EXAMPLES)}")
    artifact = build_examples(models_dir, names=[family], progress=False)[family].resolve()
    manifest = _base_manifest(family)
    spec = parse_manifest(manifest, source=f"{family} manifest").spec
    module = load_model(artifact, format=ModelFormat(spec.model.format))
    models = [f"{family}-{i:02d}" for i in range(copies)]
    return Scenario(
        family=family,
        artifact=artifact,
        paths=_link_copies(artifact, models, folder=models_dir / "peers" / family),
        format=str(ModelFormat(spec.model.format).value),
        inputs=[t.model_dump(mode="json") for t in spec.inputs],
        outputs=[t.model_dump(mode="json") for t in spec.outputs],
        models=models,
        capacity=capacity,
        model_bytes=tensor_bytes(module),
        sample=example_inputs(family, batch=1),
        manifest=manifest,
        host_tier=host_tier,
        torch_threads=torch_threads,
        batched=tuple(models[copies - batched :]) if batched else (),
    )


def _link_copies(artifact: Path, models: list[str], *, folder: Path) -> dict[str, Path]:
    """One file per copy (a hard link, or a copy across file systems).

    Distinct paths make distinct models to every system: nothing keyed by the file
    (gpufaas's host-tier sidecars, say) is shared between copies. The same inode keeps
    the page cache, and so the read cost, the same for all systems.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in models:
        path = folder / f"{name}{artifact.suffix}"
        if not (path.exists() and path.stat().st_ino == artifact.stat().st_ino):
            path.unlink(missing_ok=True)
            try:
                os.link(artifact, path)
            except OSError:
                shutil.copyfile(artifact, path)
        paths[name] = path
    return paths


def write_manifests(scenario: Scenario, folder: Path) -> Path:
    """One InferenceFunction manifest per copy, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in scenario.models:
        document = json.loads(json.dumps(scenario.manifest))
        document["metadata"] = {"name": name}
        model = document["spec"]["model"]
        model["uri"] = scenario.paths[name].as_uri()
        model.pop("sha256", None)
        batching = scenario.batching
        document["spec"]["batching"] = (
            {"maxBatchSize": batching.max_batch_size, "maxDelayMs": batching.max_delay_ms}
            if name in scenario.batched
            else {"maxBatchSize": 1, "maxDelayMs": 0}
        )
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


def reference_outputs(scenario: Scenario) -> dict[str, npt.NDArray[Any]]:
    """The scenario's sample run through the model directly, for checking each system."""
    module = load_model(scenario.artifact, format=ModelFormat(scenario.format))
    with contextlib.suppress(NotImplementedError):  # exported programs have no eval()
        module.eval()
    with torch.inference_mode():
        result = module(*(torch.from_numpy(scenario.sample[t["name"]]) for t in scenario.inputs))
    results = [result] if isinstance(result, torch.Tensor) else list(result)
    return {name: r.numpy() for name, r in zip(scenario.output_names, results, strict=True)}
