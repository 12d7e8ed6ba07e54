"""Prometheus counters and histograms for the request path: plain numbers, exposed on collection.

``prometheus_client``'s own ``Counter.inc`` and ``Histogram.observe`` take a lock, check the
metric's state and walk the buckets under it: ~1.5-3 µs each on this machine's cores, and the
gateway counts every request five times (``docs/dataplane.md``). The request path runs on one
event loop thread, so these keep plain Python numbers per label set and turn them into metric
families only when ``/metrics`` is scraped (a :class:`~prometheus_client.registry.Collector`).
The exposition is the same as ``prometheus_client``'s (``<name>_total``, ``_bucket``, ``_count``,
``_sum``) but for the ``_created`` samples, which are left out.

Count from the thread that owns the event loop: increments are not locked (a scrape from
another thread may read numbers a moment old).

    registry = CollectorRegistry()
    requests = LoopCounter("gpufaas_requests", "Inference requests", ["model", "code"],
                           registry=registry)
    requests.labels("tiny-mlp", "200").inc()
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LoopCounter", "LoopHistogram"]


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds  # ascending, +Inf last
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        if registry is not None:
            registry.register(self)

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")


class LoopCounter(_Family):
    """A counter with labels whose children are plain numbers (see the module docstring)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        self._children: dict[tuple[str, ...], _CounterChild] = {}

    def labels(self, *values: str) -> _CounterChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = _CounterChild()
        return child

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        return [family]


class LoopHistogram(_Family):
    """A histogram with labels whose children are plain bucket counts (see the module
    docstring); ``buckets`` are the upper bounds, +Inf added as ``prometheus_client`` does."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = _HistogramChild(self.bounds)
        return child

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else _bound(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        return [family]


def _bound(bound: float) -> str:
    # as prometheus_client writes its "le" labels: 0.005, 1.0, 10.0
    return repr(float(bound))
