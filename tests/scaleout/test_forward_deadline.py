"""The client's deadline over a forward (docs/scheduling.md, "The client's deadline over a
forward"; sixteenth session, #16): the time left travels to the placement owner (the timeout
header over HTTP; the lane head's fifth line to an owner that advertises it, four lines to one
that does not, and a refused fifth line sent again with four); the sender waits at most the time
left (and a margin for the hop); a deadline that passes is the sender's 504, not a failed owner;
the owner runs the request under the time left; a bad fifth line is a 400."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench_support import load_bench
from hypothesis import given
from hypothesis import strategies as st
from replica_support import SELF, close_replicas, replica_with_owner

from gpufaas.core.frames import FrameError, InferHead, encode_hello
from gpufaas.core.http import REASON_HEADER, TIMEOUT_HEADER
from gpufaas.scheduler.forward_lane import (
    LANE_DEADLINE_KEY,
    LANE_PORT_KEY,
    ForwardHead,
    ForwardListener,
    LaneAnswer,
    lane_headers,
)
from gpufaas.scheduler.forwards import DEADLINE_MARGIN_S, DeadlinePassed
from gpufaas.scheduler.lanes import NodeCall
from gpufaas.scheduler.main import build_gateway
from gpufaas.scheduler.peers import static_peers
from gpufaas.scheduler.replica_setup import attach_replicas, lane_answer
from gpufaas.scheduler.replicas import Replicas
from gpufaas.scheduler.transport import NodeReply

OWNER = "http://127.0.0.1:1"  # the owner's HTTP port: nothing listens; only its lane answers
BODY = b'{"id": "r1", "inputs": []}'
CALL = NodeCall(
    "/v2/models/m/infer", BODY, {"content-type": "application/json"}, InferHead("m", None, None)
)
VALID = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
).encode()
HELD_S = 30.0  # how long a holding owner keeps a call; every test ends it sooner
LONG_S = 60.0  # a deadline no loaded box reaches: the tests that must not time out use it


class Owner:
    """The owner's answer function: records each call's head as it arrives, then answers 200,
    or (``hold``) only once ``release`` is set."""

    def __init__(self, *, hold: bool = False) -> None:
        self.heads: list[ForwardHead] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, head: ForwardHead, body: bytes) -> LaneAnswer:
        self.heads.append(head)
        await asyncio.wait_for(self.release.wait(), HELD_S)
        return 200, [(b"x-gpufaas-cache", b"miss")], b"answered"


def _older_decode(refused: list[bytes]) -> Callable[[memoryview | bytes], ForwardHead]:
    """An owner of before the fifth line: exactly four lines, else the frame is refused (as its
    decoder refused it: a 400 ``InvalidFrame``); ``refused`` collects the refused metas."""

    def decode(meta: memoryview | bytes) -> ForwardHead:
        if bytes(meta).count(b"\n") != 3:
            refused.append(bytes(meta))
            raise FrameError("a malformed forward frame: its meta must be 4 UTF-8 lines")
        return ForwardHead.decode(meta)

    return decode


@asynccontextmanager
async def lane_to(
    owner: Owner, *, advertised: bool, decode: Callable[[memoryview | bytes], ForwardHead] | None
) -> AsyncIterator[Replicas]:
    """A replica whose one peer, the placement owner, serves ``owner`` on its lane; its last
    heartbeat ``advertised`` the fifth line or not; ``decode``: the owner's head decoder."""
    listener = ForwardListener(owner, token=None, max_body_bytes=1 << 20)
    if decode is not None:
        listener.decode = decode
    port = await listener.start(host="127.0.0.1")
    asked: list[str] = []

    async def recover(key: str) -> NodeReply | None:
        asked.append(key)
        return None

    report: dict[str, object] = {LANE_PORT_KEY: port}
    if advertised:
        report[LANE_DEADLINE_KEY] = True

    async def heartbeat(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": OWNER, **report})  # alive while it holds a call

    replicas = replica_with_owner(OWNER, heartbeat=heartbeat, ownership="leader", recover=recover)
    replicas.membership.peers[OWNER].report = dict(report)
    replicas.recovered_keys = asked  # type: ignore[attr-defined]  # for the test's eyes only
    try:
        yield replicas
    finally:
        owner.release.set()
        await close_replicas(replicas)
        await listener.close()


async def _place(replicas: Replicas, *, deadline: float | None) -> NodeReply | None:
    # Bounded only so that a regression fails instead of hanging the suite.
    placed = await asyncio.wait_for(
        replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[], deadline=deadline),
        timeout=HELD_S,
    )
    return placed.reply


