"""Kill a GPU manager during a load run; count the answers and every node's executions.

Starts ``gpufaas up --nodes 2`` on loopback, sends a bounded open-loop stream of tiny-mlp and
MiniLM requests, each with a unique id, and SIGKILLs one GPU-manager process part-way through.
Then it checks exactly-once from both ends:

- **answered exactly once** (the client's view): every id got one answer, which echoes its own
  id; a request that ends in a transport error (no answer) counts as lost, it does not stop
  the run;
- **ran at most once** (the nodes' view): each GPU manager counts the forward passes it ran per
  request id (``GET /v2/gpufaas/executions``). The victim's counts are read just before the
  kill, the survivors' at the end; an id counted more than once in total ran twice.

What it cannot see: a forward the victim finished in the moments between that last read and
the kill (``unobserved_window_ms``: from the read's answer to the kill, plus the answer's own
trip); such a request, if its answer was lost with the process, is retried elsewhere and would
have run twice unseen.

    python bench/kill_run.py --requests 400 --rate 40 --kill-at 0.4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from gpufaas.core import node
from gpufaas.core.examples import build_examples, example_inputs
from gpufaas.core.protocol import decode_response, encode_request, parse_header_length
from gpufaas.scheduler.local import die_with_parent, free_port, stop_processes, wait_ready

EXECUTIONS_PATH = node.EXECUTIONS


@dataclass(frozen=True)
class Answer:
    request_id: str
    status: int | None  # None: a transport error, no answer
    echoed_id: str | None


def _manager_pids(up_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(up_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _manager_url(pid: int) -> str:
    """A GPU manager's URL, from its command line (``--port N``)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    port = argv[argv.index(b"--port") + 1].decode()
    return f"http://127.0.0.1:{port}"


async def executions(client: httpx.AsyncClient, url: str, token: str) -> Counter[str]:
    response = await client.get(
        f"{url}{EXECUTIONS_PATH}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    return Counter(response.json()["executions"])


async def send_one(
    client: httpx.AsyncClient, url: str, name: str, rid: str, body: bytes, headers: dict[str, str]
) -> Answer:
    """One request; a transport error is an answer that never came (``status`` None)."""
    try:
        response = await client.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)
    except httpx.HTTPError:
        return Answer(rid, None, None)
    echoed = None
    if response.status_code == 200:
        document, _ = decode_response(
            response.content,
            header_length=parse_header_length(
                response.headers.get("inference-header-content-length")
            ),
        )
        echoed = document.id
    return Answer(rid, response.status_code, echoed)


def _bodies(requests: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
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
    return bodies


async def _run(
    url: str, *, requests: int, rate: float, kill_at: float, up_pid: int, token: str
) -> dict[str, Any]:
    bodies = _bodies(requests)
    ran: Counter[str] = Counter()
    victim: int | None = None
    window_ms = None
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = []
        for index, (name, rid, body, headers) in enumerate(bodies):
            if victim is None and index >= kill_at * requests:
                pids = _manager_pids(up_pid)
                if pids:
                    victim = pids[0]
                    ran.update(await executions(client, _manager_url(victim), token))
                    read = time.perf_counter()  # the counts are at most this old, plus a hop
                    os.kill(victim, signal.SIGKILL)
                    window_ms = 1000 * (time.perf_counter() - read)
            tasks.append(asyncio.create_task(send_one(client, url, name, rid, body, headers)))
            await asyncio.sleep(1 / rate)
        answers: list[Answer] = list(await asyncio.gather(*tasks))
        survivors = [p for p in _manager_pids(up_pid) if p != victim]
        for pid in survivors:
            ran.update(await executions(client, _manager_url(pid), token))
    return summarise(answers, ran, sent=[rid for _, rid, _, _ in bodies]) | {
        "killed_manager_pid": victim,
        "unobserved_window_ms": window_ms,
        "survivors": len(survivors),
    }


def summarise(answers: list[Answer], ran: Counter[str], *, sent: list[str]) -> dict[str, Any]:
    """The exactly-once counts: answers per id (client side) and executions per id (nodes)."""
    answered = Counter(a.request_id for a in answers if a.status is not None)
    statuses = Counter(
        str(a.status) if a.status is not None else "transport error" for a in answers
    )
    ok = [a for a in answers if a.status == 200]
    return {
        "sent": len(sent),
        "answered": sum(answered.values()),
        "statuses": dict(sorted(statuses.items())),
        "lost": sum(1 for rid in sent if answered[rid] == 0),
        "answered_twice": sum(1 for c in answered.values() if c > 1),
        "wrong_id": sum(1 for a in ok if a.echoed_id != a.request_id),
        "ran_twice": sum(1 for rid in sent if ran[rid] > 1),
        "answered_200_without_observed_run": sum(1 for a in ok if ran[a.request_id] == 0),
        "executions_observed": sum(ran[rid] for rid in sent),
    }


def exactly_once(result: dict[str, Any]) -> bool:
    return bool(
        result["lost"] == 0
        and result["answered_twice"] == 0
        and result["wrong_id"] == 0
        and result["ran_twice"] == 0
    )


def _start_up(env: dict[str, str], *, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``gpufaas up`` on free ports, ready; started again once on other ports when it exits
    with 2 (a port it was given was taken before it could bind: another process's race)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        port = free_port()
        with log.open("wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "gpufaas.core.cli", "up", "--port", str(port),
                 "--nodes", "2", "--cpu-devices", "1", "--sync-interval", "1",
                 "--grpc-port", str(free_port())],
                env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready([url], timeout_s=180, procs=[up], what="gateway")
            return up, url
        except RuntimeError as e:
            stop_processes([up])
            said = log.read_text(errors="replace")[-2000:]
            if attempt == 1 and up.returncode == 2:
                continue
            raise RuntimeError(f"{e}; it said: {said}") from None
    raise AssertionError("the loop returns or raises")


def run_kill(
    *, requests: int, rate: float, kill_at: float, home: Path, models: Path | None = None
) -> dict[str, Any]:
    """Start ``gpufaas up``, run the stream with one kill, stop it; the result's counts."""
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "GPUFAAS_HOME": str(home), "GPUFAAS_MANAGER_TOKEN": token}
    if models is None:
        models = home / "models"
        build_examples(models, progress=False)
    env["GPUFAAS_MODELS"] = str(models)
    up, url = _start_up(env, log=home / "up.log")
    try:
        return asyncio.run(
            _run(
                url,
                requests=requests,
                rate=rate,
                kill_at=kill_at,
                up_pid=up.pid,
                token=token,
            )
        )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of the run")
    args = parser.parse_args()
    home = Path(os.environ.get("GPUFAAS_HOME", "/tmp/gpufaas-kill-run"))
    try:
        result = run_kill(requests=args.requests, rate=args.rate, kill_at=args.kill_at, home=home)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if exactly_once(result) else 1


if __name__ == "__main__":
    sys.exit(main())
