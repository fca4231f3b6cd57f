"""The trace buffer: spans grouped per trace id in wire form, each trace's summary and decision deadline.

Spans are kept as their serialized bytes (runs of framed `ScopeSpans.spans` entries), never as per-span
Python objects; the summary the policies read is updated as spans arrive. Deadlines live in two FIFO
queues. Traces that must be decided early (size limits) are handed to the decider at once through a
callback, so nothing leaves the buffer undecided.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from cachetools import LRUCache
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from policies.base import STATUS_UNSET, AttributeValue, SpanRecord
from sampler.config import TailSamplingConfig
from sampler.otlp_wire import (
    TAG_SCOPE_SPANS,
    Scope,
    SpanGroup,
    frame,
    frame_run,
    split_framed,
    split_payloads,
)

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
# Kept traces' spans are checked (parsed in full) together up to this many bytes at a time.
_CHECK_BYTES = 4 << 20
# The tag of Span.links (field 13, length-delimited): a run without this byte has no span with links.
_LINKS_TAG = b"\x6a"
# How a value is told from the others of its key: by type too (true is not 1, 1 is not 1.0), and NaN as one
# value (it equals nothing, itself included).
_NAN_KEY = ("nan",)
# Distinct values kept per attribute key per trace while it is buffered (bounded for memory); a trace
# with more has all of them read from its spans when it is decided.
_MAX_VALUES_PER_KEY = 256
# Interned Scope objects; when exceeded the table starts over (buffered traces keep their own refs).
_MAX_INTERNED_SCOPES = 10_000
# Above any fixed64 start time: "no start seen yet".
_NO_START = 1 << 64
# The deadline of a trace summarized here for the member that owns it (TraceBuffer.add_spans in a
# cluster): no root moves it earlier, so it never enters a deadline queue here.
_UNSCHEDULED = -math.inf


class Trace:
    """One buffered trace: its spans in wire form and the summary policies read (a TraceView)."""

    __slots__ = (
        "_coded_spans",
        "_codes",
        "_min_start",
        "_parsed",
        "attributes",
        "deadline",
        "first_seq",
        "items",
        "max_end_ns",
        "nbytes",
        "root_seen",
        "span_count",
        "trace_id",
    )

    def __init__(self, trace_id: bytes, deadline: float, first_seq: int = 0) -> None:
        self.trace_id = trace_id
        self.deadline = deadline
        # The write-ahead log's number of the request that started the trace (0 without the log).
        self.first_seq = first_seq
        # Alternating Scope and run: the framed spans (TAG_SPANS, length, Span bytes) of that scope
        # that arrived in one request, joined into one bytes object.
        self.items: list[bytes | Scope] = []
        self.nbytes = 0  # serialized bytes in `items`
        self.span_count = 0
        # Bits of the non-UNSET status codes seen, and how many spans had one: UNSET is derived.
        self._codes = 0
        self._coded_spans = 0
        self._min_start = _NO_START
        self.max_end_ns = 0
        self.root_seen = False
        self.attributes: dict[str, _Values] | None = None
        self._parsed: list[SpanRecord] | None = None

    @property
    def status_codes(self) -> int:
        if self._coded_spans < self.span_count:
            return self._codes | STATUS_UNSET
        return self._codes

    @property
    def min_start_ns(self) -> int:
        return 0 if self._min_start == _NO_START else self._min_start

    def summary(self) -> tuple[bytes, int, int, int, int, int, bool]:
        """What another member needs to merge this trace into its own (see `detached`): trace id, span
        count, spans with a status code, status code bits, earliest start, latest end, root seen."""
        return (
            self.trace_id,
            self.span_count,
            self._coded_spans,
            self._codes,
            self._min_start,
            self.max_end_ns,
            self.root_seen,
        )

    @classmethod
    def detached(
        cls,
        trace_id: bytes,
        span_count: int,
        coded_spans: int,
        codes: int,
        min_start: int,
        max_end: int,
        root_seen: bool,
        items: list[bytes | Scope],
        nbytes: int,
    ) -> Trace:
        """A trace as another member summarized it (the fields of `summary()`), with its spans (`items`,
        `nbytes`), to hand to TraceBuffer.add_traces."""
        # Each slot set once, without __init__ setting most of them first: one call per trace received.
        trace = cls.__new__(cls)
        trace.trace_id = trace_id
        trace.deadline = _UNSCHEDULED
        trace.first_seq = 0
        trace.items = items
        trace.nbytes = nbytes
        trace.span_count = span_count
        trace._codes = codes
        trace._coded_spans = coded_spans
        trace._min_start = min_start
        trace.max_end_ns = max_end
        trace.root_seen = root_seen
        trace.attributes = None
        trace._parsed = None
        return trace

    def merge(self, other: Trace) -> None:
        """Add another summary of spans of this trace (TraceBuffer.add_traces): its spans, counts, status
        codes and times. The caller handles the root."""
        self.items += other.items
        self.nbytes += other.nbytes
        self.span_count += other.span_count
        self._codes |= other._codes
        self._coded_spans += other._coded_spans
        if other._min_start < self._min_start:
            self._min_start = other._min_start
        if other.max_end_ns > self.max_end_ns:
            self.max_end_ns = other.max_end_ns

    def release(self) -> None:
        """Drop the span bytes once decided: stale queue entries may keep the object a while."""
        self.items = []
        self.attributes = None
        self._parsed = None

    def runs(self) -> list[tuple[Scope, bytes]]:
        """The trace's runs of framed spans, each with its scope, in arrival order."""
        return _runs(self.items)

    def spans(self) -> list[SpanRecord]:
        """Every valid span parsed in full, with its resource and scope; parsed once per trace."""
        if self._parsed is None:
            self._parsed = _parse_items(self.items)
        return self._parsed

    def attribute_values(self, key: str) -> Sequence[AttributeValue]:
        if self.attributes is None:
            return ()
        return self.attributes.get(key, ())

    def add_attribute(self, key: str, value: AttributeValue, limit: int = _MAX_VALUES_PER_KEY) -> None:
        """Remember a value of `key` (a key some policy reads), once. Up to `limit` distinct values are
        kept; past it the key is marked, and `complete_attributes` reads them all when the trace is
        decided: the OTel Collector's attribute policies look at every span."""
        if self.attributes is None:
            self.attributes = {}
        values = self.attributes.get(key)
        if values is None:
            values = self.attributes[key] = _Values()
        found = (type(value), value) if value == value else _NAN_KEY
        if found not in values.seen:
            if len(values) >= limit:
                values.overflow = True
                return
            values.seen.add(found)
            values.append(value)

    def read_attributes(self, keys: frozenset[str], limit: int = _MAX_VALUES_PER_KEY) -> None:
        """Extract `keys` from every span and resource, parsed in full: for a trace buffered before a config
        reload added keys (ingest extracts only the keys wanted when a span arrives)."""
        for resource, _, span in self.spans():
            for attributes in (resource.attributes, span.attributes):
                for key, value in _wanted_values(attributes, keys):
                    self.add_attribute(key, value, limit)

    def complete_attributes(self, keys: frozenset[str]) -> None:
        """Before the trace is decided: when some key had more distinct values than are kept while it is
        buffered, all of them, read from every span."""
        if self.attributes is not None and any(values.overflow for values in self.attributes.values()):
            self.attributes = None
            self.read_attributes(keys, limit=sys.maxsize)

    def span_groups(self, rewrite: RewriteRun | None = None) -> tuple[list[SpanGroup], int]:
        """The trace's valid spans grouped by scope, and how many spans were left out as invalid.

        Spans are checked in full here, once their trace is kept: one that is not a valid OTLP Span of
        this trace is left out so that it cannot spoil a batch downstream (their ids were checked when
        they arrived, but spans from other members are taken as sent). `rewrite`, when given, gets each
        group's framed spans with the same spans parsed and returns the framed spans to export.
        """
        ((groups, invalid),) = kept_span_groups([self], [rewrite])
        return groups, invalid

    def scope_entries(self) -> list[tuple[Scope, bytes]]:
        """The trace's framed spans joined per scope, in the order the scopes first arrived."""
        runs: dict[Scope, list[bytes]] = {}
        for scope, run in self.runs():
            runs.setdefault(scope, []).append(run)
        return [(scope, b"".join(chunks)) for scope, chunks in runs.items()]

    def checked_groups(
        self,
        entries_by_scope: list[tuple[Scope, bytes]],
        parsed: Sequence[ScopeSpans] | None,
        rewrite: RewriteRun | None,
    ) -> tuple[list[SpanGroup], int]:
        """span_groups from the trace's `scope_entries`, each parsed already (`parsed`, in the same order)
        or, for None, parsed here group by group; a group that does not parse is read span by span."""
        trace_id = self.trace_id
        groups: list[SpanGroup] = []
        invalid = 0
        for index, (scope, entries) in enumerate(entries_by_scope):
            group = _scope_spans(entries) if parsed is None else parsed[index]
            # Without the links tag anywhere in the group, no span has links (reading an absent
            # repeated field would build a stub with an upb arena of its own).
            links = _LINKS_TAG in entries
            spans: Sequence[Span] = () if group is None else group.spans
            if (
                group is None
                or not _spans_only(group)
                or not all(_exportable(span, trace_id, links) for span in spans)
            ):
                framed = split_framed(entries)
                parsed_spans = [(entry, _parse_framed(entry)) for entry in framed]
                valid = [
                    (entry, span)
                    for entry, span in parsed_spans
                    if span is not None and _exportable(span, trace_id, True)
                ]
                invalid += len(framed) - len(valid)
                entries = b"".join(entry for entry, _ in valid)
                spans = [span for _, span in valid]
            if spans:
                if rewrite is not None:
                    entries = rewrite(entries, spans)
                groups.append((scope, entries, len(spans)))
        return groups, invalid


