"""Smoke test of the peer benchmark's systems: each app starts, answers a few requests of every
phase without a failure, and stops (``bench/peers/run.py --smoke``: a few requests per phase).

gpufaas always runs. Ray Serve and PyTriton are bench-only dependencies (heavy; not in the CI
install): each is skipped, with the reason, where its package is not installed. Every system
runs in a private network namespace (``unshare -n``), as the benchmark runs them; without one
the test is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "peers" / "run.py"
PACKAGES = {"gpufaas": None, "ray": "ray.serve", "triton": "pytriton"}

pytestmark = pytest.mark.slow


def _netns_ok() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _skip_unless_runnable(system: str) -> None:
    module = PACKAGES[system]
    if not _installed(module):
        pytest.skip(f"{module} is not installed (a bench-only dependency of bench/peers)")
    if importlib.util.find_spec("psutil") is None:
        pytest.skip("psutil is not installed (bench/peers measures memory with it)")
    if not _netns_ok():
        pytest.skip("no private network namespace here (unshare -n); the peers need one")


def _smoke(system: str, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``run.py --smoke`` for one system on tiny-mlp; (its raw entry, its figures)."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--json", "--systems", system, *extra,
         "--families", "tiny-mlp", "--out", str(out), "--models-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "peers-results.json").read_text())
    entry: dict[str, Any] = report["systems"][system]["families"]["tiny-mlp"]
    assert "error" not in entry, entry.get("error", "") + entry.get("log_tail", "")
    assert entry["verified"] is True, "the outputs did not match the model's"
    figures: dict[str, Any] = report["families"]["tiny-mlp"]["figures"][system]
    return entry, figures


@pytest.mark.parametrize("system", sorted(PACKAGES))
def test_each_system_starts_and_answers(system: str, tmp_path: Path) -> None:
    _skip_unless_runnable(system)
    _, figures = _smoke(system, tmp_path)
    assert figures["warm_p50_ms"] > 0, figures
    assert figures["zipf_errors"] == 0, figures


@pytest.mark.parametrize("system", sorted(PACKAGES))
def test_each_system_serves_the_goal_phases_with_its_dynamic_batching(
    system: str, tmp_path: Path
) -> None:
    """``--goals``: a copy with batching off and one with the system's own dynamic batching,
    both answering with the model's outputs, none failing."""
    _skip_unless_runnable(system)
    entry, figures = _smoke(system, tmp_path, "--goals")
    for phase in ("warm", "loaded", "batched"):
        assert entry[phase]["errors"] == 0, (phase, entry[phase])
        assert entry[phase]["count"] > 0, (phase, entry[phase])
    assert figures["batched_throughput_rps"] > 0, figures
