"""The sixteenth session's reproduction of the N = 4 random anomaly (bench/RESULTS.md, #15, "fsd,
sixteenth session" (a)): one RadiX-Net 1,024 x LAYERS split SHARDS ways by METHOD on real GPU
managers (the direct channel, shared passes), five requests one at a time with the managers'
CPU for each, then four at once.

    bench/quiet.sh test .venv/bin/python bench/fsd-anomaly.py 120 4 random

Before 942a57a one request took 7-16 s and 2-3.5 s of the managers' CPU, four at once 0.35 s.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.core.sharding import ChannelConfig, Parallelism
from gpufaas.scheduler.coordinator import Coordinator

_spec = importlib.util.spec_from_file_location("fsd_bench", Path(__file__).with_name("fsd.py"))
assert _spec is not None and _spec.loader is not None
fsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsd)


async def main(layers: int, shards: int, method: str, *, batch: int, requests: int) -> None:
    net = radix_net(1024, layers)
    with tempfile.TemporaryDirectory(prefix="fsd-anomaly-") as tmp:
        root = Path(tmp)
        with fsd.managers(root, shards, device_memory="32Mi", keep_pids=True) as (urls, pids):
            x = (np.random.default_rng(19).random((batch, 1024)) < 0.2).astype(np.float32)
            coordinator = Coordinator(
                artifact_base=str(root / "shards"), timeout_s=120, batching=True
            )
            try:
                await coordinator.deploy(
                    "r", net, Parallelism(shards=shards, strategy="intra-layer", channel="direct"),
                    nodes=urls, method=method, channel=ChannelConfig(kind="direct"), seed=19,
                )  # fmt: skip
                for i in range(requests):
                    cpu = sum(fsd._cpu_seconds(p) for p in pids)
                    started = time.perf_counter()
                    await coordinator.infer("r", x)
                    took = time.perf_counter() - started
                    cpu = sum(fsd._cpu_seconds(p) for p in pids) - cpu
                    print(f"one request {i}: {took:.3f} s, managers' CPU {cpu:.3f} s", flush=True)
                started = time.perf_counter()
                await asyncio.gather(*(coordinator.infer("r", x) for _ in range(4)))
                print(f"four at once: {time.perf_counter() - started:.3f} s", flush=True)
            finally:
                await coordinator.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("layers", type=int)
    parser.add_argument("shards", type=int)
    parser.add_argument("method", choices=("hypergraph", "random", "block"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.layers, args.shards, args.method, batch=args.batch,
                     requests=args.requests))  # fmt: skip
