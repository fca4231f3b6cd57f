"""The trace buffer: spans grouped per trace id in wire form, each trace's summary and decision deadline.

Spans are kept as their serialized bytes (framed as `ScopeSpans.spans` entries, one bytearray per trace),
never as per-span Python objects; the summary the policies read is updated as spans arrive. Deadlines live
in a heap. Traces that must be decided early (size limits) are handed to the decider at once through a
callback, so nothing leaves the buffer undecided.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from policies.base import STATUS_UNSET, AttributeValue
from sampler.config import TailSamplingConfig
from sampler.otlp_wire import (
    TAG_RESOURCE,
    TAG_SCHEMA_URL,
    TAG_SCOPE,
    TAG_SPANS,
    Scope,
    SpanGroup,
    encode_varint,
    frame,
    string_attribute,
)

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
# Distinct values remembered per attribute key per trace; enough for any policy, bounded for memory.
_MAX_VALUES_PER_KEY = 64
# Interned Scope objects; when exceeded the table starts over (buffered traces keep their own refs).
_MAX_INTERNED_SCOPES = 10_000
# Above any fixed64 start time: "no start seen yet".
_NO_START = 1 << 64


class Trace:
    """One buffered trace: its spans in wire form and the summary policies read (a TraceView)."""

    __slots__ = (
        "_coded_spans",
        "_codes",
        "_min_start",
        "attributes",
        "deadline",
        "items",
        "last_scope",
        "max_end_ns",
        "root_seen",
        "span_count",
        "trace_id",
    )

    def __init__(self, trace_id: bytes, deadline: float) -> None:
        self.trace_id = trace_id
        self.deadline = deadline
        # Framed spans (TAG_SPANS, length, Span bytes), each run of them preceded by their Scope.
        self.items: list[bytes | Scope] = []
        self.last_scope: Scope | None = None
        self.span_count = 0
        # Bits of the non-UNSET status codes seen, and how many spans had one: UNSET is derived.
        self._codes = 0
        self._coded_spans = 0
        self._min_start = _NO_START
        self.max_end_ns = 0
        self.root_seen = False
        self.attributes: dict[str, list[AttributeValue]] | None = None

    @property
    def status_codes(self) -> int:
        if self._coded_spans < self.span_count:
            return self._codes | STATUS_UNSET
        return self._codes

    @property
    def min_start_ns(self) -> int:
        return 0 if self._min_start == _NO_START else self._min_start

    @property
    def byte_count(self) -> int:
        return sum(len(item) for item in self.items if type(item) is bytes)

    def attribute_values(self, key: str) -> Sequence[AttributeValue]:
        if self.attributes is None:
            return ()
        return self.attributes.get(key, ())

    def add_attribute(self, key: str, value: AttributeValue) -> None:
        if self.attributes is None:
            self.attributes = {key: [value]}
            return
        values = self.attributes.setdefault(key, [])
        if len(values) < _MAX_VALUES_PER_KEY and value not in values:
            values.append(value)

    def span_groups(self, extra: bytes = b"") -> list[SpanGroup]:
        """The trace's spans grouped by scope, each span with `extra` (encoded fields) appended."""
        runs: dict[Scope, list[bytes]] = {}
        counts: dict[Scope, int] = {}
        run: list[bytes] = []
        scope: Scope | None = None
        extra_length = len(extra)
        for item in self.items:
            if type(item) is not bytes:
                assert isinstance(item, Scope)
                scope = item
                run = runs.setdefault(scope, [])
                counts.setdefault(scope, 0)
                continue
            assert scope is not None
            counts[scope] += 1
            if not extra_length:
                run.append(item)
                continue
            # Re-frame: the span grows by `extra`, so its length prefix changes.
            byte = item[1]
            if byte < 0x80:
                length, start = byte, 2
            else:
                length, start = _read_varint(item, 1)
            run.append(_span_prefix(length + extra_length))
            run.append(item[start:])
            run.append(extra)
        return [(scope, b"".join(run), counts[scope]) for scope, run in runs.items()]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    pos += 1
    value = byte & 0x7F
    shift = 7
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
    return value, pos