class _Values(list[AttributeValue]):
    """The distinct values of one attribute key in a trace, in the order first seen; `overflow` when
    there were more than are kept."""

    __slots__ = ("overflow", "seen")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[object] = set()
        self.overflow = False


def kept_span_groups(
    traces: Sequence[Trace], rewrites: Sequence[RewriteRun | None]
) -> list[tuple[list[SpanGroup], int]]:
    """Trace.span_groups of each of `traces` (kept together), with its own rewrite.

    The groups of many traces, up to _CHECK_BYTES of spans, are parsed in one step, as the ScopeSpans of
    one ResourceSpans: each parse costs upb an arena, and upb calls malloc_trim(0) every 10,000 arena
    frees, which with a large heap takes milliseconds and refaults the pages it released. When some group
    does not parse, each trace of that step parses its own groups.
    """
    results: list[tuple[list[SpanGroup], int]] = []
    start = 0
    while start < len(traces):
        end, size = start, 0
        while end < len(traces) and (end == start or size + traces[end].nbytes <= _CHECK_BYTES):
            size += traces[end].nbytes
            end += 1
        results += _checked_together(traces[start:end], rewrites[start:end])
        start = end
    return results


def _checked_together(
    traces: Sequence[Trace], rewrites: Sequence[RewriteRun | None]
) -> list[tuple[list[SpanGroup], int]]:
    entries = [trace.scope_entries() for trace in traces]
    parsed: Sequence[ScopeSpans] | None = None
    try:
        parsed = ResourceSpans.FromString(
            b"".join([frame(TAG_SCOPE_SPANS, group) for groups in entries for _, group in groups])
        ).scope_spans
    except DecodeError:
        if len(traces) > 1:
            return [
                _checked_together([trace], [rewrite])[0]
                for trace, rewrite in zip(traces, rewrites, strict=True)
            ]
    results: list[tuple[list[SpanGroup], int]] = []
    start = 0
    for trace, groups, rewrite in zip(traces, entries, rewrites, strict=True):
        end = start + len(groups)
        results.append(trace.checked_groups(groups, None if parsed is None else parsed[start:end], rewrite))
        start = end
    return results


