"""What the placement owner's second pass over a forwarded request costs in CPU (#16, exploratory).

    python bench/scaleout_second_pass.py --calls 5000 --rounds 5

A forwarded miss goes through the gateway's inference path twice: once at the replica the client
sent it to, once at the owner, which answers a lane call with that same path
(``scheduler/replica_setup.py: lane_answer``). Of the owner's path, only the request's inspection
repeats work the sender already did: ``inspect_request`` (the JSON header parsed and checked),
``check_signature`` and ``request_deadline``. The admission as forwarded, the policy's decision
and the dispatch are the owner's own and must stay.

In one process, on the live benchmark's own tiny-mlp body (``bench/sim/live.py``, JSON as
``bench/lalb.py --mode live`` sends it), this times per call, in alternating blocks:

- ``inspection``: the three steps a skip would remove;
- ``owner path``: the owner's whole answer to a lane call (``lane_answer``) up to the routing
  decision, with no device registered, so it ends at the decision (503) without a device's or a
  manager's time: admission, inspection, the policy, the error answer and its metrics.

It reports CPU time per call (the thread's, so other processes on the box count only through
caches) and wall time, mean over blocks with the blocks' spread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _owner() -> tuple[
    Callable[[], Awaitable[int]], Callable[[], None], Callable[[], Awaitable[None]]
]:
    """The owner's lane answer and the inspection alone, each as one call on the bench's body,
    and the owner's close."""
    from sim.live import _request_bodies

    from gpufaas.core.manifests import bundled_functions_dir, load_manifests
    from gpufaas.core.protocol import check_signature, inspect_request
    from gpufaas.scheduler.forward_lane import ForwardHead
    from gpufaas.scheduler.gateway import request_deadline
    from gpufaas.scheduler.main import build_gateway
    from gpufaas.scheduler.peers import static_peers
    from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer

    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"], variables={"GPUFAAS_MODELS": "/nonexistent"}
    )
    gateway = build_gateway(manager_urls={}, functions=functions, policy="lalb")
    me, peer = "http://127.0.0.1:9", "http://127.0.0.1:10"
    replicas = attach_replicas(gateway, self_url=me, discover=static_peers([me, peer]), token=None)
    answer = lane_answer(gateway)
    body = _request_bodies()["tiny-mlp"]
    inputs = functions[0].spec.inputs
    limits = gateway.config.limits

    async def owner_path() -> int:
        status, _, _ = await answer(ForwardHead("tiny-mlp", uuid.uuid4().hex, peer, None), body)
        return status

    def inspection() -> None:
        header = inspect_request(body, header_length=None, limits=limits)
        check_signature(header.signature(), inputs)
        request_deadline(None, header.parameters)

    async def close() -> None:
        await replicas.calls.close()
        await replicas.membership.close()
        await gateway.stop()

    return owner_path, inspection, close


async def _measure(calls: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    owner_path, inspection, close = _owner()
    try:
        return await _blocks(owner_path, inspection, calls=calls, rounds=rounds)
    finally:
        await close()


async def _blocks(
    owner_path: Callable[[], Awaitable[int]],
    inspection: Callable[[], None],
    *,
    calls: int,
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {
        name: {"cpu_us": [], "wall_us": []} for name in ("inspection", "owner path")
    }
    for _ in range(calls // 10):  # warm
        inspection()
        assert await owner_path() == 503
    for _ in range(rounds):
        for name in out:
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(calls):
                if name == "inspection":
                    inspection()
                else:
                    await owner_path()
            out[name]["cpu_us"].append((time.thread_time() - cpu) / calls * 1e6)
            out[name]["wall_us"].append((time.perf_counter() - wall) / calls * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks of each, alternating")
    args = parser.parse_args(argv)
    if args.calls < 10 or args.rounds < 2:
        parser.error("--calls must be at least 10 and --rounds at least 2")
    import logging

    logging.disable(logging.WARNING)  # the owner logs each undeliverable request
    try:
        out = asyncio.run(_measure(args.calls, args.rounds))
    finally:
        logging.disable(logging.NOTSET)
    for name, figures in out.items():
        cpu, wall = figures["cpu_us"], figures["wall_us"]
        print(
            f"{name}: CPU {statistics.fmean(cpu):.1f} us/call (blocks {min(cpu):.1f}-"
            f"{max(cpu):.1f}), wall {statistics.fmean(wall):.1f} us/call, "
            f"{args.rounds} blocks of {args.calls}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
