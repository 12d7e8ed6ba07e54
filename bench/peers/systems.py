"""Starting, addressing and stopping each system under test.

Each system runs as a child process of the load generator's worker (inside that
worker's private network namespace), bound to 127.0.0.1, serving one
:class:`~scenario.Scenario`:

* ``gpufaas``: ``python -m gpufaas.core.cli up`` (local mode: gateway + one GPU manager
  with one CPU device whose byte budget holds exactly C copies);
* ``ray``: ``ray_app.py`` (Ray Serve, ``@serve.multiplexed(max_num_models_per_replica=C)``);
* ``triton``: ``triton_app.py`` (PyTriton, one shared LRU of C modules).

All three get the same request bytes (``wire.py``) at ``/v2/models/<name>/infer``; Ray
also gets the ``serve_multiplexed_model_id`` header its router needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped, unused-ignore]  # no stubs installed
import wire
from loadgen import RequestFactory, tree_pids
from scenario import Scenario, write_manifests

HERE = Path(__file__).resolve().parent
SYSTEMS = ("gpufaas", "ray", "triton")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """A system's process tree, stopped by signal and then, if need be, by pid."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log: Path) -> None:
        self.argv = argv
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.known_pids: set[int] = {self.proc.pid}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def remember_children(self) -> None:
        self.known_pids.update(tree_pids(self.proc.pid))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, timeout_s: float) -> float:
        """SIGINT, then wait; anything of ours still running after ``timeout_s`` is killed."""
        self.remember_children()
        started = time.monotonic()
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        for pid in sorted(self.known_pids - {self.proc.pid}):
            try:
                child = psutil.Process(pid)
                child.terminate()
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        self._log.close()
        return time.monotonic() - started


