"""Fuzzing the decoders: whatever the body, a DecodeError (a 400) or spans that the buffer, the decider and
the exporters' encodings take without raising (tests/fuzz/harness.py checks what leaves).

Bodies are random bytes and JSON, mutations of real bodies (bit flips, truncation, splices, corrupted
length fields) and structured requests with random ids, lengths and attributes. Derandomized and without
an example database, so that every run tries the same inputs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from py_zipkin.encoding.protobuf import zipkin_pb2

from sampler.errors import DecodeError
from sampler.zipkin import KINDS, Tag
from tests.fuzz.harness import DECODERS, EDIT_KINDS, mutate, run, seeds, zipkin_proto3
from tests.otlp_data import otlp_json


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a fuzz test: `examples` inputs, the same ones every run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def check(decoder: str, body: bytes) -> bool:
    """`body` through the pipeline (harness.run); whether it was read is a statistic of the test."""
    accepted = run(decoder, body)
    event("read" if accepted else "refused: DecodeError")
    return accepted


def mutated(decoder: str) -> st.SearchStrategy[bytes]:
    """A real body for `decoder` with one to four byte-level edits."""
    edit = st.tuples(st.sampled_from(EDIT_KINDS), st.integers(0, 1 << 20), st.integers(0, 1 << 20))
    bodies = seeds(decoder)
    return st.builds(mutate, st.sampled_from(bodies), st.lists(edit, min_size=1, max_size=4), st.just(bodies))


# --- OTLP, structured -------------------------------------------------------------------------------------

# A few ids shared across spans, so that traces get several spans and reach the buffer's limits.
TRACE_IDS = [bytes([n]) * 16 for n in (1, 2, 3)]
SPAN_IDS = [bytes([n]) * 8 for n in range(1, 7)]
# Keys the policies and the adjusted-count writer look for, among random ones.
KEYS = st.sampled_from(["http.route", "service.name", "tailgate.sample_rate", "ot", ""]) | st.text(
    max_size=12
)


def ids(pool: list[bytes], size: int) -> st.SearchStrategy[bytes]:
    """Mostly valid ids from `pool`; also all zeros and random bytes of any length around `size`."""
    return st.sampled_from(pool) | st.just(bytes(size)) | st.binary(max_size=size + 4)


def _array(values: list[AnyValue]) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=values))


def _kvlist(entries: list[tuple[str, AnyValue]]) -> AnyValue:
    return AnyValue(
        kvlist_value=KeyValueList(values=[KeyValue(key=key, value=value) for key, value in entries])
    )


ANY_VALUES: st.SearchStrategy[AnyValue] = st.recursive(
    st.one_of(
        st.builds(AnyValue, string_value=st.text(max_size=20)),
        st.builds(AnyValue, int_value=st.integers(-(1 << 63), (1 << 63) - 1)),
        st.builds(AnyValue, double_value=st.floats()),
        st.builds(AnyValue, bool_value=st.booleans()),
        st.builds(AnyValue, bytes_value=st.binary(max_size=20)),
        st.just(AnyValue()),
    ),
    lambda children: (
        st.lists(children, max_size=3).map(_array)
        | st.lists(st.tuples(KEYS, children), max_size=3).map(_kvlist)
    ),
    max_leaves=6,
)
ATTRIBUTES = st.lists(st.builds(KeyValue, key=KEYS, value=ANY_VALUES), max_size=3)
TRACE_STATES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["ot=th:8", "ot=th:0;rv:abcdef01234567", "ot=th:zz", "a=b, ot=th:c,,", "ot=", "ot=;;:"]),
    st.text("0123456789abcdefg", max_size=16).map(lambda digits: f"ot=th:{digits}"),
)
UINT32 = st.integers(0, (1 << 32) - 1)
INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
TIMES = st.sampled_from([0, 1, 1_700_000_000_000_000_000, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1)


@st.composite
def otlp_spans(draw: st.DrawFn) -> Span:
    span = Span(
        trace_id=draw(ids(TRACE_IDS, 16)),
        span_id=draw(ids(SPAN_IDS, 8)),
        parent_span_id=draw(st.just(b"") | ids(SPAN_IDS, 8)),
        trace_state=draw(TRACE_STATES),
        name=draw(st.text(max_size=20)),
        kind=draw(INT32),
        start_time_unix_nano=draw(TIMES),
        end_time_unix_nano=draw(TIMES),
        attributes=draw(ATTRIBUTES),
        dropped_attributes_count=draw(UINT32),
        flags=draw(UINT32),
        status=Status(code=draw(INT32), message=draw(st.text(max_size=10))),
    )
    for _ in range(draw(st.integers(0, 2))):
        span.events.add(
            time_unix_nano=draw(TIMES), name=draw(st.text(max_size=10)), attributes=draw(ATTRIBUTES)
        )
    for _ in range(draw(st.integers(0, 2))):
        span.links.add(
            trace_id=draw(ids(TRACE_IDS, 16)),
            span_id=draw(ids(SPAN_IDS, 8)),
            trace_state=draw(TRACE_STATES),
            attributes=draw(ATTRIBUTES),
            flags=draw(UINT32),
        )
    return span


@st.composite
def otlp_requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest of one or two resources, each of one or two scopes."""
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        resource_spans: ResourceSpans = request.resource_spans.add(schema_url=draw(st.text(max_size=10)))
        if draw(st.booleans()):
            resource_spans.resource.CopyFrom(
                Resource(attributes=draw(ATTRIBUTES), dropped_attributes_count=draw(UINT32))
            )
        for _ in range(draw(st.integers(1, 2))):
            scope_spans: ScopeSpans = resource_spans.scope_spans.add(schema_url=draw(st.text(max_size=10)))
            if draw(st.booleans()):
                scope_spans.scope.CopyFrom(
                    InstrumentationScope(
                        name=draw(st.text(max_size=10)),
                        version=draw(st.text(max_size=10)),
                        attributes=draw(ATTRIBUTES),
                    )
                )
            scope_spans.spans.extend(draw(st.lists(otlp_spans(), max_size=5)))
    return request


