"""The cost model (pure) and the launch tree's shape."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.core.layered import LayeredNet, ShardSpec, radix_net
from gpufaas.core.sharding import ShardLoad
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.coordinator import launch_tree, tree_rounds
from gpufaas.scheduler.partition import communication, partition

COMPUTE = costmodel.Compute(per_op_s=1e-5, per_nnz_s=1e-9)
CONSTANTS = costmodel.Constants(
    compute=COMPUTE,
    per_request_s=1e-3,
    per_io_value_s=1e-8,
    cores=2,
    channels={
        "direct": costmodel.ChannelCost(5e-4, 1e-9, 1e-4, 1e-3),
        "s3": costmodel.ChannelCost(3e-2, 1e-8, 1e-3, 5e-3),
    },
)


def _only(compute: costmodel.Compute, cost: costmodel.ChannelCost) -> costmodel.Constants:
    return costmodel.Constants(compute, 0.0, 0.0, 2, {"x": cost})


def test_profile_agrees_with_the_partition_volume() -> None:
    net = radix_net(256, 8)
    part = partition(net, 4, method="block")
    prof = costmodel.profile(net, part)
    volume = communication(net, part)
    assert prof.nnz.sum() == sum(layer.nnz for layer in net.layers)
    assert prof.values.sum() == volume.values
    assert prof.messages.sum() == volume.messages
    assert ((prof.sync > 0) == (prof.messages > 0)).all()


def _prepared_shards(
    net: LayeredNet,
) -> Iterator[tuple[str, costmodel.Profile, ShardSpec, list[Any]]]:
    """For each partitioner at N = 4: its profile, and each shard's spec with the products
    ``gpu_manager/shards.prepare`` builds for it (what the profile must count)."""
    from gpufaas.gpu_manager.shards import prepare
    from gpufaas.scheduler.partition import split

    for method in ("block", "random", "hypergraph"):
        part = partition(net, 4, method=method, seed=1)
        prof = costmodel.profile(net, part)
        for spec in split(net, part):
            yield method, prof, spec, prepare(spec, torch.device("cpu"))


def test_profile_counts_the_products_the_executor_runs() -> None:
    """A shard's sparse products per layer, as gpu_manager/shards.prepare builds them: one per
    row group (boundary, interior) over its own activations and one per shard it reads from."""
    for method, prof, spec, ops in _prepared_shards(radix_net(256, 6)):
        counted = [len(op.groups) * (1 + len(op.sources)) for op in ops]
        assert counted == prof.ops[:, spec.shard].tolist(), method


def test_profile_counts_the_values_each_shard_hands_over_and_the_remote_parts_it_adds() -> None:
    """``sent`` is what each shard's executor hands over per layer (its send positions), and
    ``parts`` the output rows times the remote parts added into them (session 7: the term that
    split shards pay and a single shard does not, which the fit used to charge N = 1 for)."""
    net = radix_net(256, 6)
    for method, prof, spec, ops in _prepared_shards(net):
        assert prof.sent.sum(axis=1).tolist() == prof.values.sum(axis=1).tolist()
        sends = [
            sum(p.stop - p.start if isinstance(p, slice) else int(p.numel())
                for p in op.send_next.values())
            for op in ops
        ]  # fmt: skip
        first = sum(int(np.asarray(p).size) for p in spec.layers[0].send.values())
        assert [first, *sends[:-1]] == prof.sent[:, spec.shard].tolist(), method
        parts = [op.rows * len(op.sources) for op in ops]
        assert parts == prof.parts[:, spec.shard].tolist(), method
    single = costmodel.profile(net, partition(net, 1, method="block"))
    assert not single.sent.any() and not single.parts.any()


def test_profile_counts_the_weights_whose_products_run_as_dense_tiles() -> None:
    """``tiled`` is the nnz of the products ``prepare`` builds as dense tiles (session 9: they
    cost per multiply-add about a third of CSR's, so the model charges them apart)."""
    from gpufaas.core.layered import TiledMatrix

    net = radix_net(256, 6)
    for method, prof, spec, ops in _prepared_shards(net):
        tiled = [
            sum(int((m.tiles != 0).sum()) for g in op.groups
                for m in (g.own, *g.remote.values()) if isinstance(m, TiledMatrix))
            for op in ops
        ]  # fmt: skip
        assert tiled == prof.tiled[:, spec.shard].tolist(), method
    assert costmodel.profile(net, partition(net, 4, method="random", seed=1)).tiled.sum() == 0
    assert costmodel.profile(net, partition(net, 4, method="block")).tiled.sum() == (
        sum(layer.nnz for layer in net.layers)
    )


def test_shards_sharing_the_cores_pay_the_measured_contention_on_their_products() -> None:
    """``Constants.contention`` (the calibration's N shards' products at once against alone)
    multiplies every shard's compute at that N, linearly between the counts measured, the
    last one's beyond, nothing at N = 1 or without a measurement."""
    net = radix_net(256, 8)
    compute = costmodel.Compute(per_op_s=1e-5, per_nnz_s=1e-9, per_tile_nnz_s=1e-9)
    plain = _only(compute, costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0))
    # the whole measured contention (w = 1), what this test is about
    plain = dataclasses.replace(plain, contention_weight=1.0)
    shared = dataclasses.replace(plain, contention={2: 1.2, 8: 2.0})
    assert costmodel.contention(shared, 1) == 1.0
    assert costmodel.contention(plain, 8) == 1.0
    assert costmodel.contention(shared, 2) == pytest.approx(1.2)
    assert costmodel.contention(shared, 4) == pytest.approx(1.2 + (2.0 - 1.2) * 2 / 6)
    assert costmodel.contention(shared, 16) == pytest.approx(2.0)
    for shards in (1, 2, 4, 8):
        prof = costmodel.profile(net, partition(net, shards, method="block"))
        alone = costmodel.predict(prof, batch=16, channel="x", constants=plain)
        together = costmodel.predict(prof, batch=16, channel="x", constants=shared)
        assert together == pytest.approx(alone * costmodel.contention(shared, shards))
    assert costmodel.at_speed(dataclasses.replace(shared, probe_s=1.0), 2.0).contention == (
        shared.contention
    )


