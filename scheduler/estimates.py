"""Estimates of how long a model takes to load and to run, learnt from measurements.

The locality-aware policy weighs "wait behind the queue of a device that holds the model" against
"load the model on another device". Both sides are times it cannot know in advance, so it asks an
:class:`Estimates`, which the gateway (or the simulator) feeds with what each response measured:

- load time as a linear function of model bytes, ``overhead_ms + ms_per_byte * size``, fitted by an
  exponentially weighted least-squares regression over every observed load, so a model never seen
  loading still gets an estimate from its size;
- per model, an EWMA of its own load times once it has loaded (it overrides the regression) and an
  EWMA of its inference times; a model never seen running gets the EWMA over all models;
- per model, its share of recent requests (an EWMA over the request stream, with a half-life
  counted in requests), which tells how soon an evicted model would be asked for again.

Before any measurement the priors apply. Everything is plain arithmetic in O(1) per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Estimates", "Ewma", "EwmaLine"]

_MAX_VICTIM_LOADS = 65_536  # cached victim load times, between two observed loads
# A model loads "measurably slower" than others of its size from this factor of the fastest on:
# below it, fastest-reload ratios are timing noise (victim_load_ms).
_SLOWER = 4.0


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return alpha


def _check_sample(value: float, *, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class Ewma:
    """An exponentially weighted moving average; the first sample sets it."""

    alpha: float = 0.2
    value: float | None = None
    count: int = 0

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def update(self, sample: float) -> float:
        self.value = (
            sample if self.value is None else self.value + self.alpha * (sample - self.value)
        )
        self.count += 1
        return self.value


@dataclass
class EwmaLine:
    """``y = intercept + slope * x`` by exponentially weighted least squares.

    Keeps weighted means of ``x``, ``y``, ``x*x`` and ``x*y``. While the ``x`` seen are (nearly)
    all the same, the slope is unknown and :meth:`predict` scales ``y`` proportionally to ``x``.
    """

    alpha: float = 0.1
    count: int = 0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def update(self, x: float, y: float) -> None:
        a = 1.0 if self.count == 0 else self.alpha
        self._x += a * (x - self._x)
        self._y += a * (y - self._y)
        self._xx += a * (x * x - self._xx)
        self._xy += a * (x * y - self._xy)
        self.count += 1

    def coefficients(self) -> tuple[float, float] | None:
        """``(intercept, slope)``, both >= 0, or None when ``x`` has not varied enough to fit."""
        if self.count < 2:
            return None
        variance = self._xx - self._x * self._x
        if variance <= 1e-9 * max(self._xx, 1.0):
            return None
        slope = max(0.0, (self._xy - self._x * self._y) / variance)
        intercept = max(0.0, self._y - slope * self._x)
        return intercept, slope

    def predict(self, x: float) -> float | None:
        if self.count == 0:
            return None
        fitted = self.coefficients()
        if fitted is None:  # one size seen so far: assume time grows with bytes
            return self._y * (x / self._x) if self._x > 0 else self._y
        intercept, slope = fitted
        return intercept + slope * x


class Estimates:
    """Load and inference time estimates (milliseconds), fed by measurements.

    ``prior_load_overhead_ms + size_bytes * prior_load_ms_per_byte`` and ``prior_infer_ms`` apply
    until measurements arrive. The default load prior is PCIe 4.0 x16 (about 25 GB/s host to
    device) plus 1 ms of fixed cost.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        prior_load_overhead_ms: float = 1.0,
        prior_load_ms_per_byte: float = 1 / 25e6,
        prior_infer_ms: float = 5.0,
        popularity_half_life: int = 2048,
    ) -> None:
        self.alpha = _check_alpha(alpha)
        self.prior_load_overhead_ms = _check_sample(prior_load_overhead_ms, what="prior load ms")
        self.prior_load_ms_per_byte = _check_sample(prior_load_ms_per_byte, what="prior ms/byte")
        self.prior_infer_ms = _check_sample(prior_infer_ms, what="prior inference ms")
        self._load_line = EwmaLine(alpha=alpha / 2)
        self._load: dict[str, Ewma] = {}
        # Victims' values: each model's fastest load, and per size the fastest of any model.
        self._least_load: dict[str, float] = {}
        self._fastest: dict[int, float] = {}
        # (model, size) -> victim_load_ms, until the next observed load
        self._victim_load: dict[tuple[str, int], float] = {}
        self._infer: dict[str, Ewma] = {}
        self._infer_all = Ewma(alpha=alpha)
        if popularity_half_life < 1:
            raise ValueError(f"popularity_half_life must be >= 1, got {popularity_half_life!r}")
        self._keep = 0.5 ** (1 / popularity_half_life)  # weight kept per request
        self._requests = 0
        self._share: dict[str, tuple[float, int]] = {}  # model -> (share, at request number)

    def __repr__(self) -> str:
        return f"<Estimates {len(self._load)} loads, {len(self._infer)} models run>"

    # -- feeding -------------------------------------------------------------------------------

    def observe_load(self, model: str, *, size_bytes: int, load_ms: float) -> None:
        """A load of ``model`` (``size_bytes`` on the device) took ``load_ms``."""
        load_ms = _check_sample(load_ms, what="load_ms")
        size = _check_sample(size_bytes, what="size_bytes")
        self._load_line.update(size, load_ms)
        reload = model in self._load
        self._load.setdefault(model, Ewma(alpha=self.alpha)).update(load_ms)
        if reload:  # a first load paid one-time costs (its artifact's first read) a reload won't
            self._least_load[model] = min(self._least_load.get(model, math.inf), load_ms)
        self._fastest[size_bytes] = min(self._fastest.get(size_bytes, math.inf), load_ms)
        self._victim_load.clear()  # the line moved: every snapped value may have

    def observe_infer(self, model: str, *, infer_ms: float) -> None:
        """One inference of ``model`` (after any load) took ``infer_ms``."""
        infer_ms = _check_sample(infer_ms, what="infer_ms")
        self._infer.setdefault(model, Ewma(alpha=self.alpha)).update(infer_ms)
        self._infer_all.update(infer_ms)

    def observe_request(self, model: str) -> None:
        """A request for ``model`` arrived (call once per request, before routing it)."""
        self._requests += 1
        share = self.share(model)
        self._share[model] = (share + (1 - self._keep), self._requests)
        if len(self._share) > 4 * 65536:  # bound memory: drop what has decayed to nothing
            self._share = {m: v for m, v in self._share.items() if self.share(m) > 1e-6}

    def forget(self, model: str) -> None:
        """Drop a model's own history (its weights changed, or it was deleted)."""
        self._load.pop(model, None)
        self._least_load.pop(model, None)
        self._victim_load.clear()
        self._infer.pop(model, None)
        self._share.pop(model, None)

    # -- estimates -----------------------------------------------------------------------------

    def load_ms(self, model: str, *, size_bytes: int) -> float:
        """Expected time to load ``model`` onto a device that does not hold it."""
        own = self.measured_load_ms(model)
        if own is not None:
            return own
        fitted = self._load_line.predict(float(size_bytes))
        if fitted is not None:
            return fitted
        return self.prior_load_overhead_ms + size_bytes * self.prior_load_ms_per_byte

    def victim_load_ms(self, model: str, *, size_bytes: int) -> float:
        """The load time that values ``model`` as an eviction victim: what a model of its size
        is expected to take (the fitted line, or the prior). Only a model whose fastest reload
        (``least``) is at least ``_SLOWER`` (4) times the fastest load seen of any model of its
        size (``fastest``) gets a factor of its own, ``2 ** floor(log2(least / fastest))``. A
        model not reloaded yet is valued at the line: its first load paid one-time costs (the
        artifact's first read, a process's set-up) that reloading it will not.

        Loads of identical models differ only by timing noise, and noise only adds time:
        another process on the core, a page fault, a process's first load (torch's set-up,
        hundreds of times a warm load), and on a shared box more of it the more processes run.
        Valued by their EWMAs, or by the EWMA's ratio to the line, such victims ranked by that
        noise (measured live, 2026-12-06: half of one gateway's load decisions and three
        quarters of the placement owner's at 4 replicas would change with identical models
        valued alike). A model's fastest reload is its reload without the noise, so models of
        one size get the same value, whatever the contention, and rank by their
        shares of requests, then by the tie-break of the caller (least recently used first).
        Below 4x the factor is not used at all: a model's fastest reload is a minimum over a few
        loads on a shared box, and a factor of 2 (``round(log2)`` of ratios near 1.4, up to the
        tenth session) split identical models by chance, so that two runs of one gateway on one
        trace never re-converged (#16, eleventh session: 41-140 of 1,200 requests differed, 0-6
        at the line alone). A model that loads measurably slower than others of its size (4x
        and more, every time) still counts as such. See ``docs/scheduling.md``, "Ties". Kept per ``(model, size)``
        until the next load is observed: LALB asks for every resident of every candidate
        device, and the fit costs several times a lookup.
        """
        key = (model, size_bytes)
        known = self._victim_load.get(key)
        if known is not None:
            return known
        value = self._snapped_load_ms(model, size_bytes)
        if len(self._victim_load) < _MAX_VICTIM_LOADS:
            self._victim_load[key] = value
        return value

    def _snapped_load_ms(self, model: str, size_bytes: int) -> float:
        fitted = self._load_line.predict(float(size_bytes))
        line = (
            fitted
            if fitted is not None
            else self.prior_load_overhead_ms + size_bytes * self.prior_load_ms_per_byte
        )
        least = self._least_load.get(model)
        fastest = self._fastest.get(size_bytes, 0.0)
        if least is None or line <= 0 or fastest <= 0 or least < _SLOWER * fastest:
            return line  # not seen reloading, nothing to scale, or within timing noise
        return line * 2.0 ** math.floor(math.log2(least / fastest))

    def measured_load_ms(self, model: str) -> float | None:
        """The EWMA of ``model``'s own loads, or None if it has not been seen loading."""
        own = self._load.get(model)
        return own.value if own is not None else None

    def infer_ms(self, model: str) -> float:
        """Expected time of one inference of ``model`` once it is resident."""
        own = self._infer.get(model)
        if own is not None and own.value is not None:
            return own.value
        if self._infer_all.value is not None:
            return self._infer_all.value
        return self.prior_infer_ms

    def share(self, model: str) -> float:
        """``model``'s share of recent requests, in [0, 1] (0 if never asked for)."""
        entry = self._share.get(model)
        if entry is None:
            return 0.0
        value, at = entry
        decay: float = self._keep ** (self._requests - at)
        return value * decay

    def mean_infer_ms(self) -> float:
        """Expected inference time of a request for any model."""
        return self._infer_all.value if self._infer_all.value is not None else self.prior_infer_ms

    def service_ms(self, model: str, *, size_bytes: int, resident: bool) -> float:
        """Expected busy time of a device serving one request: inference, plus a load if needed."""
        infer = self.infer_ms(model)
        return infer if resident else infer + self.load_ms(model, size_bytes=size_bytes)
