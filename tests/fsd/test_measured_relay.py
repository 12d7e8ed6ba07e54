"""The nineteenth session's measured form (fsd): a round's delivery latency on the waiting
shard's path, measured on its own (the ping-pong calibration runs, ``bench/fsd.py``
``path_latency``), pinned as direct's ``per_relay_sync_s`` before the other terms are fitted,
so the fit cannot trade it for ``c_sync``; and the benchmark's records of which path each
run's messages took (the managers' link counts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from bench_support import load_bench
from costmodel_support import constants as _constants
from costmodel_support import profile as _profile
from prometheus_client import CollectorRegistry, generate_latest

from gpufaas.core.hostlink import LinkCounts
from gpufaas.core.layered import radix_net
from gpufaas.gpu_manager.shards import LinkCollector
from gpufaas.scheduler import costmodel

ROOT = Path(__file__).resolve().parents[2]
fsd = load_bench(ROOT / "bench" / "fsd.py", name="fsd_bench_measured_relay")
S18 = json.loads((ROOT / "bench" / "fsd-calibration-s18.json").read_text())["calibration"]


def test_the_delivery_latency_is_on_the_waiting_shards_path_and_on_no_core() -> None:
    """At N = 2 on two cores it adds exactly its charge per layer that waits; with more shards
    than cores, and the cores' branch binding, it adds nothing."""
    plain = costmodel.ChannelCost(1e-4, 1e-9, 2e-4, 1e-3)
    latency = dataclasses.replace(plain, per_relay_sync_s=3e-4)
    two, batch = _profile(2), 16
    added = 3e-4 * float(two.sync.max(axis=1).sum())
    before = costmodel.predict(two, batch=batch, channel="x", constants=_constants(plain))
    after = costmodel.predict(two, batch=batch, channel="x", constants=_constants(latency))
    assert after - before == pytest.approx(added, rel=1e-9) and added > 0.05 * before
    heavy = costmodel.Compute(per_op_s=1e-3, per_nnz_s=1e-6)
    eight = _profile(8, "random")
    crowded = [costmodel.predict(eight, batch=batch, channel="x",
                                 constants=_constants(c, heavy)) for c in (plain, latency)]  # fmt: skip
    assert crowded[1] == pytest.approx(crowded[0], rel=1e-12)


def _design() -> list[tuple[costmodel.Profile, int]]:
    return [(_profile(shards, method, depth), batch)
            for depth in (4, 8)
            for shards, method in ((2, "block"), (2, "random"), (4, "block"), (4, "random"),
                                   (8, "block"))
            for batch in (16, 64)]  # fmt: skip


def test_the_latency_is_never_fitted_and_pinned_it_leaves_the_other_terms_to_the_fit() -> None:
    """Runs made by a model with a delivery latency: fitted without it, the latency stays 0
    (never a free term); pinned at its true value, the fit gives back every other term."""
    truth = costmodel.ChannelCost(1.2e-4, 2e-9, 1.5e-4, 5e-4, per_wake_s=8e-4,
                                  per_relay_sync_s=3e-4)  # fmt: skip
    base = _constants(costmodel.ChannelCost(0.0, 0.0, 0.0, 0.0))
    made = _constants(truth)
    runs = {"x": [(p, b, costmodel.predict(p, batch=b, channel="x", constants=made))
                  for p, b in _design()]}  # fmt: skip
    loose = costmodel.fit_channels(runs, base=base, shared=(), relayed=())
    assert loose["x"].per_relay_sync_s == 0.0
    pinned = costmodel.fit_channels(runs, base=base, shared=(), relayed=(),
                                    fixed={"x": {"per_relay_sync_s": 3e-4}})  # fmt: skip
    assert pinned["x"].per_relay_sync_s == 3e-4
    assert dataclasses.astuple(pinned["x"]) == pytest.approx(dataclasses.astuple(truth), rel=1e-3)


def _pingpong_rows(wall_s: dict[int, float], cpu_s: dict[int, float], probe: float
                   ) -> list[dict[str, Any]]:  # fmt: skip
    """Ping-pong rows as the calibration records them, made from a wall time and a CPU per
    exchange round (per shard count) over a fixed part per request, three rounds each."""
    rows = []
    for config in fsd.pingpong_configs(["direct"], 8):
        shards, depth = config["shards"], config["depth"]
        exchanges = int((fsd._calibration_profile(depth, shards, "block", fsd.PINGPONG_WIDTH)
                         .sync.max(axis=1) > 0).sum())  # fmt: skip
        for batch in (16, 64):
            rounds = [{"seconds": 2e-3 + exchanges * wall_s[shards] + noise,
                       "probe_s": probe, "others_ms": 0.0, "coordinator_ms": 1.0,
                       "managers_ms": (1e-3 + exchanges * cpu_s[shards]) * 1e3}
                      for noise in (0.0, 1e-6, -1e-6)]  # fmt: skip
            rows.append(fsd.median_of_rounds(config, batch, rounds))
    return rows