def test_throughput_under_shared_passes_pays_the_fixed_costs_once_per_pass() -> None:
    net = radix_net(256, 8)
    prof = costmodel.profile(net, partition(net, 2, method="block"))
    one = costmodel.predict(prof, batch=16, channel="direct", constants=CONSTANTS)
    alone = costmodel.throughput(
        prof, batch=16, concurrency=1, channel="direct", constants=CONSTANTS
    )
    assert alone == pytest.approx(1 / one)
    four = costmodel.throughput(
        prof, batch=16, concurrency=4, channel="direct", constants=CONSTANTS
    )
    pass_of_four = costmodel.predict(prof, batch=64, channel="direct", constants=CONSTANTS)
    assert four == pytest.approx(4 / pass_of_four)
    assert alone < four < 4 * alone  # fixed costs shared, per-sample ones not


def test_fewer_bytes_and_faster_channels_predict_less() -> None:
    net = radix_net(1024, 12)
    hyper = costmodel.profile(net, partition(net, 4, method="hypergraph"))
    rand = costmodel.profile(net, partition(net, 4, method="random", seed=1))
    for channel in ("direct", "s3"):
        assert costmodel.predict(hyper, batch=64, channel=channel, constants=CONSTANTS) < (
            costmodel.predict(rand, batch=64, channel=channel, constants=CONSTANTS)
        )
    ranked = costmodel.choose(
        [("hyper-direct", hyper, "direct"), ("hyper-s3", hyper, "s3"),
         ("rand-direct", rand, "direct")],
        batch=64, constants=CONSTANTS,
    )  # fmt: skip
    assert [name for _, name in ranked] == ["hyper-direct", "rand-direct", "hyper-s3"]


