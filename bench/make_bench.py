"""``make bench``: regenerate the figures of ``bench/RESULTS.md`` that this driver owns.

Each figure is a block of ``bench/RESULTS.md`` between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; this driver runs the benchmark behind each block, and rewrites the
block with the figures and a stamp: the commit (``+dirty`` with uncommitted changes), the
date, the machine (cores, load average before and after) and the exact command. Text
outside the blocks, and blocks other sections own, are left as they are. Plots go next to
the file (``bench/*.png``); raw outputs to ``bench/out/``.

    python bench/make_bench.py            # every figure (about an hour on 2 quiet cores)
    python bench/make_bench.py --quick    # smaller runs (<= 20 min here), into NAME-quick blocks
    python bench/make_bench.py --only lalb-sweep,kill-run

``--quick`` runs fewer requests per simulation and per live run, and leaves the K-of-C peer runs
out (25 minutes; ``--quick --with-peers`` runs their quick runs). **A quick run never rewrites a
full block**: it writes the block ``NAME-quick`` instead, made right after ``NAME``'s block
the first time, so the full-run figures that the README quotes stay as the last full run left
them. A full run rewrites only the full blocks. A block not regenerated keeps its previous
stamp. The peer runs need ``ray[serve]`` and ``nvidia-pytriton``, which are not in
the project's install: ``--peers-python`` names an interpreter that has them and gpufaas (for
example ``/work/peers-venv/bin/python``, see ``bench/peers/README.md``). Issue #17's goal table
(block ``peers-goals``, ~5 min) runs in quick mode too (into ``peers-goals-quick``) wherever
that interpreter has the peers, and is skipped, saying why, where it does not.

Blocks and their quick runs (seconds: each run once here under ``quiet-bench``, 2026-12-05,
load average 0.9-1.5): Scheduler ``lalb-sweep``, ``lalb-wss``, ``decision-cost`` and
Reliability ``kill-run``, ``overload`` (~333 s together); ``gpu-loading`` (GPU manager:
16/64/256 MiB, 5 rounds instead of 11; 30 s); ``scaleout`` (gateway scale-out: 1, 2, 4
gateways, 400 requests instead of 800, 3 s saturation, seed 1; 102 s); ``fsd`` (distributed
inference: partition volumes, then the direct-channel grid at 24 layers, N <= 4, hypergraph vs
random, 10 s per configuration; the full run is 120 layers, N <= 8, three partitions, and the
dense MLP; plot ``bench/out/fsd/fsd.png``; 28 s); ``dataplane`` (dataplane.py, transport.py,
grpc_echo.py, one round instead of three; 63 s); ``predict`` (predictive residency: orcbench
seeds 3-4, 30 simulated minutes, the four quick settings; full: seeds 3-5, 1 h, every setting;
plot ``bench/predict-orcbench.png``; 50 s); ``peers-goals`` (~240 s). Whole quick mode: about
850 s (14 min) on this 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
OUT = HERE / "out"
PY = sys.executable
PEERS_PY = [sys.executable]  # the interpreter with ray[serve] and nvidia-pytriton (--peers-python)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[bool], tuple[str, str]]  # quick -> (command, markdown body)
    full_only: bool = False
    needs_peers: bool = False  # runs with the peers' interpreter; skipped where it lacks them


def _run(command: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}"
            f"\n{result.stderr[-2000:]}"
        )
    return result.stdout


def _shown(command: list[str]) -> str:
    """The command as a reader would type it from the repository root."""

    def part(c: str) -> str:
        if c == PY:
            return "python"
        if c == PEERS_PY[0]:
            return c  # the peers' own interpreter: the reader needs to know which
        return str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT) + "/") else c

    return " ".join(part(c) for c in command)


# -- the figures -----------------------------------------------------------------------------------


def lalb_sweep(quick: bool) -> tuple[str, str]:
    command = [
        PY, str(HERE / "lalb.py"), "--sweep", "--jobs", "2",
        "--requests", "10000" if quick else "30000",
        "--out", str(OUT / "lalb-sweep.json"), "--markdown", str(OUT / "lalb-sweep.md"),
        "--plot", str(HERE / "lalb-sweep.png"),
    ]  # fmt: skip
    _run(command, timeout_s=3600)
    return _shown(command), (OUT / "lalb-sweep.md").read_text()


def lalb_wss(quick: bool) -> tuple[str, str]:
    command = [
        PY, str(HERE / "lalb.py"), "--json", "--rate", "80",
        "--requests", "10000" if quick else "30000", "--plot", str(HERE / "lalb-sim.png"),
    ]  # fmt: skip
    points = json.loads(_run(command, timeout_s=1800))
    lines = [
        "| working set | LB copy busy | LB mean ms | LB miss | LALB mean ms | LALB miss"
        " | O3 mean ms | O3 miss | pooled MIN miss | LALB miss / pooled MIN"
        " | LALB miss / per-device MIN |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for wss, p in points.items():
        lb, la, o3, bound = p["lb"], p["lalb"], p["lalb-o3"], p["belady"]
        lines.append(
            f"| {wss} | {100 * lb['copy_utilisation']:.0f}% | {lb['mean_ms']:.1f}"
            f" | {lb['miss_ratio']:.3f} | {la['mean_ms']:.2f} | {la['miss_ratio']:.3f}"
            f" | {o3['mean_ms']:.2f} | {o3['miss_ratio']:.3f} | {bound['miss_ratio']:.3f}"
            f" | {_x(la.get('miss_x_pooled_min'))} | {_x(la.get('miss_x_placement_min'))} |"
        )
    return _shown(command), "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def decision_cost(quick: bool) -> tuple[str, str]:
    """The simulated run (first seed) and the stress case on seeds 0-3: each seed and the
    worst, since the stress case's tail depends on its seed."""
    command = [PY, str(HERE / "decision_cost.py"), "--json", "--seeds", "0,1,2,3"]
    if quick:
        command += ["--requests", "20000", "--decisions", "5000"]
    out = json.loads(_run(command, timeout_s=1800))
    lines = [
        "| scenario | policy | seed | CPU p50 us | CPU p99 us |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, r in out.get("sim", {}).items():
        seed = out["setup"]["seeds"][0]
        lines.append(f"| sim | {label} | {seed} | {r['cpu_p50_us']:.1f} | {r['cpu_p99_us']:.1f} |")
    for label, runs in out.get("stress", {}).items():
        for seed, r in runs["seeds"].items():
            lines.append(
                f"| stress | {label} | {seed} | {r['cpu_p50_us']:.1f} | {r['cpu_p99_us']:.1f} |"
            )
        worst = runs["worst"]
        lines.append(
            f"| stress | {label} | **worst** (p99: seed {worst['seed']}) | {worst['cpu_p50_us']:.1f}"
            f" | **{worst['cpu_p99_us']:.1f}** |"
        )
    return _shown(command), "\n".join(lines)


def kill_run(quick: bool) -> tuple[str, str]:
    requests = "120" if quick else "300"
    command = [PY, str(HERE / "kill_run.py"), "--requests", requests, "--rate", "30"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "GPUFAAS_HOME": str(OUT / "kill-run-home")},
        check=False,
    )
    if result.returncode not in (0, 1):  # 1: ran, and found a violation: report it
        raise RuntimeError(f"kill_run failed ({result.returncode}):\n{result.stderr[-2000:]}")
    r = json.loads(result.stdout)
    lines = [
        "| sent | answered | statuses | lost | answered twice | wrong id | ran twice (nodes)"
        " | 200 without an observed run | unobserved window |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['sent']} | {r['answered']} | {r['statuses']} | {r['lost']} | {r['answered_twice']}"
        f" | {r['wrong_id']} | {r['ran_twice']} | {r['answered_200_without_observed_run']}"
        f" | {r['unobserved_window_ms']:.1f} ms |",
    ]
    return _shown(command), "\n".join(lines)


