"""Smoke test of ``bench/loading.py`` at a tiny size: every path is measured and reported.

The benchmark is loaded by path (``bench/`` is not a package); no figure is asserted, only
that each one is there and positive, and that the report renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench" / "loading.py"


def _load() -> ModuleType:
    return load_bench(BENCH, name="gpufaas_bench_loading")


def test_the_loading_benchmark_measures_every_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPUFAAS_MODELS", raising=False)
    bench = _load()
    out = tmp_path / "loading.json"
    assert bench.main(["--sizes", "4Mi", "--repeats", "1", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    (paths,) = report["paths"].values()
    for key in (
        "remote_to_disk",
        "sidecar_to_host_warm",
        "sidecar_to_host_fresh",
        "host_to_device_warm",
        "host_to_device_fresh",
        "device_to_device_warm",
        "device_to_device_fresh",
    ):
        assert paths[key]["gbps"] > 0 and paths[key]["limit_gbps"] > 0, key
    first = report["first_inference"]
    assert first["overlap_latency_ms"] > 0 and first["sequential_latency_ms"] > 0
    assert first["load_ms"] > 0 and first["compute_ms"] > 0
    (memory,) = report["memory"].values()
    assert memory["device_bytes"] == paths["arena_bytes"]
    disk = report["disk_tier"]
    assert disk["file_bytes"] > disk["arena_bytes"]  # the arena plus the safetensors header
    for mode in ("cold", "warm"):
        assert disk[mode]["refill_gbps"] > 0 and disk[mode]["raw_read_gbps"] > 0, mode
    assert memory["entry_overhead"] >= 0
    out = capsys.readouterr().out
    assert "| overlap |" in out and "| cold |" in out


def test_the_benchmark_rejects_bad_arguments(tmp_path: Path) -> None:
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "lots", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
