"""Traces another member summarized (TraceBuffer.add_spans with a router) and merged by their owner
(TraceBuffer.add_traces), against the same spans buffered where they arrived."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

import sampler.buffer as buffer_module
from sampler.buffer import DecisionCache, Kept, LateSpan, Trace, TraceBuffer, kept_span_groups
from sampler.cluster.forward import decode_body, encode_body, encode_traces
from sampler.config import TailSamplingConfig
from sampler.otlp_wire import frame, frame_run
from sampler.receivers.otlp_decode import decode_protobuf
from tests.otlp_data import make_request

KEYS = frozenset({"service.name", "db.statement", "retries"})


class Recorder:
    """A trace buffer as a member holds it, with what it decides early and the late spans it hands on."""

    def __init__(self, keys: frozenset[str] = frozenset(), **settings: Any) -> None:
        self.now = 100.0
        self.buffer = TraceBuffer(
            TailSamplingConfig(**settings), keys, DecisionCache(1000, 1000), lambda: self.now
        )
        self.decided: list[tuple[list[Trace], str]] = []
        self.late: list[LateSpan] = []
        self.buffer.connect(lambda traces, reason: self.decided.append((traces, reason)), self.late.extend)


def varied_requests(seed: int) -> list[bytes]:
    """Requests whose traces span resources, scopes and requests: spans in random order (roots last or
    first), every status code, attributes the policies read on some spans."""
    rng = random.Random(seed)
    trace_ids = [rng.randbytes(16) for _ in range(12)]
    spans: list[tuple[int, int, int]] = [
        (trace, index, rng.randrange(4)) for trace in range(12) for index in range(6)
    ]
    rng.shuffle(spans)
    bodies = []
    for start in range(0, len(spans), 18):
        request = ExportTraceServiceRequest()
        for service in ("checkout", "payment"):
            resource_spans = request.resource_spans.add()
            resource_spans.resource.attributes.append(
                KeyValue(key="service.name", value=AnyValue(string_value=service))
            )
            for library in ("http", "db"):
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.name = f"{service}.{library}"
                for trace, index, code in spans[start : start + 18]:
                    if (trace + index) % 4 != ("checkout", "payment").index(service) * 2 + (
                        "http",
                        "db",
                    ).index(library):
                        continue
                    span = scope_spans.spans.add(
                        trace_id=trace_ids[trace],
                        span_id=bytes([trace + 1, index + 1, 0, 0, 0, 0, 0, 1]),
                        name=f"op {index}",
                        start_time_unix_nano=1_000 * trace + 10 * index,
                        end_time_unix_nano=1_000 * trace + 10 * index + 5 + code,
                    )
                    if index:
                        span.parent_span_id = bytes([trace + 1, 1, 0, 0, 0, 0, 0, 1])
                    span.status.code = code if code < 3 else 0
                    if index == 2:
                        span.attributes.append(
                            KeyValue(key="db.statement", value=AnyValue(string_value=f"select {trace}"))
                        )
        bodies.append(request.SerializeToString())
    return bodies


def through_a_peer(sender: TraceBuffer, body: bytes, owner: Recorder) -> None:
    """Send `body` to a member that owns none of its traces; it forwards them to `owner` (encoded and
    decoded as on the wire)."""
    result = sender.add_spans(decode_protobuf(body), lambda trace_id: "owner")
    assert not result.rejected and not sender.traces
    if result.foreign:
        (message,) = decode_body(
            encode_body([encode_traces(result.foreign["owner"], 1)]), owner.buffer.intern_scope
        )
        assert hasattr(message, "traces")
        merged = owner.buffer.add_traces(message.traces)
        assert merged.accepted == sum(trace.span_count for trace in result.foreign["owner"])


def view(trace: Trace) -> tuple[Any, ...]:
    groups, invalid = trace.span_groups()
    return (
        trace.summary(),
        trace.deadline,
        trace.status_codes,
        trace.min_start_ns,
        trace.nbytes,
        invalid,
        [(scope.resource, scope.scope, entries, count) for scope, entries, count in groups],
        {key: sorted(map(str, trace.attribute_values(key))) for key in KEYS},
    )


def test_a_trace_merged_from_summaries_equals_the_trace_buffered_where_its_spans_arrived() -> None:
    bodies = varied_requests(1)
    here, owner = Recorder(KEYS), Recorder(KEYS)
    sender = Recorder(KEYS).buffer
    for number, body in enumerate(bodies):
        here.now = owner.now = 100.0 + number  # roots arrive at different times: deadlines move
        here.buffer.add_spans(decode_protobuf(body))
        through_a_peer(sender, body, owner)
    assert len(here.buffer.traces) == 12
    assert {trace_id: view(trace) for trace_id, trace in owner.buffer.traces.items()} == {
        trace_id: view(trace) for trace_id, trace in here.buffer.traces.items()
    }
    assert (owner.buffer.span_count, owner.buffer.byte_count) == (
        here.buffer.span_count,
        here.buffer.byte_count,
    )
    # The same traces come due at the same moments (root-triggered deadlines included); those due at the
    # same moment may come in another order.
    for moment in (101.5, 102.5, 104.0, 200.0):
        due_here = {trace.trace_id for trace in here.buffer.pop_due(moment, 100)}
        assert {trace.trace_id for trace in owner.buffer.pop_due(moment, 100)} == due_here
    assert not owner.buffer.traces and owner.buffer.span_count == owner.buffer.byte_count == 0


def test_spans_with_invalid_ids_are_refused_by_the_member_they_reach_not_forwarded() -> None:
    request = make_request(traces=2, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[1].span_id = b"\x01\x02"
    spans[4].parent_span_id = b"\x03"
    sender = Recorder().buffer
    result = sender.add_spans(decode_protobuf(request.SerializeToString()), lambda trace_id: "owner")
    assert (result.accepted, result.rejected) == (4, 2)
    assert sorted(result.errors) == [
        "invalid parent span id (must be empty or 8 bytes)",
        "invalid span id (must be 8 bytes, not all zero)",
    ]
    assert sum(trace.span_count for trace in result.foreign["owner"]) == 4
    assert sender.span_count == 0 and sender.byte_count == 0


def test_late_spans_of_a_forwarded_trace_follow_the_owners_decision() -> None:
    owner = Recorder()
    request = make_request(traces=2, spans_per_trace=3)
    kept_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    dropped_id = request.resource_spans[0].scope_spans[0].spans[3].trace_id
    owner.buffer.decisions.record(kept_id, Kept("errors", 1.0))
    owner.buffer.decisions.record(dropped_id, None)
    result = owner.buffer.add_traces(summarize_for(owner, request.SerializeToString()))
    assert (result.accepted, result.late_kept, result.late_dropped) == (6, 3, 3)
    assert [late.span.trace_id for late in owner.late] == [kept_id] * 3
    assert {late.kept for late in owner.late} == {Kept("errors", 1.0)}
    assert not owner.buffer.traces and owner.buffer.span_count == 0


def test_a_forwarded_trace_reaching_max_spans_is_decided_as_if_its_spans_had_arrived_here() -> None:
    here, owner = Recorder(max_spans_per_trace=5), Recorder(max_spans_per_trace=5)
    body = make_request(traces=1, spans_per_trace=7).SerializeToString()
    here.buffer.add_spans(decode_protobuf(body))
    owner.buffer.add_traces(summarize_for(owner, body))
    assert [(len(traces), reason) for traces, reason in owner.decided] == [(1, "max_spans_per_trace")]
    assert owner.decided[0][0][0].span_count == here.decided[0][0][0].span_count == 5
    # The rest follows the decision as late spans, once the decider recorded it (here: not yet).
    assert owner.buffer.span_count == here.buffer.span_count


def test_a_forwarded_trace_over_maximum_trace_size_bytes_is_decided_at_once() -> None:
    owner = Recorder(maximum_trace_size_bytes=200)
    body = make_request(traces=2, spans_per_trace=4).SerializeToString()
    result = owner.buffer.add_traces(summarize_for(owner, body))
    assert result.accepted == 8
    assert [reason for _, reason in owner.decided] == ["maximum_trace_size_bytes"] * 2
    assert not owner.buffer.traces and owner.buffer.span_count == owner.buffer.byte_count == 0


def test_traces_another_member_owns_now_are_left_to_route_on() -> None:
    owner = Recorder()
    traces = summarize_for(owner, make_request(traces=6, spans_per_trace=2).SerializeToString())
    theirs = {trace.trace_id for trace in traces[::2]}
    result = owner.buffer.add_traces(traces, lambda trace_id: "other" if trace_id in theirs else None)
    assert {trace.trace_id for trace in result.foreign["other"]} == theirs
    assert set(owner.buffer.traces) == {trace.trace_id for trace in traces} - theirs
    assert (result.accepted, owner.buffer.span_count) == (12, 6)


def test_forwarded_traces_arriving_under_stress_relief_are_decided_through_it() -> None:
    owner = Recorder()
    relieved: list[Trace] = []
    owner.buffer.stress_relief = lambda traces, reason: relieved.extend(traces)
    owner.buffer.add_traces(
        summarize_for(owner, make_request(traces=3, spans_per_trace=2).SerializeToString())
    )
    assert len(relieved) == 3 and not owner.buffer.traces
    assert owner.buffer.span_count == owner.buffer.byte_count == 0


def summarize_for(owner: Recorder, body: bytes) -> list[Trace]:
    """The traces of `body` as another member forwards them to `owner`."""
    sender = Recorder().buffer
    result = sender.add_spans(decode_protobuf(body), lambda trace_id: "owner")
    (message,) = decode_body(
        encode_body([encode_traces(result.foreign["owner"], 1)]), owner.buffer.intern_scope
    )
    assert hasattr(message, "traces")
    traces: list[Trace] = message.traces
    return traces


def test_spans_a_peer_sent_that_are_not_of_their_trace_or_have_bad_ids_are_left_out_when_kept() -> None:
    """A member checks the ids of the spans it forwards; the owner takes them as sent, and the full check
    of a kept trace leaves out any that would spoil the batch downstream."""
    owner = Recorder()
    request = make_request(traces=2, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    ours, theirs = summarize_for(owner, request.SerializeToString())
    # As a faulty peer could send them: another trace's span, and one whose span id is cut.
    bad = make_request(traces=1, spans_per_trace=2)
    stray, cut = bad.resource_spans[0].scope_spans[0].spans
    cut.trace_id = spans[0].trace_id
    cut.span_id = b"\x01\x02"
    scope = ours.runs()[0][0]
    for span in (stray, cut):
        payload = span.SerializeToString()
        ours.items += (scope, frame_run([payload]))
        ours.span_count += 1
    owner.buffer.add_traces([ours, theirs])
    trace = owner.buffer.traces[spans[0].trace_id]
    groups, invalid = trace.span_groups()
    assert invalid == 2
    exported = ScopeSpans.FromString(b"".join(entries for _, entries, _ in groups)).spans
    assert [span.span_id for span in exported] == [span.span_id for span in spans[:3]]


def test_a_trace_received_from_a_peer_has_every_field_a_buffered_one_has() -> None:
    """Trace.detached sets each slot itself, not through __init__: none may be left unset."""
    trace = Trace.detached(bytes(range(16)), 2, 1, 4, 10, 20, True, [], 0)
    assert [slot for slot in Trace.__slots__ if not hasattr(trace, slot)] == []
    fresh = Trace(bytes(range(16)), trace.deadline)
    assert (fresh.attributes, fresh._parsed, fresh.first_seq) == (trace.attributes, trace._parsed, 0)


def test_a_kept_trace_leaves_out_spans_with_bad_link_ids_and_a_group_that_does_not_parse() -> None:
    """span_groups parses all groups in one step; a group that does not parse is read span by span, the
    others as they are, and a span whose link has a cut span id is left out."""
    owner = Recorder()
    request = make_request(traces=1, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[1].links.add(trace_id=bytes(range(16)), span_id=bytes(range(8)))
    spans[2].links.add(trace_id=bytes(range(16)), span_id=b"\x01")
    owner.buffer.add_spans(decode_protobuf(request.SerializeToString()))
    trace = owner.buffer.traces[spans[0].trace_id]
    ((scope, _),) = trace.runs()
    other = owner.buffer.intern_scope(
        scope.resource, frame(0x0A, InstrumentationScope(name="b").SerializeToString())
    )
    assert other is not None and other is not scope
    good = spans[0].SerializeToString()
    trace.items += (other, frame_run([good]) + b"\x12\x05abc")  # a whole span, then a cut entry
    groups, invalid = trace.span_groups()
    assert invalid == 2
    assert [(group_scope, count) for group_scope, _, count in groups] == [(scope, 2), (other, 1)]
    first = ScopeSpans.FromString(groups[0][1]).spans
    assert [span.span_id for span in first] == [spans[0].span_id, spans[1].span_id]
    assert groups[1][1] == frame_run([good])


@pytest.mark.parametrize("check_bytes", [1, 1 << 20])
def test_kept_traces_checked_together_get_the_groups_each_gets_alone(
    check_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kept_span_groups parses many traces' groups in one step (up to _CHECK_BYTES); a trace with a group
    that does not parse does not change what the others get."""
    owner = Recorder()
    request = make_request(traces=4, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    owner.buffer.add_spans(decode_protobuf(request.SerializeToString()))
    traces = [owner.buffer.traces[span.trace_id] for span in spans[::3]]
    ((scope, _),) = traces[2].runs()
    traces[2].items += (scope, b"\x12\x05abc")  # a cut entry in the third trace
    alone = [trace.span_groups() for trace in traces]
    assert [invalid for _, invalid in alone] == [0, 0, 1, 0]
    monkeypatch.setattr(buffer_module, "_CHECK_BYTES", check_bytes)
    assert kept_span_groups(traces, [None] * 4) == alone


def test_entries_of_other_fields_in_a_peers_run_are_left_out_not_exported_or_fatal() -> None:
    """A peer's runs are taken as sent. Entries of another ScopeSpans field parse too (as its scope or
    schema url): the check of a kept trace leaves them out and counts them, instead of exporting them to
    override the real scope, and reading such a run span by span skips them instead of failing."""
    owner = Recorder()
    request = make_request(traces=1, spans_per_trace=2)
    spans = request.resource_spans[0].scope_spans[0].spans
    owner.buffer.add_spans(decode_protobuf(request.SerializeToString()))
    trace = owner.buffer.traces[spans[0].trace_id]
    ((scope, run),) = trace.runs()
    strays = b"\x0a\x00" + b"\x1a\x03abc"  # an empty scope, a schema url
    trace.items = [scope, run + strays]
    groups, invalid = trace.span_groups()
    assert invalid == 2
    assert groups == [(scope, run, 2)]
    trace.items = [scope, run + strays + b"\x12\x05abc"]  # and a cut entry: the run does not parse
    trace._parsed = None
    assert [record.span.span_id for record in trace.spans()] == [span.span_id for span in spans]
    assert trace.span_groups() == ([(scope, run, 2)], 3)
