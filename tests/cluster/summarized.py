"""Traces as a member summarizes them for the member that owns them (what TRACES messages carry)."""

from __future__ import annotations

from sampler.buffer import DecisionCache, SpanBatch, Trace, TraceBuffer
from sampler.config import TailSamplingConfig
from sampler.receivers.otlp_decode import decode_protobuf


def summarize(request: bytes | list[SpanBatch]) -> list[Trace]:
    """The traces of a request (encoded ExportTraceServiceRequest, or decoded), summarized by a member
    that owns none of them (TraceBuffer.add_spans), ready to forward."""
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), DecisionCache(0, 0), lambda: 0.0)
    batches = decode_protobuf(request) if isinstance(request, bytes) else request
    result = buffer.add_spans(batches, lambda trace_id: "owner")
    assert not result.rejected, result.errors
    assert not buffer.traces
    return result.foreign.get("owner", [])