@fuzz(100)
@given(otlp_requests())
def test_protobuf_structured_requests_are_read(request: ExportTraceServiceRequest) -> None:
    # A serialized ExportTraceServiceRequest is never refused as a whole: bad spans are rejected one by one.
    assert check("protobuf", request.SerializeToString())


# --- OTLP JSON ------------------------------------------------------------------------------------------

JSON_KEYS = st.sampled_from(
    [
        "resourceSpans",
        "resource_spans",
        "scopeSpans",
        "scope_spans",
        "spans",
        "resource",
        "scope",
        "attributes",
        "key",
        "value",
        "stringValue",
        "intValue",
        "doubleValue",
        "boolValue",
        "bytesValue",
        "arrayValue",
        "kvlistValue",
        "values",
        "traceId",
        "spanId",
        "parentSpanId",
        "links",
        "events",
        "status",
        "code",
        "message",
        "name",
        "kind",
        "traceState",
        "startTimeUnixNano",
        "endTimeUnixNano",
        "timeUnixNano",
        "droppedAttributesCount",
        "flags",
        "schemaUrl",
    ]
)
# Any text, lone surrogates often (written as \ud800 escapes, or as invalid UTF-8 bytes).
TEXT = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff", "\U0001f600"]), max_size=20).map(
    "".join
)
HEX = st.text("0123456789abcdefABCDEFxg", max_size=34)
HUGE = st.sampled_from([1 << 64, -(1 << 63) - 1, 10**30, -1, 1e308, -0.0, float("nan"), float("inf")])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats() | TEXT | HEX
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_KEYS | TEXT, children, max_size=5),
    max_leaves=12,
)
# Per span field, values of the right JSON type (often out of range) or anything.
SPAN_FIELDS = {
    "traceId": st.sampled_from([trace_id.hex() for trace_id in TRACE_IDS]) | HEX,
    "spanId": st.sampled_from([span_id.hex() for span_id in SPAN_IDS]) | HEX,
    "parentSpanId": HEX,
    "name": TEXT,
    "kind": st.integers(),
    "startTimeUnixNano": st.integers().map(str) | st.integers(),
    "endTimeUnixNano": st.integers().map(str) | HUGE,
    "traceState": TEXT,
    "flags": st.integers(),
    "status": st.fixed_dictionaries({}, optional={"code": st.integers(), "message": TEXT}),
    "attributes": st.lists(st.fixed_dictionaries({"key": TEXT, "value": JSON_VALUES}), max_size=3),
    "events": st.lists(st.fixed_dictionaries({"name": TEXT, "timeUnixNano": st.integers()}), max_size=2),
    "links": st.lists(st.fixed_dictionaries({"traceId": HEX, "spanId": HEX}), max_size=2),
}
SPAN_JSON = st.fixed_dictionaries(
    {}, optional={key: values | JSON_VALUES for key, values in SPAN_FIELDS.items()}
)
# The OTLP JSON skeleton with random values where the spans, resources and scopes are.
OTLP_JSON_DOCUMENTS = st.fixed_dictionaries(
    {
        "resourceSpans": st.lists(
            st.fixed_dictionaries(
                {
                    "scopeSpans": st.lists(
                        st.fixed_dictionaries(
                            {"spans": st.lists(SPAN_JSON, max_size=4)}, optional={"scope": JSON_VALUES}
                        ),
                        max_size=2,
                    )
                },
                optional={"resource": JSON_VALUES},
            ),
            max_size=2,
        )
    }
)


