"""Start ``gpufaas up`` as a user would, for end-to-end tests (imported by bare name)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

import httpx

from gpufaas.scheduler.local import die_with_parent, free_port


@contextlib.contextmanager
def running_up(args: Sequence[str], *, env: Mapping[str, str]) -> Iterator[str]:
    """``gpufaas up ARGS`` on a free port until ready; yields its URL, then stops it with
    Ctrl-C (SIGINT) and asserts it exits cleanly within 30 s. gRPC goes on a free port too,
    unless ARGS name one."""
    port = free_port()
    grpc = [] if "--grpc-port" in args else ["--grpc-port", str(free_port())]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufaas.core.cli", "up", "--port", str(port), *grpc, *args],
        env=dict(env),
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"gpufaas up exited early with {proc.returncode}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gpufaas up was not ready within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("gpufaas up did not stop within 30 s of Ctrl-C") from None
    assert code in (0, 130, -signal.SIGINT), f"unclean exit code {code}"
