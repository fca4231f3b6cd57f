"""`tail_sampling.attribute_limits`: kept spans (and late spans of kept traces) cut to the OTel SDK's
attribute count and value length limits; spans within them forwarded byte for byte."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import parse_config
from sampler.errors import ConfigError
from tests import test_adjusted_counts
from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import send
from tests.test_adjusted_counts import RATE, RawDownstream, rates

MAX_ATTRIBUTES = 8
MAX_LENGTH = 16
TRUNCATED = "tailgate_truncated_attributes_total"
# Long values: ASCII, 2-, 3- and 4-byte UTF-8 characters, bytes, and strings inside an array.
LONG_VALUES = [
    AnyValue(string_value="x" * 40),
    AnyValue(string_value="é" * 40),
    AnyValue(string_value="日本語" * 13),
    AnyValue(string_value="a🙂" * 20),
    AnyValue(bytes_value=bytes(range(40))),
    AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="ü" * 30), AnyValue(int_value=7)])),
    AnyValue(string_value="short"),
    AnyValue(int_value=123456789),
]


def attributes(count: int) -> list[KeyValue]:
    """`count` attributes k0, k1, ... cycling through LONG_VALUES."""
    return [KeyValue(key=f"k{n}", value=LONG_VALUES[n % len(LONG_VALUES)]) for n in range(count)]


def long_span(rng: random.Random, trace_id: bytes, name: str) -> Span:
    """A span over both limits: 50 attributes (3 dropped already), an event of 20, a link of 12."""
    span = Span(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=b"\x01" * 8, name=name)
    span.attributes.extend(attributes(50))
    span.dropped_attributes_count = 3
    span.events.add(name="event", attributes=attributes(20), dropped_attributes_count=1)
    span.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), attributes=attributes(12))
    return span


def small_span(rng: random.Random, trace_id: bytes, name: str) -> Span:
    """A span within both limits, whose serialized form is longer than the length limit."""
    span = Span(trace_id=trace_id, span_id=rng.randbytes(8), name=name)
    span.attributes.extend([KeyValue(key="k0", value=AnyValue(string_value="y" * MAX_LENGTH))])
    span.events.add(name="event", attributes=attributes(MAX_ATTRIBUTES)[6:])
    return span


def cut(value: AnyValue) -> AnyValue:
    """A value cut to MAX_LENGTH, computed independently of the gateway."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return AnyValue(string_value=value.string_value[:MAX_LENGTH])
    if kind == "bytes_value":
        return AnyValue(bytes_value=value.bytes_value[:MAX_LENGTH])
    if kind == "array_value":
        return AnyValue(array_value=ArrayValue(values=[cut(item) for item in value.array_value.values]))
    return value


def over_length(kvs: list[KeyValue]) -> int:
    """How many values (strings in arrays included) are over MAX_LENGTH."""
    values = [kv.value for kv in kvs]
    values += [item for value in values for item in value.array_value.values]
    return sum(len(v.string_value) > MAX_LENGTH or len(v.bytes_value) > MAX_LENGTH for v in values)


def assert_cut(received: Span, sent: Span) -> None:
    """`received` is `sent` with its first MAX_ATTRIBUTES attributes, values cut, dropped counts raised."""
    expected = [KeyValue(key=kv.key, value=cut(kv.value)) for kv in sent.attributes[:MAX_ATTRIBUTES]]
    assert [kv for kv in received.attributes if kv.key != RATE] == expected
    assert received.dropped_attributes_count == sent.dropped_attributes_count + 50 - MAX_ATTRIBUTES
    (event,) = received.events
    assert list(event.attributes) == expected
    assert event.dropped_attributes_count == 1 + 20 - MAX_ATTRIBUTES
    (link,) = received.links
    assert list(link.attributes) == expected
    assert link.dropped_attributes_count == 12 - MAX_ATTRIBUTES
    assert (received.name, received.span_id, received.links[0].trace_id) == (
        sent.name,
        sent.span_id,
        sent.links[0].trace_id,
    )


