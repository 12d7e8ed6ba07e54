"""Routing policies: which device serves a request.

A policy is a pure decision over a snapshot of the cluster: the devices with their outstanding
work, and the cache directory of which model is where. The gateway and the simulator
(``bench/lalb.py``) call the same code.

- ``lb`` (:class:`LeastLoaded`): the device with the fewest outstanding requests; the baseline.
- ``lalb`` (:class:`LocalityAware`): locality-aware load balancing. Go where the model is (or is
  being loaded) unless waiting there is expected to take longer than loading it elsewhere; else
  load it on the least-loaded device that can make room. The rule is in ``docs/scheduling.md``.
- ``lalb-o3``: the same routing, with each device's queue served out of order
  (:mod:`gpufaas.scheduler.o3`); ``policy.dispatch`` tells the caller which queue discipline to use.

For large clusters, pass a :class:`DeviceTable` (a mutable, array-backed
``Sequence[DeviceLoad]``) instead of a list: the policies then decide with vectorised scans, in
microseconds at a thousand devices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, overload

import numpy as np
import numpy.typing as npt

from gpufaas.cache import ClusterDirectory, InsufficientCapacity, Residency, UnknownKey
from gpufaas.scheduler.estimates import Estimates

__all__ = [
    "POLICIES",
    "DeviceLoad",
    "DeviceTable",
    "DispatchMode",
    "LeastLoaded",
    "LocalityAware",
    "NoDevice",
    "Policy",
    "RouteRequest",
    "make_policy",
]

DispatchMode = Literal["fifo", "o3"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DeviceLoad:
    """What a policy knows about one device when it decides."""

    key: str  # cluster-wide: "<node>/<device>"
    outstanding: int  # requests sent to it and not answered yet (queued or running)
    # Expected wait (ms) before a request sent now would start there, from the dispatcher's
    # queue; None: unknown, estimated from ``outstanding``.
    queue_ms: float | None = None


@dataclass(frozen=True)
class RouteRequest:
    model: str
    size_bytes: int


class NoDevice(Exception):
    """No healthy device can take the request."""


class Policy(Protocol):
    name: str
    dispatch: DispatchMode  # how each device's queue is served: "fifo" or "o3"

    def choose(
        self, request: RouteRequest, devices: Sequence[DeviceLoad], directory: ClusterDirectory
    ) -> str: ...


# -- device tables ---------------------------------------------------------------------------------


class DeviceTable(Sequence[DeviceLoad]):
    """Devices and their loads in arrays: a ``Sequence[DeviceLoad]`` that policies scan fast.

    The owner keeps it current with :meth:`adjust` (deltas, as requests come and go) or
    :meth:`update` (absolute values). Positions change when a device is removed (the last one
    moves into the gap), so hold keys, not indices.
    """

    def __init__(self, devices: Sequence[DeviceLoad] = ()) -> None:
        self._keys: list[str] = []
        self._position: dict[str, int] = {}
        self._outstanding: IntArray = np.zeros(max(8, len(devices)), dtype=np.int64)
        self._queue_ms: FloatArray = np.zeros(max(8, len(devices)), dtype=np.float64)
        for device in devices:
            self.add(device.key, outstanding=device.outstanding, queue_ms=device.queue_ms or 0.0)

    def __repr__(self) -> str:
        return f"<DeviceTable {len(self._keys)} devices>"

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> DeviceLoad: ...
    @overload
    def __getitem__(self, index: slice) -> list[DeviceLoad]: ...
    def __getitem__(self, index: int | slice) -> DeviceLoad | list[DeviceLoad]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self._keys))[index]]
        key = self._keys[index]  # raises IndexError, and accepts negative indices
        i = self._position[key]
        return DeviceLoad(
            key=key, outstanding=int(self._outstanding[i]), queue_ms=float(self._queue_ms[i])
        )

    def __iter__(self) -> Iterator[DeviceLoad]:
        return (self[i] for i in range(len(self._keys)))

    def __contains__(self, key: object) -> bool:
        return key in self._position

    @property
    def keys(self) -> list[str]:
        """Device keys by position (a view: do not modify)."""
        return self._keys

    @property
    def outstanding(self) -> IntArray:
        """Outstanding requests by position (a read-only view)."""
        view = self._outstanding[: len(self._keys)]
        view.flags.writeable = False
        return view

    @property
    def queue_ms(self) -> FloatArray:
        """Expected wait in ms by position (a read-only view)."""
        view = self._queue_ms[: len(self._keys)]
        view.flags.writeable = False
        return view

    def position(self, key: str) -> int | None:
        return self._position.get(key)

    def add(self, key: str, *, outstanding: int = 0, queue_ms: float = 0.0) -> None:
        if key in self._position:
            raise ValueError(f"device {key!r} is already in the table")
        n = len(self._keys)
        if n == len(self._outstanding):
            self._outstanding = np.concatenate(
                [self._outstanding, np.zeros_like(self._outstanding)]
            )
            self._queue_ms = np.concatenate([self._queue_ms, np.zeros_like(self._queue_ms)])
        self._keys.append(key)
        self._position[key] = n
        self._outstanding[n] = outstanding
        self._queue_ms[n] = queue_ms

    def remove(self, key: str) -> None:
        i = self._require(key)
        last = len(self._keys) - 1
        if i != last:
            moved = self._keys[last]
            self._keys[i] = moved
            self._position[moved] = i
            self._outstanding[i] = self._outstanding[last]
            self._queue_ms[i] = self._queue_ms[last]
        self._keys.pop()
        del self._position[key]

    def update(
        self, key: str, *, outstanding: int | None = None, queue_ms: float | None = None
    ) -> None:
        i = self._require(key)
        if outstanding is not None:
            self._outstanding[i] = outstanding
        if queue_ms is not None:
            self._queue_ms[i] = queue_ms

    def adjust(self, key: str, *, outstanding: int = 0, queue_ms: float = 0.0) -> None:
        """Add deltas to a device's load (a negative delta when work leaves)."""
        i = self._require(key)
        self._outstanding[i] += outstanding
        self._queue_ms[i] = max(0.0, float(self._queue_ms[i]) + queue_ms)

    def _require(self, key: str) -> int:
        i = self._position.get(key)
        if i is None:
            raise KeyError(f"device {key!r} is not in the table")
        return i


