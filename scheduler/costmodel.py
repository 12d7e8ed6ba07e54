"""A cost model for sharded inference: predict latency per (shards, channel, partition), pick one.

Per request (layers run one after another; shards within a layer run side by side, at most
``cores`` of them at once; ``N`` shards):

    latency   = c_request + c_io * batch * (n_in + n_out)          # coordinator: scatter, gather
              + sum_l c_nnz(ws_l) * batch * max(max_p nnz_lp, sum_p nnz_lp / cores)
              + sum_l c_msg[ch] * max(max_p msgs_lp, sum_p msgs_lp / cores)
              + sum_l c_byte[ch] * batch * 4 * max(max_p values_lp, sum_p values_lp / cores)
              + c_shard[ch] * N

``nnz_lp`` is shard p's weights in layer l, ``msgs_lp`` / ``values_lp`` the messages and
activations it receives for layer l (taken from the partition, see :func:`profile`).
``c_nnz(ws)`` is the time of one multiply-add as a function of the shard's working set
``ws_l = n_in_l / N * batch * 4`` bytes (its slice of the activations a sparse product
reads at random): measured at several sizes and interpolated in ``log ws``, clamped at the
ends, so a cache effect (a split layer running faster than linear) can show. The first form
had one constant; on this machine the calibration found 1.2-1.9e-10 s per multiply-add at
64 KiB-1 MiB, with no clear trend (bench/RESULTS.md, "Distributed inference").
Handling a message is CPU work in the shards' processes like the multiply-adds: when shards
outnumber the cores they take turns, so the busiest shard's share is bounded below by the
total over the cores. A layer that reads nothing remote costs no message and no trip between
the shard's event loop and its worker thread (gpu_manager/shards.py runs such layers in one
trip), so there is no per-layer fixed term: a layer's messages carry its synchronisation
cost (``c_msg``).

A calibration run (``bench/fsd.py --calibrate-only``), on other nets than the benchmark's,
measures the constants: per (width, batch), unsharded runs at two depths give the per-layer
time (so ``c_nnz`` at that working set) and the fixed part (so ``c_request`` and ``c_io``);
then each channel's ``c_msg`` / ``c_byte`` / ``c_shard`` from sharded runs (2 and 4 shards,
block and random splits, two batch sizes) minus the predicted compute. :func:`choose` ranks candidate configurations by predicted latency.

Pure: no clocks, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from gpufaas.core.layered import LayeredNet
from gpufaas.scheduler.partition import Partition

__all__ = [
    "ChannelCost",
    "Constants",
    "Profile",
    "channel_features",
    "choose",
    "fit",
    "predict",
    "profile",
    "working_set",
]


@dataclasses.dataclass(frozen=True)
class ChannelCost:
    per_message_s: float
    per_byte_s: float
    per_shard_s: float  # a shard's part of the fan-out and gather, and its layer crossings


@dataclasses.dataclass(frozen=True)
class Constants:
    # (working-set bytes, seconds per multiply-add per sample), by working set
    per_nnz_s: tuple[tuple[float, float], ...]
    per_request_s: float  # fixed cost of a request (coordinator, one HTTP round trip)
    per_io_value_s: float  # one input or output value encoded, sent, decoded
    cores: int
    channels: Mapping[str, ChannelCost]

    def nnz_s(self, working_set: float) -> float:
        """Seconds per multiply-add at ``working_set`` bytes (log-linear, clamped)."""
        points = sorted(self.per_nnz_s)
        sizes = np.log([max(w, 1.0) for w, _ in points])
        return float(np.interp(np.log(max(working_set, 1.0)), sizes, [c for _, c in points]))


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a split does per layer: the busiest shard's work and traffic, and the totals."""

    shards: int
    io_values: int  # n_in + n_out, per sample
    widths: tuple[int, ...]  # each layer's n_in
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
        net.widths[0] + net.widths[-1],
        tuple(net.widths[:-1]),
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
    total = constants.per_request_s + constants.per_io_value_s * batch * p.io_values
    for width, nnz, all_nnz, msgs, all_msgs, values, all_values in zip(
        p.widths, p.max_nnz, p.total_nnz, p.max_messages, p.total_messages, p.max_values,
        p.total_values, strict=True,
    ):  # fmt: skip
        per_nnz = constants.nnz_s(working_set(width, shards=p.shards, batch=batch))
        total += per_nnz * batch * max(nnz, all_nnz / cores)
        total += cost.per_message_s * max(msgs, all_msgs / cores)
        total += cost.per_byte_s * batch * 4 * max(values, all_values / cores)
    return total + cost.per_shard_s * p.shards


def working_set(width: int, *, shards: int, batch: int) -> float:
    """Bytes of a shard's slice of a layer's input activations (what its product reads)."""
    return width / shards * batch * 4


def channel_features(p: Profile, *, batch: int, cores: int) -> list[float]:
    """A channel's terms' multipliers: ``[messages, bytes, shards]`` (``c_msg``, ``c_byte``,
    ``c_shard``), for fitting."""
    msgs = sum(max(m, t / cores) for m, t in zip(p.max_messages, p.total_messages, strict=True))
    values = sum(max(v, t / cores) for v, t in zip(p.max_values, p.total_values, strict=True))
    return [float(msgs), float(batch * 4 * values), float(p.shards)]


def choose(
    candidates: Iterable[tuple[str, Profile, str]], *, batch: int, constants: Constants
) -> list[tuple[float, str]]:
    """``(predicted seconds, name)`` for each ``(name, profile, channel)``, fastest first."""
    ranked = [
        (predict(p, batch=batch, channel=channel, constants=constants), name)
        for name, p, channel in candidates
    ]
    return sorted(ranked)


def fit(
    xs: Sequence[Sequence[float]], ys: Sequence[float], *, relative: bool = False
) -> list[float]:
    """Non-negative least squares by clipping: the constants of a linear model ``y = x . c``.
    ``relative`` minimises the errors relative to ``y`` (what a "within 25%" goal measures)
    instead of the absolute ones, which the slowest runs would dominate."""
    a = np.asarray(xs, dtype=float)
    b = np.asarray(ys, dtype=float)
    if relative:
        scale = 1.0 / np.maximum(np.abs(b), 1e-12)
        a, b = a * scale[:, None], b * scale
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    active = solution > 0
    if not active.all() and active.any():  # refit without the terms that came out negative
        refit, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        solution = np.zeros_like(solution)
        solution[active] = np.maximum(refit, 0)
    return [float(max(v, 0.0)) for v in solution]