def limited(downstream: Downstream, **sampling: Any) -> dict[str, Any]:
    limits = {"max_attributes_per_span": MAX_ATTRIBUTES, "max_attribute_value_length": MAX_LENGTH}
    return gateway_config(downstream, attribute_limits=limits, **sampling)


# The downstream that keeps each request's bytes as they arrived.
raw_downstream = test_adjusted_counts.raw_downstream


def truncated(gateway: Any) -> tuple[float, float]:
    return metric(gateway, TRUNCATED, kind="dropped"), metric(gateway, TRUNCATED, kind="shortened")


def mixed_request(rng: random.Random) -> tuple[ExportTraceServiceRequest, list[Span], list[Span]]:
    """One trace whose scope run alternates spans within and over the limits: the request, the spans
    over, the spans within."""
    trace_id = rng.randbytes(16)
    over = [long_span(rng, trace_id, f"long{n}") for n in range(2)]
    within = [small_span(rng, trace_id, f"small{n}") for n in range(3)]
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    scope_spans.spans.extend([within[0], over[0], within[1], over[1], within[2]])
    return request, over, within


async def test_spans_over_the_limits_are_cut_and_the_others_leave_byte_for_byte(
    start_gateway: GatewayFactory, raw_downstream: RawDownstream
) -> None:
    gateway = await start_gateway(limited(raw_downstream))
    request, over, within = mixed_request(random.Random(1))
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(raw_downstream.spans()) == 5)

    received = {span.name: span for _, _, span in raw_downstream.spans()}
    for sent in over:
        assert_cut(received[sent.name], sent)
    # The cut values are whole characters: 16 of them take more bytes when they are not ASCII.
    values = [kv.value.string_value for kv in received["long0"].attributes]
    assert [len(value) for value in values[:4]] == [MAX_LENGTH] * 4
    assert [len(value.encode()) for value in values[:4]] == [16, 32, 48, 40]
    assert set(raw_downstream.span_payloads()) >= {span.SerializeToString() for span in within}

    per_span = (50 - MAX_ATTRIBUTES) + (20 - MAX_ATTRIBUTES) + (12 - MAX_ATTRIBUTES)
    per_span_shortened = 3 * over_length(attributes(50)[:MAX_ATTRIBUTES])
    dropped, cut_values = truncated(gateway)
    print(f"\nover the limits: 2 spans, dropped {dropped:.0f}, shortened {cut_values:.0f}")
    assert (dropped, cut_values) == (2 * per_span, 2 * per_span_shortened) == (2 * 58, 2 * 18)


async def test_late_spans_of_kept_traces_are_cut(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(limited(downstream))
    rng = random.Random(2)
    trace_id = rng.randbytes(16)
    first = ExportTraceServiceRequest()
    first.resource_spans.add().scope_spans.add().spans.append(small_span(rng, trace_id, "root"))
    await send(receiver_url(gateway), first)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 1)

    late_span = long_span(rng, trace_id, "late")
    late = ExportTraceServiceRequest()
    late.resource_spans.add().scope_spans.add().spans.append(late_span)
    await send(receiver_url(gateway), late)
    await wait_for(lambda: len(downstream.spans()) == 2)

    assert metric(gateway, "tailgate_late_spans_total", decision="kept") == 1
    (received,) = [span for _, _, span in downstream.spans() if span.name == "late"]
    assert_cut(received, late_span)
    print(f"\nlate span: dropped {truncated(gateway)[0]:.0f}, shortened {truncated(gateway)[1]:.0f}")
    assert truncated(gateway) == (58, 18)


async def test_the_sample_rate_is_written_after_the_limits(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(limited(downstream, adjusted_counts=True))
    request, over, within = mixed_request(random.Random(3))
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(downstream.spans()) == 5)

    received = {span.name: span for _, _, span in downstream.spans()}
    for sent in over:
        span = received[sent.name]
        assert_cut(span, sent)
        # The gateway's own attribute comes on top of the limit.
        assert len(span.attributes) == MAX_ATTRIBUTES + 1 and span.attributes[-1].key == RATE
        assert rates(span) == [1.0] and span.trace_state == "ot=th:0"
    for sent in within:
        assert list(received[sent.name].attributes)[:-1] == list(sent.attributes)
        assert rates(received[sent.name]) == [1.0]
    assert truncated(gateway) == (2 * 58, 2 * 18)


