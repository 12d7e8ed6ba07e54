"""Why a gateway's requests missed the device cache (scale-out, #16; docs/scheduling.md).

Every answer a GPU manager gives says hit or miss; the gateway knows what its own view said
when it routed the request. Together they name the miss's cause:

- ``placed``: this gateway decided the load (the view had the model nowhere it could use);
  ``placed_replica`` when the view held the model on another device (a second copy or a move).
- ``placed_for_peer``: as ``placed``, for a request a peer forwarded here (the placement owner).
- ``placed_by_owner``: a request this replica dispatched where the placement owner decided
  (forwarding ``decision``: the owner answered the question, this replica sent the request).
- ``placed_after_failed_forward``: the owner could not be reached, so this replica placed it.
- ``stale_resident`` / ``stale_loading``: a *stale hit*. The view said the model was on the
  device (resident, or loading), the request went there as a hit, and the manager had to load
  it: the view was wrong (another replica's eviction not yet seen, or the manager evicted
  something other than the victims predicted). A ``stale_loading`` one may also be a request
  that joined a load still running (the manager counts that as a miss, as with one gateway).

So scale-out's extra misses can be told apart from the ones one gateway has as well.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from gpufaas.cache import Residency

__all__ = ["MissCause", "MissCauses", "miss_cause"]

MissCause = Literal[
    "placed",
    "placed_replica",
    "placed_for_peer",
    "placed_by_owner",
    "placed_after_failed_forward",
    "stale_resident",
    "stale_loading",
]


def miss_cause(
    *,
    view: Residency | None,
    held_elsewhere: bool,
    forwarded_in: bool,
    forward_failed: bool,
    by_owner: bool = False,
) -> MissCause:
    """The cause of a miss, from what the view said when the request was routed (``by_owner``:
    the placement owner chose the device, whatever this view said)."""
    if by_owner:
        return "placed_by_owner"
    if view is Residency.RESIDENT:
        return "stale_resident"
    if view is not None:
        return "stale_loading"
    if forward_failed:
        return "placed_after_failed_forward"
    if forwarded_in:
        return "placed_for_peer"
    return "placed_replica" if held_elsewhere else "placed"


class MissCauses:
    """``gpufaas_gateway_misses_total{cause}``: each miss this gateway saw, by cause."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "gpufaas_gateway_misses",
            "Device-cache misses of this gateway's requests, by cause (placed: a load this "
            "gateway decided; stale_*: routed as a hit per a stale view, a stale hit)",
            ["cause"],
            registry=registry,
        )

    def note(
        self,
        *,
        view: Residency | None,
        held_elsewhere: bool,
        forwarded_in: bool,
        forward_failed: bool,
        by_owner: bool = False,
    ) -> MissCause:
        cause = miss_cause(
            view=view,
            held_elsewhere=held_elsewhere,
            forwarded_in=forwarded_in,
            forward_failed=forward_failed,
            by_owner=by_owner,
        )
        self.counter.labels(cause).inc()
        return cause
