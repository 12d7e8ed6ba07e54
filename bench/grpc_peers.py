"""gRPC p50 over HTTP binary p50, on NVIDIA's Triton and on gpufaas, with the same clients.

Issue #17's goal "gRPC p50 <= HTTP binary p50" is measured with ``tritonclient.grpc`` against
``tritonclient.http`` (binary tensors), 1 client, warm. This bench puts the same question to the
peer: PyTriton runs the real ``tritonserver``, which serves HTTP and gRPC from its C++ front
ends, so Triton's own ratio with these clients on this machine says how much of the ratio
belongs to the clients rather than to a server.

Per family (tiny-mlp, small-cnn) and round, each system is started in turn with the models and
configuration ``bench/peers/run.py --goals`` gives it (two copies, both resident; copy ``-00``,
batching off, is the one called; 1 torch thread; PyTriton as ``bench/peers/triton_app.py``
binds it, here with a known gRPC port), warmed up, then called by one client in 8 blocks per
protocol that alternate, the order flipping every block. Per system and family: p50/p99 of each
protocol, the client's and the server tree's CPU per call, and gRPC p50 / HTTP p50.

    /work/helpers/bin/quiet-bench .venv/bin/python bench/grpc_peers.py --rounds 2

Each client configuration (``--clients``) runs in a process of its own, since grpc reads its
settings once: ``default`` is ``tritonclient`` as shipped; ``inline`` sets
``GRPC_EXPERIMENTS=-event_engine_client``, grpc's switch back to the client I/O it had before
its EventEngine, where the calling thread reads the answer itself instead of being handed it by
grpc's poller and worker threads (``docs/dataplane.md``, "gRPC", seventh pass). HTTP is called
in each process too, so every ratio compares blocks that alternated. ``--ladder`` adds, in the
``default`` process, the same call made with less client: ``grpc_stub`` (grpc's blocking stub,
the request serialized once, the answer not parsed), and ``http_raw`` / ``grpc_raw`` (raw
sockets doing the least either protocol needs: the serving side's latency alone).

PyTriton runs from ``--peers-python`` (default ``/work/peers-venv/bin/python``, a venv with
``nvidia-pytriton``); gpufaas and the clients from this interpreter. Servers bind 127.0.0.1 and
are stopped at the end; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

import grpc_common  # noqa: E402
from scenario import Scenario, prepare  # noqa: E402
from systems import Gpufaas, PyTriton  # noqa: E402

PEERS_PYTHON = "/work/peers-venv/bin/python"
# client configurations: the environment each client process adds
CLIENTS = {"default": {}, "inline": {"GRPC_EXPERIMENTS": "-event_engine_client"}}


class GpufaasBoth(Gpufaas):
    """``gpufaas up`` as ``bench/peers`` starts it, remembering its gRPC port."""

    grpc_port = 0

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command()
        self.grpc_port = int(argv[argv.index("--grpc-port") + 1])
        return argv, env


class TritonBoth(PyTriton):
    """PyTriton as ``bench/peers/triton_app.py`` binds it, with a gRPC port we know."""

    peers_python = PEERS_PYTHON
    grpc_port = 0

    def command(self) -> tuple[list[str], dict[str, str]]:
        specs = self.workdir / "specs.json"
        specs.write_text(json.dumps(self.scenario.specs()))
        self.ready_file = self.workdir / "ready"
        self.ready_file.unlink(missing_ok=True)
        self.grpc_port = grpc_common.free_port()
        argv = [
            self.peers_python, str(Path(__file__).resolve()), "--serve-triton",
            "--specs", str(specs), "--port", str(self.port), "--grpc-port", str(self.grpc_port),
            "--capacity", str(self.scenario.peer_capacity), "--ready-file", str(self.ready_file),
            "--torch-threads", str(self.scenario.torch_threads),
        ]  # fmt: skip
        return argv, self.env()


def serve_triton(args: argparse.Namespace) -> int:
    """Run PyTriton as ``triton_app.main`` does, the gRPC port given (under PyTriton's venv)."""
    import signal

    import torch
    import triton_app
    from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]

    specs = json.loads(args.specs.read_text())
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.torch_threads)
    cache = triton_app.SharedLRU(specs["models"], capacity=args.capacity)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=grpc_common.free_port(),
        allow_metrics=False,
        log_verbose=0,
    )
    stop = threading.Event()
    with Triton(config=config) as triton:
        for name, entry in specs["models"].items():
            triton.bind(**triton_app.binding(name, entry, cache, specs=specs))
        triton.run()
        args.ready_file.write_text("ready\n")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait(timeout=3600)  # bounded even if nobody stops us
    return 0


def measure(
    system: GpufaasBoth | TritonBoth, scenario: Scenario, args: argparse.Namespace, *, order: int
) -> dict[str, Any]:
    """Start ``system``, call its first copy over both protocols from each client
    configuration in turn (``order`` odd: reversed), stop it."""
    try:
        started = system.start(timeout_s=240)
        assert system.server is not None
        pids = grpc_common.tree(system.server.pid)
        spec = {
            "http": f"127.0.0.1:{system.port}",
            "grpc": f"127.0.0.1:{system.grpc_port}",
            "model": scenario.models[0],
            "family": scenario.family,
            "output": scenario.output_names[0],
            "pids": pids,
            "requests": args.requests,
            "warmup": args.warmup,
            "no_retries": args.no_retries,
        }
        senders, close = grpc_common.tritonclient_senders(_target(spec))
        try:
            for send in senders.values():  # loads the copy; both must answer before timing
                send()
        finally:
            close()
        out: dict[str, Any] = {"startup_s": round(started, 1)}
        out["settled_after_s"] = round(grpc_common.settled(pids, max_s=60), 1)
        configs = args.clients.split(",")
        for config in configs if order % 2 == 0 else configs[::-1]:
            run = {**spec, "ladder": args.ladder and config == "default"}
            prefix = "" if config == "default" else f"{config}_"
            out.update({prefix + k: v for k, v in _client_process(run, CLIENTS[config]).items()})
        return out
    finally:
        system.stop()