# -- the head ------------------------------------------------------------------------------------

_LINE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")


@given(
    model=st.text(_LINE, min_size=1, max_size=20),
    key=st.text(_LINE, min_size=1, max_size=20),
    sender=st.text(_LINE, min_size=1, max_size=20),
    length=st.none() | st.integers(min_value=0, max_value=1 << 40),
    timeout_ms=st.none()
    | st.floats(min_value=1e-9, max_value=1e12, allow_nan=False, allow_infinity=False),
)
def test_a_head_with_or_without_the_time_left_survives_its_frame(
    model: str, key: str, sender: str, length: int | None, timeout_ms: float | None
) -> None:
    head = ForwardHead(model, key, sender, length, timeout_ms)
    encoded = head.encode(7)
    meta_length = struct.unpack("!2sBBII", encoded[:12])[3]
    meta = encoded[12 : 12 + meta_length]
    assert ForwardHead.decode(meta) == head
    # no deadline: the four lines every owner reads, older ones included
    assert meta.count(b"\n") == (3 if timeout_ms is None else 4)


@pytest.mark.parametrize("line", [b"", b"soon", b"0", b"-5", b"nan", b"inf", b"1e999", b"\xff"])
def test_a_fifth_line_that_is_not_a_positive_number_of_milliseconds_is_refused(
    line: bytes,
) -> None:
    with pytest.raises(FrameError) as refused:
        ForwardHead.decode(b"m\n\nk\ns\n" + line)
    assert refused.value.status == 400
    assert "timeout_ms" in str(refused.value) or line == b"\xff"  # not UTF-8: the meta's error