def _runs(items: list[bytes | Scope]) -> list[tuple[Scope, bytes]]:
    pairs: list[tuple[Scope, bytes]] = []
    for index in range(0, len(items), 2):
        scope, run = items[index], items[index + 1]
        assert isinstance(scope, Scope) and isinstance(run, bytes)
        pairs.append((scope, run))
    return pairs


def _parse_items(items: list[bytes | Scope]) -> list[SpanRecord]:
    records: list[SpanRecord] = []
    headers: dict[Scope, tuple[Resource, InstrumentationScope]] = {}
    for scope, run in _runs(items):
        header = headers.get(scope)
        if header is None:
            # Checked when the scope was interned, so these parse.
            header = headers[scope] = (
                ResourceSpans.FromString(scope.resource).resource,
                ScopeSpans.FromString(scope.scope).scope,
            )
        resource, instrumentation = header
        try:
            spans: Sequence[Span] = ScopeSpans.FromString(run).spans
        except DecodeError:
            parsed = (_parse_framed(framed) for framed in split_framed(run))
            spans = [span for span in parsed if span is not None]
        records.extend(SpanRecord(resource, instrumentation, span) for span in spans)
    return records


def _scope_spans(entries: bytes) -> ScopeSpans | None:
    """Framed `ScopeSpans.spans` entries parsed as a ScopeSpans; None when they do not parse."""
    try:
        return ScopeSpans.FromString(entries)
    except DecodeError:
        return None


def _spans_only(group: ScopeSpans) -> bool:
    """Whether a group parsed from a trace's entries holds nothing but spans. Entries of another field (a
    peer's runs are taken as sent) parse too, as the scope or schema url, and would override the real
    ones in the export."""
    return not group.schema_url and not group.HasField("scope")


def _parse_framed(framed: bytes) -> Span | None:
    """The span of one framed entry; None unless it is exactly one span."""
    group = _scope_spans(framed)
    if group is None or len(group.spans) != 1 or not _spans_only(group):
        return None
    span: Span = group.spans[0]
    return span


def _exportable(span: Span, trace_id: bytes, links: bool) -> bool:
    """Whether a parsed span of the trace `trace_id` may be exported: of that trace, its span id and
    parent id well formed (checked at ingest, by whichever member the span reached), its links' ids too
    (`links`: whether it may have any)."""
    span_id = span.span_id
    parent_id = span.parent_span_id
    return (
        span.trace_id == trace_id
        and len(span_id) == 8
        and span_id != _ZERO_SPAN_ID
        and (not parent_id or len(parent_id) == 8)
        and (not links or not span.links or _valid_links(span))
    )


def _valid_links(span: Span) -> bool:
    # Ids of the wrong length parse as protobuf bytes but make an OTLP backend refuse the batch.
    return all(len(link.trace_id) == 16 and len(link.span_id) == 8 for link in span.links)


def parse_valid_span(payload: bytes) -> Span | None:
    """The span parsed from serialized bytes when they are a valid OTLP Span (the full check kept spans
    get), else None."""
    try:
        span = Span.FromString(payload)
    except DecodeError:
        return None
    return span if _valid_links(span) else None