def test_more_shards_than_cores_compute_no_faster_than_the_cores_allow() -> None:
    """Per layer, the busiest shard or all shards' work over the cores: with balanced shards
    that is max(1, N / cores) times one shard's work, so 8 shards on 2 cores take what 2 do
    (with no per-op cost), and a per-op cost makes more shards slower."""
    net = radix_net(1024, 6)
    free = costmodel.ChannelCost(0, 0, 0, 0, 0)

    def times(compute: costmodel.Compute) -> dict[int, float]:
        return {
            n: costmodel.predict(
                costmodel.profile(net, partition(net, n, method="block")), batch=64,
                channel="x", constants=_only(compute, free),
            )
            for n in (1, 2, 4, 8)
        }  # fmt: skip

    flat = times(costmodel.Compute(0.0, 1e-9))
    assert abs(flat[2] - flat[1] / 2) < 1e-9
    assert abs(flat[8] - flat[2]) < 1e-9 and abs(flat[4] - flat[2]) < 1e-9
    dispatch = times(costmodel.Compute(1e-4, 1e-9))
    assert dispatch[8] > dispatch[4] > dispatch[2]


def test_messages_beyond_the_cores_take_turns() -> None:
    """Message handling is CPU work: 8 shards on 2 cores handle their messages 4 at a turn."""
    net = radix_net(1024, 6)
    none = costmodel.Compute(0.0, 0.0)
    for shards in (2, 8):
        prof = costmodel.profile(net, partition(net, shards, method="random", seed=1))
        predicted = costmodel.predict(
            prof, batch=1, channel="x", constants=_only(none, costmodel.ChannelCost(1e-3, 0, 0, 0))
        )
        expected = np.maximum(prof.messages.max(axis=1), prof.messages.sum(axis=1) / 2).sum()
        assert abs(predicted - 1e-3 * expected) < 1e-12
        if shards == 8:  # the total over the cores, not the busiest shard alone, binds here
            assert predicted > 1e-3 * prof.messages.max(axis=1).sum() * 1.5


def test_fit_recovers_the_constants_of_a_linear_cost() -> None:
    rng = np.random.default_rng(0)
    xs = rng.uniform(1, 100, size=(20, 3))
    truth = np.array([2e-4, 3e-9, 1e-3])
    fitted = costmodel.fit(xs.tolist(), (xs @ truth).tolist())
    np.testing.assert_allclose(fitted, truth, rtol=1e-6)


def test_a_relative_fit_weighs_fast_runs_like_slow_ones() -> None:
    """One slow outlier run: an absolute fit bends to it, the relative fit stays within 25%
    of the fast runs (the goal is relative)."""
    xs = [[1.0, float(n)] for n in (1, 2, 3, 4, 1000)]
    ys = [1e-3 + 1e-4 * n for n in (1, 2, 3, 4)] + [0.3]  # the last run was slowed down
    rel = costmodel.fit(xs, ys, relative=True)
    absolute = costmodel.fit(xs, ys)
    fast = [(x, y) for x, y in zip(xs, ys, strict=True)][:4]
    assert all(abs(np.dot(x, rel) / y - 1) <= 0.25 for x, y in fast)
    assert not all(abs(np.dot(x, absolute) / y - 1) <= 0.25 for x, y in fast)


