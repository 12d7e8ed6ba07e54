"""The orcbench trace loader (``bench/sim/trace.py``): the glued header, malformed lines named
by number, the shape statistics, model sizes and thinning with weights. ``bench/`` is not a
package: the module is loaded by path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
HEADER = "Logical Time Clock (minutes), Function ID, Runtime (ms), Model"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("sim.trace", BENCH / "sim" / "trace.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


trace = _load()


def test_the_first_record_glued_to_the_header_is_read() -> None:
    lines = [
        HEADER + "0.5, fa, 10.0, 0-model\n",
        "1.0, fb, 20.0, 2-model\n",
        "1.5, fa, 5, 0-model\n",
    ]
    t = trace.parse_orcbench(lines)
    assert t.functions == ["fa", "fb"]
    assert t.arrival_s.tolist() == [30.0, 60.0, 90.0]
    assert t.function.tolist() == [0, 1, 0]
    assert t.clusters == ["0-model", "2-model"]


def test_a_header_on_its_own_line_and_unsorted_records() -> None:
    t = trace.parse_orcbench([HEADER + "\n", "2.0, fa, 1, m\n", "\n", "1.0, fb, -3, m\n"])
    assert t.arrival_s.tolist() == [60.0, 120.0]
    assert t.function.tolist() == [1, 0]
    assert t.runtime_ms.tolist() == [0.0, 1.0]  # a negative runtime (a normal draw) is clipped


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("1.0, fa, 3\n", "t.csv:3: expected 4 comma-separated fields"),
        ("x, fa, 3, m\n", "t.csv:3: minutes and runtime must be numbers"),
        ("-1, fa, 3, m\n", "t.csv:3: time must be finite"),
        ("nan, fa, 3, m\n", "t.csv:3: time must be finite"),
        ("1.0, , 3, m\n", "t.csv:3: empty function id"),
    ],
)
def test_a_malformed_line_is_a_clear_error_naming_it(bad: str, match: str) -> None:
    lines = [HEADER + "0.5, fa, 10.0, m\n", "0.7, fb, 1, m\n", bad]
    with pytest.raises(trace.TraceError, match=match):
        trace.parse_orcbench(lines, source="t.csv")


def test_an_empty_trace_and_a_missing_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(trace.TraceError, match="no invocations"):
        trace.parse_orcbench([HEADER])
    with pytest.raises(trace.TraceError, match="cannot read trace"):
        trace.read_orcbench(tmp_path / "absent.csv")


def test_a_real_orcbench_trace_parses_and_has_the_skew_it_should(tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    command = [sys.executable, "-m", "orcbench", "trace", "--N", "10", "--scale", "0.01"]
    command += ["--runtime", "5", "--seed", "3", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert not out.read_text().startswith(HEADER + "\n")  # the glued header, as documented
    t = trace.read_orcbench(out)
    s = trace.shape(t)
    assert s["functions"] == len(t.functions) > 10
    assert s["top_18.6pct_share"] > 0.5  # a few functions make most invocations
    assert s["cv_p50"] > 1.0  # bursty inter-arrivals


def test_model_sizes_follow_the_documented_mix() -> None:
    costs = trace.assign_models(4000, seed=1)
    sizes = np.asarray([c.size_bytes for c in costs])
    assert sizes.min() >= 20e6 and sizes.max() <= 16e9
    assert 0.45 < np.mean(sizes < 500e6) < 0.55
    assert 0.10 < np.mean(sizes >= 4e9) < 0.20
    c = trace.costs_for(int(2.5e9))
    assert c.artifact_to_device_ms > c.host_to_device_ms > c.infer_ms > 0
    assert trace.assign_models(10, seed=1) == trace.assign_models(10, seed=1)


def test_thinning_keeps_every_function_and_the_weights_restore_the_counts() -> None:
    rng = np.random.default_rng(0)
    hot = np.sort(rng.uniform(0, 3600, 50_000))
    cold = np.sort(rng.uniform(0, 3600, 30))
    arrival = np.concatenate([hot, cold])
    function = np.concatenate([np.zeros(len(hot), int), np.ones(len(cold), int)])
    order = np.argsort(arrival)
    t = trace.ServerlessTrace(
        ["hot", "cold"], ["m", "m"], arrival[order], function[order], np.zeros(len(arrival))
    )
    kept, weights = trace.thin(t, max_per_hour=1000)
    counts = np.bincount(kept.function, minlength=2)
    assert counts[1] == 30 and 900 <= counts[0] <= 1100
    assert np.bincount(kept.function, weights=weights, minlength=2)[0] == pytest.approx(
        len(hot), rel=0.05
    )
    assert set(weights[kept.function == 1]) == {1.0}
