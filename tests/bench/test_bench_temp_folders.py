"""The data-plane benches remove every folder they make (``TMPDIR`` is left as it was found).

Each run used to leave ``tempfile.mkdtemp`` folders behind: the example models, a system's home,
a Unix socket's folder (100 folders of ~88 MB each were found in ``/tmp`` one day). Each case runs
a short mode of one bench with ``TMPDIR`` pointed at an empty folder, and checks it is empty
afterwards. ``bench/dataplane.py``'s modes build every example model first (minutes on CI), so
its folders are covered by its ``--front`` mode only where ``GPUFAAS_MODELS`` names built models.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

RUNS = {
    # the echo servers' Unix socket folder
    "transport": [str(BENCH / "transport.py"), "--requests", "20"],
    # the fronts' manifests folder
    "grpc_echo-fronts": [str(BENCH / "grpc_echo.py"), "--fronts", "--calls", "5", "--rounds", "1"],
}


def _run(argv: list[str], tmp: Path, **env: str) -> None:
    environment = {**os.environ, "TMPDIR": str(tmp), **env}
    done = subprocess.run(
        [sys.executable, *argv], env=environment, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_bench_run_leaves_no_temp_folder(name: str, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    _run(RUNS[name], tmp)
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_the_dataplane_bench_leaves_no_temp_folder(tmp_path: Path) -> None:
    models = os.environ.get("GPUFAAS_MODELS")
    if not models or not (Path(models) / "tiny-mlp.pt").exists():
        pytest.skip(
            "GPUFAAS_MODELS does not name built example models (building them takes minutes)"
        )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    argv = [str(BENCH / "dataplane.py"), "--front", "protocol", "--requests", "20", "--warmup", "5"]
    _run(argv, tmp, GPUFAAS_MODELS=models)
    assert sorted(p.name for p in tmp.iterdir()) == []
