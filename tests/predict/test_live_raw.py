"""The warm-p99 diagnosis's raw data (``bench/predict_live.py --raw``, ``bench/predict-warm.py``):
the node's prefetch log lines, as ``gpufaas`` formats them, are the ones the replay parses, and
a request is counted as meeting a prefetch only while a load runs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from bench_support import load_bench
from predict_nodes import tiny_mlp_spec as _spec
from prometheus_client import CollectorRegistry

from gpufaas.core.api import parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.cli import configure_logging
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.prefetch import Prefetcher, PrefetchJob
from gpufaas.gpu_manager.runtime import NodeRuntime

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from predict_live import prefetch_events  # noqa: E402

predict_warm = load_bench(BENCH / "predict-warm.py", name="predict_warm")


def _cli_format() -> logging.Formatter:
    """The formatter ``gpufaas`` commands log with (``configure_logging``'s)."""
    root = logging.getLogger()
    before = list(root.handlers)
    root.handlers = []
    try:
        configure_logging(verbose=False)
        formatter = root.handlers[0].formatter
    finally:
        root.handlers = before
    assert formatter is not None
    return formatter


async def test_the_nodes_prefetch_lines_are_the_ones_the_replay_reads(
    tmp_path: Path, tiny_mlp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    runtime.register("tiny", parse_spec(_spec(tiny_mlp)))
    device = next(iter(runtime.devices))
    prefetcher = Prefetcher(runtime, registry=CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="gpufaas.gpu_manager.prefetch"):
        assert await prefetcher.run(PrefetchJob("tiny", device, 1 << 20)) == "loaded"
    await runtime.settle()
    formatter = _cli_format()
    log = "\n".join(formatter.format(r) for r in caplog.records)
    events = prefetch_events(log)
    assert [(e[1], e[2], e[3]) for e in events] == [
        ("tiny", device, "started"),
        ("tiny", device, "loaded"),
    ]
    assert events[1][4] is not None and events[1][4] >= 0
    assert events[0][0] <= events[1][0]


def test_a_request_meets_a_prefetch_only_while_its_load_runs() -> None:
    prefetches = [[100.0, "m", "cpu:0", "started", None], [100.01, "m", "cpu:0", "loaded", 10.0]]
    spans = predict_warm.windows(prefetches, margin_s=0.0)
    assert spans == [(100.0, 100.01)]
    assert predict_warm.overlaps(99.995, 10.0, spans)  # in the system across the start
    assert predict_warm.overlaps(100.005, 1.0, spans)
    assert not predict_warm.overlaps(99.98, 10.0, spans)  # answered before it began
    assert not predict_warm.overlaps(100.02, 5.0, spans)  # sent after it ended


def test_the_live_summary_keeps_the_gateways_sent_and_failed_prefetch_actions() -> None:
    """Hold C's question (fewer prefetches; never sent, or sent and lost?) needs the gateway's
    ``gpufaas_prefetch_actions_total{kind,result}`` in the summary beside the nodes' outcomes."""
    from predict_live import summarise

    delta = {
        "gpufaas_prefetch_actions_total{kind=prefetch,result=sent}": 7.0,
        "gpufaas_prefetch_actions_total{kind=prefetch,result=failed}": 2.0,
        "gpufaas_manager_prefetch_total{result=busy}": 3.0,
    }
    results = [{"status": 200, "latency_ms": 1.0, "hit": True}]
    row = summarise(results, [1.0], 0, delta, time_scale=1.0, size_scale=1.0)
    assert row["gateway_actions"] == {
        "kind=prefetch,result=sent": 7.0,
        "kind=prefetch,result=failed": 2.0,
    }
    assert row["prefetch_outcomes"] == {"busy": 3.0}