def test_a_wait_costs_a_wake_up_only_when_the_shards_outnumber_the_cores() -> None:
    """Oversubscription (N > cores): a shard waking from a layer's wait finds every core
    taken with chance (N - cores) / N and pays ``c_wake``; as CPU work it takes turns over the
    cores like the rest, so per layer that waits it adds c_wake * (N - cores) / cores with
    balanced shards: nothing at N = 2 on 2 cores, 1 c_wake at N = 4, 3 at N = 8."""
    net = radix_net(1024, 6)
    none = costmodel.Compute(0.0, 0.0)
    wake = costmodel.ChannelCost(0, 0, 0, 0, per_wake_s=1e-3)
    assert [costmodel.busy(n, 2) for n in (1, 2, 4, 8)] == [0.0, 0.0, 0.5, 0.75]
    extra = {}
    for shards in (2, 4, 8):
        prof = costmodel.profile(net, partition(net, shards, method="block"))
        extra[shards] = costmodel.predict(prof, batch=64, channel="x", constants=_only(none, wake))
        waits = prof.sync.max(axis=1).sum()  # layers in which the shards wait
        assert waits > 0
        assert abs(extra[shards] - 1e-3 * waits * (max(0, shards - 2) / 2)) < 1e-12
    assert extra[2] == 0.0 and extra[8] > 2 * extra[4] > 0


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_waits_take_no_core_only_the_busiest_shards_path_pays_them(shards: int) -> None:
    """Session 13's alternative (``waits_on_path=True``, not the default): a wait (``c_sync``:
    the trip back to the loop and the wake-up) as time on the shard's path, not CPU, so with
    more shards than cores the waits do not take turns over the cores as CPU does. Every
    shard of a block split waits once per layer that reads remote values: the layer pays one
    ``c_sync``, at any N. Charged as CPU (the default) N = 8 on 2 cores pays 4 per layer."""
    net = radix_net(1024, 6)
    prof = costmodel.profile(net, partition(net, shards, method="block"))
    sync = costmodel.ChannelCost(0, 0, 1e-3, 0)
    as_cpu = _only(costmodel.Compute(0.0, 0.0), sync)
    on_path = dataclasses.replace(as_cpu, waits_on_path=True)
    layers = prof.sync.max(axis=1).sum()
    assert layers > 0 and (prof.sync.sum(axis=1) == shards * prof.sync.max(axis=1)).all()
    predicted = costmodel.predict(prof, batch=64, channel="x", constants=on_path)
    assert abs(predicted - 1e-3 * layers) < 1e-12
    control = costmodel.predict(prof, batch=64, channel="x", constants=as_cpu)
    assert abs(control - 1e-3 * layers * max(1, shards / 2)) < 1e-12
    # CPU beside the waits still takes turns: messages at N = 8 are shared out over the cores
    both = dataclasses.replace(
        _only(costmodel.Compute(0.0, 0.0), costmodel.ChannelCost(1e-3, 0, 1e-3, 0)),
        waits_on_path=True,
    )
    messages = np.maximum(prof.messages.max(axis=1) + prof.sync.max(axis=1),
                          prof.messages.sum(axis=1) / 2).sum()  # fmt: skip
    assert abs(costmodel.predict(prof, batch=64, channel="x", constants=both)
               - 1e-3 * messages) < 1e-12  # fmt: skip


def fit_grid() -> Iterator[tuple[costmodel.Profile, int]]:
    """The runs a channel fit sees: two depths, block and random splits over 2, 4 and 8 shards
    (the oversubscribed ones tell the wake-up term from the wait's), two batch sizes."""
    for depth in (4, 8):
        net = radix_net(512, depth)
        for shards, method in ((2, "block"), (2, "random"), (4, "block"), (4, "random"),
                               (8, "block")):  # fmt: skip
            prof = costmodel.profile(net, partition(net, shards, method=method, seed=2))
            for batch in (16, 64):
                yield prof, batch


def test_fit_channel_recovers_a_channels_constants_from_runs_it_predicts() -> None:
    """Runs made by the model itself (both branches of the max: 2, 4 and 8 shards on 2
    cores) give back the channel's constants, though the model is not linear in them; the
    wake-up term needs the oversubscribed runs (N = 4 and 8) to be told from the wait's."""
    truth = costmodel.ChannelCost(4e-4, 2e-9, 3e-4, 2e-3, per_wake_s=1.5e-4)
    constants = costmodel.Constants(COMPUTE, 1e-3, 1e-8, 2, {"x": truth})
    runs = []
    for prof, batch in fit_grid():
        runs.append(
            (prof, batch, costmodel.predict(prof, batch=batch, channel="x", constants=constants))
        )
    fitted = costmodel.fit_channel(runs, base=constants)
    np.testing.assert_allclose(dataclasses.astuple(fitted), dataclasses.astuple(truth), rtol=1e-3)