def json_bytes(document: Any, ascii_only: bool) -> bytes:
    """A document as a JSON body; lone surrogates become \\ud800 escapes, or invalid UTF-8 bytes."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def replaced(document: Any, path: list[int], value: Any) -> Any:
    """`document` with the node reached by following `path` (indexes into lists and dict items, modulo their
    sizes) replaced by `value`."""
    if not path or not isinstance(document, list | dict) or not document:
        return value
    choice, rest = path[0], path[1:]
    if isinstance(document, list):
        index = choice % len(document)
        return [*document[:index], replaced(document[index], rest, value), *document[index + 1 :]]
    key = list(document)[choice % len(document)]
    return {**document, key: replaced(document[key], rest, value)}


@fuzz(200)
@given(JSON_VALUES, st.booleans())
def test_json_random_documents(document: Any, ascii_only: bool) -> None:
    check("json", json_bytes(document, ascii_only))


@fuzz(150)
@given(OTLP_JSON_DOCUMENTS, st.booleans())
def test_json_random_values_in_the_otlp_shape(document: Any, ascii_only: bool) -> None:
    check("json", json_bytes(document, ascii_only))


@fuzz(60)
@given(otlp_requests())
def test_json_structured_requests_are_read(request: ExportTraceServiceRequest) -> None:
    assert check("json", otlp_json(request))


# --- Zipkin ---------------------------------------------------------------------------------------------

# 128-bit and 64-bit trace ids.
ZIPKIN_TRACE_HEX = st.sampled_from([trace_id.hex() for trace_id in TRACE_IDS] + ["04" * 8, "05" * 8])
ZIPKIN_SPAN_HEX = st.sampled_from([span_id.hex() for span_id in SPAN_IDS]) | HEX
# Decimal counts: any, and as long as int() reads (4300 digits) or longer.
COUNTS = st.integers(min_value=0).map(str) | st.sampled_from([10, 11, 4300, 4301, 10_000]).map(
    lambda n: "7" * n
)
JSON_OBJECT_TEXT = st.dictionaries(JSON_KEYS | TEXT, JSON_VALUES, max_size=3).map(json.dumps)
LINKS = st.builds(
    lambda *parts: "|".join(parts), HEX | ZIPKIN_TRACE_HEX, ZIPKIN_SPAN_HEX, TEXT, JSON_OBJECT_TEXT, COUNTS
)
TAG_KEYS = st.sampled_from(
    [
        Tag.ERROR,
        Tag.STATUS_CODE,
        Tag.STATUS_DESCRIPTION,
        Tag.SCOPE_NAME,
        Tag.SCOPE_VERSION,
        Tag.LIBRARY_NAME,
        Tag.LIBRARY_VERSION,
        Tag.TRACE_STATE,
        Tag.SPAN_KIND,
        f"{Tag.LINK_PREFIX}0",
        f"{Tag.LINK_PREFIX}1",
        "service.name",
        "service.version",
        "host.name",
        "faas.name",
        "net.host.ip",
        "peer.service",
        "http.route",
    ]
) | st.text(max_size=10)
TAG_VALUES = st.sampled_from(["", "true", "ERROR", "STATUS_CODE_OK", "internal", "ot=th:8"]) | TEXT | LINKS
# Annotation values: plain text, the specification's {"name": {attributes}}, the Collector's name|{...}|count.
ANNOTATION_VALUES = (
    TEXT
    | st.builds(lambda name, attributes: json.dumps({name: attributes}), TEXT, JSON_VALUES)
    | st.builds(lambda *parts: "|".join(parts), TEXT, JSON_OBJECT_TEXT, COUNTS)
)
# Zipkin times, in microseconds, that fit OTLP's nanoseconds.
MICROS = (
    st.integers(0, ((1 << 64) - 1) // 1000)
    | st.floats(0, 1.8e16)
    | st.sampled_from([0, 1_700_000_000_000_000])
)
ENDPOINTS = st.fixed_dictionaries(
    {},
    optional={
        "serviceName": TEXT,
        "ipv4": st.ip_addresses(v=4).map(str),
        "ipv6": st.ip_addresses(v=6).map(str),
        "port": st.integers(0, 65535),
    },
)
# Spans Zipkin would take (ids, times, endpoints of the right form): what varies is what the mapping to
# OTLP reads, names, tags and annotations. Malformed spans come from the mutations.
ZIPKIN_SPANS = st.fixed_dictionaries(
    {"traceId": ZIPKIN_TRACE_HEX, "id": st.sampled_from([span_id.hex() for span_id in SPAN_IDS])},
    optional={
        "parentId": st.sampled_from([span_id.hex() for span_id in SPAN_IDS] + ["0000000000000000"]),
        "kind": st.sampled_from(KINDS),
        "name": TEXT,
        "timestamp": MICROS,
        "duration": MICROS,
        "localEndpoint": ENDPOINTS,
        "remoteEndpoint": ENDPOINTS,
        "annotations": st.lists(
            st.fixed_dictionaries({"timestamp": MICROS, "value": ANNOTATION_VALUES}), max_size=3
        ),
        "tags": st.dictionaries(TAG_KEYS, TAG_VALUES, max_size=6),
        "debug": st.booleans(),
        "shared": st.booleans(),
    },
)


@fuzz(150)
@given(st.lists(ZIPKIN_SPANS, max_size=6), st.booleans())
def test_zipkin_json_structured_spans(spans: list[dict[str, Any]], ascii_only: bool) -> None:
    check("zipkin_json", json_bytes(spans, ascii_only))


@st.composite
def zipkin_proto3_bodies(draw: st.DrawFn) -> bytes:
    """A ListOfSpans of spans Zipkin would take, with random names, tags and annotations."""
    message = zipkin_pb2.ListOfSpans()
    for _ in range(draw(st.integers(0, 5))):
        span = message.spans.add(
            trace_id=draw(st.sampled_from([*TRACE_IDS, bytes(7) + b"\x04"])),
            id=draw(st.sampled_from(SPAN_IDS)),
            parent_id=draw(st.sampled_from([b"", bytes(8), *SPAN_IDS])),
            kind=draw(st.integers(0, 4)),
            name=draw(st.text(max_size=10)),
            timestamp=draw(MICROS.map(int)),
            duration=draw(MICROS.map(int)),
            debug=draw(st.booleans()),
        )
        for endpoint in (span.local_endpoint, span.remote_endpoint):
            if draw(st.booleans()):
                endpoint.service_name = draw(st.text(max_size=10))
                endpoint.ipv4 = draw(st.just(b"") | st.ip_addresses(v=4).map(lambda address: address.packed))
                endpoint.ipv6 = draw(st.just(b"") | st.ip_addresses(v=6).map(lambda address: address.packed))
                endpoint.port = draw(st.integers(0, 65535))
        for _ in range(draw(st.integers(0, 2))):
            span.annotations.add(
                timestamp=draw(MICROS.map(int)), value=draw(ANNOTATION_VALUES.filter(_encodable))
            )
        span.tags.update(draw(st.dictionaries(TAG_KEYS, TAG_VALUES.filter(_encodable), max_size=5)))
    return message.SerializeToString()


def _encodable(text: str) -> bool:
    """Whether a string can be a proto3 string field (no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@fuzz(120)
@given(zipkin_proto3_bodies())
def test_zipkin_proto3_structured_spans(body: bytes) -> None:
    check("zipkin_proto3", body)


# --- every decoder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
@fuzz(150)
@given(data=st.data())
def test_random_bytes(decoder: str, data: st.DataObject) -> None:
    check(decoder, data.draw(st.binary(max_size=2048)))


@pytest.mark.parametrize("decoder", DECODERS)
@fuzz(400)
@given(data=st.data())
def test_mutated_real_bodies(decoder: str, data: st.DataObject) -> None:
    check(decoder, data.draw(mutated(decoder)))


@pytest.mark.parametrize("decoder", ["json", "zipkin_json"])
@fuzz(200)
@given(data=st.data(), path=st.lists(st.integers(0, 1 << 16), max_size=12), value=JSON_VALUES)
def test_real_json_with_a_node_replaced(
    decoder: str, data: st.DataObject, path: list[int], value: Any
) -> None:
    body = data.draw(st.sampled_from(seeds(decoder)))
    check(decoder, json_bytes(replaced(json.loads(body), path, value), ascii_only=True))


# Generated bodies per decoder, for the receivers' fuzz tests (test_fuzz_http.py).
STRUCTURED: dict[str, st.SearchStrategy[bytes]] = {
    "protobuf": otlp_requests().map(ExportTraceServiceRequest.SerializeToString),
    "json": st.builds(json_bytes, OTLP_JSON_DOCUMENTS, st.booleans()),
    "zipkin_json": st.builds(json_bytes, st.lists(ZIPKIN_SPANS, max_size=6), st.booleans()),
    "zipkin_proto3": zipkin_proto3_bodies(),
}


# --- hostile bodies, each decoder ------------------------------------------------------------------------

DEEP = 100_000
HOSTILE_JSON = [
    b"[" * DEEP + b"]" * DEEP,
    b'{"resourceSpans": ' + b"[" * DEEP,
    b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    b"\xff\xfe\x00garbage",
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes
    b'{"resourceSpans": [], "x": "\xc3"}',
    b"1" * 5000,
    b"-" + b"9" * 5000 + b".5e99999",
    b"NaN",
    b"\x00" * 64,
    b"",
]


@pytest.mark.parametrize("decoder", ["json", "zipkin_json"])
@pytest.mark.parametrize("body", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_hostile_json_bodies_are_refused(decoder: str, body: bytes) -> None:
    assert not run(decoder, body)


def nested_kvlist(depth: int) -> bytes:
    """A span whose attribute value is a kvlist nested `depth` deep, as an OTLP JSON body."""
    value = b'{"kvlistValue": {"values": [{"key": "k", "value": ' * depth + b'{"stringValue": "leaf"}'
    span = b'{"traceId": "%s", "spanId": "%s", "attributes": [{"key": "k", "value": %s}]}' % (
        b"01" * 16,
        b"02" * 8,
        value + b"}]}}" * depth,
    )
    return b'{"resourceSpans": [{"scopeSpans": [{"spans": [%s]}]}]}' % span


@pytest.mark.parametrize("depth", [50, 99, 100, 101, 200, 1000, 5000])
def test_deeply_nested_attribute_values(depth: int) -> None:
    """Deeper than protobuf's nesting limit (100), a span cannot be forwarded: left out, not a crash."""
    run("json", nested_kvlist(depth))


@pytest.mark.parametrize(
    "field",
    [
        {"startTimeUnixNano": str(1 << 64)},
        {"startTimeUnixNano": -1},
        {"endTimeUnixNano": 1e400},
        {"startTimeUnixNano": "1" * 5000},
        {"kind": 1 << 31},
        {"droppedAttributesCount": 1 << 32},
        {"flags": -1},
        {"attributes": [{"key": "k", "value": {"intValue": str(1 << 63)}}]},
        {"events": [{"timeUnixNano": 1e30}]},
    ],
    ids=repr,
)
def test_out_of_range_otlp_json_numbers_are_refused(field: dict[str, Any]) -> None:
    assert not run("json", otlp_body(**field))


# --- found by fuzzing ------------------------------------------------------------------------------------


def decoded_spans(decoder: str, body: bytes) -> list[Span]:
    """The spans a body decodes into, parsed in full."""
    return [Span.FromString(payload) for batch in DECODERS[decoder](body) for payload in batch.payloads]


def otlp_body(**fields: Any) -> bytes:
    """An OTLP JSON request of one span with these fields besides its ids."""
    span = {"traceId": "01" * 16, "spanId": "02" * 8, **fields}
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


def zipkin_body(**fields: Any) -> bytes:
    """A Zipkin JSON body of one span with these fields besides its ids."""
    return json.dumps([{"traceId": "01" * 16, "id": "02" * 8, **fields}]).encode()


LONG_COUNT = "7" * 5000  # int() reads at most 4300 digits


@pytest.mark.parametrize(
    ("count", "read"),
    [(LONG_COUNT, (1 << 32) - 1), ("0" * 5000 + "5", 5), ("00", 0)],
    ids=["long", "zeros", "0"],
)
def test_dropped_count_of_any_length_is_read_capped(count: str, read: int) -> None:
    """A Collector-style annotation or link with a dropped-attributes count over 4300 digits was a 500."""
    body = zipkin_body(
        annotations=[{"timestamp": 1, "value": f"retry|{{}}|{count}"}],
        tags={f"{Tag.LINK_PREFIX}0": f"{'03' * 16}|{'04' * 8}||{{}}|{count}"},
    )
    (span,) = decoded_spans("zipkin_json", body)
    assert [(event.name, event.dropped_attributes_count) for event in span.events] == [("retry", read)]
    assert [link.dropped_attributes_count for link in span.links] == [read]


LONE_SURROGATES = {
    "otlp-name": ("json", otlp_body(name="\ud800")),
    # upb's field lookup failed on this key with a SystemError.
    "otlp-key": ("json", b'{"\\udfff": null}'),
    "zipkin-name": ("zipkin_json", zipkin_body(name="\ud800")),
    "zipkin-tag-key": ("zipkin_json", zipkin_body(tags={"a\udbff": "x"})),
}


@pytest.mark.parametrize(("decoder", "body"), LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_lone_surrogate_escape_is_malformed_json(decoder: str, body: bytes) -> None:
    """A \\ud800 escape that is not half of a pair is no Unicode text: it was a 500 (UnicodeEncodeError,
    SystemError), now a 400."""
    with pytest.raises(DecodeError, match="lone UTF-16 surrogate"):
        DECODERS[decoder](body)


@pytest.mark.parametrize("decoder", ["json", "zipkin_json"])
@pytest.mark.parametrize(
    "body",
    [b'"\xed\xa0\x80"', '"text"'.encode("utf-16"), '"text"'.encode("utf-32")],
    ids=["encoded-surrogate", "utf-16", "utf-32"],
)
def test_json_body_that_is_not_utf8_is_malformed(decoder: str, body: bytes) -> None:
    """json.loads also reads UTF-16 and UTF-32, and surrogates encoded as UTF-8; RFC 8259 JSON is UTF-8."""
    with pytest.raises(DecodeError, match="not UTF-8"):
        DECODERS[decoder](body)


@pytest.mark.parametrize(
    ("escaped", "name"),
    [(r"\ud83d\ude00", "\U0001f600"), (r"\\ud800", r"\ud800"), (r"\u00e9", "é")],
    ids=["pair", "escaped-backslash", "bmp"],
)
def test_escapes_that_are_text_are_read(escaped: str, name: str) -> None:
    body = b'[{"traceId": "%s", "id": "%s", "name": "%s"}]' % (b"01" * 16, b"02" * 8, escaped.encode())
    (span,) = decoded_spans("zipkin_json", b"\xef\xbb\xbf" + body)  # a byte order mark is allowed
    assert span.name == name


@pytest.mark.parametrize("value", ['{"\\ud800": {}}', 'retry|{"k": "\\udfff"}|0'], ids=["spec", "collector"])
def test_annotation_attributes_with_a_lone_surrogate_stay_text(value: str) -> None:
    """Annotation values that carry event attributes as JSON: with a lone surrogate escape inside they are
    not read as attributes (that was a 500) but kept as the event's name, as other malformed ones are."""
    for decoder, body in (
        ("zipkin_json", zipkin_body(annotations=[{"timestamp": 1, "value": value}])),
        (
            "zipkin_proto3",
            zipkin_proto3(
                [{"traceId": "01" * 16, "id": "02" * 8, "annotations": [{"timestamp": 1, "value": value}]}]
            ),
        ),
    ):
        (span,) = decoded_spans(decoder, body)
        assert [(event.name, len(event.attributes)) for event in span.events] == [(value, 0)]
