"""Per-function arrival models and the residency decisions they drive (pure: no I/O, no clock).

The gateway sees every request; feeding each arrival to a model here (:meth:`observe`) lets it
predict when a function will be asked for again, and so which models are worth keeping on a
device, worth demoting to host memory, or worth loading before their request arrives. Three
policies share one interface (:class:`ResidencyPolicy`), so the simulator and the gateway's
prefetch driver run the same decisions:

* :class:`FixedKeepAlive`: keep a model for a fixed time after its last request (AWS Lambda uses
  10 minutes, Azure Functions 20); never prefetch. Under memory pressure: LRU.
* :class:`HybridHistogram`: Azure Functions' production policy (Shahrad et al., ATC'20,
  "Serverless in the Wild"), as published: a histogram of idle times over 4 hours in 1-minute
  bins; pre-warm at the 5th percentile and keep alive until the 99th, each with a 10% margin;
  a fixed keep-alive when the histogram is not representative (too few samples, or a bin-count
  coefficient of variation under 2); a time-series forecast of the next idle time when most
  idle times fall outside the range. docs/prediction.md lists where we depart from the paper.
* :class:`PredictivePolicy` (ours): a decayed histogram of inter-arrival gaps on a log scale
  (0.1 s to 4 h), a periodicity detector, and a cost-aware rule: keep (or prefetch) a model while
  the expected load time saved, ``P(arrival within the horizon | idle so far) x reload_ms``,
  is at least what holding it costs, ``price x GB x horizon``; when a load must evict, the set
  of victims that frees its bytes at the least expected miss cost, each victim's miss weighted
  by the chance that it is asked for before the loading model's next request, counting the
  requests that join its reload and the evictions a returning victim makes again (a learned,
  size-aware approximation of Belady's rule).
  :func:`eviction_plan` chooses a device's victims for the simulator and the gateway alike.
* :class:`SwitchingPolicy` (an option): ours, switched per function to another rule (the hybrid
  histogram) where a causal shadow account of both rules' costs says that rule did better.

Times are seconds on one clock chosen by the caller. To survive a restart, the caller uses wall
time and persists :meth:`snapshot`; :meth:`restore` takes it back (the I/O is the caller's).
A function with no history (fewer than two arrivals) gets each policy's documented fallback.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

GB = 1e9
MINUTE = 60.0
HOUR = 3600.0
SNAPSHOT_VERSION = 1


class ArrivalError(ValueError):
    """A snapshot or a parameter the models cannot use."""


@dataclasses.dataclass(frozen=True)
class Advice:
    """What to do with one function's model in one tier now.

    ``keep``: if it is there, keep it (False: release or demote it). ``prefetch``: if it is not
    there, load it now, ahead of a predicted request. ``reason`` names the rule that decided.
    """

    keep: bool
    prefetch: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A resident model that could be evicted: its bytes, what reloading it would cost, and how
    many other devices hold a copy (its requests can go there instead)."""

    function: str
    size_bytes: int
    reload_ms: float
    copies_elsewhere: int = 0


class ResidencyPolicy(Protocol):
    name: str
    may_prefetch: bool  # False: advise() never says prefetch (callers skip asking)

    def observe(self, function: str, now_s: float) -> None: ...

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice: ...

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]: ...

    def victim_plan(
        self,
        candidates: Sequence[Candidate],
        need_bytes: int,
        now_s: float,
        *,
        loading: str | None = None,
    ) -> list[str]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