_SPAN_PREFIXES = [bytes((TAG_SPANS,)) + encode_varint(length) for length in range(4096)]


def _span_prefix(length: int) -> bytes:
    if length < 4096:
        return _SPAN_PREFIXES[length]
    return bytes((TAG_SPANS,)) + encode_varint(length)


def reframe(framed: bytes, extra: bytes) -> bytes:
    """A framed span with `extra` (encoded fields) appended to the span."""
    length, start = _read_varint(framed, 1)
    return _span_prefix(length + len(extra)) + framed[start:] + extra


class DecisionCache:
    """Remembers decided trace ids (kept: the policy that kept them; dropped) for late spans."""

    def __init__(self, sampled_size: int, non_sampled_size: int) -> None:
        self.kept: LRUCache[bytes, str] | None = LRUCache(sampled_size) if sampled_size else None
        self.dropped: LRUCache[bytes, bool] | None = LRUCache(non_sampled_size) if non_sampled_size else None

    def record(self, trace_id: bytes, kept_by: str | None) -> None:
        """Remember a decision; `kept_by` is the keeping policy's name, None for dropped."""
        if kept_by is not None:
            if self.kept is not None:
                self.kept[trace_id] = kept_by
        elif self.dropped is not None:
            self.dropped[trace_id] = True

    def lookup(self, trace_id: bytes) -> str | bool | None:
        """The keeping policy's name if kept, False if dropped, None if unknown."""
        if self.kept is not None:
            policy = self.kept.get(trace_id)
            if policy is not None:
                return policy
        if self.dropped is not None and trace_id in self.dropped:
            return False
        return None


@dataclass
class IngestResult:
    """What became of the spans of one request."""

    accepted: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    late_kept: int = 0
    late_dropped: int = 0
    # Late spans of kept traces, to forward at once.
    late: list[SpanGroup] = field(default_factory=list)


# The decider's entry points, injected so the buffer never imports downstream modules.
DecideNow = Callable[[list[Trace], str], None]
ForwardLate = Callable[[list[SpanGroup], int], None]


