"""gpufaas side by side with Ray Serve (model multiplexing) and PyTriton, in one run.

Usage (from the repository root, with the project's virtualenv)::

    python bench/peers/run.py --quick --json        # a short run; JSON on stdout
    python bench/peers/run.py                       # the full run; table on stdout
    python bench/peers/run.py --goals               # issue #17's goal table (a few minutes)

Each system serves K copies of one example model at a time (``tiny-mlp``,
``small-cnn``, ``minilm``) with room for C < K of them (gpufaas: a device byte budget
that holds exactly C; Ray: ``max_num_models_per_replica=C``; PyTriton: an LRU of C).
One load generator drives each system in turn with the same seeded workload:

1. cold: the first request for each model, one at a time (nothing loaded yet);
2. warm: requests for the C models just loaded, 1 client, then N clients;
3. Zipf, closed loop: N clients over all K models with Zipf popularity;
4. Zipf, open loop: Poisson arrivals at fixed rates (fractions of gpufaas's Zipf
   throughput, the same rates for every system) up to saturation.

``--goals`` measures instead what issue #17's goals name, per family (tiny-mlp and
small-cnn): two copies, both resident, one with batching off and one with every system's
dynamic batching on (the same bounds: 8 requests, 2 ms); warm p50 with 1 client on the
first, throughput with N clients on each; and prints the goal table.

Every system and its load generator run inside their own private network namespace
(``unshare -n``, loopback up): Ray listens on all interfaces whatever it is asked, and
the other systems get the same conditions. Figures come back per system and family
with gpufaas/peer ratios, as a table, JSON and a PNG (``bench/out/``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

FAMILIES = ("tiny-mlp", "small-cnn", "minilm")
SYSTEM_ORDER = ("gpufaas", "ray", "triton")


@dataclass
class Plan:
    """Everything a worker needs; the same plan goes to every system."""

    families: list[str]
    systems: list[str]
    copies: int
    capacity: int
    concurrency: int
    zipf_s: float
    seed: int
    warm_warmup: int
    warm_requests: int
    loaded_requests: int
    zipf_requests: int
    phase_max_s: float
    rate_fractions: list[float]
    rate_duration_s: float
    open_max_outstanding: int
    open_grace_s: float
    start_timeout_s: float
    models_dir: str
    out_dir: str
    profile: bool = False
    host_tier: bool = False  # gpufaas's host tier on, peers given room for all K copies
    torch_threads: int = 1
    rates: dict[str, list[float]] = field(default_factory=dict)  # per family, set by gpufaas
    goals: bool = False  # issue #17's goal phases instead of the K-of-C ones
    batched_requests: int = 0  # N clients on the batched copy (--goals)
    rounds: int = 1  # --goals: rounds per system, in alternating order (see round_order)
    ray_rounds: int = 1  # of those, the ones Ray Serve runs in (its start costs ~20 s)

    @classmethod
    def goals_plan(cls, args: argparse.Namespace) -> Plan:
        """Issue #17's goals: warm p50 (1 client) with batching off, throughput of N clients
        with each system's dynamic batching on; two copies, both resident everywhere."""
        rounds = max(1, args.rounds)
        return cls(
            families=args.families,
            systems=args.systems,
            copies=2,
            capacity=2,
            concurrency=args.concurrency,
            zipf_s=args.zipf_s,
            seed=args.seed,
            warm_warmup=30,
            # the one-round run's requests and time, shared out over the rounds
            warm_requests=-(-1000 // rounds),
            loaded_requests=-(-2000 // rounds),
            zipf_requests=0,
            phase_max_s=max(5.0, 15.0 / rounds),
            rate_fractions=[],
            rate_duration_s=0.0,
            open_max_outstanding=0,
            open_grace_s=0.0,
            start_timeout_s=240.0,
            models_dir=str(args.models_dir),
            out_dir=str(args.out),
            profile=args.profile,
            torch_threads=args.torch_threads,
            goals=True,
            batched_requests=-(-5000 // rounds),
            rounds=rounds,
            ray_rounds=min(rounds, max(1, args.ray_rounds)),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.goals:
            plan = cls.goals_plan(args)
            if args.smoke:  # a few requests of each goal phase (the test)
                plan.warm_warmup, plan.warm_requests = 2, 6
                plan.loaded_requests, plan.batched_requests = 8, 16
            return plan
        if args.smoke:
            return cls.smoke(args)
        quick = args.quick
        return cls(
            families=args.families,
            systems=args.systems,
            copies=args.copies or (6 if quick else 12),
            capacity=args.capacity or (3 if quick else 4),
            concurrency=args.concurrency,
            zipf_s=args.zipf_s,
            seed=args.seed,
            warm_warmup=10 if quick else 30,
            warm_requests=150 if quick else 300,
            loaded_requests=150 if quick else 1000,
            zipf_requests=200 if quick else 1500,
            phase_max_s=15.0 if quick else 60.0,
            rate_fractions=[0.5, 1.0] if quick else [0.25, 0.5, 0.75, 1.0, 1.25],
            rate_duration_s=3.0 if quick else 10.0,
            open_max_outstanding=64,
            open_grace_s=5.0 if quick else 15.0,
            start_timeout_s=240.0,
            models_dir=str(args.models_dir),
            out_dir=str(args.out),
            profile=args.profile,
            host_tier=args.host_tier,
            torch_threads=args.torch_threads,
        )

    @classmethod
    def smoke(cls, args: argparse.Namespace) -> Plan:
        """A few requests per phase: does each system start, answer and stop (a test)."""
        return cls(
            families=args.families,
            systems=args.systems,
            copies=args.copies or 3,
            capacity=args.capacity or 2,
            concurrency=2,
            zipf_s=args.zipf_s,
            seed=args.seed,
            warm_warmup=2,
            warm_requests=6,
            loaded_requests=6,
            zipf_requests=8,
            phase_max_s=20.0,
            rate_fractions=[0.5],
            rate_duration_s=1.0,
            open_max_outstanding=16,
            open_grace_s=5.0,
            start_timeout_s=240.0,
            models_dir=str(args.models_dir),
            out_dir=str(args.out),
            host_tier=args.host_tier,
            torch_threads=args.torch_threads,
        )


# --- the worker: one system, inside its network namespace -----------------------------------------


def _summary(result: Any) -> dict[str, Any]:
    summary = workload.summarize(result.ok_latencies, errors=result.errors, wall_s=result.wall_s)
    out = summary.to_dict()
    if result.first_errors:
        out["first_errors"] = result.first_errors
    return out


async def _verified(client: Any, make: Any, model: str, expected: dict[str, Any]) -> bool:
    """Whether ``model`` answers the scenario's sample with the model's own outputs."""
    import numpy as np
    import wire

    url, headers, body = make(model)
    response = await client.post(url, headers=headers, content=body)
    if response.status_code != 200:
        return False
    got = wire.decode(response.content, response.headers.get(wire.HEADER_LENGTH), key="outputs")
    return all(
        np.allclose(got[name], want, rtol=1e-4, atol=1e-5) for name, want in expected.items()
    )


async def _run_goal_phases(system: Any, scenario: Any, plan: Plan, profiler: Any) -> dict[str, Any]:
    """Issue #17's goals: the copy with batching off (warm p50, 1 client; then N clients) and
    the copy with dynamic batching on (N clients), both loaded and warmed up first."""
    from loadgen import closed_loop, new_client, tree_cpu_by_process, tree_cpu_s
    from scenario import reference_outputs

    make = system.request_factory()
    plain = next(m for m in scenario.models if m not in scenario.batched)
    batched = scenario.batched[0]
    figures: dict[str, Any] = {"plain_model": plain, "batched_model": batched}
    expected = reference_outputs(scenario)
    async with new_client(connections=plan.concurrency + 8, timeout_s=120.0) as client:
        figures["verified"] = all(
            [await _verified(client, make, m, expected) for m in (plain, batched)]
        )
        for model, concurrency in ((plain, 1), (batched, plan.concurrency)):
            await closed_loop(
                client, make, [model] * plan.warm_warmup, concurrency=concurrency, max_seconds=30
            )
        cpu_before = tree_cpu_s(system.server.pid)
        warm_before_by_process = tree_cpu_by_process(system.server.pid)
        with profiler("warm"):
            warm = await closed_loop(
                client,
                make,
                [plain] * plan.warm_requests,
                concurrency=1,
                max_seconds=plan.phase_max_s,
            )
        figures["warm"] = _summary(warm)
        figures["warm"]["server_cpu_ms_per_request"] = round(
            1000 * (tree_cpu_s(system.server.pid) - cpu_before) / max(1, len(warm.samples)), 3
        )
        figures["warm"]["cpu_us_per_request"] = _cpu_split(  # which server process spent it
            tree_cpu_by_process(system.server.pid),
            warm_before_by_process,
            client_s=warm.client_cpu_s,
            requests=max(1, len(warm.samples)),
        )
        with profiler("warm-loaded"):
            loaded = await closed_loop(
                client,
                make,
                [plain] * plan.loaded_requests,
                concurrency=plan.concurrency,
                max_seconds=plan.phase_max_s,
            )
        figures["loaded"] = _summary(loaded)
        executions_before = system.executions(batched)
        cpu_before_by_process = tree_cpu_by_process(system.server.pid)
        with profiler("batched"):
            batched_result = await closed_loop(
                client,
                make,
                [batched] * plan.batched_requests,
                concurrency=plan.concurrency,
                max_seconds=plan.phase_max_s,
            )
        figures["batched"] = _summary(batched_result)
        answered = max(1, len(batched_result.samples))
        figures["batched"]["cpu_us_per_request"] = _cpu_split(
            tree_cpu_by_process(system.server.pid),
            cpu_before_by_process,
            client_s=batched_result.client_cpu_s,
            requests=answered,
        )
        figures["batched"]["executions_by_batch_size"] = _executions(
            batched_result.samples, system.executions(batched), executions_before
        )
    return figures


def _cpu_split(
    after: dict[str, float], before: dict[str, float], *, client_s: float, requests: int
) -> dict[str, float]:
    """CPU µs per request of the load generator and of each process of the system's tree."""
    split = {"client (load generator)": client_s}
    split.update({label: s - before.get(label, 0.0) for label, s in after.items()})
    return {label: round(1e6 * s / requests, 1) for label, s in split.items()}


def _executions(
    samples: list[Any], after: dict[int, int] | None, before: dict[int, int] | None
) -> dict[str, int] | None:
    """Forward passes per batch size during a phase: the system's own count where it keeps one
    (Triton's statistics), else from each answer's batch size (gpufaas: a pass of size b
    answered b requests); None where neither is known (Ray Serve)."""
    if after is not None:
        before = before or {}
        counts = {size: n - before.get(size, 0) for size, n in after.items()}
    else:
        sizes = [s.batch_size for s in samples if s.ok and s.batch_size]
        if not sizes:
            return None
        answers: dict[int, int] = {}
        for size in sizes:
            answers[size] = answers.get(size, 0) + 1
        counts = {size: round(n / size) for size, n in answers.items()}
    return {str(size): n for size, n in sorted(counts.items()) if n > 0}


async def _run_phases(system: Any, scenario: Any, plan: Plan, profiler: Any) -> dict[str, Any]:
    from loadgen import closed_loop, new_client, open_loop, tree_cpu_s
    from scenario import reference_outputs

    if plan.goals:
        return await _run_goal_phases(system, scenario, plan, profiler)
    make = system.request_factory()
    models = scenario.models
    hot = models[: scenario.capacity]  # loaded last by the cold phase: resident everywhere
    figures: dict[str, Any] = {}
    async with new_client(connections=plan.concurrency + 8, timeout_s=120.0) as client:
        # 1. cold: least popular first, so the C most popular are resident afterwards.
        with profiler("cold"):
            cold = await closed_loop(
                client, make, list(reversed(models)), concurrency=1, max_seconds=600
            )
        figures["cold"] = _summary(cold)
        figures["cold_each_ms"] = [round(s.latency_s * 1000, 2) for s in cold.samples]

        # correctness, on a resident model
        figures["verified"] = await _verified(client, make, hot[0], reference_outputs(scenario))

        # 2. warm: the hot set, round robin; 1 client, then N clients
        def round_robin(count: int) -> list[str]:
            return [hot[i % len(hot)] for i in range(count)]

        await closed_loop(
            client, make, round_robin(plan.warm_warmup), concurrency=1, max_seconds=30
        )
        pid = system.server.pid
        cpu_before = tree_cpu_s(pid)
        with profiler("warm"):
            warm = await closed_loop(
                client,
                make,
                round_robin(plan.warm_requests),
                concurrency=1,
                max_seconds=plan.phase_max_s,
            )
        figures["warm"] = _summary(warm)
        # server CPU per request: where a system spends its cycles, whatever the latency
        cpu_after = tree_cpu_s(pid)
        figures["warm"]["server_cpu_ms_per_request"] = round(
            1000 * (cpu_after - cpu_before) / max(1, len(warm.samples)), 3
        )
        with profiler("warm-loaded"):
            loaded = await closed_loop(
                client,
                make,
                round_robin(plan.loaded_requests),
                concurrency=plan.concurrency,
                max_seconds=plan.phase_max_s,
            )
        figures["loaded"] = _summary(loaded)

        # 3. Zipf mix, closed loop
        sequence = workload.zipf_sequence(
            models, count=plan.zipf_requests, s=plan.zipf_s, seed=plan.seed
        )
        with profiler("zipf"):
            zipf = await closed_loop(
                client, make, sequence, concurrency=plan.concurrency, max_seconds=plan.phase_max_s
            )
        figures["zipf"] = _summary(zipf)

        # 4. Zipf mix, open loop at fixed rates
        rates = plan.rates.get(scenario.family)
        if not rates:
            base = figures["zipf"]["throughput_rps"] or 1.0
            rates = [round(max(1.0, f * base), 1) for f in plan.rate_fractions]
        open_results = []
        for i, rate in enumerate(rates):
            count = int(rate * plan.rate_duration_s * 1.5) + 10
            arrivals = workload.poisson_arrivals(
                rate=rate, count=count, duration_s=plan.rate_duration_s, seed=plan.seed + 1 + i
            )
            sequence = workload.zipf_sequence(
                models, count=len(arrivals), s=plan.zipf_s, seed=plan.seed + 101 + i
            )
            result = await open_loop(
                client,
                make,
                sequence,
                arrivals,
                max_outstanding=plan.open_max_outstanding,
                grace_s=plan.open_grace_s,
            )
            summary = _summary(result)
            summary.update(
                offered_rps=rate,
                sent=len(arrivals) - result.dropped,
                dropped=result.dropped,
                timeouts=result.timeouts,
            )
            open_results.append(summary)
        figures["open_loop"] = open_results
        figures["rates"] = rates
    return figures


class _Profiler:
    """py-spy over the system's process tree during named phases (``--profile``)."""

    def __init__(self, *, enabled: bool, pid: int, out: Path, label: str) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # the virtualenv's, if not on PATH
        self.py_spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        self.enabled = enabled and self.py_spy is not None
        self.pid = pid
        self.out = out
        self.label = label
        self.files: list[str] = []

    def __call__(self, phase: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def run() -> Any:
            if not self.enabled:
                yield
                return
            path = self.out / f"profile-{self.label}-{phase}.txt"
            proc = subprocess.Popen(
                [
                    self.py_spy or "py-spy", "record", "--pid", str(self.pid),
                    "--subprocesses", "--rate", "200", "--format", "raw", "--nonblocking",
                    "--output", str(path), "--duration", "600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # let it attach before the phase starts
            try:
                yield
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if path.exists():
                    self.files.append(str(path))

        return run()


def run_worker(system_name: str, plan: Plan, result_path: Path) -> int:
    import loadgen
    from scenario import prepare
    from systems import make_system, measure_gpufaas_footprint

    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"system": system_name, "families": {}}
    for family in plan.families:
        entry: dict[str, Any] = {}
        results["families"][family] = entry
        scenario = prepare(
            family,
            copies=plan.copies,
            capacity=plan.capacity,
            models_dir=Path(plan.models_dir),
            host_tier=plan.host_tier,
            torch_threads=plan.torch_threads,
            batched=1 if plan.goals else 0,
        )
        entry["model_bytes"] = scenario.model_bytes
        if plan.goals:
            # Every copy stays resident on every system: gpufaas gets a roomy device (the
            # probe's budget per copy), the peers room for every copy (capacity == copies).
            scenario.gpufaas_footprint = max(scenario.model_bytes * 8, 256 << 20)
        elif system_name == "gpufaas":
            with tempfile.TemporaryDirectory(prefix="peers-footprint-") as work:
                scenario.gpufaas_footprint = measure_gpufaas_footprint(
                    scenario, workdir=Path(work), timeout_s=plan.start_timeout_s
                )
            entry["gpufaas_footprint_bytes"] = scenario.gpufaas_footprint
            entry["gpufaas_device_memory_bytes"] = scenario.device_memory_bytes()
        with tempfile.TemporaryDirectory(prefix=f"peers-{system_name}-") as work:
            system = make_system(system_name, scenario, workdir=Path(work))
            try:
                entry["startup_s"] = round(system.start(timeout_s=plan.start_timeout_s), 2)
                assert system.server is not None
                profiler = _Profiler(
                    enabled=plan.profile,
                    pid=system.server.pid,
                    out=out,
                    label=f"{system_name}-{family}",
                )
                with loadgen.MemorySampler(system.server.pid) as memory:
                    entry.update(asyncio.run(_run_phases(system, scenario, plan, profiler)))
                    memory.sample()
                entry["peak_pss_mib"] = round(memory.peak_pss / 2**20, 1)
                entry["peak_rss_mib"] = round(memory.peak_rss / 2**20, 1)
                entry["peak_processes"] = memory.peak_processes
                entry["profiles"] = profiler.files
                if profiler.files:
                    from profile_summary import summarize

                    entry["profile_summaries"] = {
                        Path(f).name: summarize(Path(f), top=10) for f in profiler.files
                    }
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
                if system.server is not None:
                    entry["log_tail"] = system.server.log_tail()
            finally:
                entry["stop_s"] = round(system.stop(), 2)
                if system.server is not None:  # keep the server's own log with the results
                    shutil.copyfile(
                        system.server.log_path, out / f"server-{system_name}-{family}.log"
                    )
        print(f"[{system_name}] {family}: done", file=sys.stderr, flush=True)
    result_path.write_text(json.dumps(results, indent=1))
    return 0


# --- the orchestrator -------------------------------------------------------------------------------


def _worker_command(system: str, plan_path: Path, result_path: Path, *, netns: bool) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()),
        "--worker", system, "--plan", str(plan_path), "--result", str(result_path),
    ]  # fmt: skip
    if not netns:
        return command
    return ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *command]


def _run_worker_process(command: list[str], *, timeout_s: float, log: Path) -> int:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the worker's own session: only ours
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return 124


def _figures(entry: dict[str, Any]) -> dict[str, float | None]:
    def get(phase: str, key: str) -> float | None:
        value = entry.get(phase, {}).get(key) if isinstance(entry.get(phase), dict) else None
        return None if value is None else float(value)

    cold_each = entry.get("cold_each_ms") or []
    return {
        "throughput_rps": get("loaded", "throughput_rps"),
        "zipf_throughput_rps": get("zipf", "throughput_rps"),
        "warm_p50_ms": get("warm", "p50_ms"),
        "warm_p99_ms": get("warm", "p99_ms"),
        "loaded_p50_ms": get("loaded", "p50_ms"),
        "loaded_p99_ms": get("loaded", "p99_ms"),
        "cold_ms": round(statistics.median(cold_each), 2) if cold_each else None,
        "zipf_p50_ms": get("zipf", "p50_ms"),
        "zipf_p99_ms": get("zipf", "p99_ms"),
        "zipf_errors": get("zipf", "errors"),
        "server_cpu_ms": get("warm", "server_cpu_ms_per_request"),
        "batched_throughput_rps": get("batched", "throughput_rps"),
        "batched_p50_ms": get("batched", "p50_ms"),
        "peak_memory_mib": entry.get("peak_pss_mib"),
    }


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("torch", "ray", "nvidia-pytriton", "httpx", "numpy"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "versions": versions,
    }


def _measure(
    system: str, family: str, plan: Plan, *, tmp: Path, out: Path, netns: bool, round_index: int
) -> dict[str, Any]:
    """One system serving one family, in a worker process in its own network namespace."""
    label = f"{system}-{family}" + (f"-r{round_index + 1}" if plan.rounds > 1 else "")
    plan_path = tmp / f"plan-{label}.json"
    result_path = tmp / f"result-{label}.json"
    plan_path.write_text(json.dumps({**asdict(plan), "families": [family]}))
    print(f"run.py: measuring {system} on {family} ...", file=sys.stderr, flush=True)
    log = out / f"worker-{label}.log"
    code = _run_worker_process(
        _worker_command(system, plan_path, result_path, netns=netns),
        timeout_s=max(600.0, 8 * plan.phase_max_s + 20 * plan.rate_duration_s + 300),
        log=log,
    )
    if result_path.exists():
        entry: dict[str, Any] = json.loads(result_path.read_text())["families"][family]
        return entry
    return {"error": f"worker exit {code}", "log_tail": log.read_text(errors="replace")[-3000:]}


def round_order(
    systems: list[str],
    round_index: int,
    *,
    family_index: int = 0,
    rounds: int = 1,
    ray_rounds: int = 1,
) -> list[str]:
    """The systems one round measures on one family, in order.

    The order is reversed every other round and family, so no system always goes first or
    always follows the same one, and a disturbance of the machine that lasts a minute hits
    different systems in different rounds. Ray Serve runs only in its ``ray_rounds``, the
    middle ones: its start and stop take ~20 s, and its figures are 4-10x from the goals'
    bounds, where the PyTriton ones are within run-to-run noise."""
    order = list(systems) if (round_index + family_index) % 2 == 0 else list(reversed(systems))
    first_ray = (rounds - ray_rounds) // 2
    if not first_ray <= round_index < first_ray + ray_rounds:
        order = [s for s in order if s != "ray"]
    return order


def schedule(plan: Plan) -> list[tuple[int, str, str]]:
    """(round, family, system) in the order they run: family by family, every system in turn
    (each comparison taken within minutes), and with ``--rounds`` that many times over."""
    if not plan.goals:
        return [(0, family, system) for family in plan.families for system in plan.systems]
    return [
        (r, family, system)
        for r in range(plan.rounds)
        for k, family in enumerate(plan.families)
        for system in round_order(
            plan.systems, r, family_index=k, rounds=plan.rounds, ray_rounds=plan.ray_rounds
        )
    ]


def _family_report(plan: Plan, report: dict[str, Any], family: str) -> dict[str, Any]:
    """One family's figures (the median of its rounds), ratios, table and goals."""
    per_round = {
        system: [_figures(e) for e in report["systems"][system]["rounds"].get(family, [])]
        for system in plan.systems
    }
    figures = {
        system: {key: workload.median([r[key] for r in runs]) for key in _figures({})}
        for system, runs in per_round.items()
    }
    if "gpufaas" not in figures:
        return {"figures": figures, "ratios": {}, "table": "", "goals": []}
    rows = workload.ratio_table(figures, rounds=per_round if plan.rounds > 1 else None)
    return {
        "figures": figures,
        "ratios": {row["figure"]: row["ratios"] for row in rows},
        "spread": {
            system: {row["figure"]: row["spread"][system] for row in rows} for system in figures
        }
        if plan.rounds > 1
        else {},
        "table": workload.format_table(rows),
        "goals": [g.to_dict() for g in workload.check_goals(rows)],
    }


def orchestrate(args: argparse.Namespace) -> int:
    plan = Plan.from_args(args)
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    netns = not args.no_netns
    if not netns and "ray" in plan.systems:
        print("run.py: Ray Serve runs only inside a private network namespace", file=sys.stderr)
        return 2
    if netns and shutil.which("unshare") is None:
        print("run.py: 'unshare' is missing; it isolates the systems' ports", file=sys.stderr)
        return 2

    import gpufaas.scheduler
    from gpufaas.core.examples import build_examples

    # The peers' interpreter may have another checkout's gpufaas installed (an editable
    # install of the main tree, say): say which code was measured.
    source = Path(gpufaas.scheduler.__file__).resolve().parent.parent
    if source != ROOT:
        print(f"run.py: measuring the gpufaas of {source}, not of {ROOT}", file=sys.stderr)
    build_examples(Path(plan.models_dir), names=plan.families, progress=False)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/peers/run.py", *sys.argv[1:]]),
        "machine": _machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "gpufaas_source": str(source),
        "plan": asdict(plan),
        "systems": {},
    }
    report["systems"] = {
        system: {"system": system, "families": {}, "rounds": {}} for system in plan.systems
    }
    with tempfile.TemporaryDirectory(prefix="peers-run-") as tmp:
        for round_index, family, system in schedule(plan):
            began = datetime.now(UTC)
            entry = _measure(
                system, family, plan, tmp=Path(tmp), out=out, netns=netns, round_index=round_index
            )
            entry.update(round=round_index + 1, began=began.strftime("%H:%M:%S"),
                         load_average=round(os.getloadavg()[0], 2))  # fmt: skip
            report["systems"][system]["families"][family] = entry  # its last round's
            report["systems"][system]["rounds"].setdefault(family, []).append(entry)
            if system == "gpufaas" and entry.get("rates") and family not in plan.rates:
                plan.rates[family] = entry["rates"]  # the same offered rates for the peers
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    report["families"] = {family: _family_report(plan, report, family) for family in plan.families}
    (out / "peers-results.json").write_text(json.dumps(report, indent=1))
    try:
        from plot import plot_report

        png = plot_report(report, out / "peers.png")
        report["png"] = str(png)
        if args.png:
            shutil.copyfile(png, args.png)
            report["png"] = str(args.png)
    except Exception as e:  # a missing plot never loses the figures
        report["png_error"] = f"{type(e).__name__}: {e}"
    report["goal_table"] = workload.goal_table(report["families"]) if plan.goals else ""
    text = _text_report(report)
    markdown = _markdown_section(report)
    (out / "RESULTS-peers.md").write_text(markdown)
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(_json_view(report), indent=1))
    else:
        print(text)
    return 0


def _json_view(report: dict[str, Any]) -> dict[str, Any]:
    """What ``--json`` prints: each system's figures and the ratios, per family."""
    return {
        "date": report["date"],
        "command": report["command"],
        "machine": report["machine"],
        "load_average": [report["load_average_before"], report["load_average_after"]],
        "families": {
            family: {
                "figures": data["figures"],
                "ratios": data["ratios"],
                "goals": data["goals"],
            }
            for family, data in report["families"].items()
        },
        "open_loop": {
            system: {
                family: entry.get("open_loop")
                for family, entry in result.get("families", {}).items()
            }
            for system, result in report["systems"].items()
        },
        "errors": {
            f"{system}/{family}": entry["error"]
            for system, result in report["systems"].items()
            for family, entry in result.get("families", {}).items()
            if entry.get("error")
        },
        "png": report.get("png"),
        "goal_table": report.get("goal_table") or None,
    }


def _k_of_c_goals(goals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals a K-of-C run reports: all but #17's batched ones, which only --goals measures."""
    return [g for g in goals if not (g["name"] in workload.GOALS_17 and g["met"] is None)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _markdown_section(report: dict[str, Any]) -> str:
    """The ``## Peers`` section for bench/RESULTS.md (tables, goals, conditions)."""
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    plan = report["plan"]
    title = "## Peers: issue #17 goals" if plan.get("goals") else "## Peers"
    lines = [
        title,
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}, Python {machine['python']}; {versions}",
        f"- gpufaas measured: the code in `{report.get('gpufaas_source', '?')}`",
        f"- load average (1/5/15 min) before: {report['load_average_before']}, "
        f"after: {report['load_average_after']} (the machine is shared)",
        f"- workload: K={plan['copies']} copies per family, room for C={plan['capacity']}, "
        f"N={plan['concurrency']} closed-loop clients, Zipf s={plan['zipf_s']}, "
        f"seed {plan['seed']}; wall time {report['wall_s']} s",
    ]
    if plan.get("goals"):
        rounds = plan.get("rounds", 1)
        lines[-1] = (
            f"- workload: 2 copies per family, both resident everywhere, one with batching off "
            f"(warm: 1 client, {plan['warm_requests']} requests; N={plan['concurrency']} clients, "
            f"{plan['loaded_requests']}), one with each system's dynamic batching on "
            f"(N={plan['concurrency']} clients, {plan['batched_requests']} requests)"
            + (
                f"; each {rounds} times, every system restarted each round, in alternating "
                f"order (Ray Serve in {plan.get('ray_rounds', 1)} of them); a figure is the "
                f"median of its rounds, (low-high) its range, a ratio's range that of the "
                f"ratios of the same round"
                if rounds > 1
                else ""
            )
            + f"; wall time {report['wall_s']} s"
        )
    if report.get("goal_table"):
        lines += ["", report["goal_table"]]
    for family, data in report["families"].items():
        lines += ["", f"### {family}", "", data["table"], ""]
        if plan.get("goals"):
            lines += _rounds_table(report, family)
        for goal in [] if plan.get("goals") else _k_of_c_goals(data["goals"]):
            mark = {True: "met", False: "**missed**", None: "n/a"}[goal["met"]]
            lines.append(f"- {goal['name']}: {mark} (gpufaas/{goal['peer']} = {goal['ratio']})")
        for system, result in report["systems"].items():
            entry = result.get("families", {}).get(family, {})
            if entry.get("error"):
                lines.append(f"- {system} failed: {entry['error'].splitlines()[0]}")
            rates = [
                f"{p['offered_rps']:g}/s: p99 {_ms(p['p99_ms'])}, {p['errors']}/"
                f"{p['count'] + p['errors']} failed"
                for p in entry.get("open_loop") or []
            ]
            if rates:
                lines.append(f"- {system}, open loop: " + "; ".join(rates))
    return "\n".join(lines) + "\n"


def _rounds_table(report: dict[str, Any], family: str) -> list[str]:
    """Each round of each system on one family, in the order they ran: when, the load, the
    goal figures, and in the batched phase the forward passes per batch size and the CPU per
    request of the load generator and each of the system's processes."""
    runs = sorted(
        (entry.get("began", ""), system, entry)
        for system, result in report["systems"].items()
        for entry in result.get("rounds", {}).get(family, [])
    )
    lines = [
        "| round | system | began (UTC) | load | warm p50 ms | batched req/s | passes per batch size"
        " (batched) | CPU µs per request (batched) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for began, system, entry in runs:
        batched = entry.get("batched", {})
        passes = batched.get("executions_by_batch_size")
        cpu = batched.get("cpu_us_per_request") or {}
        lines.append(
            f"| {entry.get('round', 1)} | {system} | {began} | {entry.get('load_average', '-')}"
            f" | {workload.cell(entry.get('warm', {}).get('p50_ms'))}"
            f" | {workload.cell(batched.get('throughput_rps'))}"
            f" | {' '.join(f'{k}:{v}' for k, v in passes.items()) if passes else '-'}"
            f" | {', '.join(f'{k} {v:.0f}' for k, v in cpu.items() if v >= 1) or '-'} |"
        )
    return [*lines, ""]


def _text_report(report: dict[str, Any]) -> str:
    lines = [
        f"gpufaas vs peers, {report['date']}, {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores), load {report['load_average_before']}",
    ]
    for family, data in report["families"].items():
        lines += ["", f"## {family}", "", data["table"], ""]
        for goal in [] if report["plan"].get("goals") else _k_of_c_goals(data["goals"]):
            mark = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
            lines.append(f"- {goal['name']}: {mark} (ratio {goal['ratio']})")
    if report.get("goal_table"):
        lines += ["", "## issue #17 goals", "", report["goal_table"]]
    for system, result in report["systems"].items():
        for family, entry in result.get("families", {}).items():
            if entry.get("error"):
                lines.append(f"! {system}/{family}: {entry['error']}")
            elif entry.get("verified") is False:
                lines.append(f"! {system}/{family}: outputs did not match the model")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--smoke", action="store_true", help="a few requests per phase (tests)")
    parser.add_argument(
        "--goals",
        action="store_true",
        help="issue #17's goal table: warm p50 (1 client), N-client throughput with batching on",
    )
    parser.add_argument(
        "--host-tier",
        action="store_true",
        help="gpufaas keeps its host tier (all K copies in RAM); the peers get room for K",
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="every system's torch")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--systems",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(SYSTEM_ORDER),
        help="comma-separated, gpufaas first (its Zipf throughput sets the open-loop rates)",
    )
    parser.add_argument(
        "--families",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help=f"comma-separated (default: {','.join(FAMILIES)}; with --quick: tiny-mlp,minilm)",
    )
    parser.add_argument("--copies", type=int, default=0, help="models per family (K)")
    parser.add_argument("--capacity", type=int, default=0, help="models that fit at once (C)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--goals: rounds per system in alternating order, the requests shared out over "
        "them; figures are the medians, with each round's range",
    )
    parser.add_argument(
        "--ray-rounds", type=int, default=1, help="--goals: of those rounds, Ray Serve's"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (N)")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="py-spy the systems' processes")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "out" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "peers")
    parser.add_argument("--png", type=Path, default=None, help="also copy the plot here")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the RESULTS.md section here"
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="run without unshare (not for Ray Serve)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        plan = Plan(**json.loads(args.plan.read_text()))
        return run_worker(args.worker, plan, args.result)
    if args.families is None:
        if args.goals:
            args.families = ["tiny-mlp", "small-cnn"]
        else:
            args.families = ["tiny-mlp", "minilm"] if args.quick else list(FAMILIES)
    unknown = [s for s in args.systems if s not in SYSTEM_ORDER]
    unknown += [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown system or family: {', '.join(unknown)}")
    args.systems = [s for s in SYSTEM_ORDER if s in args.systems]
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
