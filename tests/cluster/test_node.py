"""ClusterNode on its own: what it does with traces when the members change."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from functools import partial

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from sampler.app import _accept_from_peer
from sampler.buffer import DecisionCache, Kept, Trace, TraceBuffer
from sampler.cluster.forward import DECISIONS, TRACES, ForwardedDecision
from sampler.cluster.membership import StaticMembership
from sampler.cluster.node import ClusterNode
from sampler.cluster.ring import Ring
from sampler.config import ForwardConfig, TailSamplingConfig
from sampler.metrics import Metrics
from sampler.receivers.common import Ingest
from sampler.receivers.otlp_decode import decode_protobuf
from tests.conftest import free_port, wait_for
from tests.otlp_data import make_request

HERE = "127.0.0.1:1"


class Member:
    """A member's node, buffer and ingest (for clients and for peers). Its peer server, when started,
    listens on its id (`me`), or anywhere for the default id, where no peer sends."""

    def __init__(self, members: list[str], me: str = HERE, forward: ForwardConfig | None = None) -> None:
        self.decisions = DecisionCache(1000, 1000)
        self.buffer = TraceBuffer(TailSamplingConfig(), frozenset(), self.decisions, lambda: 0.0)
        self.decided: list[Trace] = []
        self.late: list[object] = []
        self.buffer.connect(lambda traces, reason: self.decided.extend(traces), self.late.extend)
        metrics = self.metrics = Metrics()
        self.node = ClusterNode(
            me,
            StaticMembership(members),
            forward or ForwardConfig(max_delay=0.01),
            self.buffer,
            self.decisions,
            metrics,
            endpoint="127.0.0.1:0" if me == HERE else me,
        )
        self.node.ring = Ring(members)
        self.from_peers = Ingest(
            "cluster", self.buffer, metrics, lambda result: None, None, None, None, self.node
        )
        self.node.accept = partial(_accept_from_peer, self.from_peers)
        self.clients = Ingest("otlp", self.buffer, metrics, lambda result: None, None, None, None, self.node)

    def spans_held(self, *peers: str) -> int:
        """Spans buffered here, decided here or queued for `peers`."""
        queued = sum(self.node.forwarder.pending(peer).spans for peer in peers)
        return self.buffer.span_count + sum(trace.span_count for trace in self.decided) + queued


LEFT = f"127.0.0.1:{free_port()}"  # nobody listens there: what is queued for it stays queued


@pytest.fixture
async def member() -> AsyncIterator[Member]:
    member = Member([HERE, LEFT])
    yield member
    await member.node.forwarder.close()


async def test_spans_queued_for_a_member_that_left_are_kept_under_memory_pressure_and_the_handover_goes_on(
    member: Member,
) -> None:
    joined = f"127.0.0.1:{free_port()}"
    member.clients.add(decode_protobuf(make_request(200, 3).SerializeToString()))
    assert member.node.forwarder.send_decisions(LEFT, [ForwardedDecision(bytes([7]) * 16, False, "", 1.0)])
    queued = member.node.forwarder.pending(LEFT)
    assert 0 < queued.spans < 600 and queued.decisions == 1
    assert member.spans_held(LEFT) == 600
    # The member those spans were queued for leaves and another joins while this one is over its memory
    # limit: its ingest refuses spans from peers (PeerOverloaded), but these it took from clients already.
    member.from_peers.pressure.overloaded = True
    await member.node._apply((HERE, joined))
    ring = member.node.ring
    assert ring == Ring([HERE, joined])
    # The member that left is forgotten: its decisions dropped and counted, no sender left retrying it.
    assert member.node.forwarder.pending(LEFT) == member.node.forwarder.pending("127.0.0.1:9")
    assert member.node.forwarder.peer_stats(LEFT).dropped_decisions == 1
    assert member.node.forwarder.peer_stats(LEFT).dropped_spans == 0
    # No span lost: each is buffered (or decided) here or queued for the member that joined, which was
    # handed the buffered traces the new ring gives it.
    assert member.spans_held(joined) == 600
    assert member.node.forwarder.pending(joined).spans > 0
    assert not [trace for trace in member.buffer.traces.values() if ring.owner(trace.trace_id) == joined]


async def test_spans_a_member_that_stopped_first_did_not_take_are_decided_here_not_dropped(
    member: Member,
) -> None:
    """Workers stop together: one with nothing to do stops at once, while another still finishes a
    client's request whose spans it forwards to the first. Those stay here and are decided here."""
    member.clients.add(decode_protobuf(make_request(200, 3).SerializeToString()))
    queued = member.node.forwarder.pending(LEFT).spans
    assert queued > 0
    await member.node.leave(timeout=0.2)  # nobody listens at LEFT: the flush cannot deliver
    assert member.node.forwarder.pending(LEFT).spans == 0
    assert member.node.forwarder.peer_stats(LEFT).dropped_spans == 0
    assert member.buffer.span_count == 600  # all here, to be decided with the rest at shutdown


