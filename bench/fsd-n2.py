"""#15, seventeenth session, exploratory: does the grid's N = 2 pay something its calibration
does not? The grid (``bench/fsd.py``) times requests through shared passes
(``--shared-passes``: ``Coordinator(batching=True)``) on a 24-layer net; the calibration
times them without passes on 8- and 16-layer nets. This times both ways, on both depths, at
N = 1 and N = 2 (direct, block), alternating in shuffled rounds, and prints each
configuration's median latency beside the cost model's prediction from a calibration.

    python bench/fsd-n2.py --constants bench/fsd-calibration-s17.json --out bench/out/fsd-n2
    python bench/fsd-n2.py --constants bench/fsd-calibration-s17.json --age --out bench/out/fsd-n2

``--age`` (its second question): is a set timed right after its deploy, as the calibration
times it, faster than the same set after it has served a while? Each round deploys
4,096 x 16, N = 2 direct block, times it as the calibration does (a warm-up, then the
median of 5), serves ``--serve`` more requests, times it again, and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.core.sharding import Parallelism
from gpufaas.scheduler import costmodel
from gpufaas.scheduler.coordinator import Coordinator

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fsd_bench", ROOT / "bench" / "fsd.py")
assert _spec is not None and _spec.loader is not None
fsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsd)


async def run(
    urls: list[str], root: Path, *, rounds: int, requests: int, seed: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    nets = {depth: radix_net(4096, depth) for depth in (16, 24)}
    x = (rng.random((64, 4096)) < 0.2).astype(np.float32)
    coordinators = {passes: Coordinator(artifact_base=str(root / f"shards-{passes}"), timeout_s=120,
                                        batching=passes) for passes in (False, True)}  # fmt: skip
    configs = [
        (depth, shards, passes) for depth in nets for shards in (1, 2) for passes in (False, True)
    ]
    rows = []
    try:
        for depth, shards, passes in configs:
            await coordinators[passes].deploy(
                f"n2-{depth}-{shards}", nets[depth], Parallelism(shards=shards, strategy="intra-layer"),
                nodes=urls[:shards], method="block", seed=seed,
            )  # fmt: skip
        for index in range(rounds):
            order = list(configs)
            rng.shuffle(order)
            for depth, shards, passes in order:
                coordinator, name = coordinators[passes], f"n2-{depth}-{shards}"
                await coordinator.infer(name, x)  # warm-up
                times, probes = [], []
                for _ in range(requests):
                    started = time.perf_counter()
                    await coordinator.infer(name, x)
                    times.append(time.perf_counter() - started)
                    probes.append(fsd.probe_pass())
                rows.append({"round": index, "depth": depth, "shards": shards, "passes": passes,
                             "latency_s": statistics.median(times), "probe_s": statistics.median(probes)})  # fmt: skip
                print(f"  round {index} depth {depth} N={shards} passes={passes}: "
                      f"{rows[-1]['latency_s'] * 1e3:.2f} ms", flush=True)  # fmt: skip
    finally:
        for coordinator in coordinators.values():
            await coordinator.close()
    return rows


async def age(
    urls: list[str], root: Path, *, rounds: int, serve: int, seed: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    net = radix_net(4096, 16)
    x = (rng.random((64, 4096)) < 0.2).astype(np.float32)
    coordinator = Coordinator(artifact_base=str(root / "age"), timeout_s=120)
    rows = []

    async def timed(name: str) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            await coordinator.infer(name, x)
            times.append(time.perf_counter() - started)
            fsd.probe_pass()
        return statistics.median(times)

    try:
        for index in range(rounds):
            name = f"age-{index}"
            await coordinator.deploy(name, net, Parallelism(shards=2, strategy="intra-layer"),
                                     nodes=urls[:2], method="block", seed=seed)  # fmt: skip
            await coordinator.infer(name, x)  # the calibration's warm-up
            fresh = await timed(name)
            for _ in range(serve):
                await coordinator.infer(name, x)
            aged = await timed(name)
            await coordinator.remove(name)
            rows.append({"round": index, "fresh_s": fresh, "aged_s": aged})
            print(f"  round {index}: fresh {fresh * 1e3:.2f} ms, after {serve} requests "
                  f"{aged * 1e3:.2f} ms", flush=True)  # fmt: skip
    finally:
        await coordinator.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constants", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/out/fsd-n2"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=7)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--age", action="store_true")
    parser.add_argument("--serve", type=int, default=60)
    args = parser.parse_args()
    if args.age:
        with (
            tempfile.TemporaryDirectory() as tmp,
            fsd.managers(Path(tmp), 2, device_memory="256Mi") as urls,
        ):
            rows = asyncio.run(
                age(urls, Path(tmp), rounds=args.rounds, serve=args.serve, seed=args.seed)
            )
        ratios = [r["aged_s"] / r["fresh_s"] for r in rows]
        print(f"aged / fresh: median {statistics.median(ratios):.3f}, rounds "
              f"{[round(v, 3) for v in ratios]}")  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fsd-n2-age.json").write_text(
            json.dumps({"rows": rows, "ratios": ratios}, indent=1)
        )
        return
    calibration = json.loads(args.constants.read_text())["calibration"]
    runs = calibration["runs"]  # without the grid-width runs: costmodel_relay's fit
    runs = {**runs, "channels": [r for r in runs["channels"] if not fsd._grid_width(r)]}
    constants = fsd.fit_constants(runs, cores=2, relay=True,
                                  contention_weight=costmodel.SERVED_CONTENTION)  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        fsd.managers(Path(tmp), 2, device_memory="256Mi") as urls,
    ):
        rows = asyncio.run(
            run(urls, Path(tmp), rounds=args.rounds, requests=args.requests, seed=args.seed)
        )
    summary = []
    for depth in (16, 24):
        net = radix_net(4096, depth)
        for shards in (1, 2):
            prof = fsd._grid_profile(net, shards, "block", args.seed)
            for passes in (False, True):
                mine = [
                    r
                    for r in rows
                    if (r["depth"], r["shards"], r["passes"]) == (depth, shards, passes)
                ]
                measured = statistics.median(r["latency_s"] for r in mine)
                probe = statistics.median(r["probe_s"] for r in mine)
                predicted = costmodel.predict(prof, batch=64, channel="direct",
                                              constants=costmodel.at_speed(constants, probe))  # fmt: skip
                summary.append({"depth": depth, "shards": shards, "passes": passes,
                                "measured_ms": measured * 1e3, "predicted_ms": predicted * 1e3,
                                "error": predicted / measured - 1,
                                "rounds_ms": [r["latency_s"] * 1e3 for r in mine]})  # fmt: skip
                print(f"depth {depth} N={shards} passes={passes}: measured {measured * 1e3:.2f} ms "
                      f"(rounds {[round(r['latency_s'] * 1e3, 1) for r in mine]}), predicted "
                      f"{predicted * 1e3:.2f} ms ({predicted / measured - 1:+.2f})")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsd-n2.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