@dataclass
class _Columns:
    """One decision's view of the devices: keys, outstanding counts, expected waits."""

    keys: list[str]
    outstanding: IntArray
    wait_ms: FloatArray
    position: Callable[[str], int | None]
    waits_known: bool


def _columns(devices: Sequence[DeviceLoad], *, per_request_ms: float) -> _Columns:
    if isinstance(devices, DeviceTable):
        return _Columns(
            keys=devices.keys,
            outstanding=devices.outstanding,
            wait_ms=devices.queue_ms,
            position=devices.position,
            waits_known=True,
        )
    keys = [d.key for d in devices]
    outstanding = np.fromiter((d.outstanding for d in devices), dtype=np.int64, count=len(keys))
    known = all(d.queue_ms is not None for d in devices)
    wait_ms = np.fromiter(
        (d.outstanding * per_request_ms if d.queue_ms is None else d.queue_ms for d in devices),
        dtype=np.float64,
        count=len(keys),
    )
    positions: dict[str, int] | None = None

    def position(key: str) -> int | None:
        nonlocal positions
        if positions is None:
            positions = {k: i for i, k in enumerate(keys)}
        return positions.get(key)

    return _Columns(
        keys=keys, outstanding=outstanding, wait_ms=wait_ms, position=position, waits_known=known
    )