def test_fit_channels_shares_the_coordinator_and_wake_terms_across_channels() -> None:
    """Two channels that differ in their messages and bytes only, as the model makes them: one
    joint fit gives each its own message, byte and wait constants and one shard and wake-up
    constant for both (the coordinator's calls and a shard's wake-up are the same code on
    every channel); it recovers every constant, though the model is not linear in them."""
    fast = costmodel.ChannelCost(1e-4, 1.5e-9, 4e-4, 5e-4, per_wake_s=1.5e-4)
    slow = costmodel.ChannelCost(2e-4, 5e-9, 6e-4, 5e-4, per_wake_s=1.5e-4)
    constants = costmodel.Constants(COMPUTE, 1e-3, 1e-8, 2, {"fast": fast, "slow": slow})
    runs: dict[str, list[tuple[costmodel.Profile, int, float]]] = {"fast": [], "slow": []}
    for prof, batch in fit_grid():
        for name in runs:
            seconds = costmodel.predict(prof, batch=batch, channel=name, constants=constants)
            runs[name].append((prof, batch, seconds))
    fitted = costmodel.fit_channels(runs, base=constants)
    for name, truth in (("fast", fast), ("slow", slow)):
        np.testing.assert_allclose(
            dataclasses.astuple(fitted[name]), dataclasses.astuple(truth), rtol=1e-3
        )
    assert fitted["fast"].per_shard_s == fitted["slow"].per_shard_s  # one value, shared


def test_the_launch_tree_is_binary_and_log_deep() -> None:
    loads = [
        ShardLoad(
            set_name="s", shard=i, shards=7, artifact="file:///x", node=f"http://n{i}", peers={}
        )
        for i in range(7)
    ]
    root = launch_tree(loads)
    assert root.shard == 0
    assert [c.shard for c in root.children] == [1, 2]
    assert [c.shard for c in root.children[0].children] == [3, 4]
    assert [c.shard for c in root.children[1].children] == [5, 6]
    assert [tree_rounds(n) for n in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]


def test_at_speed_scales_every_prediction_by_the_probe_ratio() -> None:
    """The speed probe: constants measured where the probe took ``probe_s`` predict, at a
    probe reading 1.5x that, exactly 1.5x the latency (every constant is CPU time)."""
    net = radix_net(256, 8)
    probed = dataclasses.replace(CONSTANTS, probe_s=0.004)
    for shards, channel in ((1, "direct"), (2, "direct"), (4, "s3")):
        prof = costmodel.profile(net, partition(net, shards, method="block"))
        here = costmodel.predict(prof, batch=16, channel=channel, constants=probed)
        slower = costmodel.at_speed(probed, 0.006)
        assert slower.probe_s == 0.006
        assert costmodel.predict(prof, batch=16, channel=channel, constants=slower) == (
            pytest.approx(1.5 * here)
        )
    assert costmodel.at_speed(CONSTANTS, 0.006) is CONSTANTS  # unprobed: as they are


# --- a served pass against the in-process calibration (s13 wave 2) ---------------------------


def _unsharded_runs(
    constants: costmodel.Constants, depths: tuple[int, ...]
) -> list[tuple[costmodel.Profile, int, float]]:
    runs = []
    for width in (256, 512, 1024):
        for depth in depths:
            net = radix_net(width, depth)
            prof = costmodel.profile(net, partition(net, 1, method="block"))
            for batch in (16, 64):
                seconds = costmodel.predict(prof, batch=batch, channel="direct",
                                            constants=constants)  # fmt: skip
                runs.append((prof, batch, seconds))
    return runs


def test_a_served_pass_charges_every_shards_compute_that_many_times() -> None:
    """``served`` multiplies each shard's compute, at one shard and at many, and nothing
    else: with compute alone in the constants the prediction is ``served`` times larger."""
    net = radix_net(256, 8)
    only_compute = costmodel.Constants(COMPUTE, 0.0, 0.0, 2,
                                       {"x": costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0)})  # fmt: skip
    for shards in (1, 2, 4):
        prof = costmodel.profile(net, partition(net, shards, method="block"))
        hot = costmodel.predict(prof, batch=16, channel="x", constants=only_compute)
        served = dataclasses.replace(only_compute, served=1.3)
        assert costmodel.predict(prof, batch=16, channel="x", constants=served) == (
            pytest.approx(1.3 * hot)
        )
        assert costmodel.at_speed(dataclasses.replace(served, probe_s=1.0), 2.0).served == 1.3