def test_the_pingpong_runs_give_a_rounds_time_on_no_core() -> None:
    """Per exchange round, from the two depths' difference: the wall time beyond the CPU
    shared out over min(N, cores) cores (at N = 2 the busiest shard's CPU, half the
    managers'); every per-request part cancels, and the speed is the calibration's."""
    probe = fsd._probe_reference(S18["runs"])
    measured = {**S18["runs"], "pingpong": _pingpong_rows({2: 5e-4, 4: 6e-4},
                                                          {2: 6e-4, 4: 1.2e-3}, probe)}  # fmt: skip
    found = fsd.path_latency(measured, cores=2)
    assert found["2"]["off_cpu_s"] == pytest.approx(5e-4 - 6e-4 / 2, rel=1e-6)
    assert found["4"]["off_cpu_s"] == pytest.approx(0.0, abs=1e-9)  # hidden over the cores
    assert found["2"]["batches"][16]["cpu_s"] == pytest.approx(6e-4, rel=1e-6)
    assert len(found["2"]["batches"][64]["rounds_off_cpu_s"]) == 3
    slower = {**measured, "pingpong": _pingpong_rows({2: 1e-3, 4: 1.2e-3},
                                                     {2: 1.2e-3, 4: 2.4e-3}, 2 * probe)}  # fmt: skip
    assert fsd.path_latency(slower, cores=2)["2"]["off_cpu_s"] == pytest.approx(2e-4, rel=1e-6)
    pinned = fsd.measured_relay(measured, cores=2)
    assert pinned == {"direct": {"per_relay_sync_s": pytest.approx(2e-4, rel=1e-6)}}
    assert fsd.measured_relay(S18["runs"], cores=2) == {}  # no ping-pong runs: nothing pinned
    negative = {**measured, "pingpong": _pingpong_rows({2: 2e-4, 4: 2e-4},
                                                       {2: 6e-4, 4: 6e-4}, probe)}  # fmt: skip
    assert fsd.measured_relay(negative, cores=2)["direct"]["per_relay_sync_s"] == 0.0


def test_the_measured_form_pins_the_latency_and_is_the_default_with_pingpong_runs() -> None:
    """``fit_constants(pinned=...)`` fits direct with its delivery latency fixed at the
    measured value; the default fit ignores the ping-pong runs altogether (their rows in the
    calibration change nothing in it), and the bench scores the measured form beside it,
    with the plan's rule read from the calibration alone."""
    probe = fsd._probe_reference(S18["runs"])
    measured = {**S18["runs"], "pingpong": _pingpong_rows({2: 5e-4, 4: 6e-4},
                                                          {2: 6e-4, 4: 1.2e-3}, probe)}  # fmt: skip
    assert fsd.fit_constants(measured, cores=2) == fsd.fit_constants(S18["runs"], cores=2)
    pinned = fsd.measured_relay(measured, cores=2)
    form = fsd.fit_constants(measured, cores=2, pinned=pinned)
    assert form.channels["direct"].per_relay_sync_s == pytest.approx(2e-4, rel=1e-6)
    assert form.channels["nats"].per_relay_sync_s == 0.0
    assert fsd.fit_constants(measured, cores=2).channels["direct"].per_relay_sync_s == 0.0
    assert form.channels["direct"].per_sync_s != fsd.fit_constants(
        measured, cores=2).channels["direct"].per_sync_s  # fmt: skip
    net = radix_net(1024, 4)
    grid = [{"shards": n, "channel": "direct", "method": "block", "batch": 64,
             "latency_s": 0.01, "probe_s": probe} for n in (1, 2)]  # fmt: skip
    calibration = {**S18, "runs": measured}
    scored = fsd.score(net, [dict(r) for r in grid], calibration)
    fitted = {**measured, "channels": [r for r in measured["channels"] if not fsd._grid_width(r)]}
    assert scored["costmodel_measured_relay"]["pinned"] == fsd.measured_relay(fitted, cores=2)
    assert scored["primary_rule"]["primary"] in ("costmodel", "costmodel_measured_relay")
    assert scored["primary_rule"]["per_relay_sync_s"] == pytest.approx(
        scored["costmodel_measured_relay"]["pinned"]["direct"]["per_relay_sync_s"]
    )
    plain = fsd.score(net, [dict(r) for r in grid], S18)
    assert "costmodel_measured_relay" not in plain and "primary_rule" not in plain
    assert "costmodel_unpinned" not in plain
    # the default pins the measured latency where the ping-pong runs ran (the nineteenth
    # session's second hold); without them it is the unpinned fit, as before
    assert scored["costmodel"]["cell_errors"] == scored["costmodel_measured_relay"]["cell_errors"]
    assert plain["costmodel"]["cell_errors"] == scored["costmodel_unpinned"]["cell_errors"]
    assert scored["costmodel"]["cell_errors"] != plain["costmodel"]["cell_errors"]


