"""A cost model for sharded inference: predict latency per (shards, channel, partition), pick one.

Per request, layer by layer (layers run one after another; shards within a layer run side
by side, at most ``cores`` of them at once):

    turns     = max(1, shards / cores)
    compute_l = c_nnz * batch * max(max_p nnz_lp, sum_p nnz_lp / cores) + c_layer * turns
    comm_l    = c_msg[channel] * max(max_p msgs_lp, sum_p msgs_lp / cores)
              + c_byte[channel] * batch * 4 * max(max_p values_lp, sum_p values_lp / cores)
    latency   = sum_l (compute_l + comm_l) + c_request[channel] * shards

Handling a message (encoding, HTTP or NATS framing, decoding) and a layer's fixed cost are
CPU work in the shards' processes, like the multiply-adds: when shards outnumber the cores
they take turns, so the busiest shard's share is bounded below by the total over the cores.

``nnz_lp`` is shard p's weights in layer l, ``msgs_lp`` / ``values_lp`` the messages and
activations it receives for layer l (taken from the partition, see :func:`profile`). A
calibration run (``bench/fsd.py --calibrate``) measures the constants: ``c_nnz`` and
``c_layer`` from unsharded runs at two depths and two batch sizes, and each channel's
``c_msg`` / ``c_byte`` / ``c_request`` from sharded runs with small and large messages.
:func:`choose` ranks candidate configurations by predicted latency.

Pure: no clocks, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from gpufaas.core.layered import LayeredNet
from gpufaas.scheduler.partition import Partition

__all__ = ["ChannelCost", "Constants", "Profile", "choose", "fit", "predict", "profile"]


@dataclasses.dataclass(frozen=True)
class ChannelCost:
    per_message_s: float
    per_byte_s: float
    per_request_s: float  # scatter + gather, per shard


@dataclasses.dataclass(frozen=True)
class Constants:
    per_nnz_s: float  # one multiply-add of a sparse or dense weight, per sample
    per_layer_s: float  # fixed cost of a layer on a shard (thread hop, allocation)
    cores: int
    channels: Mapping[str, ChannelCost]


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a split does per layer: the busiest shard's work and traffic."""

    shards: int
    max_nnz: tuple[int, ...]
    total_nnz: tuple[int, ...]
    max_messages: tuple[int, ...]
    max_values: tuple[int, ...]
    total_messages: tuple[int, ...]
    total_values: tuple[int, ...]


def profile(net: LayeredNet, part: Partition) -> Profile:
    max_nnz, total_nnz, max_messages, max_values = [], [], [], []
    total_messages, total_values = [], []
    for index, layer in enumerate(net.layers):
        src = part.owners[index][layer.cols]
        dst = part.owners[index + 1][layer.rows]
        nnz = np.bincount(dst, minlength=part.shards)
        crossing = src != dst
        pairs = np.unique(layer.cols[crossing] * part.shards + dst[crossing])
        values = np.bincount(pairs % part.shards, minlength=part.shards)
        links = np.unique(src[crossing] * part.shards + dst[crossing])
        messages = np.bincount(links % part.shards, minlength=part.shards)
        max_nnz.append(int(nnz.max()))
        total_nnz.append(int(nnz.sum()))
        max_messages.append(int(messages.max()))
        max_values.append(int(values.max()))
        total_messages.append(int(messages.sum()))
        total_values.append(int(values.sum()))
    return Profile(
        part.shards,
        tuple(max_nnz),
        tuple(total_nnz),
        tuple(max_messages),
        tuple(max_values),
        tuple(total_messages),
        tuple(total_values),
    )


def predict(p: Profile, *, batch: int, channel: str, constants: Constants) -> float:
    """Predicted seconds per request."""
    cost = constants.channels[channel] if p.shards > 1 else ChannelCost(0.0, 0.0, 0.0)
    cores = constants.cores
    turns = max(1.0, p.shards / cores)  # shards beyond the cores take turns on them
    total = 0.0
    for nnz, all_nnz, msgs, all_msgs, values, all_values in zip(
        p.max_nnz, p.total_nnz, p.max_messages, p.total_messages, p.max_values, p.total_values,
        strict=True,
    ):  # fmt: skip
        total += constants.per_nnz_s * batch * max(nnz, all_nnz / cores)
        total += constants.per_layer_s * turns
        total += cost.per_message_s * max(msgs, all_msgs / cores)
        total += cost.per_byte_s * batch * 4 * max(values, all_values / cores)
    return total + cost.per_request_s * p.shards


def choose(
    candidates: Iterable[tuple[str, Profile, str]], *, batch: int, constants: Constants
) -> list[tuple[float, str]]:
    """``(predicted seconds, name)`` for each ``(name, profile, channel)``, fastest first."""
    ranked = [
        (predict(p, batch=batch, channel=channel, constants=constants), name)
        for name, p, channel in candidates
    ]
    return sorted(ranked)


def fit(xs: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Non-negative least squares by clipping: the constants of a linear model ``y = x . c``."""
    a = np.asarray(xs, dtype=float)
    b = np.asarray(ys, dtype=float)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    active = solution > 0
    if not active.all() and active.any():  # refit without the terms that came out negative
        refit, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        solution = np.zeros_like(solution)
        solution[active] = np.maximum(refit, 0)
    return [float(max(v, 0.0)) for v in solution]
