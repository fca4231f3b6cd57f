"""trace_flags: any span with the W3C sampled flag (bit 0 of OTLP Span.flags) set."""

from __future__ import annotations

import pytest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags

from policies.base import Decision, SpanRecord
from tests.policies.conftest import config_error

REMOTE_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def trace_with_flags(make_trace, *flags: int):
    resource, scope = Resource(), InstrumentationScope()
    spans = [Span(trace_id=bytes(16), span_id=bytes([n + 1]) * 8, flags=f) for n, f in enumerate(flags)]
    return make_trace(span_count=len(spans), records=[SpanRecord(resource, scope, span) for span in spans])


def flags_policy(build):
    return build({"name": "tf", "type": "trace_flags"})


def test_match_when_any_span_is_sampled(build, make_trace) -> None:
    policy = flags_policy(build)
    assert policy.evaluate(trace_with_flags(make_trace, 0, 0x01, 0), 0) is Decision.SAMPLED
    # The W3C flags are the low 8 bits; the OTLP bits above them do not hide the sampled bit.
    assert policy.evaluate(trace_with_flags(make_trace, REMOTE_PARENT | 0x01), 0) is Decision.SAMPLED
    assert policy.attribute_keys == frozenset()


def test_non_match(build, make_trace) -> None:
    policy = flags_policy(build)
    assert policy.evaluate(trace_with_flags(make_trace, 0, 0), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(trace_with_flags(make_trace, 0x02, REMOTE_PARENT), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(trace_with_flags(make_trace), 0) is Decision.NOT_SAMPLED


def test_an_empty_block_is_accepted(build, make_trace) -> None:
    policy = build({"name": "tf", "type": "trace_flags", "trace_flags": {}})
    assert policy.evaluate(trace_with_flags(make_trace, 1), 0) is Decision.SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"sampled": True}, "tail_sampling.policies[0].trace_flags.sampled: Extra inputs are not permitted"),
        ("sampled", "tail_sampling.policies[0].trace_flags: must be a mapping"),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "tf", "type": "trace_flags", "trace_flags": block}
    assert config_error(spec) == message