def overload(quick: bool) -> tuple[str, str]:
    command = [
        PY, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
        "tests/e2e/test_overload.py::test_twice_saturation_loses_nothing_and_answers_once",
    ]  # fmt: skip
    text = _run(command, timeout_s=900)
    found = re.search(r"twice saturation: .*", text)
    if not found:
        raise RuntimeError(f"no figure line in the test's output:\n{text[-2000:]}")
    return _shown(command), f"`{found.group(0)}`"


def _nested(section: str) -> str:
    """A ``run.py`` section as the body of a block inside RESULTS' "Peers" section: its own
    ``## `` title dropped, every heading one level deeper."""
    lines = section.splitlines()
    if lines and lines[0].startswith("## "):
        lines = lines[1:]
    return "\n".join(f"#{line}" if line.startswith("### ") else line for line in lines)


def peers(quick: bool) -> tuple[str, str]:
    command = [PEERS_PY[0], str(HERE / "peers" / "run.py"), "--png", str(HERE / "peers" / "results.png"),
               "--markdown", str(OUT / "RESULTS-peers.md")]  # fmt: skip
    command += ["--quick"] if quick else []
    _run(command, timeout_s=3 * 3600)
    return _shown(command), _nested((OUT / "RESULTS-peers.md").read_text())


def peers_host_tier(quick: bool) -> tuple[str, str]:
    command = [PEERS_PY[0], str(HERE / "peers" / "run.py"), "--host-tier", "--out",
               str(OUT / "peers-host-tier"), "--markdown", str(OUT / "RESULTS-peers-host.md")]  # fmt: skip
    command += ["--quick"] if quick else []
    _run(command, timeout_s=3 * 3600)
    return _shown(command), _nested((OUT / "RESULTS-peers-host.md").read_text())


