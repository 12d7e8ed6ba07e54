"""The framed gateway -> node lane: its wire format, and the gateway's FramedPool against small
real servers on a Unix socket (blocking sockets in a thread, so a test controls exactly when a
"node" reads, answers, closes or restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufaas.core.frames import (
    ANSWER,
    HELLO,
    INFER,
    FramedEndpoint,
    FrameError,
    FrameReader,
    InferHead,
    decode_answer_meta,
    encode_answer,
    encode_hello,
    frame_head,
)
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.transport import FramedPool, NodeUnreachable

# -- the format ---------------------------------------------------------------------------------


def test_an_infer_call_round_trips_and_arrives_whole_or_in_pieces() -> None:
    call = InferHead("tiny-mlp", "cpu:0", 42, "a,b")
    data = call.encode(5) + b"hello" + encode_hello("t")
    whole = FrameReader(max_body=100).feed(data)
    assert [f.kind for f in whole] == [INFER, HELLO]
    assert InferHead.decode(whole[0].meta) == call and bytes(whole[0].body) == b"hello"
    reader = FrameReader(max_body=100)
    pieces = [f for i in range(len(data)) for f in reader.feed(data[i : i + 1])]
    assert [(f.kind, bytes(f.meta), bytes(f.body)) for f in pieces] == [
        (f.kind, bytes(f.meta), bytes(f.body)) for f in whole
    ]
    assert not reader.partial


def test_a_frame_that_claims_more_than_the_bound_is_refused_before_any_buffering() -> None:
    reader = FrameReader(max_body=1024)
    lying = InferHead("m").encode(100 * 1024 * 1024)  # 100 MiB claimed, 0 sent
    with pytest.raises(FrameError) as refused:
        reader.feed(lying)
    assert refused.value.status == 413 and "body claims 104857600 bytes" in str(refused.value)
    assert not reader.partial  # nothing was set aside for it
    with pytest.raises(FrameError, match="meta claims"):
        FrameReader(max_body=1024, max_meta=16).feed(frame_head(INFER, b"x" * 17, 0))


def test_one_whole_frame_is_read_at_once_with_the_same_checks() -> None:
    """``whole``, the usual read of a connection that carries one call at a time: one whole
    frame as views of the read; anything else (part of a frame, two frames, a frame already
    begun) left to ``feed`` with nothing consumed; and a head over the bounds or of no frame
    refused as ``feed`` refuses it, though the frame is all there."""
    call = InferHead("tiny-mlp", "cpu:0", 42, "")
    data = call.encode(5) + b"hello"
    reader = FrameReader(max_body=100)
    frame = reader.whole(data)
    assert frame is not None and frame.kind == INFER and bytes(frame.body) == b"hello"
    assert InferHead.decode(frame.meta) == call and isinstance(frame.body, memoryview)
    assert reader.whole(data[:-1]) is None and reader.whole(data + data) is None
    assert not reader.partial
    assert reader.feed(data[:-1]) == [] and reader.partial
    assert reader.whole(data) is None  # a frame begun: only feed may go on with it
    with pytest.raises(FrameError) as refused:
        FrameReader(max_body=4).whole(data)  # all 5 bytes sent: still over the bound
    assert refused.value.status == 413 and "body claims 5 bytes" in str(refused.value)
    with pytest.raises(FrameError, match="meta claims"):
        FrameReader(max_body=100, max_meta=4).whole(data)
    with pytest.raises(FrameError, match="bad magic"):
        FrameReader(max_body=100).whole(b"XX" + data[2:])
    with pytest.raises(FrameError, match="kind 7"):
        FrameReader(max_body=100).whole(b"GF\x01\x07" + data[4:])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
        (b"GF\x09\x02" + b"\0" * 8, "version 9"),
        (b"GF\x01\x07" + b"\0" * 8, "kind 7"),
    ],
)
def test_what_is_not_a_frame_is_named(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        FrameReader(max_body=1024).feed(data)


@pytest.mark.parametrize(
    "meta", [b"only-a-model", b"\n\n\n", b"m\ncpu:0\n12x\n", b"\xff\xfe\n\n\n"]
)
def test_a_malformed_call_is_a_400_naming_the_part(meta: bytes) -> None:
    with pytest.raises(FrameError) as refused:
        InferHead.decode(meta)
    assert refused.value.status == 400


def test_answers_carry_status_and_headers() -> None:
    head = encode_answer(429, [(b"retry-after", b"1"), (b"x-gpufaas-reason", b"Full")], 0)
    (frame,) = FrameReader(max_body=0).feed(head)
    assert frame.kind == ANSWER
    assert decode_answer_meta(frame.meta) == (429, {"retry-after": "1", "x-gpufaas-reason": "Full"})


# -- a fake node on a Unix socket -----------------------------------------------------------------


class FakeNode:
    """A node that speaks frames with blocking sockets in a thread, over any number of
    connections. ``script[i]`` decides what happens to call ``i`` (default "answer"):
    "answer-then-close" (the node goes away once idle), or "drop" (it read the call, then closed
    the connection without answering, as a node that dies mid-call)."""

    def __init__(self, path: Path, script: dict[int, str] | None = None) -> None:
        self.path, self.script = path, script or {}
        self.calls: list[InferHead] = []
        self.hellos: list[bytes] = []
        self.closed = threading.Event()
        self.may_close = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # stopped
                return
            with conn:
                outcome = self._serve_connection(conn)
            self.closed.set()  # the connection is closed by now
            if outcome == "stop":
                self.listener.close()
                return

    def _serve_connection(self, conn: socket.socket) -> str:
        conn.settimeout(10)
        reader = FrameReader(max_body=1 << 20)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return "closed"
            if not data:
                return "closed"
            for frame in reader.feed(data):
                if frame.kind == HELLO:
                    self.hellos.append(bytes(frame.meta))
                    continue
                behaviour = self.script.get(len(self.calls), "answer")
                self.calls.append(InferHead.decode(frame.meta))
                if behaviour == "drop":
                    return "dropped"
                body = bytes(frame.body)[::-1]
                conn.sendall(encode_answer(200, [(b"x-echo", b"yes")], len(body)) + body)
                if behaviour == "answer-then-close":
                    self.may_close.wait(5)  # the test says when (after the answer was taken)
                    return "stop"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def fake_nodes(tmp_path: Path) -> Iterator[Callable[..., FakeNode]]:
    started: list[FakeNode] = []

    def start(script: dict[int, str] | None = None) -> FakeNode:
        started.append(FakeNode(tmp_path / "node.sock", script))
        return started[-1]

    yield start
    for node in started:
        node.stop()


async def test_a_call_gets_its_answer_and_the_connection_is_kept(
    fake_nodes: Callable[..., FakeNode], tmp_path: Path
) -> None:
    node = fake_nodes()
    pool = FramedPool(unix_path=str(tmp_path / "node.sock"), size=2, token="s3cret")
    try:
        for body in (b"abc", b"defg"):
            reply = await pool.infer(InferHead("m", "cpu:0", 3, "x,y"), body)
            assert (reply.status, reply.body, reply.headers["x-echo"]) == (200, body[::-1], "yes")
        assert node.hellos == [b"s3cret"]  # one connection, its token said once
        assert node.calls == [InferHead("m", "cpu:0", 3, "x,y")] * 2
        assert pool.idle == 1
    finally:
        await pool.close()


async def test_a_node_restarted_while_idle_gets_the_next_call_exactly_once(
    fake_nodes: Callable[..., FakeNode], tmp_path: Path
) -> None:
    """The node answered, then went away; a new one listens on the same socket. The gateway's
    loop has not run since (it has not seen the close): the call goes out on the dead connection,
    is refused unread (EPIPE/ECONNRESET), and is sent once more on a fresh connection."""
    first = fake_nodes({0: "answer-then-close"})
    pool = FramedPool(unix_path=str(tmp_path / "node.sock"), size=2)
    try:
        assert (await pool.infer(InferHead("m"), b"one")).status == 200
        assert pool.idle == 1
        first.may_close.set()
        assert first.closed.wait(5)  # blocks the loop: the close is not processed yet
        second = fake_nodes()
        reply = await pool.infer(InferHead("m"), b"two")
        assert (reply.status, reply.body) == (200, b"owt")
        assert len(first.calls) == 1 and len(second.calls) == 1
    finally:
        await pool.close()


async def test_a_node_restarted_while_idle_after_the_gateway_saw_it_close(
    fake_nodes: Callable[..., FakeNode], tmp_path: Path
) -> None:
    first = fake_nodes({0: "answer-then-close"})
    pool = FramedPool(unix_path=str(tmp_path / "node.sock"), size=2)
    try:
        assert (await pool.infer(InferHead("m"), b"one")).status == 200
        first.may_close.set()
        assert first.closed.wait(5)
        for _ in range(50):  # let the loop see the close (bounded)
            if pool.idle == 0 or not pool._open:
                break
            await asyncio.sleep(0.01)
        second = fake_nodes()
        assert (await pool.infer(InferHead("m"), b"two")).body == b"owt"
        assert len(second.calls) == 1
    finally:
        await pool.close()


async def test_a_node_that_read_the_call_and_died_is_unreachable_and_never_sent_it_again(
    fake_nodes: Callable[..., FakeNode], tmp_path: Path
) -> None:
    """It may have started running the call: sending it again could run it twice. The node
    keeps listening, so a retry would reach it (and be answered): none may come."""
    node = fake_nodes({1: "drop"})
    pool = FramedPool(unix_path=str(tmp_path / "node.sock"), size=2)
    try:
        assert (await pool.infer(InferHead("m"), b"warm")).status == 200  # a reused connection
        with pytest.raises(NodeUnreachable, match="closed before the answer"):
            await pool.infer(InferHead("m"), b"once")
        assert len(node.calls) == 2  # the warm-up and that call, read once
        assert (await pool.infer(InferHead("m"), b"next")).body == b"txen"  # reconnects
        assert len(node.calls) == 3
    finally:
        await pool.close()


async def test_no_node_listening_is_unreachable(tmp_path: Path) -> None:
    pool = FramedPool(unix_path=str(tmp_path / "absent.sock"), size=1)
    with pytest.raises(NodeUnreachable, match="cannot connect"):
        await pool.infer(InferHead("m"), b"")


def test_a_pool_needs_a_socket_or_an_address() -> None:
    with pytest.raises(ValueError, match="Unix socket path, or a host and a port"):
        FramedPool(host="127.0.0.1", size=1)


async def test_the_gateway_takes_the_nodes_unix_socket_on_its_host_else_its_tcp_port(
    tmp_path: Path,
) -> None:
    gateway = build_gateway(manager_urls={"node-0": "http://127.0.0.1:9"}, functions=[])
    node = gateway.cluster.nodes["node-0"]
    here = tmp_path / "node.sock"
    here.touch()
    try:
        local = gateway.lanes.framed_pool(node, FramedEndpoint(unix_path=str(here), tcp_port=7))
        assert local is not None and local.unix_path == str(here)
        assert gateway.lanes.framed_pool(node, FramedEndpoint(unix_path=str(here))) is local  # kept
        elsewhere = FramedEndpoint(unix_path=str(tmp_path / "on-another-host.sock"), tcp_port=7)
        remote = gateway.lanes.framed_pool(node, elsewhere)
        assert remote is not None and (remote.unix_path, remote.host, remote.port) == (
            None,
            "127.0.0.1",
            7,
        )
        assert gateway.lanes.framed_pool(node, FramedEndpoint()) is None  # HTTP then
    finally:
        await gateway.stop()
