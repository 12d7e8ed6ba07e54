"""Which gateway replica owns a function: rendezvous (highest-random-weight) hashing.

Every replica computes the same owner for a function from the same membership, with no
coordination: the owner is the member whose ``hash(member, function)`` is highest. When a member
joins or leaves, only the functions it gains or held move (about 1/N of them), which is the
property a consistent-hash ring gives, without virtual nodes to tune. Lookups are cached per
function and the cache is dropped on every membership change, so a routing decision pays one
dict lookup.

The hash is BLAKE2b (keyed by nothing, stable across processes and Python versions), never
Python's salted ``hash()``: replicas must agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["Ring"]


def _weight(member: str, key: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Ring:
    """Owners of keys over a set of members; see the module docstring."""

    def __init__(self, members: Iterable[str] = ()) -> None:
        self._members: tuple[str, ...] = tuple(sorted(set(members)))
        self._owners: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Ring {list(self._members)}>"

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    def set_members(self, members: Iterable[str]) -> bool:
        """Adopt a new membership; True if it changed (cached owners are then dropped)."""
        new = tuple(sorted(set(members)))
        if new == self._members:
            return False
        self._members = new
        self._owners = {}
        return True

    def owner(self, key: str) -> str:
        """The member that owns ``key``. Raises :class:`LookupError` when there are none."""
        owner = self._owners.get(key)
        if owner is not None:
            return owner
        if not self._members:
            raise LookupError("the ring has no members")
        owner = max(self._members, key=lambda m: (_weight(m, key), m))
        if len(self._owners) >= 65536:  # bound memory: functions come and go
            self._owners = {}
        self._owners[key] = owner
        return owner
