"""Each miss's cause, from what the gateway's view said when it routed the request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gpufaas.cache import Residency
from gpufaas.scheduler.misses import MissCauses, miss_cause


def test_a_miss_on_a_device_the_view_placed_the_model_on_is_a_stale_hit() -> None:
    def cause(view: Residency | None, **kw: bool) -> str:
        flags = {"held_elsewhere": False, "forwarded_in": False, "forward_failed": False}
        return miss_cause(view=view, **{**flags, **kw})

    assert cause(Residency.RESIDENT) == "stale_resident"
    assert cause(Residency.LOADING) == "stale_loading"
    # whatever else is true, a request sent as a hit that missed is stale
    assert cause(Residency.RESIDENT, forwarded_in=True, forward_failed=True) == "stale_resident"
    assert cause(None) == "placed"
    assert cause(None, held_elsewhere=True) == "placed_replica"
    assert cause(None, forwarded_in=True) == "placed_for_peer"
    assert cause(None, forwarded_in=True, forward_failed=True) == "placed_after_failed_forward"


def test_causes_are_counted_by_label() -> None:
    registry = CollectorRegistry()
    misses = MissCauses(registry)
    for view in (Residency.RESIDENT, Residency.RESIDENT, None):
        misses.note(view=view, held_elsewhere=False, forwarded_in=False, forward_failed=False)
    value = registry.get_sample_value
    assert value("gpufaas_gateway_misses_total", {"cause": "stale_resident"}) == 2
    assert value("gpufaas_gateway_misses_total", {"cause": "placed"}) == 1
