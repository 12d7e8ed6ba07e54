"""A GPU manager in the gateway's own process: the typed contract between the two (opt-in).

``gpufaas up --node-transport inprocess`` runs the gateway and one GPU manager on one event loop
in one process, so an inference call to that node is a function call instead of a frame over a
Unix socket: no socket write, no second process to wake, no frame to parse at either end
(``docs/dataplane.md``, "One process"). Everything else is as over the wire: the routing policy
decides the device and the dispatcher admits the call before it reaches the node; the node answers
with the same function as its framed lane (decode once, runtime, encode) and the same error
answers; the node still serves its HTTP port and its framed socket to everyone else.

The gateway (``scheduler``) and the node (``gpu_manager``) still never import each other. The
node offers :data:`StartColocated` as an entry point of the :data:`NODE_GROUP` group
(``pyproject.toml``); the composition root (``gpufaas up``) finds it by name at start-up with
:func:`colocated_node`, as ``gpufaas`` finds its subcommands (:mod:`gpufaas.core.cli`), and hands
the gateway the node's :class:`InferNode`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from gpufaas.core.commands import ManagerOptions
from gpufaas.core.frames import InferHead

__all__ = [
    "NODE_GROUP",
    "Answer",
    "ColocatedNode",
    "ColocatedOptions",
    "InferNode",
    "StartColocated",
    "colocated_node",
]

NODE_GROUP = "gpufaas.colocated"
DEFAULT_KIND = "gpu-manager"

# status, raw headers (lower-case names), body: what the framed lane's answer frame carries
Answer = tuple[int, Sequence[tuple[bytes, bytes]], bytes | memoryview]


class InferNode(Protocol):
    """One inference call to a co-located node: the framed lane's call (:class:`InferHead`) and
    body, answered with the framed lane's answer. Errors are answers (status, the
    ``{"error": ...}`` body, ``x-gpufaas-reason``), never exceptions. A coroutine: the caller
    may step it by hand, so that a call answered without waiting needs no task and no timer."""

    def __call__(
        self, call: InferHead, body: bytes | memoryview, /
    ) -> Coroutine[Any, Any, Answer]: ...


@dataclass(frozen=True, kw_only=True)
class ColocatedOptions:
    """What the composition root asks of a co-located node: its name in the cluster, where it
    serves its HTTP API (and framed socket, for other gateways), its devices, and its token."""

    name: str
    host: str
    port: int
    options: ManagerOptions
    framed_socket: Path | None = None
    token: str | None = None
    listener: socket.socket | None = None  # already listening on host:port: served there


class ColocatedNode(Protocol):
    """A node running on the caller's event loop: ``start`` serves its sockets (and returns once
    it is ready), ``answer`` takes inference calls in-process, ``stop`` closes it."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def answer(self) -> InferNode: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


StartColocated = Callable[[ColocatedOptions], ColocatedNode]


class NoColocatedNode(LookupError):
    """No installed package offers a co-located node of that kind."""


def colocated_node(options: ColocatedOptions, *, kind: str = DEFAULT_KIND) -> ColocatedNode:
    """Build the node of ``kind`` offered under :data:`NODE_GROUP` (not started)."""
    found = {ep.name: ep for ep in entry_points(group=NODE_GROUP)}
    entry = found.get(kind)
    if entry is None:
        offered = ", ".join(sorted(found)) or "none"
        raise NoColocatedNode(
            f"no co-located node {kind!r} is installed (entry points {NODE_GROUP!r}: {offered}); "
            "reinstall gpufaas (make relink)"
        )
    start: StartColocated = entry.load()
    return start(options)
