"""The calibration's sharded runs in rounds (``bench/fsd.py``, the seventeenth session's
follow-up): every sharded configuration is timed in several interleaved rounds, each its own
deploy, and the fit sees the median of the rounds, not one timing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench_support import load_bench
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
fsd = load_bench(ROOT / "bench" / "fsd.py", name="fsd_calibration_rounds")
S17 = json.loads((ROOT / "bench" / "fsd-calibration-s17.json").read_text())["calibration"]


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["channel"], row.get("split"), int(row.get("neurons", fsd.CHANNEL_WIDTH)),
            row["depth"], row["shards"], row["method"])  # fmt: skip


def test_the_rounds_run_the_configurations_the_calibration_ran_once() -> None:
    configs = fsd.sharded_configs(["direct", "nats", "s3"], 8)
    assert len({c["name"] for c in configs}) == len(configs)
    assert [_key(c) for c in configs] == list(
        dict.fromkeys(_key(r) for r in S17["runs"]["channels"])
    )


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1.0), st.floats(1e-4, 1e-2), st.floats(0.0, 50.0)),
                min_size=1, max_size=7))  # fmt: skip
def test_a_row_is_the_median_of_its_rounds(rounds: list[tuple[float, float, float]]) -> None:
    timed = [{"seconds": s, "probe_s": p, "others_ms": o} for s, p, o in rounds]
    config = {"name": "cal-x", "channel": "nats", "neurons": 2048, "depth": 4, "shards": 2,
              "method": "block"}  # fmt: skip
    row = fsd.median_of_rounds(config, 16, timed)
    assert row["seconds"] == statistics.median(s for s, _, _ in rounds)
    assert row["probe_s"] == statistics.median(p for _, p, _ in rounds)
    assert row["others_ms"] == statistics.median(o for _, _, o in rounds)
    assert row["rounds_seconds"] == [s for s, _, _ in rounds]
    assert "name" not in row and row["batch"] == 16 and row["channel"] == "nats"


def test_the_fit_sees_the_median_round_not_the_first_nor_the_fastest() -> None:
    runs = S17["runs"]
    rebuilt = []
    for r in runs["channels"]:
        config = {k: v for k, v in r.items() if k not in ("batch", "seconds", "probe_s")}
        s, p = r["seconds"], r["probe_s"]
        # the first round slow, the second fast, the median the calibration's own reading
        rounds = [{"seconds": 1.3 * s, "probe_s": p, "others_ms": 2.0},
                  {"seconds": 0.75 * s, "probe_s": p, "others_ms": 0.0},
                  {"seconds": s, "probe_s": p, "others_ms": 1.0}]  # fmt: skip
        rebuilt.append(fsd.median_of_rounds(config, r["batch"], rounds))
    fit = fsd.fit_constants({**runs, "channels": rebuilt}, cores=2)
    assert fit == fsd.fit_constants(runs, cores=2)
    fastest = [{**r, "seconds": 0.75 * r["seconds"]} for r in runs["channels"]]
    assert fit != fsd.fit_constants({**runs, "channels": fastest}, cores=2)


def test_the_first_round_control_sees_each_runs_first_round() -> None:
    runs = S17["runs"]
    rows = [{**r, "rounds_seconds": [2 * r["seconds"], r["seconds"], r["seconds"]],
             "rounds_probe_s": [r["probe_s"]] * 3} for r in runs["channels"]]  # fmt: skip
    first = fsd.first_round({**runs, "channels": rows})
    assert [r["seconds"] for r in first["channels"]] == [2 * r["seconds"] for r in runs["channels"]]
    assert first["coordinator"] == runs["coordinator"] and first["compute"] == runs["compute"]


def test_every_round_runs_every_unsharded_configuration_then_every_sharded_one() -> None:
    """The eighteenth session: the unsharded runs are timed in every round, as the sharded
    ones, each round running all of them before the sharded configurations (before, they
    ran twice, before and after every sharded round)."""
    channels, nodes, rounds = ["direct", "nats", "s3"], 8, 3
    schedule = fsd.calibration_schedule(rounds, channels, nodes)
    unsharded, sharded = fsd.unsharded_configs(), fsd.sharded_configs(channels, nodes)
    pingpong = fsd.pingpong_configs(channels, nodes)  # nineteenth session: after the sharded
    every = unsharded + sharded + pingpong
    assert len({c["name"] for c in every}) == len(every) and len(pingpong) == 4
    for index in range(rounds):
        steps = [(kind, config) for i, kind, config in schedule if i == index]
        assert steps == [("unsharded", c) for c in unsharded] + [
            ("sharded", c) for c in sharded
        ] + [("pingpong", c) for c in pingpong]
    assert [i for i, _, _ in schedule] == sorted(i for i, _, _ in schedule)
    widths = [(c["width"], c["depth"]) for c in unsharded]
    assert widths == list(
        dict.fromkeys((r["width"], r["depth"]) for r in S17["runs"]["coordinator"])
    )


def test_an_unsharded_row_is_the_median_of_its_rounds_not_the_fastest() -> None:
    """Every row the fit sees, unsharded and sharded, is the median of its rounds: rounds of
    1.3x, 0.75x and 1x each stored run rebuild the stored calibration's rows and fit; keeping
    an unsharded run's fastest round (its rule until the eighteenth session) would not."""
    channels, nodes, batches = ["direct", "nats", "s3"], 8, (16, 64)
    runs = S17["runs"]
    stored = {(c["name"], b): r for c, b, r in (
        *((c, r["batch"], r) for c in fsd.unsharded_configs() for r in runs["coordinator"]
          if (r["width"], r["depth"]) == (c["width"], c["depth"])),
        *((c, r["batch"], r) for c in fsd.sharded_configs(channels, nodes)
          for r in runs["channels"] if _key(r) == _key(c)),
    )}  # fmt: skip
    assert len(stored) == 2 * (
        len(fsd.unsharded_configs()) + len(fsd.sharded_configs(channels, nodes))
    )
    timed = {key: [{"seconds": f * r["seconds"], "probe_s": r["probe_s"], "others_ms": 0.0}
                   for f in (1.3, 0.75, 1.0)] for key, r in stored.items()}  # fmt: skip
    rows = fsd.calibration_rows(timed, channels, nodes, batches)
    assert [r["seconds"] for r in rows["coordinator"]] == [
        r["seconds"] for r in runs["coordinator"]
    ]
    assert [(r["width"], r["depth"], r["batch"]) for r in rows["coordinator"]] == [
        (r["width"], r["depth"], r["batch"]) for r in runs["coordinator"]
    ]
    assert all(len(r["rounds_seconds"]) == 3 for r in rows["coordinator"] + rows["channels"])
    fit = fsd.fit_constants({**runs, **rows}, cores=2)
    assert fit == fsd.fit_constants(runs, cores=2)
    fastest = [{**r, "seconds": 0.75 * r["seconds"]} for r in runs["coordinator"]]
    assert fit != fsd.fit_constants({**runs, "coordinator": fastest}, cores=2)