def test_fit_coordinator_tells_a_served_pass_from_c_io_only_across_depths() -> None:
    """Unsharded runs the model made with ``served = 1.3`` at two depths give back
    ``c_request``, ``c_io`` and ``served``; at one depth ``served`` cannot be told from
    ``c_io`` (both grow with width and batch) and stays 1, the extra going into the
    coordinator's terms, which then predict a deeper net too low (earlier runs' N = 1)."""
    hot = dataclasses.replace(CONSTANTS, compute=dataclasses.replace(COMPUTE, per_tile_nnz_s=5e-10))
    truth = dataclasses.replace(hot, served=1.3)
    fitted = costmodel.fit_coordinator(_unsharded_runs(truth, (4, 12)), base=hot)
    assert fitted.served == pytest.approx(1.3, rel=1e-6)
    assert fitted.per_request_s == pytest.approx(truth.per_request_s, rel=1e-6)
    assert fitted.per_io_value_s == pytest.approx(truth.per_io_value_s, rel=1e-6)
    one_depth = costmodel.fit_coordinator(_unsharded_runs(truth, (4,)), base=hot)
    assert one_depth.served == 1.0
    unasked = costmodel.fit_coordinator(_unsharded_runs(truth, (4, 12)), base=hot,
                                        served=False)  # fmt: skip
    assert unasked.served == 1.0
    deep = radix_net(1024, 24)
    prof = costmodel.profile(deep, partition(deep, 1, method="block"))
    measured = costmodel.predict(prof, batch=64, channel="direct", constants=truth)
    for model, low in ((fitted, False), (one_depth, True)):
        error = costmodel.predict(prof, batch=64, channel="direct", constants=model) / measured - 1
        assert (error < -0.05) is low, error
    with pytest.raises(ValueError, match="unsharded"):
        net = radix_net(256, 4)
        two = costmodel.profile(net, partition(net, 2, method="block"))
        costmodel.fit_coordinator([(two, 16, 1e-3)], base=hot)


# --- the message split (session 12): bytes told apart from messages and waits ---------------


def test_a_fixed_stride_net_reads_one_super_neuron_that_far_in_every_layer() -> None:
    net = radix_net(256, 3, stride=4)
    for layer in net.layers:
        reads = layer.cols.reshape(256, 32) // 16  # each row's 32 inputs, as super-neurons
        rows = np.arange(256) // 16
        assert (reads[:, :16] == rows[:, None]).all()
        assert (reads[:, 16:] == ((rows + 4) % 16)[:, None]).all()
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match="stride"):
            radix_net(256, 3, stride=bad)


