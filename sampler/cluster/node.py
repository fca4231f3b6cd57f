"""This gateway as a member of a cluster (`cluster:`) or of a local ring of workers (`workers: N`).

Every trace id has one owner among the members (rendezvous hashing, sampler/cluster/ring.py). The buffer
asks `router` about each trace id it does not hold: spans of traces this member owns are buffered, the
others are left for `forward` to queue for their owners (sampler/cluster/forward.py). Spans peers forward
arrive through the peer server and are routed again, so a member that has not yet seen a membership change
does not split a trace for long.

When the members change, buffered traces now owned elsewhere are handed to their new owner undecided,
with the decisions this member made for traces it no longer owns, so late spans follow them there; what
was still queued for a member that left goes to the new owners. On a graceful leave the member hands
everything over before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from sampler.buffer import DecisionCache, ForeignOwner, Kept, Trace, TraceBuffer
from sampler.cluster.forward import ForwardedDecision, Forwarder, PeerServer
from sampler.cluster.membership import Membership, RedisMembership, StaticMembership
from sampler.cluster.ring import Ring
from sampler.config import ForwardConfig
from sampler.errors import PeerOverloaded
from sampler.metrics import Metrics

log = logging.getLogger(__name__)

# A span forwarded this many times is buffered where it is, whatever the ring says: members that disagree
# on the ring for a moment must not bounce it for ever.
MAX_HOPS = 3
# The hop count a leaving member sends with: its ring (the members without it) is the one the others are
# about to see, so the member it forwards to keeps the spans even if it still counts the leaving member
# in. A leaving member keeps spans only when they come from another leaving member.
LEFT = MAX_HOPS + 1
# Traces (or decisions) handled per slice when handing over, before yielding to the event loop.
_SLICE = 2000
# How long a leaving member goes on taking spans from peers that have not yet seen it leave.
LEAVE_GRACE = 0.5
# How long requests in flight to a member that left may take to be answered before they are re-routed.
SETTLE_TIMEOUT = 1.0
# The least time a leaving member gives the membership to record its leave (see `leave`): enough for a
# Redis that answers, little out of a short shutdown_timeout when it does not.
MEMBERSHIP_LEAVE = 0.1
# How long a client's request waits, before its body is read, while the queue for another member holds
# a whole batch more than is in flight; then it is taken anyway, or refused (503, Retry-After) if that
# queue is full.
ROOM_WAIT = 1.0

# Takes traces from peers (and traces to route again): the local ingest, which merges those this member
# owns into its buffer and forwards the others (given how often they were forwarded already). Raises
# PeerOverloaded when it cannot take them now.
Accept = Callable[[list[Trace], int, int], int]


class ClusterNode:
    """Routes spans to the owners of their traces and keeps the ring in step with the membership."""

    def __init__(
        self,
        member_id: str,
        membership: Membership,
        forward: ForwardConfig,
        buffer: TraceBuffer,
        decisions: DecisionCache,
        metrics: Metrics,
        *,
        endpoint: str,
        unix_path: str | None = None,
    ) -> None:
        self.member_id = member_id
        self.membership = membership
        self.buffer = buffer
        self.decisions = decisions
        self.ring = Ring([member_id])
        self.forwarder = Forwarder(forward)
        self.server = PeerServer(
            endpoint,
            self._on_traces,
            self._on_decisions,
            intern_scope=buffer.intern_scope,
            unix_path=unix_path,
        )
        # Set by the gateway: its ingest for spans from peers, and how it buffers here traces this member
        # takes back when that ingest cannot take them now (logged whatever the log's bound).
        self.accept: Accept = _refuse
        self.keep: Callable[[list[Trace]], object] = buffer.add_traces
        # Set by the gateway with the write-ahead log: notes the ids of traces handed to other members.
        self.handed_over: Callable[[list[bytes]], None] = lambda trace_ids: None
        self.leaving = False
        self._changes: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()
        self._rebalancer: asyncio.Task[None] | None = None
        self._forwarded = metrics.cluster_forwarded_spans
        self._handed_over = metrics.cluster_handed_over_traces
        self._membership_changes = metrics.cluster_membership_changes
        self._refused = metrics.cluster_forward_refused_spans
        metrics.cluster_members.set_function(lambda: len(self.ring))
        metrics.cluster_pending_spans.set_function(self._pending_spans)
        metrics.callback_counter(
            "tailgate_cluster_received_spans",
            "Spans other members forwarded to this one (handed-over traces included).",
            lambda: self.server.stats.spans,
        )
        metrics.callback_counter(
            "tailgate_cluster_forward_failures",
            "Forwarding attempts to other members that failed (connection, timeout, 5xx) and were retried.",
            self._forward_failures,
        )
        store = membership if isinstance(membership, RedisMembership) else None
        metrics.cluster_membership_connected.set_function(
            lambda: 1 if store is None or store.connected else 0
        )
        metrics.callback_counter(
            "tailgate_cluster_membership_errors",
            "Membership store (Redis) operations that failed; the last known members are kept meanwhile.",
            lambda: 0 if store is None else store.errors,
        )
        membership.subscribe(self._members_changed)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for peers, join the membership, take its first view, and hand over what the write-ahead
        log replayed that this view gives to other members (the members changed while this one was down)."""
        await self.server.start()
        await self.membership.start()
        self.ring = Ring(self.membership.members or (self.member_id,))
        await self._hand_over(self.ring)
        self._rebalancer = asyncio.get_running_loop().create_task(self._rebalance_loop(), name="cluster")
        log.info("cluster member %s: %d members %s", self.member_id, len(self.ring), list(self.ring.members))

    async def leave(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline for the whole handover
        """Graceful leave, after the receivers stopped: leave the membership, hand every buffered trace to
        its new owner, stop taking spans from peers, deliver what is queued (the gateway decides what it
        still holds after this).

        Spans peers send meanwhile (they have not yet seen this member leave) are routed on to the new
        owners, marked so that those keep them. Afterwards peers keep what they could not deliver here
        and route it again once they see this member leave. Members stopping at the same moment may pass
        spans back and forth: what one leaving member sends another is buffered there, and decided there.
        """
        self.leaving = True
        # A Redis that does not answer holds this for `redis.timeout`: a share of the leave's time at most
        # (the others then drop this member when its key expires), but never less than MEMBERSHIP_LEAVE,
        # so that a short shutdown_timeout still tells a Redis that answers.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.membership.stop(), max(timeout / 4, MEMBERSHIP_LEAVE))
        others = [member for member in self.ring.members if member != self.member_id]
        flush_timeout = max(0.0, timeout / 2)
        if others and not isinstance(self.membership, StaticMembership):
            self.ring = Ring(others)
            await self._hand_over(self.ring)
            # Peers that have not yet seen this member leave may still forward to it for a moment.
            await asyncio.sleep(min(LEAVE_GRACE, timeout / 4))
            await self.server.stop()
            flushed = await self.forwarder.flush(flush_timeout)
        else:
            # A static ring (workers, `peers`) stops together: each member decides its own traces, and
            # takes what the others still deliver while it delivers its own.
            flushed = await self.forwarder.flush(flush_timeout)
            await self.server.stop()
        if not flushed:
            # A peer that stopped first (a worker with nothing left to do), or one that does not answer:
            # what it did not take is decided here with the rest, rather than dropped.
            kept = 0
            # Every peer with a queue: also one that left the ring while its requests were being settled.
            for peer in self.forwarder.peers():
                for message in self.forwarder.take_undelivered(peer, self.buffer.intern_scope):
                    self._take_back(message.traces, LEFT, 0)
                    kept += sum(trace.span_count for trace in message.traces)
            log.warning("cluster: leaving with %d spans not delivered to peers; deciding them here", kept)

    async def stop(self) -> None:
        if self._rebalancer is not None:
            self._rebalancer.cancel()
            await asyncio.gather(self._rebalancer, return_exceptions=True)
            self._rebalancer = None
        if not self.leaving:
            with contextlib.suppress(Exception):
                await self.membership.stop()
        await self.server.stop()
        await self.forwarder.close()

    # -- routing --------------------------------------------------------------------------------------

    def router(self, hops: int, sender_ring: int = 0) -> ForeignOwner | None:
        """For one request: the owner of each trace id when it is another member (None when it is this
        one), or no router at all when nothing is to be forwarded (a ring of one, spans already forwarded
        MAX_HOPS times, which are buffered where they are, or traces a peer routed here by the ring this
        member has: `sender_ring` is that ring's digest). A leaving member is no longer in its own ring: it
        forwards everything but what another leaving member sent it."""
        ring = self.ring
        me = self.member_id
        if (
            hops >= (LEFT if self.leaving else MAX_HOPS)
            or (len(ring) == 1 and me in ring)
            or (sender_ring == ring.digest and not self.leaving)
        ):
            return None
        owner_of = ring.owner

        def foreign_owner(trace_id: bytes) -> str | None:
            owner = owner_of(trace_id)
            return None if owner == me else owner

        return foreign_owner

    async def wait_for_room(self) -> None:
        """Hold a client's request, up to ROOM_WAIT, while the queue for some other member is backlogged:
        the client waits a moment rather than the spans of its traces waiting in a queue (and arriving
        after their trace was decided) or, once the queue is full, having its request read, decoded
        and refused."""
        await self.forwarder.wait_for_room(self._peers(), ROOM_WAIT)

    def check_room(self) -> None:
        """PeerOverloaded when the queue for some other member is full: the request is refused as a whole
        (503) before anything of it is buffered, and its client sends it again."""
        for peer in self.ring.members:
            if peer != self.member_id and self.forwarder.full(peer):
                raise PeerOverloaded(f"the queue of spans for cluster member {peer} is full; retry later")

    def forward(self, foreign: dict[str, list[Trace]], hops: int) -> None:
        """Queue traces summarized here for their owners. Room was checked for a client's request as a
        whole; one request may take a queue over its bound rather than lose what it already had
        accepted."""
        sent_hops = LEFT if self.leaving else hops + 1
        for owner, traces in foreign.items():
            spans = sum(trace.span_count for trace in traces)
            if self.forwarder.send_traces(owner, traces, sent_hops, force=True, ring=self.ring.digest):
                self._forwarded.labels(owner).inc(spans)
            else:  # the forwarder is closed: shutting down
                self._refused.inc(spans)
                self._take_back(traces, MAX_HOPS, 0)

    def _take_back(self, traces: list[Trace], hops: int, ring: int) -> None:
        """Route again, or buffer, traces this member holds already (accepted from a client or a peer, and
        not delivered): never refused. When the ingest cannot take them now (memory pressure, the
        write-ahead log full or failing), they are buffered here as they are rather than lost."""
        try:
            self.accept(traces, hops, ring)
        except PeerOverloaded as overloaded:
            log.warning("cluster: %d traces kept here as they are: %s", len(traces), overloaded)
            self.keep(traces)

    def _on_traces(self, traces: list[Trace], hops: int, ring: int) -> None:
        self.accept(traces, hops, ring)

    def _on_decisions(self, decisions: list[ForwardedDecision]) -> None:
        record = self.decisions.record
        for decision in decisions:
            record(decision.trace_id, Kept(decision.policy, decision.probability) if decision.kept else None)

    # -- membership changes ---------------------------------------------------------------------------

    def _members_changed(self, members: tuple[str, ...]) -> None:
        self._changes.put_nowait(members)

    async def _rebalance_loop(self) -> None:
        while True:
            members = await self._changes.get()
            while not self._changes.empty():
                members = self._changes.get_nowait()  # only the latest view matters
            if self.leaving:
                continue
            try:
                await self._apply(members)
            except Exception:
                log.exception("cluster: handing over after a membership change failed")

    async def _apply(self, members: tuple[str, ...]) -> None:
        old, new = self.ring, Ring(members if self.member_id in members else (*members, self.member_id))
        if new == old:
            return
        self.ring = new
        self._membership_changes.inc()
        joined = sorted(set(new.members) - set(old.members))
        left = sorted(set(old.members) - set(new.members))
        log.info("cluster: members now %s (joined %s, left %s)", list(new.members), joined, left)
        for peer in left:
            # What was queued for a member that left goes to the new owners (or stays here); what it was
            # sent and took before it left is not sent again.
            await self.forwarder.settle(peer, SETTLE_TIMEOUT)
            for message in self.forwarder.take_undelivered(peer, self.buffer.intern_scope):
                self._take_back(message.traces, message.hops - 1, message.ring)
            self.forwarder.forget_peer(peer)
        await self._hand_over(new, old)

    async def _hand_over(self, ring: Ring, old: Ring | None = None) -> None:
        """Send the decisions this member made, then the buffered traces, that `ring` gives to other
        members. Decisions first: until a new owner has them, late spans other members route to it by
        `ring` start new traces there."""
        # Bytes this handover queued per member: a queue is full for it only by what it held before.
        queued = await self._hand_over_decisions(ring, old)
        me = self.member_id
        moving = [trace for trace in list(self.buffer.traces.values()) if ring.owner(trace.trace_id) != me]
        for start in range(0, len(moving), _SLICE):
            by_owner: dict[str, list[Trace]] = {}
            for trace in moving[start : start + _SLICE]:
                by_owner.setdefault(ring.owner(trace.trace_id), []).append(trace)
            for owner, traces in by_owner.items():
                if self.forwarder.full(owner, queued.get(owner, 0)):
                    log.warning(
                        "cluster: %d traces for %s kept here (its queue is full); deciding them here",
                        len(traces),
                        owner,
                    )
                    continue
                # Queued whatever their size: a handover is not refused halfway.
                taken = self.buffer.take(traces)
                hops = LEFT if self.leaving else 1
                before = self.forwarder.queued_bytes(owner)
                sent = self.forwarder.send_traces(owner, taken, hops, force=True, ring=ring.digest)
                assert sent  # refused only when the forwarder is closed, which `full` checked
                self.handed_over([trace.trace_id for trace in taken])
                queued[owner] = queued.get(owner, 0) + self.forwarder.queued_bytes(owner) - before
                self._handed_over.labels(owner).inc(len(taken))
            await asyncio.sleep(0)

    async def _hand_over_decisions(self, ring: Ring, old: Ring | None) -> dict[str, int]:
        """Queue the decisions this member made that `ring` gives to other members; the bytes queued per
        member."""
        me = self.member_id
        decided: list[tuple[bytes, Kept | None]] = []
        if self.decisions.kept is not None:
            decided += list(self.decisions.kept.items())
        if self.decisions.dropped is not None:
            decided += [(trace_id, None) for trace_id in list(self.decisions.dropped)]
        by_owner: dict[str, list[ForwardedDecision]] = {}
        for start in range(0, len(decided), _SLICE):
            for trace_id, kept in decided[start : start + _SLICE]:
                if old is not None and old.owner(trace_id) != me:
                    continue  # not ours before: its owner has it
                owner = ring.owner(trace_id)
                if owner != me:
                    by_owner.setdefault(owner, []).append(
                        ForwardedDecision(trace_id, True, kept.policy, kept.probability)
                        if kept is not None
                        else ForwardedDecision(trace_id, False, "", 1.0)
                    )
            await asyncio.sleep(0)
        queued: dict[str, int] = {}
        for owner, decisions in by_owner.items():
            before = self.forwarder.queued_bytes(owner)
            # Never refused for a full queue (spans a client sent may fill it): without its decision, a
            # late span starts its trace again at the new owner.
            self.forwarder.send_decisions(owner, decisions, force=True)
            queued[owner] = self.forwarder.queued_bytes(owner) - before
        return queued

    def _peers(self) -> list[str]:
        return [peer for peer in self.ring.members if peer != self.member_id]

    def _pending_spans(self) -> float:
        return float(sum(self.forwarder.pending(peer).spans for peer in self._peers()))

    def _forward_failures(self) -> float:
        """A counter: the failures of every peer this member ever forwarded to, members that left too."""
        return float(sum(stats.failures for stats in self.forwarder.stats.values()))


def _refuse(traces: Sequence[Trace], hops: int, ring: int) -> int:
    raise PeerOverloaded("this member is not ready")