class SpanFields(Protocol):
    """The span fields the buffer reads; decoders hand it parsed spans that have at least these."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    start_time_unix_nano: int
    end_time_unix_nano: int

    @property
    def status(self) -> Any: ...

    def HasField(self, field_name: Literal["status"]) -> bool: ...  # protobuf's name


@dataclass(slots=True)
class SpanBatch:
    """The spans of one ScopeSpans of a request, as receivers hand them to the buffer."""

    resource: bytes  # ResourceSpans fields other than scope_spans, in wire form
    scope: bytes  # ScopeSpans fields other than spans, in wire form
    resource_payload: bytes  # the serialized Resource message, for policies reading its attributes
    spans: Sequence[SpanFields]
    payloads: Sequence[bytes]  # each span's serialized bytes, in the order of `spans`


class Kept(NamedTuple):
    """How a kept trace was kept: the deciding policy's name and its keep probability (1 when it keeps
    with certainty or adjusted counts are off)."""

    policy: str
    probability: float


# Distinct Kept values shared by the decision cache; the table starts over when it reaches this size.
_MAX_INTERNED_KEPT = 10_000


class DecisionCache:
    """Remembers decided trace ids (kept: how they were kept; dropped) for late spans."""

    def __init__(self, sampled_size: int, non_sampled_size: int) -> None:
        self.kept: LRUCache[bytes, Kept] | None = LRUCache(sampled_size) if sampled_size else None
        self.dropped: LRUCache[bytes, bool] | None = LRUCache(non_sampled_size) if non_sampled_size else None
        # Most kept traces share a handful of (policy, probability) pairs: one object each.
        self._interned: dict[Kept, Kept] = {}
        # With the write-ahead log: where each decision is also noted, for the log to write.
        self.journal: list[tuple[bytes, Kept | None]] | None = None

    def record(self, trace_id: bytes, kept: Kept | None) -> None:
        """Remember a decision; `kept` is None for dropped."""
        if self.journal is not None:
            self.journal.append((trace_id, kept))
        if kept is not None:
            if self.kept is not None:
                interned = self._interned.get(kept)
                if interned is None:
                    if len(self._interned) >= _MAX_INTERNED_KEPT:
                        self._interned.clear()
                    interned = self._interned[kept] = kept
                self.kept[trace_id] = interned
        elif self.dropped is not None:
            self.dropped[trace_id] = True

    def lookup(self, trace_id: bytes) -> Kept | bool | None:
        """How the trace was kept if kept, False if dropped, None if unknown."""
        # Membership first: a miss, the common case for a new trace, costs one call per cache.
        if self.kept is not None and trace_id in self.kept:
            return self.kept[trace_id]
        if self.dropped is not None and trace_id in self.dropped:
            return False
        return None


class LateSpan(NamedTuple):
    """A span of a kept trace that arrived after the decision, checked valid, to forward at once."""

    kept: Kept
    scope: Scope
    payload: bytes  # the span's serialized bytes, unframed
    span: Span  # the same, parsed


@dataclass
class IngestResult:
    """What became of the spans of one request."""

    accepted: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    late_kept: int = 0
    late_dropped: int = 0
    late_invalid: int = 0  # late spans of kept traces left out as not valid OTLP
    late: list[LateSpan] = field(default_factory=list)
    seq: int = -1  # the request's number in the write-ahead log, if there is one
    # In a cluster: traces other members own, summarized here, per owner, to forward (see
    # TraceBuffer.add_spans).
    foreign: dict[str, list[Trace]] = field(default_factory=dict)

    def absorb(self, other: IngestResult) -> None:
        """Add what became of more spans of the same request (their late spans were handed on already)."""
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.errors += [error for error in other.errors if error not in self.errors]
        self.late_kept += other.late_kept
        self.late_dropped += other.late_dropped
        self.late_invalid += other.late_invalid
        self.late += other.late
        for owner, traces in other.foreign.items():
            self.foreign.setdefault(owner, []).extend(traces)


# The decider's entry points, injected so the buffer never imports downstream modules.
DecideNow = Callable[[list[Trace], str], None]
ForwardLate = Callable[[list[LateSpan]], None]
# Rewrites a kept trace's framed spans of one scope before export, given them parsed (Trace.span_groups).
RewriteRun = Callable[[bytes, Sequence[Span]], bytes]
# In a cluster: the member owning a trace id when it is not this one, else None.
ForeignOwner = Callable[[bytes], str | None]


class TraceBuffer:
    """Per-trace windowed cache with incremental summaries, deadline queues and size limits."""

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
        # In order of first arrival (the write-ahead log relies on it).
        self.traces: dict[bytes, Trace] = {}
        self.span_count = 0
        # The write-ahead log's number of the request being added (traces it starts take it).
        self.seq = 0
        # Serialized (framed) bytes of buffered spans, for the tailgate_buffered_bytes gauge.
        self.byte_count = 0
        # Deadline queues, each in deadline order by construction (monotonic clock, one wait each):
        # traces by first arrival (deadline arrival + decision_wait) and traces whose root moved the
        # deadline earlier (root arrival + decision_wait_after_root_received). O(1) per trace; a trace
        # decided through one queue stays in the other until it reaches the head and is skipped.
        self._by_arrival: deque[Trace] = deque()
        self._by_root: deque[Trace] = deque()
        self._scopes: dict[tuple[bytes, bytes], Scope] = {}
        self._attribute_keys = attribute_keys
        # A span's serialized bytes contain `KeyValue.key` encoded like this when it has the key:
        # a cheap substring test that skips attribute parsing for spans without any wanted key.
        self._needles = [frame(0x0A, key.encode()) for key in sorted(attribute_keys)]
        self.decide_now: DecideNow = _refuse_decision
        self.forward_late: ForwardLate = _refuse_late
        # Set by the memory monitor while stress relief sheds load: traces whose first span arrives then
        # are decided through it at the end of that request instead of being buffered.
        self.stress_relief: DecideNow | None = None
        self._stressed: list[Trace] = []

    def connect(self, decide_now: DecideNow, forward_late: ForwardLate) -> None:
        """Wire the decider: where early-decided traces and late spans of kept traces go."""
        self.decide_now = decide_now
        self.forward_late = forward_late

    def reconfigure(self, settings: TailSamplingConfig, attribute_keys: frozenset[str]) -> None:
        """Take a reloaded `tail_sampling` block and the attribute keys its policies read.

        Limits and waits apply to what arrives next. A shorter wait also caps the deadlines of buffered
        traces at now + the new wait (the root wait: of those whose root arrived): no trace waits longer
        than the new setting allows, and each deadline queue stays in order. A lower trace or span limit
        decides the excess at once.
        """
        now = self.clock()
        if settings.decision_wait < self.settings.decision_wait:
            _cap_deadlines(self._by_arrival, now + settings.decision_wait)
        if settings.decision_wait_after_root_received < self.settings.decision_wait_after_root_received:
            self._shorten_root_wait(now + settings.decision_wait_after_root_received)
        self.settings = settings
        self._attribute_keys = attribute_keys
        self._needles = [frame(0x0A, key.encode()) for key in sorted(attribute_keys)]
        self._enforce_limits()

    def _shorten_root_wait(self, latest: float) -> None:
        """Cap at `latest` the deadlines of buffered traces whose root arrived; those whose root did not
        move their deadline before join the root queue, behind every deadline it holds then."""
        _cap_deadlines(self._by_root, latest)
        traces = self.traces
        for trace in self._by_arrival:
            if trace.root_seen and trace.deadline > latest and traces.get(trace.trace_id) is trace:
                trace.deadline = latest
                self._by_root.append(trace)

    def intern_scope(self, resource: bytes, scope: bytes) -> Scope | None:
        """The shared Scope object for these wire bytes; None when they are not valid OTLP.

        Decoding skips over resources and scopes, so each new one is checked in full here, once.
        """
        key = (resource, scope)
        interned = self._scopes.get(key)
        if interned is None:
            try:
                ResourceSpans.FromString(resource)
                ScopeSpans.FromString(scope)
            except DecodeError:
                return None
            if len(self._scopes) >= _MAX_INTERNED_SCOPES:
                self._scopes.clear()
            interned = self._scopes[key] = Scope(resource, scope)
        return interned

    def add_spans(self, batches: list[SpanBatch], foreign_owner: ForeignOwner | None = None) -> IngestResult:
        """Buffer the spans of one decoded request.

        The inner loop runs once per span: it is written for the interpreter, with the rare cases (new
        trace, root span, invalid ids, full trace) moved out to methods. In a cluster, `foreign_owner`
        is asked about each trace id not buffered here; the spans of a trace another member owns (and
        this one did not decide) are checked and summarized as if buffered, into a trace left in
        `result.foreign` for the caller to forward: its owner merges it into its own in one step
        (add_traces).
        """
        result = IngestResult()
        now = self.clock()
        get_trace = self.traces.get
        # Traces summarized for other members, in this request.
        foreign: dict[bytes, Trace] = {}
        get_foreign = foreign.get
        max_spans = self.settings.max_spans_per_trace
        max_bytes = self.settings.maximum_trace_size_bytes
        needles = self._needles
        keys = self._attribute_keys
        spans_before = self.span_count
        early_spans = 0
        added_bytes = 0
        total = 0
        resource_values: list[tuple[str, AttributeValue]] = []
        for batch in batches:
            total += len(batch.payloads)
            scope = self.intern_scope(batch.resource, batch.scope)
            if scope is None:
                _reject_all(result, len(batch.payloads), "invalid resource or instrumentation scope")
                continue
            if keys:
                resource_values = _wanted_values(Resource.FromString(batch.resource_payload).attributes, keys)
            # This scope's spans per trace, joined into one run per trace at the end of the batch.
            runs: dict[Trace, list[bytes]] = {}
            for span, payload in zip(batch.spans, batch.payloads, strict=True):
                trace_id = span.trace_id
                span_id = span.span_id
                parent_id = span.parent_span_id
                if (
                    len(trace_id) != 16
                    or trace_id == _ZERO_TRACE_ID
                    or len(span_id) != 8
                    or span_id == _ZERO_SPAN_ID
                    or (parent_id and len(parent_id) != 8)
                ):
                    _reject(result, trace_id, span_id)
                    continue
                trace = get_trace(trace_id)
                if trace is None:
                    if foreign_owner is not None:
                        trace = get_foreign(trace_id) or _foreign_trace(
                            trace_id, foreign_owner, foreign, result, self.decisions
                        )
                    if trace is None:
                        trace = self._new_trace(trace_id, now, scope, payload, result)
                        if trace is None:
                            continue
                run = runs.get(trace)
                if run is None:
                    runs[trace] = [payload]
                else:
                    run.append(payload)
                # Asked first: reading an absent status builds a stub message (upb: an arena of its own).
                if span.HasField("status"):
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
                if (not parent_id or parent_id == _ZERO_SPAN_ID) and not trace.root_seen:
                    self._root_arrived(trace, now)
                # Attributes of another member's trace are read there, for the keys its policies want.
                if needles and trace.deadline != _UNSCHEDULED:
                    _extract_attributes(trace, payload, needles, keys, resource_values)
                trace.span_count += 1
                # Another member's trace reaches the limit there.
                if trace.span_count >= max_spans and trace.deadline != _UNSCHEDULED:
                    early_spans += trace.span_count
                    framed = frame_run(runs.pop(trace))
                    trace.items += (scope, framed)
                    trace.nbytes += len(framed)
                    # Its earlier runs were counted before (buffer or this request); all leave now.
                    added_bytes += len(framed) - trace.nbytes
                    self._decide_full(trace)
            for trace, payloads in runs.items():
                framed = frame_run(payloads)
                trace.items += (scope, framed)
                trace.nbytes += len(framed)
                added_bytes += len(framed)
                if max_bytes and trace.nbytes > max_bytes and self.traces.get(trace.trace_id) is trace:
                    early_spans += trace.span_count
                    added_bytes -= trace.nbytes
                    del self.traces[trace.trace_id]
                    self.decide_now([trace], "maximum_trace_size_bytes")
        forwarded = 0
        for trace in foreign.values():
            forwarded += trace.span_count
            added_bytes -= trace.nbytes
        accepted = total - result.rejected
        result.accepted = accepted
        self.span_count = (
            spans_before + accepted - forwarded - result.late_kept - result.late_dropped - early_spans
        )
        self.byte_count += added_bytes
        if self._stressed:
            self._decide_stressed()
        if result.late:
            self.forward_late(result.late)
        self._enforce_limits()
        return result

    def add_traces(self, traces: list[Trace], foreign_owner: ForeignOwner | None = None) -> IngestResult:
        """Buffer traces another member summarized (add_spans there, or buffered traces it handed over),
        their scopes interned here (`intern_scope`): each is taken as it is, or merged into the trace
        buffered here, in one step, not span by span.

        A trace decided here already, or one that would reach max_spans_per_trace, goes span by span
        through add_spans, which handles late spans and the limit exactly as for a request. In a
        cluster, traces `foreign_owner` gives to another member are left in `result.foreign`, but for
        those decided here.
        """
        result = IngestResult()
        now = self.clock()
        get_trace = self.traces.get
        lookup = self.decisions.lookup
        max_spans = self.settings.max_spans_per_trace
        max_bytes = self.settings.maximum_trace_size_bytes
        needles = self._needles
        spans_before = self.span_count
        added_spans = early_spans = added_bytes = 0
        span_by_span: list[Trace] = []
        # With attribute keys: the wanted attributes of each scope's resource, read once per call.
        resources: dict[Scope, list[tuple[str, AttributeValue]]] = {}
        for incoming in traces:
            trace_id = incoming.trace_id
            trace = get_trace(trace_id)
            if trace is None:
                owner = None if foreign_owner is None else foreign_owner(trace_id)
                # A trace decided here stays here, whoever owns it now: its late spans follow the decision.
                if owner is not None and lookup(trace_id) is None:
                    result.foreign.setdefault(owner, []).append(incoming)
                    result.accepted += incoming.span_count
                    continue
                if lookup(trace_id) is not None or incoming.span_count >= max_spans:
                    span_by_span.append(incoming)
                    continue
                trace = self._adopt(incoming, now)
            elif trace.span_count + incoming.span_count >= max_spans:
                span_by_span.append(incoming)
                continue
            else:
                if incoming.root_seen and not trace.root_seen:
                    self._root_arrived(trace, now)
                trace.merge(incoming)
            if needles:
                self._extract_run_attributes(trace, incoming, resources)
            added_spans += incoming.span_count
            added_bytes += incoming.nbytes
            if max_bytes and trace.nbytes > max_bytes and get_trace(trace_id) is trace:
                early_spans += trace.span_count
                added_bytes -= trace.nbytes
                del self.traces[trace_id]
                self.decide_now([trace], "maximum_trace_size_bytes")
        result.accepted += added_spans
        self.span_count = spans_before + added_spans - early_spans
        self.byte_count += added_bytes
        if self._stressed:
            self._decide_stressed()
        self._enforce_limits()
        if span_by_span:
            batches = [batch for trace in span_by_span for batch in _trace_batches(trace)]
            result.absorb(self.add_spans(batches))
        return result

    def _extract_run_attributes(
        self, trace: Trace, incoming: Trace, resources: dict[Scope, list[tuple[str, AttributeValue]]]
    ) -> None:
        """Read the wanted attributes from the spans (and resources: `resources` keeps those read) of
        another member's trace."""
        keys = self._attribute_keys
        for scope, run in incoming.runs():
            values = resources.get(scope)
            if values is None:
                resource = ResourceSpans.FromString(scope.resource).resource
                values = resources[scope] = _wanted_values(resource.attributes, keys)
            for key, value in values:
                trace.add_attribute(key, value)
            if any(needle in run for needle in self._needles):
                try:
                    spans: Sequence[Span] = ScopeSpans.FromString(run).spans
                except DecodeError:
                    continue  # found invalid when the trace is kept, and dropped then
                for span in spans:
                    for key, value in _wanted_values(span.attributes, keys):
                        trace.add_attribute(key, value)

    def _start_trace(self, trace_id: bytes, now: float) -> Trace:
        return self._schedule(Trace(trace_id, 0.0), now)

    def _adopt(self, trace: Trace, now: float) -> Trace:
        """Buffer another member's trace as it is; its root, if seen, moves its deadline as here."""
        self._schedule(trace, now)
        if trace.root_seen:
            self._move_to_root_deadline(trace, now)
        return trace

    def _schedule(self, trace: Trace, now: float) -> Trace:
        """Put a new trace in the buffer and its deadline queue."""
        trace.deadline = now + self.settings.decision_wait
        trace.first_seq = self.seq
        self.traces[trace.trace_id] = trace
        if self.stress_relief is None:
            self._by_arrival.append(trace)
        else:
            self._stressed.append(trace)
        return trace

    def _new_trace(
        self, trace_id: bytes, now: float, scope: Scope, payload: bytes, result: IngestResult
    ) -> Trace | None:
        """Start buffering a trace, or, if it was decided already, handle `payload` as a late span."""
        decided = self.decisions.lookup(trace_id)
        if decided is None:
            return self._start_trace(trace_id, now)
        if decided is False:
            result.late_dropped += 1
        else:
            assert isinstance(decided, Kept)
            span = parse_valid_span(payload)
            if span is not None:
                result.late.append(LateSpan(decided, scope, payload, span))
            else:
                result.late_invalid += 1
            result.late_kept += 1
        return None

    def _root_arrived(self, trace: Trace, now: float) -> None:
        trace.root_seen = True
        self._move_to_root_deadline(trace, now)

    def _move_to_root_deadline(self, trace: Trace, now: float) -> None:
        root_deadline = now + self.settings.decision_wait_after_root_received
        if root_deadline < trace.deadline:
            trace.deadline = root_deadline
            self._by_root.append(trace)

    def _decide_full(self, trace: Trace) -> None:
        # Decided now, so the rest of its spans, even in this request, are late spans.
        del self.traces[trace.trace_id]
        self.decide_now([trace], "max_spans_per_trace")

    def _decide_stressed(self) -> None:
        """Hand the traces this request started to stress relief, unless already decided (trace limits)."""
        started, self._stressed = self._stressed, []
        decide = self.stress_relief
        assert decide is not None  # only set while it is
        traces = self.traces
        stressed: list[Trace] = []
        for trace in started:
            if traces.get(trace.trace_id) is trace:
                self._remove(trace)
                stressed.append(trace)
        if stressed:
            decide(stressed, "stress_relief")

    def _enforce_limits(self) -> None:
        """Decide the traces nearest their deadline early while the buffer is over a limit."""
        settings = self.settings
        for reason, limit in (
            ("num_traces", settings.num_traces),
            ("max_buffered_spans", settings.max_buffered_spans),
        ):
            evicted: list[Trace] = []
            while (len(self.traces) if reason == "num_traces" else self.span_count) > limit:
                queue = self._earliest_queue()
                if queue is None:
                    break
                evicted.append(self._take_head(queue))
            if evicted:
                self.decide_now(evicted, reason)

    def pop_earliest(self, max_spans: int) -> list[Trace]:
        """Remove and return the traces nearest their deadline, as many as hold at most `max_spans` spans
        (at least one when any is buffered)."""
        popped: list[Trace] = []
        spans = 0
        while (queue := self._earliest_queue()) is not None:
            if popped and spans + queue[0].span_count > max_spans:
                break
            trace = self._take_head(queue)
            popped.append(trace)
            spans += trace.span_count
        return popped

    def _live_head(self, queue: deque[Trace]) -> Trace | None:
        """The first trace of a deadline queue that is still buffered, dropping decided ones."""
        traces = self.traces
        while queue:
            trace = queue[0]
            if traces.get(trace.trace_id) is trace:
                return trace
            queue.popleft()
        return None

    def _earliest_queue(self) -> deque[Trace] | None:
        """The deadline queue whose head is the buffered trace due first; None when the buffer is empty."""
        by_arrival = self._live_head(self._by_arrival)
        by_root = self._live_head(self._by_root)
        if by_arrival is None and by_root is None:
            return None
        if by_root is None or (by_arrival is not None and by_arrival.deadline <= by_root.deadline):
            return self._by_arrival
        return self._by_root

    def _take_head(self, queue: deque[Trace]) -> Trace:
        """Remove the (live) head of a deadline queue from the buffer."""
        trace = queue.popleft()
        self._remove(trace)
        return trace

    def _remove(self, trace: Trace) -> None:
        """Take a buffered trace out of the buffer and off its counts."""
        del self.traces[trace.trace_id]
        self.span_count -= trace.span_count
        self.byte_count -= trace.nbytes

    def next_deadline(self) -> float | None:
        """The earliest deadline of a buffered trace; None when the buffer is empty."""
        heads = (self._live_head(self._by_arrival), self._live_head(self._by_root))
        return min((trace.deadline for trace in heads if trace is not None), default=None)

    def pop_due(self, now: float, limit: int) -> list[Trace]:
        """Remove and return up to `limit` traces whose deadline has passed."""
        traces = self.traces
        due: list[Trace] = []
        for queue in (self._by_root, self._by_arrival):
            # A trace's deadline only ever moves earlier, so a head not yet due means none behind it is
            # due through this queue.
            while queue and queue[0].deadline <= now and len(due) < limit:
                trace = queue.popleft()
                if traces.get(trace.trace_id) is trace:
                    del traces[trace.trace_id]
                    due.append(trace)
                    self.span_count -= trace.span_count
                    self.byte_count -= trace.nbytes
        return due

    def take(self, traces: list[Trace]) -> list[Trace]:
        """Remove `traces` undecided (those still buffered), to hand them to another cluster member."""
        taken = []
        for trace in traces:
            if self.traces.get(trace.trace_id) is trace:
                self._remove(trace)
                taken.append(trace)
        return taken

    def pop_all(self) -> list[Trace]:
        """Remove and return every buffered trace (shutdown)."""
        remaining = list(self.traces.values())
        self.traces.clear()
        self._by_arrival.clear()
        self._by_root.clear()
        self.span_count = 0
        self.byte_count = 0
        return remaining