class System:
    """One system serving one scenario; subclasses say how to start and address it."""

    name = ""
    stop_timeout_s = 60.0

    def __init__(self, scenario: Scenario, *, workdir: Path) -> None:
        self.scenario = scenario
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server: ServerProcess | None = None
        body, headers = wire.encode_request(scenario.sample, outputs=scenario.output_names)
        self.body = body
        self.headers = headers

    # -- to override --

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self, client: httpx.Client) -> bool:
        raise NotImplementedError

    def extra_headers(self, model: str) -> dict[str, str]:
        return {}

    def executions(self, model: str) -> dict[int, int] | None:
        """Forward passes run so far for ``model``, per batch size; None where the system does
        not say (gpufaas says it per answer instead, in ``loadgen.BATCH_SIZE_HEADER``)."""
        return None

    # -- common --

    def request_factory(self) -> RequestFactory:
        urls = {m: f"{self.base}/v2/models/{m}/infer" for m in self.scenario.models}
        headers = {m: {**self.headers, **self.extra_headers(m)} for m in self.scenario.models}
        body = self.body

        def make(model: str) -> tuple[str, dict[str, str], bytes]:
            return urls[model], headers[model], body

        return make

    def start(self, *, timeout_s: float) -> float:
        """Start the server and wait until it is ready; returns seconds taken."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv, env = self.command()
        started = time.monotonic()
        self.server = ServerProcess(argv, env=env, log=self.workdir / f"{self.name}.log")
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if not self.server.alive():
                    raise RuntimeError(
                        f"{self.name} exited during start-up (code {self.server.proc.returncode}):"
                        f"\n{self.server.log_tail()}"
                    )
                try:
                    if self.ready(client):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > timeout_s:
                    self.stop()
                    raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f} s")
                time.sleep(0.25)
        self.server.remember_children()
        return time.monotonic() - started

    def stop(self) -> float:
        if self.server is None:
            return 0.0
        return self.server.stop(timeout_s=self.stop_timeout_s)


def _threads(scenario: Scenario) -> dict[str, str]:
    """The same intra-op thread count for every system's torch and its OpenMP/MKL pools
    (gpufaas's GPU manager also calls ``torch.set_num_threads(1)``; the peer apps call it with
    ``--torch-threads``)."""
    n = str(scenario.torch_threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Gpufaas(System):
    name = "gpufaas"

    def command(self) -> tuple[list[str], dict[str, str]]:
        manifests = write_manifests(self.scenario, self.workdir / "functions")
        home = self.workdir / "home"
        argv = [
            sys.executable, "-m", "gpufaas.core.cli", "up",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--grpc-port", str(free_port()),
            "--functions", str(manifests),
            "--nodes", "1", "--cpu-devices", "1",
            "--device-memory", str(self.scenario.device_memory_bytes()),
            "--artifact-dir", str(home / "artifacts"),
        ]  # fmt: skip
        if not self.scenario.host_tier:  # equal capacity: C copies, no RAM tier behind them
            argv += ["--host-memory", "1Ki"]
        return argv, _env(GPUFAAS_HOME=str(home), **_threads(self.scenario))

    def ready(self, client: httpx.Client) -> bool:
        return client.get(f"{self.base}/v2/health/ready").status_code == 200


class _PeerApp(System):
    script = ""

    def command(self) -> tuple[list[str], dict[str, str]]:
        specs = self.workdir / "specs.json"
        specs.write_text(json.dumps(self.scenario.specs()))
        self.ready_file = self.workdir / "ready"
        self.ready_file.unlink(missing_ok=True)
        argv = [
            sys.executable, str(HERE / self.script),
            "--specs", str(specs), "--port", str(self.port),
            "--capacity", str(self.scenario.peer_capacity), "--ready-file", str(self.ready_file),
            "--torch-threads", str(self.scenario.torch_threads),
        ]  # fmt: skip
        return argv, self.env()

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
        return _env(PYTHONPATH=path, **_threads(self.scenario))

    def ready(self, client: httpx.Client) -> bool:
        return self.ready_file.exists()


class RayServe(_PeerApp):
    name = "ray"
    script = "ray_app.py"

    def env(self) -> dict[str, str]:
        return {**super().env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}

    def extra_headers(self, model: str) -> dict[str, str]:
        return {"serve_multiplexed_model_id": model}


class PyTriton(_PeerApp):
    name = "triton"
    script = "triton_app.py"

    def env(self) -> dict[str, str]:
        env = super().env()
        lib = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def ready(self, client: httpx.Client) -> bool:
        if not self.ready_file.exists():
            return False
        return client.get(f"{self.base}/v2/health/ready").status_code == 200

    def executions(self, model: str) -> dict[int, int] | None:
        """Triton's statistics extension: executions per batch size (``batch_stats``), with
        the access token PyTriton restricts it to (``triton_app.py`` writes it down)."""
        token = self.ready_file.with_suffix(".token").read_text().strip()
        headers = {"triton-access-token": token} if token else {}
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            reply = client.get(f"{self.base}/v2/models/{model}/stats", headers=headers)
        if reply.status_code != 200:
            return None
        stats = reply.json().get("model_stats") or [{}]
        return {
            int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats[0].get("batch_stats", [])
        }


def measure_gpufaas_footprint(scenario: Scenario, *, workdir: Path, timeout_s: float) -> int:
    """Bytes gpufaas charges a device for one copy (weights arena + activation reserve).

    Starts gpufaas with a roomy device, loads one copy through the repository API and
    reads the size its cluster view reports; a separate home, so nothing of this start
    (artifact cache, sidecars) is left for the measured one.
    """
    probe = Scenario(**{**scenario.__dict__, "models": scenario.models[:1]})
    probe.gpufaas_footprint = max(scenario.model_bytes * 8, 256 << 20) // probe.capacity
    system = Gpufaas(probe, workdir=workdir)
    try:
        system.start(timeout_s=timeout_s)
        model = probe.models[0]
        with httpx.Client(timeout=120.0, trust_env=False) as client:
            client.post(f"{system.base}/v2/repository/models/{model}/load").raise_for_status()
            cluster = client.get(f"{system.base}/v2/gpufaas/cluster").raise_for_status().json()
    finally:
        system.stop()
    sizes = [
        int(resident[2])
        for device in cluster.get("devices", [])
        for resident in device.get("residents", [])
        if resident[0] == model
    ]
    if not sizes:
        raise RuntimeError(f"gpufaas did not report {model} as resident after loading it")
    return max(sizes)


def make_system(name: str, scenario: Scenario, *, workdir: Path) -> System:
    classes: dict[str, type[System]] = {"gpufaas": Gpufaas, "ray": RayServe, "triton": PyTriton}
    if name not in classes:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(classes)}")
    return classes[name](scenario, workdir=workdir)
