"""What the cost model's tests share (tests/fsd/test_costmodel_*.py, test_measured_relay.py):
one compute speed, one saturated contention table, a radix net's profile at N shards, and
the constants of one channel ``"x"`` at the relay form's served weight (0.3)."""

from __future__ import annotations

from gpufaas.core.layered import radix_net
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.partition import partition

COMPUTE = costmodel.Compute(per_op_s=1e-5, per_nnz_s=1e-9)
SATURATED = {2: 1.05, 4: 1.6, 8: 2.9}


def profile(shards: int, method: str = "block", depth: int = 4) -> costmodel.Profile:
    net = radix_net(256, depth)
    return costmodel.profile(net, partition(net, shards, method=method, seed=2))


def constants(
    cost: costmodel.ChannelCost, compute: costmodel.Compute = COMPUTE
) -> costmodel.Constants:
    return costmodel.Constants(compute, 1e-3, 1e-8, 2, {"x": cost}, contention=SATURATED,
                               contention_weight=0.3)  # fmt: skip