def _foreign_trace(
    trace_id: bytes,
    foreign_owner: ForeignOwner,
    foreign: dict[bytes, Trace],
    result: IngestResult,
    decisions: DecisionCache,
) -> Trace | None:
    """A trace to summarize spans into for the member that owns `trace_id`; None when it is this one, or
    when this member decided the trace: its spans are late here and follow that decision, while its new
    owner (after a membership change) may not have the decision yet."""
    owner = foreign_owner(trace_id)
    if owner is None or decisions.lookup(trace_id) is not None:
        return None
    trace = foreign[trace_id] = Trace(trace_id, _UNSCHEDULED)
    result.foreign.setdefault(owner, []).append(trace)
    return trace


def _trace_batches(trace: Trace) -> list[SpanBatch]:
    """Another member's trace as the batches a receiver would have decoded, each span parsed in full;
    a span that does not parse stands as one without ids, so add_spans rejects it."""
    batches: list[SpanBatch] = []
    for scope, run in trace.runs():
        payloads = split_payloads(run)
        spans: list[SpanFields] = []
        for payload in payloads:
            try:
                spans.append(Span.FromString(payload))
            except DecodeError:
                spans.append(_NO_SPAN)
        try:
            resource = ResourceSpans.FromString(scope.resource).resource.SerializeToString()
        except DecodeError:
            resource = b""  # add_spans rejects the batch for its scope
        batches.append(SpanBatch(scope.resource, scope.scope, resource, spans, payloads))
    return batches


