"""Ours against the baselines at equal device memory-time, with as few simulator runs as that
needs: per seed, the references (LRU + 10-min keep-alive, the hybrid) and, for each family of
ours (a label with ``{}`` for the price: ``ours-p{}``, ``ours-p{}-b0``), prices of a grid walked
one step at a time from ``--start`` toward each reference's memory-time until two neighbouring
prices of the grid bracket it (memory-time falls as the price rises). A reference outside the
family's range at the grid's ends stays without a bracket (no figure: ``bench/predict.py``
never extrapolates). Each run is ``bench/predict.py``'s (``predict.run_one``, the same job);
every finished run is written to ``--json`` at once, and ``bench/predict.py --from-json`` makes
the report, the intervals and the plot from it.

    PYTHONHASHSEED=0 python bench/predict-bracket.py --seeds 18,19 \\
        --families 'ours-p{},ours-p{}-b0' --json fresh.json
    python bench/predict.py --from-json fresh.json --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict  # bench/predict.py, found through the path above

REFERENCES = ("lru+ka-10min", "hybrid")
GRID = (0.01, 0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 8.0)


def _price_label(template: str, price: float) -> str:
    return template.format(f"{price:g}")


def next_price(
    memory: dict[float, float], references: list[float], grid: tuple[float, ...], start: float
) -> float | None:
    """The next price of a family to run, given its runs so far (``memory``: price -> device
    GB-s) and the references' memory-times: None when every reference is bracketed by two
    runs or lies past the grid's end in its direction."""
    if not memory:
        return start
    for x in references:
        if any(a >= x >= b for a in memory.values() for b in memory.values()):
            continue
        if all(m > x for m in memory.values()):  # every run holds more: a higher price
            higher = [p for p in grid if p > max(memory)]
            if higher:
                return higher[0]
        else:  # every run holds less: a lower price
            lower = [p for p in grid if p < min(memory)]
            if lower:
                return lower[-1]
    return None


def _parser() -> argparse.ArgumentParser:
    p = predict._parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--families", default="ours-p{}", help="comma-separated label templates")
    p.add_argument("--grid", default=",".join(f"{g:g}" for g in GRID), help="prices, ascending")
    p.add_argument("--start", type=float, default=1.0, help="each family's first price")
    p.add_argument("--resume", default="", help="a --json of earlier runs to build on")
    p.add_argument(
        "--max-runs", type=int, default=0, help="start at most this many runs (0: all needed)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    families = [f for f in args.families.split(",") if f]
    grid = tuple(float(g) for g in args.grid.split(","))
    runs: list[dict[str, Any]] = (
        json.loads(Path(args.resume).read_text())["runs"] if args.resume else []
    )
    done = {(r["seed"], r["label"]) for r in runs}
    for seed in seeds:  # generate each trace once, before the workers read it
        predict.load_trace(predict.base_job(args, seed))

    def job(seed: int, label: str) -> dict[str, Any]:
        name, policy, params, prefetch = predict.setting_for(label)
        return {
            **predict.base_job(args, seed),
            "label": name,
            "policy": policy,
            "params": params,
            "prefetch": prefetch,
        }

    def wanted() -> list[tuple[int, str]]:
        """Runs that can start now, the lowest seed first (finished seeds first)."""
        out = [(s, ref) for s in seeds for ref in REFERENCES]
        for seed in seeds:
            mem = {r["label"]: r["device_gb_s"] for r in runs if r["seed"] == seed}
            references = [mem[ref] for ref in REFERENCES if ref in mem]
            for template in families:
                family = {
                    p: mem[_price_label(template, p)]
                    for p in grid
                    if _price_label(template, p) in mem
                }
                if len(references) < len(REFERENCES) and family:
                    continue  # the start runs with the references; the rest waits for them
                price = next_price(family, references, grid, args.start)
                if price is not None:
                    out.append((seed, _price_label(template, price)))
        return [key for key in out if key not in done]

    os.environ["PYTHONHASHSEED"] = str(args.hash_seed)  # as bench/predict.py: repeatable runs
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max(1, args.workers), mp_context=context) as pool:
        running: dict[futures.Future[dict[str, Any]], tuple[int, str]] = {}
        started = 0
        while True:
            for key in wanted():
                if len(running) >= max(1, args.workers) or 0 < args.max_runs <= started:
                    break
                if key not in running.values():
                    running[pool.submit(predict.run_one, job(*key))] = key
                    started += 1
            if not running:
                break
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                result = future.result()
                runs.append(result)
                done.add(key)
                brief = {k: result[k] for k in ("label", "seed", "cold_start_ratio", "device_gb_s")}
                print("done", json.dumps(brief), f"{result['wall_s']:.0f} s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
