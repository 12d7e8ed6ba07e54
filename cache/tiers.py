"""A chain of cache tiers, device -> host -> disk -> remote, with promotion and demotion as plans.

A model's weights live in the remote store (always) and may be cached on local disk, in host
memory and in device (GPU) memory, fastest first. :class:`TierChain` keeps one :class:`ByteLRU` of
bookkeeping per bounded tier and turns "get this model into this tier" into a list of
:class:`Move` s that the caller carries out (copying bytes is I/O, so it is not done here).

Policy (documented once here, relied on by the GPU manager):

* **Fill-through promotion.** Promoting a model from the fastest tier that holds it to a faster one
  copies it through every bounded tier in between (remote -> disk -> host -> device, as the bytes
  flow anyway) and leaves the copies there. So a slower tier usually already holds what a faster one
  holds, and evicting from the device is usually free. An in-between tier that cannot make room
  (its entries are pinned, or the model is larger than it) is skipped; only the target tier must
  take the model, else :class:`~gpufaas.cache.lru.InsufficientCapacity` is raised.
* **Non-inclusive eviction.** Each tier evicts by its own LRU order, so a slower tier may drop a
  model that a faster one still holds; we do not force inclusion because that would let a small
  device tier pin the host tier's contents.
* **Demotion of victims.** A victim leaving a tier goes to the fastest slower tier that either
  already holds it (a free drop, ``Move.copies`` is False) or can make room for it (a copy, placed
  most-recently used there, which may demote that tier's own victims in turn). Remote always
  holds everything, so a victim with nowhere else to go is just dropped (a move to ``REMOTE``).
* The model being promoted is never a victim while its own plan runs, and pinned or loading entries
  are never victims (see :class:`ByteLRU`).

:meth:`TierChain.plan_promotion` changes nothing; :meth:`TierChain.apply` records moves as done
(all or nothing) and counts them in :attr:`TierChain.stats`. For a long copy, the caller can instead
drive ``chain.tier(t)`` itself (``reserve``/``commit``/``pin``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Iterable, Mapping

from gpufaas.cache.lru import ByteLRU, CacheError, InsufficientCapacity, check_size
from gpufaas.cache.stats import CacheStats


class Tier(enum.StrEnum):
    """Cache tiers, fastest first. Compare speed with :attr:`rank`, not ``<`` (that compares names)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"

    @property
    def rank(self) -> int:
        """0 for the fastest tier, larger for slower ones."""
        return _RANKS[self]

    def faster_than(self, other: Tier) -> bool:
        return self.rank < other.rank


_RANKS = {tier: rank for rank, tier in enumerate(Tier)}
BOUNDED_TIERS: tuple[Tier, ...] = (Tier.DEVICE, Tier.HOST, Tier.DISK)


@dataclasses.dataclass(frozen=True)
class Move:
    """Move ``key`` (``size_bytes``) from ``src`` to ``dst``.

    A promotion (``dst`` faster) copies the key into ``dst`` and keeps it in ``src``. A demotion
    (``dst`` slower) removes it from ``src``; ``copies`` says whether the bytes must be copied into
    ``dst`` (False when ``dst`` already holds it, e.g. always for ``REMOTE``).
    """

    key: str
    src: Tier
    dst: Tier
    size_bytes: int
    copies: bool = True

    @property
    def is_promotion(self) -> bool:
        return self.dst.faster_than(self.src)

    @property
    def is_demotion(self) -> bool:
        return self.src.faster_than(self.dst)


