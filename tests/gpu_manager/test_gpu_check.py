"""``make gpu-check`` in its reduced CPU mode (what CI can run), and its import shim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_the_cpu_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "lines.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line["check"]: line for line in json.loads(out.read_text())["lines"]}
    assert lines["mode"]["status"] == "SKIP"
    assert lines["H2D loader / raw pinned"]["status"] == "SKIP"
    for check in (
        "gate check, TorchScript MLP, gated",
        "gate check, TorchScript MLP, ungated control",
        "request tiny-mlp vs CPU torch",
        "request small-cnn vs CPU torch",
        "bad token id -> 400 naming the input",
        "health + good request after the bad id",
    ):
        assert lines[check]["status"] == "PASS", lines[check]


def test_the_import_shim_maps_the_checkouts_folders_without_an_install() -> None:
    code = (
        "import sys\n"
        "sys.path = [p for p in sys.path if '__editable__' not in p]\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path.insert(0, 'bench')\n"
        "from gpu_check import import_shim\n"
        "import gpufaas.gpu_manager.devices as d\n"
        "print(d.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / "gpu_manager" / "devices.py"
