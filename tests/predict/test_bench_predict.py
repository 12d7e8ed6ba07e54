"""A small run of ``bench/predict.py`` (rare functions only, 20 simulated minutes): it runs the
real policies end to end and reports every metric the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_a_small_comparison_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    plot = tmp_path / "p.png"
    command = [sys.executable, str(BENCH / "predict.py"), "--scale", "0", "--tail", "30"]
    command += ["--minutes", "20", "--seeds", "1", "--workers", "1", "--devices", "2"]
    command += ["--only", "lru+ka-10min,hybrid,ours-p0.01", "--json", str(out), "--plot", str(plot)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["label"] for r in report["runs"]} == {"lru+ka-10min", "hybrid", "ours-p0.01"}
    for run in report["runs"]:
        assert 0.0 <= run["cold_start_ratio"] <= 1.0
        assert set(run["cold_by_tier"]) == {"host", "artifact", "prefetch"}
        assert run["device_gb_s"] > 0 and run["host_gb_s"] >= 0
        assert run["p99_ms"] >= run["p50_ms"] > 0
    ours = next(r for r in report["runs"] if r["label"] == "ours-p0.01")
    assert ours["prefetches"] > 0 and ours["prefetch_precision"] is not None
    assert plot.stat().st_size > 10_000
    assert "| setting | cold-start ratio |" in done.stdout


def test_a_malformed_trace_fails_with_the_line_named(tmp_path: Path) -> None:
    trace = tmp_path / "orc-s0.05-m60-seed1.csv"
    trace.write_text(
        "Logical Time Clock (minutes), Function ID, Runtime (ms), Model0.1, a, 1, m\n"
        "0.2, b, oops, m\n"
    )
    command = [sys.executable, str(BENCH / "predict.py"), "--trace-dir", str(tmp_path)]
    command += ["--seeds", "1", "--workers", "1", "--only", "lru+ka-10min"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert f"{trace}:2: minutes and runtime must be numbers" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_seed_interval_uses_students_t_for_its_own_number_of_seeds() -> None:
    """Six seeds have 5 degrees of freedom (t = 2.571); the table before gave every n >= 6 the
    quantile of 9 (2.26), intervals 12% too narrow."""
    sys.path.insert(0, str(BENCH))
    from predict import _interval

    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    mean, half = _interval(values)
    assert mean == 3.5
    assert abs(half - 2.571 * 1.8708287 / 6**0.5) < 1e-3
    assert abs(_interval(values[:3])[1] - 4.303 * 1.0 / 3**0.5) < 1e-3