@pytest.mark.parametrize(
    ("latency", "n2", "n4", "n4_default", "primary"),
    [
        (2e-4, 0.04, 0.030, 0.031, True),
        (2e-4, -0.05, 0.031, 0.031, True),  # the bounds are inclusive
        (2e-4, 0.051, 0.02, 0.031, False),  # N = 2 not within 5%
        (2e-4, -0.06, 0.02, 0.031, False),
        (2e-4, 0.0, 0.032, 0.031, False),  # N >= 4 worse than the default's
        (0.0, 0.0, 0.02, 0.031, False),  # nothing measured on no core: the default
    ],
)
def test_the_rule_makes_the_measured_form_primary_only_when_every_check_holds(
    latency: float, n2: float, n4: float, n4_default: float, primary: bool
) -> None:
    checks = fsd.rule_checks(latency, default={"n4_median_abs_error": n4_default},
                             new={"n2_median_error": n2, "n4_median_abs_error": n4})  # fmt: skip
    assert all(checks.values()) is primary


def _metrics(counts: LinkCounts) -> str:
    registry = CollectorRegistry()
    registry.register(LinkCollector(counts))
    return generate_latest(registry).decode()


def test_the_managers_counts_are_added_and_differenced_as_the_node_exports_them() -> None:
    one, two = LinkCounts(), LinkCounts()
    before = fsd.link_counts_in([_metrics(one), _metrics(two)])
    one.messages["shm"] += 40
    two.messages["shm"] += 38
    two.messages["inline"] += 2
    one.setups["ok"] += 1
    after = fsd.link_counts_in([_metrics(one), _metrics(two)])
    delta = fsd.counts_between(before, after)
    assert delta["messages"] == {"shm": 78.0, "inline": 2.0, "http": 0.0, "local": 0.0}
    assert delta["setups"] == {"ok": 1.0, "failed": 0.0, "none": 0.0}
    assert fsd.counts_sum([delta, delta])["messages"]["shm"] == 156.0


def test_a_sharded_direct_run_off_shared_memory_is_named() -> None:
    def row(shards: int, channel: str, **sent: float) -> dict[str, Any]:
        messages = {"shm": 0.0, "inline": 0.0, "http": 0.0, "local": 0.0, **sent}
        return {"shards": shards, "channel": channel, "method": "block",
                "links": {"messages": messages}}  # fmt: skip

    rows = [row(2, "direct", shm=240), row(4, "direct", shm=10, inline=1),
            row(8, "direct", http=3), row(2, "nats"), row(1, "direct"),
            {"shards": 2, "channel": "direct", "method": "random"}]  # fmt: skip
    assert fsd.off_shared_memory(rows) == [
        "N=4 direct block",
        "N=8 direct block",
        "N=2 direct random",
    ]


def test_a_calibration_runs_rounds_keep_the_cpu_and_the_messages_by_path() -> None:
    config = {"name": "cal-x", "channel": "direct", "neurons": 2048, "depth": 4, "shards": 2,
              "method": "block"}  # fmt: skip
    links = {"messages": {"shm": 10.0}, "setups": {"ok": 1.0}}
    rounds = [{"seconds": s, "probe_s": 1.0, "others_ms": 0.0, "managers_ms": m,
               "coordinator_ms": 1.0, "links": links}
              for s, m in ((3.0, 9.0), (1.0, 7.0), (2.0, 8.0))]  # fmt: skip
    row = fsd.median_of_rounds(config, 16, rounds)
    assert row["managers_ms"] == 8.0 and row["rounds_managers_ms"] == [9.0, 7.0, 8.0]
    assert row["links"] == {"messages": {"shm": 30.0}, "setups": {"ok": 3.0}}
    older = fsd.median_of_rounds(config, 16, [{k: r[k] for k in ("seconds", "probe_s",
                                                                 "others_ms")} for r in rounds])  # fmt: skip
    assert "managers_ms" not in older and "links" not in older