def owned_by(ring: Ring, member: str, skip: int = 0) -> bytes:
    """A trace id `ring` gives to `member` (the first, or the one after `skip` others)."""
    ids = (bytes([n]) * 16 for n in range(1, 255) if ring.owner(bytes([n]) * 16) == member)
    return list(ids)[skip]


def late_span_request(trace_id: bytes, spans: int = 1) -> ExportTraceServiceRequest:
    """Child spans of `trace_id` (their parent is not among them)."""
    children = [
        Span(
            trace_id=trace_id,
            span_id=(n + 1).to_bytes(8, "big"),
            parent_span_id=b"\x06" * 8,
            name="late child",
        )
        for n in range(spans)
    ]
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=children)])])


@pytest.fixture
async def joining() -> AsyncIterator[tuple[str, str, Member]]:
    """A member's id, and a member that joins it, listening (the second id)."""
    here, joined = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    member = Member([here, joined], joined)
    await member.node.server.start()
    yield here, joined, member
    await member.node.server.stop()
    await member.node.forwarder.close()


async def test_a_late_span_of_a_trace_decided_here_stays_here_while_a_member_that_joined_owns_it(
    joining: tuple[str, str, Member],
) -> None:
    """A late span reaching this member while it hands its decisions over to a member that joined (the
    new ring already routes its trace there): it follows this member's decision, and does not start the
    trace again at the new owner, which would decide it a second time."""
    here_id, joined_id, joined = joining
    member = Member([here_id], here_id)
    try:
        ring = Ring([here_id, joined_id])
        trace_id = owned_by(ring, joined_id)
        member.decisions.record(trace_id, Kept("errors", 1.0))
        applying = asyncio.get_running_loop().create_task(member.node._apply((here_id, joined_id)))
        await asyncio.sleep(0)  # the new ring is in place, the handover under way
        assert member.node.ring == ring
        member.clients.add(decode_protobuf(late_span_request(trace_id).SerializeToString()))
        await applying
        assert await member.node.forwarder.flush(5.0)
        assert len(member.late) == 1  # exported here, as a late span of the kept trace
        assert joined.decisions.lookup(trace_id) == Kept("errors", 1.0)
        assert trace_id not in joined.buffer.traces
        # A span of that trace that a peer still routes here by the ring before stays here too.
        member.node.accept(peer_traces(trace_id), 1, 0)
        assert await member.node.forwarder.flush(5.0)
        assert len(member.late) == 2
        assert trace_id not in joined.buffer.traces
    finally:
        await member.node.forwarder.close()


def peer_traces(trace_id: bytes, spans: int = 1) -> list[Trace]:
    """Child spans of `trace_id` as a peer forwards them."""
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), DecisionCache(10, 10), lambda: 0.0)
    request = late_span_request(trace_id, spans).SerializeToString()
    result = buffer.add_spans(decode_protobuf(request), lambda _: "x")
    return result.foreign["x"]


async def test_decisions_handed_to_a_member_that_joined_are_not_refused_when_its_queue_is_full() -> None:
    """Spans queued for a member fill its queue (over `queue_bytes`: a client's request is never cut);
    the decisions handed to it when it joins the ring are queued all the same, or late spans of those
    traces would start them again there."""
    here_id, joined_id = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    member = Member([here_id], here_id, ForwardConfig(max_delay=0.01, queue_bytes=10_000))
    joined = Member([here_id, joined_id], joined_id)  # not listening yet: what is queued stays queued
    try:
        ring = Ring([here_id, joined_id])
        assert member.node.forwarder.send_traces(
            joined_id, peer_traces(owned_by(ring, joined_id), 400), 1, True
        )
        assert member.node.forwarder.full(joined_id)
        decided = owned_by(ring, joined_id, 1)
        member.decisions.record(decided, Kept("errors", 1.0))
        await member.node._apply((here_id, joined_id))
        await joined.node.server.start()
        assert await member.node.forwarder.flush(10.0)
        assert member.node.forwarder.peer_stats(joined_id).refused_decisions == 0
        assert joined.decisions.lookup(decided) == Kept("errors", 1.0)
    finally:
        await member.node.forwarder.close()
        await joined.node.server.stop()
        await joined.node.forwarder.close()


