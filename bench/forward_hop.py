"""What the keyed forward from a replica to the placement owner costs: HTTP against the lane.

    python bench/forward_hop.py --calls 3000 --rounds 3

The owner is a real gateway replica in a second process (``--serve``): the gateway's HTTP front
and its keyed-forward lane (``scheduler/forward_lane.py``), with the bundled tiny-mlp function
registered and no GPU manager. Each call is a keyed forward of a tiny-mlp request, as a
non-owner sends it; the owner takes the gateway's whole inference path up to the routing
decision (admission as forwarded with its key, inspection, the signature check, the policy),
which finds no device and answers 503. So a call's wall time here is the hop itself (both
transports' writes, reads and parsing, both processes' loop turns) plus the owner's work before
the device, without a device's time or a manager's. Calls go one at a time (a tight loop), in
alternating blocks of HTTP and lane calls, ``--rounds`` times; p50 and p99 per transport.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

SELF, PEER = "http://127.0.0.1:9", "http://127.0.0.1:10"


async def serve(seconds: float) -> None:
    """The owner: an HTTP front and a lane on ephemeral ports (printed), for ``seconds``."""
    from gpufaas.core.manifests import bundled_functions_dir, load_manifests
    from gpufaas.scheduler.front import FrontSettings, HttpFront
    from gpufaas.scheduler.gateway import create_app
    from gpufaas.scheduler.main import build_gateway
    from gpufaas.scheduler.peers import static_peers
    from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer

    functions = load_manifests(
        [bundled_functions_dir() / "tiny-mlp.yaml"], variables={"GPUFAAS_MODELS": "/nonexistent"}
    )
    gateway = build_gateway(manager_urls={}, functions=functions, policy="lalb")
    replicas = attach_replicas(
        gateway, self_url=SELF, discover=static_peers([SELF, PEER]), token=None
    )
    from gpufaas.scheduler.forward_lane import ForwardListener

    listener = ForwardListener(
        lane_answer(gateway), token=None, max_body_bytes=gateway.config.limits.max_body_bytes
    )
    front = HttpFront(
        create_app(gateway),
        gateway=gateway,
        settings=FrontSettings(max_body_bytes=gateway.config.limits.max_body_bytes),
    )
    await front.start(host="127.0.0.1", port=0)
    lane_port = await listener.start(host="127.0.0.1")
    print(json.dumps({"http": front.ports[0], "lane": lane_port}), flush=True)
    await asyncio.sleep(seconds)
    await listener.close()
    await front.close()
    await replicas.calls.close()


async def measure(
    http_port: int, lane_port: int, *, calls: int, rounds: int
) -> dict[str, list[float]]:
    from gpufaas.core.http import REQUEST_KEY_HEADER
    from gpufaas.core.protocol import encode_request
    from gpufaas.scheduler.forward_lane import ForwardHead, ForwardPool
    from gpufaas.scheduler.forwards import FORWARDED_HEADER
    from gpufaas.scheduler.transport import NodePool

    body, headers = encode_request({"x": (np.ones((1, 16), np.float32), "FP32")})
    length = int(headers["Inference-Header-Content-Length"])
    path = "/v2/models/tiny-mlp/infer"
    http = NodePool(f"http://127.0.0.1:{http_port}", size=4, headers={}, timeout_s=30.0)
    lane = ForwardPool(host="127.0.0.1", port=lane_port, size=4, timeout_s=30.0)
    out: dict[str, list[float]] = {"http": [], "lane": []}

    async def one_http() -> int:
        sent = {**headers, REQUEST_KEY_HEADER: uuid.uuid4().hex, FORWARDED_HEADER: PEER}
        return (await http.post(path, body, sent)).status

    async def one_lane() -> int:
        head = ForwardHead("tiny-mlp", uuid.uuid4().hex, PEER, length)
        return (await lane.forward(head, body)).status

    for _ in range(rounds):
        for name, one in (("http", one_http), ("lane", one_lane)):
            for _ in range(calls // 10):  # warm: connections, caches
                await one()
            for _ in range(calls):
                started = time.perf_counter()
                status = await one()
                out[name].append((time.perf_counter() - started) * 1e6)
                assert status == 503, status  # no device: the owner's whole path up to routing
    await http.close()
    await lane.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve is not None:
        import uvloop

        uvloop.run(serve(args.serve))
        return 0
    owner = subprocess.Popen(
        [sys.executable, __file__, "--serve", "300"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert owner.stdout is not None
        ports = json.loads(owner.stdout.readline())
        import uvloop

        out = uvloop.run(
            measure(ports["http"], ports["lane"], calls=args.calls, rounds=args.rounds)
        )
    finally:
        owner.terminate()
        owner.wait(10)
    for name, values in out.items():
        p50, p99 = np.percentile(values, [50, 99])
        print(
            f"{name}: {len(values)} calls, mean {statistics.fmean(values):.0f} us, "
            f"p50 {p50:.0f} us, p99 {p99:.0f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