class TierChain:
    """One byte-bounded LRU of bookkeeping per bounded tier; ``REMOTE`` holds everything.

    ``capacities`` names the bounded tiers present (any of device, host, disk); a tier left out is
    not in the chain and plans skip it.
    """

    def __init__(self, *, capacities: Mapping[Tier, int]) -> None:
        given: dict[Tier, int] = {}
        for name, capacity in capacities.items():
            try:
                tier = Tier(name)
            except ValueError:
                raise CacheError(
                    f"unknown tier {name!r}; expected one of {[t.value for t in BOUNDED_TIERS]}"
                ) from None
            if tier is Tier.REMOTE:
                raise CacheError("the remote tier is unbounded: give no capacity for it")
            given[tier] = check_size(capacity, what=f"capacity of tier {tier}")
        self._tiers: dict[Tier, ByteLRU[None]] = {
            tier: ByteLRU(capacity_bytes=given[tier]) for tier in BOUNDED_TIERS if tier in given
        }
        self.stats = CacheStats(tuple(self.tiers()))

    def __repr__(self) -> str:
        return f"<TierChain {self._tiers!r}>"

    def tiers(self) -> list[Tier]:
        """The tiers in the chain, fastest first, ``REMOTE`` last."""
        return [*self._tiers, Tier.REMOTE]

    def tier(self, tier: Tier) -> ByteLRU[None]:
        """The bookkeeping LRU of a bounded tier in the chain."""
        lru = self._tiers.get(tier)
        if lru is None:
            raise CacheError(f"tier {tier} is not a bounded tier of this chain ({self.tiers()})")
        return lru

    def locate(self, key: str) -> Tier:
        """The fastest tier holding ``key`` (``REMOTE`` if no bounded tier does). Touches nothing."""
        return _locate(self._tiers, key)

    def holders(self, key: str) -> list[Tier]:
        """Every tier holding ``key``, fastest first; always ends with ``REMOTE``."""
        return [*(tier for tier, lru in self._tiers.items() if key in lru), Tier.REMOTE]

    def lookup(self, key: str) -> Tier:
        """Like :meth:`locate`, but marks ``key`` used there and counts a hit there and a miss in
        each faster tier."""
        for tier, lru in self._tiers.items():
            if lru.get(key) is not None:
                self.stats.record_hit(tier)
                return tier
            self.stats.record_miss(tier)
        self.stats.record_hit(Tier.REMOTE)
        return Tier.REMOTE

    def plan_promotion(self, key: str, *, size_bytes: int, to: Tier = Tier.DEVICE) -> list[Move]:
        """The moves that bring ``key`` into tier ``to``, in the order to carry them out.

        Empty if ``key`` is already in ``to`` or a faster tier. Room-making demotions come before
        the move that needs the room. Raises :class:`InsufficientCapacity` if ``to`` cannot make
        room for ``size_bytes``. Changes nothing: the plan is worked out on a copy.
        """
        check_size(size_bytes)
        target = Tier(to)
        self.tier(target)  # raises for REMOTE or a tier not in the chain
        sim = _copy_tiers(self._tiers)
        moves: list[Move] = []
        src = _locate(sim, key)
        if not target.faster_than(src):
            return []
        protect = frozenset({key})
        path = [t for t in sim if not t.faster_than(target) and t.faster_than(src)]
        prev = src
        for tier in reversed(path):  # slowest first: the way the bytes flow
            try:
                _make_room(sim, moves, tier, size_bytes, protect)
            except InsufficientCapacity as error:
                if tier is target:
                    raise error.about(key=key, where=f"tier {tier}") from None
                continue  # fill-through is best effort: skip this in-between tier
            _record(sim, moves, Move(key, prev, tier, size_bytes))
            prev = tier
        return moves

    def apply(self, moves: Iterable[Move]) -> None:
        """Record ``moves`` as carried out, all or nothing.

        Raises :class:`CacheError` if a move does not fit the current state (e.g. the plan is stale
        because the chain changed since it was made); then nothing is changed.
        """
        moves = list(moves)
        trial = _copy_tiers(self._tiers)
        for move in moves:
            _execute(trial, move)
        for move in moves:
            _execute(self._tiers, move)
            self._count(move)

    def promote(self, key: str, *, size_bytes: int, to: Tier = Tier.DEVICE) -> list[Move]:
        """:meth:`plan_promotion` and :meth:`apply` it; return the moves to carry out."""
        moves = self.plan_promotion(key, size_bytes=size_bytes, to=to)
        self.apply(moves)
        return moves

    def remove(self, key: str) -> list[Tier]:
        """Drop ``key`` from every bounded tier, pinned or not (e.g. the model was deleted).

        Returns the tiers it was dropped from.
        """
        dropped = []
        for tier, lru in self._tiers.items():
            entry = lru.discard(key)
            if entry is not None:
                self.stats.record_eviction(tier, entry.size_bytes)
                dropped.append(tier)
        return dropped

    def _count(self, move: Move) -> None:
        if move.is_demotion:
            self.stats.record_eviction(move.src, move.size_bytes)
        if move.copies:
            self.stats.record_move(move.src, move.dst, move.size_bytes)


