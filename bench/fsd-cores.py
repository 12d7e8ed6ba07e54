"""Do this machine's two cores give two cores' worth of a shard's products?

The throughput goal of #15 assumes that N = 2 shards on 2 cores can do about twice the
arithmetic of one. This runs the unsplit grid net's compute pass (RadiX-Net 4,096 x 24,
batch 64, the executor's own code, one torch thread: what N = 1's shard does per request)
in one process alone, then in two processes at once, each for ``--seconds``, alternating,
and reports passes per second in all and the thread CPU per pass. If two at once give
much less than 2x one, the cores share something (a physical core's two hyperthreads, a
cache, memory bandwidth) and no split can reach 2x.

    python bench/fsd-cores.py --seconds 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def _work(seconds: float, ready: Any, go: Any, out: Any) -> None:
    import fsd  # bench/fsd.py

    from gpufaas.core.layered import radix_net
    from gpufaas.scheduler.partition import partition, split

    net = radix_net(4096, 24)
    one = fsd.ShardPass(split(net, partition(net, 1, method="block"))[0], 64)
    ready.release()
    go.wait()
    cpu, count = [], 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        cpu.append(one.seconds())
        count += 1
    out.put({"passes": count, "cpu_per_pass_s": statistics.median(cpu)})
    one.close()


def run(processes: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_work, args=(seconds, ready, go, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return {
        "processes": processes,
        "passes_per_s": sum(r["passes"] for r in results) / seconds,
        "cpu_per_pass_ms": [r["cpu_per_pass_s"] * 1e3 for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for index in range(args.rounds):
        for processes in (1, 2) if index % 2 == 0 else (2, 1):
            row = {"round": index, **run(processes, args.seconds)}
            rows.append(row)
            print(f"round {index}: {processes} process(es): {row['passes_per_s']:.1f} passes/s, "
                  f"CPU per pass {[round(c, 1) for c in row['cpu_per_pass_ms']]} ms", flush=True)  # fmt: skip
    for processes in (1, 2):
        rates = [r["passes_per_s"] for r in rows if r["processes"] == processes]
        print(f"{processes}: {statistics.mean(rates):.1f} passes/s (rounds {rates})")
    one = statistics.mean(r["passes_per_s"] for r in rows if r["processes"] == 1)
    two = statistics.mean(r["passes_per_s"] for r in rows if r["processes"] == 2)
    print(f"two at once / one alone: {two / one:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
