"""Forwarding between cluster members through a real PeerServer on loopback (TCP and unix sockets): what
arrives equals what was sent, batching, order, retries, re-routing, bounded queues and bad input."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from sampler.buffer import DecisionCache, Trace, TraceBuffer
from sampler.cluster.forward import (
    FORMAT_VERSION,
    FRAME_HEADER,
    MAGIC,
    TRACE_RECORD,
    TRACES,
    Backoff,
    ForwardedDecision,
    Forwarder,
    PeerOverloaded,
    PeerServer,
    Reply,
    TracesMessage,
    decode_body,
    decode_message,
    encode_body,
    encode_decisions,
    encode_traces,
)
from sampler.config import ForwardConfig, TailSamplingConfig
from sampler.otlp_wire import Scope
from sampler.receivers.otlp_decode import decode_json, decode_protobuf
from tests.cluster.summarized import summarize
from tests.conftest import free_port, wait_for
from tests.otlp_data import make_request

TESTDATA = Path("/work/shared/testdata/otlp/trace.json")
FAST_RETRY = Backoff(initial=0.02, maximum=0.1)
DECISIONS = [
    ForwardedDecision(bytes([1]) * 16, True, "errors", 1.0),
    ForwardedDecision(bytes([2]) * 16, False, "", 0.0),
    ForwardedDecision(bytes([3]) * 16, True, "probabilistic", 0.125),
    ForwardedDecision(bytes([4]) * 16, True, "errors", 1.0),
]

TraceView = tuple[tuple[bytes, int, int, int, int, int, bool], list[tuple[bytes, bytes, bytes]], int]


def trace_view(trace: Trace) -> TraceView:
    """Everything a forwarded trace holds: its summary, its runs with their scopes' bytes, its size."""
    runs = [(scope.resource, scope.scope, run) for scope, run in trace.runs()]
    return trace.summary(), runs, trace.nbytes


def views(traces: list[Trace]) -> list[TraceView]:
    return [trace_view(trace) for trace in traces]


def varied_request() -> ExportTraceServiceRequest:
    """Two resources (one with a schema url), three scopes; roots, children, an all-zero parent id,
    every status code and two outside the enum, attributes, events and a large span; two traces."""
    request = ExportTraceServiceRequest()
    codes = [0, 1, 2, 5, -3]
    for service, schema_url in (("checkout", ""), ("payment", "https://opentelemetry.io/schemas/1.21.0")):
        resource_spans = request.resource_spans.add(schema_url=schema_url)
        resource_spans.resource.attributes.append(
            KeyValue(key="service.name", value=AnyValue(string_value=service))
        )
        for library in ("http", "db"):
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.name = f"{service}.{library}"
            scope_spans.scope.version = "1.0"
            for index, code in enumerate(codes):
                span = scope_spans.spans.add(
                    trace_id=bytes(range(1 + index % 2, 17 + index % 2)),
                    span_id=bytes([index + 1, len(request.resource_spans), 0, 0, 0, 0, 0, 9]),
                    name=f"{library} op {index}",
                    start_time_unix_nano=1_700_000_000_000_000_000 + index,
                    end_time_unix_nano=(1 << 64) - 1 - index,
                )
                if index == 1:
                    span.parent_span_id = bytes(8)  # present, all zero: a root by the spec
                elif index > 1:
                    span.parent_span_id = bytes([1, 1, 0, 0, 0, 0, 0, 9])
                span.status.code = code
                span.attributes.append(
                    KeyValue(key="db.statement", value=AnyValue(string_value="x" * index * 50))
                )
                span.events.add(name="retry", time_unix_nano=5)
    big = (
        request.resource_spans[0]
        .scope_spans[0]
        .spans.add(trace_id=bytes(range(1, 17)), span_id=b"\x07" * 8, name="big")
    )
    big.attributes.append(KeyValue(key="payload", value=AnyValue(string_value="y" * 40_000)))
    return request


def sample_traces() -> list[Trace]:
    """Real OTLP data summarized for forwarding: protobuf and the OTLP JSON example."""
    return summarize(decode_protobuf(varied_request().SerializeToString())) + summarize(
        decode_json(TESTDATA.read_bytes())
    )


def scopes_of(traces: list[Trace]) -> list[Scope]:
    return [scope for trace in traces for scope, _ in trace.runs()]


def small_traces() -> list[Trace]:
    """One trace of 2 spans (random ids), summarized for forwarding."""
    traces = summarize(decode_protobuf(make_request(traces=1, spans_per_trace=2).SerializeToString()))
    assert len(traces) == 1
    return traces


