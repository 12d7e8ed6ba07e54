"""Routing policies: which device serves a request.

A policy is a pure decision over a snapshot of the cluster: the devices with their outstanding
work, and the cache directory of which model is where. The gateway and the simulator
(``bench/lalb.py``) call the same code.

- ``lb`` (:class:`LeastLoaded`): the device with the fewest outstanding requests; the baseline.
- ``lalb`` (:class:`LocalityAware`): locality-aware load balancing. Go where the model is (or is
  being loaded) unless waiting there is expected to take longer than loading it elsewhere; else
  load it on the least-loaded device that can make room, counting the artifact read on a node
  that holds no staged (host-tier or disk) copy. The rule is in ``docs/scheduling.md``.
- ``lalb-o3``: the same routing, with each device's queue served out of order
  (:mod:`gpufaas.scheduler.o3`); ``policy.dispatch`` tells the caller which queue discipline to use.

For large clusters, pass a :class:`DeviceTable` (a mutable, array-backed
``Sequence[DeviceLoad]``; the gateway's dispatcher keeps one, ``Dispatcher.table``) instead of a
list: the policies then decide without a Python scan of the devices, in microseconds at a
thousand devices.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from gpufaas.cache import ClusterDirectory, InsufficientCapacity, Residency, UnknownKey
from gpufaas.scheduler.dispatch import DeviceLoad, DeviceTable
from gpufaas.scheduler.estimates import Estimates

__all__ = [
    "POLICIES",
    "Decision",
    "DeviceLoad",
    "DeviceTable",
    "DispatchMode",
    "LeastLoaded",
    "LocalityAware",
    "NoDevice",
    "Policy",
    "RouteRequest",
    "StagedCopies",
    "make_policy",
]

DispatchMode = Literal["fifo", "o3"]
# model -> the nodes holding a staged copy of it (host tier or disk): a load there skips the
# artifact read. The gateway's cluster view and the simulator's host tiers answer it.
StagedCopies = Callable[[str], Collection[str]]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RouteRequest:
    model: str
    size_bytes: int


class NoDevice(Exception):
    """No healthy device can take the request."""


Reason = Literal["holder", "load", "replicate", "fallback", "least-loaded"]


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's whole answer for one request: the device, why, and what to evict there first.

    ``reason``: ``holder`` (the device has the model, or is loading it), ``load`` (nobody has
    it), ``replicate`` (a holder was too busy), ``fallback`` (no room anywhere: queue on the
    least-loaded device), ``least-loaded`` (``lb``). ``victims``: the models the GPU manager
    should evict first to make room (cheapest expected reloads), for a load.
    """

    device: str
    reason: Reason
    victims: tuple[str, ...] = ()
    holder_cost_ms: float = math.inf  # expected wait at the best holder
    # Expected wait + load (+ victims) at the best other device; inf when no other device
    # could be cheaper than the holder (the search stops as soon as none can).
    load_cost_ms: float = math.inf


class Policy(Protocol):
    name: str
    dispatch: DispatchMode  # how each device's queue is served: "fifo" or "o3"

    def choose(
        self,
        request: RouteRequest,
        devices: Sequence[DeviceLoad],
        directory: ClusterDirectory,
        *,
        observe: bool = True,
    ) -> Decision:
        """Decide where ``request`` runs; with ``observe``, count it towards its model's share
        of traffic (a request a peer replica forwarded was counted there already)."""
        ...


# -- decisions ------------------------------------------------------------------------------------


class _Columns:
    """One decision's view of the devices: keys, expected waits (of a request that needs a load,
    and of one whose model is there), and where each key is."""

    __slots__ = ("hit_wait_ms", "keys", "position", "table", "wait_ms", "waits_known")

    def __init__(
        self,
        keys: list[str],
        wait_ms: FloatArray,
        position: Callable[[str], int | None],
        *,
        waits_known: bool,
        hit_wait_ms: FloatArray | None = None,
        table: DeviceTable | None = None,
    ) -> None:
        self.keys = keys
        self.wait_ms = wait_ms
        self.hit_wait_ms = wait_ms if hit_wait_ms is None else hit_wait_ms
        self.position = position
        self.waits_known = waits_known
        self.table = table


