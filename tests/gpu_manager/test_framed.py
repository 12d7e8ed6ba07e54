"""The node's framed listener (gpu_manager/framed.py) with a real runtime: the same answers as
the HTTP route, the token, and every broken frame refused without running anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gm_support import Model

from gpufaas.core.frames import (
    ANSWER,
    FrameReader,
    InferHead,
    decode_answer_meta,
    encode_hello,
)
from gpufaas.core.http import DEVICE_HEADER
from gpufaas.core.node import EXECUTIONS, STATE, NodeState
from gpufaas.core.protocol import HEADER_LENGTH, Limits, decode_response, encode_request
from gpufaas.gpu_manager.framed import FramedServer
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import FramedListen, create_app
from gpufaas.scheduler.transport import FramedPool


def request(model: Model, *, request_id: str | None = None) -> tuple[bytes, int]:
    tensors = {
        t.name: (a, t.datatype) for t, a in zip(model.spec.inputs, model.inputs(), strict=True)
    }
    body, headers = encode_request(tensors, binary_outputs=True, request_id=request_id)
    return body, int(headers[HEADER_LENGTH])


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[None]:
    """Run the app's lifespan (which starts and stops the framed listener)."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(outbox.get(), 10)
        await asyncio.wait_for(task, 10)


async def raw_exchange(
    path: Path, data: bytes, *, close_after: bool = False, expect: int = 1
) -> tuple[list[Any], bool]:
    """Send raw bytes; the answer frames that come back, and whether the node closed."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    if close_after:
        writer.close()
        return [], True
    frames: list[Any] = []
    parser = FrameReader(max_body=1 << 20)
    closed = False
    with contextlib.suppress(TimeoutError):
        while len(frames) < expect:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                closed = True
                break
            frames += parser.feed(chunk)
    if frames and not closed:
        with contextlib.suppress(TimeoutError):
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
    writer.close()
    return [(f.kind, *decode_answer_meta(f.meta), bytes(f.body)) for f in frames], closed


async def test_a_framed_call_answers_as_the_http_route_and_the_state_says_where(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    sock = tmp_path / "n.sock"
    runtime = runtime_factory(register=[model])
    app = create_app(runtime, framed=FramedListen(unix_path=sock))
    body, header_length = request(model)
    async with serving(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            state = NodeState.model_validate_json((await client.get(STATE)).content)
            assert state.framed is not None and state.framed.unix_path == str(sock)
            http = await client.post(
                f"/v2/models/{model.name}/infer",
                content=body,
                headers={HEADER_LENGTH: str(header_length), DEVICE_HEADER: "cpu:0"},
            )
        await runtime.settle()  # the load commits in the background: the framed call hits
        pool = FramedPool(unix_path=str(sock), size=1)
        try:
            framed = await pool.infer(InferHead(model.name, "cpu:0", header_length), body)
            unknown = await pool.infer(InferHead("nope", "cpu:0", header_length), body)
        finally:
            await pool.close()
    assert http.status_code == framed.status == 200
    assert framed.body == http.content
    assert framed.headers["x-gpufaas-cache"] == "hit"
    assert framed.headers[HEADER_LENGTH.lower()] == http.headers[HEADER_LENGTH]
    length = int(framed.headers[HEADER_LENGTH.lower()])
    (out,) = decode_response(framed.body, header_length=length)[1].values()
    assert isinstance(out, np.ndarray) and out.shape[-1] == 4
    assert unknown.status == 404 and "nope" in json.loads(unknown.body)["error"]


async def test_thousands_of_calls_in_one_write_are_answered_in_order_without_recursing(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], tmp_path: Path
) -> None:
    """An unknown model's call is answered without waiting (no task), so each answer starts
    the next call; thousands sent in one write must not nest call in call."""
    model = models["tiny-mlp"]
    sock = tmp_path / "n.sock"
    app = create_app(runtime_factory(register=[model]), framed=FramedListen(unix_path=sock))
    body, header_length = request(model)
    miss = InferHead("nope", "cpu:0", header_length).encode(len(body)) + body
    hit = InferHead(model.name, "cpu:0", header_length).encode(len(body)) + body
    count = 3000
    async with serving(app):
        frames, closed = await raw_exchange(
            sock, encode_hello(None) + miss * count + hit, expect=count + 1
        )
    assert [f[1] for f in frames] == [404] * count + [200]
    assert not closed


async def test_calls_need_the_token_in_the_hello(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    sock = tmp_path / "n.sock"
    app = create_app(
        runtime_factory(register=[model]), token="s3cret", framed=FramedListen(unix_path=sock)
    )
    body, header_length = request(model)
    call = InferHead(model.name, "cpu:0", header_length).encode(len(body)) + body
    async with serving(app):
        for hello in (b"", encode_hello("wrong")):
            frames, _ = await raw_exchange(sock, hello + call)
            assert frames[0][1] == 401 and "bearer token" in frames[0][3].decode()
        frames, _ = await raw_exchange(sock, encode_hello("s3cret") + call)
        assert frames[0][:2] == (ANSWER, 200)


async def test_broken_frames_are_refused_by_name_and_nothing_runs(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], tmp_path: Path
) -> None:
    model = models["tiny-mlp"]
    sock = tmp_path / "n.sock"
    app = create_app(
        runtime_factory(register=[model]),
        limits=Limits(max_body_bytes=4096),
        framed=FramedListen(unix_path=sock),
    )
    body, header_length = request(model, request_id="r-1")
    call = InferHead(model.name, "cpu:0", header_length)
    async with serving(app):
        # A length over the bound: 413 at once, before any body byte is sent; then closed.
        frames, closed = await raw_exchange(sock, call.encode(1 << 30))
        assert frames[0][1] == 413 and "body claims 1073741824 bytes" in frames[0][3].decode()
        assert closed
        # Not a frame at all.
        frames, closed = await raw_exchange(sock, b"POST /v2/models/x/infer HTTP/1.1\r\n\r\n")
        assert frames[0][1] == 400 and "bad magic" in frames[0][3].decode() and closed
        # A malformed call: 400, and the connection goes on.
        bad = b"GF\x01\x02\x00\x00\x00\x03\x00\x00\x00\x00abc"
        frames, closed = await raw_exchange(sock, bad + call.encode(len(body)) + body, expect=2)
        assert frames[0][1] == 400 and "4 UTF-8 lines" in frames[0][3].decode()
        assert frames[1][1] == 200  # the call after it on the same connection (r-1, once)
        # The inference header lies about the binary sizes: the protocol's 400, naming it.
        header = json.loads(body[:header_length])
        header["inputs"][0]["parameters"]["binary_data_size"] += 8
        lying_header = json.dumps(header).encode()
        lying = lying_header + body[header_length:]
        lie = InferHead(model.name, "cpu:0", len(lying_header))
        frames, _ = await raw_exchange(sock, lie.encode(len(lying)) + lying)
        assert frames[0][1] == 400 and "binary_data_size" in frames[0][3].decode(), frames
        # Truncated: half the call, then the connection closes; nothing runs.
        await raw_exchange(
            sock, (call.encode(len(body)) + body)[: 40 + len(body) // 2], close_after=True
        )
        await asyncio.sleep(0.1)
        # The node still serves; the truncated call never ran: r-1 ran twice, both answered.
        frames, _ = await raw_exchange(sock, call.encode(len(body)) + body)
        assert frames[0][1] == 200
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            executions = (await client.get(EXECUTIONS)).json()["executions"]
    assert executions == {"r-1": 2}


async def test_a_sender_that_stalls_mid_frame_is_cut_off_and_nothing_runs(tmp_path: Path) -> None:
    ran: list[InferHead] = []

    async def answer(call: InferHead, body: bytes | memoryview) -> Any:
        ran.append(call)
        return 200, [], b""

    server = FramedServer(answer, token=None, max_body_bytes=1024, frame_timeout_s=0.2)
    await server.start(unix_path=tmp_path / "s.sock")
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        writer.write(InferHead("m").encode(100) + b"only part")
        # the node closes it: read returns end of stream (bounded wait, not a timing check)
        assert await asyncio.wait_for(reader.read(65536), 10) == b""
        writer.close()
    finally:
        await server.close()
    assert ran == []


async def test_frames_over_tcp_reach_the_same_answer(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model]
) -> None:
    """For a gateway on another host: the node's framed TCP port (0 here: any free one)."""
    model = models["tiny-mlp"]
    app = create_app(
        runtime_factory(register=[model]), framed=FramedListen(host="127.0.0.1", port=0)
    )
    body, header_length = request(model)
    async with serving(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            state = NodeState.model_validate_json((await client.get(STATE)).content)
        assert state.framed is not None and state.framed.unix_path is None
        assert state.framed.tcp_port
        pool = FramedPool(host="127.0.0.1", port=state.framed.tcp_port, size=1)
        try:
            reply = await pool.infer(InferHead(model.name, "cpu:0", header_length), body)
        finally:
            await pool.close()
    assert reply.status == 200 and reply.headers["x-gpufaas-cache"] == "miss"