def _finite(value: float, what: str, *, minimum: float = 0.0) -> float:
    if not math.isfinite(value) or value < minimum:
        raise ArrivalError(f"{what} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


class _LastSeen:
    """Each function's last arrival; arrivals out of order (an older time) are ignored."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def gap(self, function: str, now_s: float) -> float | None:
        """Record an arrival; return the gap since the previous one (None: first, or stale)."""
        previous = self.last.get(function)
        if previous is not None and now_s < previous:
            return None
        self.last[function] = now_s
        return None if previous is None else now_s - previous

    def idle(self, function: str, now_s: float) -> float | None:
        previous = self.last.get(function)
        return None if previous is None else max(0.0, now_s - previous)


# -- the fixed keep-alive --------------------------------------------------------------------------


class FixedKeepAlive:
    """Keep a model ``keepalive_s`` after its last request; evict least-recently used first."""

    def __init__(self, *, keepalive_s: float = 10 * MINUTE) -> None:
        self.keepalive_s = _finite(keepalive_s, "keepalive_s")
        self.name = f"keepalive-{keepalive_s / MINUTE:g}min"
        self.may_prefetch = False
        self._seen = _LastSeen()

    def observe(self, function: str, now_s: float) -> None:
        self._seen.gap(function, now_s)

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        idle = self._seen.idle(function, now_s)
        keep = idle is not None and idle <= self.keepalive_s
        return Advice(keep=keep, prefetch=False, reason="keepalive")

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]:
        return []  # LRU

    def victim_plan(
        self,
        candidates: Sequence[Candidate],
        need_bytes: int,
        now_s: float,
        *,
        loading: str | None = None,
    ) -> list[str]:
        return []  # LRU

    def snapshot(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, "kind": "fixed", "last": dict(self._seen.last)}

    def restore(self, state: Mapping[str, Any]) -> None:
        _check_snapshot(state, "fixed")
        self._seen.last = {str(k): float(v) for k, v in state["last"].items()}


def _check_snapshot(state: Mapping[str, Any], kind: str) -> None:
    if not isinstance(state, Mapping) or state.get("version") != SNAPSHOT_VERSION:
        raise ArrivalError(f"not an arrival-model snapshot of version {SNAPSHOT_VERSION}")
    if state.get("kind") != kind:
        raise ArrivalError(f"snapshot is of a {state.get('kind')!r} model, not {kind!r}")


# -- Azure's hybrid histogram ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Windows:
    """A function's windows after its last request: unloaded until ``prewarm_s`` (0: never
    unloaded), then loaded for ``keepalive_s``. ``source`` is the rule that set them."""

    prewarm_s: float
    keepalive_s: float
    source: str

    def loaded(self, idle_s: float) -> bool:
        return self.prewarm_s <= idle_s <= self.prewarm_s + self.keepalive_s


@dataclasses.dataclass
class _IdleHistogram:
    counts: list[int]
    oob: list[float]  # the latest idle times beyond the range (for the forecast)
    total: int = 0
    oob_total: int = 0


class HybridHistogram:
    """The hybrid histogram policy of Shahrad et al. (ATC'20), as published.

    Per function, a histogram of idle times (here: the gaps between request arrivals) in
    ``bin_s`` bins over ``range_s``. After each request:

    * if most idle times (> ``oob_fraction``) were beyond the range: forecast the next one
      (:func:`forecast_idle`, an AR(1) on log idle times standing in for the paper's ARIMA) and
      pre-warm at 85% of it, keeping alive for 30% of it (15% either side);
    * else if the histogram is representative (at least ``min_samples`` idle times and a
      coefficient of variation of its bin counts of at least ``cv_threshold``): pre-warm at the
      ``head`` percentile minus ``margin``, keep alive until the ``tail`` percentile plus
      ``margin``; a pre-warm window under one bin is 0 (the model stays loaded);
    * else (including a function with no history): the fixed fallback, no pre-warm and a
      keep-alive of ``fallback_keepalive_s`` (the histogram's range, as published).

    ``restore_inside`` (default): a model inside its window that is not loaded is prefetched
    even without a pre-warm window; False is the published rule (only a pre-warm loads).

    Under memory pressure it evicts least-recently used first (the paper assumes unbounded
    memory and names no eviction order).
    """

    name = "hybrid-histogram"
    may_prefetch = True

    def __init__(
        self,
        *,
        bin_s: float = MINUTE,
        range_s: float = 4 * HOUR,
        head: float = 5.0,
        tail: float = 99.0,
        margin: float = 0.10,
        cv_threshold: float = 2.0,
        min_samples: int = 5,
        oob_fraction: float = 0.5,
        fallback_keepalive_s: float | None = None,
        restore_inside: bool = True,
    ) -> None:
        self.bin_s = _finite(bin_s, "bin_s", minimum=1e-3)
        self.range_s = _finite(range_s, "range_s", minimum=self.bin_s)
        if not 0 <= head < tail <= 100:
            raise ArrivalError(f"need 0 <= head < tail <= 100, got {head}, {tail}")
        self.head, self.tail, self.margin = head, tail, _finite(margin, "margin")
        self.cv_threshold = cv_threshold
        self.min_samples = min_samples
        self.oob_fraction = oob_fraction
        self.fallback_keepalive_s = (
            self.range_s if fallback_keepalive_s is None else float(fallback_keepalive_s)
        )
        self.restore_inside = restore_inside
        self.bins = math.ceil(self.range_s / self.bin_s)
        self._seen = _LastSeen()
        self._hist: dict[str, _IdleHistogram] = {}
        self._windows: dict[str, Windows] = {}

    def observe(self, function: str, now_s: float) -> None:
        idle = self._seen.gap(function, now_s)
        if idle is None:
            return
        h = self._hist.get(function)
        if h is None:
            h = self._hist[function] = _IdleHistogram(counts=[0] * self.bins, oob=[])
        if idle >= self.range_s:
            h.oob_total += 1
            h.oob.append(idle)
            del h.oob[:-16]
        else:
            h.counts[int(idle // self.bin_s)] += 1
            h.total += 1
        self._windows.pop(function, None)  # recomputed on the next question

    def windows(self, function: str) -> Windows:
        cached = self._windows.get(function)
        if cached is None:
            cached = self._windows[function] = self._compute(self._hist.get(function))
        return cached

    def _compute(self, h: _IdleHistogram | None) -> Windows:
        fallback = Windows(0.0, self.fallback_keepalive_s, "fixed")
        if h is None:
            return fallback
        seen = h.total + h.oob_total
        if seen and h.oob_total / seen > self.oob_fraction:
            predicted = forecast_idle(h.oob)
            return Windows(0.85 * predicted, 0.30 * predicted, "forecast")
        if h.total < self.min_samples or bin_count_cv(h.counts) < self.cv_threshold:
            return fallback
        head_bin = _percentile_bin(h.counts, h.total, self.head)
        tail_bin = _percentile_bin(h.counts, h.total, self.tail)
        # the head bin's lower edge, less the margin; in the first bin: never unloaded
        prewarm = head_bin * self.bin_s * (1 - self.margin) if head_bin > 0 else 0.0
        keep_until = (tail_bin + 1) * self.bin_s * (1 + self.margin)  # the tail bin's upper edge
        return Windows(prewarm, max(0.0, keep_until - prewarm), "histogram")

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        idle = self._seen.idle(function, now_s)
        if idle is None:
            return Advice(keep=False, prefetch=False, reason="no-history")
        w = self.windows(function)
        inside = w.loaded(idle)
        # As published, only a pre-warm loads a model; with ``restore_inside`` a model that is
        # inside its window but not loaded (the tiers of a fresh node, or a capacity eviction,
        # which the paper's unbounded memory never makes) is loaded too: the steady state the
        # policy assumes, so the baseline is at its best.
        prefetch = inside and (w.prewarm_s > 0 or self.restore_inside)
        return Advice(keep=inside, prefetch=prefetch, reason=w.source)

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]:
        return []  # LRU

    def victim_plan(
        self,
        candidates: Sequence[Candidate],
        need_bytes: int,
        now_s: float,
        *,
        loading: str | None = None,
    ) -> list[str]:
        return []  # LRU

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "kind": "hybrid",
            "bin_s": self.bin_s,
            "bins": self.bins,
            "last": dict(self._seen.last),
            "hist": {
                f: {"counts": h.counts, "oob": h.oob, "total": h.total, "oob_total": h.oob_total}
                for f, h in self._hist.items()
            },
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        _check_snapshot(state, "hybrid")
        if state["bins"] != self.bins or state["bin_s"] != self.bin_s:
            raise ArrivalError("snapshot's histogram bins differ from this policy's")
        self._seen.last = {str(k): float(v) for k, v in state["last"].items()}
        self._hist = {}
        for f, h in state["hist"].items():
            counts = [int(c) for c in h["counts"]]
            if len(counts) != self.bins or min(counts, default=0) < 0:
                raise ArrivalError(f"snapshot histogram of {f!r} is malformed")
            self._hist[str(f)] = _IdleHistogram(
                counts=counts,
                oob=[float(x) for x in h["oob"]][-16:],
                total=int(h["total"]),
                oob_total=int(h["oob_total"]),
            )
        self._windows = {}


def bin_count_cv(counts: Sequence[int]) -> float:
    """Coefficient of variation of a histogram's bin counts (0 for an empty histogram)."""
    n = len(counts)
    total = sum(counts)
    if n == 0 or total == 0:
        return 0.0
    mean = total / n
    variance = sum((c - mean) ** 2 for c in counts) / n
    return math.sqrt(variance) / mean


def _percentile_bin(counts: Sequence[int], total: int, percentile: float) -> int:
    """The first bin at which the cumulative count reaches ``percentile`` % of ``total``."""
    target = max(1.0, total * percentile / 100.0)
    running = 0
    for i, c in enumerate(counts):
        running += c
        if running >= target:
            return i
    return len(counts) - 1


def forecast_idle(history: Sequence[float]) -> float:
    """The next idle time after ``history`` (seconds): an AR(1) fitted by least squares to the
    logarithms (the paper uses ARIMA; with under three values, the last value)."""
    if not history:
        raise ArrivalError("no idle times to forecast from")
    logs = [math.log(max(x, 1e-3)) for x in history]
    if len(logs) < 3:
        return history[-1]
    mean = sum(logs) / len(logs)
    x = [v - mean for v in logs[:-1]]
    y = [v - mean for v in logs[1:]]
    denominator = sum(a * a for a in x)
    phi = sum(a * b for a, b in zip(x, y, strict=True)) / denominator if denominator > 0 else 0.0
    phi = max(-1.0, min(1.0, phi))
    return math.exp(mean + phi * (logs[-1] - mean))


# -- ours ----------------------------------------------------------------------------------------


_LO_S = 0.1  # first bin: gaps under 0.1 s
_HI_S = 4 * HOUR  # last bin: gaps of 4 h or more
_BINS = 64
_RATIO = (_HI_S / _LO_S) ** (1 / (_BINS - 2))
# bin 0: [0, LO); bin k (1..BINS-2): [LO * R^(k-1), LO * R^k); bin BINS-1: [HI, inf)
_EDGES = [0.0] + [_LO_S * _RATIO**k for k in range(_BINS - 1)]  # lower edges, len BINS
_LOG_LO, _LOG_R = math.log(_LO_S), math.log(_RATIO)
_HOLD_OCTAVES = 10  # expected_hold's grid: horizon / 2^10 ... horizon (30 s: from 29 ms)
_MIN_HOLD_S = 1e-3
_NEXT_USE_POINTS = 8  # slices of the loading model's next-use distribution (victim_plan)
# where that distribution is read: 0.1 s to 4 h in steps of sqrt(2)
_NEXT_USE_GRID = [_LO_S * 2 ** (k / 2) for k in range(int(2 * math.log2(_HI_S / _LO_S)) + 1)]


def gap_bin(gap_s: float) -> int:
    """The log-scale bin of a gap in seconds."""
    if gap_s < _LO_S:
        return 0
    return min(_BINS - 1, 1 + int((math.log(gap_s) - _LOG_LO) / _LOG_R))


@dataclasses.dataclass
class _GapModel:
    weights: list[float]
    total: float = 0.0
    step: float = 1.0  # the weight of the next gap (grows, so older gaps count less)
    gaps: int = 0
    mean: float = 0.0  # EWMA of the gap, and of its squared deviation (periodicity)
    var: float = 0.0
    cumulative: list[float] | None = None  # cached CDF at the lower edges, None: stale


class GapHistory:
    """What ``PredictivePolicy`` learns of each function's arrivals, and what that predicts.

    Per function, each inter-arrival gap adds weight to a bin of a 64-bin log-scale histogram
    (0.1 s to 4 h); weights decay with a half-life of ``half_life`` gaps. A function whose
    recent gaps have a coefficient of variation under ``periodic_cv`` is periodic: its next
    gap is a normal around the mean gap. ``P`` is mixed with a memoryless arrival at the mean
    gap, weighted ``max(smoothing, prior_gaps / (prior_gaps + gaps))`` (see the policy).
    Pure state and arithmetic: no decision is made here.
    """

    def __init__(
        self, *, half_life: float, periodic_cv: float, smoothing: float, prior_gaps: float
    ) -> None:
        self.half_life = _finite(half_life, "half_life", minimum=1.0)
        self.periodic_cv = _finite(periodic_cv, "periodic_cv")
        if not 0.0 <= smoothing <= 1.0:
            raise ArrivalError(f"smoothing must be in [0, 1], got {smoothing!r}")
        self.smoothing = smoothing
        self.prior_gaps = _finite(prior_gaps, "prior_gaps")
        self._growth = 2 ** (1 / self.half_life)
        self.seen = _LastSeen()
        self._models: dict[str, _GapModel] = {}

    # -- learning --------------------------------------------------------------------------------

    def observe(self, function: str, now_s: float) -> None:
        """One request for ``function`` at ``now_s``: O(1)."""
        gap = self.seen.gap(function, now_s)
        if gap is None:
            return
        m = self._models.get(function)
        if m is None:
            m = self._models[function] = _GapModel(weights=[0.0] * _BINS)
        m.weights[gap_bin(gap)] += m.step
        m.total += m.step
        m.step *= self._growth
        if m.step > 1e100:  # rescale before the floats overflow; ratios are unchanged
            scale = 1 / m.step
            m.weights = [w * scale for w in m.weights]
            m.total *= scale
            m.step = 1.0
        m.cumulative = None
        if m.gaps == 0:
            m.mean, m.var = gap, 0.0
        else:
            alpha = 0.2
            deviation = gap - m.mean
            m.mean += alpha * deviation
            m.var = (1 - alpha) * (m.var + alpha * deviation * deviation)
        m.gaps += 1

    # -- predicting ------------------------------------------------------------------------------

    def has_history(self, function: str) -> bool:
        return function in self._models

    def periodic(self, function: str) -> float | None:
        """The period in seconds if the function's recent gaps are regular, else None."""
        m = self._models.get(function)
        if m is None or m.gaps < 4 or m.mean < 1.0:
            return None
        return m.mean if math.sqrt(m.var) <= self.periodic_cv * m.mean else None

    def survival(self, function: str, age_s: float) -> float:
        """P(the gap after the last arrival exceeds ``age_s``); 1.0 with no history."""
        m = self._models.get(function)
        if m is None or m.total <= 0:
            return 1.0
        if m.gaps >= 4 and m.mean >= 1.0 and m.var <= (self.periodic_cv * m.mean) ** 2:
            period = m.mean  # periodic (as :meth:`periodic`, inlined: this is the hot path)
            spread = max(math.sqrt(m.var), 0.02 * period)
            return 0.5 * math.erfc((age_s - period) / (spread * math.sqrt(2)))
        if m.cumulative is None:
            running, cumulative = 0.0, []
            for w in m.weights:
                cumulative.append(running / m.total)
                running += w
            m.cumulative = cumulative
        return max(0.0, 1.0 - _cdf(m.cumulative, m.weights, m.total, age_s))

    def p_arrival(self, function: str, idle_s: float, within_s: float) -> float:
        """P(a request for ``function`` within ``within_s``, given it has been idle ``idle_s``)."""
        return self.p_arrivals(function, idle_s, (within_s,))[0]

    def p_arrivals(self, function: str, idle_s: float, within: Sequence[float]) -> list[float]:
        """:meth:`p_arrival` for each of ``within`` (the survival at ``idle_s`` computed once)."""
        idle_s = max(0.0, idle_s)
        alive = self.survival(function, idle_s)
        if alive < 1e-9 or idle_s >= _HI_S:
            # past every gap seen (or the histogram's range): exponential residual, mean idle_s
            scale = max(idle_s, 1e-3)
            return [1.0 - math.exp(-max(0.0, w) / scale) for w in within]
        weight, mean = 0.0, 1e-3
        m = self._models.get(function)
        if m is not None and m.gaps > 0:
            # a periodic function's normal has passed its own confidence gate (regular gaps)
            regular = m.gaps >= 4 and m.mean >= 1.0 and m.var <= (self.periodic_cv * m.mean) ** 2
            weight = self.smoothing if regular else self.prior_weight(m.gaps)
            mean = max(m.mean, 1e-3)
        out = []
        for w in within:
            w = max(0.0, w)
            later = self.survival(function, idle_s + w)
            p = min(1.0, max(0.0, (alive - later) / alive))
            if weight > 0:
                # A histogram of a few hundred gaps has empty bins between its modes, where it
                # says "no request can come", and one of a few gaps knows little: mix in a
                # memoryless arrival at the mean gap, weighted more the fewer gaps were seen.
                poisson = 1.0 - math.exp(-w / mean)
                p = (1.0 - weight) * p + weight * poisson
            out.append(p)
        return out

    def prior_weight(self, gaps: int) -> float:
        """The memoryless prior's weight after ``gaps`` gaps: ``smoothing``, or more while the
        histogram is young (``prior_gaps / (prior_gaps + gaps)``, a pseudo-count)."""
        if self.prior_gaps <= 0:
            return self.smoothing
        return max(self.smoothing, self.prior_gaps / (self.prior_gaps + gaps))

    def idle(self, function: str, now_s: float) -> float | None:
        """Seconds since ``function``'s last request; None if it has none."""
        return self.seen.idle(function, now_s)

    def mean_gap(self, function: str) -> float | None:
        """The EWMA of ``function``'s gaps; None before its first gap."""
        m = self._models.get(function)
        return m.mean if m is not None and m.gaps > 0 else None

    def expected_hold(self, function: str, idle_s: float, horizon_s: float) -> float:
        """E[min(time to the next request, ``horizon_s``)] for a model idle ``idle_s``: how long
        holding it is expected to take to earn its hit, at most the horizon. The integral of
        P(no request within t) over [0, horizon], by the trapezoid rule on a geometric grid of
        ratio sqrt(2) from horizon / 2^10 (fine where a hot function's survival falls)."""
        grid = [horizon_s * 2 ** (-k / 2) for k in range(2 * _HOLD_OCTAVES, -1, -1)]
        total, before_t, before_s = 0.0, 0.0, 1.0
        for t, p in zip(grid, self.p_arrivals(function, idle_s, grid), strict=True):
            s = 1.0 - p
            total += (t - before_t) * (before_s + s) / 2
            before_t, before_s = t, s
        return total

    def next_use_times(self, function: str) -> list[float] | None:
        """When ``function``'s next request may come, from a request now: the midpoints of
        ``_NEXT_USE_POINTS`` equally likely slices of its learned gap distribution
        (``P(gap <= t)`` inverted, log-linearly between the points of a grid from 0.1 s to 4 h
        in steps of sqrt(2)); past 4 h, 4 h. ``P(T_m < T)`` for another model's time to its
        request ``T_m`` is then the mean of ``P(T_m <= t)`` over them. None without a history."""
        if function not in self._models:
            return None
        cdf = self.p_arrivals(function, 0.0, _NEXT_USE_GRID)
        grid = _NEXT_USE_GRID
        out = []
        for k in range(_NEXT_USE_POINTS):
            q = (k + 0.5) / _NEXT_USE_POINTS
            j = bisect.bisect_left(cdf, q)
            if j == 0:
                out.append(grid[0])
            elif j == len(cdf):
                out.append(grid[-1])
            else:  # log-linear between the two grid points around the quantile
                share = (q - cdf[j - 1]) / max(cdf[j] - cdf[j - 1], 1e-12)
                out.append(grid[j - 1] * (grid[j] / grid[j - 1]) ** share)
        return out

    # -- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The last-seen times and the models (without the policy's version and kind)."""
        return {
            "last": dict(self.seen.last),
            "models": {
                f: {
                    "weights": [w / m.step for w in m.weights],
                    "total": m.total / m.step,
                    "gaps": m.gaps,
                    "mean": m.mean,
                    "var": m.var,
                }
                for f, m in self._models.items()
            },
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        last = {str(k): float(v) for k, v in state["last"].items()}
        models: dict[str, _GapModel] = {}
        for f, m in state["models"].items():
            weights = [float(w) for w in m["weights"]]
            total = float(m["total"])
            if (
                len(weights) != _BINS
                or any(not (math.isfinite(w) and w >= 0) for w in weights)
                or not (math.isfinite(total) and total > 0)
            ):
                raise ArrivalError(f"snapshot model of {f!r} is malformed")
            models[str(f)] = _GapModel(
                weights=weights,
                total=total,
                gaps=int(m["gaps"]),
                mean=float(m["mean"]),
                var=float(m["var"]),
            )
        self.seen.last, self._models = last, models


class PredictivePolicy:
    """Ours: decayed log-scale gap histograms, periodicity, and a cost-aware keep/prefetch rule.

    Per function, each inter-arrival gap adds weight to a bin of a 64-bin log-scale histogram
    (0.1 s to 4 h); weights decay with a half-life of ``half_life`` gaps, so the model follows a
    function whose pattern changes. A function whose recent gaps have a coefficient of variation
    under ``periodic_cv`` (an EWMA over its gaps) is *periodic*: its next gap is predicted as a
    normal distribution around the mean gap, which is sharper than any histogram bin.

    From either, ``S(a)`` = P(gap > a), and for a model idle for ``a`` seconds
    ``P(arrival within h) = (S(a) - S(a + h)) / S(a)``; past every gap ever seen, the residual
    is taken as exponential with mean ``a`` (the longer idle, the longer expected).

    The rule, per tier, with ``reload_ms`` the load time saved by holding the model there:

    * keep while ``P(arrival within horizon) x reload_ms >= price x GB x E[min(time to the
      request, horizon)]``: the rent is paid until the request, where the decision is made
      again (:meth:`pays`; ``rent_to_hit`` off: for the whole horizon, the rule before);
    * prefetch a model that is not there when, looking ``lead_s + horizon`` ahead (``lead_s``
      covers the load), the same inequality holds;
    * when a load must evict, the cheapest set of victims (:meth:`victim_plan`); with
      ``victim_sets`` off, by least expected miss cost saved per byte held (:meth:`value`;
      with ``by_density``, per byte-second: LHD's hit density, weighted by a miss's cost).

    The histogram's ``P`` is mixed with a memoryless arrival at the mean gap,
    ``(1 - smoothing) x P + smoothing x (1 - exp(-h / mean gap))``: a histogram of a few hundred
    gaps has empty bins between its modes, where it would say no request can come.

    While the histogram is young the prior weighs more: ``max(smoothing, prior_gaps /
    (prior_gaps + gaps))``, a pseudo-count of ``prior_gaps`` memoryless gaps (a confidence gate:
    a histogram of three gaps is not trusted to say "no request can come").

    With ``max_horizon_s`` the rule also looks over longer horizons (``horizon_s`` x 4, x 16, ...
    up to it) and keeps (prefetches) if it pays over any of them: a model idle in a hole between
    two modes of its gaps is not due within 30 s, but is within 10 minutes.

    A device miss costs its load and also ``miss_ms`` for the wait itself (a missed latency
    objective: every cold start counts, not only its length), so the device rule and the victim
    order weigh ``reload_ms + miss_ms``; without it the value per byte of a model is nearly its
    size-independent ``P`` (reload time grows with size) and a large model is kept as readily as
    a small one, which costs cold starts per byte held. The host tier's rule ignores it (a host
    miss only lengthens a load).

    With ``break_even`` (x, default 1 since the fifteenth session; 0: off, the rule before) a
    device copy is also kept while its idle time's rent is at most x misses' cost (``idle x
    rent <= x x (reload_ms + miss_ms)``): ski rental's break-even keep-alive under the learned
    rule, so a histogram that wrongly says "no request soon" cannot demote a model before
    holding it would have cost one miss (prefetching and the host tier are unchanged).

    ``device_price`` and ``host_price`` are in ms of load time per GB-second held: the exchange
    rate between cold-start time and memory-time (swept in the benchmark); ``host_price``
    defaults to a twentieth of ``device_price``. A function with fewer
    than two arrivals falls back to a fixed keep-alive of ``fallback_keepalive_s`` and is never
    prefetched.
    """

    name = "predictive"
    may_prefetch = True

    def __init__(
        self,
        *,
        device_price: float = 1.0,
        host_price: float | None = None,
        horizon_s: float = 30.0,
        lead_s: float = 5.0,
        half_life: float = 256.0,
        periodic_cv: float = 0.1,
        fallback_keepalive_s: float = 10 * MINUTE,
        smoothing: float = 0.05,
        prior_gaps: float = 4.0,
        miss_ms: float = 1000.0,
        max_horizon_s: float | None = None,
        by_density: bool = False,
        replica_share: float = 1.0,
        victim_sets: bool = True,
        reevict: float = 2.0,
        evict_horizon_s: float | None = None,
        amortized: bool = False,
        whole_refill: bool = False,
        rent_to_hit: bool = True,
        belady: bool = True,
        joins: bool = True,
        keep_joins: bool = False,
        break_even: float = 1.0,
        lru_veto: bool = True,
    ) -> None:
        self.device_price = _finite(device_price, "device_price")
        # host memory is about 20x cheaper per GB than device memory
        self.host_price = _finite(
            self.device_price / 20 if host_price is None else host_price, "host_price"
        )
        self.horizon_s = _finite(horizon_s, "horizon_s", minimum=1e-3)
        self.lead_s = _finite(lead_s, "lead_s")
        self.arrivals = GapHistory(
            half_life=half_life,
            periodic_cv=periodic_cv,
            smoothing=smoothing,
            prior_gaps=prior_gaps,
        )
        self.miss_ms = _finite(miss_ms, "miss_ms")
        # the horizons the rule looks over: horizon_s, x4, x16, ... up to max_horizon_s
        longest = self.horizon_s if max_horizon_s is None else max_horizon_s
        _finite(longest, "max_horizon_s", minimum=self.horizon_s)
        self.horizons = [self.horizon_s]
        while self.horizons[-1] * 4 <= longest * (1 + 1e-9):
            self.horizons.append(self.horizons[-1] * 4)
        self.fallback_keepalive_s = _finite(fallback_keepalive_s, "fallback_keepalive_s")
        self.by_density = bool(by_density)
        self.replica_share = _finite(replica_share, "replica_share")
        self.victim_sets = bool(victim_sets)
        self.reevict = _finite(reevict, "reevict")
        self.amortized = bool(amortized)
        self.whole_refill = bool(whole_refill)
        self.rent_to_hit = bool(rent_to_hit)
        self.belady = bool(belady)
        self.joins = bool(joins)
        self.keep_joins = bool(keep_joins)
        self.lru_veto = bool(lru_veto)
        self.break_even = _finite(break_even, "break_even")
        self.evict_horizon_s = _finite(
            self.horizon_s if evict_horizon_s is None else evict_horizon_s,
            "evict_horizon_s",
            minimum=1e-3,
        )

    def observe(self, function: str, now_s: float) -> None:
        """One request for ``function`` at ``now_s``: O(1) (:meth:`GapHistory.observe`)."""
        self.arrivals.observe(function, now_s)

    # -- deciding --------------------------------------------------------------------------------

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        idle = self.arrivals.idle(function, now_s)
        if idle is None:
            return Advice(keep=False, prefetch=False, reason="no-history")
        if not self.arrivals.has_history(function):
            keep = idle <= self.fallback_keepalive_s
            return Advice(keep=keep, prefetch=False, reason="fallback")
        if tier == "device":
            # a device miss is a cold start: it costs its load and the wait itself (miss_ms),
            # and with keep_joins the requests that join its reload, as a victim's does; a
            # host-tier miss only lengthens a load
            price = self.device_price
            saved = (
                self.reload_miss_cost(function, reload_ms)
                if self.keep_joins
                else reload_ms + self.miss_ms
            )
        else:
            price, saved = self.host_price, reload_ms
        rent = price * size_bytes / GB  # ms of load time per second held
        # ski rental's break-even floor: a device copy idle for less than ``break_even`` x the
        # time whose rent equals one miss is kept whatever the histogram says
        keep = tier == "device" and idle * rent <= self.break_even * saved
        prefetch = False
        for h in self.horizons:  # any horizon over which holding it pays
            keep = keep or self.pays(function, idle, h, saved_ms=saved, rent=rent)
            prefetch = prefetch or self.pays(
                function, idle, self.lead_s + h, saved_ms=saved, rent=rent
            )
            if keep and prefetch:
                break
        return Advice(keep=keep, prefetch=prefetch, reason="cost")

    def pays(
        self, function: str, idle_s: float, horizon_s: float, *, saved_ms: float, rent: float
    ) -> bool:
        """Whether holding the model over the next ``horizon_s`` pays: ``P(request within it) x
        saved_ms >= rent x`` the time it is held for that request. Held until the request
        comes, the decision is then made again, so the time paid for is ``E[min(time to the
        request, horizon_s)]`` (:meth:`GapHistory.expected_hold`); with ``rent_to_hit`` off, the whole
        horizon (the rule before, which charged a model asked for every second 30 s of rent
        per hit and so demoted hot models first as the price rose). Two bounds skip the
        integral: it pays if it pays for the whole horizon, and it does not if it does not
        pay for ``horizon_s x (1 - P)`` (the hold is at least that: P(no request by t) >= 1 -
        P for every t <= horizon_s)."""
        p = self.arrivals.p_arrival(function, idle_s, horizon_s)
        gain = p * saved_ms
        if gain >= rent * horizon_s:
            return True
        if not self.rent_to_hit or gain < rent * horizon_s * (1.0 - p):
            return False
        return gain >= rent * self.arrivals.expected_hold(function, idle_s, horizon_s)

    def value(self, function: str, now_s: float, *, size_bytes: int, reload_ms: float) -> float:
        """Expected miss cost saved per byte-second held: the hit density of LHD (Beckmann et
        al., NSDI'18) weighted by what a miss costs, ``P(request within h) x (reload_ms +
        miss_ms) / (bytes x E[min(time to it, h)])``, best over the horizons. Dividing by the
        expected time held is what ranks a hot model above a cool one when both are sure to be
        asked for within the horizon (P ~ 1 for every function with gaps of seconds): a 10 GB
        model asked for every second earns its bytes a hundred times faster than a 1 GB one
        asked for every 100 s. ``by_density`` False: the rule before (``P x cost / bytes``,
        the held time taken as the whole horizon)."""
        idle = self.arrivals.idle(function, now_s)
        cost = (reload_ms + self.miss_ms) / max(1, size_bytes)
        if idle is None or not self.arrivals.has_history(function):
            p = 0.5 if idle is not None and idle <= self.fallback_keepalive_s else 0.0
            return p * cost / self.horizon_s
        best = 0.0
        for h in self.horizons:
            p = self.arrivals.p_arrival(function, idle, h)
            if p <= 0.0:
                continue
            hold = self.arrivals.expected_hold(function, idle, h) if self.by_density else h
            best = max(best, p / max(hold, _MIN_HOLD_S))
        return best * cost

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]:
        """Candidates, least expected miss cost saved per byte-second first (ties: the larger
        first). A copy with others elsewhere saves less: a request can go to another holder
        (LALB routes it there), so its value is divided by ``1 + replica_share x copies``."""
        scored = [
            (
                self.value(c.function, now_s, size_bytes=c.size_bytes, reload_ms=c.reload_ms)
                / (1.0 + self.replica_share * c.copies_elsewhere),
                -c.size_bytes,
                c.function,
            )
            for c in candidates
        ]
        scored.sort()
        return [f for _, _, f in scored]

    def victim_plan(
        self,
        candidates: Sequence[Candidate],
        need_bytes: int,
        now_s: float,
        *,
        loading: str | None = None,
    ) -> list[str]:
        """The victims that free ``need_bytes`` at the least expected miss cost, best first.

        With ``victim_sets`` off: :meth:`victim_order` (the caller frees in that order). On: a
        choice among *sets* of victims, as LALB's own plan does. Evicting ``m`` costs its
        expected miss, ``P x`` :meth:`miss_cost` (``reload + miss_ms``, plus the requests that
        join the reload with ``joins``), with ``P`` the chance that ``m`` is asked for before
        ``loading``'s next request (``belady``: learned Belady, :meth:`GapHistory.next_use_times`), or
        within ``evict_horizon_s`` (``belady`` off, or ``loading`` unknown or without a
        history), divided by ``1 + replica_share x copies``; plus, because ``m`` returns by loading
        again, ``reevict x P x`` the cost of freeing its bytes once more: the cheapest cover of
        ``m``'s bytes from the same candidates (:func:`refill_costs`). A 10 GB model evicted now
        evicts 10 GB of others when it returns; a 100 MB one, 100 MB. Then the cheapest set
        that frees enough (:func:`cheapest_cover`). Empty when no candidate has a history:
        the caller's LRU stands (a policy that knows nothing has no order).

        With ``amortized``: the candidates by those costs *per byte*, the cheapest first (the
        caller frees in that order until the load fits). The cheapest set for one load's own
        need is myopic: bytes freed beyond it are not wasted, the next loads on the device use
        them without evicting, so what a plan should minimise over a stream of loads is the
        cost per byte it frees (the diagnosis: ``bench/RESULTS.md``, #13, seventh session).

        With ``lru_veto`` (the default since the fifteenth session; off: the cheapest set
        above, the rule before): recency's order, and the prediction may only *protect*: the
        candidates (least recently used first, as the caller passes them) in that order,
        skipping each one more likely than not (``P >= 1/2``, the same ``P``) to be asked for
        before the loading model's next request, until the bytes are freed; the protected ones
        last, in the same order (:func:`lru_unless_protected`). The learned "no request soon"
        of a bursty function is the belief the break-even floor stopped trusting for demotion;
        here it no longer picks a recently used model over a long idle one either (the
        diagnosis: ``bench/RESULTS.md``, #13, fifteenth session)."""
        if not self.victim_sets:
            return self.victim_order(candidates, now_s)
        if not any(self.arrivals.has_history(c.function) for c in candidates):
            return []
        # Belady: a victim is a mistake if it is asked for before the model loaded in its
        # place; over a fixed horizon instead when that model has no history (or no Belady)
        before = (
            self.arrivals.next_use_times(loading) if self.belady and loading is not None else None
        )
        horizons = before or [self.evict_horizon_s]
        # a copy held on other devices returns here only for the requests LALB does not send
        # to them: its miss *and* its return's re-eviction are discounted alike
        p = [
            self._p_evicted(c.function, now_s, horizons)
            / (1.0 + self.replica_share * c.copies_elsewhere)
            for c in candidates
        ]
        sizes = [c.size_bytes for c in candidates]
        if self.lru_veto:
            chosen = lru_unless_protected(sizes, [pi >= 0.5 for pi in p], need_bytes)
            return [candidates[i].function for i in chosen]
        base = [pi * self.miss_cost(c) for pi, c in zip(p, candidates, strict=True)]
        if self.reevict <= 0:
            again = [0.0] * len(base)
        elif self.whole_refill:
            again = whole_refill_costs(sizes, base)
        else:
            again = refill_costs(sizes, base)
        costs = [b + self.reevict * pi * r for b, pi, r in zip(base, p, again, strict=True)]
        if self.amortized:
            chosen = _by_cost_per_byte(sizes, costs)
        else:
            chosen = cheapest_cover(sizes, costs, need_bytes)
        return [candidates[i].function for i in chosen]

    def miss_cost(self, candidate: Candidate) -> float:
        """What one miss of an evicted model costs, in ms: its reload and ``miss_ms`` for the
        request that finds it gone; with ``joins``, also the requests that join the reload
        (:meth:`reload_miss_cost`)."""
        if not self.joins:
            return candidate.reload_ms + self.miss_ms
        return self.reload_miss_cost(candidate.function, candidate.reload_ms)

    def reload_miss_cost(self, function: str, reload_ms: float) -> float:
        """A device miss of ``function`` counting the requests that join its reload: its
        reload and ``miss_ms`` for the request that finds it gone, and the requests that arrive
        while it reloads and wait for the same load (each a cold start: ``miss_ms`` and half
        the reload on average), ``reload / mean gap`` of them (the gap's EWMA). A model asked
        for every 100 ms that takes 600 ms to reload costs seven cold starts, not one. The
        victims' price (``joins``) and the keep / demote rule (``keep_joins``) share it."""
        cost = reload_ms + self.miss_ms
        mean_gap = self.arrivals.mean_gap(function)
        if mean_gap is not None:
            joining = reload_ms / 1000.0 / max(mean_gap, 1e-3)
            cost += joining * (reload_ms / 2 + self.miss_ms)
        return cost

    def _p_evicted(self, function: str, now_s: float, horizons: Sequence[float]) -> float:
        """P(a request within the horizon), averaged over ``horizons`` (equally likely); with
        under two arrivals, :meth:`value`'s fallback (0.5 inside the fallback keep-alive, else
        0)."""
        idle = self.arrivals.idle(function, now_s)
        if idle is None:
            return 0.0
        if not self.arrivals.has_history(function):
            return 0.5 if idle <= self.fallback_keepalive_s else 0.0
        return math.fsum(self.arrivals.p_arrivals(function, idle, horizons)) / len(horizons)

    # -- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, "kind": "predictive", **self.arrivals.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        _check_snapshot(state, "predictive")
        self.arrivals.restore(state)


def lru_unless_protected(
    sizes: Sequence[int], protected: Sequence[bool], need_bytes: int
) -> list[int]:
    """Indices of items (least recently used first) that free ``need_bytes``: in that order,
    the unprotected ones first, then the protected ones, until enough is freed. Nothing is
    needed: ``[]``; too little in all: every item."""
    if need_bytes <= 0:
        return []
    order = [i for i in range(len(sizes)) if not protected[i]]
    order += [i for i in range(len(sizes)) if protected[i]]
    chosen, freed = [], 0
    for i in order:
        if freed >= need_bytes:
            break
        chosen.append(i)
        freed += sizes[i]
    return chosen


def _by_cost_per_byte(sizes: Sequence[int], costs: Sequence[float]) -> list[int]:
    """Indices by cost per byte; ties: the larger first, then the earlier (less recently used)."""
    return sorted(range(len(sizes)), key=lambda i: (costs[i] / max(1, sizes[i]), -sizes[i], i))


def refill_costs(sizes: Sequence[int], costs: Sequence[float]) -> list[float]:
    """For each item, what freeing its own bytes again would cost: the fractional cheapest
    cover of that many bytes by cost per byte over the *other* items (the price of the
    device's cheapest memory now), proportionally past their total. O(n log n): without item
    ``i``, the others' cover of ``s`` bytes is the full cover of ``s`` when ``i`` starts past
    ``s`` in the order by cost per byte, else the full cover of ``2 s`` less ``i``'s cost."""
    ranked = _by_cost_per_byte(sizes, costs)
    edges, totals = [0], [0.0]
    start = [0] * len(sizes)  # where each item starts in the order, in bytes
    for i in ranked:
        start[i] = edges[-1]
        edges.append(edges[-1] + sizes[i])
        totals.append(totals[-1] + costs[i])

    def cover(size: int) -> float:  # the full cover of ``size`` bytes, size <= edges[-1]
        k = min(bisect.bisect_right(edges, size) - 1, len(edges) - 2)
        span = edges[k + 1] - edges[k]
        return totals[k] + (totals[k + 1] - totals[k]) * (size - edges[k]) / max(1, span)

    out = []
    for i, size in enumerate(sizes):
        others = edges[-1] - size
        if start[i] >= size:
            out.append(cover(size))
        elif 2 * size <= edges[-1]:
            out.append(cover(2 * size) - costs[i])
        elif others > 0:  # the others hold too little: at their mean price per byte
            out.append((totals[-1] - costs[i]) * size / others)
        else:  # nothing else to evict: at its own price
            out.append(costs[i])
    return out


def whole_refill_costs(sizes: Sequence[int], costs: Sequence[float]) -> list[float]:
    """For each item, what freeing its own bytes again would cost when victims go whole, as
    they do: the cost of :func:`cheapest_cover` of that many bytes over the *other* items
    (:func:`refill_costs` prices a fractional cover, which charges a 1 GB model's return a
    sixteenth of a 16 GB model's cost, though the rule must evict some whole model for it).
    Past the others' total, proportionally as :func:`refill_costs`. O(n^3) for n items."""
    out = []
    everything = sum(sizes)
    for i, size in enumerate(sizes):
        others = [j for j in range(len(sizes)) if j != i]
        total = everything - size
        if total <= 0:
            out.append(costs[i])
        elif total < size:
            out.append(sum(costs[j] for j in others) * size / total)
        else:
            cover = cheapest_cover([sizes[j] for j in others], [costs[j] for j in others], size)
            out.append(sum(costs[others[k]] for k in cover))
    return out


def cheapest_cover(sizes: Sequence[int], costs: Sequence[float], need_bytes: int) -> list[int]:
    """Indices of items whose sizes sum to at least ``need_bytes`` at a low total cost: the
    best of "the cheapest items per byte, then the cheapest single item that covers what is
    left" over every prefix (the first prefix is the cheapest single item that frees enough
    alone; the last, the greedy by cost per byte), then items not needed after all are
    dropped, the costliest first. A min-cost covering knapsack, approximately, in O(n^2) for
    the n items (n <= 32). Nothing is needed: ``[]``. Too little in all: every item, by cost per
    byte (the caller frees the rest its own way)."""
    if need_bytes <= 0:
        return []
    ranked = _by_cost_per_byte(sizes, costs)
    if sum(sizes) < need_bytes:
        return ranked
    best: list[int] = []
    best_cost = math.inf
    freed, spent = 0, 0.0
    for k, _ in enumerate(ranked):
        left = need_bytes - freed
        # the cheapest single item beyond the prefix that covers what is left
        closer = min(
            (j for j in ranked[k:] if sizes[j] >= left),
            key=lambda j: (costs[j], -sizes[j]),
            default=None,
        )
        if closer is not None and spent + costs[closer] < best_cost:
            best, best_cost = [*ranked[:k], closer], spent + costs[closer]
        freed += sizes[ranked[k]]
        spent += costs[ranked[k]]
        if freed >= need_bytes or spent >= best_cost:
            break
    total = sum(sizes[i] for i in best)
    for i in sorted(best, key=lambda i: -costs[i]):  # drop what is not needed, costliest first
        if total - sizes[i] >= need_bytes:
            best.remove(i)
            total -= sizes[i]
    return best


def _cdf(cumulative: list[float], weights: list[float], total: float, x: float) -> float:
    """P(gap <= x) from the histogram, interpolating within a bin (log-linearly past bin 0)."""
    if x <= 0:
        return 0.0
    k = bisect.bisect_right(_EDGES, x) - 1
    below = cumulative[k]
    share = weights[k] / total
    if share == 0.0:
        return below
    if k == 0:
        fraction = x / _LO_S
    elif k == _BINS - 1:
        return below  # the open-ended last bin: nothing known past 4 h
    else:
        fraction = (math.log(x) - math.log(_EDGES[k])) / _LOG_R
    return below + share * min(1.0, max(0.0, fraction))


# -- the per-function switch between ours and another rule ------------------------------------------


@dataclasses.dataclass
class _Shadow:
    """One function's shadow accounts: since ``since_s``, whether each rule would hold its model
    on a device (its last device decision), and each rule's decayed cost over the gaps scored."""

    since_s: float
    held: tuple[bool, bool] = (True, True)  # (ours, other): a request has just loaded it
    rent: float = 0.0  # ms of load time per second held (price x GB), from the latest advise
    miss: float = 0.0  # ms a miss costs (reload + miss_ms), from the latest advise
    gap_cost: tuple[float, float] = (0.0, 0.0)  # rent accrued in the current gap
    cost: tuple[float, float] = (0.0, 0.0)  # decayed cost over scored gaps
    scored: int = 0
    other_chosen: bool = False


class SwitchingPolicy:
    """Ours, switched per function to another rule (the hybrid histogram) where that rule has
    cost less so far: an online, causal choice between two rules.

    Both rules learn every arrival. At each device decision (:meth:`advise` with
    ``tier="device"``) each rule's verdict, hold the model or not, is recorded; until the
    function's next decision, the rules that hold it are charged ``price x GB`` per second (ours'
    ``device_price``), and when its next request arrives, a rule whose last verdict was "not
    held" is charged the miss, ``reload_ms + miss_ms``: ours' own objective, scored on what
    each rule decided before the arrival and on the arrival itself, never on a later one.
    Per function, a gap's costs are folded into a decayed sum (half-life ``half_life`` gaps);
    after ``min_gaps`` scored gaps the function follows the other rule once its cost is below
    ``1 - hysteresis`` times ours', and returns to ours once ours' is below ``1 - hysteresis``
    times the other's. With fewer (no history) it follows ours, whose own fallback applies.

    The host tier and the victim order are always ours' (the baselines hold the host tier as
    an LRU and have no victim order).
    """

    may_prefetch = True

    def __init__(
        self,
        ours: PredictivePolicy,
        other: ResidencyPolicy,
        *,
        hysteresis: float = 0.1,
        min_gaps: int = 8,
        half_life: float = 32.0,
    ) -> None:
        if not 0.0 <= hysteresis < 1.0:
            raise ArrivalError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        self.ours, self.other = ours, other
        self.name = f"{ours.name}+switch-{other.name}"
        self.hysteresis = hysteresis
        self.min_gaps = int(_finite(min_gaps, "min_gaps"))
        self._decay = 2 ** (-1 / _finite(half_life, "half_life", minimum=1.0))
        self._shadow: dict[str, _Shadow] = {}

    def observe(self, function: str, now_s: float) -> None:
        """One request: both rules learn it; the gap it ends is scored (O(1))."""
        self.ours.observe(function, now_s)
        self.other.observe(function, now_s)
        s = self._shadow.get(function)
        if s is None:
            self._shadow[function] = _Shadow(since_s=now_s)
            return
        if now_s < s.since_s:
            return  # out of order: as the rules themselves, ignored
        self._accrue(s, now_s)
        d = self._decay
        (held_ours, held_other), (rent_ours, rent_other) = s.held, s.gap_cost
        s.cost = (
            s.cost[0] * d + rent_ours + (0.0 if held_ours else s.miss),
            s.cost[1] * d + rent_other + (0.0 if held_other else s.miss),
        )
        s.gap_cost, s.held = (0.0, 0.0), (True, True)
        s.scored += 1
        if s.scored >= self.min_gaps:
            ours_cost, other_cost = s.cost
            if s.other_chosen:
                s.other_chosen = not ours_cost < (1 - self.hysteresis) * other_cost
            else:
                s.other_chosen = other_cost < (1 - self.hysteresis) * ours_cost

    def _accrue(self, s: _Shadow, now_s: float) -> None:
        elapsed = max(0.0, now_s - s.since_s)
        s.gap_cost = (
            s.gap_cost[0] + (s.rent * elapsed if s.held[0] else 0.0),
            s.gap_cost[1] + (s.rent * elapsed if s.held[1] else 0.0),
        )
        s.since_s = max(s.since_s, now_s)

    def follows_other(self, function: str) -> bool:
        """Whether ``function``'s device decisions follow the other rule now."""
        s = self._shadow.get(function)
        return s is not None and s.other_chosen

    def costs(self, function: str) -> tuple[float, float] | None:
        """The decayed (ours, other) costs scored for ``function`` (None: not seen)."""
        s = self._shadow.get(function)
        return None if s is None else s.cost

    def advise(
        self, function: str, now_s: float, *, size_bytes: int, reload_ms: float, tier: str
    ) -> Advice:
        mine = self.ours.advise(
            function, now_s, size_bytes=size_bytes, reload_ms=reload_ms, tier=tier
        )
        if tier != "device":
            return mine
        theirs = self.other.advise(
            function, now_s, size_bytes=size_bytes, reload_ms=reload_ms, tier=tier
        )
        s = self._shadow.get(function)
        if s is None:
            return mine
        if now_s >= s.since_s:
            self._accrue(s, now_s)
            s.held = (mine.keep, theirs.keep)
            s.rent = self.ours.device_price * size_bytes / GB
            s.miss = reload_ms + self.ours.miss_ms
        return theirs if s.other_chosen else mine

    def victim_order(self, candidates: Sequence[Candidate], now_s: float) -> list[str]:
        return self.ours.victim_order(candidates, now_s)

    def victim_plan(
        self,
        candidates: Sequence[Candidate],
        need_bytes: int,
        now_s: float,
        *,
        loading: str | None = None,
    ) -> list[str]:
        return self.ours.victim_plan(candidates, need_bytes, now_s, loading=loading)

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "kind": "switch",
            "ours": self.ours.snapshot(),
            "other": self.other.snapshot(),
            "shadow": {f: dataclasses.asdict(s) for f, s in self._shadow.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        _check_snapshot(state, "switch")
        shadow: dict[str, _Shadow] = {}
        try:
            for f, s in state["shadow"].items():
                pairs = {k: tuple(float(x) for x in s[k]) for k in ("cost", "gap_cost")}
                shadow[str(f)] = _Shadow(
                    since_s=float(s["since_s"]),
                    held=(bool(s["held"][0]), bool(s["held"][1])),
                    rent=float(s["rent"]),
                    miss=float(s["miss"]),
                    gap_cost=(pairs["gap_cost"][0], pairs["gap_cost"][1]),
                    cost=(pairs["cost"][0], pairs["cost"][1]),
                    scored=int(s["scored"]),
                    other_chosen=bool(s["other_chosen"]),
                )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArrivalError(f"switch snapshot is malformed: {e}") from None
        self.ours.restore(state["ours"])
        self.other.restore(state["other"])
        self._shadow = shadow


EVICTION_SAMPLE = 32  # victims ranked per load: the least recently used, as LRB (NSDI'20)


def eviction_plan(
    policy: ResidencyPolicy,
    residents: Iterable[tuple[str, int]],
    now_s: float,
    reload_ms: Callable[[str, int], float],
    *,
    need_bytes: int,
    copies_elsewhere: Callable[[str], int] = lambda model: 0,
    sample: int = EVICTION_SAMPLE,
    loading: str | None = None,
) -> list[str]:
    """The policy's victims on one device for a load that needs ``need_bytes`` more free
    bytes, best victim first: its plan (:meth:`ResidencyPolicy.victim_plan`) over the
    ``sample`` least recently used of ``residents`` (``(model, bytes)``, least recently used
    first, only those that may be evicted: a model in use is never passed, so never chosen);
    ``reload_ms(model, bytes)`` is what reloading one would take, ``copies_elsewhere(model)``
    how many other devices hold it, ``loading`` the model the room is for. Empty when the policy has no plan of its own (the caller's
    order stands: LRU, or LALB's victims); whatever the plan frees too little of, LRU frees.
    The simulator (``bench/sim/residency.py``) and the gateway (``scheduler/prefetch.py``) both
    call this."""
    if need_bytes <= 0:
        return []
    candidates = [
        Candidate(model, size, reload_ms(model, size), copies_elsewhere(model))
        for model, size in itertools.islice(residents, sample)
    ]
    if not candidates:
        return []
    return policy.victim_plan(candidates, need_bytes, now_s, loading=loading)


def make_policy(name: str, **params: float) -> ResidencyPolicy:
    """A policy by name: ``keepalive``, ``hybrid`` or ``predictive``, with its parameters."""
    if name == "keepalive":
        return FixedKeepAlive(**params)
    if name == "hybrid":
        return HybridHistogram(**params)  # type: ignore[arg-type]
    if name == "predictive":
        # switch=1: ours, switched per function to the hybrid where it has cost less so far
        # (:class:`SwitchingPolicy`); switch_hysteresis, switch_min_gaps tune the switch
        switch = params.pop("switch", 0.0)
        tuning = {
            key: params.pop(f"switch_{key}")
            for key in ("hysteresis", "min_gaps", "half_life")
            if f"switch_{key}" in params
        }
        ours = PredictivePolicy(**params)  # type: ignore[arg-type]
        if not switch:
            return ours
        return SwitchingPolicy(ours, HybridHistogram(), **tuning)  # type: ignore[arg-type]
    raise ArrivalError(f"unknown residency policy {name!r}: keepalive, hybrid or predictive")