@pytest.mark.parametrize("shards", [2, 4])
def test_the_message_split_differs_in_bytes_alone(shards: int) -> None:
    """Split in contiguous blocks, the two nets give every shard the same weights, tiles,
    messages and waits per layer; the large one's messages carry every value the sender
    owns (16x to 32x the small one's here, 64x and 128x on the calibration's 4,096)."""
    nets = costmodel.message_split(1024, 4)
    small, large = (
        costmodel.profile(nets[k], partition(nets[k], shards, method="block"))
        for k in ("small", "large")
    )
    for field in ("nnz", "tiled", "messages", "sync"):
        np.testing.assert_array_equal(getattr(small, field), getattr(large, field), err_msg=field)
    assert (small.messages == 1).all()  # one message per layer and shard
    assert (small.values == 16).all()  # one super-neuron
    assert (large.values == 1024 // shards).all()  # every value the sender owns


@settings(max_examples=40, deadline=None)
@given(
    shards=st.sampled_from([2, 4]),
    batch=st.sampled_from([16, 64]),
    terms=st.tuples(*(st.floats(1e-6, 1e-3) for _ in range(4))),
    per_byte_s=st.floats(1e-11, 1e-8),
    compute=st.tuples(st.floats(1e-6, 1e-4), st.floats(1e-11, 1e-9), st.floats(0, 1e-8)),
)
def test_byte_cost_gives_back_c_byte_from_the_pair_whatever_the_other_terms(
    shards: int,
    batch: int,
    terms: tuple[float, float, float, float],
    per_byte_s: float,
    compute: tuple[float, float, float],
) -> None:
    """Runs made by the model: the pair's difference leaves c_byte alone, with any message,
    wait, shard and wake-up cost and any compute (the nets' products differ by a row group
    per layer, which the model's compute takes off)."""
    per_message_s, per_sync_s, per_shard_s, per_wake_s = terms
    truth = costmodel.ChannelCost(per_message_s, per_byte_s, per_sync_s, per_shard_s, per_wake_s)
    base = costmodel.Constants(
        costmodel.Compute(compute[0], compute[1], per_value_s=compute[2]), 1e-3, 1e-8, 2,
        {"x": truth}, contention={2: 1.1, 4: 1.5},
    )  # fmt: skip
    runs = []
    for kind in ("small", "large"):
        net = _split_nets()[kind]
        prof = costmodel.profile(net, partition(net, shards, method="block"))
        runs.append(
            (prof, batch, costmodel.predict(prof, batch=batch, channel="x", constants=base))
        )
    assert costmodel.byte_cost(runs[0], runs[1], base=base) == pytest.approx(per_byte_s, rel=1e-6)


@functools.cache
def _split_nets() -> dict[str, LayeredNet]:
    return costmodel.message_split(1024, 4)


def test_fit_channels_takes_a_fixed_byte_cost_and_fits_the_other_terms() -> None:
    """With c_byte fixed at the message split's value, the joint fit recovers every other
    term from runs the model made (the split's runs among them); a shared term cannot be
    fixed per channel."""
    truth = costmodel.ChannelCost(4e-4, 2e-9, 3e-4, 2e-3, per_wake_s=1.5e-4)
    constants = costmodel.Constants(COMPUTE, 1e-3, 1e-8, 2, {"x": truth})
    design = list(fit_grid())
    for net in _split_nets().values():
        for shards in (2, 4):
            prof = costmodel.profile(net, partition(net, shards, method="block"))
            design += [(prof, 16), (prof, 64)]
    runs = [
        (p, b, costmodel.predict(p, batch=b, channel="x", constants=constants)) for p, b in design
    ]
    fitted = costmodel.fit_channels({"x": runs}, base=constants, fixed={"x": {"per_byte_s": 2e-9}})
    np.testing.assert_allclose(
        dataclasses.astuple(fitted["x"]), dataclasses.astuple(truth), rtol=1e-3
    )
    wrong = costmodel.fit_channels({"x": runs}, base=constants, fixed={"x": {"per_byte_s": 4e-9}})
    assert wrong["x"].per_byte_s == 4e-9  # fixed means not fitted
    with pytest.raises(ValueError, match="own terms"):
        costmodel.fit_channels({"x": runs}, base=constants, fixed={"x": {"per_shard_s": 1e-3}})


# -- cost (session 12) ---------------------------------------------------------------------


def _hand_profile() -> costmodel.Profile:
    """Two shards, one layer: shard 1 holds 2**26 weights (0.25 GiB at 4 B), each shard
    receives one message of 2**24 values per sample."""
    zeros = np.zeros((1, 2))
    return costmodel.Profile(
        shards=2, io_values=8, ops=zeros, nnz=np.array([[2.0**25, 2.0**26]]),
        messages=np.array([[1.0, 1.0]]), values=np.array([[2.0**24, 2.0**24]]),
        sync=np.ones((1, 2)), sent=zeros, parts=zeros, tiled=zeros,
    )  # fmt: skip


HAND_PRICES = costmodel.Prices(
    gb_second=1e-5, invocation=1e-7, runtime_gb=0.5, s3_put=5e-6, s3_get=4e-7,
    s3_gb_month=0.023, nats_server_hour=0.036, direct_message=0.0,
)  # fmt: skip


def test_cost_per_inference_matches_the_formula_worked_by_hand() -> None:
    """latency 0.1 s, batch 8. Memory 0.5 + 0.25 = 0.75 GiB per worker; compute 2 workers x
    (0.1 s x 0.75 GiB x 1e-5 + 1e-7) = 1.7e-6. Bytes 8 x 4 x 2**25 = 1 GiB. S3: 2 messages x
    (5e-6 + 4e-7) = 1.08e-5, plus 1 GiB x 0.023 x 0.1 s / 2,592,000 s. NATS: 0.036 x 0.1 /
    3600 = 1e-6. Direct: 0."""
    p = _hand_profile()
    assert costmodel.worker_memory_gb(p, prices=HAND_PRICES) == pytest.approx(0.75)
    expected = {"direct": 0.0, "s3": 1.08e-5 + 0.0023 / 2_592_000, "nats": 1e-6}
    for channel, carried in expected.items():
        c = costmodel.cost(p, batch=8, channel=channel, latency_s=0.1, prices=HAND_PRICES)
        assert c.compute_usd == pytest.approx(1.7e-6, rel=1e-12)
        assert c.channel_usd == pytest.approx(carried, rel=1e-12, abs=1e-18)
        assert c.total_usd == pytest.approx(1.7e-6 + carried, rel=1e-12)


def test_the_picker_chooses_differently_by_cost_than_by_latency() -> None:
    """S3 made faster than direct in the constants, but its PUT and GET prices make each
    inference dearer: by latency S3 comes first, by cost direct."""
    net = radix_net(1024, 12)
    prof = costmodel.profile(net, partition(net, 4, method="hypergraph"))
    constants = costmodel.Constants(
        compute=COMPUTE, per_request_s=1e-3, per_io_value_s=1e-8, cores=2,
        channels={"direct": costmodel.ChannelCost(5e-4, 1e-9, 1e-4, 1e-3),
                  "s3": costmodel.ChannelCost(1e-5, 0.0, 1e-5, 1e-4)},
    )  # fmt: skip
    candidates = [("direct", prof, "direct"), ("s3", prof, "s3")]
    by_latency = costmodel.choose(candidates, batch=64, constants=constants)
    by_cost = costmodel.choose(candidates, batch=64, constants=constants, by="cost")
    assert [name for _, name in by_latency] == ["s3", "direct"]
    assert [name for _, name in by_cost] == ["direct", "s3"]
    direct = costmodel.predicted_cost(prof, batch=64, channel="direct", constants=constants,
                                      prices=costmodel.Prices())  # fmt: skip
    assert by_cost[0][0] == pytest.approx(direct.total_usd)
    # a user's own prices: with free S3 requests S3 is the cheaper too (it is faster)
    free = costmodel.Prices(s3_put=0.0, s3_get=0.0)
    by_own = costmodel.choose(candidates, batch=64, constants=constants, by="cost", prices=free)
    assert [name for _, name in by_own] == ["s3", "direct"]


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.sampled_from(["direct", "nats", "s3"]))
def test_a_longer_request_never_costs_less(a: float, b: float, channel: str) -> None:
    p = _hand_profile()
    short, long = sorted((a, b))
    costs = [costmodel.cost(p, batch=8, channel=channel, latency_s=t, prices=costmodel.Prices())
             for t in (short, long)]  # fmt: skip
    assert costs[0].total_usd <= costs[1].total_usd
    assert costs[0].channel_usd >= 0 and costs[0].compute_usd > 0


def test_cost_refuses_an_unknown_channel_a_bad_latency_and_an_unknown_ranking() -> None:
    p = _hand_profile()
    with pytest.raises(ValueError, match="no prices for channel 'kafka'"):
        costmodel.cost(p, batch=8, channel="kafka", latency_s=0.1, prices=HAND_PRICES)
    with pytest.raises(ValueError, match="latency_s must be >= 0"):
        costmodel.cost(p, batch=8, channel="direct", latency_s=-1.0, prices=HAND_PRICES)
    with pytest.raises(ValueError, match="by must be"):
        costmodel.choose([], batch=8, constants=CONSTANTS, by="price")  # type: ignore[arg-type]


def test_every_default_price_names_its_source() -> None:
    names = {f.name for f in dataclasses.fields(costmodel.Prices)}
    assert set(costmodel.PRICE_SOURCES) == names