def _columns(devices: Sequence[DeviceLoad], *, per_request_ms: float) -> _Columns:
    if isinstance(devices, DeviceTable):
        columns = devices._columns
        if not isinstance(columns, _Columns):  # the table's index: dict.get, no method between
            columns = devices._columns = _Columns(
                devices.keys,
                devices.queue_ms,
                devices._position.get,
                waits_known=True,
                hit_wait_ms=devices.hit_wait_ms,
                table=devices,
            )
        return columns
    keys = [d.key for d in devices]
    known = all(d.queue_ms is not None for d in devices)
    wait_ms = np.fromiter(
        (d.outstanding * per_request_ms if d.queue_ms is None else d.queue_ms for d in devices),
        dtype=np.float64,
        count=len(keys),
    )
    hit_wait_ms = None
    if known and any(d.hit_wait_ms is not None for d in devices):
        hit_wait_ms = np.fromiter(
            (d.queue_ms if d.hit_wait_ms is None else d.hit_wait_ms for d in devices),
            dtype=np.float64,
            count=len(keys),
        )
    positions: dict[str, int] | None = None

    def position(key: str) -> int | None:
        nonlocal positions
        if positions is None:
            positions = {k: i for i, k in enumerate(keys)}
        return positions.get(key)

    return _Columns(keys, wait_ms, position, waits_known=known, hit_wait_ms=hit_wait_ms)


# The seed of a policy's tie-break stream when none is given (the gateway gives none): a
# fixed one, so that two runs making the same decisions make the same draws.
DEFAULT_TIE_SEED = 0


def _tie_stream(seed: int | None) -> random.Random:
    """The random stream that breaks ties among equally good holders or idle devices."""
    return random.Random(DEFAULT_TIE_SEED if seed is None else seed)


def _pick_min(values: FloatArray | IntArray, rng: random.Random) -> int:
    """Index of the smallest value; ties broken at random so that idle devices share work."""
    i = int(np.argmin(values))
    ties = np.flatnonzero(values == values[i])
    return int(ties[rng.randrange(len(ties))]) if len(ties) > 1 else i


_RESIDENT = Residency.RESIDENT
# LALB's search for a device to load on (LocalityAware._non_holders): after this many holders
# among the least-waiting devices, the devices within the best holder's cost are found in bulk,
# and sorted in one go if there are at most _DIRECT_WALK of them.
_HOLDERS_BEFORE_BULK = 8
_DIRECT_WALK = 128


# -- policies --------------------------------------------------------------------------------------


class LeastLoaded:
    """Plain load balancing (the baseline): the device with the least outstanding
    work, ties broken at random so that idle devices share the load."""

    name = "lb"
    dispatch: DispatchMode = "fifo"

    def __init__(
        self,
        *,
        seed: int | None = None,
        estimates: Estimates | None = None,
        staged: StagedCopies | None = None,
    ) -> None:
        del staged  # LB ignores where models are, staged copies included
        self._rng = _tie_stream(seed)
        self.estimates = estimates or Estimates()

    def choose(
        self,
        request: RouteRequest,
        devices: Sequence[DeviceLoad],
        directory: ClusterDirectory,
        *,
        observe: bool = True,
    ) -> Decision:
        if not devices:
            raise NoDevice("no healthy GPU manager is available")
        if isinstance(devices, DeviceTable):
            key = devices.keys[_pick_min(devices.outstanding, self._rng)]
        else:
            least = min(d.outstanding for d in devices)
            key = self._rng.choice([d.key for d in devices if d.outstanding == least])
        return Decision(device=key, reason="least-loaded")