async def test_a_bad_fifth_line_over_the_lane_is_a_400_naming_it_and_the_lane_serves_on() -> None:
    owner = Owner()
    listener = ForwardListener(owner, token=None, max_body_bytes=1 << 20)
    port = await listener.start(host="127.0.0.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    meta = b"m\n\nk\n" + SELF.encode() + b"\nsoon"
    writer.write(encode_hello(None) + b"GF\x01\x02" + struct.pack("!II", len(meta), 0) + meta)
    answer = await asyncio.wait_for(reader.read(1 << 16), 5)
    assert b"400" in answer and b"InvalidFrame" in answer and b"timeout_ms" in answer
    assert not owner.heads
    # the stream goes on: a good call on the same connection is answered
    writer.write(ForwardHead("m", "k", SELF, None, 100.0).encode(0))
    assert b"answered" in await asyncio.wait_for(reader.read(1 << 16), 5)
    assert owner.heads == [ForwardHead("m", "k", SELF, None, 100.0)]
    writer.close()
    await listener.close()


def test_the_owner_reads_the_time_left_as_the_deadline_header_it_reads_over_http() -> None:
    assert lane_headers(ForwardHead("m", "k", "s", None, 250.5)) == {TIMEOUT_HEADER: "250.5"}
    assert lane_headers(ForwardHead("m", "k", "s", 12)) == {"inference-header-content-length": "12"}


# -- the sender ----------------------------------------------------------------------------------


async def test_an_owner_that_advertises_the_fifth_line_gets_the_time_left() -> None:
    owner = Owner()
    async with lane_to(owner, advertised=True, decode=None) as replicas:
        reply = await _place(replicas, deadline=time.monotonic() + LONG_S)
        assert reply is not None and reply.status == 200
        ((head,),) = [owner.heads]
        assert head.timeout_ms is not None and 0 < head.timeout_ms <= LONG_S * 1000
        await _place(replicas, deadline=None)  # no deadline: four lines
        assert owner.heads[1].timeout_ms is None


async def test_an_owner_that_does_not_advertise_it_gets_four_lines_and_answers() -> None:
    owner, refused = Owner(), []
    async with lane_to(owner, advertised=False, decode=_older_decode(refused)) as replicas:
        reply = await _place(replicas, deadline=time.monotonic() + LONG_S)
        assert reply is not None and reply.status == 200 and reply.body == b"answered"
        assert not refused and [h.timeout_ms for h in owner.heads] == [None]


async def test_an_owner_that_advertised_it_and_stopped_reading_it_gets_the_call_again() -> None:
    """It restarted older on the same port: its 400 for the frame (nothing ran) is not the
    client's answer; the call goes again at once with four lines, and four go to it until its
    next heartbeat says otherwise."""
    owner, refused = Owner(), []
    async with lane_to(owner, advertised=True, decode=_older_decode(refused)) as replicas:
        reply = await _place(replicas, deadline=time.monotonic() + LONG_S)
        assert reply is not None and reply.status == 200 and reply.body == b"answered"
        assert len(refused) == 1 and [h.timeout_ms for h in owner.heads] == [None]
        assert replicas.metrics.forward_failures._value.get() == 0
        await _place(replicas, deadline=time.monotonic() + LONG_S)
        assert len(refused) == 1 and len(owner.heads) == 2


async def test_a_deadline_that_passes_first_is_given_up_and_the_owner_stays_on_the_ring() -> None:
    owner = Owner(hold=True)
    async with lane_to(owner, advertised=True, decode=None) as replicas:
        started = time.monotonic()
        with pytest.raises(DeadlinePassed):
            await _place(replicas, deadline=started + 0.2)
        waited = time.monotonic() - started
        # not before the deadline and its margin, and not for the owner (it holds for 30 s)
        assert waited + 0.01 >= 0.2 + DEADLINE_MARGIN_S and waited < HELD_S / 2
        assert len(owner.heads) == 1  # it was forwarded, with the time left
        assert replicas.metrics.forward_failures._value.get() == 0
        assert replicas.membership.peers[OWNER].reachable
        assert replicas.recovered_keys == []  # type: ignore[attr-defined]  # nothing recovered


async def test_a_deadline_already_past_is_not_forwarded() -> None:
    owner = Owner()
    async with lane_to(owner, advertised=True, decode=None) as replicas:
        with pytest.raises(DeadlinePassed):
            await _place(replicas, deadline=time.monotonic() - 0.001)
        assert not owner.heads
        assert replicas.metrics.forwarded.labels(OWNER)._value.get() == 0


async def test_an_http_forward_carries_no_more_than_the_clients_time_left() -> None:
    """An owner with no lane (older, or none): the time left goes in the timeout header, which
    every owner reads."""
    seen: list[dict[str, str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            except asyncio.IncompleteReadError:
                return
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            await reader.readexactly(int(headers.get("content-length", "0")))
            seen.append(headers)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    replicas = replica_with_owner(url, heartbeat=None, ownership="leader")
    try:
        placed = await asyncio.wait_for(
            replicas.place(
                "m", "n/0", call=CALL, size_bytes=1, victims=[], deadline=time.monotonic() + LONG_S
            ),
            timeout=HELD_S,
        )
        assert placed.reply is not None and placed.reply.status == 200
        await replicas.place("m", "n/0", call=CALL, size_bytes=1, victims=[])
    finally:
        await close_replicas(replicas)
        server.close()
    with_deadline, without = seen
    assert 0 < float(with_deadline[TIMEOUT_HEADER]) <= LONG_S * 1000
    assert TIMEOUT_HEADER not in without


# -- a real gateway and GPU manager at each end ---------------------------------------------------

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_manager() -> Any:
    module = load_bench(TESTS / "scheduler" / "tiny_manager.py", name="scaleout_tiny_manager")
    yield module
    sys.modules.pop("scaleout_tiny_manager", None)


class InferCalls:
    """ASGI middleware in front of the manager: how many infer calls reached it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            self.count += 1
        await self.app(scope, receive, send)


async def test_the_sender_answers_504_at_the_clients_deadline_and_runs_nothing_itself(
    tiny_manager: Any, tmp_path: Path, example_models_dir: Path
) -> None:
    """A sender gateway whose placement owner holds the forward past the client's deadline
    answers the client 504 ``DeadlineExceeded`` at about the deadline; it neither places the
    request itself nor counts the owner as failed."""
    from gpufaas.scheduler.gateway import answer_infer

    seen: list[InferCalls] = []

    def wrap(app: Any) -> InferCalls:
        seen.append(InferCalls(app))
        return seen[-1]

    owner = Owner(hold=True)
    listener = ForwardListener(owner, token=None, max_body_bytes=1 << 20)
    port = await listener.start(host="127.0.0.1")
    peer = "http://127.0.0.1:10"
    async with tiny_manager.tiny_mlp_manager(tmp_path, example_models_dir, wrap=wrap) as (
        url,
        functions,
    ):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        replicas = attach_replicas(
            gateway, self_url=SELF, discover=static_peers([SELF, peer]), token=None
        )
        replicas.membership.adopt([SELF, peer])
        report = {LANE_PORT_KEY: port, LANE_DEADLINE_KEY: True}

        async def heartbeat(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"id": peer, **report})  # alive while it holds

        member = replicas.membership.peers[peer]
        member.reachable, member.report = True, dict(report)
        member.client = httpx.AsyncClient(base_url=peer, transport=httpx.MockTransport(heartbeat))
        replicas.owner = lambda name: peer  # type: ignore[method-assign]  # the peer places

        async def read() -> bytes:
            return VALID

        try:
            status, headers, body = await asyncio.wait_for(
                answer_infer(gateway, "tiny-mlp", read, {TIMEOUT_HEADER: "200"}), HELD_S
            )
        finally:
            owner.release.set()
            await replicas.calls.close()
            await replicas.membership.close()
            await gateway.stop()
            await listener.close()
    assert status == 504, body
    assert dict(headers)[REASON_HEADER.encode()] == b"DeadlineExceeded"
    assert [h.timeout_ms is not None and h.timeout_ms <= 200 for h in owner.heads] == [True]
    assert seen[0].count == 0  # not placed here after the owner was given up
    assert replicas.metrics.forward_failures._value.get() == 0


async def test_with_decision_forwarding_the_client_gets_504_when_the_question_outlasts_it(
    tiny_manager: Any, tmp_path: Path, example_models_dir: Path
) -> None:
    """``--replica-forward decision``: an owner that holds the placement question (alive: its
    heartbeat answers) past the client's deadline; the client gets 504 ``DeadlineExceeded`` at
    about the deadline, never a 500, the question carried the time left, the request is not
    placed here, and the owner is not counted as failed."""
    from gpufaas.scheduler.gateway import answer_infer

    seen: list[InferCalls] = []

    def wrap(app: Any) -> InferCalls:
        seen.append(InferCalls(app))
        return seen[-1]

    questions: list[bytes] = []
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        questions.append(await reader.readexactly(int(headers.get("content-length", "0"))))
        await asyncio.wait_for(release.wait(), HELD_S)
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    peer = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with tiny_manager.tiny_mlp_manager(tmp_path, example_models_dir, wrap=wrap) as (
        url,
        functions,
    ):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        replicas = attach_replicas(
            gateway,
            self_url=SELF,
            discover=static_peers([SELF, peer]),
            token=None,
            forwarding="decision",
            forward_lane_port=None,
        )
        replicas.membership.adopt([SELF, peer])

        async def heartbeat(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json={"id": peer})  # alive while it holds the question

        member = replicas.membership.peers[peer]
        member.reachable = True
        member.client = httpx.AsyncClient(base_url=peer, transport=httpx.MockTransport(heartbeat))
        replicas.owner = lambda name: peer  # type: ignore[method-assign]  # the peer places

        async def read() -> bytes:
            return VALID

        try:
            status, headers, body = await asyncio.wait_for(
                answer_infer(gateway, "tiny-mlp", read, {TIMEOUT_HEADER: "200"}), HELD_S
            )
        finally:
            release.set()
            await replicas.calls.close()
            await replicas.membership.close()
            await gateway.stop()
            server.close()
    assert status == 504, body
    assert dict(headers)[REASON_HEADER.encode()] == b"DeadlineExceeded"
    assert [0 < json.loads(q)["timeout_ms"] <= 200 for q in questions] == [True]
    assert seen[0].count == 0  # not placed here after the question was given up
    assert replicas.metrics.forward_failures._value.get() == 0
    assert replicas.membership.peers[peer].reachable


async def test_the_owner_runs_a_forwarded_request_under_the_time_left(
    tiny_manager: Any, tmp_path: Path, example_models_dir: Path
) -> None:
    """The deadline is not lost at the hop: a time left that has passed by the owner's dispatch
    is the owner's own 504, and the manager never sees the call; without one it runs."""
    seen: list[InferCalls] = []

    def wrap(app: Any) -> InferCalls:
        seen.append(InferCalls(app))
        return seen[-1]

    async with tiny_manager.tiny_mlp_manager(tmp_path, example_models_dir, wrap=wrap) as (
        url,
        functions,
    ):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        await gateway.sync()
        replicas = attach_replicas(
            gateway, self_url=SELF, discover=static_peers([SELF]), token=None
        )
        answer = lane_answer(gateway)
        try:
            late = await answer(ForwardHead("tiny-mlp", uuid.uuid4().hex, "p", None, 1e-3), VALID)
            calls_after_late = seen[0].count
            plain = await answer(ForwardHead("tiny-mlp", uuid.uuid4().hex, "p"), VALID)
        finally:
            await replicas.calls.close()
            await replicas.membership.close()
            await gateway.stop()
    status, headers, _ = late
    assert status == 504 and dict(headers)[REASON_HEADER.encode()] == b"DeadlineExceeded"
    assert calls_after_late == 0
    assert plain[0] == 200 and seen[0].count == 1


async def test_a_replica_with_a_lane_advertises_that_it_reads_the_fifth_line(
    tiny_manager: Any, tmp_path: Path, example_models_dir: Path
) -> None:
    me = "http://127.0.0.1:9"  # its lane listens on this host
    async with tiny_manager.tiny_mlp_manager(tmp_path, example_models_dir) as (url, functions):
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        with_lane = attach_replicas(gateway, self_url=me, discover=static_peers([me]), token=None)
        await gateway.start()
        try:
            report: dict[str, object] = {}
            for _ in range(1500):  # until its lane listens (a background task)
                report = with_lane.membership.heartbeat()
                if LANE_PORT_KEY in report:
                    break
                await asyncio.sleep(0.02)
            assert report.get(LANE_PORT_KEY) is not None
            assert report.get(LANE_DEADLINE_KEY) is True
        finally:
            await with_lane.calls.close()
            await with_lane.membership.close()
            await gateway.stop()
        gateway = build_gateway(manager_urls={"node-0": url}, functions=functions)
        without = attach_replicas(
            gateway,
            self_url=me,
            discover=static_peers([me]),
            token=None,
            forward_lane_port=None,
        )
        report = without.membership.heartbeat()
        await without.calls.close()
        await without.membership.close()
        await gateway.stop()
        assert LANE_PORT_KEY not in report and LANE_DEADLINE_KEY not in report
