"""``gpufaas up`` killed outright (SIGKILL: no clean-up code runs) leaves no GPU manager behind.

The managers ask the kernel for SIGTERM when their parent dies (``PR_SET_PDEATHSIG``,
``scheduler/local.py::die_with_parent``); this test kills the parent and watches the children go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gpufaas.scheduler.local import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.extend(int(p) for p in text.split())
    return found


def _is_manager(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    # `python -m gpufaas.gpu_manager ...` (or the older `... cli gpu-manager ...`)
    return any(arg in (b"gpufaas.gpu_manager", b"gpu-manager") for arg in argv)


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, not yet reaped) or a missing process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_killing_gpufaas_up_leaves_no_manager_running(
    tmp_path: Path, example_models_dir: Path
) -> None:
    env = {
        **os.environ,
        "GPUFAAS_HOME": str(tmp_path / "home"),
        "GPUFAAS_MODELS": str(example_models_dir),
    }
    port = free_port()
    # Its own session: the SIGKILL below must reach the parent alone, not a process group.
    up = subprocess.Popen(
        [sys.executable, "-m", "gpufaas.core.cli", "up", "--port", str(port),
         "--nodes", "2", "--cpu-devices", "1", "--grpc-port", str(free_port())],
        env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    managers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert up.poll() is None, f"gpufaas up exited early with {up.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gpufaas up was not ready within 120 s"
            time.sleep(0.2)
        managers = [pid for pid in _children(up.pid) if _is_manager(pid)]
        assert len(managers) == 2, f"expected 2 GPU-manager processes, found {managers}"
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in managers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in managers if _alive(pid)]
        assert not left, f"GPU managers {left} outlived the killed gpufaas up"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=10)
        for pid in managers:  # never leave a stray server behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