class LocalityAware:
    """Locality-aware load balancing (LALB); see ``docs/scheduling.md`` for the rule.

    Costs are expected milliseconds until the request's inference can start:

    - at a device holding the model (resident or loading): its expected wait;
    - at any other device: its expected wait, plus the model's expected load time, plus the
      artifact read (``size x fetch_ms_per_byte``) if some node holds a staged copy of the model
      (``staged``: host tier or disk) but not this device's node, plus ``victim_weight`` times
      the expected reloads of what the load would evict there (a victim's load time, times the
      chance it is asked for again before this model is, halved if another device also holds
      it).

    The best holder wins unless the best other device is cheaper. Other devices are looked at
    least-loaded first: the ``candidates`` least loaded that can make room, and, if none of
    those is on a node with a staged copy, the least loaded such device too. ``victims`` says
    which victims a load is charged for: the directory's LRU prediction (``"lru"``, what the GPU
    manager evicts unhinted), or the policy's own cheapest ones (``"value"``, the default,
    reported in the decision's ``victims``: the gateway sends them to the GPU manager, which evicts them
    first). A model on more than
    ``holder_sample`` devices has that many of its holders sampled at random.

    A decision's work is bounded by constants, not by the cluster: one ``argmin`` and, when a
    load elsewhere might win, partial sorts of the waits (numpy), ``holder_sample`` holders, and
    victim plans for at most ``candidates`` devices, each over that device's residents. Other
    devices are ruled out without a plan as soon as their wait plus the load time cannot beat
    the best cost found so far (the holder's included).
    """

    name = "lalb"
    dispatch: DispatchMode = "fifo"

    def __init__(
        self,
        *,
        seed: int | None = None,
        estimates: Estimates | None = None,
        o3: bool = False,
        candidates: int = 4,
        victim_weight: float = 2.0,
        victims: Literal["lru", "value"] = "value",
        holder_sample: int = 8,
        staged: StagedCopies | None = None,
        fetch_ms_per_byte: float = 1 / 2e6,
    ) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if not victim_weight >= 0:
            raise ValueError(f"victim_weight must be >= 0, got {victim_weight!r}")
        if victims not in ("lru", "value"):
            raise ValueError(f"victims must be 'lru' or 'value', got {victims!r}")
        self._rng = _tie_stream(seed)
        self.estimates = estimates or Estimates()
        self.candidates = candidates
        self.plans = VictimPlans(estimates=self.estimates, weight=victim_weight)
        self.victims = victims
        if holder_sample < 1:
            raise ValueError(f"holder_sample must be >= 1, got {holder_sample!r}")
        self.holder_sample = holder_sample
        if not (fetch_ms_per_byte >= 0 and math.isfinite(fetch_ms_per_byte)):
            raise ValueError(f"fetch_ms_per_byte must be >= 0, got {fetch_ms_per_byte!r}")
        self.staged = staged
        self.fetch_ms_per_byte = fetch_ms_per_byte  # the artifact read; default 2 GB/s
        if o3:
            self.name = "lalb-o3"
            self.dispatch = "o3"
        self.reasons: dict[str, int] = {"holder": 0, "load": 0, "replicate": 0, "fallback": 0}
        # model -> (the directory's holder set, a list of it) for sampling without listing a
        # large set per decision; checked against the set before use (see _sample_holders).
        self._pools: dict[str, tuple[Collection[str], list[str]]] = {}

    def choose(
        self,
        request: RouteRequest,
        devices: Sequence[DeviceLoad],
        directory: ClusterDirectory,
        *,
        observe: bool = True,
    ) -> Decision:
        """Decide, and (with ``observe``) count the request towards the model's share."""
        if observe:
            self.estimates.observe_request(request.model)
        decision = self.decide(request, devices, directory)
        self.reasons[decision.reason] += 1
        return decision

    def decide(
        self, request: RouteRequest, devices: Sequence[DeviceLoad], directory: ClusterDirectory
    ) -> Decision:
        if not devices:
            raise NoDevice("no healthy GPU manager is available")
        estimates = self.estimates
        columns = _columns(devices, per_request_ms=estimates.mean_infer_ms())
        load_ms = estimates.load_ms(request.model, size_bytes=request.size_bytes)

        holders = directory.holder_ids(request.model)
        holder, holder_cost = self._best_holder(request.model, holders, columns, load_ms, directory)
        wait_ms = columns.wait_ms
        if columns.table is not None:
            least_wait = columns.table.least_wait()
        else:
            least_wait = wait_ms.item(int(wait_ms.argmin()))  # a third of min()'s overhead
        if holder is not None and holder_cost <= least_wait + load_ms:
            # No device could load it and start sooner: skip looking for one.
            return Decision(device=holder, reason="holder", holder_cost_ms=holder_cost)

        # Only a device cheaper than the best holder can change the outcome, so the holder's
        # cost bounds the search.
        placed = self._place(
            request, columns, load_ms, directory, holders=holders, bound=holder_cost
        )
        if placed is None:
            if holder is not None:
                return Decision(device=holder, reason="holder", holder_cost_ms=holder_cost)
            # Nowhere can make room now (all pinned, as the directory sees it): queue on the
            # least-loaded device; its GPU manager frees room as requests finish.
            i = _pick_min(wait_ms, self._rng)
            return Decision(device=columns.keys[i], reason="fallback")
        key, cost, victims = placed
        return Decision(
            device=key,
            reason="load" if holder is None else "replicate",
            holder_cost_ms=holder_cost,
            load_cost_ms=cost,
            victims=tuple(victims),
        )

    def _best_holder(
        self,
        model: str,
        holders: Collection[str],
        columns: _Columns,
        load_ms: float,
        directory: ClusterDirectory,
    ) -> tuple[str | None, float]:
        """The holder with the least expected wait, and that wait.

        A holder's wait is that of a request needing no load (``hit_wait_ms``): a free slot
        serves it at once, even while a long load runs there. A holder still loading the model
        looks free too, which is right: what remains of that load is less than a whole load
        elsewhere, and a burst for a cold model should wait for the one copy. Many holders (a hot model replicated widely): the best of ``holder_sample`` of them at
        random, which balances nearly as well as the best of all and costs O(1).
        """
        if not holders:
            return None, math.inf
        if columns.waits_known:
            states = None
            keys: Collection[str] = holders
            if len(holders) > self.holder_sample:
                keys = self._sample_holders(model, holders)
        else:  # no queue estimates: a model still loading adds its load time to the wait
            states = directory.holders(model)
            keys = states
        position = columns.position
        wait_of = columns.hit_wait_ms.item
        coin = self._rng.random
        best: str | None = None
        best_cost = math.inf
        for key in keys:
            i = position(key)
            if i is None:  # not a candidate (unhealthy, or excluded by the caller)
                continue
            cost: float = wait_of(i)
            if states is not None and states[key] is Residency.LOADING:
                cost = max(cost, load_ms)
            if cost < best_cost or (cost == best_cost and coin() < 0.5):
                best, best_cost = key, cost
        return best, best_cost

    def _sample_holders(self, model: str, holders: Collection[str]) -> list[str]:
        """``holder_sample`` holders drawn at random (with replacement) from ``holders``.

        Listing a set of hundreds of holders costs more than the rest of a decision, so the
        list is kept between decisions while it is the same set object and the same size, and
        made again as soon as a drawn key has left the set (a swap that keeps the size).
        """
        pool = self._pools.get(model)
        if pool is None or pool[0] is not holders or len(pool[1]) != len(holders):
            pool = self._pool(model, holders)
        sample = self._draw(pool[1])
        for key in sample:
            if key not in holders:
                return self._draw(self._pool(model, holders)[1])
        return sample

    def _draw(self, members: list[str]) -> list[str]:
        # What random.choices(members, k=holder_sample) draws, without its generality.
        rand = self._rng.random
        n = len(members)
        return [members[int(rand() * n)] for _ in range(self.holder_sample)]

    def _pool(self, model: str, holders: Collection[str]) -> tuple[Collection[str], list[str]]:
        if len(self._pools) >= 4096:  # bound memory: models come and go
            self._pools.clear()
        pool = (holders, list(holders))
        self._pools[model] = pool
        return pool

    def _place(
        self,
        request: RouteRequest,
        columns: _Columns,
        load_ms: float,
        directory: ClusterDirectory,
        *,
        holders: Collection[str],
        bound: float,
    ) -> tuple[str, float, list[str]] | None:
        """The cheapest of the ``candidates`` least-loaded non-holders that can make room (and,
        if none of those is on a node with a staged copy, the least-loaded such device), if it
        costs less than ``bound``.

        The candidates are tried by increasing wait, so the search stops at the first whose
        wait plus the load time exceeds the best cost so far: it and all later ones cost more
        (the artifact read and the victims only add). One that only equals it is tried, as it
        may tie, and ties go to the smaller key (:meth:`_cheaper`). Which device wins is the
        same as trying all candidates and comparing with ``bound`` afterwards.
        """
        keys = columns.keys
        wait_ms = columns.wait_ms
        staged_nodes = self.staged(request.model) if self.staged is not None else ()
        fetch_ms = request.size_bytes * self.fetch_ms_per_byte if staged_nodes else 0.0
        wanted = self.estimates.share(request.model)
        best: tuple[str, float, list[str]] | None = None
        best_cost = bound
        tried = 0
        staged_tried = False
        for i in self._non_holders(columns, holders, load_ms=load_ms, bound=bound):
            key = keys[i]
            floor = wait_ms.item(i) + load_ms
            if floor > best_cost:
                break  # waits only grow from here: nothing later can be cheaper (or tie)
            on_staged = bool(staged_nodes) and self._node_of(key, directory) in staged_nodes
            planned = self._try(key, request, directory, wanted=wanted)
            if planned is None:
                continue  # unknown, or full of pinned models (as the directory sees it)
            cost = floor + planned[1] + (0.0 if on_staged or not staged_nodes else fetch_ms)
            if self._cheaper(key, cost, best, best_cost, request, directory):
                best, best_cost = (key, cost, planned[0]), cost
            staged_tried = staged_tried or on_staged
            tried += 1
            if tried == self.candidates:
                break
        if staged_nodes and not staged_tried:
            # The least-loaded non-holder on a node with a staged copy: a few devices per node,
            # looked up directly rather than by scanning the cluster in wait order.
            position = columns.position
            staged: list[tuple[float, str]] = []
            for node in staged_nodes:
                for key in directory.devices_on_node(node):
                    at = position(key)
                    if at is not None and key not in holders:
                        staged.append((wait_ms.item(at), key))
            staged.sort()
            for wait, key in staged:
                floor = wait + load_ms
                if floor > best_cost:
                    break
                if not math.isfinite(wait):
                    break
                planned = self._try(key, request, directory, wanted=wanted)
                if planned is None:
                    continue
                cost = floor + planned[1]
                if self._cheaper(key, cost, best, best_cost, request, directory):
                    best, best_cost = (key, cost, planned[0]), cost
                break
        return best

    def _try(
        self, key: str, request: RouteRequest, directory: ClusterDirectory, *, wanted: float
    ) -> tuple[list[str], float] | None:
        """The victims of a load on ``key`` and their cost; None: unknown device, or no room."""
        try:
            if self.victims == "value":
                return self.plans.value(key, request, directory, wanted=wanted)
            return self.plans.lru(key, request, directory, wanted=wanted)
        except UnknownKey:
            return None  # not in the directory (yet)

    @staticmethod
    def _cheaper(
        key: str,
        cost: float,
        best: tuple[str, float, list[str]] | None,
        best_cost: float,
        request: RouteRequest,
        directory: ClusterDirectory,
    ) -> bool:
        if cost != best_cost or best is None:
            return cost < best_cost
        # Equal cost: the smallest MIG slice that fits (#11), then the smallest key, so that
        # the choice does not hang on the order the devices joined the table (docs, "Ties").
        rival = best[0]
        if directory.fits_tighter(key, rival, request.size_bytes):
            return True
        return key < rival and not directory.fits_tighter(rival, key, request.size_bytes)

    def _node_of(self, key: str, directory: ClusterDirectory) -> str | None:
        try:
            return directory.node(key)
        except UnknownKey:
            return None

    def _non_holders(
        self, columns: _Columns, holders: Collection[str], *, load_ms: float, bound: float
    ) -> Iterator[int]:
        """Positions of the devices not in ``holders``, by increasing wait: every one whose
        wait plus ``load_ms`` is at most ``bound`` (only those can beat the best holder), then
        perhaps more; it stops at a non-finite wait.

        Lazily: a decision usually needs only the first ``candidates``, more when those hold
        the model already or are full of pinned models. A :class:`DeviceTable` keeps the first
        few ready (:meth:`DeviceTable.least_waiting`), popped from a heap. Once
        ``_HOLDERS_BEFORE_BULK`` of those turn out to be holders (a widely replicated model
        fills the least-waiting devices), or after them, the devices left within the bound
        are found by one vector comparison and, if few, sorted at once: the holders among them
        are skipped without any device beyond the bound being looked at. Without a bound
        (nobody holds the model), or with many devices within it, partial sorts of growing
        size: each round takes the ``size`` smallest waits (``argpartition``), so a position
        not taken yet waits at least as long as every one yielded.

        The order never goes back, and no position comes twice. Among equal waits it is
        unspecified (by position, except across the heap's last wait), which spreads loads
        well enough: a device that takes one is no longer idle.
        """
        wait_ms = columns.wait_ms
        keys = columns.keys
        seen: list[int] = []
        if columns.table is not None:
            heap = columns.table.least_waiting(at_least=self.candidates)
            heapq.heapify(heap)
            pop = heapq.heappop
            skipped = 0
            while heap:
                wait, i = pop(heap)
                if not math.isfinite(wait):
                    return
                seen.append(i)
                if keys[i] not in holders:
                    yield i
                elif (skipped := skipped + 1) == _HOLDERS_BEFORE_BULK and math.isfinite(bound):
                    break  # the rest of the heap is within the bulk below
        if not math.isfinite(bound):
            yield from self._rounds(wait_ms, keys, holders, seen=set(seen))
            return
        within = wait_ms + load_ms <= bound  # a new array; computed as _place computes a floor
        if seen:
            within[seen] = False
        positions = np.flatnonzero(within)
        if len(positions) <= _DIRECT_WALK:
            ordered = positions[np.argsort(wait_ms[positions], kind="stable")].tolist()
            yield from (i for i in ordered if keys[i] not in holders)
        else:
            waits = np.where(within, wait_ms, math.inf)  # the rest: as if they were busy forever
            yield from self._rounds(waits, keys, holders, seen=set())

    def _rounds(
        self, wait_ms: FloatArray, keys: list[str], holders: Collection[str], *, seen: set[int]
    ) -> Iterator[int]:
        """Positions not in ``seen`` whose keys are not in ``holders``, by increasing finite
        wait, by partial sorts of growing size (see :meth:`_non_holders`)."""
        n = len(wait_ms)
        size = self.candidates
        while size <= len(seen) and size < n:
            size *= 8
        while len(seen) < n:
            size = min(size, n)
            part = np.argpartition(wait_ms, size - 1)[:size] if size < n else np.arange(n)
            if size <= 64:  # a Python sort of a few pairs beats numpy's call overhead
                ranked = [
                    i for _, i in sorted(zip(wait_ms[part].tolist(), part.tolist(), strict=True))
                ]
            else:
                part.sort()
                ranked = part[np.argsort(wait_ms[part], kind="stable")].tolist()
            for i in ranked:
                if i in seen:
                    continue
                if not math.isfinite(wait_ms.item(i)):
                    return
                seen.add(i)
                if keys[i] not in holders:
                    yield i
            size *= 8


