"""Serverless traces from orcbench, their shape, and the models we map their functions to.

``orcbench`` (CLOUD'22, on PyPI) generates invocation traces offline, modelled on the Azure
Functions 2019 trace: ``python -m orcbench trace --N 10 --scale 0.05 --runtime 60 --seed 1
--out t.csv``. Each line is ``minutes, function id, runtime ms, cluster``. The file's header has
no newline, so the first record is glued to it; :func:`parse_orcbench` accepts that and a
normal header alike, and names the line of any malformed record.

orcbench traces have no model sizes: :func:`assign_models` gives each function one, drawn from a
documented mix of inference models (docs/prediction.md), with load times from link bandwidths.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

HEADER = re.compile(
    r"^\s*Logical Time Clock \(minutes\)\s*,\s*Function ID\s*,\s*Runtime \(ms\)\s*,\s*Model\s*"
)


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ServerlessTrace:
    """Invocations sorted by time: ``arrival_s[i]`` of ``functions[function[i]]``."""

    functions: list[str]  # ids, in order of first invocation
    clusters: list[str]  # orcbench's cluster ("model") of each function
    arrival_s: npt.NDArray[np.float64]
    function: npt.NDArray[np.int64]
    runtime_ms: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.function)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0


def parse_orcbench(lines: Iterable[str], *, source: str = "<trace>") -> ServerlessTrace:
    """Parse orcbench's CSV (``minutes, function id, runtime ms, cluster`` per line)."""
    index: dict[str, int] = {}
    clusters: list[str] = []
    times: list[float] = []
    functions: list[int] = []
    runtimes: list[float] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if number == 1:
            match = HEADER.match(line)
            if match is not None:
                line = line[match.end() :].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise TraceError(
                f"{source}:{number}: expected 4 comma-separated fields (minutes, function id,"
                f" runtime ms, model), got {len(parts)}: {line[:80]!r}"
            )
        minutes_text, fid, runtime_text, cluster = parts
        try:
            minutes, runtime = float(minutes_text), float(runtime_text)
        except ValueError:
            raise TraceError(
                f"{source}:{number}: minutes and runtime must be numbers: {line[:80]!r}"
            ) from None
        if not math.isfinite(minutes) or minutes < 0 or not math.isfinite(runtime):
            raise TraceError(f"{source}:{number}: time must be finite and >= 0: {line[:80]!r}")
        if not fid:
            raise TraceError(f"{source}:{number}: empty function id")
        f = index.get(fid)
        if f is None:
            f = index[fid] = len(clusters)
            clusters.append(cluster)
        times.append(minutes * 60.0)
        functions.append(f)
        runtimes.append(max(0.0, runtime))  # orcbench draws runtimes from a normal: clip at 0
    if not functions:
        raise TraceError(f"{source}: no invocations")
    arrival = np.asarray(times, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    return ServerlessTrace(
        functions=list(index),
        clusters=clusters,
        arrival_s=arrival[order],
        function=np.asarray(functions, dtype=np.int64)[order],
        runtime_ms=np.asarray(runtimes, dtype=np.float64)[order],
    )


def read_orcbench(path: Path) -> ServerlessTrace:
    try:
        with path.open(encoding="utf-8") as f:
            return parse_orcbench(f, source=str(path))
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None


def generate_orcbench(
    out: Path, *, scale: float, minutes: int, seed: int, group: int = 10
) -> ServerlessTrace:
    """Run ``python -m orcbench trace`` (offline) into ``out`` unless it exists; parse it."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        command = [sys.executable, "-m", "orcbench", "trace", "--N", str(group)]
        command += ["--scale", str(scale), "--runtime", str(minutes), "--seed", str(seed)]
        subprocess.run([*command, "--out", str(partial)], check=True, capture_output=True)
        partial.rename(out)
    return read_orcbench(out)


# -- shape, against the published Azure trace --------------------------------------------------------


def shape(trace: ServerlessTrace) -> dict[str, float]:
    """The statistics Shahrad et al. (ATC'20) report for the Azure trace, on this trace.

    Published (Azure Functions 2019, per application, over 14 days): the most popular 18.6% of
    applications make 99.6% of invocations; 45% are invoked once an hour or less on average,
    81% once a minute or less; inter-arrival CVs spread from 0 (timers, about a fifth of
    applications) to well above 1 (bursty).
    """
    counts = np.bincount(trace.function, minlength=len(trace.functions)).astype(float)
    ranked = np.sort(counts)[::-1]
    top = max(1, round(0.186 * len(ranked)))
    hours = max(trace.duration_s / 3600.0, 1e-9)
    minutes = hours * 60
    cvs = []
    order = np.argsort(trace.function, kind="stable")
    bounds = np.searchsorted(trace.function[order], np.arange(len(trace.functions) + 1))
    for f in range(len(trace.functions)):
        t = trace.arrival_s[order[bounds[f] : bounds[f + 1]]]
        gaps = np.diff(t)
        if len(gaps) >= 2 and gaps.mean() > 0:
            cvs.append(float(gaps.std() / gaps.mean()))
    cv = np.asarray(cvs) if cvs else np.zeros(1)
    return {
        "functions": float(len(trace.functions)),
        "invocations": float(len(trace)),
        "hours": hours,
        "top_18.6pct_share": float(ranked[:top].sum() / ranked.sum()),
        "share_at_most_1_per_hour": float(np.mean(counts <= hours)),
        "share_at_most_1_per_minute": float(np.mean(counts <= minutes)),
        "cv_p10": float(np.percentile(cv, 10)),
        "cv_p50": float(np.percentile(cv, 50)),
        "cv_p90": float(np.percentile(cv, 90)),
        "share_cv_below_0.1": float(np.mean(cv < 0.1)),
        "share_cv_above_1": float(np.mean(cv > 1)),
    }


# -- models --------------------------------------------------------------------------------------

# (share of functions, smallest bytes, largest bytes): log-uniform within each class
SIZE_MIX: tuple[tuple[str, float, float, float], ...] = (
    ("small (CNNs, BERT-base, MiniLM)", 0.50, 20e6, 500e6),
    ("medium (BERT-large, T5, SD UNet)", 0.35, 500e6, 4e9),
    ("large (1-8B LLMs, fp16)", 0.15, 4e9, 16e9),
)
ARTIFACT_GBPS = 2.0  # artifact (local NVMe / object store) -> pinned host memory
ARTIFACT_OVERHEAD_MS = 50.0  # open, parse, lay out
PCIE_GBPS = 25.0  # pinned host -> device, PCIe 4.0 x16
PCIE_OVERHEAD_MS = 2.0
HBM_GBPS = 2000.0  # one forward pass reads the weights once (memory-bound inference)
INFER_OVERHEAD_MS = 1.0


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    size_bytes: int
    host_to_device_ms: float
    artifact_to_device_ms: float  # artifact -> host -> device
    artifact_to_host_ms: float
    infer_ms: float


def costs_for(size_bytes: int) -> ModelCosts:
    gb = size_bytes / 1e9
    to_host = ARTIFACT_OVERHEAD_MS + 1000 * gb / ARTIFACT_GBPS
    to_device = PCIE_OVERHEAD_MS + 1000 * gb / PCIE_GBPS
    return ModelCosts(
        size_bytes=size_bytes,
        host_to_device_ms=to_device,
        artifact_to_device_ms=to_host + to_device,
        artifact_to_host_ms=to_host,
        infer_ms=INFER_OVERHEAD_MS + 1000 * gb / HBM_GBPS,
    )


def assign_models(n_functions: int, *, seed: int) -> list[ModelCosts]:
    """One model per function, by :data:`SIZE_MIX`, independent of popularity (seeded)."""
    rng = np.random.default_rng([seed, 13])
    shares = np.asarray([s for _, s, _, _ in SIZE_MIX])
    classes = rng.choice(len(SIZE_MIX), size=n_functions, p=shares / shares.sum())
    u = rng.random(n_functions)
    out = []
    for c, x in zip(classes, u, strict=True):
        _, _, lo, hi = SIZE_MIX[int(c)]
        out.append(costs_for(int(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))))
    return out


def thin(
    trace: ServerlessTrace, *, max_per_hour: float
) -> tuple[ServerlessTrace, npt.NDArray[np.float64]]:
    """Keep every k-th invocation of each function invoked more than ``max_per_hour`` times an
    hour (k chosen per function), and return the weight of each kept invocation (k), so that
    weighted metrics estimate the whole trace's. Only the hottest functions are thinned: at
    that rate every policy keeps them resident, so what is dropped are hits on a warm model.
    """
    hours = max(trace.duration_s / 3600.0, 1e-9)
    counts = np.bincount(trace.function, minlength=len(trace.functions))
    step = np.maximum(1, np.floor(counts / (max_per_hour * hours))).astype(np.int64)
    seen = np.zeros(len(trace.functions), dtype=np.int64)
    keep = np.zeros(len(trace), dtype=bool)
    for i, f in enumerate(trace.function.tolist()):
        keep[i] = seen[f] % step[f] == 0
        seen[f] += 1
    kept = ServerlessTrace(
        functions=trace.functions,
        clusters=trace.clusters,
        arrival_s=trace.arrival_s[keep],
        function=trace.function[keep],
        runtime_ms=trace.runtime_ms[keep],
    )
    return kept, step[kept.function].astype(np.float64)


# -- the rare functions orcbench lacks ---------------------------------------------------------

TIMER_PERIODS_MIN = (2, 5, 10, 15, 20, 30, 60)


def azure_tail(
    n_functions: int, *, hours: float, seed: int, history_hours: float = 0.0
) -> tuple[ServerlessTrace, ServerlessTrace]:
    """``n_functions`` rarely invoked functions in the Azure trace's proportions, which orcbench
    lacks (its least-invoked function is called ~190 times an hour): 40% timers (a fixed period
    from :data:`TIMER_PERIODS_MIN`, a random phase and 1% jitter: inter-arrival CV about 0),
    60% sporadic (Poisson, with a mean gap log-uniform between 2 and 120 minutes). Synthetic:
    reported apart from the orcbench-only runs.

    Returns ``(history, trace)``: the same processes over the ``history_hours`` before time 0
    (what a gateway that has run for a while has already seen), and over ``[0, hours)``.
    """
    rng = np.random.default_rng([seed, 77])
    end = hours * 3600.0
    begin = -history_hours * 3600.0
    times: list[float] = []
    functions: list[int] = []
    clusters: list[str] = []
    for f in range(n_functions):
        if rng.random() < 0.4:
            period = 60.0 * float(rng.choice(TIMER_PERIODS_MIN))
            t = begin + rng.uniform(0, period) + np.arange(0.0, end - begin, period)
            t = t + rng.normal(0, 0.01 * period, size=len(t))
            clusters.append("tail-timer")
        else:
            mean = 60.0 * math.exp(rng.uniform(math.log(2), math.log(120)))
            t = begin + np.cumsum(rng.exponential(mean, size=int(3 * (end - begin) / mean) + 3))
            clusters.append("tail-sporadic")
        t = t[(t >= begin) & (t < end)]
        times.extend(t.tolist())
        functions.extend([f] * len(t))
    arrival = np.asarray(times, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    arrival, function = arrival[order], np.asarray(functions, dtype=np.int64)[order]
    names = [f"tail-{f:04d}" for f in range(n_functions)]

    def part(mask: npt.NDArray[np.bool_]) -> ServerlessTrace:
        return ServerlessTrace(
            names, clusters, arrival[mask], function[mask], np.zeros(int(mask.sum()))
        )

    return part(arrival < 0), part(arrival >= 0)


def merge(a: ServerlessTrace, b: ServerlessTrace) -> ServerlessTrace:
    """Both traces' functions and invocations, ``b``'s functions numbered after ``a``'s."""
    arrival = np.concatenate([a.arrival_s - (a.arrival_s[0] if len(a) else 0.0), b.arrival_s])
    function = np.concatenate([a.function, b.function + len(a.functions)])
    runtime = np.concatenate([a.runtime_ms, b.runtime_ms])
    order = np.argsort(arrival, kind="stable")
    return ServerlessTrace(
        functions=a.functions + b.functions,
        clusters=a.clusters + b.clusters,
        arrival_s=arrival[order],
        function=function[order],
        runtime_ms=runtime[order],
    )
