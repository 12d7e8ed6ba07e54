"""What a warm ``tritonclient`` call costs in syscalls, and what goes over the wire, per server.

Issue #17's goal "gRPC p50 <= HTTP binary p50" is bound by ``tritonclient.grpc``'s client; this
bench shows where, and whether anything a server sends changes it. Per system (gpufaas, and
NVIDIA's Triton as ``bench/grpc_peers.py`` starts it) and protocol, a client process warms up
on its own, then ``strace -f -c`` is attached to it and to the server's process tree for
``--calls`` calls: syscalls per call on each side, by name. Then a fresh ``tritonclient.grpc``
process is traced from its start (``sendmsg``/``recvmsg`` with their bytes) and every buffer is
cut into HTTP/2 frames: the SETTINGS each server announces, and the frames of a warm call each
way (how many of each sequence, e.g. HEADERS, DATA, trailers in one read).

    /work/helpers/bin/quiet-test .venv/bin/python bench/grpc_wire.py --calls 500

It counts, it does not time (strace slows every syscall), so it needs no quiet lock. ``--clients
inline`` traces the client with ``GRPC_EXPERIMENTS=-event_engine_client`` as well
(``bench/grpc_peers.py``). Servers bind 127.0.0.1 and are stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

import grpc_common  # noqa: E402
import grpc_peers  # noqa: E402
from scenario import prepare  # noqa: E402

FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING",
               "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")  # fmt: skip
SETTING_NAMES = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS",
                 4: "INITIAL_WINDOW_SIZE", 5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE",
                 0xFE03: "GRPC_ALLOW_TRUE_BINARY_METADATA"}  # fmt: skip
_IO = re.compile(r"(sendmsg|recvmsg)\(\d+, \{.*?msg_iov=\[(.*?)\], msg_iovlen")
_IOV = re.compile(r'iov_base="((?:\\x[0-9a-f]{2})*)"')


def client(spec: dict[str, Any]) -> None:
    """``--client``: warm up, say ``ready``, wait for a line, make the calls, print CPU."""
    import time

    target = grpc_peers._target(spec)
    senders, close = grpc_common.tritonclient_senders(target)
    send = senders[spec["protocol"]]
    for _ in range(spec["warmup"]):
        send()
    if spec["wait"]:
        print("ready", flush=True)
        sys.stdin.readline()
    started = time.process_time()
    for _ in range(spec["calls"]):
        send()
    print(json.dumps({"client_cpu_us": (time.process_time() - started) / spec["calls"] * 1e6}))
    close()


def syscalls_per_call(summary: Path, calls: int) -> dict[str, float]:
    """An ``strace -c`` table as calls per call, by syscall (those at >= 0.05 per call)."""
    out: dict[str, float] = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[3].isdigit():
            continue
        name = fields[-1]
        per_call = int(fields[3]) / calls
        if name != "total" and per_call >= 0.05:
            out[name] = round(per_call, 2)
    out["total"] = round(sum(out.values()), 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def frames(data: bytes) -> list[str]:
    """``data`` cut into HTTP/2 frames, each named with its length (SETTINGS with their
    values, WINDOW_UPDATE with its increment); a trailing partial frame is named as such."""
    out, offset = [], 0
    if data.startswith(b"PRI * HTTP/2.0"):
        out.append("PREFACE")
        offset = 24
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        kind, flags = data[offset + 3], data[offset + 4]
        stream = int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFF_FFFF
        payload = data[offset + 9 : offset + 9 + length]
        name = FRAME_NAMES[kind] if kind < len(FRAME_NAMES) else f"type{kind}"
        text = f"{name}({length}{', conn' if stream == 0 and kind != 4 else ''}"
        if kind == 4:
            text += ", ACK" if flags & 1 else ""
            text += "".join(
                f", {SETTING_NAMES.get(int.from_bytes(payload[i : i + 2], 'big'), '?')}="
                f"{int.from_bytes(payload[i + 2 : i + 6], 'big')}"
                for i in range(0, len(payload) - 5, 6)
            )
        elif kind == 8:
            text += f", +{int.from_bytes(payload, 'big')}"
        elif kind == 6:
            text += ", ACK" if flags & 1 else ""
        elif kind in (0, 1) and flags & 1:
            text += ", END_STREAM"
        out.append(text + ")")
        offset += 9 + length
    if offset < len(data):
        out.append(f"partial({len(data) - offset} bytes)")
    return out


def wire(trace: Path) -> dict[str, int]:
    """Each ``sendmsg``/``recvmsg`` of a trace as its frames: how often each sequence came."""
    seen: collections.Counter[str] = collections.Counter()
    for line in trace.read_text().splitlines():
        match = _IO.search(line)
        if match is None:
            continue
        hexes = "".join(_IOV.findall(match[2]))
        data = bytes.fromhex(hexes.replace("\\x", ""))
        direction = "client sends" if match[1] == "sendmsg" else "client receives"
        seen[f"{direction}: {' '.join(frames(data))}"] += 1
    return dict(seen.most_common())


def count(
    spec: dict[str, Any], server_pids: list[int], env: dict[str, str], work: Path
) -> dict[str, Any]:
    """Attach ``strace -c`` to a warmed-up client process and to the server for the calls."""
    command = [sys.executable, __file__, "--client", json.dumps({**spec, "wait": True})]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    tracers: list[subprocess.Popen[Any]] = []  # the client and the server (proc: text)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the client process did not warm up")
        mine, theirs = work / "client.txt", work / "server.txt"
        server_args = [a for pid in server_pids for a in ("-p", str(pid))]
        for out, targets in ((mine, ["-p", str(proc.pid)]), (theirs, server_args)):
            tracers.append(subprocess.Popen(["strace", "-f", "-c", "-o", str(out), *targets],
                                            stderr=subprocess.DEVNULL))  # fmt: skip
        import time

        time.sleep(2.0)  # strace attaches to every thread
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result: dict[str, Any] = json.loads(proc.stdout.readline())
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        proc.wait(timeout=60)
        result["client_syscalls_per_call"] = syscalls_per_call(mine, spec["calls"])
        result["server_syscalls_per_call"] = syscalls_per_call(theirs, spec["calls"])
        return result
    finally:
        for running in (*tracers, proc):
            if running.poll() is None:
                running.kill()
                running.wait(timeout=10)


def capture(spec: dict[str, Any], env: dict[str, str], work: Path) -> dict[str, int]:
    """A fresh ``tritonclient.grpc`` process traced from its start: its frames each way."""
    trace = work / "frames.txt"
    run = {**spec, "protocol": "grpc", "wait": False, "warmup": 0}
    subprocess.run(
        ["strace", "-f", "-xx", "-s", "65536", "-e", "trace=sendmsg,recvmsg", "-o", str(trace),
         sys.executable, __file__, "--client", json.dumps(run)],
        env={**os.environ, **env}, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return wire(trace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="gpufaas,triton")
    parser.add_argument("--family", default="tiny-mlp")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clients", default="default", help="default, inline or both")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(json.loads(args.client))
        return 0
    classes: dict[str, type[grpc_peers.GpufaasBoth | grpc_peers.TritonBoth]] = {
        "gpufaas": grpc_peers.GpufaasBoth, "triton": grpc_peers.TritonBoth,
    }  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="grpc-wire-") as folder:
        work = Path(folder)
        scenario = prepare(args.family, copies=2, capacity=2, batched=1, models_dir=work / "models")
        scenario.gpufaas_footprint = max(scenario.model_bytes * 8, 256 << 20)
        for name in args.systems.split(","):
            system = classes[name](scenario, workdir=work / name)
            try:
                system.start(timeout_s=240)
                assert system.server is not None
                pids = grpc_common.tree(system.server.pid)
                spec = {"http": f"127.0.0.1:{system.port}", "grpc": f"127.0.0.1:{system.grpc_port}",
                        "model": scenario.models[0], "family": scenario.family,
                        "output": scenario.output_names[0], "calls": args.calls,
                        "warmup": args.warmup}  # fmt: skip
                grpc_common.settled(pids, max_s=60)
                out: dict[str, Any] = {}
                for config in args.clients.split(","):
                    env = grpc_peers.CLIENTS[config]
                    for protocol in ("http", "grpc"):
                        run = {**spec, "protocol": protocol}
                        out[f"{config} {protocol}"] = count(run, pids, env, work)
                    out[f"{config} grpc frames"] = capture({**spec, "calls": 50}, env, work)
                results[name] = out
                print(json.dumps({name: out}), file=sys.stderr, flush=True)
            finally:
                system.stop()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
