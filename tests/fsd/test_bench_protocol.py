"""The grid's measurement protocol in ``bench/fsd.py`` (fsd, fourteenth session).

A repeated grid runs every configuration ``--repeats`` times, each repetition in its own
shuffled order (``repetition_orders``); a cell is the median of its repetitions
(``median_cells``); the model can predict every cell at one speed for the whole grid
(``hold_probe``, scored as ``costmodel_hold_probe``) instead of at each cell's own probe.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from bench_support import load_bench
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.core.layered import radix_net

ROOT = Path(__file__).resolve().parents[2]
fsd = load_bench(ROOT / "bench" / "fsd.py", name="fsd_bench_protocol")

GRID = [(1, "direct", "block")] + [
    (n, c, m) for n in (2, 4, 8) for c in ("direct", "nats") for m in ("hypergraph", "block")
]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=30),
    repeats=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_every_repetition_runs_every_configuration_once(size: int, repeats: int, seed: int) -> None:
    configs = [(i, "direct", "block") for i in range(size)]
    orders = fsd.repetition_orders(configs, repeats=repeats, seed=seed)
    assert len(orders) == repeats
    assert all(sorted(order) == configs for order in orders)
    assert orders == fsd.repetition_orders(configs, repeats=repeats, seed=seed)  # reproducible
    if repeats == 1:
        assert orders == [configs]  # one repetition: the grid of sessions 4-13, as listed


def test_repetitions_are_shuffled_each_in_an_order_of_its_own() -> None:
    for seed in range(5):
        orders = fsd.repetition_orders(GRID, repeats=3, seed=seed)
        assert len({tuple(order) for order in orders}) == 3, seed  # interleaved, not repeated
    assert fsd.repetition_orders(GRID, repeats=3, seed=1) != fsd.repetition_orders(
        GRID, repeats=3, seed=2
    )


def _row(
    config: tuple[int, str, str], repetition: int, latency_ms: float, **extra: Any
) -> dict[str, Any]:
    shards, channel, method = config
    return {
        "shards": shards, "channel": channel, "method": method, "seed": 3, "batch": 16,
        "repetition": repetition, "latency_s": latency_ms / 1e3,
        "throughput_rps": 1e3 / latency_ms, "probe_passes_s": [latency_ms / 1e4] * 3, **extra,
    }  # fmt: skip


def test_a_cell_is_the_median_of_its_repetitions_and_a_failure_in_any_fails_it() -> None:
    a, b, c = (1, "direct", "block"), (2, "direct", "block"), (2, "nats", "block")
    rows = [
        _row(b, 1, 30.0), _row(a, 0, 10.0), _row(b, 0, 20.0), _row(a, 2, 14.0),
        _row(a, 1, 30.0), _row(b, 2, 24.0),
        _row(c, 0, 5.0), {"shards": 2, "channel": "nats", "method": "block", "repetition": 1,
                          "failed": "shard 1 of radix: gone"},
    ]  # fmt: skip
    merged = fsd.median_cells(rows)
    assert [(r["shards"], r["channel"]) for r in merged] == [(2, "direct"), (1, "direct"),
                                                             (2, "nats")]  # fmt: skip
    by = {(r["shards"], r["channel"]): r for r in merged}
    assert by[(1, "direct")]["latency_s"] == pytest.approx(0.014)
    assert by[(2, "direct")]["latency_s"] == pytest.approx(0.024)
    assert by[(1, "direct")]["throughput_rps"] == pytest.approx(1e3 / 14.0)
    assert by[(1, "direct")]["repetitions_latency_s"] == pytest.approx([0.010, 0.030, 0.014])
    assert len(by[(1, "direct")]["probe_passes_s"]) == 9  # every repetition's passes
    assert by[(1, "direct")]["probe_s"] == pytest.approx(0.0014)
    assert "repetition" not in by[(1, "direct")]
    assert "failed" in by[(2, "nats")]


def test_the_hold_probe_is_the_median_of_every_cells_passes() -> None:
    rows = [
        {"probe_passes_s": [1.0, 2.0, 9.0]},
        {"probe_passes_s": [3.0]},
        {"failed": "x", "probe_passes_s": [100.0, 100.0, 100.0]},
    ]
    assert fsd.hold_probe(rows) == statistics.median([1.0, 2.0, 9.0, 3.0])
    assert fsd.hold_probe([{"latency_s": 1.0}]) is None


@pytest.fixture(scope="module")
def scored() -> dict[str, Any]:
    """A repeated grid on a small net (three repetitions, each cell's probe its own),
    scored against session 13's second calibration."""
    calibration = json.loads((ROOT / "bench" / "fsd-calibration-s13b.json").read_text())
    net = radix_net(1024, 4)
    configs = [(1, "direct", "block"), (2, "direct", "block"), (2, "direct", "random"),
               (2, "nats", "block")]  # fmt: skip
    raw = []
    for repetition in range(3):
        for index, config in enumerate(configs):
            row = _row(config, repetition, 2.0 + index + repetition)
            row["probe_passes_s"] = [0.0008 + 0.0002 * index + 0.0001 * repetition] * 2
            raw.append(row)
    grid = fsd.median_cells(raw)
    return fsd.score(net, grid, calibration["calibration"], repetitions=raw) | {"grid": grid}


def test_the_hold_probe_predicts_every_cell_at_one_speed(scored: dict[str, Any]) -> None:
    hold = scored["costmodel_hold_probe"]
    ref = hold["constants"]["probe_s"]
    assert hold["hold_probe_s"] == pytest.approx(fsd.hold_probe(scored["grid"]))
    rows = scored["grid"]
    # the per-cell model (rows scored in place) moved each cell by its own probe ...
    per_cell = {round(r["predicted_s"] / r["ranked_s"], 9) for r in rows}
    assert per_cell == {round(r["probe_s"] / ref, 9) for r in rows} and len(per_cell) > 1
    # ... the hold's by one ratio for all: its errors are the per-cell ones rescaled
    errors = hold["cell_errors"]
    assert len(errors) == len(rows)
    for r in rows:
        label = f"N={r['shards']} {r['channel']} {r['method']}"
        assert errors[label] == pytest.approx(
            (1 + r["error"]) * hold["hold_probe_s"] / r["probe_s"] - 1
        )


def test_the_first_repetition_and_each_repetition_are_scored_on_their_own(
    scored: dict[str, Any],
) -> None:
    first = scored["costmodel_first_repetition"]
    assert first["cells"] == 4
    per = scored["per_repetition"]
    assert len(per["repetitions"]) == 3
    assert per["groups"] == 3 * len(scored["costmodel"]["choices"])
    speeds = [r["hold_probe_s"] for r in per["repetitions"]]
    assert len(set(speeds)) == 3  # each repetition at its own speed


def test_the_shallow_control_fits_without_the_deeper_channel_runs_and_only_them() -> None:
    """The sixteenth session's calibration adds 32-deep channel runs; the control
    (``channel_depths=SHALLOW_CHANNEL_DEPTHS``) is the same calibration's fit without them,
    message split included, and is scored beside only where a calibration has them."""
    calibration = json.loads((ROOT / "bench" / "fsd-calibration-s15.json").read_text())
    runs = calibration["calibration"]["runs"]
    assert 32 in fsd.CHANNEL_DEPTHS and 32 not in fsd.SHALLOW_CHANNEL_DEPTHS
    deeper = [dict(r, depth=32, seconds=r["seconds"] * 3.5) for r in runs["channels"]
              if "split" not in r and r["depth"] == 8]  # fmt: skip
    with_deep = {**runs, "channels": runs["channels"] + deeper}
    control = fsd.fit_constants(with_deep, cores=2, channel_depths=fsd.SHALLOW_CHANNEL_DEPTHS)
    assert control == fsd.fit_constants(runs, cores=2)
    assert fsd.fit_constants(with_deep, cores=2) != control  # the deeper runs count by default
    net = radix_net(1024, 4)
    grid = [_row(c, 0, 2.0 + i) for i, c in enumerate([(1, "direct", "block"),
                                                      (2, "direct", "block")])]  # fmt: skip
    deep = fsd.score(
        net, [dict(r) for r in grid], {**calibration["calibration"], "runs": with_deep}
    )
    shallow = fsd.score(net, [dict(r) for r in grid], calibration["calibration"])
    assert "costmodel_shallow_calibration" in deep
    assert "costmodel_shallow_calibration" not in shallow
    # the control is the old default form's (w = 1, no relay), as it was before it changed
    assert deep["costmodel_shallow_calibration"]["cell_predicted_s"] == pytest.approx(
        shallow["costmodel_w1"]["cell_predicted_s"]
    )


def test_the_grid_width_runs_are_fitted_only_in_their_own_alternative() -> None:
    """The seventeenth session's calibration adds N = 2 runs at the grid's width. Every fit
    the bench scores is of the calibration without them (its primary, the relay form, as
    scored post hoc on the earlier holds), except ``costmodel_relay_grid_width``, which is
    the relay form's fit with them, and is there only where a calibration has them."""
    calibration = json.loads((ROOT / "bench" / "fsd-calibration-s16.json").read_text())
    runs = calibration["calibration"]["runs"]
    assert not any(fsd._grid_width(r) for r in runs["channels"])
    wide = [dict(r, neurons=fsd.GRID_WIDTH, seconds=r["seconds"] * 2.5)
            for r in runs["channels"]
            if "split" not in r and r["shards"] == 2 and r["depth"] == 8]  # fmt: skip
    assert wide and all(fsd._grid_width(r) for r in wide)
    with_wide = {**runs, "channels": runs["channels"] + wide}
    relay = {"relay": True, "contention_weight": 0.3}
    assert fsd.fit_constants(with_wide, cores=2, **relay) != fsd.fit_constants(
        runs, cores=2, **relay
    )
    net = radix_net(1024, 4)
    grid = [_row(c, 0, 2.0 + i) for i, c in enumerate([(1, "direct", "block"),
                                                      (2, "nats", "block")])]  # fmt: skip
    scored = fsd.score(
        net, [dict(r) for r in grid], {**calibration["calibration"], "runs": with_wide}
    )
    plain = fsd.score(net, [dict(r) for r in grid], calibration["calibration"])
    assert "costmodel_relay_grid_width" in scored and "costmodel_relay_grid_width" not in plain
    for key in ("costmodel", "costmodel_relay", "costmodel_served_contention"):
        assert scored[key]["cell_predicted_s"] == pytest.approx(plain[key]["cell_predicted_s"])
    assert scored["costmodel_relay_grid_width"]["cell_predicted_s"] != pytest.approx(
        plain["costmodel_relay"]["cell_predicted_s"]
    )


def test_the_default_form_is_the_relay_form_at_the_served_weight_and_w1_is_scored_beside() -> None:
    """The seventeenth session's follow-up: the bench's default fit (``costmodel``, the grid's
    predictions) is the relay form at w = 0.3, the same as ``costmodel_relay``; the old
    default (w = 1, no relay) is ``costmodel_w1``, and the controls stay fitted with it."""
    calibration = json.loads((ROOT / "bench" / "fsd-calibration-s16.json").read_text())
    runs = calibration["calibration"]["runs"]
    default = fsd.fit_constants(runs, cores=2)
    assert default == fsd.fit_constants(runs, cores=2, relay=True, contention_weight=0.3)
    assert default.contention_weight == 0.3 and default.channels["s3"].per_relay_message_s > 0
    net = radix_net(1024, 4)
    grid = [_row(c, 0, 2.0 + i) for i, c in enumerate([(1, "direct", "block"),
                                                      (2, "s3", "block")])]  # fmt: skip
    scored = fsd.score(net, [dict(r) for r in grid], calibration["calibration"])
    assert scored["costmodel"]["cell_predicted_s"] == scored["costmodel_relay"]["cell_predicted_s"]
    old = fsd.evaluate(net, [dict(r) for r in grid],
                       fsd.fit_constants(runs, cores=2, contention_weight=1.0, relay=False))  # fmt: skip
    assert scored["costmodel_w1"]["cell_predicted_s"] == old["cell_predicted_s"]
    assert old["cell_predicted_s"] != scored["costmodel"]["cell_predicted_s"]


def test_the_relay_direct_control_fits_directs_relay_and_the_default_does_not() -> None:
    """The eighteenth session's secondary form, ``costmodel_relay_direct``: the default fit
    with direct's relay terms fitted too (``fit_constants(relayed=RELAYED_DIRECT)``). On the
    s17b calibration the default leaves direct's relay at 0; the control finds an on-path
    time per message, and the bench scores it beside the default, which it leaves as it was."""
    calibration = json.loads((ROOT / "bench" / "fsd-calibration-s17b.json").read_text())
    runs = calibration["calibration"]["runs"]
    default = fsd.fit_constants(runs, cores=2)
    control = fsd.fit_constants(runs, cores=2, relayed=fsd.RELAYED_DIRECT)
    assert default.channels["direct"].per_relay_message_s == 0
    assert control.channels["direct"].per_relay_message_s > 0
    assert "direct" in fsd.RELAYED_DIRECT and "direct" not in fsd.RELAYED
    net = radix_net(1024, 4)
    grid = [_row(c, 0, 2.0 + i) for i, c in enumerate([(1, "direct", "block"),
                                                      (2, "direct", "block")])]  # fmt: skip
    scored = fsd.score(net, [dict(r) for r in grid], calibration["calibration"])
    assert scored["costmodel_relay_direct"]["cell_predicted_s"] != pytest.approx(
        scored["costmodel"]["cell_predicted_s"]
    )
    assert scored["costmodel"]["cell_predicted_s"] == pytest.approx(
        scored["costmodel_relay"]["cell_predicted_s"]
    )
