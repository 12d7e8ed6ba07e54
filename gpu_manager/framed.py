"""The GPU manager's framed inference listener: the gateway's fast lane, no HTTP per request.

Serves :mod:`gpufaas.core.frames` on a Unix domain socket (a gateway on the same host) and/or a
TCP port, from the manager's own event loop, with an ``asyncio.Protocol`` per connection: no HTTP
parser, no ASGI scope, no Request object per call. Every call ends in the same answer function
as ``POST /v2/models/{name}/infer`` (``server.answer_infer``), so status codes, headers, metrics
and error bodies are the HTTP route's.

Per connection, the stream handling and its protections are :mod:`gpufaas.core.framelisten`'s,
shared with the gateway replicas' keyed-forward lane: the HELLO's bearer token (a call without it
is answered 401), calls answered one at a time with reading paused while a second waits, a
broken frame answered 400/413 and the connection closed, a stalled frame's connection closed.
Here a call starts eagerly: a warm small model's call never becomes a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from gpufaas.core.colocated import Answer  # the contract an in-process caller shares
from gpufaas.core.framelisten import CallListener
from gpufaas.core.frames import FramedEndpoint, InferHead

__all__ = ["Answer", "FramedAnswer", "FramedServer"]

FramedAnswer = Callable[[InferHead, memoryview | bytes], Awaitable[Answer]]


class FramedServer(CallListener[InferHead]):
    """The listeners and their connections; ``start`` on the serving loop, ``close`` at exit."""

    def __init__(
        self,
        answer: FramedAnswer,
        *,
        token: str | None,
        max_body_bytes: int,
        frame_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            decode=InferHead.decode,
            answer=answer,
            token=token,
            max_body_bytes=max_body_bytes,
            frame_timeout_s=frame_timeout_s,
            unauthorized="the GPU manager requires a bearer token",
            eager=True,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self.endpoint = FramedEndpoint()

    async def start(
        self, *, unix_path: Path | None = None, host: str | None = None, port: int | None = None
    ) -> FramedEndpoint:
        loop = asyncio.get_running_loop()
        unix = tcp = None
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                unix_path.unlink()  # a stale socket of an earlier run
            server = await loop.create_unix_server(self.connection, str(unix_path))
            os.chmod(unix_path, 0o600)  # only this user's processes; the token is checked too
            self._servers.append(server)
            unix = str(unix_path)
        if port is not None:
            server = await loop.create_server(self.connection, host, port)
            self._servers.append(server)
            tcp = int(server.sockets[0].getsockname()[1])
        self.endpoint = FramedEndpoint(unix_path=unix, tcp_port=tcp)
        return self.endpoint

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self.close_connections()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.endpoint.unix_path:
            with contextlib.suppress(FileNotFoundError):
                Path(self.endpoint.unix_path).unlink()
        self._servers.clear()
