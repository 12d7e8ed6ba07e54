"""The cost model's fifteenth-session form: the served contention's weight, and the fit that
recovers it with the channel terms from runs the model makes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from costmodel_support import COMPUTE, SATURATED
from costmodel_support import profile as _profile
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.core.layered import radix_net
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.partition import partition


@given(weight=st.floats(0.0, 1.0), shards=st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
@settings(max_examples=60, deadline=None)
def test_served_contention_is_the_weighted_share_of_the_saturated_one(
    weight: float, shards: int
) -> None:
    """``1 + w (s - 1)``: none at w = 0, the saturated measurement at w = 1, in between
    otherwise, and 1 for one shard at any weight."""
    base = costmodel.Constants(COMPUTE, 0.0, 0.0, 2, {}, contention=SATURATED)
    at = dataclasses.replace(base, contention_weight=weight)
    s = costmodel.saturated(base, shards)
    assert costmodel.contention(at, shards) == pytest.approx(1 + weight * (s - 1))
    assert costmodel.contention(dataclasses.replace(base, contention_weight=0.0), shards) == 1.0
    # the default weight (the seventeenth session's follow-up): SERVED_CONTENTION, not 1
    assert base.contention_weight == costmodel.SERVED_CONTENTION
    assert costmodel.contention(base, shards) == pytest.approx(
        1 + costmodel.SERVED_CONTENTION * (s - 1)
    )
    if shards == 1:
        assert costmodel.contention(at, shards) == 1.0
    # and it is what a prediction charges: compute alone scales with it (no channel cost)
    free = costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0)
    prof = _profile(shards) if shards in (2, 4, 8) else None
    if prof is not None:
        alone = costmodel.predict(prof, batch=8, channel="x",
                                  constants=dataclasses.replace(at, channels={"x": free},
                                                                contention_weight=0.0))  # fmt: skip
        charged = costmodel.predict(prof, batch=8, channel="x",
                                    constants=dataclasses.replace(at, channels={"x": free}))  # fmt: skip
        assert charged == pytest.approx(alone * costmodel.contention(at, shards))


def _design() -> list[tuple[costmodel.Profile, int]]:
    """Two depths (so a layer's wait is told from a shard's fixed cost), block and random
    splits over 2, 4 and 8 shards, two batch sizes: what a calibration's channel runs are."""
    design = []
    for depth in (4, 8):
        net = radix_net(256, depth)
        for shards, method in ((2, "block"), (2, "random"), (4, "block"), (4, "random"),
                               (8, "block")):  # fmt: skip
            prof = costmodel.profile(net, partition(net, shards, method=method, seed=2))
            design += [(prof, 16), (prof, 64)]
    return design


def test_the_fit_recovers_the_contention_weight_with_every_channel_term() -> None:
    """Runs the model makes, two channels sharing the shard and wake-up terms and a served
    contention of 0.4: one joint fit gives back every channel's terms and the weight; fitted
    with the weight fixed at 1 (the old form), the same runs give other channel terms."""
    fast = costmodel.ChannelCost(1e-4, 1e-9, 2e-4, 1e-3, per_wake_s=1e-4)
    slow = costmodel.ChannelCost(3e-4, 2e-9, 3e-4, 1e-3, per_wake_s=1e-4)
    truth = costmodel.Constants(COMPUTE, 1e-3, 1e-8, 2, {"fast": fast, "slow": slow},
                                contention=SATURATED, contention_weight=0.4)  # fmt: skip
    runs: dict[str, list[tuple[costmodel.Profile, int, float]]] = {"fast": [], "slow": []}
    for prof, batch in _design():
        for name in runs:
            seconds = costmodel.predict(prof, batch=batch, channel=name, constants=truth)
            runs[name].append((prof, batch, seconds))
    start = dataclasses.replace(truth, channels={}, contention_weight=1.0)
    fitted = costmodel.fit_channels_and_contention(runs, base=start)
    assert fitted.contention_weight == pytest.approx(0.4, rel=1e-3)
    for name, cost in (("fast", fast), ("slow", slow)):
        np.testing.assert_allclose(
            dataclasses.astuple(fitted.channels[name]), dataclasses.astuple(cost), rtol=1e-3
        )
    whole = costmodel.fit_channels(runs, base=start)  # the weight held at 1
    assert not np.allclose(dataclasses.astuple(whole["fast"]), dataclasses.astuple(fast),
                           rtol=1e-2)  # fmt: skip


def test_constants_at_another_speed_keep_the_weight() -> None:
    cost = costmodel.ChannelCost(1e-4, 1e-9, 1e-4, 1e-3)
    base = costmodel.Constants(COMPUTE, 1e-3, 1e-8, 2, {"x": cost}, probe_s=1.0,
                               contention=SATURATED, contention_weight=0.3)  # fmt: skip
    slower = costmodel.at_speed(base, 2.0)
    assert slower.contention_weight == 0.3
    assert slower.channels["x"].per_message_s == pytest.approx(2e-4)
