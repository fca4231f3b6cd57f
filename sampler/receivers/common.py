"""What every receiver shares: handing decoded batches to the buffer and counting under its protocol."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from sampler.buffer import IngestResult, SpanBatch, TraceBuffer
from sampler.exporters.base import Exporter
from sampler.metrics import Metrics
from sampler.otlp_wire import Scope, SpanGroup, frame_run
from sampler.pressure import Pressure

# The message of a request refused as overloaded (429, RESOURCE_EXHAUSTED).
OVERLOADED = "tailgate is over its memory limit and its exporters are full; retry later"


class Receiver(Protocol):
    """A server that feeds the trace buffer."""

    protocol: str
    port: int | None  # the bound port once started
    ingest: Ingest

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

    def add(self, batches: list[SpanBatch]) -> IngestResult:
        """Buffer the spans of one decoded request; every receiver goes through here."""
        self._requests.inc()
        if self.capture is not None:
            _tee(self.capture, batches)
        result = self.buffer.add_spans(batches)
        self.pressure.update()
        if result.accepted:
            self._accepted.inc(result.accepted)
        if result.rejected:
            self._rejected.inc(result.rejected)
        if result.late_kept or result.late_dropped:
            self.count_late(result)
        return result

    def refuse(self, reason: str) -> None:
        """Count a request refused as a whole (malformed, too large, unsupported, ...)."""
        self._requests.inc()
        self._rejected_requests.labels(self.protocol, reason).inc()


def retry_after_header(seconds: float) -> dict[str, str]:
    """The Retry-After header suggesting `seconds`: whole seconds, at least 1, as HTTP has them."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _tee(capture: Exporter, batches: list[SpanBatch]) -> None:
    """Hand a request's spans, as they arrived, to the capture; it queues them and never blocks."""
    groups: list[SpanGroup] = []
    spans = 0
    for batch in batches:
        if batch.payloads:
            groups.append(
                (Scope(batch.resource, batch.scope), frame_run(list(batch.payloads)), len(batch.payloads))
            )
            spans += len(batch.payloads)
    if groups:
        capture.export(groups, spans)
