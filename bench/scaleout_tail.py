"""What the slowest requests are made of at 1, 2 and 4 gateway replicas (#16, exploratory).

    python bench/scaleout_tail.py bench/scaleout-round-s14-s{57..73}.json \
        bench/scaleout-round-s15-s{74..85}.json

From the round records that ``bench/lalb.py --mode live --json`` already keeps (each request's
hit or miss at the manager, whether its placement was forwarded, its latency, arrival, device
time, the forward as the sender saw it and the owner's own time; request ``i`` went to replica
``i mod N``), over the measured part of each run (after its first tenth, as the p99 itself):

- **the top 1% and 2%**, pooled over the rounds at each N (the primary's pooled p99 is their
  floor): what kind each request is (hit, local miss, forwarded miss), whether the placement
  owner or another replica took it in, and its mean parts: device time (load + forward pass at
  the manager), the hop (the forward less the owner's own time), the owner's time off the
  device, and the rest (the client and the ingress replica);
- **the same trace requests at one gateway**: whether they were misses there too, their latency
  there, and how many were in one gateway's own top set. If the tail at N is the same requests
  with the same kind, scheduling did not change them; their parts say what made them slower;
- **queueing, measured from the client's side**: how many requests were in flight (sent, not
  answered, at any replica) when each arrived, and whether it was a hit on a model whose miss
  was still in flight (it waited on that load). A request with nothing else in flight cannot
  wait in a gateway's or a device's queue, nor on another request's load;
- **where in the pool the tail sits**: how many of it the five slowest rounds hold, and the
  most of one round's tail inside 10 s (a stall, against a slower run throughout);
- **paired medians** over every forwarded miss (not only the tail) against the same request at
  one gateway, split into the ingress replica's part, the hop and the owner's part;
- **counterfactual pooled p99 ratios** (arithmetic on the records, not measurements): the tail
  at N with the forwarded misses' hop taken off, with each forwarded miss costing only what a
  local miss costs over one gateway (the round's medians), and with every request at N shifted
  down by the round's median hit excess.

Nothing here is a figure the goal is judged on; it says what the tail is made of.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("hit", "local miss", "forwarded miss", "forwarded hit")
_STALL_WINDOW_MS = 10_000
_LOOKBACK = 200


@dataclass(frozen=True)
class Request:
    """One measured, answered trace request of one run."""

    round: int
    index: int
    kind: str
    ingress_is_owner: bool
    latency_ms: float
    device_ms: float
    hop_ms: float
    owner_off_device_ms: float
    in_flight: int
    joined_load: bool
    at_ms: int
    # the same trace request at one gateway
    base_miss: bool
    base_latency_ms: float
    base_device_ms: float


def kind_of(cache: str, forwarded: str) -> str:
    """A request's kind from its record letters (``h``/``m``, ``f``/``.``)."""
    if forwarded == "f":
        return "forwarded miss" if cache == "m" else "forwarded hit"
    return "local miss" if cache == "m" else "hit"


def placement_owner(requests: dict[str, Any]) -> int:
    """The replica whose misses were placed without a forward (most local misses)."""
    n = requests["gateways"]
    local = [0] * n
    for i, (c, f) in enumerate(zip(requests["cache"], requests["forwarded"], strict=True)):
        if c == "m" and f != "f":
            local[i % n] += 1
    return max(range(n), key=lambda k: local[k])


def in_flight_at(at_ms: Sequence[int], latency_ms: Sequence[float], i: int) -> int:
    """How many of the :data:`_LOOKBACK` requests before ``i`` were sent and not yet answered
    when request ``i`` was sent (the trace's 25 req/s make that the last 8 s)."""
    return sum(
        1
        for j in range(max(0, i - _LOOKBACK), i)
        if latency_ms[j] > 0 and at_ms[j] + latency_ms[j] > at_ms[i]
    )


def joined_load(models: Sequence[int], requests: dict[str, Any], i: int) -> bool:
    """Whether request ``i`` came while the previous request for its model, a miss, was still
    in flight (it waited on that load, or started its own)."""
    for j in range(i - 1, -1, -1):
        if models[j] == models[i]:
            at: Sequence[int] = requests["at_ms"]
            lat: Sequence[float] = requests["latency_ms"]
            return bool(requests["cache"][j] == "m" and at[j] + lat[j] > at[i])
    return False


