"""The host tier: preparing a model from its artifact, and sidecars for refills."""

from __future__ import annotations

import gc
import itertools
import os
from pathlib import Path

import pytest
import torch
from gm_support import Model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from gpufaas.core.modelio import load_model, tensor_bytes
from gpufaas.gpu_manager.host_tier import (
    FALLBACK_RESERVE_FRACTION,
    HostSlab,
    SidecarError,
    prepare_model,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from gpufaas.gpu_manager.layout import named_tensors
from gpufaas.gpu_manager.memory import SlabAllocator


def _prepare(model: Model, **options: int) -> tuple[object, torch.Tensor]:
    prepared = prepare_model(
        model.path,
        model.spec,
        fingerprint="fp",
        alignment=options.get("alignment", 64),
        min_group_bytes=options.get("min_group_bytes", 0),
        variable_dim=8,
    )
    arena = torch.empty(prepared.skeleton.layout.arena_bytes, dtype=torch.uint8)
    prepared.fill(arena)
    return prepared.skeleton, arena


def test_preparing_moves_the_weights_into_the_arena_and_leaves_a_skeleton(
    models: dict[str, Model],
) -> None:
    model = models["small-cnn"]
    skeleton, arena = _prepare(model)
    original = load_model(model.path, format=model.format)

    assert skeleton.layout.weights_bytes == tensor_bytes(original)
    assert all(t.numel() == 0 for _, t in named_tensors(skeleton.module))
    assert skeleton.probe.error is None
    # The reserve is measured at maxBatchSize rows: inputs plus the activation peak.
    assert (
        skeleton.reserve_bytes == skeleton.probe.input_bytes + skeleton.probe.peak_activation_bytes
    )
    assert skeleton.probe.input_bytes == 1 * 3 * 32 * 32 * 4
    first = original.get_parameter("0.weight")
    assert torch.equal(arena[: first.numel() * 4], first.detach().view(-1).view(torch.uint8))


def test_a_larger_batch_measures_a_larger_reserve(models: dict[str, Model]) -> None:
    small, _ = _prepare(models["small-cnn"])
    large, _ = _prepare(models["small-cnn"].with_spec(batching={"maxBatchSize": 8}))
    assert large.reserve_bytes > 4 * small.reserve_bytes


def test_a_model_the_probe_cannot_run_gets_an_estimated_reserve(models: dict[str, Model]) -> None:
    wrong = models["tiny-mlp"].with_spec(
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 7]}]
    )
    skeleton, _ = _prepare(wrong)
    assert skeleton.probe.error
    assert skeleton.reserve_bytes == int(skeleton.layout.weights_bytes * FALLBACK_RESERVE_FRACTION)


def test_sidecar_round_trip_is_a_readable_safetensors_file(
    models: dict[str, Model], tmp_path: Path
) -> None:
    skeleton, arena = _prepare(models["tied"])
    path = sidecar_path(tmp_path, fingerprint="fp", artifact=models["tied"].path)
    write_sidecar(path, skeleton, arena)

    tensors = load_file(path)
    assert list(tensors) == ["arena"] and torch.equal(tensors["arena"], arena)
    with safe_open(str(path), framework="pt") as reader:
        assert reader.metadata()["fingerprint"] == "fp"
    refill = torch.zeros_like(arena)
    seen: list[int] = []
    read_sidecar(path, skeleton, refill, progress=seen.append)
    assert torch.equal(refill, arena) and seen[-1] == arena.numel()


def test_a_stale_or_broken_sidecar_is_refused(models: dict[str, Model], tmp_path: Path) -> None:
    model = models["tiny-mlp"]
    skeleton, arena = _prepare(model)
    path = tmp_path / "sidecar.safetensors"
    write_sidecar(path, skeleton, arena)

    skeleton.artifact_stat = (skeleton.artifact_stat[0], skeleton.artifact_stat[1] + 1)
    with pytest.raises(SidecarError, match="artifact_mtime_ns"):
        read_sidecar(path, skeleton, torch.empty_like(arena))
    skeleton.artifact_stat = (skeleton.artifact_stat[0], skeleton.artifact_stat[1] - 1)

    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(SidecarError):
        read_sidecar(path, skeleton, torch.empty_like(arena))
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(SidecarError):
        read_sidecar(path, skeleton, torch.empty_like(arena))
    os.unlink(path)
    with pytest.raises(SidecarError):
        read_sidecar(path, skeleton, torch.empty_like(arena))


# --- review finding 6: one pinned slab, cut into arenas ---------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50_000)), max_size=60))
def test_slab_ranges_never_overlap_stay_aligned_and_merge_back(ops: list[tuple[bool, int]]) -> None:
    slab = SlabAllocator(256 * 1024, alignment=4096)
    live: list[int] = []
    for allocate, size in ops:
        if allocate or not live:
            offset = slab.allocate(size)
            if offset is None:
                assert slab.largest_free < max(4096, -(-size // 4096) * 4096)
                continue
            assert offset % 4096 == 0
            live.append(offset)
        else:
            slab.free(live.pop(size % len(live)))
        blocks = slab.blocks()
        for (a, n), (b, _) in itertools.pairwise(blocks):
            assert a + n <= b  # no two arenas share a byte
        assert all(a + n <= slab.capacity_bytes for a, n in blocks)
        assert slab.used_bytes + slab.free_bytes == slab.capacity_bytes
    for offset in live:
        slab.free(offset)
    assert slab.largest_free == slab.capacity_bytes  # free neighbours merged into one hole


def test_slab_best_fit_keeps_the_large_hole_for_a_large_arena() -> None:
    slab = SlabAllocator(100 * 4096, alignment=4096)
    a, b, c = slab.allocate(10 * 4096), slab.allocate(4096), slab.allocate(40 * 4096)
    assert a is not None and b is not None and c is not None
    slab.free(a)  # holes: 10 pages at 0, 49 pages at the end
    assert slab.allocate(8 * 4096) == 0  # the small hole, not the big one
    assert slab.allocate(45 * 4096) is not None


def test_a_slab_range_returns_when_its_last_view_is_freed() -> None:
    slab = HostSlab(1 << 20, pin=False)
    arena, warm = slab.take(300_000)
    assert warm and arena.numel() == 300_000 and slab.used_bytes == 303_104  # 74 pages
    view = arena[1000:2000]
    del arena
    gc.collect()
    assert slab.used_bytes == 303_104  # a view still reads it: not handed out twice
    del view
    gc.collect()
    assert slab.used_bytes == 0


def test_the_slab_is_pinned_once_and_each_arena_reports_the_truth() -> None:
    calls: list[tuple[int, int]] = []

    def register(pointer: int, nbytes: int) -> bool:
        calls.append((pointer, nbytes))
        return True

    slab = HostSlab(1 << 20, pin=True, register=register, unregister=lambda p: None)
    assert calls == [(slab.base, 1 << 20)] and slab.pinned
    arenas = [slab.take(220_000)[0] for _ in range(5)]  # the fifth does not fit: outside
    assert len(calls) == 1  # taking arenas never pins
    assert [slab.is_pinned(a) for a in arenas] == [True, True, True, True, False]
    assert slab.fallbacks == 1
    unpinned = HostSlab(1 << 20, pin=False, register=register)
    assert len(calls) == 1 and not unpinned.is_pinned(unpinned.take(10)[0])
