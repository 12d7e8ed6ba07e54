"""A cost model for sharded inference: predict latency per (shards, channel, partition), pick one.

Per request, with ``N`` shards sharing ``cores`` cores (layers run one after another; a
layer's shards run side by side, at most ``cores`` of them at once):

    latency = c_request + c_io * batch * (n_in + n_out) + c_shard[ch] * N   # coordinator
            + sum_l max(max_p w_lp, sum_p w_lp / cores)                      # the layers

    w_lp    = contention(N) * (c_op * ops_lp + c_nnz * batch * nnz_lp     # compute
              (CSR's; c_tile for the weights whose products run as dense tiles) + ...)
            + c_msg[ch] * msgs_lp + c_byte[ch] * batch * 4 * values_lp   # messages
            + c_sync[ch] * sync_lp                                       # waits
            + c_wake[ch] * sync_lp * max(0, N - cores) / N               # oversubscription
    relay_lp = r_msg[ch] * msgs_lp + r_byte[ch] * batch * 4 * values_lp  # on the path only
             + r_sync[ch] * sync_lp                                       # (nineteenth s.)

The layers' sum is over ``max(max_p (w_lp + relay_lp), sum_p w_lp / cores)``: the relay is
the channel server's time for the messages shard p receives (seventeenth session; NATS and
S3 only, 0 for direct). The server is a process of its own, so that time is on the shard's
path while its message is relayed, but on none of the shards' cores: it is in the busiest
shard's branch and not in the cores'. Why: the fifteenth session's relay terms were charged
in the cores' branch only, and fitted 0 in every calibration: there they are ``c_msg``'s and
``c_byte``'s own features, and at N = 2 (every N = 2 layer binds on the busiest shard, on a
2-core machine) they were in no branch at all. On the path they differ from ``c_msg`` and
``c_byte`` by where they bind, and the fit can tell them (bench/RESULTS.md, #15, "fsd,
seventeenth session": the grid's N = 2 cells over NATS and S3 were 28-43% low without them).

``r_sync`` (nineteenth session) is a round's delivery latency on the path: from the last
part's send to the waiting shard's worker running again (the sender's event loop, the link,
the receiver's loop waking, the worker thread waking), time in which neither end need be on a
core. It is never fitted: 0 unless given (``fit_channels(fixed=...)``), and
``bench/fsd.py`` measures it for direct on its own (a ping-pong calibration run: the wall
time per exchange round at N = 2 on a net of negligible compute, less the CPU per round of
the busiest shard) before fitting the other terms, so the fit cannot trade it for ``c_sync``.

``contention(N) = 1 + w * (saturated(N) - 1)`` (fifteenth session): ``saturated`` is the
calibration's measurement with every shard running passes back to back; a served shard
runs a layer and then waits, so it pays a share ``w`` of that slow-down
(``Constants.contention_weight``; ``w = 1`` is sessions 9-14's model).

The default form is ``w`` = :data:`SERVED_CONTENTION` (0.3) with the relay terms fitted for
the :data:`RELAYED` channels: chosen post hoc, as the form that scored best over every stored
hold (bench/RESULTS.md, #15, "fsd, seventeenth session", follow-up (f)). Since the nineteenth
session's second hold, a calibration with the ping-pong runs also pins direct's
``per_relay_sync_s`` at their measured delivery latency before the fit (``bench/fsd.py``'s
``measured_relay``; bench/RESULTS.md, #15, "A second hold: the measured form replicated").

``w_lp`` is shard p's work on layer l, all of it CPU on its process except the waits:

* compute (gpu_manager/shards.py): each row group (boundary rows, interior rows) is one
  sparse product over the shard's own activations plus one per shard it reads from, then
  bias, activation and clip in place. ``ops_lp`` = row groups x (1 + sources): each costs a
  fixed dispatch (``c_op``, ~10-30 us in torch on one thread, which is why the same
  multiply-adds cut into more pieces cost more) and ``nnz_lp`` multiply-adds per sample
  (``c_nnz``, which carries the row's bias, activation and clip too: a separate per-row
  constant cannot be fitted on nets with one fan-in, like every RadiX-Net);
* messages: ``msgs_lp`` received and ``values_lp`` values received per sample (the sender's
  and the receiver's CPU of one message, charged once);
* ``sync_lp`` is 1 where the shard reads remote values in layer l: it hands the layer back to
  its event loop, waits for the last part and goes back to its worker (a trip and a wake-up).
* oversubscription: with more shards than cores, a shard waking from a layer's wait finds
  every core taken with chance ``(N - cores) / N`` (the share of shards beyond the cores)
  and pays a further ``c_wake``: the context switch, the cache its working set lost, the
  scheduler's wake-up latency. Nothing while each shard has a core (N <= cores); with
  balanced shards it adds ``c_wake * (N - cores) / cores`` per waiting layer (1 at N = 4, 3 at
  N = 8 on 2 cores), more than ``N / cores`` sharing alone charges.

Served passes (s13 wave 2): the compute constants come from one-thread passes run back to
back in-process, their weights hot; a served pass, one per request between the coordinator's
and the event loop's work, takes longer. Its compute is charged ``served`` times the
in-process one's (``w_lp``'s compute term above is multiplied by it, at every shard count).
``served`` is fitted with ``c_request`` and ``c_io`` on the unsharded calibration runs, at two
depths (:func:`fit_coordinator`): at one depth (earlier runs, all 8 layers) it cannot be
told from ``c_io`` (both grow with width and batch), the two coordinator terms took up the
extra of 8 layers, and a deeper net (the grid's, 24 layers) would be predicted too low at
N = 1. On the fresh quiet calibration of session 13's second wave it came out 1.025: there
was no such excess to take up, and the round scored the same with and without it.

Session 13 tried charging the waits on the busiest shard's path only (a waiting shard holds
no core: ``Constants.waits_on_path=True``); on its fresh grid round it scored worse than the
default (17 against 21 of 25 cells within 25%), so it stays an alternative that the
benchmark scores beside the default.

When shards outnumber the cores they take turns: a layer cannot finish before all the
shards' work over the cores (``sum_p w_lp / cores``), so with balanced shards the layers
take ``max(1, N / cores)`` times the busiest shard's work (``N / cores`` rather than
``ceil``: the operating system interleaves the shards' threads, it does not run them in
rounds). On this 2-core machine that is what bounds N = 4 and 8.

Calibration (``bench/fsd.py --calibrate-only``, on nets that are never the benchmark's):

1. compute: every shard of block and random splits of several nets (N = 1..8, two batch
   sizes) timed on one thread in-process, running the executor's own code; ``c_op`` and
   ``c_nnz`` by a relative least-squares fit over the shards;
2. coordinator: unsharded runs on real managers at two depths; against the compute terms'
   prediction they give ``c_request``, ``c_io`` and ``served``;
3. channels: sharded runs (2 and 4 shards, block and random, and 8 shards block: more
   shards than cores; two depths and batches) per channel, plus the *message split*
   (:func:`message_split`, session 12): two nets alike in weights, products, messages and
   waits, unlike only in the bytes their messages carry (16 values against half the layer
   per message), so the fit can tell ``c_byte`` from ``c_msg`` and ``c_sync``, which the
   RadiX-Net splits alone raise together; what compute and coordinator leave gives
   ``c_msg``, ``c_byte``, ``c_sync``, ``c_wake``, ``c_shard``. The max over the branches makes this not linear in the constants, so
   :func:`fit_channels` fixes each layer's binding branch, fits, and repeats. All channels
   are fitted at once: ``c_shard`` (the coordinator's call to a shard) and ``c_wake`` (a
   shard's wake-up on a busy core) are the same code whatever the channel and take one
   value for all (:data:`SHARED_TERMS`); the others are each channel's own.

Speed: every constant is CPU time on the machine that ran the calibration, at its speed
then. A shared host's speed drifts (a cache- or core-sharing neighbour; bench/RESULTS.md,
session 5: thread CPU time 1.6x slower in one hold than in another), so the constants carry
``probe_s``, the seconds a fixed reference workload (the *speed probe*: one shard pass of a
fixed net through the executor's code, in thread CPU time) took during their calibration,
every calibration run having been scaled to that speed by its own probe. :func:`at_speed`
rescales all of them to the speed a later probe reads; the model then predicts at that
speed. The probe never uses the measurement it corrects.

:func:`choose` ranks candidate configurations by predicted latency (the default), all at one
speed (a probe read beside one candidate must not move it alone), or by predicted cost.

Cost (session 12), in US dollars per inference (one request of ``batch`` samples), from the
named prices of :class:`Prices` (their sources and dates in :data:`PRICE_SOURCES`), as if each
shard ran as a serverless function (FSD-Inference's setting) for the whole request:

    compute = N * (latency * memory_gb * gb_second + invocation)
    memory_gb = runtime_gb + max_p (weights of shard p) * 4 B / 2**30   (one size for all N)
    channel = direct: messages * direct_message                      (0 by default)
              s3:     messages * (s3_put + s3_get)                   (one PUT, one GET each)
                      + bytes / 2**30 * s3_gb_month * latency / SECONDS_PER_MONTH
              nats:   nats_server_hour * latency / 3600              (a self-hosted server)

``messages`` and ``bytes`` (``batch * 4 * values``) are the request's, summed over layers and
shards. The objects are charged as stored for the whole request, and the NATS server as held
by the request alone: upper bounds where requests overlap. :func:`cost` takes the latency as
given (a measured one), :func:`predicted_cost` the model's. Pure: no clocks, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from gpufaas.core.layered import (
    MAX_TILES_PER_ROW,
    TILE,
    LayeredNet,
    radix_net,
    tiles_per_row,
    tiles_whole,
)
from gpufaas.scheduler.partition import Partition

__all__ = [
    "PRICE_SOURCES",
    "RELAYED",
    "SERVED_CONTENTION",
    "ChannelCost",
    "Compute",
    "Constants",
    "Cost",
    "Prices",
    "Profile",
    "at_speed",
    "byte_cost",
    "choose",
    "compute_features",
    "contention",
    "cost",
    "fit",
    "fit_channel",
    "fit_channels",
    "fit_channels_and_contention",
    "fit_coordinator",
    "message_split",
    "predict",
    "predicted_cost",
    "profile",
    "saturated",
    "throughput",
    "worker_memory_gb",
]

Matrix = npt.NDArray[np.float64]  # (layers, shards)


@dataclasses.dataclass(frozen=True)
class ChannelCost:
    per_message_s: float  # CPU to send and receive one message (both ends)
    per_byte_s: float  # CPU per byte carried (copies, encode, decode, socket)
    per_sync_s: float  # a layer that waits for remote values: the trip and wake-up
    per_shard_s: float  # the coordinator's call to a shard and the shard's fixed part
    # oversubscription: a wait's wake-up that finds every core taken (context switch, cache)
    per_wake_s: float = 0.0
    # seventeenth session: the channel server's time for a message and a byte the shard
    # receives (NATS, SeaweedFS: a process of its own), on the shard's path while the message
    # is relayed, and on no shard's core (so not in the cores' branch). 0 for direct
    per_relay_message_s: float = 0.0
    per_relay_byte_s: float = 0.0
    # nineteenth session: a round's delivery latency on the waiting shard's path (on no
    # core), per layer that waits; measured on its own, never fitted (0 unless given)
    per_relay_sync_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Compute:
    per_op_s: float  # one sparse product (dispatch, setup), with its row group's bias etc.
    per_nnz_s: float  # one multiply-add of one sample, with its share of the row's bias etc.
    # one value of one sample handed over or taken in by the shard's worker (the hand-over's
    # gather and copy to the host, the remote part's product added in): split shards only
    per_value_s: float = 0.0
    # one output value of one sample per remote part added in (a product's temporary, the add)
    per_part_s: float = 0.0
    # one multiply-add of one sample in a dense-tile product (core/layered.py: TiledMatrix,
    # where the split keeps the 16 x 16 blocks whole; per_nnz_s is CSR's): session 9
    per_tile_nnz_s: float = 0.0


# A served contention's weight (Constants.contention_weight) chosen on the fourteenth
# session's two grid holds (training data; bench/RESULTS.md, "fsd, fifteenth session" (b)).
# A calibration's own runs cannot tell it (their 2,048-wide nets barely contend: 0-0.18).
SERVED_CONTENTION = 0.3
# The channels with a server of their own (NATS, SeaweedFS), whose relay terms
# (ChannelCost.per_relay_*) fit_channels fits by default; direct's are 0.
RELAYED = ("nats", "s3")
# The default form (the seventeenth session's follow-up): w = SERVED_CONTENTION with the
# relay terms fitted for RELAYED. Chosen POST HOC, as the form that scored best over every
# stored 25-cell hold since the fourteenth session: 259 of 275 cells within 25%, against 250
# for w = 0.3 without the relay and 234 for w = 1, sessions 9-14's model and the default
# until then (bench/RESULTS.md #15, "fsd, seventeenth session", follow-up (f)).


@dataclasses.dataclass(frozen=True)
class Constants:
    compute: Compute
    per_request_s: float  # the coordinator's fixed cost of a request
    per_io_value_s: float  # one input or output value encoded, sent, decoded
    cores: int
    channels: dict[str, ChannelCost]
    # the speed probe's seconds when these constants were measured (None: not probed)
    probe_s: float | None = None
    # shards -> how much slower their products run when that many shards share the cores
    # at once than alone, beyond sharing them out (wall x cores / the sum of their times
    # alone): memory bandwidth the cores share, and with more shards than cores the
    # switches between them and the caches each loses (:func:`contention`)
    contention: dict[int, float] = dataclasses.field(default_factory=dict)
    # session 13's alternative: the waits (``c_sync``, ``c_wake``) as time on the shard's
    # critical path, not CPU the cores share (in the busiest shard's branch of a layer, not
    # in ``sum_p / cores``). Off by default: on the fresh grid round it scored 17 of 25 cells
    # within 25% against 21 for the default, every term in both branches (bench/RESULTS.md,
    # "fsd, thirteenth session"); bench/fsd.py scores it beside the default
    waits_on_path: bool = False
    # a served shard pass's compute over the in-process calibration's (s13 wave 2): every
    # shard's compute is charged ``served`` times what the one-thread, back-to-back passes of
    # the compute calibration took (:func:`fit_coordinator`; 1 where it could not be told)
    served: float = 1.0
    # fifteenth session: how much of the calibration's saturated contention a served pass
    # pays (:func:`contention`: ``1 + contention_weight * (measured - 1)``). 1 charges it
    # whole (sessions 9-14, and the default until the seventeenth session's follow-up)
    contention_weight: float = SERVED_CONTENTION


def at_speed(constants: Constants, probe_s: float) -> Constants:
    """``constants`` at the speed where the probe takes ``probe_s``: every time constant
    scaled by ``probe_s / constants.probe_s`` (all of them are CPU time on this machine, so
    a slower core slows them alike). Unprobed constants are returned as they are."""
    if constants.probe_s is None or constants.probe_s <= 0 or probe_s <= 0:
        return constants
    ratio = probe_s / constants.probe_s

    def scaled(cost: ChannelCost) -> ChannelCost:
        return ChannelCost(*(ratio * v for v in dataclasses.astuple(cost)))

    return Constants(
        compute=Compute(*(ratio * v for v in dataclasses.astuple(constants.compute))),
        per_request_s=ratio * constants.per_request_s,
        per_io_value_s=ratio * constants.per_io_value_s,
        cores=constants.cores,
        channels={name: scaled(cost) for name, cost in constants.channels.items()},
        probe_s=probe_s,
        contention=constants.contention,  # a ratio of times: the same at any speed
        waits_on_path=constants.waits_on_path,
        served=constants.served,  # a ratio of times: the same at any speed
        contention_weight=constants.contention_weight,  # a ratio too
    )


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a split does, per layer and shard: its work and the traffic it receives."""

    shards: int
    io_values: int  # n_in + n_out, per sample
    ops: Matrix  # sparse products (row groups x (1 + sources))
    nnz: Matrix  # weights (multiply-adds per sample)
    messages: Matrix  # messages received
    values: Matrix  # values received per sample
    sync: Matrix  # 1 where the shard reads remote values
    sent: Matrix  # values sent per sample (for layer l's receivers)
    parts: Matrix  # output rows x remote parts added into them (rows x sources)
    tiled: Matrix  # of nnz, the weights whose products run as dense tiles (TiledMatrix)


