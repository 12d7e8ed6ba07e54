"""The workload of the peer benchmark and the statistics it reports: pure functions, no I/O.

One generator drives every system, so each sees the same sequence of models and the
same arrival times for a given seed:

* :func:`zipf_weights` / :func:`zipf_sequence`: which model each request asks for. Rank
  ``i`` (0-based) has probability proportional to ``1 / (i + 1) ** s``.
* :func:`poisson_arrivals`: open-loop send times, exponential gaps at a fixed rate,
  bounded both in count and in time.
* :func:`summarize`: percentiles (numpy's linear interpolation) and throughput of a
  phase; :func:`ratio` and :func:`ratio_table`: each figure as gpufaas/peer;
  :func:`check_goals`: the issue's goals against those ratios.

The harness (``run.py``) imports this file as a sibling module, and the smoke test
imports it by path, so it imports nothing but the standard library and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "FIGURES",
    "GOALS_17",
    "Figure",
    "Goal",
    "Summary",
    "cell",
    "check_goals",
    "format_table",
    "goal_table",
    "median",
    "percentile",
    "poisson_arrivals",
    "ratio",
    "ratio_table",
    "round_ratios",
    "spread",
    "summarize",
    "zipf_sequence",
    "zipf_weights",
]


# --- workload ------------------------------------------------------------------------------------


def zipf_weights(count: int, *, s: float) -> list[float]:
    """Popularity of ranks ``0..count-1``: ``p_i ∝ 1 / (i + 1) ** s``, summing to 1."""
    if count < 1:
        raise ValueError(f"zipf_weights: count must be at least 1, got {count}")
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"zipf_weights: exponent s must be a finite number >= 0, got {s}")
    raw = [1.0 / (rank + 1) ** s for rank in range(count)]
    total = sum(raw)
    return [w / total for w in raw]


def zipf_sequence(models: Sequence[str], *, count: int, s: float, seed: int) -> list[str]:
    """``count`` model names drawn with Zipf popularity; ``models[0]`` is the most popular."""
    if not models:
        raise ValueError("zipf_sequence: no models to draw from")
    if count < 0:
        raise ValueError(f"zipf_sequence: count must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(models), size=count, p=zipf_weights(len(models), s=s))
    return [models[i] for i in picks]


def poisson_arrivals(*, rate: float, count: int, duration_s: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at ``rate`` per second.

    At most ``count`` arrivals, all before ``duration_s``: the load is bounded both ways.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"poisson_arrivals: rate must be a positive number, got {rate}")
    if count < 0 or not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(
            f"poisson_arrivals: count and duration must be >= 0, got {count}, {duration_s}"
        )
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=count))
    return [float(t) for t in times if t < duration_s]


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within 0..100, got {q}")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass(frozen=True)
class Summary:
    """One phase: latencies in milliseconds, throughput in completed requests per second."""

    count: int
    errors: int
    wall_s: float
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(latencies_s: Sequence[float], *, errors: int, wall_s: float) -> Summary:
    """Percentiles of the successful requests' latencies and their rate over ``wall_s``."""
    if wall_s < 0 or errors < 0:
        raise ValueError(f"summarize: wall_s and errors must be >= 0, got {wall_s}, {errors}")
    ms = [v * 1000.0 for v in latencies_s]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return Summary(
        count=len(ms),
        errors=errors,
        wall_s=round(wall_s, 3),
        throughput_rps=round(len(ms) / wall_s, 2) if wall_s > 0 else 0.0,
        p50_ms=rounded(percentile(ms, 50)),
        p99_ms=rounded(percentile(ms, 99)),
        mean_ms=rounded(sum(ms) / len(ms)) if ms else None,
        max_ms=rounded(max(ms)) if ms else None,
    )


# --- ratios and goals ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """A reported figure; ``higher_is_better`` says which way a ratio is good."""

    key: str
    label: str
    unit: str
    higher_is_better: bool


