"""The gateway's own HTTP/2 gRPC front (``scheduler/grpc_h2.py``) against grpcio's real client:
unary calls, metadata and deadlines, flow control past every window in both directions, many
calls on one connection, statuses with rich details, limits, compression, cancellation, bad
peers, graceful stop, and the HPACK shortcut."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from hpack import Decoder, Encoder

from gpufaas.scheduler.grpc_h2 import (
    PREFACE,
    GrpcH2Server,
    RpcError,
    UnaryHandler,
    _Connection,
    parse_timeout,
)

ECHO = "/test.Service/Echo"
FAIL = "/test.Service/Fail"
WAIT = "/test.Service/Wait"
LIMIT = 32 * 2**20


class Recorder:
    def __init__(self) -> None:
        self.metadata: list[Mapping[str, str]] = []
        self.timeouts: list[float | None] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    def handlers(self) -> dict[str, UnaryHandler]:
        async def echo(message: bytes, metadata: Mapping[str, str], timeout: float | None) -> bytes:
            self.metadata.append(dict(metadata))
            self.timeouts.append(timeout)
            if message.startswith(b"big:"):
                return b"\x07" * int(message[4:])
            if message.startswith(b"nap:"):
                await asyncio.sleep(float(message[4:]))
            return message

        async def fail(message: bytes, metadata: Mapping[str, str], timeout: float | None) -> bytes:
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
            status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message.decode())
            status.details.add().Pack(retry)
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                message.decode(),
                details=status.SerializeToString(),
            )

        async def wait(message: bytes, metadata: Mapping[str, str], timeout: float | None) -> bytes:
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return b"released"

        return {ECHO: echo, FAIL: fail, WAIT: wait}


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcH2Server, Recorder]]:
    recorder = Recorder()
    server = GrpcH2Server(recorder.handlers(), host="127.0.0.1", port=0, max_message_bytes=LIMIT)
    await server.start()
    yield server, recorder
    await server.stop(grace=0)


def _channel(server: GrpcH2Server, **kwargs: object) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        **kwargs,  # type: ignore[arg-type]
    )


async def test_a_unary_call_carries_metadata_and_its_deadline(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, recorder = served
    async with _channel(server) as channel:
        echo = channel.unary_unary(ECHO)
        assert await echo(b"hello", metadata=(("x-key", "v1"),), timeout=5) == b"hello"
        assert await echo(b"", timeout=None) == b""  # an empty message is still one message
    assert recorder.metadata[0]["x-key"] == "v1"
    first = recorder.timeouts[0]
    # grpc's client writes the time left rounded up (to three significant figures), and on a
    # busy machine a 5 s timeout has arrived as 5.01 s (twice in CI-like runs, 2026-12-06).
    assert first is not None and 4 < first <= 5.1
    assert recorder.timeouts[1] is None


async def test_messages_larger_than_every_window_cross_both_ways(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    """20 MiB in (past our 16 MiB windows: we must keep acknowledging) and 20 MiB out (past
    the client's windows: we must wait for its WINDOW_UPDATEs), byte-exact."""
    server, _ = served
    request = bytes(range(256)) * (20 * 2**12)
    async with _channel(server) as channel:
        echo = channel.unary_unary(ECHO)
        assert await echo(request, timeout=60) == request
        answer = await echo(b"big:%d" % (20 * 2**20), timeout=60)
        assert answer == b"\x07" * (20 * 2**20)


async def test_many_calls_at_once_on_one_connection_each_get_their_own_answer(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, _ = served
    async with _channel(server) as channel:
        echo = channel.unary_unary(ECHO)
        messages = [b"nap:0.00%d" % (i % 7) if i % 2 else b"plain-%d" % i for i in range(60)]
        answers = await asyncio.gather(*(echo(m, timeout=30) for m in messages))
    assert answers == messages


async def test_an_error_carries_its_code_message_and_rich_details(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, _ = served
    text = "busy: 100% of 'tiny' — retry later\nsecond line"
    async with _channel(server) as channel:
        fail = channel.unary_unary(FAIL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fail(text.encode(), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == text
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds == 3
        assert await channel.unary_unary(ECHO)(b"still here", timeout=10) == b"still here"


async def test_an_unknown_method_is_unimplemented(served: tuple[GrpcH2Server, Recorder]) -> None:
    """Twice on one channel: the second call's header block is all indexed fields, so its head
    (refusal included) is the remembered one."""
    server, _ = served
    async with _channel(server) as channel:
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Service/Nope")(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "/test.Service/Nope" in (info.value.details() or "")
        assert await channel.unary_unary(ECHO)(b"served", timeout=10) == b"served"


async def test_a_message_over_the_limit_is_resource_exhausted_and_serving_goes_on(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, _ = served
    async with _channel(server) as channel:
        echo = channel.unary_unary(ECHO)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(b"\x00" * (LIMIT + 1), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(LIMIT) in (info.value.details() or "")
        assert await echo(b"next", timeout=10) == b"next"


async def test_a_gzip_compressed_request_is_inflated(served: tuple[GrpcH2Server, Recorder]) -> None:
    server, _ = served
    message = b"compress me " * 10_000
    async with _channel(server, compression=grpc.Compression.Gzip) as channel:
        assert await channel.unary_unary(ECHO)(message, timeout=10) == message


async def test_a_call_the_client_gives_up_on_cancels_its_handler(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, recorder = served
    async with _channel(server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(WAIT)(b"", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(recorder.cancelled.wait(), 10)  # its RST_STREAM reached us
        assert await channel.unary_unary(ECHO)(b"ok", timeout=10) == b"ok"


async def _raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    writer.close()
    return received


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
        PREFACE + (2**20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01",  # a frame too big
        PREFACE + b"\x00\x00\x03\x01\x05\x00\x00\x00\x01\xff\xff\xff",  # a broken header block
        PREFACE + b"\x00\x00\x00\x01\x05\x00\x00\x00\x02",  # HEADERS on an even stream
        PREFACE  # a header block that never ends: CONTINUATION frames past 16 KiB
        + b"\x00\x00\x00\x01\x00\x00\x00\x00\x01"
        + (b"\x00\x40\x00\x09\x00\x00\x00\x00\x01" + b"\x00" * 0x4000) * 2,
    ],
    ids=["http1", "frame-too-big", "bad-hpack", "even-stream", "endless-header-block"],
)
async def test_a_peer_that_breaks_the_protocol_loses_its_connection_only(
    served: tuple[GrpcH2Server, Recorder], garbage: bytes
) -> None:
    server, _ = served
    async with _channel(server) as channel:
        echo = channel.unary_unary(ECHO)
        assert await echo(b"before", timeout=10) == b"before"
        await _raw_exchange(server.port, garbage)  # closed by the server, not left hanging
        assert await echo(b"after", timeout=10) == b"after"


def _echo_call_headers() -> bytes:
    """A new connection's HPACK block for a unary call to the echo method."""
    return Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", ECHO),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
    )


async def test_a_bad_request_framing_is_a_status_not_a_hang(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    """HEADERS, then a DATA frame whose gRPC length prefix lies: answered INTERNAL."""
    server, _ = served
    block = _echo_call_headers()
    headers = len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block
    body = b"\x00\x00\x00\x00\x09abc"  # says 9 bytes, carries 3
    data = len(body).to_bytes(3, "big") + b"\x00\x01" + (1).to_bytes(4, "big") + body
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + headers + data)
    received = b""
    while b"grpc-status" not in received:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "closed without an answer"
        received += chunk
    writer.close()
    assert b"grpc-status\x0213" in received  # INTERNAL, in a literal we can read as is


async def _frames(reader: asyncio.StreamReader, *, until: int) -> list[tuple[int, int, int, bytes]]:
    """Frames from the server, (type, flags, stream, payload), up to one of type ``until``."""
    frames = []
    while not frames or frames[-1][0] != until:
        head = await asyncio.wait_for(reader.readexactly(9), 10)
        payload = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[:3], "big")), 10)
        frames.append((head[3], head[4], int.from_bytes(head[5:9], "big"), payload))
    return frames


async def test_an_answer_never_exceeds_the_peers_window(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    """A peer whose streams start with an 8-byte window gets 8 bytes of a 25-byte answer, and
    the rest only after its WINDOW_UPDATE (an answer sent whole at once would break its flow
    control)."""
    server, _ = served
    block = _echo_call_headers()
    message = b"twenty bytes of echo"
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    settings = (4).to_bytes(2, "big") + (8).to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            PREFACE
            + len(settings).to_bytes(3, "big") + b"\x04\x00" + bytes(4) + settings
            + len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block
            + len(body).to_bytes(3, "big") + b"\x00\x01" + (1).to_bytes(4, "big") + body
        )  # fmt: skip
        first = [f for f in await _frames(reader, until=0) if f[2] == 1]  # up to its first DATA
        assert [(kind, len(payload)) for kind, _, _, payload in first] == [
            (1, len(first[0][3])),
            (0, 8),
        ]
        with pytest.raises(asyncio.TimeoutError):  # nothing more until the window opens
            await asyncio.wait_for(reader.readexactly(1), 0.3)
        writer.write(b"\x00\x00\x04\x08\x00" + (1).to_bytes(4, "big") + (100).to_bytes(4, "big"))
        rest = await _frames(reader, until=1)  # the rest of the DATA, then the trailers
        data = first[1][3] + b"".join(p for kind, _, _, p in rest if kind == 0)
        assert data == body
        assert rest[-1][1] & 0x1  # END_STREAM on the trailers
    finally:
        writer.close()


async def test_answers_index_their_fields_and_follow_the_clients_table_size(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    """After the first answer, an answer's header blocks are one byte per field (content-type
    and grpc-status from the client's HPACK table). When the client shrinks its table below
    them, the next block opens with a table size update (else an HPACK decoder that holds to
    its SETTINGS, as hpack's does, fails) and the fields go back to literals; when it grows the
    table again, they are indexed again."""
    server, _ = served
    encoder, decoder = Encoder(), Decoder()
    message = b"echo"
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    stream = -1

    def settings(table_size: int) -> bytes:
        payload = (1).to_bytes(2, "big") + table_size.to_bytes(4, "big")
        return len(payload).to_bytes(3, "big") + b"\x04\x00" + bytes(4) + payload

    async def call() -> tuple[bytes, bytes]:
        """One echo call; its answer's two header blocks, checked by decoding them."""
        nonlocal stream
        stream += 2
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", ECHO),
                                (":authority", "x"), ("content-type", "application/grpc")])  # fmt: skip
        writer.write(
            len(block).to_bytes(3, "big") + b"\x01\x04" + stream.to_bytes(4, "big") + block
            + len(body).to_bytes(3, "big") + b"\x00\x01" + stream.to_bytes(4, "big") + body
        )  # fmt: skip
        blocks: list[bytes] = []
        while len(blocks) < 2:
            frame = (await _frames(reader, until=1))[-1]
            if frame[2] == stream:
                blocks.append(frame[3])
        headers, trailers = blocks
        assert decoder.decode(headers) == [(":status", "200"), ("content-type", "application/grpc")]
        assert decoder.decode(trailers) == [("grpc-status", "0")]
        return headers, trailers

    try:
        writer.write(PREFACE + settings(4096))
        first = await call()
        assert b"application/grpc" in first[0]  # added to the table by this one
        assert await call() == (b"\x88\xbf", b"\xbe")
        writer.write(settings(64))  # too small for both fields
        decoder.max_allowed_table_size = 64
        shrunk = await call()
        assert shrunk[0].startswith(b"\x20")  # the size update first
        assert b"application/grpc" in shrunk[0] and b"grpc-status" in shrunk[1]
        assert b"grpc-status" in (await call())[1]  # literals from now on
        writer.write(settings(4096))
        decoder.max_allowed_table_size = 4096
        await call()
        assert await call() == (b"\x88\xbf", b"\xbe")
    finally:
        writer.close()


async def test_stop_lets_calls_in_flight_finish_and_refuses_new_connections(
    served: tuple[GrpcH2Server, Recorder],
) -> None:
    server, recorder = served
    async with _channel(server) as channel:
        call = asyncio.ensure_future(channel.unary_unary(WAIT)(b"", timeout=30))
        await asyncio.wait_for(recorder.started.wait(), 10)
        stopping = asyncio.ensure_future(server.stop(grace=10))
        await asyncio.sleep(0.1)
        recorder.release.set()
        assert await call == b"released"
        await stopping
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 2):
        pass


def test_a_port_in_use_is_an_error_at_once() -> None:
    first = GrpcH2Server({}, host="127.0.0.1", port=0, max_message_bytes=1)
    try:
        with pytest.raises(OSError):
            GrpcH2Server({}, host="127.0.0.1", port=first.port, max_message_bytes=1)
    finally:
        first.socket.close()


def test_indexed_only_blocks_are_remembered_only_while_the_table_stands() -> None:
    """The same indexed-only bytes mean another header once a literal changed the table:
    the remembered list must be dropped then (remove the clearing and this fails)."""
    server = GrpcH2Server({}, host="127.0.0.1", port=0, max_message_bytes=1)
    try:
        connection = _Connection(server)
        encoder = Encoder()
        adds_a = encoder.encode([(":path", "/a")])  # literal, indexed as entry 62
        refers = encoder.encode([(":path", "/a")])  # now one byte: entry 62
        assert refers == b"\xbe"
        assert connection.header_blocks.decode(adds_a).headers == [(b":path", b"/a")]
        assert connection.header_blocks.decode(refers).path == "/a"
        assert connection.header_blocks.decode(refers) is connection.header_blocks.decode(
            refers
        )  # remembered
        assert connection.header_blocks.decode(encoder.encode([(":path", "/b")])).path == "/b"
        head = connection.header_blocks.decode(b"\xbe")  # entry 62 is /b now
        assert (head.headers, head.path) == ([(b":path", b"/b")], "/b")
    finally:
        server.socket.close()


class _Sink:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, data: list[bytes]) -> None:
        self.written += b"".join(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...


def _answers(written: bytes) -> dict[int, bytes]:
    """Each stream's answer message, from the server's frames (DATA payloads, prefix cut)."""
    answers: dict[int, bytes] = {}
    at = 0
    while at + 9 <= len(written):
        length, kind = int.from_bytes(written[at : at + 3], "big"), written[at + 3]
        stream = int.from_bytes(written[at + 5 : at + 9], "big")
        assert kind != 7, "GOAWAY"
        if kind == 0:
            answers[stream] = answers.get(stream, b"") + written[at + 9 : at + 9 + length]
        at += 9 + length
    return {stream: data[5:] for stream, data in answers.items()}


async def test_a_call_cut_anywhere_across_reads_is_answered() -> None:
    """Reads that end mid-frame (a frame's header or its payload cut in two) keep what is left
    for the next read, whether the read was parsed from the connection's buffer or straight
    from the socket's bytes (the usual case, nothing left over): each call is answered."""
    recorder = Recorder()
    server = GrpcH2Server(recorder.handlers(), host="127.0.0.1", port=0, max_message_bytes=LIMIT)
    try:
        connection, sink = _Connection(server), _Sink()
        connection.connection_made(sink)  # type: ignore[arg-type]
        connection.data_received(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        encoder = Encoder()

        def call(stream: int, message: bytes) -> bytes:
            block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", ECHO),
                                    (":authority", "x"), ("content-type", "application/grpc")])  # fmt: skip
            body = b"\x00" + len(message).to_bytes(4, "big") + message
            return (
                len(block).to_bytes(3, "big") + b"\x01\x04" + stream.to_bytes(4, "big") + block
                + len(body).to_bytes(3, "big") + b"\x00\x01" + stream.to_bytes(4, "big") + body
            )  # fmt: skip

        async def answered(*pieces: bytes) -> None:
            for piece in pieces:
                connection.data_received(piece)
            for _ in range(10):
                await asyncio.sleep(0)

        await answered(call(1, b"whole"))
        three = call(3, b"cut in the DATA frame's header")
        headers_end = three.index(b"\x00\x01\x00\x00\x00\x03") - 3  # where DATA starts
        await answered(three[: headers_end + 4], three[headers_end + 4 :])
        five = call(5, b"cut in the payload")
        await answered(five[:-3], five[-3:])
        seven = call(7, b"cut in three")
        await answered(seven[:5], seven[5:-1], seven[-1:])
        await answered(call(9, b"whole again"))
        assert _answers(bytes(sink.written)) == {
            1: b"whole",
            3: b"cut in the DATA frame's header",
            5: b"cut in the payload",
            7: b"cut in three",
            9: b"whole again",
        }
    finally:
        server.socket.close()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("100m", 0.1), ("2S", 2.0), ("1H", 3600.0), ("5u", 5e-6), ("7n", 7e-9), ("3M", 180.0)],
)
def test_grpc_timeout_values(value: str, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "10", "10x", "123456789S", "-1S"])
def test_malformed_grpc_timeouts_are_ignored(value: str) -> None:
    assert parse_timeout(value) is None


