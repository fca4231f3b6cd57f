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

from policies.base import AttributeValue
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
# `ScopeSpans.spans` tag + length prefixes for the common span sizes, built once.
_SPAN_PREFIX = [bytes((TAG_SPANS,)) + encode_varint(n) for n in range(16384)]


class Trace:
    """One buffered trace: its spans in wire form and the summary policies read (a TraceView)."""

    __slots__ = (
        "attributes",
        "data",
        "deadline",
        "max_end_ns",
        "min_start_ns",
        "root_seen",
        "scopes",
        "span_count",
        "status_codes",
        "trace_id",
    )

    def __init__(self, trace_id: bytes, deadline: float) -> None:
        self.trace_id = trace_id
        self.deadline = deadline
        self.scopes: list[Scope] = []
        # Per span: varint index into `scopes`, then the framed span (tag, length, bytes).
        self.data = bytearray()
        self.span_count = 0
        self.status_codes = 0
        self.min_start_ns = 0
        self.max_end_ns = 0
        self.root_seen = False
        self.attributes: dict[str, list[AttributeValue]] | None = None

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
        data = bytes(self.data)
        runs: list[list[bytes]] = [[] for _ in self.scopes]
        counts = [0] * len(self.scopes)
        pos = 0
        end = len(data)
        extra_len = len(extra)
        while pos < end:
            index = data[pos]
            pos += 1
            if index & 0x80:
                index, pos = _read_varint_tail(data, pos, index)
            pos += 1  # the TAG_SPANS byte
            byte = data[pos]
            pos += 1
            length = byte & 0x7F
            shift = 7
            while byte & 0x80:
                byte = data[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
            if extra_len:
                runs[index].append(_span_prefix(length + extra_len))
                runs[index].append(data[pos : pos + length])
                runs[index].append(extra)
            else:
                runs[index].append(data[pos - len(_span_prefix(length)) : pos + length])
            counts[index] += 1
            pos += length
        return [
            (scope, b"".join(run), count)
            for scope, run, count in zip(self.scopes, runs, counts, strict=True)
            if count
        ]


def _read_varint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    value = first & 0x7F
    shift = 7
    byte = first
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
    return value, pos


def _span_prefix(length: int) -> bytes:
    if length < len(_SPAN_PREFIX):
        return _SPAN_PREFIX[length]
    return bytes((TAG_SPANS,)) + encode_varint(length)


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
        self.byte_count = 0
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

    def add_spans(self, request: ExportTraceServiceRequest, raw_spans: list[bytes]) -> IngestResult:
        """Buffer every span of a parsed request; `raw_spans` are the spans' bytes in message order."""
        result = IngestResult()
        now = self.clock()
        traces = self.traces
        get_trace = traces.get
        settings = self.settings
        decision_wait = settings.decision_wait
        root_wait = settings.decision_wait_after_root_received
        max_spans = settings.max_spans_per_trace
        needles = self._needles
        heap = self._heap
        late: list[SpanGroup] = []
        span_index = 0
        added_spans = 0
        added_bytes = 0
        for resource_spans in request.resource_spans:
            resource_wire = b""
            if resource_spans.HasField("resource"):
                resource_wire = frame(TAG_RESOURCE, resource_spans.resource.SerializeToString())
            if resource_spans.schema_url:
                resource_wire += frame(TAG_SCHEMA_URL, resource_spans.schema_url.encode())
            resource_values = (
                _wanted_values(resource_spans.resource.attributes, self._attribute_keys) if needles else []
            )
            for scope_spans in resource_spans.scope_spans:
                scope_wire = b""
                if scope_spans.HasField("scope"):
                    scope_wire = frame(TAG_SCOPE, scope_spans.scope.SerializeToString())
                if scope_spans.schema_url:
                    scope_wire += frame(TAG_SCHEMA_URL, scope_spans.schema_url.encode())
                scope = self.intern_scope(resource_wire, scope_wire)
                for span in scope_spans.spans:
                    raw = raw_spans[span_index]
                    span_index += 1
                    trace_id = span.trace_id
                    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
                        result.rejected += 1
                        _note(result.errors, "invalid trace id (must be 16 bytes, not all zero)")
                        continue
                    span_id = span.span_id
                    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
                        result.rejected += 1
                        _note(result.errors, "invalid span id (must be 8 bytes, not all zero)")
                        continue
                    trace = get_trace(trace_id)
                    if trace is None:
                        decided = self.decisions.lookup(trace_id)
                        if decided is not None:
                            if decided is False:
                                result.late_dropped += 1
                            else:
                                assert isinstance(decided, str)
                                late.append(self._late_group(scope, raw, decided))
                                result.late_kept += 1
                            result.accepted += 1
                            continue
                        trace = traces[trace_id] = Trace(trace_id, now + decision_wait)
                        heapq.heappush(heap, (trace.deadline, trace_id))
                    scopes = trace.scopes
                    if scopes and scopes[-1] is scope:
                        index = len(scopes) - 1
                    else:
                        try:
                            index = scopes.index(scope)
                        except ValueError:
                            index = len(scopes)
                            scopes.append(scope)
                    data = trace.data
                    before = len(data)
                    if index < 128:
                        data.append(index)
                    else:
                        data += encode_varint(index)
                    size = len(raw)
                    data += _SPAN_PREFIX[size] if size < 16384 else _span_prefix(size)
                    data += raw
                    added_bytes += len(data) - before
                    added_spans += 1
                    trace.span_count += 1
                    # Masked: a bad client may send any int32; unknown codes set unused bits.
                    trace.status_codes |= 1 << (span.status.code & 31)
                    start = span.start_time_unix_nano
                    if start and (start < trace.min_start_ns or not trace.min_start_ns):
                        trace.min_start_ns = start
                    end = span.end_time_unix_nano
                    if end > trace.max_end_ns:
                        trace.max_end_ns = end
                    if not span.parent_span_id and not trace.root_seen:
                        trace.root_seen = True
                        root_deadline = now + root_wait
                        if root_deadline < trace.deadline:
                            trace.deadline = root_deadline
                            heapq.heappush(heap, (root_deadline, trace_id))
                    if needles:
                        for value_key, value in resource_values:
                            trace.add_attribute(value_key, value)
                        for needle in needles:
                            if needle in raw:
                                for value_key, value in _wanted_values(span.attributes, self._attribute_keys):
                                    trace.add_attribute(value_key, value)
                                break
                    result.accepted += 1
                    if trace.span_count >= max_spans:
                        # Decided now, so the rest of its spans, even in this request, are late.
                        del traces[trace_id]
                        added_spans -= trace.span_count
                        added_bytes -= len(trace.data)
                        self.decide_now([trace], "max_spans_per_trace")
        self.span_count += added_spans
        self.byte_count += added_bytes
        if late:
            self.forward_late(late, len(late))
        self._enforce_limits()
        return result

    def _late_group(self, scope: Scope, raw: bytes, policy: str) -> SpanGroup:
        extra = string_attribute("tailsampling.policy", policy) if self.record_policy else b""
        return (scope, _span_prefix(len(raw) + len(extra)) + raw + extra, 1)

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
                self.byte_count -= len(trace.data)
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
                self.byte_count -= len(trace.data)
        return due

    def pop_all(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        remaining = list(self.traces.values())
        self.traces.clear()
        self._heap.clear()
        self.span_count = 0
        self.byte_count = 0
        return remaining


def _note(errors: list[str], message: str) -> None:
    if message not in errors:
        errors.append(message)


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