FIGURES: tuple[Figure, ...] = (
    Figure("throughput_rps", "throughput (closed loop, warm)", "req/s", True),
    Figure("zipf_throughput_rps", "throughput (closed loop, Zipf)", "req/s", True),
    Figure("warm_p50_ms", "warm p50 (1 client)", "ms", False),
    Figure("warm_p99_ms", "warm p99 (1 client)", "ms", False),
    Figure("loaded_p50_ms", "warm p50 (N clients)", "ms", False),
    Figure("loaded_p99_ms", "warm p99 (N clients)", "ms", False),
    Figure("batched_throughput_rps", "throughput (N clients, dynamic batching on)", "req/s", True),
    Figure("batched_p50_ms", "p50 (N clients, dynamic batching on)", "ms", False),
    Figure("cold_ms", "cold start (median first request)", "ms", False),
    Figure("zipf_p50_ms", "Zipf mix p50 (N clients)", "ms", False),
    Figure("zipf_p99_ms", "Zipf mix p99 (N clients)", "ms", False),
    Figure("zipf_errors", "Zipf mix failed requests (N clients)", "count", False),
    Figure("server_cpu_ms", "server CPU per warm request (1 client)", "ms", False),
    Figure("peak_memory_mib", "peak memory (PSS, process tree)", "MiB", False),
)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``, or None when either is missing or the peer's figure is 0."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return round(ours / theirs, 3)


def ratio_table(
    figures: Mapping[str, Mapping[str, float | None]],
    *,
    reference: str = "gpufaas",
    rounds: Mapping[str, Sequence[Mapping[str, float | None]]] | None = None,
) -> list[dict[str, Any]]:
    """One row per figure: each system's value and ``reference/peer`` for every peer.

    ``rounds`` (a run of several rounds, ``figures`` being their medians): each system's
    figures per round; each row then also holds every system's range over its rounds
    (``spread``) and the ratio of each round (``ratio_rounds``, see :func:`round_ratios`), and
    the ratio is their median."""
    if reference not in figures:
        raise ValueError(f"ratio_table: no figures for the reference system {reference!r}")
    peers = [name for name in figures if name != reference]
    rows = []
    for figure in FIGURES:
        row: dict[str, Any] = {
            "figure": figure.key,
            "label": figure.label,
            "unit": figure.unit,
            "higher_is_better": figure.higher_is_better,
            "values": {name: values.get(figure.key) for name, values in figures.items()},
            "ratios": {
                peer: ratio(figures[reference].get(figure.key), figures[peer].get(figure.key))
                for peer in peers
            },
        }
        if rounds is not None:
            per_round = {
                name: [r.get(figure.key) for r in rounds.get(name, [])] for name in figures
            }
            row["spread"] = {name: spread(values) for name, values in per_round.items()}
            row["ratio_rounds"] = {
                peer: round_ratios(per_round[reference], per_round[peer]) for peer in peers
            }
            # the ratio is the median of the rounds' ratios, not the medians' ratio: the
            # figure that sits inside the range printed after it
            for peer, ratios in row["ratio_rounds"].items():
                if ratios:
                    row["ratios"][peer] = round(median(ratios) or 0.0, 3)
        rows.append(row)
    return rows


