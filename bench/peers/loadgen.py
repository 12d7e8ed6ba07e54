"""Load drivers and the memory sampler: the I/O half of the peer benchmark.

* :func:`closed_loop`: ``concurrency`` clients, each sending its next request as soon as
  the previous one returns, until ``count`` requests or ``max_seconds``.
* :func:`open_loop`: requests sent at given times (a Poisson schedule from
  ``workload.poisson_arrivals``) whether or not earlier ones returned; latency counts
  from the scheduled time, so a server that falls behind is charged for the wait.
  At most ``max_outstanding`` requests are in flight (more are counted as dropped), and
  requests still running ``grace_s`` after the last send are cancelled (timeouts).
* :func:`quiet_gc`: the load generator's own garbage collector stays out of the way.
* :class:`MemorySampler`: peak proportional set size (PSS, from ``smaps_rollup``) and RSS
  summed over a process and all its descendants, sampled on a thread.

Every target is on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped, unused-ignore]  # no stubs installed

# (url, headers, body) for a model name
RequestFactory = Callable[[str], tuple[str, dict[str, str], bytes]]


# gpufaas's answer header: how many requests shared the forward pass that answered this one
BATCH_SIZE_HEADER = "x-gpufaas-batch-size"


@dataclass
class Sample:
    model: str
    latency_s: float
    ok: bool
    status: int
    batch_size: int | None = None  # from BATCH_SIZE_HEADER, where the system sends it


@dataclass
class PhaseResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    dropped: int = 0
    timeouts: int = 0
    client_cpu_s: float = 0.0  # the load generator's CPU while it ran (its collector paused)
    first_errors: list[str] = field(default_factory=list)

    @property
    def ok_latencies(self) -> list[float]:
        return [s.latency_s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not s.ok) + self.dropped + self.timeouts


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No collector pauses in the load generator during a phase (a full collection of a
    heap with torch imported takes ~100-200 ms here, which would be charged to the
    system under test). A phase is bounded, so the garbage it leaves is bounded too."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def new_client(*, connections: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=timeout_s, trust_env=False)


async def _send(
    client: httpx.AsyncClient,
    make_request: RequestFactory,
    model: str,
    started: float,
    result: PhaseResult,
) -> None:
    url, headers, body = make_request(model)
    status = 0
    batch_size = None
    try:
        response = await client.post(url, headers=headers, content=body)
        status = response.status_code
        ok = status == 200
        shared = response.headers.get(BATCH_SIZE_HEADER)
        batch_size = int(shared) if shared is not None and shared.isdigit() else None
        if not ok and len(result.first_errors) < 5:
            result.first_errors.append(f"{model}: HTTP {status}: {response.text[:200]}")
    except httpx.HTTPError as e:
        ok = False
        if len(result.first_errors) < 5:
            result.first_errors.append(f"{model}: {type(e).__name__}: {e}")
    result.samples.append(Sample(model, time.perf_counter() - started, ok, status, batch_size))


async def closed_loop(
    client: httpx.AsyncClient,
    make_request: RequestFactory,
    models: Sequence[str],
    *,
    concurrency: int,
    max_seconds: float,
) -> PhaseResult:
    """Send ``models[i]`` for each i in order with ``concurrency`` clients; bounded in time."""
    result = PhaseResult()
    next_index = 0
    deadline = time.perf_counter() + max_seconds

    async def client_loop() -> None:
        nonlocal next_index
        while next_index < len(models) and time.perf_counter() < deadline:
            model = models[next_index]
            next_index += 1
            await _send(client, make_request, model, time.perf_counter(), result)

    with quiet_gc():
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop() for _ in range(max(1, concurrency))))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
    return result


async def open_loop(
    client: httpx.AsyncClient,
    make_request: RequestFactory,
    models: Sequence[str],
    arrivals: Sequence[float],
    *,
    max_outstanding: int,
    grace_s: float,
) -> PhaseResult:
    """Send ``models[i]`` at ``arrivals[i]`` seconds from now, whatever is in flight."""
    if len(models) < len(arrivals):
        raise ValueError("open_loop: fewer models than arrivals")
    with quiet_gc():
        return await _open_loop(client, make_request, models, arrivals, max_outstanding, grace_s)


async def _open_loop(
    client: httpx.AsyncClient,
    make_request: RequestFactory,
    models: Sequence[str],
    arrivals: Sequence[float],
    max_outstanding: int,
    grace_s: float,
) -> PhaseResult:
    result = PhaseResult()
    in_flight: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    for model, offset in zip(models, arrivals, strict=False):
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_outstanding:
            result.dropped += 1
            continue
        task = asyncio.create_task(_send(client, make_request, model, started + offset, result))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=grace_s)
        result.timeouts = len(pending)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
    result.wall_s = time.perf_counter() - started
    return result


def _pss_and_rss(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes from ``/proc/PID/smaps_rollup``; (0, 0) if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


def tree_pids(root: int) -> list[int]:
    try:
        process = psutil.Process(root)
        return [root, *(c.pid for c in process.children(recursive=True))]
    except psutil.Error:
        return []


def process_label(process: psutil.Process) -> str:
    """A short name for one process of a system's tree: what it runs, not its pid."""
    try:
        command: list[str] = process.cmdline()
        name = process.name()
    except psutil.Error:
        return "?"
    if "-m" in command[:-1]:  # python -m gpufaas.core.cli up / python -m gpufaas.gpu_manager
        module, *rest = command[command.index("-m") + 1 :]
        return module + (f" {rest[0]}" if rest and not rest[0].startswith("-") else "")
    scripts = [Path(c).name for c in command[1:3] if c.endswith(".py")]
    return scripts[0] if scripts else name


def tree_cpu_by_process(root: int) -> dict[str, float]:
    """User + system CPU seconds so far of each live process of a tree, summed per label."""
    totals: dict[str, float] = {}
    for pid in tree_pids(root):
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
        except psutil.Error:
            continue
        label = process_label(process)
        totals[label] = totals.get(label, 0.0) + times.user + times.system
    return totals


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds used so far by a process and its live descendants."""
    return sum(tree_cpu_by_process(root).values())


class MemorySampler:
    """Peak PSS and RSS of a process tree, sampled every ``interval_s`` on a thread."""

    def __init__(self, root_pid: int, *, interval_s: float = 0.5) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak_pss = 0
        self.peak_rss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        pids = tree_pids(self.root_pid)
        totals = [_pss_and_rss(pid) for pid in pids]
        self.peak_pss = max(self.peak_pss, sum(p for p, _ in totals))
        self.peak_rss = max(self.peak_rss, sum(r for _, r in totals))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