def profile(net: LayeredNet, part: Partition) -> Profile:
    n = part.shards
    layers = len(net.layers)
    ops, nnz, messages, values, sync, sent, parts = (np.zeros((layers, n)) for _ in range(7))
    boundary: list[npt.NDArray[np.int64]] = []  # per layer: each shard's values others read
    for index, layer in enumerate(net.layers):
        src = part.owners[index][layer.cols]
        dst = part.owners[index + 1][layer.rows]
        crossing = src != dst
        pairs = np.unique(layer.cols[crossing] * n + dst[crossing])
        links = np.unique(src[crossing] * n + dst[crossing])
        nnz[index] = np.bincount(dst, minlength=n)
        values[index] = np.bincount(pairs % n, minlength=n)
        sent[index] = np.bincount(part.owners[index][pairs // n], minlength=n)
        messages[index] = np.bincount(links % n, minlength=n)
        sync[index] = messages[index] > 0
        read = np.unique(layer.cols[crossing])  # a_{l-1} values some other shard reads
        boundary.append(np.bincount(part.owners[index][read], minlength=n))
    for index in range(layers):
        # Row groups (gpu_manager/shards.prepare): the boundary rows (the next layer's other
        # shards read them; the last layer has none) and the interior rows, where not empty.
        owned = np.bincount(part.owners[index + 1], minlength=n)
        read_next = boundary[index + 1] if index + 1 < layers else np.zeros(n, dtype=np.int64)
        groups = (read_next > 0).astype(float) + (owned - read_next > 0)
        ops[index] = groups * (1 + messages[index])
        parts[index] = owned * messages[index]
    tiled = np.zeros((layers, n))
    for index, layer in enumerate(net.layers):
        # products run as tiles where both sides' partitions keep the tiles whole and a
        # tile row reads few tiles (gpu_manager/shards.prepare through product_matrix)
        few = 0 < tiles_per_row(layer) <= MAX_TILES_PER_ROW
        if few and tiles_whole(part.owners[index]) and tiles_whole(part.owners[index + 1]):
            tiled[index] = nnz[index]
    return Profile(
        n, net.widths[0] + net.widths[-1], ops, nnz, messages, values, sync, sent, parts, tiled
    )


def message_split(neurons: int, depth: int) -> dict[str, LayeredNet]:
    """The calibration's message split: two nets of ``depth`` RadiX-Net layers of ``neurons``
    each, every layer with one stride. Split into 2 or 4 contiguous blocks, each shard of
    either net receives one message per layer and runs the same products on the same
    weights; only the messages' size differs: ``small`` (stride 1) carries the 16 values of
    one super-neuron, ``large`` (stride half the super-neurons) every value the shard owns.
    Their difference is bytes alone, which the fit needs to tell ``c_byte`` from ``c_msg`` and
    ``c_sync``: in the RadiX-Net splits more bytes come with more messages and waits."""
    half = neurons // TILE // 2
    return {
        "small": radix_net(neurons, depth, stride=1),
        "large": radix_net(neurons, depth, stride=half),
    }


def compute_features(p: Profile, *, batch: int) -> npt.NDArray[np.float64]:
    """Per layer and shard, the multipliers of the :class:`Compute` terms in their order
    (``c_op``, ``c_nnz`` for CSR, ``c_value``, ``c_part``, ``c_nnz`` for tiles): shape
    (layers, shards, 5)."""
    return np.stack(
        [
            p.ops,
            batch * (p.nnz - p.tiled),
            batch * (p.sent + p.values),
            batch * p.parts,
            batch * p.tiled,
        ],
        axis=-1,
    )


def saturated(constants: Constants, shards: int) -> float:
    """How much slower ``shards`` shards' products run sharing the cores at once than alone,
    beyond sharing them out, when every shard runs passes back to back: the calibration's
    measurement at that many shards (bench/fsd.py: ``concurrent_products``), linear between
    the counts it measured, the last one's beyond them, 1 for one shard or where nothing was
    measured."""
    if shards <= 1 or not constants.contention:
        return 1.0
    points = sorted({1: 1.0, **constants.contention}.items())
    counts = [float(n) for n, _ in points]
    return float(np.interp(float(shards), counts, [f for _, f in points]))


def contention(constants: Constants, shards: int) -> float:
    """The factor a served pass's compute is charged at ``shards`` shards: ``1 + w * (s -
    1)``, ``s`` the saturated measurement (:func:`saturated`), ``w`` the constants'
    ``contention_weight``. A served shard runs a layer and then waits for its parts, so its
    neighbours are not always runnable at once as in the saturated measurement; ``w`` is how
    much of that slow-down the served runs show (1: all of it, as sessions 9-14 charged)."""
    return 1.0 + constants.contention_weight * (saturated(constants, shards) - 1.0)


def busy(shards: int, cores: int) -> float:
    """The chance that a shard waking from a wait finds every core taken: the share of the
    shards beyond the cores, ``max(0, N - cores) / N`` (0 while each shard has a core)."""
    return max(0, shards - cores) / shards


def channel_features(p: Profile, *, batch: int, cores: int) -> npt.NDArray[np.float64]:
    """Per layer and shard, the multipliers of ``c_msg``, ``c_byte``, ``c_sync``, ``c_wake``,
    ``r_msg``, ``r_byte`` (the relay's: the messages and bytes the shard receives again) and
    ``r_sync`` (the waits again)."""
    wake = p.sync * busy(p.shards, cores)
    received = batch * 4 * p.values
    return np.stack([p.messages, received, p.sync, wake, p.messages, received, p.sync], axis=-1)


# Which of channel_features' terms are waits (time on the path, not CPU): c_sync, c_wake, and
# the relay's (always on the path: the server's CPU is no shard's; a delivery's latency).
_WAITS = np.array([False, False, True, True, True, True, True])
_RELAY = np.array([False, False, False, False, True, True, True])


def _work(p: Profile, batch: int, constants: Constants, channel: ChannelCost) -> Matrix:
    """Per layer and shard, everything a shard spends on the layer: CPU and waits."""
    cpu, waits = _split_work(p, batch, constants, channel)
    return cpu + waits


def _split_work(
    p: Profile, batch: int, constants: Constants, channel: ChannelCost
) -> tuple[Matrix, Matrix]:
    """Per layer and shard, the CPU the shard's process spends (which the cores share out)
    and the waits on its path (which take no core: while one shard waits, another runs)."""
    c = constants.compute
    comm = np.array([channel.per_message_s, channel.per_byte_s, channel.per_sync_s,
                     channel.per_wake_s, channel.per_relay_message_s,
                     channel.per_relay_byte_s, channel.per_relay_sync_s])  # fmt: skip
    cpu: Matrix = compute_features(p, batch=batch) @ np.array(dataclasses.astuple(c))
    cpu = cpu * contention(constants, p.shards) * constants.served
    waits: Matrix = np.zeros_like(cpu)
    if p.shards > 1:
        features = channel_features(p, batch=batch, cores=constants.cores)
        on_path = _WAITS if constants.waits_on_path else _RELAY
        cpu = cpu + features @ np.where(on_path, 0.0, comm)
        waits = features @ np.where(on_path, comm, 0.0)
    return cpu, waits


def _layers(cpu: Matrix, waits: Matrix, cores: int) -> float:
    """Each layer ends when its busiest shard's CPU and waits are done, and not before all
    the shards' CPU has had the cores (``sum_p cpu / cores``)."""
    return float(np.maximum((cpu + waits).max(axis=1), cpu.sum(axis=1) / cores).sum())


def predict(p: Profile, *, batch: int, channel: str, constants: Constants) -> float:
    """Predicted seconds per request."""
    cost = constants.channels[channel] if p.shards > 1 else ChannelCost(0.0, 0.0, 0.0, 0.0, 0.0)
    fixed = constants.per_request_s + constants.per_io_value_s * batch * p.io_values
    fixed += cost.per_shard_s * p.shards if p.shards > 1 else 0.0
    return fixed + _layers(*_split_work(p, batch, constants, cost), constants.cores)


def throughput(
    p: Profile, *, batch: int, concurrency: int, channel: str, constants: Constants
) -> float:
    """Predicted requests per second for a closed loop of ``concurrency`` requests of
    ``batch`` samples, which the coordinator runs as shared passes (scheduler/passes.py): one
    pass in flight per set, each of ``concurrency x batch`` samples, so every per-request
    cost is paid once per pass and the per-sample ones as before."""
    return concurrency / predict(p, batch=batch * concurrency, channel=channel, constants=constants)


GIB = 2**30
SECONDS_PER_MONTH = 30 * 24 * 3600  # a storage price's month: 30 days
WEIGHT_BYTES = 4  # a weight's bytes (float32), as LayeredNet.weight_bytes counts them


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prices:
    """Named prices in US dollars (defaults: :data:`PRICE_SOURCES`), and a worker's memory
    beyond its weights. Pass your own: ``Prices(gb_second=..., nats_server_hour=...)``."""

    gb_second: float = 0.0000166667  # a serverless worker's duration, per GB-second
    invocation: float = 0.20 / 1e6  # a serverless worker's request
    runtime_gb: float = 0.5  # a worker's memory besides its weights (Python, torch, buffers)
    s3_put: float = 0.005 / 1000  # one PUT
    s3_get: float = 0.0004 / 1000  # one GET
    s3_gb_month: float = 0.023  # storage, per GB-month
    nats_server_hour: float = 0.0416  # one self-hosted nats-server's machine, per hour
    direct_message: float = 0.0  # node to node: no per-message charge


# Where each default price comes from, and when it was read (list prices, AWS US East (N.
# Virginia), x86, on demand, no free tier). Read from stored copies of the pages on
# 2026-12-06, not from the live pages: check them before relying on the figures.
PRICE_SOURCES: dict[str, str] = {
    "gb_second": "AWS Lambda duration, https://aws.amazon.com/lambda/pricing/ (2026-12-06)",
    "invocation": "AWS Lambda requests, $0.20 per 1M, https://aws.amazon.com/lambda/pricing/ "
    "(2026-12-06)",
    "runtime_gb": "not a price: a worker's memory besides its weights, an assumption",
    "s3_put": "Amazon S3 Standard PUT, $0.005 per 1,000, https://aws.amazon.com/s3/pricing/ "
    "(2026-12-06)",
    "s3_get": "Amazon S3 Standard GET, $0.0004 per 1,000, https://aws.amazon.com/s3/pricing/ "
    "(2026-12-06)",
    "s3_gb_month": "Amazon S3 Standard storage, first 50 TB, https://aws.amazon.com/s3/pricing/ "
    "(2026-12-06)",
    "nats_server_hour": "Amazon EC2 t3.medium on demand (2 vCPU, 4 GiB) for nats-server, "
    "https://aws.amazon.com/ec2/pricing/on-demand/ (2026-12-06)",
    "direct_message": "none: node-to-node HTTP inside one cluster",
}


@dataclasses.dataclass(frozen=True)
class Cost:
    """US dollars per inference (one request of ``batch`` samples)."""

    compute_usd: float  # the workers' GB-seconds and invocations
    channel_usd: float  # messages, objects stored, the NATS server's time

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.channel_usd


def worker_memory_gb(p: Profile, *, prices: Prices) -> float:
    """One worker's memory in GiB: the runtime's plus the largest shard's weights (every
    shard's function takes one size)."""
    return prices.runtime_gb + float(p.nnz.sum(axis=0).max()) * WEIGHT_BYTES / GIB


def cost(p: Profile, *, batch: int, channel: str, latency_s: float, prices: Prices) -> Cost:
    """What one request of ``batch`` samples costs when it takes ``latency_s`` (the formula
    in the module's docstring)."""
    if latency_s < 0 or batch < 1:
        raise ValueError(f"latency_s must be >= 0 and batch >= 1, not {latency_s}, {batch}")
    memory = worker_memory_gb(p, prices=prices)
    compute = p.shards * (latency_s * memory * prices.gb_second + prices.invocation)
    messages = float(p.messages.sum())
    stored_gb = batch * 4 * float(p.values.sum()) / GIB
    if channel == "direct":
        carried = messages * prices.direct_message
    elif channel == "s3":
        carried = messages * (prices.s3_put + prices.s3_get)
        carried += stored_gb * prices.s3_gb_month * latency_s / SECONDS_PER_MONTH
    elif channel == "nats":
        carried = prices.nats_server_hour * latency_s / 3600
    else:
        raise ValueError(f"no prices for channel {channel!r} (direct, nats or s3)")
    return Cost(compute, carried)


def predicted_cost(
    p: Profile, *, batch: int, channel: str, constants: Constants, prices: Prices
) -> Cost:
    """:func:`cost` at the model's predicted latency."""
    latency = predict(p, batch=batch, channel=channel, constants=constants)
    return cost(p, batch=batch, channel=channel, latency_s=latency, prices=prices)


def choose(
    candidates: Iterable[tuple[str, Profile, str]],
    *,
    batch: int,
    constants: Constants,
    by: Literal["latency", "cost"] = "latency",
    prices: Prices | None = None,
) -> list[tuple[float, str]]:
    """``(key, name)`` for each ``(name, profile, channel)``, best first: by predicted
    seconds (``by="latency"``) or by predicted dollars per inference (``by="cost"``, at
    ``prices``, :class:`Prices`' defaults if none)."""
    if by not in ("latency", "cost"):
        raise ValueError(f"by must be 'latency' or 'cost', not {by!r}")
    at = prices or Prices()
    ranked = []
    for name, p, channel in candidates:
        if by == "latency":
            key = predict(p, batch=batch, channel=channel, constants=constants)
        else:
            key = predicted_cost(p, batch=batch, channel=channel, constants=constants,
                                 prices=at).total_usd  # fmt: skip
        ranked.append((key, name))
    return sorted(ranked)


def fit(
    xs: Sequence[Sequence[float]],
    ys: Sequence[float],
    *,
    relative: bool = False,
    relative_to: Sequence[float] | None = None,
) -> list[float]:
    """Non-negative least squares by clipping: the constants of a linear model ``y = x . c``.
    ``relative`` minimises the errors relative to ``y`` (what a "within 25%" goal measures)
    instead of the absolute ones, which the slowest runs would dominate; ``relative_to``
    relative to other magnitudes (a run's whole latency, when ``y`` is a part of it)."""
    a = np.asarray(xs, dtype=float)
    b = np.asarray(ys, dtype=float)
    if relative or relative_to is not None:
        scale = 1.0 / np.maximum(np.abs(b if relative_to is None else np.asarray(relative_to)),
                                 1e-12)  # fmt: skip
        a, b = a * scale[:, None], b * scale
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    active = solution > 0
    if not active.all() and active.any():  # refit without the terms that came out negative
        refit, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        solution = np.zeros_like(solution)
        solution[active] = np.maximum(refit, 0)
    return [float(max(v, 0.0)) for v in solution]


def fit_coordinator(
    runs: Sequence[tuple[Profile, int, float]], *, base: Constants, served: bool = True
) -> Constants:
    """``base`` with the coordinator's constants (``c_request``, ``c_io``) and ``served``
    fitted on unsharded runs ``(profile, batch, measured seconds)``, given ``base``'s compute
    constants: each run is ``c_request + c_io * batch * io_values + served * layers``, where
    ``layers`` is what the compute calibration's passes (one thread, back to back, their
    weights hot) predict. ``served`` can be told from ``c_io`` only where the runs differ in
    depth (both grow with width and batch; only ``layers`` grows with depth): with one depth,
    or with ``served=False``, it stays 1 and the two coordinator terms take up what differs
    (earlier runs, whose depth-8 runs put a served pass's extra per layer into ``c_io``)."""
    unit = dataclasses.replace(base, per_request_s=0.0, per_io_value_s=0.0, served=1.0)
    xs, ys = [], []
    for p, batch, measured in runs:
        if p.shards != 1:
            raise ValueError(f"the coordinator's runs are unsharded, not {p.shards} shards")
        layers = predict(p, batch=batch, channel="none", constants=unit)
        xs.append([1.0, float(batch * p.io_values), layers])
        ys.append(measured)
    depths = {p.ops.shape[0] for p, _, _ in runs}
    if served and len(depths) > 1:
        per_request, per_io, factor = fit(xs, ys, relative=True)
        if factor > 0:
            return dataclasses.replace(base, per_request_s=per_request, per_io_value_s=per_io,
                                       served=factor)  # fmt: skip
    left = [y - x[2] for x, y in zip(xs, ys, strict=True)]
    per_request, per_io = fit([x[:2] for x in xs], left, relative_to=ys)
    return dataclasses.replace(base, per_request_s=per_request, per_io_value_s=per_io, served=1.0)


# The terms of a channel's cost in the order of ``channel_features`` and then the shard count.
_TERMS = (
    "per_message_s",
    "per_byte_s",
    "per_sync_s",
    "per_wake_s",
    "per_relay_message_s",
    "per_relay_byte_s",
    "per_relay_sync_s",
    "per_shard_s",
)
# Terms that are the same code whatever the channel (session 8): the coordinator's call to a
# shard (per_shard_s) and a shard's wake-up on a busy core (per_wake_s). Fitted per channel,
# runs where waits and messages rise together let noise move cost between them and the
# channel's own terms, and two channels came out in the wrong order (bench/RESULTS.md, #15).
SHARED_TERMS = ("per_shard_s", "per_wake_s")
_RELAY_TERMS = ("per_relay_message_s", "per_relay_byte_s")
# never fitted: a channel's is 0 unless ``fixed`` gives it (measured on its own)
_MEASURED_ONLY = ("per_relay_sync_s",)
# The served contention's weight as a column of the channels' fit (fit_channels_and_contention)
_WEIGHT = "contention_weight"


def fit_channel(
    runs: Sequence[tuple[Profile, int, float]], *, base: Constants, rounds: int = 8
) -> ChannelCost:
    """A channel's constants from sharded runs ``(profile, batch, measured seconds)``, given
    the compute and coordinator constants of ``base`` (:func:`fit_channels` of one channel,
    every term its own)."""
    return fit_channels({"one": runs}, base=base, shared=(), rounds=rounds)["one"]


def fit_channels(
    runs: Mapping[str, Sequence[tuple[Profile, int, float]]],
    *,
    base: Constants,
    shared: Sequence[str] = SHARED_TERMS,
    rounds: int = 8,
    fixed: Mapping[str, Mapping[str, float]] | None = None,
    relayed: Sequence[str] = RELAYED,
) -> dict[str, ChannelCost]:
    """Every channel's constants from its sharded runs ``(profile, batch, measured
    seconds)``, given the compute and coordinator constants of ``base``, in one fit: the
    ``shared`` terms take one value for all channels (each channel's runs tell it), the
    others one per channel. Each layer's latency is the larger of two sums (the busiest
    shard, or all shards over the cores); with the branches fixed the model is linear, so
    fit, re-pick each layer's branch with the new constants, and repeat. ``fixed`` gives a
    channel's terms known beforehand (``{"direct": {"per_byte_s": ...}}``: the message
    split's :func:`byte_cost`); they are taken off the runs and not fitted. The relay terms
    (``per_relay_message_s``, ``per_relay_byte_s``: the server's time on the path) are fitted
    for the ``relayed`` channels only, and 0 for the others; ``per_relay_sync_s`` is never
    fitted (0 unless ``fixed`` gives it: a measured delivery latency per round)."""
    costs, _ = _fit_channels(runs, base=base, shared=shared, rounds=rounds, fixed=fixed,
                             fit_contention=False, relayed=relayed)  # fmt: skip
    return costs


def fit_channels_and_contention(
    runs: Mapping[str, Sequence[tuple[Profile, int, float]]],
    *,
    base: Constants,
    shared: Sequence[str] = SHARED_TERMS,
    rounds: int = 8,
    fixed: Mapping[str, Mapping[str, float]] | None = None,
    relayed: Sequence[str] = RELAYED,
) -> Constants:
    """``base`` with every channel's constants and the served contention's weight
    (``Constants.contention_weight``) fitted together on the sharded runs (fifteenth
    session): with the layers' branches fixed, a run's compute is linear in the weight
    (``compute alone + w * compute alone * (saturated - 1)``), so it is one more column of
    :func:`fit_channels`' fit, shared by every channel (the same products whatever carries
    the messages). Never negative; ``base``'s own weight is ignored. On the calibrations'
    2,048-wide nets it comes out 0-0.18, under what the grid's nets show (bench/fsd.py
    scores it beside as ``costmodel_fitted_weight``)."""
    costs, weight = _fit_channels(runs, base=base, shared=shared, rounds=rounds, fixed=fixed,
                                  fit_contention=True, relayed=relayed)  # fmt: skip
    return dataclasses.replace(base, channels=costs, contention_weight=weight)


def _fit_channels(
    runs: Mapping[str, Sequence[tuple[Profile, int, float]]],
    *,
    base: Constants,
    shared: Sequence[str],
    rounds: int,
    fixed: Mapping[str, Mapping[str, float]] | None,
    fit_contention: bool,
    relayed: Sequence[str] = (),
) -> tuple[dict[str, ChannelCost], float]:
    known = fixed or {}
    if any(t in shared or t not in _TERMS for terms in known.values() for t in terms):
        raise ValueError(f"only a channel's own terms can be fixed, not {dict(known)}")
    names = sorted(runs)
    # a channel with no server of its own relays nothing: its relay terms are 0, not fitted
    known = {name: {**{t: 0.0 for t in _RELAY_TERMS if name not in relayed},
                    **dict.fromkeys(_MEASURED_ONLY, 0.0),
                    **known.get(name, {})} for name in {*names, *known}}  # fmt: skip
    own = [t for t in _TERMS if t not in shared]
    columns = [(name, t) for name in names for t in own if t not in known.get(name, {})]
    columns += [("*", t) for t in shared]
    if fit_contention:
        columns.append(("*", _WEIGHT))
    costs = {name: ChannelCost(**{t: known.get(name, {}).get(t, 0.0) for t in _TERMS})
             for name in names}  # fmt: skip
    weight = 1.0 if fit_contention else base.contention_weight
    for _ in range(rounds):
        xs, ys, totals = [], [], []
        at = dataclasses.replace(base, contention_weight=weight)
        for name in names:
            for p, batch, measured in runs[name]:
                terms, y = _channel_row(p, batch, measured, at, costs[name],
                                        split_contention=fit_contention)  # fmt: skip
                y -= sum(v * terms[t] for t, v in known.get(name, {}).items())
                xs.append([terms[t] if c in (name, "*") else 0.0 for c, t in columns])
                ys.append(y)
                totals.append(measured)
        solution = fit(xs, ys, relative_to=totals)
        value = dict(zip(columns, solution, strict=True))
        value.update({(name, t): v for name, terms in known.items() for t, v in terms.items()})
        costs = {
            name: ChannelCost(**{t: value[(name, t) if t in own else ("*", t)] for t in _TERMS})
            for name in names
        }
        if fit_contention:
            weight = value[("*", _WEIGHT)]
    return costs, weight


def byte_cost(
    small: tuple[Profile, int, float], large: tuple[Profile, int, float], *, base: Constants
) -> float:
    """A channel's ``c_byte`` from the message split's pair of runs ``(profile, batch,
    measured seconds)`` (:func:`message_split`, the same shard count and batch): their
    messages, waits and shards are the same, so every other channel term cancels in the
    difference; what is left after the model's compute difference (the small net's extra
    row group per layer) is bytes. The model is linear in ``c_byte`` while each layer's
    binding branch stays put (it does: the split's shards are alike), so two predictions
    give the slope. Never negative."""
    (p_small, b_small, t_small), (p_large, b_large, t_large) = small, large

    def gap(per_byte_s: float) -> float:
        constants = dataclasses.replace(
            base, channels={"x": ChannelCost(0.0, per_byte_s, 0.0, 0.0, 0.0)}
        )
        return predict(p_large, batch=b_large, channel="x", constants=constants) - predict(
            p_small, batch=b_small, channel="x", constants=constants
        )

    unit = 1e-9
    slope = (gap(unit) - gap(0.0)) / unit
    if slope <= 0:
        raise ValueError("the pair's large run carries no more bytes than its small one")
    return max(0.0, (t_large - t_small - gap(0.0)) / slope)


def _channel_row(
    p: Profile,
    batch: int,
    measured: float,
    base: Constants,
    cost: ChannelCost,
    *,
    split_contention: bool = False,
) -> tuple[dict[str, float], float]:
    """One run's multipliers of the channel terms (by name), with each layer's branch fixed
    at ``cost``, and what of its measured seconds is left for them. With
    ``split_contention``, the compute is charged alone and the contention's part beyond it
    (at weight 1) is the multiplier of ``_WEIGHT``, the served contention's weight."""
    cpu, waits = _split_work(p, batch, base, cost)
    work = cpu + waits
    busiest = work.argmax(axis=1)
    by_max = work.max(axis=1) >= cpu.sum(axis=1) / base.cores
    alone = compute_features(p, batch=batch) @ np.array(dataclasses.astuple(base.compute))
    alone = alone * base.served
    compute = alone * (1.0 if split_contention else contention(base, p.shards))
    beyond = alone * (saturated(base, p.shards) - 1.0)  # at weight 1
    comm = channel_features(p, batch=batch, cores=base.cores)
    shared = comm.sum(axis=1) / base.cores  # the cores' branch: CPU terms only
    shared = np.where(_WAITS if base.waits_on_path else _RELAY, 0.0, shared)
    layers = np.arange(work.shape[0])
    row = np.where(by_max[:, None], comm[layers, busiest], shared).sum(axis=0)
    fixed_compute = np.where(by_max, compute[layers, busiest], compute.sum(axis=1) / base.cores)
    fixed = base.per_request_s + base.per_io_value_s * batch * p.io_values
    terms = dict(zip(_TERMS, [*map(float, row), float(p.shards)], strict=True))
    if split_contention:
        terms[_WEIGHT] = float(
            np.where(by_max, beyond[layers, busiest], beyond.sum(axis=1) / base.cores).sum()
        )
    return terms, measured - fixed - float(fixed_compute.sum())
