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

PyTriton runs from ``--peers-python`` (default ``/work/peers-venv/bin/python``, a venv with
``nvidia-pytriton``); gpufaas and the clients from this interpreter. Servers bind 127.0.0.1 and
are stopped at the end; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    system: GpufaasBoth | TritonBoth, scenario: Scenario, args: argparse.Namespace
) -> dict[str, Any]:
    """Start ``system``, call its first copy over both protocols, stop it."""
    try:
        started = system.start(timeout_s=240)
        assert system.server is not None
        pids = grpc_common.tree(system.server.pid)
        target = grpc_common.Target(
            http=f"127.0.0.1:{system.port}",
            grpc=f"127.0.0.1:{system.grpc_port}",
            model=scenario.models[0],
            arrays=scenario.sample,
            output=scenario.output_names[0],
        )
        senders, close = grpc_common.tritonclient_senders(target, no_retries=args.no_retries)
        try:
            for send in senders.values():  # loads the copy; both must answer before timing
                send()
            out: dict[str, Any] = {"startup_s": round(started, 1)}
            out["settled_after_s"] = round(grpc_common.settled(pids, max_s=60), 1)
            out.update(
                grpc_common.alternate(senders, pids, requests=args.requests, warmup=args.warmup)
            )
            return out
        finally:
            close()
    finally:
        system.stop()


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
                    row = measure(classes[name](scenario, workdir=workdir), scenario, args)
                    results.setdefault(family, {}).setdefault(name, []).append(row)
                    print(f"{family} {name} round {round_index}: "
                          f"grpc/http p50 {row['grpc_over_http_p50']:.3f} "
                          f"({row['grpc_p50_ms']:.3f} / {row['http_p50_ms']:.3f} ms)",
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