def _holder_ids(directory: ClusterDirectory, model: str) -> Collection[str]:
    """The devices holding ``model``: O(1) with ``ClusterDirectory.holder_ids`` (a read-only set
    view), else built from ``holders()`` in O(holders)."""
    fast: Callable[[str], Collection[str]] | None = getattr(directory, "holder_ids", None)
    if fast is not None:
        return fast(model)
    return directory.holders(model).keys()


def _pick_min(values: FloatArray | IntArray, rng: random.Random) -> int:
    """Index of the smallest value; ties broken at random so that idle devices share work."""
    i = int(np.argmin(values))
    ties = np.flatnonzero(values == values[i])
    return int(ties[rng.randrange(len(ties))]) if len(ties) > 1 else i


# -- policies --------------------------------------------------------------------------------------


class LeastLoaded:
    """Plain load balancing (the baseline): the device with the least outstanding
    work, ties broken at random so that idle devices share the load."""

    name = "lb"
    dispatch: DispatchMode = "fifo"

    def __init__(self, *, seed: int | None = None, estimates: Estimates | None = None) -> None:
        self._rng = random.Random(seed)
        self.estimates = estimates or Estimates()

    def choose(
        self, request: RouteRequest, devices: Sequence[DeviceLoad], directory: ClusterDirectory
    ) -> str:
        if not devices:
            raise NoDevice("no healthy GPU manager is available")
        if isinstance(devices, DeviceTable):
            return devices.keys[_pick_min(devices.outstanding, self._rng)]
        least = min(d.outstanding for d in devices)
        return self._rng.choice([d.key for d in devices if d.outstanding == least])


@dataclass
class Decision:
    """Why :class:`LocalityAware` chose a device; kept as ``policy.last`` for metrics and tests."""

    device: str
    reason: Literal["holder", "load", "replicate", "fallback"]
    holder_cost_ms: float = math.inf  # expected wait at the best holder
    load_cost_ms: float = math.inf  # expected wait + load at the best other device
    victims: list[str] = field(default_factory=list)


