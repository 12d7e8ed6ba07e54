"""The coordinator of sharded (FSD-Inference) models: deploy, launch as a tree, fan out, gather.

It lives in the gateway, not on a shard, because the gateway already knows the nodes and
talks to each of them over its own connection: a node that dies mid-request breaks that
connection, so the request fails at once with a 503 naming the shard, instead of waiting for
another shard's channel deadline to notice. Shards still exchange their partial results
directly over the set's channel; the coordinator only scatters the input rows and gathers
the output rows (``2 N`` messages per request, against the ``O(N^2 L)`` of the exchange).

Deploying a set: partition the net (:mod:`gpufaas.scheduler.partition`), write each shard
as an artifact (a local folder the nodes share, or any fsspec URL such as ``s3://``),
place shard ``p`` on node ``p mod len(nodes)``, and launch: the coordinator sends one
:class:`~gpufaas.core.sharding.ShardLoad` to shard 0's node, whose children (a binary
tree, ``ceil(log2(N + 1))`` rounds) are told by their parents.

A request gets a fresh request id (messages of an older request can never match it); the
coordinator sends every shard its input rows at once and waits for all outputs. Where the
gateway shares a node's host (same boot, same ``/dev/shm``) and the set's channel allows
shared memory (``ChannelConfig.shared_memory``, the default), a call goes over a shared-memory
link to that node (:meth:`gpufaas.core.hostlink.HostLink.call`: the input rows written into
the gateway's ring, the output rows written by the node into a span reserved for them, one
notice and one answer), else as an HTTP POST; either way under the request's deadline, and
a node that dies breaks the link's socket or the HTTP connection, so the call fails at once. The first
failure cancels the rest. A shard whose node lost the set (evicted, restarted) answers 404:
the coordinator relaunches the set once and retries the request once.

:class:`ShardedFunctions` is the gateway's side: a function whose spec has ``parallelism``
is not pushed to the GPU managers as a model. Its artifact (a :func:`~gpufaas.core.layered.
save_net` safetensors file, no pickled code) is read into a :class:`LayeredNet` here, split,
and deployed over the healthy managers when it is registered; its KServe v2 requests (HTTP
and gRPC, both through ``Gateway.infer``) come here instead of the single-device path. A set
placed on a manager that has since gone is re-placed on the next request. Failures answer
503 naming the shard, the channel or the deploy step, never a hang: every wait has the
request's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import httpx
import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from gpufaas.core.api import InferenceFunction, ModelFormat, ParallelStrategy
from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.channels import ChannelError, Envelope, decode, encode
from gpufaas.core.config import gpufaas_home
from gpufaas.core.hostlink import (
    ANSWERED,
    HostLink,
    HostLinks,
    LinkBroken,
    LinkEndpoint,
    endpoint_in_state,
)
from gpufaas.core.http import REASON_HEADER, error_response, header_length, read_body
from gpufaas.core.layered import LayeredNet, ShardFormatError, load_net, save_shard
from gpufaas.core.node import SHARDS
from gpufaas.core.peerhttp import RawHeaders
from gpufaas.core.protocol import Limits, ProtocolError, decode_request, encode_answer
from gpufaas.core.sharding import (
    REQUEST_ID_HEADER,
    SHARD_HEADER,
    SHARD_INFER_PATH,
    SHARD_PATH,
    TIMEOUT_HEADER,
    ChannelConfig,
    LaunchReport,
    Parallelism,
    ShardLoad,
    channel_for,
)
from gpufaas.scheduler.partition import (
    Partition,
    PartitionError,
    Volume,
    communication,
    partition,
    split,
)
from gpufaas.scheduler.passes import (
    DEFAULT_PASS_CACHE_BYTES,
    PassDeadline,
    Passes,
    PassMetrics,
    PassStats,
    samples_in_cache,
)
from gpufaas.scheduler.transport import NodePool, NodeReply, NodeUnreachable

# The gateway's ring per node on its host: a call's input and output rows (4 calls in flight
# of a 4,096-wide net at 64 samples take 8 MiB at N = 1).
_CALL_RING_BYTES = 16 << 20

# Idle connections close well before uvicorn's 5 s keep-alive timeout, so a request never
# goes out on a connection the node is closing at that moment (a ReadError, not a failure).
_KEEPALIVE_S = 2.0

__all__ = [
    "SHARD_ARTIFACTS_ENV",
    "Coordinator",
    "LaunchFailed",
    "ShardFailed",
    "ShardSet",
    "ShardedFunctions",
    "launch_tree",
]

logger = logging.getLogger(__name__)

# Where the gateway writes shard artifacts for the nodes to fetch: a folder they share, or an
# fsspec URL (s3://bucket/prefix in Kubernetes). Default: $GPUFAAS_HOME/shards (local mode).
SHARD_ARTIFACTS_ENV = "GPUFAAS_SHARD_ARTIFACTS"


class ShardFailed(Exception):
    """A request failed at one shard; ``shard`` names it, ``channel`` the channel if at fault."""

    def __init__(self, set_name: str, shard: int, message: str, *, channel: str | None = None):
        self.set_name = set_name
        self.shard = shard
        self.channel = channel
        super().__init__(message)


class LaunchFailed(Exception):
    def __init__(self, set_name: str, errors: dict[int, str]) -> None:
        self.errors = errors
        listed = "; ".join(f"shard {s}: {e}" for s, e in sorted(errors.items()))
        super().__init__(f"{set_name}: {len(errors)} shard(s) did not load: {listed}")


@dataclasses.dataclass
class ShardSet:
    name: str
    parallelism: Parallelism
    method: str
    widths: tuple[int, ...]
    inputs: list[NDArray[Any]]  # per shard: the a_0 rows it receives
    outputs: list[NDArray[Any]]  # per shard: the a_L rows it returns
    loads: list[ShardLoad]
    volume: Volume
    rows: int = 0  # the most rows one shard owns in one layer (sizes its passes)
    launch: LaunchReport | None = None
    launch_seconds: float = 0.0


def launch_tree(loads: Sequence[ShardLoad], *, fanout: int = 2) -> ShardLoad:
    """Shard 0 at the root; shard ``i``'s children are ``fanout*i+1 .. fanout*i+fanout``."""

    def node(index: int) -> ShardLoad:
        first = fanout * index + 1
        children = [node(c) for c in range(first, min(first + fanout, len(loads)))]
        return loads[index].model_copy(update={"children": children})

    return node(0)


