"""The cost model's seventeenth-session relay terms: the NATS or S3 server's time for what a
shard receives is on that shard's path and on none of the cores, and a fit over runs at 2, 4
and 8 shards on two cores gives it back apart from the channel's own message terms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from costmodel_support import constants as _constants
from costmodel_support import profile as _profile

from gpufaas.scheduler import costmodel

RELAY = {"per_relay_message_s": 4e-4, "per_relay_byte_s": 3e-9}


def test_the_relay_is_on_the_receiving_shards_path_and_on_no_core() -> None:
    """At N = 2 on two cores (each shard has a core, the busiest shard's branch binds) the
    relay adds exactly what it charges the shard for the messages and bytes it receives.
    With more shards than cores and the cores' branch binding, it adds nothing: the server's
    CPU is none of the shards'."""
    plain = costmodel.ChannelCost(1e-4, 1e-9, 2e-4, 1e-3)
    relayed = dataclasses.replace(plain, **RELAY)
    two = _profile(2)
    assert (two.messages[:, 0] == two.messages[:, 1]).all()  # a balanced split: either shard
    assert (two.values[:, 0] == two.values[:, 1]).all()  # is the busiest
    batch = 16
    added = float((RELAY["per_relay_message_s"] * two.messages[:, 0]
                   + RELAY["per_relay_byte_s"] * batch * 4 * two.values[:, 0]).sum())  # fmt: skip
    before = costmodel.predict(two, batch=batch, channel="x", constants=_constants(plain))
    after = costmodel.predict(two, batch=batch, channel="x", constants=_constants(relayed))
    assert after - before == pytest.approx(added, rel=1e-9)
    assert added > 0.05 * before  # not lost in the rounding
    # eight shards whose compute keeps the two cores busy: the relay's time is not theirs
    heavy = costmodel.Compute(per_op_s=1e-3, per_nnz_s=1e-6)
    eight = _profile(8, "random")
    crowded = [costmodel.predict(eight, batch=batch, channel="x",
                                 constants=_constants(cost, heavy)) for cost in (plain, relayed)]  # fmt: skip
    assert crowded[1] == pytest.approx(crowded[0], rel=1e-12)


def _design() -> list[tuple[costmodel.Profile, int]]:
    """A calibration's channel runs: two depths, block and random over 2 and 4 shards and
    block over 8, two batch sizes."""
    return [(_profile(shards, method, depth), batch)
            for depth in (4, 8)
            for shards, method in ((2, "block"), (2, "random"), (4, "block"), (4, "random"),
                                   (8, "block"))
            for batch in (16, 64)]  # fmt: skip


def test_the_fit_gives_back_the_relay_apart_from_the_channels_own_message_terms() -> None:
    """Runs the model makes for a direct channel and a relayed one (shared shard and wake-up
    terms): the fit with the relayed channel named gives back every term, the relay's
    included, and leaves direct's relay at 0. Fitted without the relay terms, the same runs
    give the relayed channel other message terms (its N = 2 and N >= 4 runs disagree)."""
    direct = costmodel.ChannelCost(1e-4, 1e-9, 2e-4, 1e-3, per_wake_s=1e-4)
    relayed = costmodel.ChannelCost(3e-4, 2e-9, 3e-4, 1e-3, per_wake_s=1e-4, **RELAY)
    truth = dataclasses.replace(_constants(direct), channels={"direct": direct, "nats": relayed})
    runs: dict[str, list[tuple[costmodel.Profile, int, float]]] = {"direct": [], "nats": []}
    for prof, batch in _design():
        for name in runs:
            runs[name].append((prof, batch, costmodel.predict(prof, batch=batch, channel=name,
                                                              constants=truth)))  # fmt: skip
    start = dataclasses.replace(truth, channels={})
    fitted = costmodel.fit_channels(runs, base=start, relayed=("nats",))
    for name, cost in (("direct", direct), ("nats", relayed)):
        np.testing.assert_allclose(dataclasses.astuple(fitted[name]), dataclasses.astuple(cost),
                                   rtol=1e-3, atol=1e-15)  # fmt: skip
    # by default (the follow-up's default form) the RELAYED channels' relay terms are fitted
    assert "nats" in costmodel.RELAYED and "direct" not in costmodel.RELAYED
    assert costmodel.fit_channels(runs, base=start) == fitted
    without = costmodel.fit_channels(runs, base=start, relayed=())
    assert without["nats"].per_relay_message_s == without["nats"].per_relay_byte_s == 0.0
    assert not np.allclose(dataclasses.astuple(without["nats"])[:3],
                           dataclasses.astuple(relayed)[:3], rtol=1e-2)  # fmt: skip


def test_constants_at_another_speed_scale_the_relay_too() -> None:
    cost = costmodel.ChannelCost(1e-4, 1e-9, 1e-4, 1e-3, **RELAY)
    base = dataclasses.replace(_constants(cost), probe_s=1.0)
    slower = costmodel.at_speed(base, 2.0)
    assert slower.channels["x"].per_relay_message_s == pytest.approx(8e-4)
    assert slower.channels["x"].per_relay_byte_s == pytest.approx(6e-9)
