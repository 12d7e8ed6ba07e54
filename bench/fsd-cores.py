"""Do this machine's two cores give two cores' worth of a shard's products? The N = 2 ceiling.

The throughput goal of #15 assumes that N = 2 shards on 2 cores can do about twice the
arithmetic of one. This runs a shard's products (the executor's own code, one torch thread,
batch 64, the 4,096 x 24 RadiX-Net; ``bench/fsd.py: concurrent_products``) in one process
alone, then in two processes at once, for ``--seconds`` each, in rounds of alternating
order, and reports passes per second:

* ``--split 1`` (session 6): the unsplit net's pass (what N = 1's shard does per request),
  one process against two copies;
* ``--split 2`` (session 9): the N = 2 hypergraph split's shards, shard 0 alone against
  shards 0 and 1 at once, i.e. the 16 x 16 block products at the N = 2 shard's shapes;
  and, in the same rounds, the unsplit pass alone, so that the ceiling of N = 2's products
  against N = 1's reads directly: (request pairs per second with two processes) / (unsplit
  passes per second alone).

If two at once give much less than 2x one, the cores share something (memory bandwidth, a
cache) and no split can reach 2x. ``--kernels tiles,csr`` runs each with the dense-tile
products (session 9) and with CSR (main 8c6855b's), alternating, in the same hold.

    python bench/fsd-cores.py --split 2 --seconds 3 --rounds 2 --kernels tiles,csr
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import fsd  # bench/fsd.py


def run(split: int, shards: list[int], kernel: str, seconds: float) -> dict[str, Any]:
    method = "block" if split == 1 else "hypergraph"
    result = fsd.concurrent_products(
        (4096, 24, split, method, 0), shards, seconds=seconds, kernel=kernel
    )
    return {
        "split": split,
        "processes": len(shards),
        "kernel": kernel,
        "passes_per_s": sum(result["passes"]) / seconds,
        # a request needs one pass of every shard of its split: the slowest shard's rate
        "requests_per_s": min(result["passes"]) / seconds * (len(shards) // split)
        if len(shards) >= split
        else None,
        "cpu_per_pass_ms": [c * 1e3 for c in result["cpu_per_pass_s"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", type=int, default=1, choices=(1, 2))
    parser.add_argument("--kernels", default="tiles")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    cases = [(kernel, shards) for kernel in kernels
             for shards in ([0], [0, 0] if args.split == 1 else [0, 1])]  # fmt: skip
    if args.split == 2:
        cases += [(kernel, "unsplit") for kernel in kernels]  # type: ignore[misc]
    rows = []
    for index in range(args.rounds):
        for kernel, shards in cases if index % 2 == 0 else cases[::-1]:
            if shards == "unsplit":
                row = run(1, [0], kernel, args.seconds)
            else:
                row = run(args.split, list(shards), kernel, args.seconds)
            rows.append({"round": index, **row})
            print(f"round {index}: split {row['split']} {kernel}, {row['processes']} process(es): "
                  f"{row['passes_per_s']:.1f} passes/s, requests/s {row['requests_per_s']}, "
                  f"CPU per pass {[round(c, 2) for c in row['cpu_per_pass_ms']]} ms", flush=True)  # fmt: skip

    def rate(kernel: str, split: int, processes: int, key: str = "passes_per_s") -> float:
        return statistics.mean(r[key] for r in rows if r["kernel"] == kernel
                               and r["split"] == split and r["processes"] == processes)  # fmt: skip

    for kernel in kernels:
        one, two = rate(kernel, args.split, 1), rate(kernel, args.split, 2)
        print(f"{kernel}: two at once / one alone: {two / one:.2f}x ({one:.1f} -> {two:.1f} "
              f"passes/s)")  # fmt: skip
        if args.split == 2:
            unsplit = rate(kernel, 1, 1)
            pairs = rate(kernel, 2, 2, "requests_per_s")
            print(f"{kernel}: N = 2's products with two processes / N = 1's alone: "
                  f"{pairs / unsplit:.2f}x ({unsplit:.1f} -> {pairs:.1f} requests/s)")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
