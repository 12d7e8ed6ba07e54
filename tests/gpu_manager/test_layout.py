"""Arenas in forward order, the probe, replicas over an arena, and the per-layer gate."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gm_support import Model
from torch import nn

from gpufaas.core.modelio import load_model, tensor_bytes
from gpufaas.gpu_manager.layout import (
    ArrivalGate,
    Layout,
    build_replica,
    fill_arena,
    named_tensors,
    plan_layout,
    probe,
    strip,
)


def _arena_model(
    model: Model, *, alignment: int = 64, min_group_bytes: int = 0
) -> tuple[torch.nn.Module, Layout, torch.Tensor]:
    """Load ``model``, probe it, and move its weights into an arena; returns the skeleton."""
    module = load_model(model.path, format=model.format)
    first = probe(module, [torch.from_numpy(a) for a in model.inputs(batch=2)])
    layout, views = plan_layout(
        named_tensors(module),
        first_use=first.first_use,
        alignment=alignment,
        min_group_bytes=min_group_bytes,
    )
    arena = torch.empty(layout.arena_bytes, dtype=torch.uint8)
    fill_arena(arena, layout, views)
    strip(module)
    return module, layout, arena


@pytest.mark.parametrize("name", ["tiny-mlp", "small-cnn", "deep", "tied", "constant"])
def test_replica_over_an_arena_matches_the_original(models: dict[str, Model], name: str) -> None:
    model = models[name]
    inputs = model.inputs(batch=3)
    skeleton, layout, arena = _arena_model(model)

    assert all(t.numel() == 0 for _, t in named_tensors(skeleton))  # the skeleton is weightless
    replica = build_replica(skeleton, layout, arena.clone())
    with torch.inference_mode():
        got = replica(*(torch.from_numpy(a) for a in inputs)).numpy()
    np.testing.assert_allclose(got, model.reference(inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-mlp", "small-cnn", "tied", "constant"])
def test_the_arena_holds_exactly_the_tensor_bytes(models: dict[str, Model], name: str) -> None:
    module = load_model(models[name].path, format=models[name].format)
    layout, _ = plan_layout(named_tensors(module), alignment=64)

    assert layout.weights_bytes == tensor_bytes(module)
    padding = layout.arena_bytes - layout.weights_bytes
    assert 0 <= padding < 64 * len(layout.storages)
    assert all(s.start % 64 == 0 for s in layout.storages)


def test_tied_weights_are_stored_once_and_stay_tied(models: dict[str, Model]) -> None:
    skeleton, layout, arena = _arena_model(models["tied"])
    tied = [t for t in layout.tensors if len(t.names) > 1]
    assert [sorted(t.names) for t in tied] == [["head.weight", "tail.weight"]]
    replica = build_replica(skeleton, layout, arena)
    assert replica.head.weight.data_ptr() == replica.tail.weight.data_ptr()


def test_the_constant_of_an_exported_graph_lives_in_the_arena(models: dict[str, Model]) -> None:
    skeleton, layout, arena = _arena_model(models["constant"])
    names = {name for t in layout.tensors for name in t.names}
    assert names == {"lin.weight", "lin.bias", "lifted_tensor_0"}
    replica = build_replica(skeleton, layout, arena)
    base, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    assert all(base <= t.data_ptr() < end for _, t in named_tensors(replica))


def test_storages_are_laid_out_in_the_order_the_forward_pass_reads_them(
    models: dict[str, Model],
) -> None:
    _, layout, _ = _arena_model(models["deep"])
    owners = [s.owner for s in layout.storages]
    # Declared as layers, out, inp; run as inp, layers 0..5, out.
    assert owners == ["inp", "inp", *[f"layers.{i}" for i in range(6) for _ in "wb"], "out", "out"]
    assert layout.group_owners == ("inp", *[f"layers.{i}" for i in range(6)], "out")


def test_small_layers_are_merged_into_groups_that_tile_the_arena(models: dict[str, Model]) -> None:
    _, layout, _ = _arena_model(models["deep"], min_group_bytes=40_000)
    starts = [a for a, _ in layout.groups]
    assert starts[0] == 0 and layout.groups[-1][1] == layout.arena_bytes
    assert all(b == c for (_, b), (c, _) in zip(layout.groups, layout.groups[1:], strict=False))
    assert all(b - a >= 40_000 for a, b in layout.groups[:-1])
    assert len(layout.groups) < 8


def test_layout_survives_json_and_rejects_tensors_outside_their_storage(
    models: dict[str, Model],
) -> None:
    _, layout, _ = _arena_model(models["tied"])
    assert Layout.from_json(layout.to_json()) == layout
    broken = layout.to_json().replace('"float32"', '"float64"', 1)
    with pytest.raises(ValueError, match="outside its storage"):
        Layout.from_json(broken)
    with pytest.raises(ValueError, match="malformed"):
        Layout.from_json('{"storages": 3}')
    with pytest.raises(ValueError, match="dtype"):
        Layout.from_json(layout.to_json().replace('"float32"', '"os.system"', 1))


def test_probe_measures_the_activation_peak() -> None:
    net = torch.jit.script(nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 50)).eval())
    result = probe(net, [torch.zeros(10, 100)])
    assert result.error is None
    assert result.input_bytes == 10 * 100 * 4
    largest, everything = 10 * 200 * 4, 10 * (200 + 200 + 50) * 4
    assert largest < result.peak_activation_bytes <= everything  # two 8000-byte tensors overlap
    assert len(result.first_use) == 4


def test_probe_reports_a_model_that_rejects_its_inputs() -> None:
    result = probe(torch.jit.script(nn.Linear(4, 4)), [torch.zeros(2, 5)])
    assert result.error and result.first_use == () and result.peak_activation_bytes == 0


def test_the_gate_waits_for_each_layer_once_in_forward_order(models: dict[str, Model]) -> None:
    skeleton, layout, arena = _arena_model(models["deep"])
    replica = build_replica(skeleton, layout, arena)
    landed = [threading.Event() for _ in layout.groups]
    waited: list[int] = []

    def wait_group(group: int) -> None:
        waited.append(group)
        assert landed[group].wait(5)

    def copier() -> None:
        for event in landed:
            event.set()

    threading.Thread(target=copier).start()
    gate = ArrivalGate(arena, layout.groups, wait_group)
    inputs = models["deep"].inputs(batch=2)
    with torch.inference_mode(), gate:
        got = replica(*(torch.from_numpy(a) for a in inputs)).numpy()
    assert waited == list(range(len(layout.groups)))
    np.testing.assert_allclose(got, models["deep"].reference(inputs), rtol=1e-6, atol=1e-6)