async def test_the_forward_failures_counter_keeps_the_failures_to_a_member_that_left() -> None:
    """tailgate_cluster_forward_failures_total is a counter: it must not go back when a member that
    failed leaves the ring (Prometheus would take it for a restart)."""
    here, down = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nobody listens at `down`
    member = Member([here, down], here)
    name = "tailgate_cluster_forward_failures_total"
    try:
        member.clients.add(decode_protobuf(make_request(50, 2).SerializeToString()))
        assert member.node.forwarder.pending(down).spans > 0
        await wait_for(lambda: (member.metrics.registry.get_sample_value(name) or 0) >= 2, timeout=10)
        before = member.metrics.registry.get_sample_value(name)
        await member.node._apply((here,))  # `down` left: what was queued for it is taken back
        assert (member.metrics.registry.get_sample_value(name) or 0.0) >= before  # settle retried meanwhile
    finally:
        await member.node.forwarder.close()


async def test_a_handover_queues_the_decisions_before_the_traces() -> None:
    """Late spans that other members route to a member that joined start their traces again there until
    it has their decisions: those go out first, before the buffered traces (which may take a while)."""
    here_id, joined_id = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    member = Member([here_id], here_id)  # nobody listens at `joined_id`: what is queued stays queued
    try:
        ring = Ring([here_id, joined_id])
        member.clients.add(decode_protobuf(make_request(200, 3).SerializeToString()))
        member.decisions.record(owned_by(ring, joined_id), None)
        await member.node._apply((here_id, joined_id))
        kinds = [entry.kind for entry in member.node.forwarder._peers[joined_id].entries()]
        assert kinds[0] == DECISIONS and TRACES in kinds[1:]
    finally:
        await member.node.forwarder.close()


async def test_spans_queued_for_a_member_that_left_during_the_leave_are_decided_here_not_dropped() -> None:
    """This member leaves while it still settles a member that left the ring just before (a request to
    it in flight, unanswered, so its queue is not yet taken back): what was queued for that member is
    taken back too, not dropped when the forwarder closes."""
    silent = socket.socket()  # takes connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    gone = f"127.0.0.1:{silent.getsockname()[1]}"
    member = Member([HERE, gone])
    try:
        member.clients.add(decode_protobuf(make_request(200, 3).SerializeToString()))
        await wait_for(lambda: member.node.forwarder.pending(gone).in_flight)
        applying = asyncio.get_running_loop().create_task(member.node._apply((HERE,)))
        await asyncio.sleep(0.05)  # `gone` is out of the ring, the request to it being settled
        assert member.node.ring == Ring([HERE]) and not applying.done()
        await member.node.leave(timeout=0.2)
        applying.cancel()  # as the gateway's stop does after the leave
        await member.node.forwarder.close()
        assert member.node.forwarder.peer_stats(gone).dropped_spans == 0
        assert member.buffer.span_count == 600
    finally:
        silent.close()


async def test_a_handover_is_queued_whole_whatever_it_queued_before_in_it() -> None:
    """A handover larger than the new owner's queue is queued whole: neither its decisions (queued first,
    never refused) nor its own earlier slices of traces make that queue look full to its later traces,
    which would be kept and decided here, split from their later spans that go to the new owner."""
    here_id, joined_id = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    member = Member([here_id], here_id, ForwardConfig(max_delay=0.01, queue_bytes=10_000))
    try:
        ring = Ring([here_id, joined_id])
        member.clients.add(decode_protobuf(make_request(6000, 1).SerializeToString()))
        moving = [trace_id for trace_id in member.buffer.traces if ring.owner(trace_id) == joined_id]
        assert len(moving) > 2000  # more than one slice
        rng = random.Random(5)
        ids = (rng.randbytes(16) for _ in range(10_000))
        # 900 of them: the decision cache holds 1000.
        decided = [trace_id for trace_id in ids if ring.owner(trace_id) == joined_id][:900]
        for trace_id in decided:
            member.decisions.record(trace_id, Kept("errors", 1.0))
        await member.node._apply((here_id, joined_id))
        assert member.node.forwarder.pending(joined_id).decisions == len(decided) > 600
        assert not [trace_id for trace_id in moving if trace_id in member.buffer.traces]
        assert member.node.forwarder.pending(joined_id).spans == len(moving)
    finally:
        await member.node.forwarder.close()