def peers_goals(quick: bool) -> tuple[str, str]:
    """Issue #17's goal table: warm p50 and 8-client batched throughput against both peers,
    three rounds per system in alternating order (Ray Serve in the middle one), so each figure
    comes with its range and one disturbed minute cannot pass for a result (~5-6 min)."""
    command = [PEERS_PY[0], str(HERE / "peers" / "run.py"), "--goals", "--rounds", "3",
               "--out", str(OUT / "peers-goals"),
               "--markdown", str(OUT / "RESULTS-peers-goals.md")]  # fmt: skip
    _run(command, timeout_s=1800, env=_this_checkout())
    return _shown(command), _nested((OUT / "RESULTS-peers-goals.md").read_text())


def _this_checkout() -> dict[str, str]:
    """PYTHONPATH for the peers' interpreter to import this checkout's gpufaas (its strict
    editable build), whichever tree that interpreter has installed; empty if there is none."""
    builds = sorted((ROOT / "build").glob("__editable__.gpufaas-*"))
    if not builds:
        return {}
    path = os.pathsep.join(p for p in (str(builds[-1]), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


# -- the sections whose figures were hand-pasted before (issue #12 item 6) -------------------------


def _embedded(text: str) -> str:
    """What a bench printed, for a block: as it is where it holds a markdown table, else fenced."""
    text = text.strip()
    if re.search(r"^\|\s*:?-{3}", text, re.M):
        return text
    return f"```\n{text}\n```"


def _rows_table(rows: list[dict[str, object]]) -> str:
    """A markdown table of a list of flat JSON objects (their scalar fields, in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and isinstance(v, (int, float, str))]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        lines.append(
            "| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |"
        )
    return "\n".join(lines)


def gpu_loading(quick: bool) -> tuple[str, str]:
    command = [PY, str(HERE / "loading.py"), "--out", str(OUT / "loading.json")]
    command += ["--repeats", "5" if quick else "11"]
    return _shown(command), _embedded(_run(command, timeout_s=1800))


def scaleout(quick: bool) -> tuple[str, str]:
    command = [
        PY, str(HERE / "lalb.py"), "--mode", "live", "--wss", "16", "--zipf", "1.1",
        "--live-device-memory", "20Ki", "--seed", "1",
    ]  # fmt: skip
    if quick:
        command += ["--gateways", "1,2,4", "--live-requests", "400", "--saturation-seconds", "3"]
    else:
        command += ["--gateways", "1,2,4", "--live-requests", "800", "--saturation-seconds", "5"]
    return _shown(command), _embedded(_run(command, timeout_s=1800))


def fsd(quick: bool) -> tuple[str, str]:
    out = OUT / "fsd"
    command = [PY, str(HERE / "fsd.py"), "--out", str(out)]
    command += ["--channels", "direct"]
    if quick:  # 24 layers, N <= 4, two partitions, 10 s per configuration
        command += ["--quick", "--nodes", "4", "--methods", "hypergraph,random", "--budget-s", "10",
                    "--skip-local", "--skip-mlp"]  # fmt: skip
    _run(command, timeout_s=900 if quick else 3600)
    report = json.loads((out / "fsd.json").read_text())
    parts = []
    if report.get("partition"):
        parts.append("Partition volume per sample:\n\n" + _rows_table(report["partition"]))
    if report.get("grid"):
        parts.append("Grid (plot: `bench/out/fsd/fsd.png`):\n\n" + _rows_table(report["grid"]))
    if report.get("costmodel"):
        summary = {k: v for k, v in report["costmodel"].items() if k != "runs"}
        parts.append(f"Cost model:\n\n```\n{json.dumps(summary, indent=1, default=str)}\n```")
    if not parts:
        raise RuntimeError(f"{out / 'fsd.json'} holds no figures")
    return _shown(command), "\n\n".join(parts)


def dataplane(quick: bool) -> tuple[str, str]:
    """The request path (dataplane.py), the gateway -> node lane (transport.py) and gRPC
    (grpc_echo.py), one after the other."""
    rounds = "1" if quick else "3"
    commands = [
        [PY, str(HERE / "dataplane.py"), "--requests", "400", "--rounds", rounds],
        [PY, str(HERE / "transport.py"), "--requests", "3000"],
        [PY, str(HERE / "grpc_echo.py"), "--calls", "3000", "--rounds", rounds],
    ]  # fmt: skip
    hops = json.loads(_run(commands[0], timeout_s=1800))
    rows: list[dict[str, object]] = [
        {"hop": hop, "round": i + 1, "model": model, **figures}
        for hop, runs in hops.items() if isinstance(runs, list)
        for i, run in enumerate(runs)
        for model, figures in run.items() if isinstance(figures, dict)
    ]  # fmt: skip
    parts = [
        f"`{_shown(commands[0])}` (unanswered: {hops.get('unanswered')}):\n\n{_rows_table(rows)}"
    ]
    setups = json.loads(_run(commands[1], timeout_s=1800))
    rows = [{"setup": k, **v} for k, v in setups.items() if isinstance(v, dict)]
    parts.append(f"`{_shown(commands[1])}`:\n\n{_rows_table(rows)}")
    summary = json.loads(_run(commands[2], timeout_s=1800))["median_of_rounds"]
    lines = [  # the table grpc_echo.py prints on stderr, from its JSON
        "| server | p50 µs | p90 µs | client CPU µs/call | server CPU µs/call |",
        "| --- | --- | --- | --- | --- |",
    ] + [
        f"| {kind} | {s['p50_us']:.0f} | {s['p90_us']:.0f} | {s['client_cpu_us']:.0f}"
        f" | {s['server_cpu_us']:.0f} |"
        for kind, s in summary.items()
    ]
    parts.append(f"`{_shown(commands[2])}` (median of rounds):\n\n" + "\n".join(lines))
    return " ; ".join(_shown(c) for c in commands), "\n\n".join(parts)


def predict(quick: bool) -> tuple[str, str]:
    command = [
        PY, str(HERE / "predict.py"), "--workload", "orcbench",
        "--json", str(OUT / "predict-orcbench.json"), "--plot", str(HERE / "predict-orcbench.png"),
    ]  # fmt: skip
    command += ["--quick", "--seeds", "3,4", "--minutes", "30"] if quick else ["--seeds", "3,4,5"]
    text = _run(command, timeout_s=3600)
    # the tables (after the progress lines), then the goal comparison (JSON) fenced
    tables, _, compared = text[text.index("\n|") + 1 :].partition("\n{")
    return _shown(command), f"{tables.strip()}\n\n```json\n{{{compared.rstrip()}\n```"


def peers_missing(python: str) -> str | None:
    """Why ``python`` cannot run the peers (None: it can)."""
    probe = subprocess.run(
        [python, "-c", "import ray.serve, pytriton, psutil, gpufaas.core"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"{python} cannot import the peers ({last}); pass --peers-python"


STEPS = (
    Step("lalb-sweep", lalb_sweep),
    Step("lalb-wss", lalb_wss),
    Step("decision-cost", decision_cost),
    Step("kill-run", kill_run),
    Step("overload", overload),
    Step("gpu-loading", gpu_loading),
    Step("scaleout", scaleout),
    Step("fsd", fsd),
    Step("dataplane", dataplane),
    Step("predict", predict),
    Step("peers-goals", peers_goals, needs_peers=True),
    Step("peers", peers, full_only=True, needs_peers=True),
    Step("peers-host-tier", peers_host_tier, full_only=True, needs_peers=True),
)


# -- stamping and rewriting ------------------------------------------------------------------------


def commit() -> str:
    head = _run(["git", "rev-parse", "--short", "HEAD"], timeout_s=30).strip()
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], timeout_s=30).strip()
    return head + ("+dirty" if dirty else "")


QUICK_NOTE = " (a quick run: smaller runs than the full block above, which it leaves alone)"


def stamp(command: str, *, quick: bool, load_before: tuple[float, ...], seconds: float) -> str:
    load_after = os.getloadavg()
    return (
        f"_Generated by `make bench{' QUICK=1' if quick else ''}`{QUICK_NOTE if quick else ''}:"
        f" commit {commit()},"
        f" {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores"
        f" ({platform.machine()}, {platform.system()}), load average"
        f" {load_before[0]:.1f} before / {load_after[0]:.1f} after (shared machine);"
        f" {seconds:.0f} s. Command: `{command}`._"
    )


def replace_block(text: str, name: str, body: str, *, after: str | None = None) -> str:
    """``text`` with block ``name``'s body replaced by ``body``. A missing block is made right
    after block ``after``, if given (a quick run's block, next to its full one); else KeyError."""
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(name)} -->).*?(<!-- /bench:{re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        end = f"<!-- /bench:{after} -->" if after is not None else None
        if end is None or end not in text:
            raise KeyError(f"the results file has no block <!-- bench:{name} -->")
        made = f"{end}\n\n<!-- bench:{name} -->\n<!-- /bench:{name} -->"
        text = text.replace(end, made, 1)
    return pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text, count=1)


def block_name(step: str, *, quick: bool) -> str:
    """The block a run writes: a quick run its own, never the full run's."""
    return f"{step}-quick" if quick else step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller runs, no peers; writes NAME-quick blocks and leaves the full ones alone",
    )
    parser.add_argument(
        "--with-peers", action="store_true", help="in quick mode, run the peers' quick runs too"
    )
    parser.add_argument("--only", default="", help="comma-separated block names")
    parser.add_argument(
        "--peers-python",
        default=sys.executable,
        help="an interpreter with ray[serve], nvidia-pytriton and gpufaas, for the peer runs",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the file to rewrite")
    args = parser.parse_args(argv)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown blocks {sorted(unknown)}; known: {[s.name for s in STEPS]}")
    OUT.mkdir(exist_ok=True)
    env_seed = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    os.environ.update(env_seed)
    PEERS_PY[0] = args.peers_python
    failures: list[str] = []
    peers_problem: str | bool | None = False  # False: not probed yet
    for step in STEPS:
        if wanted and step.name not in wanted:
            continue
        if step.full_only and args.quick and not args.with_peers:
            print(f"[bench] {step.name}: skipped in quick mode (keeps its previous stamp)")
            continue
        if step.needs_peers:
            if peers_problem is False:
                peers_problem = peers_missing(args.peers_python)
            if peers_problem:
                print(f"[bench] {step.name}: skipped, {peers_problem} (keeps its previous stamp)")
                continue
        print(f"[bench] {step.name} ...", flush=True)
        load_before = os.getloadavg()
        started = time.monotonic()
        try:
            command, body = step.run(args.quick)
        except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            failures.append(f"{step.name}: {e}")
            print(f"[bench] {step.name} FAILED: {e}", file=sys.stderr)
            continue
        seconds = time.monotonic() - started
        block = stamp(command, quick=args.quick, load_before=load_before, seconds=seconds)
        text = replace_block(
            args.results.read_text(),
            block_name(step.name, quick=args.quick),
            f"{block}\n\n{body.strip()}",
            after=step.name,
        )
        args.results.write_text(text)
        print(
            f"[bench] {step.name}: {seconds:.0f} s, block {block_name(step.name, quick=args.quick)}",
            flush=True,
        )
    if failures:
        print("[bench] failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
