"""Kill a GPU manager during a load run and count the answers.

Starts ``gpufaas up --nodes 2`` on loopback, sends a bounded open-loop stream
of tiny-mlp and MiniLM requests, SIGKILLs one GPU-manager process part-way
through, and prints how many requests were sent, answered (by status), lost,
or answered twice. Every request carries a unique id that its answer must
echo.

    python bench/kill_run.py --requests 400 --rate 40 --kill-at 0.4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from gpufaas.core.examples import build_examples, example_inputs
from gpufaas.core.protocol import decode_response, encode_request, parse_header_length
from gpufaas.scheduler.local import die_with_parent, free_port


def _manager_pids(up_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(up_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def _run(
    url: str, *, requests: int, rate: float, kill_at: float, up_pid: int
) -> dict[str, object]:
    names = ["tiny-mlp", "minilm"]
    bodies = []
    for i in range(requests):
        name = names[i % 2]
        inputs = example_inputs(name, batch=1, seed=i)
        dtypes = {k: "INT64" if v.dtype == np.int64 else "FP32" for k, v in inputs.items()}
        body, headers = encode_request(
            {k: (v, dtypes[k]) for k, v in inputs.items()}, request_id=f"req-{i}"
        )
        bodies.append((name, f"req-{i}", body, headers))
    answers: list[tuple[str, int, str | None]] = []
    killed: list[int] = []

    async def one(
        client: httpx.AsyncClient, name: str, rid: str, body: bytes, headers: dict[str, str]
    ) -> None:
        response = await client.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)
        echoed = None
        if response.status_code == 200:
            document, _ = decode_response(
                response.content,
                header_length=parse_header_length(
                    response.headers.get("inference-header-content-length")
                ),
            )
            echoed = document.id
        answers.append((rid, response.status_code, echoed))

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = []
        for index, (name, rid, body, headers) in enumerate(bodies):
            if not killed and index >= kill_at * requests:
                pids = _manager_pids(up_pid)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            tasks.append(asyncio.create_task(one(client, name, rid, body, headers)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    per_id = Counter(rid for rid, _, _ in answers)
    statuses = Counter(code for _, code, _ in answers)
    return {
        "sent": requests,
        "answered": len(answers),
        "lost": requests - len(per_id),
        "answered_twice": sum(1 for c in per_id.values() if c > 1),
        "wrong_id": sum(1 for rid, code, echoed in answers if code == 200 and echoed != rid),
        "statuses": dict(sorted(statuses.items())),
        "killed_manager_pid": killed[0] if killed else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of the run")
    args = parser.parse_args()
    home = Path(os.environ.get("GPUFAAS_HOME", "/tmp/gpufaas-kill-run"))
    env = {**os.environ, "GPUFAAS_HOME": str(home)}
    build_examples(home / "models", progress=False)
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "gpufaas.core.cli", "up", "--port", str(port), "--nodes", "2",
         "--cpu-devices", "1", "--sync-interval", "1", "--grpc-port", str(free_port())],
        env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or up.poll() is not None:
                print("gpufaas up did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        result = asyncio.run(
            _run(url, requests=args.requests, rate=args.rate, kill_at=args.kill_at, up_pid=up.pid)
        )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
    print(json.dumps(result, indent=2))
    return (
        0
        if result["lost"] == 0 and result["answered_twice"] == 0 and result["wrong_id"] == 0
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