async def test_no_limits_change_nothing(start_gateway: GatewayFactory, raw_downstream: RawDownstream) -> None:
    config = gateway_config(
        raw_downstream, attribute_limits={"max_attributes_per_span": 0, "max_attribute_value_length": 0}
    )
    gateway = await start_gateway(config)
    request, over, within = mixed_request(random.Random(4))
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(raw_downstream.spans()) == 5)

    assert sorted(raw_downstream.span_payloads()) == sorted(s.SerializeToString() for s in over + within)
    assert truncated(gateway) == (0, 0)


async def test_one_limit_alone(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = gateway_config(downstream, attribute_limits={"max_attribute_value_length": MAX_LENGTH})
    gateway = await start_gateway(config)
    rng = random.Random(5)
    request, over, _ = mixed_request(rng)
    # Small spans: one value a character over the limit, one at it in characters (over it in bytes).
    scope_spans = request.resource_spans[0].scope_spans[0]
    for name, text in (("one_over", "ü" * (MAX_LENGTH + 1)), ("at_limit", "ü" * MAX_LENGTH)):
        span = scope_spans.spans.add(trace_id=over[0].trace_id, span_id=rng.randbytes(8), name=name)
        span.attributes.add(key="text").value.string_value = text
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(downstream.spans()) == 7)

    received = {span.name: span for _, _, span in downstream.spans()}
    for sent in over:
        span = received[sent.name]
        assert [kv.key for kv in span.attributes] == [kv.key for kv in sent.attributes]
        assert span.dropped_attributes_count == sent.dropped_attributes_count
        assert list(span.attributes) == [KeyValue(key=kv.key, value=cut(kv.value)) for kv in sent.attributes]
    assert received["one_over"].attributes[0].value.string_value == "ü" * MAX_LENGTH
    assert received["at_limit"].attributes[0].value.string_value == "ü" * MAX_LENGTH
    dropped, cut_values = truncated(gateway)
    print(f"\nlength limit alone: dropped {dropped:.0f}, shortened {cut_values:.0f}")
    # Every long value of the 50 attributes (and the event's 20, the link's 12), and the small span's one.
    per_span = over_length([*attributes(50), *attributes(20), *attributes(12)])
    assert (dropped, cut_values) == (0, 2 * per_span + 1)


@pytest.mark.parametrize("key", ["max_attributes_per_span", "max_attribute_value_length"])
def test_negative_limits_are_config_errors(key: str) -> None:
    config = gateway_config(None, attribute_limits={key: -1})
    with pytest.raises(ConfigError, match=rf"tail_sampling\.attribute_limits\.{key}"):
        parse_config(config)


async def test_a_reload_changes_the_limits_from_the_next_decision_on(
    start_gateway: GatewayFactory, raw_downstream: RawDownstream
) -> None:
    """No limits at start; a reload sets them (later traces are cut), another removes them again."""
    unlimited = gateway_config(raw_downstream)
    gateway = await start_gateway(unlimited)
    rng = random.Random(2)
    sent: list[list[Span]] = []
    for config in (unlimited, limited(raw_downstream), unlimited):
        gateway.apply_config(parse_config(config))
        request, over, _ = mixed_request(rng)
        await send(receiver_url(gateway), request)
        sent.append(over)
        expected = 5 * len(sent)
        await wait_for(lambda expected=expected: len(raw_downstream.spans()) == expected)

    received = {span.name + span.span_id.hex(): span for _, _, span in raw_downstream.spans()}
    before, during, after = ([received[span.name + span.span_id.hex()] for span in over] for over in sent)
    assert [span.SerializeToString() for span in before] == [span.SerializeToString() for span in sent[0]]
    for got, original in zip(during, sent[1], strict=True):
        assert_cut(got, original)
    assert [span.SerializeToString() for span in after] == [span.SerializeToString() for span in sent[2]]
    dropped, _ = truncated(gateway)
    assert dropped == 2 * ((50 - MAX_ATTRIBUTES) + (20 - MAX_ATTRIBUTES) + (12 - MAX_ATTRIBUTES))