def tree_rounds(shards: int, *, fanout: int = 2) -> int:
    """Rounds of a launch tree: ceil(log_fanout((fanout - 1) N + 1))."""
    return max(1, math.ceil(math.log((fanout - 1) * shards + 1, fanout) - 1e-9))


def default_method(net: LayeredNet, parallelism: Parallelism) -> str:
    """``layer`` for pipelines; hypergraph where every layer has one width; else blocks."""
    if parallelism.strategy == ParallelStrategy.LAYER:
        return "layer"
    return "hypergraph" if len(set(net.widths)) == 1 else "block"


def _unpublish(shard_set: ShardSet) -> None:
    """Delete the shard files :meth:`Coordinator.deploy` wrote for ``shard_set`` (one per
    shard, at its load's ``artifact``: a local path or an fsspec URI), once the set is
    removed or its launch failed. Before the seventeenth session nothing did: a gateway
    that deployed and removed sets kept every set's files (62-73 MB a set at 4,096 x 24).
    The managers' verified copies are their artifact stores', not these. A file already
    gone is fine; one that cannot be deleted is logged, and the removal goes on."""
    for load in shard_set.loads:
        try:
            if load.artifact.startswith("file://"):
                local = urllib.parse.unquote(urllib.parse.urlsplit(load.artifact).path)
                Path(local).unlink(missing_ok=True)
            else:
                fs, path = fsspec.core.url_to_fs(load.artifact)
                if fs.exists(path):
                    fs.rm(path)
        except OSError as e:
            logger.warning("shard set %s: could not delete %s: %s", shard_set.name,
                           load.artifact, e)  # fmt: skip


