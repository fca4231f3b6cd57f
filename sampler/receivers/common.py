"""What every receiver shares: handing decoded batches to the buffer and counting under its protocol."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sampler.buffer import IngestResult, SpanBatch, Trace, TraceBuffer
from sampler.errors import PeerOverloaded
from sampler.exporters.base import Exporter
from sampler.metrics import Metrics
from sampler.otlp_wire import Scope, SpanGroup, encode_request, frame_run
from sampler.pressure import Pressure
from sampler.wal import WALError, WriteAheadLog

if TYPE_CHECKING:
    from sampler.cluster.node import ClusterNode

# The message of a request refused as overloaded (429, RESOURCE_EXHAUSTED).
OVERLOADED = "tailgate is over its memory limit and its exporters are full; retry later"
# Retry-After suggested when the write-ahead log refuses a request.
WAL_RETRY_AFTER = 1.0


class Unavailable(Exception):
    """The request cannot be accepted now (503, UNAVAILABLE); nothing of it was buffered."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Receiver(Protocol):
    """A server that feeds the trace buffer."""

    protocol: str
    port: int | None  # the bound port once started
    ingest: Ingest
    reuse_port: bool  # share the port with the other workers (`workers: N`)

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop accepting; requests in progress get the shutdown grace to complete."""
        ...


class Ingest:
    """The buffer's entry point for one protocol: adds decoded spans, counts what became of them."""

    def __init__(
        self,
        protocol: str,
        buffer: TraceBuffer,
        metrics: Metrics,
        count_late: Callable[[IngestResult], None],
        capture: Exporter | None = None,
        pressure: Pressure | None = None,
        wal: WriteAheadLog | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.protocol = protocol
        self.buffer = buffer
        self.count_late = count_late
        self._accepted = metrics.received_spans.labels(protocol, "accepted")
        self._rejected = metrics.received_spans.labels(protocol, "rejected")
        self._rejected_requests = metrics.rejected_requests
        self._requests = metrics.received_requests.labels(protocol)
        # Where every decoded span is also written before sampling (`capture:`), if anywhere.
        self.capture = capture
        # Receivers refuse a request, before reading it, while `pressure.overloaded` (`memory:`).
        self.pressure = Pressure() if pressure is None else pressure
        # With `durability: wal`, where each request is written before it is buffered.
        self.wal = wal
        # In a cluster (or with workers), where spans of traces other members own are sent on.
        self.cluster = cluster

    def add(self, batches: list[SpanBatch], body: bytes | None = None) -> IngestResult:
        """Buffer the spans of one decoded request from a client; every receiver goes through here. `body`
        is the request as an encoded ExportTraceServiceRequest when it arrived as one (the write-ahead log
        takes it as is).

        In a cluster, spans of traces other members own are summarized and forwarded to them.
        Unavailable when the write-ahead log cannot take the request, or the queue for another member is
        full: then nothing of it is buffered.
        """
        cluster = self.cluster
        foreign_owner = None if cluster is None else cluster.router(0)
        if foreign_owner is not None:
            assert cluster is not None
            try:
                cluster.check_room()
            except PeerOverloaded as error:
                self.refuse("cluster_unavailable")
                raise Unavailable(str(error), error.retry_after) from None
        groups = None  # the request's spans as span groups, built once for the log and the capture
        if self.wal is not None and body is None:
            groups = span_groups(batches)
            body = encode_request(groups)
        seq = self._write_ahead(body)
        if self.capture is not None:
            # Once the request is taken, and only at the member that received it (not from peers).
            _tee(self.capture, span_groups(batches) if groups is None else groups)
        return self._counted(self.buffer.add_spans(batches, foreign_owner), seq, 0)

    def add_traces(self, traces: list[Trace], hops: int, ring: int = 0, force: bool = False) -> IngestResult:
        """Buffer traces another member summarized and forwarded (`hops`: how often they were forwarded
        already; `ring`: the digest of the ring it routed them by); those the ring here gives to another
        member are forwarded on. Spans from peers are queued on whatever the queues hold: refusing them
        would make members that forward to each other wait on each other. Unavailable when the
        write-ahead log cannot take them (with `force`, only when it cannot be written)."""
        cluster = self.cluster
        body = encode_request(trace_groups(traces)) if self.wal is not None else None
        seq = self._write_ahead(body, force)
        foreign_owner = None if cluster is None else cluster.router(hops, ring)
        return self._counted(self.buffer.add_traces(traces, foreign_owner), seq, hops)

    def _write_ahead(self, body: bytes | None, force: bool = False) -> int:
        """Count a request about to be buffered and, with the write-ahead log (then `body` is given), log
        it (`force`: over the log's bound too): its number in the log, -1 without one."""
        seq = -1
        if self.wal is not None:
            assert body is not None
            try:
                seq = self.wal.append_request(body, force)
            except WALError as error:
                self.refuse("wal_unavailable")
                raise Unavailable(str(error), WAL_RETRY_AFTER) from None
            self.buffer.seq = seq
        self._requests.inc()
        return seq

    def _counted(self, result: IngestResult, seq: int, hops: int) -> IngestResult:
        """Forward what the buffer left for other members, and count what became of the spans."""
        if result.foreign:
            assert self.cluster is not None
            self.cluster.forward(result.foreign, hops)
            if self.wal is not None:
                # Not replayed after a crash: they are the other members' now (queued for them here).
                self.wal.append_forwarded(
                    seq, [trace.trace_id for traces in result.foreign.values() for trace in traces]
                )
        result.seq = seq
        self.pressure.update()
        if result.accepted:
            self._accepted.inc(result.accepted)
        if result.rejected:
            self._rejected.inc(result.rejected)
        if result.late_kept or result.late_dropped:
            self.count_late(result)
        return result

    async def admit(self) -> None:
        """Before a client's request is read: in a cluster, wait a moment while a queue to another
        member is backlogged (see ClusterNode.wait_for_room)."""
        if self.cluster is not None:
            await self.cluster.wait_for_room()

    async def committed(self, result: IngestResult) -> None:
        """Return once the request is as durable as configured (`wal.fsync: always`: on disk); its client
        may be answered then. When the fsync fails (the log counts and logs it), the request is answered as
        accepted all the same: it was logged and buffered already, and a 503 would have its client send it
        again, its spans exported twice. Requests the log cannot write are refused before buffering."""
        if self.wal is not None:
            with contextlib.suppress(WALError):
                await self.wal.synced(result.seq)

    def refuse(self, reason: str) -> None:
        """Count a request refused as a whole (malformed, too large, unsupported, ...)."""
        self._requests.inc()
        self._rejected_requests.labels(self.protocol, reason).inc()


def retry_after_header(seconds: float) -> dict[str, str]:
    """The Retry-After header suggesting `seconds`: whole seconds, at least 1, as HTTP has them."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def span_groups(batches: list[SpanBatch]) -> list[SpanGroup]:
    """A request's spans, as they arrived, as span groups (one per batch with spans)."""
    return [
        (Scope(batch.resource, batch.scope), frame_run(list(batch.payloads)), len(batch.payloads))
        for batch in batches
        if batch.payloads
    ]


def trace_groups(traces: list[Trace]) -> list[SpanGroup]:
    """Traces' spans as span groups (one per run)."""
    return [(scope, run, 0) for trace in traces for scope, run in trace.runs()]


def _tee(capture: Exporter, groups: list[SpanGroup]) -> None:
    """Hand a request's spans, as they arrived, to the capture; it queues them and never blocks."""
    if groups:
        capture.export(groups, sum(group[2] for group in groups))