def _locate(tiers: Mapping[Tier, ByteLRU[None]], key: str) -> Tier:
    return next((tier for tier, lru in tiers.items() if key in lru), Tier.REMOTE)


def _copy_tiers(tiers: Mapping[Tier, ByteLRU[None]]) -> dict[Tier, ByteLRU[None]]:
    return {tier: lru.copy() for tier, lru in tiers.items()}


def _record(tiers: dict[Tier, ByteLRU[None]], moves: list[Move], move: Move) -> None:
    _execute(tiers, move)
    moves.append(move)


def _make_room(
    tiers: dict[Tier, ByteLRU[None]],
    moves: list[Move],
    tier: Tier,
    size_bytes: int,
    protect: Collection[str],
) -> None:
    """Demote victims of ``tier`` until ``size_bytes`` fit there; raise if they cannot."""
    lru = tiers[tier]
    for victim in lru.plan_victims(size_bytes, exclude=protect):
        entry = lru.peek(victim)
        assert entry is not None  # planned from this very LRU a moment ago
        _demote(tiers, moves, victim, tier, entry.size_bytes, protect)


def _demote(
    tiers: dict[Tier, ByteLRU[None]],
    moves: list[Move],
    key: str,
    src: Tier,
    size_bytes: int,
    protect: Collection[str],
) -> None:
    """Move victim ``key`` out of ``src`` to the fastest slower tier that holds it or takes it."""
    for tier in (t for t in tiers if src.faster_than(t)):
        if key in tiers[tier]:
            _record(tiers, moves, Move(key, src, tier, size_bytes, copies=False))
            return
        try:
            _make_room(tiers, moves, tier, size_bytes, protect)
        except InsufficientCapacity:
            continue
        _record(tiers, moves, Move(key, src, tier, size_bytes))
        return
    _record(tiers, moves, Move(key, src, Tier.REMOTE, size_bytes, copies=False))


def _execute(tiers: dict[Tier, ByteLRU[None]], move: Move) -> None:
    """Carry out ``move`` on ``tiers`` (bookkeeping only); raise :class:`CacheError` if it is invalid."""
    src, dst = Tier(move.src), Tier(move.dst)
    if src is dst:
        raise CacheError(f"invalid move of {move.key!r}: source and destination are both {src}")
    for tier in (src, dst):
        if tier is not Tier.REMOTE and tier not in tiers:
            raise CacheError(f"invalid move of {move.key!r}: tier {tier} is not in the chain")
    if src is not Tier.REMOTE and move.key not in tiers[src]:
        raise CacheError(f"stale move: {move.key!r} is not in tier {src}")
    if dst is not Tier.REMOTE:
        held = move.key in tiers[dst]
        if move.copies and held:
            raise CacheError(f"stale move: {move.key!r} is already in tier {dst}")
        if not move.copies and not held:
            raise CacheError(f"stale move: {move.key!r} is not in tier {dst} to fall back on")
    if move.is_demotion:
        tiers[src].evict(move.key)  # raises EntryPinned if it became pinned
    elif src is not Tier.REMOTE:
        tiers[src].touch(move.key)  # the source copy was just used
    if move.copies and dst is not Tier.REMOTE:
        tiers[dst].put(move.key, None, size_bytes=move.size_bytes)