class VictimPlans:
    """What a load on a device would evict, and what those evictions are expected to cost:
    the directory's LRU prediction (:meth:`lru`) or the cheapest reloads (:meth:`value`)."""

    def __init__(self, *, estimates: Estimates, weight: float) -> None:
        self.estimates = estimates
        self.weight = weight  # the victims' expected reload cost counts this many times

    def lru(
        self, key: str, request: RouteRequest, directory: ClusterDirectory, *, wanted: float
    ) -> tuple[list[str], float] | None:
        """The directory's LRU victims of a load on ``key``, and their cost; None: no room.

        Raises :class:`UnknownKey` for a device the directory does not know.
        """
        try:
            victims = directory.plan_dispatch(key, request.model, size_bytes=request.size_bytes)
        except InsufficientCapacity:
            return None
        if not victims or self.weight == 0:
            return victims, 0.0
        estimates = self.estimates
        sizes: dict[str, int] | None = None
        cost = 0.0
        for victim in victims:
            share = estimates.share(victim)
            if share <= 0:
                continue
            if sizes is None:
                sizes = {m: s for m, _, s in directory.residents(key)}
            reload_ms = estimates.victim_load_ms(victim, size_bytes=sizes.get(victim, 0))
            cost += self.eviction_cost(victim, share, reload_ms, wanted, directory)
        return victims, self.weight * cost

    def value(
        self, key: str, request: RouteRequest, directory: ClusterDirectory, *, wanted: float
    ) -> tuple[list[str], float] | None:
        """The policy's own victims of a load on ``key``, and their cost; None: no room.

        If one resident model frees enough on its own, the cheapest such model (evicting one
        beats evicting several); ties go to the least recently used. Otherwise models by least
        reload cost per byte, then those not needed after all are kept back. A model's reload
        value is its share of requests times its load time (0 for a model not asked for
        lately, whose load time is then not needed), the load time snapped to a power of two
        of its size's estimate (:meth:`Estimates.victim_load_ms`), so identical models rank
        by their shares and then by last use, not by the noise in their measured loads. (A
        device's residents are in one LRU order, so the order by last use has no ties.)

        Only resident models can be evicted: the directory's views pin exactly the models
        still loading, so "the residents free enough" is the condition under which
        ``plan_dispatch`` finds room. Raises :class:`UnknownKey` for a device the directory
        does not know.
        """
        need = request.size_bytes - directory.free_bytes(key)
        if need <= 0:
            return [], 0.0
        residents = directory.residents(key)  # least recently used first
        if sum([size for _, state, size in residents if state is _RESIDENT]) < need:
            return None  # before any estimate: the devices ruled out here are full of loads
        share_of = self.estimates.share
        load_of = self.estimates.victim_load_ms  # snapped: timing noise does not rank victims
        chosen: list[tuple[str, int, float]] = []  # (model, size, share)
        best_value = math.inf
        for m, state, size in residents:
            if size < need or state is not _RESIDENT:
                continue
            share = share_of(m)
            value = share * load_of(m, size_bytes=size) if share > 0 else 0.0
            if value < best_value:  # strictly: ties go to the least recently used
                chosen, best_value = [(m, size, share)], value
                if value == 0:
                    break  # nothing is cheaper
        if not chosen:
            ranked: list[tuple[float, int, str, int, float]] = []
            for n, (m, state, size) in enumerate(residents):
                if state is _RESIDENT:
                    share = share_of(m)
                    value = share * load_of(m, size_bytes=size) if share > 0 else 0.0
                    ranked.append((value / max(size, 1), n, m, size, share))
            ranked.sort()  # by value per byte, then least recently used first
            freed = 0
            for _, _, m, size, share in ranked:
                if freed >= need:
                    break
                chosen.append((m, size, share))
                freed += size
            kept = []
            for row in reversed(chosen):  # drop the ones not needed after all
                if freed - row[1] >= need:
                    freed -= row[1]
                else:
                    kept.append(row)
            chosen = kept[::-1]
        victims = [m for m, _, _ in chosen]
        if self.weight == 0:
            return victims, 0.0
        cost = 0.0
        for m, size, share in chosen:
            if share > 0:
                reload_ms = load_of(m, size_bytes=size)
                cost += self.eviction_cost(m, share, reload_ms, wanted, directory)
        return victims, self.weight * cost

    @staticmethod
    def eviction_cost(
        victim: str, share: float, reload_ms: float, wanted: float, directory: ClusterDirectory
    ) -> float:
        """Expected reload cost of evicting ``victim`` to make room for a model whose share of
        requests is ``wanted``: its load time times the chance that it is asked for again
        before that model is (``1 - exp(-share / wanted)`` for two Poisson streams), halved if
        another device also holds it."""
        again = 1.0 - math.exp(-share / wanted) if wanted > 0 else 1.0
        sole = len(directory.holder_ids(victim)) <= 1
        return reload_ms * again * (1.0 if sole else 0.5)


PolicyFactory = Callable[..., Policy]


def _lalb_o3(
    *,
    seed: int | None = None,
    estimates: Estimates | None = None,
    staged: StagedCopies | None = None,
) -> Policy:
    return LocalityAware(seed=seed, estimates=estimates, o3=True, staged=staged)


POLICIES: dict[str, PolicyFactory] = {
    "lb": LeastLoaded,
    "lalb": LocalityAware,
    "lalb-o3": _lalb_o3,
}


def make_policy(
    name: str,
    *,
    seed: int | None = None,
    estimates: Estimates | None = None,
    staged: StagedCopies | None = None,
) -> Policy:
    """The policy called ``name`` (a key of :data:`POLICIES`), sharing ``estimates`` if given;
    ``staged`` tells LALB which nodes hold a host-tier or disk copy of a model."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return factory(seed=seed, estimates=estimates, staged=staged)