_NO_SPAN = Span()


def _cap_deadlines(queue: deque[Trace], latest: float) -> None:
    for trace in queue:
        if trace.deadline > latest:
            trace.deadline = latest


def _reject(result: IngestResult, trace_id: bytes, span_id: bytes) -> None:
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        message = "invalid trace id (must be 16 bytes, not all zero)"
    elif len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        message = "invalid span id (must be 8 bytes, not all zero)"
    else:
        message = "invalid parent span id (must be empty or 8 bytes)"
    _reject_all(result, 1, message)


def _reject_all(result: IngestResult, spans: int, message: str) -> None:
    result.rejected += spans
    if message not in result.errors:
        result.errors.append(message)


def _extract_attributes(
    trace: Trace,
    payload: bytes,
    needles: list[bytes],
    keys: frozenset[str],
    resource_values: list[tuple[str, AttributeValue]],
) -> None:
    for key, value in resource_values:
        trace.add_attribute(key, value)
    for needle in needles:
        if needle in payload:
            try:
                attributes = Span.FromString(payload).attributes
            except DecodeError:
                return  # found invalid when the trace is kept, and dropped then
            for key, value in _wanted_values(attributes, keys):
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


def _refuse_late(spans: list[LateSpan]) -> None:
    raise RuntimeError("TraceBuffer.connect() was not called")