def _target(spec: dict[str, Any]) -> grpc_common.Target:
    from gpufaas.core.examples import example_inputs

    return grpc_common.Target(
        http=spec["http"],
        grpc=spec["grpc"],
        model=spec["model"],
        arrays=example_inputs(spec["family"], batch=1),
        output=spec["output"],
    )


def _client_process(spec: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """:func:`run_client` in a process of its own, with ``env`` added to its environment."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--client-run", json.dumps(spec)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_client(spec: dict[str, Any]) -> dict[str, float]:
    """The goal's comparison from this process: ``tritonclient.http`` and ``tritonclient.grpc``
    in alternating blocks, and with ``spec["ladder"]`` the lighter clients beside them."""
    import grpc

    target = _target(spec)
    senders, close = grpc_common.tritonclient_senders(target, no_retries=spec["no_retries"])
    closers = [close]
    if spec["ladder"]:
        channel = grpc.insecure_channel(target.grpc, options=grpc_common.TRITONCLIENT_CHANNEL)
        stub = channel.unary_unary(grpc_common.METHOD)
        body, headers = grpc_common.body_for(spec["family"])
        request = grpc_common.grpc_request_from(target.model, body, headers)
        http_port, grpc_port = (int(a.rsplit(":", 1)[1]) for a in (target.http, target.grpc))
        raw_http = grpc_common.RawHttp(http_port, spec["family"], target.model)
        raw_grpc = grpc_common.RawGrpc(grpc_port, spec["family"], target.model)
        senders |= {
            "grpc_stub": lambda: stub(request),
            "http_raw": raw_http.call,
            "grpc_raw": raw_grpc.call,
        }
        closers += [channel.close, raw_http.close, raw_grpc.close]
    try:
        return grpc_common.alternate(
            senders, spec["pids"], requests=spec["requests"], warmup=spec["warmup"]
        )
    finally:
        for closer in closers:
            closer()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="tiny-mlp,small-cnn")
    parser.add_argument("--systems", default="triton,gpufaas")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=2000, help="per protocol, 8 blocks")
    parser.add_argument("--warmup", type=int, default=200, help="per protocol")
    parser.add_argument("--peers-python", default=PEERS_PYTHON)
    parser.add_argument(
        "--no-retries",
        action="store_true",
        help="also a tritonclient.grpc client with grpc's retries off (channel_args), alternating",
    )
    parser.add_argument(
        "--clients",
        default="default",
        help=f"client configurations, each in its own process, in turn: {', '.join(CLIENTS)}",
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also grpc's bare stub and raw-socket clients of both protocols (default client)",
    )
    parser.add_argument("--client-run", help=argparse.SUPPRESS)
    parser.add_argument("--serve-triton", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--specs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_triton:
        return serve_triton(args)
    if args.client_run:
        print(json.dumps(run_client(json.loads(args.client_run))))
        return 0
    if unknown := set(args.clients.split(",")) - set(CLIENTS):
        parser.error(f"unknown client configuration(s): {', '.join(sorted(unknown))}")
    TritonBoth.peers_python = args.peers_python
    classes: dict[str, type[GpufaasBoth | TritonBoth]] = {
        "triton": TritonBoth,
        "gpufaas": GpufaasBoth,
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="grpc-peers-") as work:
        for round_index in range(args.rounds):
            for family in args.families.split(","):
                scenario = prepare(family, copies=2, capacity=2, batched=1,
                                   models_dir=Path(work) / "models")  # fmt: skip
                # as --goals: a roomy device for gpufaas, both copies resident everywhere
                scenario.gpufaas_footprint = max(scenario.model_bytes * 8, 256 << 20)
                names = args.systems.split(",")
                for name in names if round_index % 2 == 0 else names[::-1]:
                    workdir = Path(work) / f"{name}-{family}-{round_index}"
                    system = classes[name](scenario, workdir=workdir)
                    row = measure(system, scenario, args, order=round_index)
                    results.setdefault(family, {}).setdefault(name, []).append(row)
                    ratios = " ".join(
                        f"{k.removesuffix('_over_http_p50')} {v:.3f}"
                        for k, v in row.items()
                        if k.endswith("_over_http_p50")
                    )
                    print(f"{family} {name} round {round_index}: over http p50: {ratios} "
                          f"(grpc {row['grpc_p50_ms']:.3f} / http {row['http_p50_ms']:.3f} ms)",
                          file=sys.stderr, flush=True)  # fmt: skip
    summary = {
        family: {
            name: {
                key: statistics.median(r[key] for r in rows)
                for key in rows[0]
                if key.endswith("_over_http_p50")
            }
            for name, rows in systems.items()
        }
        for family, systems in results.items()
    }
    print(json.dumps({"rounds": results, "median_over_http_p50": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
