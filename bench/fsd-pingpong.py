"""#15, nineteenth session: is an exchange round's time at N = 2 on no core? (exploratory)

Runs calibration nets only (never the grid's): the ping-pong runs of ``bench/fsd.py``
(``pingpong_configs``: direct, block, 256 wide, 16 and 64 layers, N = 2 and 4), one 2,048-wide
direct calibration run per N at 8 and 32 layers, and the unsharded 1,024-wide runs at 8 and 16
layers, each deployed, timed and removed in each of ``--rounds`` rounds. Per run: the median
latency, the managers' CPU per request split into their event loops' and their other threads'
(the shards' workers), the coordinator's CPU during the requests, and the managers' messages
by path (their link counts). Then, per exchange round (the two depths' difference): the wall
time against the CPU shared out over min(N, cores); and for N = 1, the wall time against the
CPU of the manager and the coordinator.

    python bench/fsd-pingpong.py --rounds 3 --out /tmp/fsd19/explore

The figures are exploratory (beside other engineers' tests, under ``bench/quiet.sh test``):
they are for reading the mechanism, never a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpufaas.core.layered import radix_net
from gpufaas.core.sharding import ChannelConfig, Parallelism
from gpufaas.scheduler.coordinator import Coordinator

_spec = importlib.util.spec_from_file_location("fsd_bench", Path(__file__).parent / "fsd.py")
assert _spec is not None and _spec.loader is not None
fsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsd)


def configs(
    nodes: int, *, sharded: bool = True, unsharded: tuple[int, ...] = (8, 16), width: int = 1024
) -> list[dict[str, Any]]:
    """Every run of one round: the ping-pong runs and 2,048-wide direct runs (unless not
    ``sharded``), and unsharded runs ``width`` wide at each of ``unsharded`` depths (never
    the grid's: 24 or 120 layers, or 4,096 wide)."""
    if width == 4096 or any(depth in (24, 120) for depth in unsharded):
        raise ValueError("the grid's nets are never run here")
    found = list(fsd.pingpong_configs(["direct"], nodes)) if sharded else []
    for shards in (2, 4) if sharded else ():
        for depth in (8, 32):
            found.append({"name": f"cal-direct-{depth}-{shards}-block", "channel": "direct",
                          "neurons": fsd.CHANNEL_WIDTH, "depth": depth, "shards": shards,
                          "method": "block"})  # fmt: skip
    for depth in unsharded:
        found.append({"name": f"cal-{width}-{depth}", "neurons": width, "depth": depth,
                      "shards": 1, "channel": "direct", "method": "block"})  # fmt: skip
    return found


def _threads(pids: list[int]) -> dict[str, float]:
    roles = {"loop": 0.0, "workers": 0.0}
    for pid in pids:
        for role, seconds in fsd._thread_cpu_seconds(pid).items():
            roles[role] += seconds
    return roles


async def run(
    root: Path, *, rounds: int, nodes: int, count: int, plan: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(11)
    with fsd.managers(root, nodes, device_memory="32Mi", keep_pids=True) as (urls, pids):
        coordinator = Coordinator(artifact_base=str(root / "sets"), timeout_s=120)
        try:
            for index in range(rounds):
                for config in plan:
                    name, shards = config["name"], config["shards"]
                    before = await asyncio.to_thread(fsd.read_link_counts, urls)
                    await coordinator.deploy(
                        name, radix_net(config["neurons"], config["depth"]),
                        Parallelism(shards=shards, strategy="intra-layer", channel="direct"),
                        nodes=urls[:shards], method=config["method"],
                        channel=ChannelConfig(kind="direct"), seed=2,
                    )  # fmt: skip
                    for batch in (16, 64):
                        x = (rng.random((batch, config["neurons"])) < 0.2).astype(np.float32)
                        await coordinator.infer(name, x)
                        times, mine, ran, waited = [], 0.0, 0.0, 0.0
                        threads = _threads(pids[:shards])
                        busy = fsd._machine_busy_seconds()
                        for _ in range(count):
                            ran0, waited0 = fsd.task_times(pids)
                            started, cpu = time.perf_counter(), time.process_time()
                            await coordinator.infer(name, x)
                            times.append(time.perf_counter() - started)
                            mine += time.process_time() - cpu
                            ran1, waited1 = fsd.task_times(pids)
                            ran, waited = ran + ran1 - ran0, waited + waited1 - waited0
                        machine = fsd._machine_busy_seconds() - busy
                        after = _threads(pids[:shards])
                        rows.append({
                            **{k: v for k, v in config.items() if k != "name"},
                            "round": index, "batch": batch,
                            "seconds": statistics.median(times),
                            "managers_ms": ran / count * 1e3,
                            "managers_wait_ms": waited / count * 1e3,
                            "machine_ms": machine / count * 1e3,
                            "loop_ms": (after["loop"] - threads["loop"]) / count * 1e3,
                            "workers_ms": (after["workers"] - threads["workers"]) / count * 1e3,
                            "coordinator_ms": mine / count * 1e3,
                            "probe_s": fsd.probe_pass(),
                        })  # fmt: skip
                    rows[-1]["links"] = fsd.counts_between(
                        before, await asyncio.to_thread(fsd.read_link_counts, urls)
                    )
                    await coordinator.remove(name)
                    print(f"  round {index + 1} {name}: {rows[-1]['seconds'] * 1e3:.2f} ms, "
                          f"managers {rows[-1]['managers_ms']:.2f} ms, messages "
                          f"{rows[-1]['links'].get('messages')}", flush=True)  # fmt: skip
        finally:
            await coordinator.close()
    return rows


def per_round(rows: list[dict[str, Any]], *, cores: int) -> list[dict[str, Any]]:
    """Per exchange round, each round and batch: the depths' difference in wall time and in
    CPU (all the managers', their loops' and their workers'), and the wall time beyond the
    CPU shared out over min(N, cores) cores."""
    out = []
    groups: dict[tuple[int, int, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["shards"] > 1:
            groups.setdefault((r["neurons"], r["shards"], r["round"], r["batch"]), []).append(r)
    for (neurons, shards, index, batch), pair in sorted(groups.items()):
        low, high = sorted(pair, key=lambda r: r["depth"])
        exchanges = [int((fsd._calibration_profile(r["depth"], shards, "block", neurons)
                          .sync.max(axis=1) > 0).sum()) for r in (low, high)]  # fmt: skip
        per = exchanges[1] - exchanges[0]

        def slope(key: str, scale: float = 1e-3, lo: Any = low, hi: Any = high, n: int = per
                  ) -> float:  # fmt: skip
            return float((hi[key] - lo[key]) * scale / n)

        wall = slope("seconds", 1.0)
        cpu = slope("managers_ms")
        out.append({"neurons": neurons, "shards": shards, "round": index, "batch": batch,
                    "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                    "runqueue_ms": slope("managers_wait_ms") * 1e3,
                    "loop_ms": slope("loop_ms") * 1e3, "workers_ms": slope("workers_ms") * 1e3,
                    "off_cpu_ms": (wall - cpu / min(shards, cores)) * 1e3})  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--count", type=int, default=9, help="timed requests per run")
    parser.add_argument("--out", default="/tmp/fsd19/explore")
    parser.add_argument("--unsharded-only", action="store_true")
    parser.add_argument("--depths", default="8,16", help="the unsharded runs' depths")
    parser.add_argument("--width", type=int, default=1024, help="the unsharded runs' width")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsd-pingpong-") as tmp:
        plan = configs(args.nodes, sharded=not args.unsharded_only, width=args.width,
                       unsharded=tuple(int(d) for d in args.depths.split(",")))  # fmt: skip
        rows = asyncio.run(run(Path(tmp), rounds=args.rounds, nodes=args.nodes, count=args.count,
                               plan=plan))  # fmt: skip
    cores = os.cpu_count() or 1
    rounds = per_round(rows, cores=cores)
    for r in rounds:
        print(f"  {r['neurons']:>5} N={r['shards']} round {r['round']} batch {r['batch']:>2}: "
              f"wall {r['wall_ms']:.3f} ms/round, managers' CPU {r['cpu_ms']:.3f} (loops "
              f"{r['loop_ms']:.3f}, workers {r['workers_ms']:.3f}), waiting for a core "
              f"{r['runqueue_ms']:.3f}, off-CPU {r['off_cpu_ms']:.3f}")  # fmt: skip
    unsharded = [r for r in rows if r["shards"] == 1]
    for r in unsharded:
        print(f"  N=1 {r['neurons']}x{r['depth']} batch {r['batch']} round {r['round']}: wall "
              f"{r['seconds'] * 1e3:.2f} ms, machine {r['machine_ms']:.2f}, manager "
              f"{r['managers_ms']:.2f}, waiting {r['managers_wait_ms']:.2f} (loop "
              f"{r['loop_ms']:.2f}, workers {r['workers_ms']:.2f}), coordinator "
              f"{r['coordinator_ms']:.2f}")  # fmt: skip
    (out / "pingpong.json").write_text(json.dumps({"rows": rows, "per_round": rounds}, indent=1))
    print(f"wrote {out / 'pingpong.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