class LocalityAware:
    """Locality-aware load balancing (LALB); see ``docs/scheduling.md`` for the rule.

    Costs are expected milliseconds until the request's inference can start:

    - at a device holding the model (resident or loading): its expected wait;
    - at any other device: its expected wait, plus the model's expected load time, plus
      ``victim_weight`` times the expected reloads of what the load would evict there (a
      victim's load time, times the chance it is asked for again before this model is, halved
      if another device also holds it).

    The best holder wins unless the best other device is cheaper. Other devices are looked at
    least-loaded first: the ``candidates`` least loaded that can make room. ``victims`` says
    which victims a load is charged for: the directory's LRU prediction (``"lru"``, what the GPU
    manager evicts today), or the policy's own cheapest ones (``"value"``, reported in
    ``last.victims`` as hints for a GPU manager that evicts them first). A model on more than
    ``holder_sample`` devices has that many of its holders sampled at random.
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
        victims: Literal["lru", "value"] = "lru",
        holder_sample: int = 8,
    ) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if not victim_weight >= 0:
            raise ValueError(f"victim_weight must be >= 0, got {victim_weight!r}")
        self._rng = random.Random(seed)
        self.estimates = estimates or Estimates()
        self.candidates = candidates
        self.victim_weight = victim_weight
        self.victims = victims
        if holder_sample < 1:
            raise ValueError(f"holder_sample must be >= 1, got {holder_sample!r}")
        self.holder_sample = holder_sample
        if o3:
            self.name = "lalb-o3"
            self.dispatch = "o3"
        self.last: Decision | None = None
        self.reasons: dict[str, int] = {"holder": 0, "load": 0, "replicate": 0, "fallback": 0}

    def choose(
        self, request: RouteRequest, devices: Sequence[DeviceLoad], directory: ClusterDirectory
    ) -> str:
        self.estimates.observe_request(request.model)
        decision = self.decide(request, devices, directory)
        self.last = decision
        self.reasons[decision.reason] += 1
        return decision.device

    def decide(
        self, request: RouteRequest, devices: Sequence[DeviceLoad], directory: ClusterDirectory
    ) -> Decision:
        if not devices:
            raise NoDevice("no healthy GPU manager is available")
        estimates = self.estimates
        columns = _columns(devices, per_request_ms=estimates.mean_infer_ms())
        load_ms = estimates.load_ms(request.model, size_bytes=request.size_bytes)

        holders = _holder_ids(directory, request.model)
        holder, holder_cost = self._best_holder(request.model, holders, columns, load_ms, directory)
        least_wait = float(columns.wait_ms.min())
        if holder is not None and holder_cost <= least_wait + load_ms:
            # No device could load it and start sooner: skip looking for one.
            return Decision(device=holder, reason="holder", holder_cost_ms=holder_cost)

        placed = self._place(
            request, columns, load_ms, directory, holders=holders, least_wait=least_wait
        )
        if placed is None:
            if holder is not None:
                return Decision(device=holder, reason="holder", holder_cost_ms=holder_cost)
            # Nowhere can make room now (all pinned, as the directory sees it): queue on the
            # least-loaded device; its GPU manager frees room as requests finish.
            i = _pick_min(columns.wait_ms, self._rng)
            return Decision(device=columns.keys[i], reason="fallback")
        key, cost, victims = placed
        if holder is not None and holder_cost <= cost:
            return Decision(
                device=holder, reason="holder", holder_cost_ms=holder_cost, load_cost_ms=cost
            )
        return Decision(
            device=key,
            reason="load" if holder is None else "replicate",
            holder_cost_ms=holder_cost,
            load_cost_ms=cost,
            victims=victims,
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

        Many holders (a hot model replicated widely): the best of ``holder_sample`` of them at
        random, which balances nearly as well as the best of all and costs O(1).
        """
        if not holders:
            return None, math.inf
        if columns.waits_known:
            states = None
            keys: Collection[str] = holders
            if len(holders) > self.holder_sample:
                keys = self._rng.choices(list(holders), k=self.holder_sample)
        else:  # no queue estimates: a model still loading adds its load time to the wait
            states = directory.holders(model)
            keys = states
        best: str | None = None
        best_cost = math.inf
        for key in keys:
            i = columns.position(key)
            if i is None:  # not a candidate (unhealthy, or excluded by the caller)
                continue
            cost = float(columns.wait_ms[i])
            if states is not None and states[key] is Residency.LOADING:
                cost = max(cost, load_ms)
            if cost < best_cost or (cost == best_cost and self._rng.random() < 0.5):
                best, best_cost = key, cost
        return best, best_cost

    def _place(
        self,
        request: RouteRequest,
        columns: _Columns,
        load_ms: float,
        directory: ClusterDirectory,
        *,
        holders: Collection[str],
        least_wait: float,
    ) -> tuple[str, float, list[str]] | None:
        """The cheapest of the ``candidates`` least-loaded non-holders that can make room."""
        best: tuple[str, float, list[str]] | None = None
        tried = 0
        for i in self._least_loaded(columns.wait_ms, least=least_wait):
            key = columns.keys[i]
            if key in holders:
                continue
            try:
                victims = directory.plan_dispatch(key, request.model, size_bytes=request.size_bytes)
                if victims and self.victims == "value":
                    victims = self._cheapest_victims(key, request, directory)
            except (InsufficientCapacity, UnknownKey):
                continue  # full of pinned models (as the directory sees it), or unknown to it
            wait = float(columns.wait_ms[i])
            if best is not None and wait + load_ms >= best[1]:
                break  # waits only grow from here: nothing later can be cheaper
            cost = wait + load_ms + self._victim_cost(request.model, victims, key, directory)
            if best is None or cost < best[1]:
                best = (key, cost, victims)
            tried += 1
            if tried == self.candidates:
                break
        return best

    def _least_loaded(self, wait_ms: FloatArray, *, least: float) -> Iterator[int]:
        """Device positions by increasing wait (``least`` is the smallest).

        Lazily, by partial sorts of growing size: a decision usually needs only the first
        ``candidates``, more when those hold the model already or are full of pinned models.
        Among equal waits the order is arbitrary, which spreads loads well enough: a device
        that takes one is no longer idle.
        """
        n = len(wait_ms)
        if not math.isfinite(least):
            return
        done = 0
        size = self.candidates
        while done < n:
            size = min(size, n)
            part = np.argpartition(wait_ms, size - 1)[:size] if size < n else np.arange(n)
            ranked = part[np.argsort(wait_ms[part], kind="stable")][done:]
            for i in ranked.tolist():
                if not math.isfinite(wait_ms[i]):
                    return
                yield i
            done = size
            size *= 8

    def _cheapest_victims(
        self, key: str, request: RouteRequest, directory: ClusterDirectory
    ) -> list[str]:
        """Victims by least expected reload cost (instead of least recently used).

        If one resident model frees enough on its own, the cheapest such model (evicting one
        beats evicting several). Otherwise models by least reload cost per byte, then those not
        needed after all are kept back.
        """
        need = request.size_bytes - directory.free_bytes(key)
        residents = [
            (m, s) for m, state, s in directory.residents(key) if state is Residency.RESIDENT
        ]
        singles = [(m, s) for m, s in residents if s >= need]
        if singles:
            return [min(singles, key=lambda ms: self._reload_value(*ms))[0]]
        ranked = sorted(residents, key=lambda ms: self._reload_value(*ms) / max(ms[1], 1))
        chosen: list[tuple[str, int]] = []
        freed = 0
        for m, size in ranked:
            if freed >= need:
                break
            chosen.append((m, size))
            freed += size
        kept = []
        for m, size in reversed(chosen):  # drop the ones not needed after all
            if freed - size >= need:
                freed -= size
            else:
                kept.append(m)
        return kept[::-1]

    def _reload_value(self, model: str, size_bytes: int) -> float:
        """How much keeping ``model`` is worth: its share of requests times its load time."""
        return self.estimates.share(model) * self.estimates.load_ms(model, size_bytes=size_bytes)

    def _victim_cost(
        self, model: str, victims: list[str], device: str, directory: ClusterDirectory
    ) -> float:
        """Expected reload cost of evicting ``victims`` to make room for ``model``.

        A victim costs its load time times the chance that it is asked for again before
        ``model`` is (``share(v) / (share(v) + share(model))`` for two Poisson streams), halved
        if another device also holds it.
        """
        if not victims or self.victim_weight == 0:
            return 0.0
        estimates = self.estimates
        wanted = estimates.share(model)
        sizes: dict[str, int] | None = None
        cost = 0.0
        for victim in victims:
            share = estimates.share(victim)
            if share <= 0:
                continue
            reload_ms = estimates.measured_load_ms(victim)
            if reload_ms is None:
                if sizes is None:
                    sizes = {m: s for m, _, s in directory.residents(device)}
                reload_ms = estimates.load_ms(victim, size_bytes=sizes.get(victim, 0))
            again = 1.0 - math.exp(-share / wanted) if wanted > 0 else 1.0
            sole = len(_holder_ids(directory, victim)) <= 1
            cost += reload_ms * again * (1.0 if sole else 0.5)
        return self.victim_weight * cost


PolicyFactory = Callable[..., Policy]


def _lalb_o3(*, seed: int | None = None, estimates: Estimates | None = None) -> Policy:
    return LocalityAware(seed=seed, estimates=estimates, o3=True)


POLICIES: dict[str, PolicyFactory] = {
    "lb": LeastLoaded,
    "lalb": LocalityAware,
    "lalb-o3": _lalb_o3,
}


def make_policy(
    name: str, *, seed: int | None = None, estimates: Estimates | None = None
) -> Policy:
    """The policy called ``name`` (a key of :data:`POLICIES`), sharing ``estimates`` if given."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return factory(seed=seed, estimates=estimates)
