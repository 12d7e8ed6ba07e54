"""The keyed-forward lane between replicas (scheduler/forward_lane.py): a forward to an owner that
advertises a lane goes over it, with its key and sender, and comes back as the owner answered;
the listener's token, bounds and malformed frames; a lane cut after the owner took the call is
recovered by its key, as an HTTP forward is. The real processes: ``test_replicas_e2e.py``."""

from __future__ import annotations

import asyncio
import contextvars
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from replica_support import SELF, close_replicas, replica_with_owner

from gpufaas.core.frames import FrameError, InferHead, encode_hello
from gpufaas.core.http import REQUEST_KEY_HEADER
from gpufaas.scheduler.forward_lane import (
    LANE_PORT_KEY,
    ForwardHead,
    ForwardListener,
    ForwardPool,
    LaneAnswer,
)
from gpufaas.scheduler.forwards import FORWARD_MS_HEADER
from gpufaas.scheduler.lanes import NodeCall
from gpufaas.scheduler.replicas import Replicas
from gpufaas.scheduler.transport import NodeReply, NodeUnreachable

OWNER = "http://127.0.0.1:1"  # the owner's HTTP port: nothing listens; only its lane answers
BODY = b'{"id": "r1", "inputs": []}'
CALL = NodeCall(
    "/v2/models/m/infer", BODY, {"content-type": "application/json"}, InferHead("m", None, None)
)

# What the owner's answer function saw, in the call's own task (as Replicas.admit sets it).
_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


class Recorder:
    """The owner's answer function: records each call and answers 200 with a header."""

    def __init__(self) -> None:
        self.calls: list[tuple[ForwardHead, bytes]] = []

    async def __call__(self, head: ForwardHead, body: bytes) -> LaneAnswer:
        _SEEN.set(head.key)  # set in the call's task: must not leak into another call
        await asyncio.sleep(0)
        self.calls.append((head, body))
        assert _SEEN.get() == head.key
        return 200, [(b"x-gpufaas-cache", b"miss")], b"answered:" + body


def _replicas_with_lane(port: int | None, **options: object) -> Replicas:
    replicas = replica_with_owner(OWNER, heartbeat=None, ownership="leader", **options)
    if port is not None:  # the owner's last heartbeat advertised its lane
        replicas.membership.peers[OWNER].report = {LANE_PORT_KEY: port}
    return replicas


_LINE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")


@given(
    model=st.text(_LINE, min_size=1, max_size=40),
    key=st.text(_LINE, min_size=1, max_size=40),
    sender=st.text(_LINE, min_size=1, max_size=40),
    length=st.none() | st.integers(min_value=0, max_value=1 << 40),
)
def test_a_forward_head_survives_its_frame(
    model: str, key: str, sender: str, length: int | None
) -> None:
    head = ForwardHead(model, key, sender, length)
    encoded = head.encode(7)
    meta_length = struct.unpack("!2sBBII", encoded[:12])[3]
    assert ForwardHead.decode(encoded[12 : 12 + meta_length]) == head


@pytest.mark.parametrize(
    "meta",
    [b"m\n\nk", b"\n\nk\ns", b"m\n\n\ns", b"m\nx1\nk\ns", b"m\n1\nk\ns\nmore", b"\xff\n\nk\ns"],
)
def test_a_malformed_forward_head_is_refused(meta: bytes) -> None:
    with pytest.raises(FrameError):
        ForwardHead.decode(meta)


async def test_a_forward_goes_over_the_owners_lane_with_its_key_and_sender() -> None:
    recorder = Recorder()
    listener = ForwardListener(recorder, token=None, max_body_bytes=1 << 20)
    port = await listener.start(host="127.0.0.1")
    replicas = _replicas_with_lane(port)
    placed = await asyncio.wait_for(
        replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[]), timeout=30
    )
    reply = placed.reply
    assert reply is not None and reply.status == 200 and reply.body == b"answered:" + BODY
    assert reply.headers["x-gpufaas-cache"] == "miss" and FORWARD_MS_HEADER in reply.headers
    ((head, body),) = recorder.calls
    assert (head.model, head.sender, head.header_length, body) == ("m", SELF, None, BODY)
    assert len(head.key) == 32  # a fresh key, as over HTTP
    assert replicas.metrics.lane_forwards._value.get() == 1
    # The connection is kept: a second forward reuses it, under a new key.
    await replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[])
    assert len(recorder.calls) == 2 and recorder.calls[1][0].key != head.key
    assert replicas.calls.lane(OWNER) is not None and replicas.calls.lane(OWNER).connects == 1  # type: ignore[union-attr]
    await close_replicas(replicas)
    await listener.close()