class Peer:
    """A PeerServer on loopback recording what its handlers got, in order; scopes are interned (and
    checked) by a trace buffer, as a member's are."""

    def __init__(self, port: int = 0, unix_path: str | None = None) -> None:
        self.received: list[tuple[list[Trace], int]] = []
        self.rings: list[int] = []
        self.decisions: list[ForwardedDecision] = []
        # Raised by the next traces handler calls, one each, before it records anything.
        self.failures: list[Exception] = []
        self.buffer = TraceBuffer(TailSamplingConfig(), frozenset(), DecisionCache(0, 0), lambda: 0.0)
        self.server = PeerServer(
            f"127.0.0.1:{port}",
            self.on_traces,
            self.decisions.extend,
            intern_scope=self.buffer.intern_scope,
            unix_path=unix_path,
            max_request_bytes=256 * 1024,
        )

    def on_traces(self, traces: list[Trace], hops: int, ring: int) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.received.append((traces, hops))
        self.rings.append(ring)

    @property
    def address(self) -> str:
        if self.server.unix_path is not None:
            return f"unix:{self.server.unix_path}"
        return f"127.0.0.1:{self.server.port}"

    def span_count(self) -> int:
        return sum(trace.span_count for traces, _ in self.received for trace in traces)

    def hops(self) -> list[int]:
        return [hops for _, hops in self.received]


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    server = Peer()
    await server.server.start()
    yield server
    await server.server.stop()


ForwarderFactory = Callable[..., Forwarder]


@pytest.fixture
async def make_forwarder() -> AsyncIterator[ForwarderFactory]:
    forwarders: list[Forwarder] = []

    def make(**settings: Any) -> Forwarder:
        # One request in flight unless a test says otherwise: the order of arrival is then the order sent.
        settings = {"max_delay": 0.01, "timeout": 2.0, "max_in_flight": 1, **settings}
        forwarder = Forwarder(ForwardConfig(**settings), backoff=FAST_RETRY)
        forwarders.append(forwarder)
        return forwarder

    yield make
    for forwarder in forwarders:
        await forwarder.close()


def frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body)) + body


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    return Reply.decode(await reader.readexactly(size))


