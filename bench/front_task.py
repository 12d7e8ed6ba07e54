"""What the HTTP front's task costs a request that waits once, as a two-process request does.

In two processes the gateway's HTTP front runs each inference in a task with a done callback
(``scheduler/front.py``); in one process it starts it eagerly (``core/eager.py``) and makes no
task when the request never waits. A request over the framed lane always waits once (for the
node's answer), so the question is what the task costs such a request. This tight loop (uvloop,
one process, ``time.process_time``) runs ``--requests`` requests, each a coroutine that does a
little work, then waits on a future that a later loop iteration answers, started three ways:

* ``task``: ``loop.create_task`` plus a done callback (the two-process front today);
* ``eager``: ``start_eagerly`` (the one-process front), a task made at its first suspension;
* ``bare``: stepped by hand and woken by the future's callback, no task, no context, no
  cancellation: not a usable front, only the floor under what removing the task could save.

    python bench/front_task.py --requests 20000 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from typing import Any

import uvloop

from gpufaas.core.eager import start_eagerly

MODES = ("task", "eager", "bare")


async def _request(answer: asyncio.Future[int]) -> None:
    total = 0
    for i in range(20):  # a little work before the call, as the gateway's path does
        total += i
    await answer


def _start(mode: str, coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
    if mode == "bare":
        first = coro.send(None)

        def wake(_: object) -> None:
            try:  # noqa: SIM105 (a floor: no context manager's cost in it)
                coro.send(None)
            except StopIteration:
                pass

        first.add_done_callback(wake)
        return
    task = asyncio.get_running_loop().create_task(coro) if mode == "task" else start_eagerly(coro)
    if task is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def per_request_us(mode: str, requests: int) -> float:
    """CPU µs per request started ``mode``, each answered in a later loop iteration."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    left = requests

    def one() -> None:
        nonlocal left
        answer = loop.create_future()
        _start(mode, _request(answer), tasks)
        loop.call_soon(answer.set_result, 1)  # the node's answer, read in a later iteration
        left -= 1
        loop.call_soon(one if left else lambda: done.set_result(None))

    started = time.process_time()
    loop.call_soon(one)
    await done
    await asyncio.sleep(0)
    return (time.process_time() - started) / requests * 1e6


async def run(requests: int, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_index in range(rounds):
        for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
            out[mode].append(round(await per_request_us(mode, requests), 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.requests, args.rounds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
