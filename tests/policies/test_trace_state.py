"""trace_state: any span's W3C tracestate has list-member `key` with one of `values`."""

from __future__ import annotations

import pytest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from policies.base import Decision, SpanRecord
from policies.trace_state import parse_tracestate
from tests.policies.conftest import config_error


def records(*trace_states: str) -> list[SpanRecord]:
    """One span per tracestate, under one resource and scope."""
    resource, scope = Resource(), InstrumentationScope(name="lib")
    return [
        SpanRecord(resource, scope, Span(trace_id=bytes(16), span_id=bytes([i + 1]) * 8, trace_state=state))
        for i, state in enumerate(trace_states)
    ]


def trace_state_policy(build, key="vendor", values=("gold", "silver")):
    return build({"name": "ts", "type": "trace_state", "trace_state": {"key": key, "values": list(values)}})


def test_match_on_any_span(build, make_trace) -> None:
    policy = trace_state_policy(build)
    trace = make_trace(span_count=3, records=records("", "other=1", "rojo=00f067aa0ba902b7,vendor=silver"))
    assert policy.evaluate(trace, 0) is Decision.SAMPLED
    assert policy.attribute_keys == frozenset()


def test_non_match(build, make_trace) -> None:
    policy = trace_state_policy(build)
    for states in [(), ("",), ("vendor=bronze",), ("other=gold",), ("vendor=gold2",), ("xvendor=gold",)]:
        assert policy.evaluate(make_trace(records=records(*states)), 0) is Decision.NOT_SAMPLED, states


def test_multi_tenant_keys_and_optional_white_space(build, make_trace) -> None:
    policy = trace_state_policy(build, key="tenant1@vendor", values=["on"])
    # Spaces and tabs around list-members and empty list-members are allowed by W3C.
    trace = make_trace(records=records("a=1 ,\t, tenant1@vendor=on\t"))
    assert policy.evaluate(trace, 0) is Decision.SAMPLED


def test_a_span_with_an_invalid_tracestate_is_passed_over(build, make_trace) -> None:
    policy = trace_state_policy(build)
    invalid = [
        "vendor=gold,vendor=gold",  # duplicate key
        "vendor=gold,Upper=1",  # keys are lower case
        "vendor=gold,novalue",
        "vendor=gold,x=a=b",
        "vendor =gold",
        ",".join([f"k{i}=v" for i in range(32)] + ["vendor=gold"]),  # 33 members
    ]
    for state in invalid:
        assert policy.evaluate(make_trace(records=records(state)), 0) is Decision.NOT_SAMPLED, state
    assert policy.evaluate(make_trace(records=records(*invalid, "vendor=gold")), 0) is Decision.SAMPLED


def test_parse_tracestate() -> None:
    assert parse_tracestate("") == {}
    assert parse_tracestate("a=1,b@c=x y") == {"a": "1", "b@c": "x y"}
    assert parse_tracestate(",".join(f"k{i}=v" for i in range(32))) is not None
    assert parse_tracestate("a= 1") == {"a": " 1"}  # a value may start with a space, not end with one
    assert parse_tracestate("a=") is None
    assert parse_tracestate("a=" + "x" * 257) is None
    assert parse_tracestate("1a=x") is None


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"key": "Vendor", "values": ["gold"]},
            "tail_sampling.policies[0].trace_state.key: not a valid W3C tracestate key",
        ),
        (
            {"key": "vendor", "values": ["gold", ""]},
            "tail_sampling.policies[0].trace_state.values[1]: not a valid W3C tracestate value",
        ),
        (
            {"key": "vendor", "values": ["a,b"]},
            "tail_sampling.policies[0].trace_state.values[0]: not a valid W3C tracestate value",
        ),
        (
            {"key": "vendor", "values": ["x" * 250]},
            "tail_sampling.policies[0].trace_state.values[0]: "
            "key and value together must be shorter than 256 characters",
        ),
        (
            {"key": "vendor", "values": []},
            "tail_sampling.policies[0].trace_state.values: "
            "List should have at least 1 item after validation, not 0",
        ),
        ({"values": ["gold"]}, "tail_sampling.policies[0].trace_state.key: Field required"),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "ts", "type": "trace_state", "trace_state": block}
    assert config_error(spec) == message