async def test_an_owner_without_a_lane_is_forwarded_to_over_http() -> None:
    """No lane port in its heartbeat (an older replica): HTTP, as before. Nothing listens on the
    owner's HTTP port here, so the forward fails and the call is placed here under its key."""
    replicas = _replicas_with_lane(None, recover=None)
    placed = await replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[])
    assert placed.reply is None and placed.forward_failed
    assert REQUEST_KEY_HEADER in placed.call.headers
    assert replicas.metrics.lane_forwards._value.get() == 0
    await close_replicas(replicas)


async def test_a_lane_cut_after_the_owner_took_the_call_is_recovered_by_its_key() -> None:
    """The owner read the call (and may have dispatched it), then its connection broke: the
    managers are asked for the key's answer, as after a cut HTTP forward."""
    taken: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while SELF.encode() not in data:  # the HELLO, then the whole call
            data += await reader.read(1 << 16)
        taken.append(data)
        writer.transport.abort()  # the call was read: it may have been dispatched

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return NodeReply(status=200, headers={}, body=b"ran once, at the manager")

    replicas = _replicas_with_lane(port, recover=recover)
    placed = await asyncio.wait_for(
        replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[]), timeout=30
    )
    assert placed.reply is not None and placed.reply.body == b"ran once, at the manager"
    assert len(asked) == 1 and asked[0].encode() in taken[0]  # the key the owner was sent
    assert placed.call.headers[REQUEST_KEY_HEADER] == asked[0]
    assert not replicas.membership.peers[OWNER].reachable
    await close_replicas(replicas)
    server.close()


async def test_the_lane_needs_the_peer_token() -> None:
    recorder = Recorder()
    listener = ForwardListener(recorder, token="secret", max_body_bytes=1 << 20)
    port = await listener.start(host="127.0.0.1")
    head = ForwardHead("m", "k", SELF)
    wrong = ForwardPool(host="127.0.0.1", port=port, size=1, token="guess")
    refused = await wrong.forward(head, BODY)
    assert refused.status == 401 and not recorder.calls
    right = ForwardPool(host="127.0.0.1", port=port, size=1, token="secret")
    assert (await right.forward(head, BODY)).status == 200 and len(recorder.calls) == 1
    await wrong.close()
    await right.close()
    await listener.close()


async def test_an_oversized_frame_or_a_foreign_head_is_refused() -> None:
    recorder = Recorder()
    listener = ForwardListener(recorder, token=None, max_body_bytes=16)
    port = await listener.start(host="127.0.0.1")
    # A body over the bound: 413 before the body is read, and the stream is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_hello(None) + ForwardHead("m", "k", SELF).encode(17))
    assert b"more than the limit of 16" in await asyncio.wait_for(reader.read(1 << 16), 5)
    assert await asyncio.wait_for(reader.read(1 << 16), 5) == b""
    writer.close()
    # A well-framed call whose meta is not a forward head (the node's): 400, the stream goes on.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_hello(None) + InferHead("m").encode(0))
    answer = await asyncio.wait_for(reader.read(1 << 16), 5)
    assert b"400" in answer and b"malformed forward frame" in answer
    writer.close()
    assert not recorder.calls
    pool = ForwardPool(host="127.0.0.1", port=port, size=1)  # and it keeps serving
    assert (await pool.forward(ForwardHead("m", "k", SELF), b"x" * 16)).status == 200
    await pool.close()
    await listener.close()


async def test_a_lane_that_refuses_connections_fails_as_unreachable() -> None:
    from gpufaas.scheduler.local import free_port

    pool = ForwardPool(host="127.0.0.1", port=free_port(), size=1, connect_timeout_s=2.0)
    with pytest.raises(NodeUnreachable):
        await pool.forward(ForwardHead("m", "k", SELF), BODY)
    await pool.close()