def median(values: Sequence[float | None]) -> float | None:
    """The median of the known values; None if there is none."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    return float(np.median(known))


def spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    """(lowest, highest) of the known values; None if there is none."""
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else None


def round_ratios(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float]:
    """Our figure over the peer's, round by round: round i against the peer's round i where
    both ran every round (measured minutes apart, so a change in the machine's load hits both),
    else each of our rounds against the peer's median. Unknown values are left out."""
    if len(ours) == len(theirs):
        pairs = list(zip(ours, theirs, strict=True))
    else:
        pairs = [(value, median(theirs)) for value in ours]
    return [r for r in (ratio(a, b) for a, b in pairs) if r is not None]


def cell(value: float | None, between: Sequence[float] | None = None) -> str:
    """A figure, with the range of its rounds after it (``1.5 (1.2-1.7)``) when they differ."""
    if value is None:
        return "-"

    def number(v: float) -> str:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    if between and len(between) > 1 and number(min(between)) != number(max(between)):
        return f"{number(value)} ({number(min(between))}-{number(max(between))})"
    return number(value)


def format_table(rows: Sequence[Mapping[str, Any]], *, reference: str = "gpufaas") -> str:
    """A Markdown table: figure, each system's value, then ``reference/peer`` per peer."""
    if not rows:
        return ""
    systems = list(rows[0]["values"])
    peers = list(rows[0]["ratios"])
    header = ["figure", "unit", *systems, *(f"{reference}/{p}" for p in peers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if all(value is None for value in row["values"].values()):
            continue  # not measured in this mode (the batched figures outside --goals, say)
        spreads = row.get("spread", {})
        ratio_rounds = row.get("ratio_rounds", {})
        cells = [row["label"], row["unit"]]
        cells += [cell(row["values"][s], spreads.get(s)) for s in systems]
        cells += [cell(row["ratios"][p], ratio_rounds.get(p)) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """One of the issue's goals and whether the measured ratio meets it."""

    name: str
    peer: str
    figure: str
    bound: float
    ratio: float | None
    met: bool | None  # None: not measured (peer missing)
    how: str = "le"  # ratio "le" / "ge" / "lt" the bound
    rounds: tuple[float, ...] = ()  # the ratio of each round (a run of several rounds)
    met_rounds: int = 0  # how many of those met the bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (name, peer, figure, bound, "le" for ratio <= bound, "ge" for ratio >= bound)
_GOALS: tuple[tuple[str, str, str, float, str], ...] = (
    ("warm p50 at least 2x lower than Ray Serve", "ray", "warm_p50_ms", 0.5, "le"),
    ("warm p99 at least 2x lower than Ray Serve", "ray", "warm_p99_ms", 0.5, "le"),
    ("throughput at least 2x Ray Serve (warm models)", "ray", "throughput_rps", 2.0, "ge"),
    ("throughput at least 2x Ray Serve (Zipf mix)", "ray", "zipf_throughput_rps", 2.0, "ge"),
    ("cold start lower than Ray Serve", "ray", "cold_ms", 1.0, "lt"),
    ("cold start lower than PyTriton", "triton", "cold_ms", 1.0, "lt"),
    ("warm p50 within 1.5x of PyTriton", "triton", "warm_p50_ms", 1.5, "le"),
    *(
        # issue #17's data-plane goals (``run.py --goals``)
        ("#17 warm p50 <= PyTriton's", "triton", "warm_p50_ms", 1.0, "le"),
        ("#17 warm p50 at least 2x lower than Ray Serve's", "ray", "warm_p50_ms", 0.5, "le"),
        ("#17 batched throughput >= PyTriton's", "triton", "batched_throughput_rps", 1.0, "ge"),
        ("#17 batched throughput >= 2x Ray Serve's", "ray", "batched_throughput_rps", 2.0, "ge"),
    ),
)

# The goals ``run.py --goals`` prints as its table.
GOALS_17 = tuple(goal[0] for goal in _GOALS if goal[0].startswith("#17 "))


def _meets(value: float, bound: float, how: str) -> bool:
    if how == "le":
        return value <= bound
    if how == "ge":
        return value >= bound
    return value < bound


def check_goals(rows: Sequence[Mapping[str, Any]]) -> list[Goal]:
    """Evaluate the issue's goals on a ratio table (gpufaas is the reference): on the ratio of
    the figures (the medians, in a run of rounds), each round's counted too."""
    by_figure = {row["figure"]: row for row in rows}
    goals = []
    for name, peer, figure, bound, how in _GOALS:
        row = by_figure.get(figure)
        value = None if row is None else row["ratios"].get(peer)
        rounds = tuple(row.get("ratio_rounds", {}).get(peer, ())) if row is not None else ()
        met = None if value is None else _meets(value, bound, how)
        met_rounds = sum(_meets(r, bound, how) for r in rounds)
        goals.append(Goal(name, peer, figure, bound, value, met, how, rounds, met_rounds))
    return goals


def goal_table(per_family: Mapping[str, Mapping[str, Any]]) -> str:
    """Issue #17's goals as a Markdown table: one row per family and goal, with gpufaas's
    figure, the peer's, their ratio, the bound and whether it is met. ``per_family`` maps a
    family to ``{"figures": {system: {figure: value}}, "goals": [Goal.to_dict(), ...]}``, and
    in a run of rounds also ``"spread": {system: {figure: (low, high)}}``: each figure then
    shows its range over the rounds, each ratio the range of its rounds' ratios, and the
    verdict how many rounds met the bound."""
    lines = [
        "| family | goal | gpufaas | peer | gpufaas/peer | bound | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, data in per_family.items():
        figures = data["figures"]
        spreads = data.get("spread", {})
        for goal in data["goals"]:
            if goal["name"] not in GOALS_17:
                continue
            key, peer = goal["figure"], goal["peer"]
            ours = cell(figures.get("gpufaas", {}).get(key), spreads.get("gpufaas", {}).get(key))
            theirs = cell(figures.get(peer, {}).get(key), spreads.get(peer, {}).get(key))
            how = {"le": "<=", "ge": ">=", "lt": "<"}[goal["how"]]
            mark = {True: "met", False: "**missed**", None: "n/a"}[goal["met"]]
            rounds = goal.get("rounds") or ()
            if len(rounds) > 1:
                mark += f" ({goal['met_rounds']} of {len(rounds)} rounds)"
            lines.append(
                f"| {family} | {goal['name'][4:]} | {ours} | {theirs} "
                f"| {cell(goal['ratio'], rounds)} | {how} {goal['bound']:g} | {mark} |"
            )
    return "\n".join(lines)