def run_requests(
    round_no: int, models: Sequence[int], run: dict[str, Any], base: dict[str, Any]
) -> list[Request]:
    """The measured, answered requests of one run, each with its parts and its twin at one
    gateway (``base``, the same trace)."""
    n = len(run["cache"])
    owner = placement_owner(run)
    out = []
    at, lat = run["at_ms"], run["latency_ms"]
    for i in range(n // 10, n):
        if run["cache"][i] == "-" or base["cache"][i] == "-":
            continue
        kind = kind_of(run["cache"][i], run["forwarded"][i])
        forwarded = kind.startswith("forwarded")
        out.append(
            Request(
                round=round_no,
                index=i,
                kind=kind,
                ingress_is_owner=i % run["gateways"] == owner,
                latency_ms=lat[i],
                device_ms=run["device_ms"][i],
                hop_ms=run["forward_ms"][i] - run["owner_ms"][i] if forwarded else 0.0,
                owner_off_device_ms=run["owner_ms"][i] - run["device_ms"][i] if forwarded else 0.0,
                in_flight=in_flight_at(at, lat, i),
                joined_load=run["cache"][i] == "h" and joined_load(models, run, i),
                at_ms=at[i],
                base_miss=base["cache"][i] == "m",
                base_latency_ms=base["latency_ms"][i],
                base_device_ms=base["device_ms"][i],
            )
        )
    return out


def top(requests: Sequence[Request], percentile: float) -> list[Request]:
    """The requests at or above the pooled ``percentile`` of latency."""
    floor = float(np.percentile([r.latency_ms for r in requests], percentile))
    return [r for r in requests if r.latency_ms >= floor]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def describe(tail: Sequence[Request], base_tail_keys: set[tuple[int, int]]) -> dict[str, Any]:
    """The kinds, ingress, parts, twins at one gateway, queueing and concentration of a tail."""
    by_round = Counter(r.round for r in tail)
    stall = 0
    for rnd in by_round:
        ats = sorted(r.at_ms for r in tail if r.round == rnd)
        stall = max(stall, max(sum(1 for b in ats if a <= b < a + _STALL_WINDOW_MS) for a in ats))
    parts = {
        kind: {
            "n": len(group),
            "latency_ms": _mean([r.latency_ms for r in group]),
            "device_ms": _mean([r.device_ms for r in group]),
            "hop_ms": _mean([r.hop_ms for r in group]),
            "owner_off_device_ms": _mean([r.owner_off_device_ms for r in group]),
            "rest_ms": _mean(
                [r.latency_ms - r.device_ms - r.hop_ms - r.owner_off_device_ms for r in group]
            ),
            "base_miss_share": _mean([float(r.base_miss) for r in group]),
            "base_latency_ms": _mean([r.base_latency_ms for r in group]),
        }
        for kind in KINDS
        if (group := [r for r in tail if r.kind == kind])
    }
    return {
        "n": len(tail),
        "floor_ms": min(r.latency_ms for r in tail),
        "kinds": parts,
        "ingress_owner_share": _mean([float(r.ingress_is_owner) for r in tail]),
        "in_base_tail_share": _mean([float((r.round, r.index) in base_tail_keys) for r in tail]),
        "nothing_else_in_flight_share": _mean([float(r.in_flight == 0) for r in tail]),
        "joined_load": sum(r.joined_load for r in tail),
        "five_slowest_rounds_share": sum(c for _, c in by_round.most_common(5)) / len(tail),
        "most_in_10s_of_one_round": stall,
    }


def paired_medians(rows: Sequence[Request]) -> dict[str, float]:
    """Over every forwarded miss that was a miss at one gateway too: the median latency over
    one gateway's, its parts, and the same requests' time off the device at one gateway; the
    latency over one gateway's for local misses and hits."""

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else float("nan")

    fwd = [r for r in rows if r.kind == "forwarded miss" and r.base_miss]
    local = [r for r in rows if r.kind == "local miss" and r.base_miss]
    hits = [r for r in rows if r.kind == "hit" and not r.base_miss]
    return {
        "forwarded_misses": float(len(fwd)),
        "forwarded_excess_ms": median([r.latency_ms - r.base_latency_ms for r in fwd]),
        "hop_ms": median([r.hop_ms for r in fwd]),
        "owner_off_device_ms": median([r.owner_off_device_ms for r in fwd]),
        "ingress_and_client_ms": median(
            [r.latency_ms - r.device_ms - r.hop_ms - r.owner_off_device_ms for r in fwd]
        ),
        "one_gateway_off_device_ms": median([r.base_latency_ms - r.base_device_ms for r in fwd]),
        "local_miss_excess_ms": median([r.latency_ms - r.base_latency_ms for r in local]),
        "hit_excess_ms": median([r.latency_ms - r.base_latency_ms for r in hits]),
    }


def counterfactual_ratios(
    rows: Sequence[Request], base_rows: Sequence[Request]
) -> dict[str, float]:
    """Pooled p99 at N over one gateway's, as measured and with three parts taken off
    (arithmetic on the records, per round's medians; not measurements)."""
    base_p99 = float(np.percentile([r.latency_ms for r in base_rows], 99))

    def ratio(latencies: list[float]) -> float:
        return float(np.percentile(latencies, 99)) / base_p99

    rounds = sorted({r.round for r in rows})
    fwd_cut: dict[int, float] = {}
    hit_shift: dict[int, float] = {}
    for rnd in rounds:
        mine = [r for r in rows if r.round == rnd]
        medians = paired_medians(mine)
        cut = medians["forwarded_excess_ms"] - medians["local_miss_excess_ms"]
        fwd_cut[rnd] = cut if np.isfinite(cut) else 0.0
        shift = medians["hit_excess_ms"]
        hit_shift[rnd] = shift if np.isfinite(shift) else 0.0
    return {
        "measured": ratio([r.latency_ms for r in rows]),
        "hop_free": ratio([r.latency_ms - r.hop_ms for r in rows]),
        "forward_costs_a_local_miss": ratio(
            [r.latency_ms - (fwd_cut[r.round] if r.kind == "forwarded miss" else 0.0) for r in rows]
        ),
        "hit_excess_off_everything": ratio([r.latency_ms - hit_shift[r.round] for r in rows]),
    }


def decompose(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole decomposition over rounds (one ``--json`` result per seed, runs at 1 and N)."""
    rows: dict[int, list[Request]] = {}
    for k, result in enumerate(results):
        by_n = {r["gateways"]: r["requests"] for r in result["runs"] if "requests" in r}
        for n, run in by_n.items():
            rows.setdefault(n, []).extend(run_requests(k, result["trace_models"], run, by_n[1]))
    out: dict[str, Any] = {"rounds": len(results)}
    for pct in (99.0, 98.0):
        base_keys = {(r.round, r.index) for r in top(rows[1], pct)}
        out[f"top {100 - pct:.0f}%"] = {
            str(n): describe(top(rows[n], pct), base_keys) for n in sorted(rows)
        }
    out["queueing, all requests"] = {
        str(n): {
            "nothing_else_in_flight_share": _mean([float(r.in_flight == 0) for r in rows[n]]),
            "joined_load": sum(r.joined_load for r in rows[n]),
            "n": len(rows[n]),
        }
        for n in sorted(rows)
    }
    out["paired medians"] = {str(n): paired_medians(rows[n]) for n in sorted(rows) if n > 1}
    out["counterfactual pooled p99 ratios"] = {
        str(n): counterfactual_ratios(rows[n], rows[1]) for n in sorted(rows) if n > 1
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rounds", nargs="+", type=Path, help="bench/lalb.py --json round files")
    args = parser.parse_args(argv)
    try:
        results = [json.loads(p.read_text()) for p in args.rounds]
    except (OSError, ValueError) as e:
        print(f"cannot read the rounds: {e}", file=sys.stderr)
        return 2
    print(json.dumps(decompose(results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
