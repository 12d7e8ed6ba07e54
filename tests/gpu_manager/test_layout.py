"""Arenas in forward order, the probe, replicas over an arena, and the per-layer gate."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gm_support import Model, ScriptedBackend
from torch import nn

from gpufaas.core.modelio import load_model, tensor_bytes
from gpufaas.gpu_manager.devices import CpuBackend
from gpufaas.gpu_manager.host_tier import Skeleton, prepare_model
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.layout import (
    ArrivalGate,
    Layout,
    build_replica,
    fill_arena,
    named_tensors,
    plan_layout,
    probe,
    retarget_graphs,
    strip,
)
from gpufaas.gpu_manager.loader import (
    DeviceModel,
    build_module,
    gate_check,
    run_forward,
    start_copy,
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


# --- review finding 3: which inputs index a weight, and how far ------------------------------------


class _TwoTables(nn.Module):
    """Token ids (INT64) and token types (INT32, cast before use), as BERT takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(30, 3)
        self.types = nn.Embedding(2, 3)
        self.pos = nn.Embedding(8, 3)

    def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # internal: no input bound
        h = self.words(ids) + self.types(types.long()) + self.pos(positions)
        return h.sum(dim=1)


@pytest.mark.parametrize("kind", ["eager", "script", "export"])
def test_the_probe_learns_the_bounds_of_index_inputs(kind: str) -> None:
    ids, types = torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int32)
    module: torch.nn.Module = _TwoTables().eval()
    if kind == "script":
        module = torch.jit.script(module)
    elif kind == "export":
        module = torch.export.export(module, (ids, types)).module()
    assert probe(module, [ids, types]).index_bounds == ((0, 30), (1, 2))


def test_float_inputs_and_activation_indices_get_no_bound(models: dict[str, Model]) -> None:
    model = models["tiny-mlp"]
    module = load_model(model.path, format=model.format)
    assert probe(module, [torch.from_numpy(a) for a in model.inputs()]).index_bounds == ()


# --- review finding 5: device arguments of export graphs ---------------------------------------------


class _MakesTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(4, dtype=torch.float32, device=x.device)
        return self.lin(x).to(x.device) + steps


def test_every_device_argument_is_retargeted_positional_keyword_and_cuda_n() -> None:
    x = torch.ones(2, 4)
    graph = torch.export.export(_MakesTensors().eval(), (x,)).module()
    expected = graph(x)
    # As if exported on a second GPU: every device argument says cuda:1, wherever it sits.
    moved = 0
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        cuda1 = torch.device("cuda", 1)
        node.args = tuple(cuda1 if isinstance(a, torch.device) else a for a in node.args)
        node.kwargs = {
            k: cuda1 if isinstance(v, torch.device) else v for k, v in node.kwargs.items()
        }
        moved += sum(isinstance(a, torch.device) for a in (*node.args, *node.kwargs.values()))
    graph.recompile()
    assert moved >= 1
    with pytest.raises((RuntimeError, AssertionError)):  # this torch has no CUDA
        graph(x)

    assert retarget_graphs(graph, torch.device("cpu")) == moved
    torch.testing.assert_close(graph(x), expected)
    assert retarget_graphs(graph, torch.device("cpu")) == 0  # nothing left to move


def test_positional_device_arguments_are_retargeted() -> None:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    moved = g.call_function(
        torch.ops.aten._to_copy.default, (x,), {"device": torch.device("cuda", 3)}
    )
    ones = g.call_function(
        torch.ops.aten.ones.default, ([2, 4],), {"device": torch.device("cuda", 3)}
    )
    to = g.call_function(torch.ops.aten.to.device, (ones, torch.device("cuda", 3), torch.float32))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (moved, to)))
    module = torch.fx.GraphModule(nn.Module(), g)

    assert retarget_graphs(module, torch.device("cpu")) == 3
    torch.testing.assert_close(module(torch.ones(2, 4)), torch.full((2, 4), 2.0))


# --- review finding 4: the gate can't be bypassed -------------------------------------------------------


def _skeleton_and_host(model: Model, *, min_group_bytes: int = 0) -> tuple[Skeleton, torch.Tensor]:
    prepared = prepare_model(
        model.path, model.spec, fingerprint="f", alignment=64, min_group_bytes=min_group_bytes,
        variable_dim=8, device_type="cpu",
    )  # fmt: skip
    host = torch.empty(prepared.skeleton.layout.arena_bytes, dtype=torch.uint8)
    prepared.fill(host)
    return prepared.skeleton, host


@pytest.mark.parametrize("name", ["deep", "constant", "small-cnn"])
def test_the_gate_check_passes_gated_and_the_ungated_control_fails(
    models: dict[str, Model], name: str
) -> None:
    model = models[name]
    inputs = [torch.from_numpy(a) for a in model.inputs(batch=2)]
    reference = torch.from_numpy(model.reference(model.inputs(batch=2)))
    skeleton, host = _skeleton_and_host(model)
    backend = CpuBackend(cpu_devices(1, device_memory=1 << 30)[0])
    assert len(skeleton.layout.groups) >= 2

    gated = gate_check(skeleton, host, backend, inputs, reference, gated=True)
    control = gate_check(skeleton, host, backend, inputs, reference, gated=False)

    assert gated.passed and gated.waited_groups == gated.late_groups
    assert not control.passed and control.has_nan  # it read the NaN-filled late layers


def test_a_script_module_is_not_gated_while_fusers_could_bypass_the_gate(
    models: dict[str, Model],
) -> None:
    model = models["deep"]
    skeleton, host = _skeleton_and_host(model)
    backend = ScriptedBackend(cpu_devices(1, device_memory=1 << 30)[0], hold_s=0.5)
    saved = (torch._C._jit_texpr_fuser_enabled(), torch._C._jit_can_fuse_on_cpu())
    try:
        # Another test may have run configure_process (fusers off) in this process already.
        torch._C._jit_set_texpr_fuser_enabled(True)
        for fusion in (False, True):
            torch._C._jit_override_can_fuse_on_cpu(fusion)
            device_model = DeviceModel("deep", "f", skeleton, skeleton.layout.arena_bytes, "host")
            start_copy(
                device_model, backend, source_arena=host, source_backend=None, in_use_bytes=0
            )
            build_module(device_model)
            result = run_forward(device_model, model.inputs(batch=2), model.spec, backend)
            assert result.gated is not fusion  # with fusers possible: wait for every group
            np.testing.assert_allclose(
                result.outputs["y"][0], model.reference(model.inputs(batch=2)), rtol=1e-5
            )
    finally:
        torch._C._jit_set_texpr_fuser_enabled(saved[0])
        torch._C._jit_override_can_fuse_on_cpu(saved[1])
