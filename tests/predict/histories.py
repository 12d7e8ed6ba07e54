"""A predictive policy that has seen one function's arrivals: the set-up property tests share."""

from __future__ import annotations

from collections.abc import Iterable

from gpufaas.cache.arrivals import PredictivePolicy


def policy_after(
    gaps: Iterable[float], *, name: str = "f", start: float = 1000.0
) -> PredictivePolicy:
    """A fresh :class:`PredictivePolicy` that saw ``name`` at ``start`` and then after each gap."""
    policy = PredictivePolicy()
    now = start
    policy.observe(name, now)
    for gap in gaps:
        now += gap
        policy.observe(name, now)
    return policy