async def test_unfinished_calls_cannot_pile_up_in_one_connections_memory() -> None:
    """Three calls on one connection, each short of the 1 MiB limit and none finished: the one
    that takes the unfinished bytes past two messages' worth is RESOURCE_EXHAUSTED (without
    the bound, 256 such calls could hold 256 messages of the limit's size)."""
    recorder = Recorder()
    server = GrpcH2Server(recorder.handlers(), host="127.0.0.1", port=0, max_message_bytes=2**20)
    await server.start()
    try:
        encoder = Encoder()
        out = [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"]
        chunk = bytes(16_384)
        for sid in (1, 3, 5):
            block = encoder.encode(
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", ECHO),
                    (":authority", "x"),
                    ("content-type", "application/grpc"),
                ]
            )
            out.append(len(block).to_bytes(3, "big") + b"\x01\x04" + sid.to_bytes(4, "big") + block)
            frame = len(chunk).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + chunk
            out.extend([frame] * 56)  # 0.875 MiB each, no END_STREAM
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"".join(out))
        await writer.drain()
        received = b""
        while b"grpc-status" not in received:
            got = await asyncio.wait_for(reader.read(65536), 10)
            assert got, "closed without an answer"
            received += got
        writer.close()
        assert b"grpc-status\x018" in received  # RESOURCE_EXHAUSTED, for the third call
        assert recorder.metadata == []  # no handler ran
    finally:
        await server.stop(grace=0)