async def exchange(peer: Peer, *bodies: bytes) -> list[Reply]:
    """Send each body as a request frame on one connection, waiting for each reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    try:
        writer.write(MAGIC)
        replies = []
        for body in bodies:
            writer.write(frame(body))
            replies.append(await read_reply(reader))
        return replies
    finally:
        writer.close()


async def post(peer: Peer, body: bytes) -> tuple[int, str]:
    (reply,) = await exchange(peer, body)
    return reply.status, reply.text


# -- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_a_request_of_more_runs_than_one_write_takes_arrives_whole(
    transport: str, tmp_path: Path, make_forwarder: ForwarderFactory
) -> None:
    """Each run is written as its own part (no join): 1500 traces of one run each, more than the 1024
    buffers one writev takes, arrive as one request with every span."""
    receiver = Peer(unix_path=str(tmp_path / "peer.sock") if transport == "unix" else None)
    await receiver.server.start()
    try:
        forwarder = make_forwarder()
        traces = summarize(decode_protobuf(make_request(traces=1500, spans_per_trace=1).SerializeToString()))
        assert len(traces) == 1500
        assert forwarder.send_traces(receiver.address, traces, hops=1)
        assert await forwarder.flush(10.0)
        assert len(receiver.received) == 1
        received, _ = receiver.received[0]
        assert views(received) == views(traces)
        assert forwarder.peer_stats(receiver.address).requests == 1
    finally:
        await receiver.server.stop()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_every_trace_field_and_span_arrives_as_sent(
    transport: str, tmp_path: Path, make_forwarder: ForwarderFactory
) -> None:
    receiver = Peer(unix_path=str(tmp_path / "peer.sock") if transport == "unix" else None)
    await receiver.server.start()
    try:
        forwarder = make_forwarder()
        traces = sample_traces()
        assert forwarder.send_traces(receiver.address, traces, hops=2)
        assert await forwarder.flush(5.0)
        assert len(receiver.received) == 1
        received, hops = receiver.received[0]
        assert hops == 2
        assert views(received) == views(traces)
        # The summaries as the sender made them: roots (absent or all-zero parent), codes, times.
        first, second = bytes(range(1, 17)), bytes(range(2, 18))
        by_id = {trace.trace_id: trace for trace in received}
        assert by_id[first].root_seen and by_id[second].root_seen
        assert by_id[first].max_end_ns == (1 << 64) - 1
        # Codes 0 (unset), 2 and -3 (masked), then 1 and 5.
        assert by_id[first].status_codes == 1 | 1 << 2 | 1 << (-3 & 31)
        assert by_id[second].status_codes == 1 << 1 | 1 << 5
        # The scopes are the receiving buffer's interned ones, shared by every trace of the request.
        scopes = {id(scope) for trace in received for scope, _ in trace.runs()}
        assert len(scopes) == len({(scope.resource, scope.scope) for scope in scopes_of(traces)})
        stats = forwarder.peer_stats(receiver.address)
        sent_spans = sum(trace.span_count for trace in traces)
        assert (stats.spans, stats.requests, stats.failures) == (sent_spans, 1, 0)
        assert stats.bytes > sum(trace.nbytes for trace in traces)
        assert receiver.server.stats.spans == sent_spans
        assert forwarder.pending(receiver.address).messages == 0
    finally:
        await receiver.server.stop()


async def test_decisions_and_traces_round_trip(peer: Peer, make_forwarder: ForwarderFactory) -> None:
    forwarder = make_forwarder()
    first, second = small_traces(), sample_traces()
    assert forwarder.send_decisions(peer.address, DECISIONS)
    assert forwarder.send_traces(peer.address, first, hops=1, ring=12345)
    assert forwarder.send_traces(peer.address, second, hops=0)
    assert await forwarder.flush(5.0)
    # Decisions are grouped by outcome on the wire: which ones arrive is kept, not their order.
    assert sorted(peer.decisions) == sorted(DECISIONS)
    assert [(views(traces), hops) for traces, hops in peer.received] == [
        (views(first), 1),
        (views(second), 0),
    ]
    assert peer.rings == [12345, 0]
    assert forwarder.peer_stats(peer.address).decisions == len(DECISIONS)


async def test_traces_and_decisions_over_a_batch_go_in_messages_the_peer_takes(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    """A handover (or a large request) queued at once: cut into messages of a batch at most, it arrives
    whole at a peer that takes requests of 256 KiB at most, instead of being refused (413) for good."""
    forwarder = make_forwarder(max_batch_bytes=64 * 1024)
    traces = summarize(make_request(traces=2000, spans_per_trace=5).SerializeToString())
    assert sum(trace.nbytes for trace in traces) > 2 * 256 * 1024  # over the peer's limit, as one message
    many = [
        ForwardedDecision(bytes([n % 256, n // 256]) * 8, n % 2 == 0, f"p{n % 3}", 0.5) for n in range(40_000)
    ]
    assert forwarder.send_traces(peer.address, traces, hops=4, force=True)
    assert forwarder.send_decisions(peer.address, many)
    pending = forwarder.pending(peer.address)
    assert pending.messages > 16 and pending.spans == 10_000 and pending.decisions == len(many)
    assert await forwarder.flush(10.0)
    stats = forwarder.peer_stats(peer.address)
    assert (stats.spans, stats.rejected_spans) == (10_000, 0)
    assert (stats.decisions, stats.rejected_decisions) == (40_000, 0)
    assert peer.server.stats.malformed == 0
    # Every trace once, in the order queued.
    assert [trace.trace_id for traces, _ in peer.received for trace in traces] == [t.trace_id for t in traces]
    assert {hops for _, hops in peer.received} == {4}
    assert sorted(peer.decisions) == sorted(many)


def test_traces_travel_as_a_header_and_their_runs_and_decisions_need_whole_ids() -> None:
    traces = summarize(make_request(2, 3).SerializeToString())
    message = msgpack.unpackb(encode_traces(traces, hops=0))
    assert message[:2] == [TRACES, 0]
    scopes, records, run_scopes, run_lengths, ring = msgpack.unpackb(message[2])
    assert ring == 0  # not given: unknown
    assert len(scopes) == 1 and run_scopes == [0, 0]
    assert [record[0] for record in TRACE_RECORD.iter_unpack(records)] == [t.trace_id for t in traces]
    assert message[3] == b"".join(run for trace in traces for _, run in trace.runs())
    assert run_lengths == [len(run) for trace in traces for _, run in trace.runs()]
    # A message msgpack wrote (not the sender's shape) decodes the same.
    decoded = decode_message(message)
    assert isinstance(decoded, TracesMessage) and views(decoded.traces) == views(traces)
    (fast,) = decode_body(encode_body([encode_traces(traces, hops=0)]))
    assert isinstance(fast, TracesMessage) and views(fast.traces) == views(traces)
    with pytest.raises(ValueError, match="16 bytes"):
        encode_decisions([ForwardedDecision(b"short", True, "p", 1.0)])


# -- batching and order ------------------------------------------------------------------------------------


async def test_a_batch_is_sent_once_it_reaches_max_batch_bytes(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    # The delay would hold messages for a minute: only the size limit can send them.
    forwarder = make_forwarder(max_batch_bytes=2000, max_delay=60.0)
    message_bytes = len(encode_traces(small_traces(), 0))
    count = 4 * 2000 // message_bytes
    for number in range(count):
        assert forwarder.send_traces(peer.address, small_traces(), hops=number)
    # Everything but the last, partial batch goes out by size.
    await wait_for(lambda: len(peer.received) >= count - 2000 // message_bytes, timeout=5.0)
    assert peer.server.stats.requests >= 3
    assert peer.hops() == list(range(len(peer.received)))
    await wait_for(
        lambda: forwarder.pending(peer.address).messages == count - len(peer.received), timeout=5.0
    )


async def test_a_batch_is_sent_max_delay_after_its_first_message(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    forwarder = make_forwarder(max_delay=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for number in range(3):
        assert forwarder.send_traces(peer.address, small_traces(), hops=number)
    assert forwarder.pending(peer.address).spans == 6
    await wait_for(lambda: len(peer.received) == 3, timeout=5.0)
    assert loop.time() - started >= 0.3 - 0.02  # not before the delay (timer granularity aside)
    assert peer.server.stats.requests == 1
    assert peer.hops() == [0, 1, 2]


async def test_order_is_kept_across_many_requests(peer: Peer, make_forwarder: ForwarderFactory) -> None:
    forwarder = make_forwarder(max_batch_bytes=3000, max_delay=0.001)
    for number in range(300):
        assert forwarder.send_traces(peer.address, small_traces(), hops=number)
        if number % 50 == 0:
            await asyncio.sleep(0)  # let requests go out while more are queued
    assert await forwarder.flush(10.0)
    assert peer.hops() == list(range(300))
    assert peer.server.stats.requests > 10


# -- failures ----------------------------------------------------------------------------------------------


async def test_several_requests_in_flight_deliver_everything_exactly_once(
    make_forwarder: ForwarderFactory,
) -> None:
    port = free_port()
    forwarder = make_forwarder(max_in_flight=4, max_batch_bytes=300)
    address = f"127.0.0.1:{port}"
    for hops in range(40):
        assert forwarder.send_traces(address, small_traces(), hops=hops)
    await asyncio.sleep(0.1)  # the peer is down: every sender fails and retries
    receiver = Peer(port=port)
    await receiver.server.start()
    try:
        assert await forwarder.flush(5.0)
        assert sorted(receiver.hops()) == list(range(40))
        assert receiver.span_count() == 80
    finally:
        await receiver.server.stop()


async def test_a_peer_down_then_up_gets_everything_once_in_order(make_forwarder: ForwarderFactory) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    forwarder = make_forwarder(max_batch_bytes=1500)
    for number in range(10):
        assert forwarder.send_traces(address, small_traces(), hops=number)
    stats = forwarder.peer_stats(address)
    await wait_for(lambda: stats.failures >= 2, timeout=5.0)
    assert forwarder.pending(address).spans == 20
    receiver = Peer(port=port)
    await receiver.server.start()
    try:
        await wait_for(lambda: receiver.span_count() == 20, timeout=5.0)
        assert await forwarder.flush(5.0)
        assert receiver.hops() == list(range(10))
        trace_ids = [trace.trace_id for traces, _ in receiver.received for trace in traces]
        assert len(trace_ids) == len(set(trace_ids)) == 10
        assert stats.retries >= 2 and stats.spans == 20
        assert forwarder.pending(address).messages == 0
    finally:
        await receiver.server.stop()


async def test_a_peer_that_restarted_between_requests_is_reached_without_a_failed_attempt(
    make_forwarder: ForwarderFactory,
) -> None:
    port = free_port()
    forwarder = make_forwarder()
    for _ in range(2):
        receiver = Peer(port=port)
        await receiver.server.start()
        try:
            assert forwarder.send_traces(receiver.address, small_traces(), hops=0)
            assert await forwarder.flush(5.0)
            assert receiver.span_count() == 2
        finally:
            await receiver.server.stop()  # closes the sender's idle connection
        await asyncio.sleep(0.05)
    stats = forwarder.peer_stats(f"127.0.0.1:{port}")
    assert (stats.spans, stats.failures) == (4, 0)


async def test_take_undelivered_returns_all_traces_of_a_peer_that_never_came_up(
    make_forwarder: ForwarderFactory,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    forwarder = make_forwarder(max_batch_bytes=1500)
    sent = [small_traces() for _ in range(6)]
    for number, traces in enumerate(sent[:5]):
        assert forwarder.send_traces(address, traces, hops=number)
    assert forwarder.send_decisions(address, DECISIONS)
    assert forwarder.send_traces(address, sent[5] + sample_traces(), hops=9)
    stats = forwarder.peer_stats(address)
    await wait_for(lambda: stats.failures >= 1 and forwarder.pending(address).in_flight, timeout=5.0)
    undelivered = forwarder.take_undelivered(address)
    # Trace by trace, with its hops: the last send is over a batch, so it went as several messages.
    expected = [(view, number) for number, traces in enumerate(sent[:5]) for view in views(traces)]
    expected += [(view, 9) for view in views(sent[5] + sample_traces())]
    assert [(view, message.hops) for message in undelivered for view in views(message.traces)] == expected
    assert len(undelivered) > 6
    # The decisions stay queued for the peer until it is forgotten.
    pending = forwarder.pending(address)
    assert (pending.spans, pending.decisions, pending.messages) == (0, len(DECISIONS), 1)
    forwarder.forget_peer(address)
    assert forwarder.pending(address).messages == 0
    assert (stats.dropped_decisions, stats.dropped_spans, stats.spans) == (len(DECISIONS), 0, 0)
    # Taken spans can be sent on as they are, e.g. to the new owner.
    receiver = Peer()
    await receiver.server.start()
    try:
        for message in undelivered:
            assert forwarder.send_traces(receiver.address, message.traces, message.hops)
        assert await forwarder.flush(5.0)
        assert [(view, hops) for traces, hops in receiver.received for view in views(traces)] == expected
    finally:
        await receiver.server.stop()


async def test_send_traces_is_refused_when_the_peer_queue_is_full(make_forwarder: ForwarderFactory) -> None:
    address = f"127.0.0.1:{free_port()}"
    message_bytes = len(encode_traces(small_traces(), 0))
    forwarder = make_forwarder(queue_bytes=5 * message_bytes)
    results = [forwarder.send_traces(address, small_traces(), hops=number) for number in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert not forwarder.send_decisions(address, DECISIONS)
    stats = forwarder.peer_stats(address)
    assert (stats.refused_spans, stats.refused_decisions) == (6, len(DECISIONS))
    assert forwarder.pending(address).bytes == 5 * message_bytes
    # Room comes back once the queued spans are taken elsewhere.
    assert len(forwarder.take_undelivered(address)) == 5
    assert forwarder.send_traces(address, small_traces(), hops=0)


async def test_a_backlogged_queue_is_waited_on_until_the_peer_takes_it(
    make_forwarder: ForwarderFactory,
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    message_bytes = len(encode_traces(small_traces(), 0))
    forwarder = make_forwarder(max_batch_bytes=2 * message_bytes)
    assert forwarder.send_traces(address, small_traces(), hops=0)
    assert not forwarder.backlogged(address)  # in flight (and failing): no whole batch waits yet
    for number in range(3):
        assert forwarder.send_traces(address, small_traces(), hops=number)
    await wait_for(lambda: forwarder.backlogged(address))
    assert not await forwarder.wait_for_room([address], 0.2)
    receiver = Peer(port)
    await receiver.server.start()
    try:
        assert await forwarder.wait_for_room([address], 10.0)
        assert not forwarder.backlogged(address)
        assert await forwarder.flush(10.0)
        assert receiver.span_count() == 8
    finally:
        await receiver.server.stop()


async def test_flush_waits_for_delivery_and_gives_up_at_its_timeout(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    forwarder = make_forwarder(max_delay=60.0)
    assert forwarder.send_traces(peer.address, small_traces(), hops=0)
    assert forwarder.send_decisions(peer.address, DECISIONS)
    assert await forwarder.flush(5.0)
    assert peer.span_count() == 2 and len(peer.decisions) == len(DECISIONS)
    down = f"127.0.0.1:{free_port()}"
    assert forwarder.send_traces(down, small_traces(), hops=0)
    assert not await forwarder.flush(0.2)
    assert forwarder.pending(down).spans == 2
    assert await forwarder.flush(0.0) is False


async def test_overloaded_peer_gets_retried_without_duplicates(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    forwarder = make_forwarder(max_delay=60.0)
    peer.failures.append(PeerOverloaded("buffer full", retry_after=0.1))
    # One request: decisions (accepted), then spans (overloaded): only the spans are sent again.
    assert forwarder.send_decisions(peer.address, DECISIONS)
    assert forwarder.send_traces(peer.address, small_traces(), hops=4)
    assert await forwarder.flush(10.0)
    assert len(peer.decisions) == len(DECISIONS)
    assert peer.hops() == [4]
    stats = forwarder.peer_stats(peer.address)
    assert (stats.failures, stats.retries, stats.decisions, stats.spans) == (1, 1, len(DECISIONS), 2)
    assert peer.server.stats.overloaded == 1
    assert forwarder.pending(peer.address).messages == 0


async def test_overloaded_reply_carries_retry_after_and_the_messages_taken(peer: Peer) -> None:
    peer.failures.append(PeerOverloaded("buffer full", retry_after=2.5))
    body = encode_body([encode_decisions(DECISIONS), encode_traces(small_traces(), 0)])
    (reply,) = await exchange(peer, body)
    assert reply == Reply(503, 1, 2.5, "buffer full")


async def test_a_failing_handler_gets_500_and_the_request_is_retried(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    forwarder = make_forwarder()
    peer.failures.append(RuntimeError("bug"))
    assert forwarder.send_traces(peer.address, small_traces(), hops=0)
    assert await forwarder.flush(5.0)
    assert peer.span_count() == 2
    assert peer.server.stats.errors == 1
    assert forwarder.peer_stats(peer.address).failures == 1


async def test_a_failure_while_decoding_gets_500_and_the_connection_goes_on(peer: Peer) -> None:
    intern = peer.server.intern_scope

    def failing_once(resource: bytes, scope: bytes) -> Scope | None:
        peer.server.intern_scope = intern
        raise RuntimeError("bug")

    peer.server.intern_scope = failing_once
    replies = await exchange(peer, _GOOD, _GOOD)
    assert [reply.status for reply in replies] == [500, 200]
    assert peer.server.stats.errors == 1 and peer.span_count() == 6


async def test_a_request_the_peer_refuses_for_good_is_counted_not_retried(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    forwarder = make_forwarder()
    huge = summarize(make_request(traces=1000, spans_per_trace=5).SerializeToString())
    assert len(encode_traces(huge, 0)) > 256 * 1024  # the peer's max_request_bytes
    assert forwarder.send_traces(peer.address, huge, hops=0)
    assert await forwarder.flush(5.0)
    assert forwarder.send_traces(peer.address, small_traces(), hops=1)
    assert await forwarder.flush(5.0)
    stats = forwarder.peer_stats(peer.address)
    assert (stats.rejected_spans, stats.failures, stats.spans) == (5000, 0, 2)
    assert peer.hops() == [1]


async def test_forgotten_peer_and_closed_forwarder_drop_with_counts(make_forwarder: ForwarderFactory) -> None:
    address = f"127.0.0.1:{free_port()}"
    forwarder = make_forwarder()
    assert forwarder.send_traces(address, small_traces(), hops=0)
    forwarder.forget_peer(address)
    assert forwarder.peer_stats(address).dropped_spans == 2
    assert forwarder.send_traces(address, small_traces(), hops=0)
    await forwarder.close()
    assert forwarder.peer_stats(address).dropped_spans == 4
    assert not forwarder.send_traces(address, small_traces(), hops=0)
    assert forwarder.peer_stats(address).refused_spans == 2


# -- bad input on the server -------------------------------------------------------------------------------


V = FORMAT_VERSION


def _body(*items: Any) -> bytes:
    return b"".join(msgpack.packb(item, use_bin_type=True) for item in items)


# A decisions message whose policy name is not UTF-8.
_INVALID_UTF8_POLICY = (
    bytes([FORMAT_VERSION]) + b"\x92\x02\x91\x94\xc3\xa1\xff" + msgpack.packb(1.0) + msgpack.packb(bytes(16))
)
_GOOD = encode_body([encode_traces(summarize(make_request(2, 3).SerializeToString()), 1)])
# The header and runs of a good message of one 1-span trace, and a scope that is valid OTLP.
_, _, _HEADER, _RUNS = msgpack.unpackb(encode_traces(summarize(make_request(1, 1).SerializeToString()), 0))
_SCOPES = msgpack.unpackb(_HEADER)[0]
_ONE_RUN = len(_RUNS)


def _record(trace_id: bytes = b"\x01" * 16, spans: int = 1, runs: int = 1) -> bytes:
    return TRACE_RECORD.pack(trace_id, spans, 0, 0, 0, 0, True, runs)


def _traces(scopes: Any, records: Any, run_scopes: Any, run_lengths: Any, runs: bytes = _RUNS) -> bytes:
    return _body(V, [TRACES, 0, msgpack.packb([scopes, records, run_scopes, run_lengths, 0]), runs])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"\xc1\x00\x01", "malformed msgpack", id="not-msgpack"),
        pytest.param(b"", "empty body", id="empty"),
        pytest.param(_body(1, [3, 0, _HEADER, _RUNS]), "version 1", id="wrong-version"),
        pytest.param(_body("1"), "version '1'", id="version-not-int"),
        pytest.param(_body(V, 7), "non-empty array", id="message-not-array"),
        pytest.param(_body(V, [9, 0, []]), "unknown message kind 9", id="unknown-kind"),
        pytest.param(_body(V, [3, 0]), "unknown message kind 3 with 1 fields", id="traces-arity"),
        pytest.param(_body(V, [3, -1, _HEADER, _RUNS]), "hops", id="negative-hops"),
        pytest.param(_body(V, [3, 0, [], _RUNS]), "header (binary)", id="header-not-binary"),
        pytest.param(_body(V, [3, 0, b"\xc1", _RUNS]), "malformed traces header", id="header-not-msgpack"),
        pytest.param(_traces([], b"", [0], []), "traces header must be", id="run-arrays-differ"),
        pytest.param(_traces(_SCOPES, _record(), [0], [-1]), "traces header must be", id="negative-length"),
        pytest.param(_traces(_SCOPES, _record(), ["0"], [1]), "traces header must be", id="index-not-int"),
        pytest.param(
            _traces(_SCOPES, _record(), [0.0], [_ONE_RUN]), "traces header must be", id="index-float"
        ),
        pytest.param(
            _traces(_SCOPES, _record(), [0], [float(_ONE_RUN)]), "traces header must be", id="length-float"
        ),
        pytest.param(
            _body(V, [TRACES, 0, msgpack.packb([_SCOPES, _record(), [0], [_ONE_RUN], "r"]), _RUNS]),
            "ring (an integer)",
            id="ring-not-int",
        ),
        pytest.param(
            _traces(_SCOPES, b"\x00" * 5, [0], [_ONE_RUN]), "traces header must be", id="cut-record"
        ),
        pytest.param(
            _traces([[b"\xff", b""]], _record(), [0], [_ONE_RUN]), "not a valid OTLP", id="bad-scope"
        ),
        pytest.param(_traces(_SCOPES, _record(), [1], [_ONE_RUN]), "refers to a scope", id="scope-index"),
        pytest.param(_traces(_SCOPES, _record(), [0], [_ONE_RUN + 1]), "do not add up", id="run-lengths"),
        pytest.param(_traces(_SCOPES, _record(runs=2), [0], [_ONE_RUN]), "do not match", id="runs-per-trace"),
        pytest.param(_traces(_SCOPES, _record() * 2, [0], [_ONE_RUN]), "do not match", id="too-many-traces"),
        pytest.param(_traces(_SCOPES, _record(bytes(16)), [0], [_ONE_RUN]), "trace id", id="zero-trace-id"),
        pytest.param(_traces(_SCOPES, _record(spans=0), [0], [_ONE_RUN]), "spans", id="no-spans"),
        pytest.param(_body(V, [2, [[True, "p", 1.0, b"short"]]]), "16 bytes each", id="decision-ids"),
        pytest.param(_body(V, [2, [[1, "p", 1.0, bytes(16)]]]), "decision group", id="decision-kept-type"),
        pytest.param(_body(V, [2, [[True, "p"]]]), "decision group", id="decision-arity"),
        pytest.param(
            _body(V, [2, [[True, "p", math.nan, bytes(16)]]]), "from 0 to 1, not nan", id="decision-nan"
        ),
        pytest.param(
            _body(V, [2, [[True, "p", math.inf, bytes(16)]]]), "from 0 to 1, not inf", id="decision-inf"
        ),
        pytest.param(_body(V, [2, [[True, "p", 2, bytes(16)]]]), "not 2.0", id="decision-over-one"),
        pytest.param(_body(V, [2, [[True, "p", -0.5, bytes(16)]]]), "not -0.5", id="decision-negative"),
        pytest.param(_INVALID_UTF8_POLICY, "malformed msgpack", id="invalid-utf8"),
        pytest.param(bytes([V]) + b"\x91" * 100_000, "malformed msgpack", id="deeply-nested"),
        pytest.param(bytes([V]) + b"\xdd\xff\xff\xff\xff", "exceeds max_array_len", id="huge-array-length"),
        pytest.param(_GOOD[:-7], "truncated", id="truncated"),
        pytest.param(_GOOD[:5], "truncated", id="truncated-early"),
        pytest.param(_GOOD[:40], "truncated", id="truncated-in-header"),
        pytest.param(_GOOD + b"\xc1", "malformed msgpack", id="trailing-garbage"),
        pytest.param(_body(V, [3, 0, _HEADER, _RUNS], [9]), "unknown message kind", id="good-then-bad"),
    ],
)
async def test_malformed_body_gets_400_and_serving_goes_on(peer: Peer, body: bytes, message: str) -> None:
    status, text = await post(peer, body)
    assert status == 400
    assert message in text
    # Nothing of a bad body is handed on, not even a good message before the bad one.
    assert peer.received == [] and peer.decisions == []
    status, _ = await post(peer, _GOOD)
    assert status == 200
    assert peer.span_count() == 6
    assert peer.server.stats.malformed == 1


async def test_an_oversized_frame_is_refused_when_its_length_arrives_and_the_connection_goes_on(
    peer: Peer,
) -> None:
    size = 256 * 1024 + 1  # over the peer's max_request_bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    writer.write(MAGIC + FRAME_HEADER.pack(size))
    reply = await read_reply(reader)  # answered before any of the frame's bytes were sent
    assert reply.status == 413 and "max_request_bytes" in reply.text
    for _ in range(4):  # the frame's bytes are read and dropped
        writer.write(b"\xc0" * (size // 4))
        await writer.drain()
    writer.write(b"\xc0" * (size % 4) + frame(_GOOD))
    assert (await read_reply(reader)).status == 200
    writer.close()
    assert peer.span_count() == 6
    assert peer.server.stats.malformed == 1


async def test_frames_are_answered_in_order_however_they_arrive(peer: Peer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    # Byte by byte, the stream's opening included.
    for byte in MAGIC + frame(_GOOD):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0)
    assert (await read_reply(reader)).status == 200
    # Three frames in one write: a good one, a bad one, a good one.
    writer.write(frame(_GOOD) + frame(b"\xc1") + frame(_GOOD))
    assert [(await read_reply(reader)).status for _ in range(3)] == [200, 400, 200]
    writer.close()
    assert peer.span_count() == 18


async def test_a_connection_that_is_not_a_forward_stream_gets_an_http_400_and_is_closed(peer: Peer) -> None:
    url = f"http://127.0.0.1:{peer.server.port}/cluster/v1/forward"
    async with aiohttp.ClientSession() as session, session.post(url, data=_GOOD) as reply:
        assert reply.status == 400
        assert "tailgate cluster forward stream" in await reply.text()
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    writer.write(b"\x00\x00\x00\x10" + _GOOD)
    assert (await reader.read()).startswith(b"HTTP/1.1 400")  # and closed
    writer.close()
    assert (await post(peer, _GOOD))[0] == 200
    assert peer.server.stats.malformed == 2 and peer.span_count() == 6


async def test_stop_lets_a_frame_that_is_arriving_complete_and_closes_idle_connections(peer: Peer) -> None:
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    idle_writer.write(MAGIC)
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.server.port)
    body = frame(_GOOD)
    writer.write(MAGIC + body[:10])
    await writer.drain()
    connections = peer.server._connections
    await wait_for(lambda: len(connections) == 2 and any(not c.idle for c in connections))
    stopping = asyncio.ensure_future(peer.server.stop())
    assert await idle_reader.read() == b""  # closed at once
    await asyncio.sleep(0.1)
    assert not stopping.done()
    writer.write(body[10:])
    assert (await read_reply(reader)).status == 200
    await asyncio.wait_for(stopping, 5.0)
    assert peer.span_count() == 6
    idle_writer.close()
    writer.close()


async def test_a_peer_address_that_does_not_speak_the_stream_is_retried_not_fatal(
    make_forwarder: ForwarderFactory,
) -> None:
    """An HTTP server where a peer should be (a wrong address or port): each attempt fails and is
    retried with backoff; the spans stay queued until the peer is forgotten."""
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        forwarder = make_forwarder()
        address = f"127.0.0.1:{port}"
        assert forwarder.send_traces(address, small_traces(), hops=0)
        await wait_for(lambda: forwarder.peer_stats(address).failures >= 2)
        assert forwarder.pending(address).spans == 2
        forwarder.forget_peer(address)
        assert forwarder.peer_stats(address).dropped_spans == 2
    finally:
        await runner.cleanup()


async def test_settle_lets_requests_in_flight_finish_so_nothing_is_taken_back_twice(
    peer: Peer, make_forwarder: ForwarderFactory
) -> None:
    """What a member that leaves took is not re-routed: after `settle` only unsent messages come back."""
    forwarder = make_forwarder(max_in_flight=2, max_batch_bytes=300, max_delay=0.001)
    for hops in range(30):
        assert forwarder.send_traces(peer.address, small_traces(), hops=hops)
    await asyncio.sleep(0)  # the senders take their first requests
    await forwarder.settle(peer.address, 5.0)
    taken_back = [message.hops for message in forwarder.take_undelivered(peer.address)]
    delivered = peer.hops()
    assert sorted(delivered + taken_back) == list(range(30))
    assert delivered and taken_back


async def test_a_connection_accepted_as_the_server_stops_is_closed_and_takes_no_frame() -> None:
    """The stop starts in the loop iteration that accepts a connection (as when a leaving member's grace
    ends just then): that connection is closed, and nothing it sends is handed on after `stop` returned
    (the member decided its buffer then)."""
    peer = Peer()
    await peer.server.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[None]] = []
    client = socket.create_connection(("127.0.0.1", peer.server.port))  # waiting in the listen backlog
    # A timer runs after the I/O callbacks of its iteration: the accept's.
    loop.call_later(0, lambda: stopping.append(asyncio.ensure_future(peer.server.stop())))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(stopping[0], 6.0)
    client.setblocking(False)
    try:
        await loop.sock_sendall(client, MAGIC + frame(_GOOD))
        reply = await asyncio.wait_for(loop.sock_recv(client, 1024), 1.0)
    except (TimeoutError, OSError):
        reply = b""
    finally:
        client.close()
    assert peer.span_count() == 0
    assert reply == b""
    assert not peer.server._connections