class TraceBuffer:
    """Per-trace windowed cache with incremental summaries, deadline heap and size limits."""

    def __init__(
        self,
        settings: TailSamplingConfig,
        attribute_keys: frozenset[str],
        decisions: DecisionCache,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.decisions = decisions
        self.clock = clock
        self.traces: dict[bytes, Trace] = {}
        self.span_count = 0
        self._heap: list[tuple[float, bytes]] = []
        self._scopes: dict[tuple[bytes, bytes], Scope] = {}
        self._attribute_keys = attribute_keys
        # A span's serialized bytes contain `KeyValue.key` encoded like this when it has the key:
        # a cheap substring test that skips attribute parsing for spans without any wanted key.
        self._needles = [frame(0x0A, key.encode()) for key in sorted(attribute_keys)]
        self.decide_now: DecideNow = _refuse_decision
        self.forward_late: ForwardLate = _refuse_late
        self.record_policy = settings.record_policy

    def connect(self, decide_now: DecideNow, forward_late: ForwardLate) -> None:
        """Wire the decider: where early-decided traces and late spans of kept traces go."""
        self.decide_now = decide_now
        self.forward_late = forward_late

    def intern_scope(self, resource: bytes, scope: bytes) -> Scope:
        key = (resource, scope)
        interned = self._scopes.get(key)
        if interned is None:
            if len(self._scopes) >= _MAX_INTERNED_SCOPES:
                self._scopes.clear()
            interned = self._scopes[key] = Scope(resource, scope)
        return interned

    def add_spans(self, request: ExportTraceServiceRequest, framed_spans: list[bytes]) -> IngestResult:
        """Buffer every span of a parsed request.

        `framed_spans` holds each span's `ScopeSpans.spans` entry (tag, length, bytes) in message order.
        This loop runs once per span: it is written for the interpreter, with the rare cases (new trace,
        root span, scope change, invalid ids, full trace) moved out to methods.
        """
        result = IngestResult()
        now = self.clock()
        get_trace = self.traces.get
        max_spans = self.settings.max_spans_per_trace
        needles = self._needles
        keys = self._attribute_keys
        spans_before = self.span_count
        early_spans = 0
        framed_iter = iter(framed_spans)
        for resource_spans in request.resource_spans:
            resource_wire = b""
            if resource_spans.HasField("resource"):
                resource_wire = frame(TAG_RESOURCE, resource_spans.resource.SerializeToString())
            if resource_spans.schema_url:
                resource_wire += frame(TAG_SCHEMA_URL, resource_spans.schema_url.encode())
            resource_values = _wanted_values(resource_spans.resource.attributes, keys) if keys else []
            for scope_spans in resource_spans.scope_spans:
                scope_wire = b""
                if scope_spans.HasField("scope"):
                    scope_wire = frame(TAG_SCOPE, scope_spans.scope.SerializeToString())
                if scope_spans.schema_url:
                    scope_wire += frame(TAG_SCHEMA_URL, scope_spans.schema_url.encode())
                scope = self.intern_scope(resource_wire, scope_wire)
                # Not strict: framed_iter runs on across scopes; its length was checked by the decoder.
                for span, framed in zip(scope_spans.spans, framed_iter, strict=False):
                    trace_id = span.trace_id
                    span_id = span.span_id
                    if (
                        len(trace_id) != 16
                        or len(span_id) != 8
                        or trace_id == _ZERO_TRACE_ID
                        or span_id == _ZERO_SPAN_ID
                    ):
                        _reject(result, trace_id, span_id)
                        continue
                    trace = get_trace(trace_id)
                    if trace is None:
                        trace = self._new_trace(trace_id, now, scope, framed, result)
                        if trace is None:
                            continue
                    items = trace.items
                    if trace.last_scope is not scope:
                        trace.last_scope = scope
                        items.append(scope)
                    items.append(framed)
                    code = span.status.code
                    if code:
                        # Masked: a bad client may send any int32; unknown codes set unused bits.
                        trace._codes |= 1 << (code & 31)
                        trace._coded_spans += 1
                    start = span.start_time_unix_nano
                    if start < trace._min_start:
                        trace._min_start = start
                    end = span.end_time_unix_nano
                    if end > trace.max_end_ns:
                        trace.max_end_ns = end
                    if not span.parent_span_id and not trace.root_seen:
                        self._root_arrived(trace, now)
                    if needles:
                        _extract_attributes(trace, span, framed, needles, keys, resource_values)
                    trace.span_count += 1
                    if trace.span_count >= max_spans:
                        early_spans += trace.span_count
                        self._decide_full(trace)
        accepted = len(framed_spans) - result.rejected
        result.accepted = accepted
        self.span_count = spans_before + accepted - result.late_kept - result.late_dropped - early_spans
        if result.late:
            self.forward_late(result.late, len(result.late))
        self._enforce_limits()
        return result

    def _new_trace(
        self, trace_id: bytes, now: float, scope: Scope, framed: bytes, result: IngestResult
    ) -> Trace | None:
        """Start buffering a trace, or, if it was decided already, handle `framed` as a late span."""
        decided = self.decisions.lookup(trace_id)
        if decided is None:
            trace = self.traces[trace_id] = Trace(trace_id, now + self.settings.decision_wait)
            heapq.heappush(self._heap, (trace.deadline, trace_id))
            return trace
        if decided is False:
            result.late_dropped += 1
        else:
            assert isinstance(decided, str)
            if self.record_policy:
                framed = reframe(framed, string_attribute("tailsampling.policy", decided))
            result.late.append((scope, framed, 1))
            result.late_kept += 1
        return None

    def _root_arrived(self, trace: Trace, now: float) -> None:
        trace.root_seen = True
        root_deadline = now + self.settings.decision_wait_after_root_received
        if root_deadline < trace.deadline:
            trace.deadline = root_deadline
            heapq.heappush(self._heap, (root_deadline, trace.trace_id))

    def _decide_full(self, trace: Trace) -> None:
        # Decided now, so the rest of its spans, even in this request, are late spans.
        del self.traces[trace.trace_id]
        self.decide_now([trace], "max_spans_per_trace")

    @property
    def byte_count(self) -> int:
        """Bytes held for buffered spans; computed on demand (metrics scrapes), not per span."""
        return sum(trace.byte_count for trace in self.traces.values())

    def _enforce_limits(self) -> None:
        """Decide the traces nearest their deadline early while the buffer is over a limit."""
        settings = self.settings
        for reason, limit in (
            ("num_traces", settings.num_traces),
            ("max_buffered_spans", settings.max_buffered_spans),
        ):
            evicted: list[Trace] = []
            while (len(self.traces) if reason == "num_traces" else self.span_count) > limit:
                trace = self._pop_earliest()
                if trace is None:
                    break
                self.span_count -= trace.span_count
                evicted.append(trace)
            if evicted:
                self.decide_now(evicted, reason)

    def _pop_earliest(self) -> Trace | None:
        heap = self._heap
        traces = self.traces
        while heap:
            deadline, trace_id = heapq.heappop(heap)
            trace = traces.get(trace_id)
            if trace is not None and trace.deadline == deadline:
                del traces[trace_id]
                return trace
        return None

    def pop_due(self, now: float) -> list[Trace]:
        """Remove and return every trace whose deadline has passed."""
        heap = self._heap
        traces = self.traces
        due: list[Trace] = []
        while heap and heap[0][0] <= now:
            deadline, trace_id = heapq.heappop(heap)
            trace = traces.get(trace_id)
            if trace is not None and trace.deadline == deadline:
                del traces[trace_id]
                due.append(trace)
                self.span_count -= trace.span_count
        return due

    def pop_all(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        remaining = list(self.traces.values())
        self.traces.clear()
        self._heap.clear()
        self.span_count = 0
        return remaining


def _reject(result: IngestResult, trace_id: bytes, span_id: bytes) -> None:
    result.rejected += 1
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        message = "invalid trace id (must be 16 bytes, not all zero)"
    else:
        message = "invalid span id (must be 8 bytes, not all zero)"
    if message not in result.errors:
        result.errors.append(message)


def _extract_attributes(
    trace: Trace,
    span: Span,
    framed: bytes,
    needles: list[bytes],
    keys: frozenset[str],
    resource_values: list[tuple[str, AttributeValue]],
) -> None:
    for key, value in resource_values:
        trace.add_attribute(key, value)
    for needle in needles:
        if needle in framed:
            for key, value in _wanted_values(span.attributes, keys):
                trace.add_attribute(key, value)
            return


def _wanted_values(attributes: Sequence[KeyValue], keys: frozenset[str]) -> list[tuple[str, AttributeValue]]:
    found: list[tuple[str, AttributeValue]] = []
    for attribute in attributes:
        if attribute.key in keys:
            value = _scalar(attribute.value)
            if value is not None:
                found.append((attribute.key, value))
    return found


def _scalar(value: AnyValue) -> AttributeValue | None:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    return None


def _refuse_decision(traces: list[Trace], reason: str) -> None:
    raise RuntimeError("TraceBuffer.connect() was not called")


def _refuse_late(groups: list[SpanGroup], span_count: int) -> None:
    raise RuntimeError("TraceBuffer.connect() was not called")