class Coordinator:
    """Sharded models served through the gateway (see the module docstring)."""

    def __init__(
        self,
        *,
        artifact_base: str,
        token: str | None = None,
        timeout_s: float = 30.0,
        limits: Limits | None = None,
        batching: bool = False,
        max_pass_samples: int | None = None,
        pass_cache_bytes: int = DEFAULT_PASS_CACHE_BYTES,
        pass_depth: int = 2,
    ) -> None:
        self.artifact_base = artifact_base.rstrip("/")
        self.batching = batching
        # A pass's samples at most: given, or what keeps one shard's activations within
        # ``pass_cache_bytes`` (scheduler/passes.py: samples_in_cache), per set.
        self.max_pass_samples = max_pass_samples
        self.pass_cache_bytes = pass_cache_bytes
        self.pass_depth = pass_depth
        self._passes: dict[str, Passes] = {}
        self.token = token
        self.timeout_s = timeout_s
        self.limits = limits or Limits()
        self.sets: dict[str, ShardSet] = {}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_keepalive_connections=256, keepalive_expiry=_KEEPALIVE_S),
        )
        self._auth = headers
        self._pools: dict[str, NodePool] = {}  # node URL -> kept-alive connections (requests)
        # Nodes on this host: calls over shared memory instead of HTTP (core/hostlink.py).
        self._links = HostLinks(endpoint_of=self._endpoint_of, ring_bytes=_CALL_RING_BYTES)

    def __contains__(self, name: object) -> bool:
        return name in self.sets

    async def close(self) -> None:
        for passes in self._passes.values():
            await passes.close()
        self._passes.clear()
        await self._client.aclose()
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        await self._links.close()

    async def _endpoint_of(self, url: str) -> LinkEndpoint | None:
        """A node's same-host link endpoint, from its shard state (None: it answered that it
        has none). A 5xx or no answer raises (:func:`endpoint_in_state`): a failure that may
        pass, which the links try again. Bounded by the links' ``connect_timeout_s``."""
        response = await self._client.get(url + SHARDS, timeout=None)
        return endpoint_in_state(response.status_code, response.content)

    def _pool(self, url: str) -> NodePool:
        pool = self._pools.get(url)
        if pool is None:
            pool = NodePool(url, size=16, headers=self._auth, timeout_s=self.timeout_s + 2.0)
            self._pools[url] = pool
        return pool

    # -- deploy ---------------------------------------------------------------------------

    async def deploy(
        self,
        name: str,
        net: LayeredNet,
        parallelism: Parallelism,
        *,
        nodes: Sequence[str],
        method: str | None = None,
        channel: ChannelConfig | None = None,
        seed: int = 0,
    ) -> ShardSet:
        """Partition, write, place and launch ``net`` as shard set ``name``."""
        if not nodes:
            raise ValueError("no nodes to place shards on")
        method = method or default_method(net, parallelism)
        channel = channel or channel_for(str(parallelism.channel), os.environ)
        part: Partition = await asyncio.to_thread(
            partition, net, parallelism.shards, method=method, seed=seed
        )
        specs = await asyncio.to_thread(split, net, part)
        placed = {p: nodes[p % len(nodes)] for p in range(parallelism.shards)}
        loads = []
        for spec in specs:
            uri, digest = await asyncio.to_thread(self._publish, name, spec)
            loads.append(
                ShardLoad(
                    set_name=name, shard=spec.shard, shards=spec.shards, artifact=uri,
                    sha256=digest, node=placed[spec.shard], peers=placed, channel=channel,
                )
            )  # fmt: skip
        shard_set = ShardSet(
            name=name,
            parallelism=parallelism,
            method=method,
            widths=tuple(net.widths),
            inputs=[s.inputs for s in specs],
            outputs=[s.outputs for s in specs],
            loads=loads,
            volume=communication(net, part),
            rows=max(int(layer.owned.size) for spec in specs for layer in spec.layers),
        )
        try:
            await self.launch(shard_set)
        except LaunchFailed:
            await self._unload(shard_set)  # the shards that did load would hold their devices
            await asyncio.to_thread(_unpublish, shard_set)
            raise
        self.sets[name] = shard_set
        return shard_set

    def _publish(self, name: str, spec: Any) -> tuple[str, str]:
        file_name = f"{name}.shard-{spec.shard}-of-{spec.shards}.safetensors"
        if "://" not in self.artifact_base or self.artifact_base.startswith("file://"):
            folder = Path(self.artifact_base.removeprefix("file://"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / file_name
            save_shard(path, spec)
            return path.resolve().as_uri(), _sha256(path)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file_name
            save_shard(path, spec)
            uri = f"{self.artifact_base}/{file_name}"
            with fsspec.open(uri, "wb") as out, path.open("rb") as src:
                out.write(src.read())
            return uri, _sha256(path)

    async def launch(self, shard_set: ShardSet) -> LaunchReport:
        """Load every shard through the tree; raises :class:`LaunchFailed` naming shards."""
        root = launch_tree(shard_set.loads)
        started = time.perf_counter()
        url = root.node.rstrip("/") + SHARD_PATH.format(set_name=root.set_name, shard=root.shard)
        try:
            response = await self._client.put(url, json=root.model_dump(), timeout=300)
        except httpx.HTTPError as e:
            raise LaunchFailed(shard_set.name, {0: f"{root.node}: {e}"}) from None
        if response.status_code != 200:
            raise LaunchFailed(shard_set.name, {0: f"HTTP {response.status_code}"})
        report = LaunchReport.model_validate(response.json())
        shard_set.launch = report
        shard_set.launch_seconds = time.perf_counter() - started
        if report.errors:
            raise LaunchFailed(shard_set.name, report.errors)
        return report

    async def remove(self, name: str) -> None:
        shard_set = self.sets.pop(name, None)
        if shard_set is None:
            return
        passes = self._passes.pop(name, None)
        if passes is not None:
            await passes.close()
        await self._unload(shard_set)
        await asyncio.to_thread(_unpublish, shard_set)

    async def _unload(self, shard_set: ShardSet) -> None:
        """Ask every shard's node to drop it (a shard never loaded is a no-op there)."""
        for load in shard_set.loads:
            url = load.node.rstrip("/") + SHARD_PATH.format(
                set_name=shard_set.name, shard=load.shard
            )
            with contextlib.suppress(httpx.HTTPError):  # a node that is gone holds nothing
                await self._client.delete(url, timeout=10)

    # -- serve ----------------------------------------------------------------------------

    async def infer(
        self, name: str, x: NDArray[Any], *, timeout_s: float | None = None
    ) -> NDArray[Any]:
        """The set's output for ``x`` (``(batch, n_in)``), as ``(batch, n_out)``. With
        ``batching``, concurrent requests share passes (:mod:`gpufaas.scheduler.passes`),
        sized to the cache, two in flight. Off by default: on the 4,096 x 24 net with
        requests of 64 samples they gained 1-3% at N = 2 and nothing clear at N = 1
        (bench/RESULTS.md, #15, sessions 7 and 8)."""
        shard_set = self.sets[name]
        timeout_s = timeout_s or self.timeout_s
        columns = np.asarray(x, dtype=np.float32).T
        if not self.batching:
            return (await self._run_pass(shard_set, columns, timeout_s)).T
        return (await self.passes(name).submit(columns, timeout_s=timeout_s)).T

    def passes(self, name: str) -> Passes:
        """Set ``name``'s passes (its batching and their counts)."""
        found = self._passes.get(name)
        if found is None:
            found = Passes(
                functools.partial(self._run_named_pass, name),
                max_samples=self.pass_samples(name),
                depth=self.pass_depth,
            )
            self._passes[name] = found
        return found

    def pass_samples(self, name: str) -> int:
        """The most samples one pass on set ``name`` holds (``max_pass_samples``, or what
        fits ``pass_cache_bytes`` for its widest shard)."""
        if self.max_pass_samples is not None:
            return self.max_pass_samples
        return samples_in_cache(self.sets[name].rows, cache_bytes=self.pass_cache_bytes)

    def pass_stats(self) -> dict[str, PassStats]:
        """Every set's pass counts so far (the gateway's ``/metrics``)."""
        return {name: passes.stats for name, passes in self._passes.items()}

    async def _run_named_pass(
        self, name: str, columns: NDArray[Any], timeout_s: float
    ) -> NDArray[Any]:
        return await self._run_pass(self.sets[name], columns, timeout_s)  # as deployed now

    async def _run_pass(
        self, shard_set: ShardSet, columns: NDArray[Any], timeout_s: float
    ) -> NDArray[Any]:
        """One pass (``columns``: ``(n_in, samples)``) on the set, relaunched and retried once
        if a node lost it; the output columns ``(n_out, samples)``."""
        try:
            return await self._infer_once(shard_set, columns, timeout_s=timeout_s)
        except _NotLoaded:
            await self.launch(shard_set)  # the set was evicted or a node restarted: re-place
            return await self._infer_once(shard_set, columns, timeout_s=timeout_s)

    async def _infer_once(
        self, shard_set: ShardSet, columns: NDArray[Any], *, timeout_s: float
    ) -> NDArray[Any]:
        request_id = uuid.uuid4().hex  # one per pass: every message of the pass carries it
        columns = _contiguous(columns)
        calls = [
            asyncio.ensure_future(
                self._call(shard_set, load, request_id, columns[shard_set.inputs[load.shard]],
                           timeout_s)
            )
            for load in shard_set.loads
        ]  # fmt: skip
        try:
            done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
            for call in done:
                call.result()  # the first failure, if any, raises here
        finally:
            for call in calls:
                call.cancel()
        out = np.zeros((shard_set.widths[-1], columns.shape[1]), dtype=np.float32)
        for load, call in zip(shard_set.loads, calls, strict=True):
            out[shard_set.outputs[load.shard]] = call.result()
        return out

    async def _call(
        self,
        shard_set: ShardSet,
        load: ShardLoad,
        request_id: str,
        rows: NDArray[Any],
        timeout_s: float,
    ) -> NDArray[Any]:
        """One shard's part of a pass: its input rows in, its output rows out."""
        url = load.node.rstrip("/")
        link = await self._links.find(url) if load.channel.shared_memory else None
        if link is not None:
            return await self._call_on_host(shard_set, load, link, request_id, rows, timeout_s)
        path = SHARD_INFER_PATH.format(set_name=shard_set.name, shard=load.shard)
        frame = encode(Envelope(shard_set.name, request_id, 0, -1, load.shard), rows)
        headers = {REQUEST_ID_HEADER: request_id, TIMEOUT_HEADER: f"{timeout_s:.3f}"}
        try:
            response = await asyncio.wait_for(
                self._pool(url).post(path, frame, headers), timeout_s + 2.0
            )
        except (NodeUnreachable, TimeoutError) as e:
            raise self._unreachable(shard_set, load, e) from None
        if response.status == 404 or response.headers.get(REASON_HEADER) == "ShardMissing":
            raise _NotLoaded(load.shard)  # here, or a peer it sends to: relaunch the set
        if response.status != 200:
            text = response.body[:300].decode("utf-8", "replace")
            try:
                message = str(json.loads(response.body).get("error", text))
            except ValueError:
                message = text
            at_fault = int(response.headers.get(SHARD_HEADER, load.shard))
            raise ShardFailed(
                shard_set.name, at_fault, message, channel=response.headers.get("x-gpufaas-channel")
            )
        _, values = decode(response.body)
        return values

    async def _call_on_host(
        self,
        shard_set: ShardSet,
        load: ShardLoad,
        link: HostLink,
        request_id: str,
        rows: NDArray[Any],
        timeout_s: float,
    ) -> NDArray[Any]:
        """The same call over the node's shared-memory link: one notice, one answer."""
        out_rows = len(shard_set.outputs[load.shard])
        header: dict[str, object] = {
            "set_name": shard_set.name, "request_id": request_id, "layer": 0, "src": -1,
            "dst": load.shard, "timeout_s": round(timeout_s, 3),
        }  # fmt: skip
        try:
            status, result = await link.call(
                header, rows, out_count=out_rows * rows.shape[1], timeout_s=timeout_s + 2.0
            )
        except LinkBroken as e:
            if link.broken is not None:
                self._links.forget(load.node.rstrip("/"), link)  # the next call asks again
            raise self._unreachable(shard_set, load, e) from None
        if status == ANSWERED and not isinstance(result, bytes):
            return result.reshape(out_rows, rows.shape[1])
        try:
            error = json.loads(result) if isinstance(result, bytes) else {}
        except ValueError:
            error = {}
        if status == 404 or error.get("reason") == "ShardMissing":
            raise _NotLoaded(load.shard)  # here, or a peer it sends to: relaunch the set
        raise ShardFailed(
            shard_set.name, int(error.get("shard", load.shard)),
            str(error.get("error", f"shard {load.shard} answered {status}")),
            channel=error.get("channel"),
        )  # fmt: skip

    @staticmethod
    def _unreachable(shard_set: ShardSet, load: ShardLoad, error: Exception) -> ShardFailed:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return ShardFailed(
            shard_set.name, load.shard,
            f"shard {load.shard} of {shard_set.name} on {load.node} failed: {detail}",
        )  # fmt: skip

    async def serve(self, name: str, request: Request) -> Response:
        """A KServe v2 request on a sharded model: its one input is ``(batch, n_in)``."""
        shard_set = self.sets[name]
        try:
            body = await read_body(request, max_bytes=self.limits.max_body_bytes)
            decoded = decode_request(body, header_length=header_length(request), limits=self.limits)
        except ProtocolError as e:
            return error_response(e.status_code, str(e), reason="InvalidRequest")
        if len(decoded.inputs) != 1:
            return error_response(
                400, f"{name} takes one input, got {len(decoded.inputs)}", reason="InvalidRequest"
            )
        (array,) = decoded.inputs.values()
        if array.ndim != 2 or array.shape[1] != shard_set.widths[0]:
            return error_response(
                400,
                f"{name} takes a (batch, {shard_set.widths[0]}) input, got {list(array.shape)}",
                reason="InvalidRequest",
            )
        try:
            out = await self.infer(name, array)
        except ShardFailed as e:
            headers = {SHARD_HEADER: str(e.shard), "Retry-After": "1"}
            if e.channel:
                headers["X-Gpufaas-Channel"] = e.channel
            return error_response(503, str(e), reason="ShardFailed", headers=headers)
        except LaunchFailed as e:
            return error_response(503, str(e), reason="LaunchFailed", headers={"Retry-After": "1"})
        except PassDeadline as e:
            return error_response(504, f"{name}: {e}", reason="DeadlineExceeded")
        payload, answer_headers = encode_answer(
            model_name=name,
            model_version=None,
            request_id=decoded.id,
            outputs={"output": (out, "FP32")},
            binary=decoded.binary_outputs,
        )
        return Response(payload, headers=dict(RawHeaders(answer_headers)))


class _NotLoaded(Exception):
    def __init__(self, shard: int) -> None:
        self.shard = shard


def _contiguous(columns: NDArray[Any]) -> NDArray[np.float32]:
    """``columns`` in C order. A request's columns are its ``(batch, n_in)`` input transposed,
    and numpy copies a transposed float32 matrix 4-5x slower than torch's blocked copy (64 x
    4,096: 0.74 ms against 0.15 ms here), so the copy is torch's."""
    if columns.flags.c_contiguous and columns.dtype == np.float32:
        return columns
    rows = torch.from_numpy(np.ascontiguousarray(columns.T, dtype=np.float32))
    return rows.t().contiguous().numpy()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------
# The gateway's sharded functions
# -------------------------------------------------------------------------------------------


class DeployFailed(Exception):
    """A sharded function could not be deployed; the message names the step and the cause."""


class ShardedFunctions:
    """Functions with ``spec.parallelism``: deployed as shard sets, served by the coordinator.

    ``nodes()`` gives the healthy GPU managers' base URLs and the headers (the manager token)
    to call them with, as the gateway's cluster knows them at that moment.
    """

    def __init__(
        self,
        nodes: Callable[[], tuple[list[str], Mapping[str, str]]],
        *,
        limits: Limits,
        artifact_base: str | None = None,
        store: ArtifactStore | None = None,
        timeout_s: float = 30.0,
        shared_passes: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._nodes = nodes
        self.limits = limits
        self.timeout_s = timeout_s
        self.shared_passes = shared_passes  # the coordinator's batching (scheduler/passes.py)
        self._artifact_base = (
            artifact_base or os.environ.get(SHARD_ARTIFACTS_ENV) or str(gpufaas_home() / "shards")
        )
        self._store = store
        self._coordinator: Coordinator | None = None
        self._deployed: dict[str, InferenceFunction] = {}  # name -> the spec its set serves
        self._deploying: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, str] = {}
        if registry is not None:  # the pass counts on the gateway's /metrics
            registry.register(PassMetrics(self.pass_stats))

    def pass_stats(self) -> dict[str, PassStats]:
        """Every shard set's pass counts (none before the first sharded request)."""
        return {} if self._coordinator is None else self._coordinator.pass_stats()

    @classmethod
    def for_cluster(
        cls,
        cluster: Any,
        *,
        limits: Limits,
        shared_passes: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> ShardedFunctions:
        """Place on the cluster's healthy nodes, calling them with their clients' token."""

        def nodes() -> tuple[list[str], Mapping[str, str]]:
            healthy = [n for n in cluster.nodes.values() if n.healthy]
            headers = {
                k: v
                for n in healthy[:1]
                for k, v in n.client.headers.items()
                if k.lower() == "authorization"
            }
            return [n.url for n in healthy], headers

        return cls(nodes, limits=limits, shared_passes=shared_passes, registry=registry)

    def error(self, name: str) -> str | None:
        """Why ``name``'s last deploy failed, if it did."""
        return self._errors.get(name)

    # -- deploy -----------------------------------------------------------------------------

    def deploy_all(self, functions: Iterable[InferenceFunction]) -> None:
        """Start deploying every sharded function in the background (the gateway's start)."""
        for function in functions:
            if function.spec.parallelism is not None:
                self._start(function)

    async def deploy(self, function: InferenceFunction) -> None:
        """Deploy (or re-deploy, if its spec changed) ``function``'s shard set; errors are
        kept for its requests (:meth:`error`) and logged, not raised."""
        try:
            await asyncio.shield(self._start(function))
        except DeployFailed as e:
            logger.warning("sharded function not deployed: %s", e)

    def _start(self, function: InferenceFunction) -> asyncio.Task[None]:
        name = function.name
        running = self._deploying.get(name)
        if running is not None and not running.done():
            return running
        task = asyncio.get_running_loop().create_task(self._deploy(function))
        self._deploying[name] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved here
        return task

    async def _deploy(self, function: InferenceFunction) -> None:
        name, spec = function.name, function.spec
        assert spec.parallelism is not None
        try:
            urls, headers = self._nodes()
            if not urls:
                raise DeployFailed(f"{name}: no healthy GPU manager to place its shards on")
            if spec.model.format != ModelFormat.LAYERED:
                raise DeployFailed(
                    f"{name}: model.format is {str(spec.model.format)!r}; a sharded function"
                    " serves a 'layered' net (a gpufaas.layered/v1 safetensors file)"
                )
            net = await self._read_net(function)
            check_net_fits(function, net)
            coordinator = self._coordinator_for(headers)
            if name in coordinator:
                await coordinator.remove(name)
            self._deployed.pop(name, None)
            await coordinator.deploy(name, net, spec.parallelism, nodes=urls)
        except DeployFailed as e:
            self._errors[name] = str(e)
            raise
        except (ArtifactError, ShardFormatError, PartitionError) as e:
            self._errors[name] = f"{name}: {e}"
            raise DeployFailed(self._errors[name]) from None
        except LaunchFailed as e:
            self._errors[name] = str(e)
            raise DeployFailed(str(e)) from None
        except ChannelError as e:
            self._errors[name] = f"{name}: the {spec.parallelism.channel} channel: {e}"
            raise DeployFailed(self._errors[name]) from None
        self._errors.pop(name, None)
        self._deployed[name] = function

    async def _read_net(self, function: InferenceFunction) -> LayeredNet:
        model = function.spec.model
        if self._store is None:
            self._store = ArtifactStore(gpufaas_home() / "gateway-artifacts")
        path = await asyncio.to_thread(self._store.fetch, model.uri, sha256=model.sha256)
        return await asyncio.to_thread(load_net, path)

    def _coordinator_for(self, headers: Mapping[str, str]) -> Coordinator:
        if self._coordinator is None:
            token = headers.get("authorization", headers.get("Authorization", ""))
            self._coordinator = Coordinator(
                artifact_base=self._artifact_base,
                token=token.removeprefix("Bearer ") or None,
                timeout_s=self.timeout_s,
                limits=self.limits,
                batching=self.shared_passes,
            )
        return self._coordinator

    async def remove(self, name: str) -> None:
        task = self._deploying.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._deployed.pop(name, None)
        self._errors.pop(name, None)
        if self._coordinator is not None:
            await self._coordinator.remove(name)

    async def close(self) -> None:
        for name in list(self._deploying):
            task = self._deploying.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._coordinator is not None:
            await self._coordinator.close()

    # -- serve ------------------------------------------------------------------------------

    async def infer(
        self,
        function: InferenceFunction,
        body: bytes | memoryview,
        *,
        header_length: int | None,
        deadline: float | None,
    ) -> NodeReply:
        """One KServe v2 request (as the client sent it) on a sharded function.

        Raises :class:`~gpufaas.core.protocol.ProtocolError` for a bad request; every other
        failure is a 503 answer naming the shard, the channel or the deploy step.
        """
        name = function.name
        decoded = decode_request(bytes(body), header_length=header_length, limits=self.limits)
        if len(decoded.inputs) != 1:
            raise ProtocolError(f"{name} takes one input, got {len(decoded.inputs)}")
        (array,) = decoded.inputs.values()
        timeout_s = self.timeout_s if deadline is None else deadline - time.monotonic()
        if timeout_s <= 0:
            return _error(
                504, f"the deadline of the request for {name!r} passed", "DeadlineExceeded"
            )
        try:
            await asyncio.wait_for(self._ready(function), timeout=timeout_s)
        except DeployFailed as e:
            return _error(503, str(e), "ShardDeployFailed")
        except TimeoutError:
            return _error(
                503, f"{name}'s shard set did not deploy within {timeout_s:.1f} s", "ShardDeploying"
            )
        assert self._coordinator is not None
        widths = self._coordinator.sets[name].widths
        if array.ndim != 2 or array.shape[1] != widths[0]:
            raise ProtocolError(
                f"{name} takes a (batch, {widths[0]}) input, got {list(array.shape)}"
            )
        timeout_s = self.timeout_s if deadline is None else deadline - time.monotonic()
        try:
            out = await self._coordinator.infer(name, array, timeout_s=max(timeout_s, 0.001))
        except ShardFailed as e:
            return _error(503, str(e), "ShardFailed")
        except LaunchFailed as e:
            return _error(503, str(e), "LaunchFailed")
        except PassDeadline as e:
            return _error(504, f"{name}: {e}", "DeadlineExceeded")
        except ChannelError as e:
            channel = function.spec.parallelism.channel if function.spec.parallelism else "?"
            return _error(503, f"{name}: the {channel} channel: {e}", "ChannelUnavailable")
        payload, headers = encode_answer(
            model_name=name,
            model_version=None,
            request_id=decoded.id,
            outputs={function.spec.outputs[0].name: (out, "FP32")},
            binary=decoded.binary_outputs,
        )
        return NodeReply(200, RawHeaders(headers), payload)

    async def _ready(self, function: InferenceFunction) -> None:
        """Deployed with this spec on nodes that are all still healthy, or deploy it now."""
        name = function.name
        deployed = self._deployed.get(name)
        if deployed is not None and deployed.spec == function.spec:
            assert self._coordinator is not None
            placed = {load.node for load in self._coordinator.sets[name].loads}
            if placed <= set(self._nodes()[0]):
                return
        running = self._deploying.get(name)
        if running is None or running.done():
            running = self._start(function)  # never deployed, failed before, or re-place
        await asyncio.shield(running)


def check_net_fits(function: InferenceFunction, net: LayeredNet) -> None:
    """The function's one input and output must fit the net's first and last widths."""
    spec = function.spec
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise DeployFailed(
            f"{function.name}: a sharded function has one input and one output, "
            f"not {len(spec.inputs)} and {len(spec.outputs)}"
        )
    for side, tensor, width in (("inputs", spec.inputs[0], net.widths[0]),
                                ("outputs", spec.outputs[0], net.widths[-1])):  # fmt: skip
        last = tensor.shape[-1] if tensor.shape else -1
        if last not in (-1, width):
            raise DeployFailed(
                f"{function.name}: spec.{side}[0] {tensor.name!r} has last dimension {last}, "
                f"but the model's is {width}"
            )
        if tensor.datatype != "FP32":
            raise DeployFailed(
                f"{function.name}: spec.{side}[0] must be FP32, not {tensor.datatype}"
            )


def _error(status: int, message: str, reason: str) -> NodeReply:
    headers = {"content-type": "application/json", REASON_HEADER: reason, "retry-after": "1"}
    return NodeReply(status, headers, json.dumps({"error": message}).encode())
