"""conditions: field accessors over real OTLP spans, OTTL's comparison rules, string operators, combinators.

Also home of the span builders the ottl_condition, rules and composite tests share.
"""

from __future__ import annotations

import re

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from policies import conditions
from policies.base import SpanRecord

MS = 1_000_000


def any_value(value: object) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))
    return AnyValue(string_value=str(value))


def key_values(attributes: dict[str, object]) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def span_record(
    name: str = "op",
    *,
    kind: int = Span.SPAN_KIND_INTERNAL,
    status: int = Status.STATUS_CODE_UNSET,
    start_ns: int = 1_000 * MS,
    duration_ms: float = 10,
    parent: bytes = b"\x01" * 8,
    attributes: dict[str, object] | None = None,
    resource: dict[str, object] | None = None,
    scope: str = "lib",
    events: tuple[tuple[str, dict[str, object]], ...] = (),
) -> SpanRecord:
    """A SpanRecord of real OTLP messages; a child span unless `parent` is empty or zeros."""
    span = Span(
        trace_id=b"\x0a" * 16,
        span_id=b"\x02" * 8,
        parent_span_id=parent,
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + int(duration_ms * MS),
        attributes=key_values(attributes or {}),
        status=Status(code=status),  # type: ignore[arg-type]
        events=[Span.Event(name=event, attributes=key_values(attrs)) for event, attrs in events],
    )
    return SpanRecord(
        Resource(attributes=key_values(resource or {})),
        InstrumentationScope(name=scope, attributes=key_values({"scope.key": "s"})),
        span,
    )


def server_error_span(**overrides) -> SpanRecord:
    """A failed, slow HTTP server span with attributes of each type and an exception event."""
    fields: dict = {
        "name": "GET /api/users",
        "kind": Span.SPAN_KIND_SERVER,
        "status": Status.STATUS_CODE_ERROR,
        "duration_ms": 1500,
        "attributes": {"http.status_code": 503, "http.route": "/api/users", "retry": True, "ratio": 0.25},
        "resource": {"service.name": "users", "deployment.environment": "prod"},
        "events": (("exception", {"exception.type": "TimeoutError"}),),
    }
    return span_record(**{**fields, **overrides})


def trace_of(make_trace, *records: SpanRecord, trace_id: bytes = b"\x0a" * 16):
    """A FakeTrace holding `records`, as the buffer's trace view would."""
    return make_trace(trace_id=trace_id, span_count=len(records), records=records)


def test_attribute_values_map_any_value_scalars() -> None:
    record = span_record(attributes={"s": "x", "i": 7, "f": 0.5, "b": True, "a": [1, 2]}, resource={"r": "y"})
    get = conditions.span_attribute
    assert [get(key)(record) for key in ("s", "i", "f", "b")] == ["x", 7, 0.5, True]
    assert type(get("b")(record)) is bool
    assert get("missing")(record) is None
    # Arrays and maps stay OTLP messages: equal only to an equal array or map.
    assert isinstance(get("a")(record), AnyValue)
    assert conditions.resource_attribute("r")(record) == "y"
    assert conditions.resource_attribute("s")(record) is None
    assert conditions.scope_attribute("scope.key")(record) == "s"


def test_an_empty_any_value_is_absent() -> None:
    record = span_record()
    record.span.attributes.add(key="empty")
    assert conditions.span_attribute("empty")(record) is None


@pytest.mark.parametrize(
    ("parent", "root"),
    [(b"", True), (bytes(8), True), (b"\x00" * 7 + b"\x01", False)],
)
def test_root_is_an_empty_or_all_zero_parent(parent, root) -> None:
    record = span_record(parent=parent)
    assert conditions.is_root(record) is root
    assert conditions.root_spans([record, span_record()]) == ([record] if root else [])


@pytest.mark.parametrize(
    ("left", "op", "right", "expected"),
    [
        (5, "==", 5.0, True),  # int and float compare as numbers
        (5, "<", 5.5, True),
        (2.5, ">=", 3, False),
        ("abc", "<", "abd", True),
        ("b", ">", "a", True),
        (False, "<", True, True),
        (True, "==", 1, False),  # a bool is not a number
        (True, "!=", 1, True),
        ("5", "==", 5, False),  # different kinds are only ever "!="
        ("5", "!=", 5, True),
        ("5", "<", 6, False),
        ("5", ">=", 6, False),
        (None, "==", None, True),  # nil equals nil, and then also <= and >=
        (None, "<=", None, True),
        (None, "<", None, False),
        (None, "!=", None, False),
        (None, "==", "x", False),
        (None, "!=", "x", True),
        (None, "<", 1, False),
        (b"\x01", "<", b"\x02", True),
        (2**53 + 1, ">", 2**53, True),  # ints compare exactly
    ],
)
def test_compare_follows_ottl_rules(left, op, right, expected) -> None:
    assert conditions.compare(op, left, right) is expected
    # A literal on the right, compiled once, gives the same answers.
    assert conditions.comparison(lambda context: context, op, right)(left) is expected


def test_arrays_compare_only_for_equality() -> None:
    record = span_record(attributes={"a": [1, 2], "b": [1, 2], "c": [3]})
    get = conditions.span_attribute
    assert conditions.values_comparison(get("a"), "==", get("b"))(record)
    assert conditions.values_comparison(get("a"), "!=", get("c"))(record)
    assert not conditions.values_comparison(get("a"), "<", get("c"))(record)
    assert conditions.comparison(get("a"), "!=", "[1, 2]")(record)


def test_string_operators_read_only_strings() -> None:
    record = span_record(name="GET /api/users", attributes={"code": 503})
    route, code = (lambda record: record.span.name), conditions.span_attribute("code")
    assert conditions.contains(route, "/api/")(record)
    assert conditions.starts_with(route, "GET ")(record)
    assert not conditions.starts_with(route, "POST")(record)
    assert not conditions.contains(code, "50")(record)
    assert conditions.matches(route, re.compile("api/u"))(record)
    assert not conditions.matches(code, re.compile("^5"))(record)
    # With scalars (OTTL's IsMatch) numbers are searched in their string form.
    assert conditions.matches(code, re.compile("^5..$"), scalars=True)(record)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (0.5, "0.5"),
        (1e21, "1000000000000000000000"),
        ("s", None),
    ],
)
def test_scalar_text_is_gos_formatting(value, text) -> None:
    assert conditions.scalar_text(value) == text


def test_bad_pattern_names_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"not a valid regular expression '\(': missing \)"):
        conditions.compile_pattern("(")


def test_exists_and_combinators_short_circuit() -> None:
    record = span_record(attributes={"k": ""})
    calls: list[str] = []

    def spy(label: str, result: bool):
        def check(context) -> bool:
            calls.append(label)
            return result

        return check

    assert conditions.exists(conditions.span_attribute("k"))(record)
    assert conditions.not_exists(conditions.span_attribute("x"))(record)
    assert not conditions.all_of([spy("a", False), spy("b", True)])(record)
    assert conditions.any_of([spy("c", True), spy("d", False)])(record)
    assert conditions.negate(spy("e", False))(record)
    assert calls == ["a", "c", "e"]
