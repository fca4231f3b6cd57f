"""ClusterNode on its own: what it does with traces when the members change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest

from sampler.app import _accept_from_peer
from sampler.buffer import DecisionCache, Trace, TraceBuffer
from sampler.cluster.forward import ForwardedDecision
from sampler.cluster.membership import StaticMembership
from sampler.cluster.node import ClusterNode
from sampler.cluster.ring import Ring
from sampler.config import ForwardConfig, TailSamplingConfig
from sampler.metrics import Metrics
from sampler.receivers.common import Ingest
from sampler.receivers.otlp_decode import decode_protobuf
from tests.conftest import free_port
from tests.otlp_data import make_request

HERE = "127.0.0.1:1"


class Member:
    """A member's node, buffer and ingest (for clients and for peers), with no peer listening anywhere."""

    def __init__(self, members: list[str]) -> None:
        self.decisions = DecisionCache(1000, 1000)
        self.buffer = TraceBuffer(TailSamplingConfig(), frozenset(), self.decisions, lambda: 0.0)
        self.decided: list[Trace] = []
        self.buffer.connect(lambda traces, reason: self.decided.extend(traces), lambda late: None)
        metrics = Metrics()
        self.node = ClusterNode(
            HERE,
            StaticMembership(members),
            ForwardConfig(),
            self.buffer,
            self.decisions,
            metrics,
            endpoint="127.0.0.1:0",
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
