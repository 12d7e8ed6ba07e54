"""The cost model (pure) and the launch tree's shape."""

from __future__ import annotations

import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.core.sharding import ShardLoad
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.coordinator import launch_tree, tree_rounds
from gpufaas.scheduler.partition import communication, partition

CONSTANTS = costmodel.Constants(
    per_nnz_s=((1.0, 1e-9),),
    per_request_s=1e-3,
    per_io_value_s=1e-8,
    cores=2,
    channels={
        "direct": costmodel.ChannelCost(5e-4, 1e-9, 1e-3),
        "s3": costmodel.ChannelCost(3e-2, 1e-8, 5e-3),
    },
)


def test_profile_agrees_with_the_partition_volume() -> None:
    net = radix_net(256, 8)
    part = partition(net, 4, method="block")
    prof = costmodel.profile(net, part)
    volume = communication(net, part)
    assert sum(prof.total_nnz) == sum(layer.nnz for layer in net.layers)
    assert max(prof.max_values) <= max(volume.per_layer)
    assert sum(prof.max_messages) <= volume.messages


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


def test_more_shards_than_cores_do_not_predict_more_parallel_compute() -> None:
    net = radix_net(1024, 6)
    no_comm = costmodel.Constants(
        ((1.0, 1e-9),), 0.0, 0.0, 2, {"x": costmodel.ChannelCost(0, 0, 0)}
    )
    times = {
        n: costmodel.predict(
            costmodel.profile(net, partition(net, n, method="block")), batch=64, channel="x",
            constants=no_comm,
        )
        for n in (1, 2, 4, 8)
    }  # fmt: skip
    assert abs(times[2] - times[1] / 2) < 1e-9
    assert abs(times[8] - times[2]) < 1e-9  # 2 cores: 8 shards compute no faster than 2


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


def test_features_match_predict() -> None:
    """The channel's fitting features and predict() are one model."""
    net = radix_net(1024, 6)
    prof = costmodel.profile(net, partition(net, 4, method="random", seed=1))
    cost = CONSTANTS.channels["direct"]
    none = costmodel.Constants(
        CONSTANTS.per_nnz_s, CONSTANTS.per_request_s, CONSTANTS.per_io_value_s, 2,
        {"none": costmodel.ChannelCost(0.0, 0.0, 0.0)},
    )  # fmt: skip
    compute = costmodel.predict(prof, batch=16, channel="none", constants=none)
    by_features = compute + np.dot(
        costmodel.channel_features(prof, batch=16, cores=2),
        [cost.per_message_s, cost.per_byte_s, cost.per_shard_s],
    )
    predicted = costmodel.predict(prof, batch=16, channel="direct", constants=CONSTANTS)
    assert abs(by_features - predicted) < 1e-12


def test_a_multiply_add_costs_what_its_working_set_costs() -> None:
    """Log-linear between calibrated working sets, clamped beyond them; so splitting a wide
    layer can be faster than linear (each shard's slice fits a faster regime)."""
    constants = costmodel.Constants(
        ((256e3, 1e-10), (1024e3, 2e-10)), 0.0, 0.0, 8, {"x": costmodel.ChannelCost(0, 0, 0)}
    )
    assert constants.nnz_s(256e3) == 1e-10 and constants.nnz_s(1024e3) == 2e-10
    assert abs(constants.nnz_s(512e3) - 1.5e-10) < 1e-15  # halfway in log size
    assert constants.nnz_s(1e3) == 1e-10 and constants.nnz_s(1e9) == 2e-10
    net = radix_net(4096, 2)
    one = costmodel.predict(costmodel.profile(net, partition(net, 1, method="block")),
                            batch=64, channel="x", constants=constants)  # fmt: skip
    four = costmodel.predict(costmodel.profile(net, partition(net, 4, method="block")),
                             batch=64, channel="x", constants=constants)  # fmt: skip
    assert one / four > 4  # 1 MiB -> 256 KiB working sets, on 8 cores


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


def test_messages_beyond_the_cores_take_turns() -> None:
    """Message handling is CPU work: 8 shards on 2 cores handle their messages 4 at a turn."""
    net = radix_net(1024, 6)
    comm_only = costmodel.Constants(
        ((1.0, 0.0),), 0.0, 0.0, 2, {"x": costmodel.ChannelCost(1e-3, 0, 0)}
    )
    for shards in (2, 8):
        prof = costmodel.profile(net, partition(net, shards, method="random", seed=1))
        predicted = costmodel.predict(prof, batch=1, channel="x", constants=comm_only)
        expected = sum(
            max(m, t / 2) for m, t in zip(prof.max_messages, prof.total_messages, strict=True)
        )
        assert abs(predicted - 1e-3 * expected) < 1e-12
        if shards == 8:  # the total over the cores, not the busiest shard alone, binds here
            assert predicted > 1e-3 * sum(prof.max_messages) * 1.5
