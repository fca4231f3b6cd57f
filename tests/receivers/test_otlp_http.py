"""Bad input on the OTLP/HTTP receiver: each kind gets its status and a message; serving goes on."""

from __future__ import annotations

import gzip
import json

import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.otlp_wire import TAG_RESOURCE, TAG_RESOURCE_SPANS, TAG_SCOPE, TAG_SCOPE_SPANS, TAG_SPANS, frame
from tests.conftest import (
    Downstream,
    GatewayFactory,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import JSON, PROTOBUF, make_request, otlp_json, post


async def assert_still_serving(url: str, downstream: Downstream) -> None:
    request = make_request(traces=1, spans_per_trace=2)
    status, _, _ = await post(url, request.SerializeToString(), PROTOBUF)
    assert status == 200
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    await wait_for(lambda: trace_id in downstream.spans_by_trace())


def status_message(content_type: str, body: bytes) -> str:
    if content_type == "application/x-protobuf":
        return Status.FromString(body).message
    return str(json.loads(body)["message"])


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason", "message"),
    [
        (b"\x0a\xff\xff\x00garbage", PROTOBUF, 400, "malformed", "malformed protobuf"),
        (b"{not json", JSON, 400, "malformed", "malformed JSON"),
        (b"[1, 2]", JSON, 400, "malformed", "must be an object"),
        (b'{"resourceSpans": "nope"}', JSON, 400, "malformed", "invalid OTLP JSON"),
        (b"[" * 100_000 + b"]" * 100_000, JSON, 400, "malformed", "malformed JSON"),
        (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported_media_type", "text/plain"),
        (
            b"hello",
            {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"},
            415,
            "unsupported_encoding",
            "br",
        ),
        (
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xff\xff\xff",
            {**PROTOBUF, "Content-Encoding": "gzip"},
            400,
            "malformed",
            "invalid gzip",
        ),
        (
            gzip.compress(b"\x0a\x00" * 1000)[:-12],
            {**PROTOBUF, "Content-Encoding": "gzip"},
            400,
            "malformed",
            "truncated gzip",
        ),
    ],
    ids=[
        "protobuf",
        "json-syntax",
        "json-array",
        "json-shape",
        "json-deep",
        "media-type",
        "encoding",
        "gzip-corrupt",
        "gzip-truncated",
    ],
)
async def test_bad_request_rejected_with_message(
    start_gateway: GatewayFactory,
    downstream: Downstream,
    body: bytes,
    headers: dict[str, str],
    status: int,
    reason: str,
    message: str,
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    url = receiver_url(gateway)
    got_status, content_type, reply = await post(url, body, headers)
    assert got_status == status
    assert message in status_message(content_type, reply)
    assert (
        metric(
            gateway,
            "tailgate_receiver_rejected_requests_total",
            protocol="otlp_http",
            reason=reason,
        )
        == 1
    )
    await assert_still_serving(url, downstream)


async def test_body_over_limit_is_413(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = gateway_config(downstream)
    config["receivers"]["otlp"]["http"]["max_request_bytes"] = 10_000
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    big = make_request(traces=100, spans_per_trace=5).SerializeToString()
    assert len(big) > 10_000
    status, content_type, reply = await post(url, big, PROTOBUF)
    assert status == 413
    assert "max_request_bytes" in status_message(content_type, reply)
    # A gzip bomb: 1 KiB on the wire, far over the limit once decompressed.
    bomb = gzip.compress(b"\x00" * 5_000_000, 9)
    assert len(bomb) < 10_000
    status, content_type, reply = await post(url, bomb, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert status == 413
    assert "decompressed body exceeds" in status_message(content_type, reply)
    assert (
        metric(
            gateway,
            "tailgate_receiver_rejected_requests_total",
            protocol="otlp_http",
            reason="too_large",
        )
        == 2
    )
    await assert_still_serving(url, downstream)


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
async def test_invalid_ids_rejected_in_partial_success(
    start_gateway: GatewayFactory, downstream: Downstream, encoding: str
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    request = make_request(traces=2, spans_per_trace=2)
    spans = request.resource_spans[0].scope_spans[0].spans
    good_trace = spans[2].trace_id
    spans[0].trace_id = b"\x01" * 8  # short
    spans[1].span_id = bytes(8)  # all zero
    if encoding == "protobuf":
        status, _, reply = await post(receiver_url(gateway), request.SerializeToString(), PROTOBUF)
        response = ExportTraceServiceResponse.FromString(reply)
        rejected = response.partial_success.rejected_spans
        message = response.partial_success.error_message
    else:
        document = json.loads(otlp_json(request))
        document["resourceSpans"][0]["scopeSpans"][0]["spans"][2]["spanId"] = "zz-not-hex"
        status, _, reply = await post(receiver_url(gateway), json.dumps(document).encode(), JSON)
        partial = json.loads(reply)["partialSuccess"]
        rejected = int(partial["rejectedSpans"])
        message = partial["errorMessage"]
    assert status == 200
    assert "invalid trace id" in message and "invalid span id" in message
    if encoding == "protobuf":
        assert rejected == 2
        await wait_for(lambda: set(downstream.spans_by_trace()) == {good_trace})
        assert len(downstream.spans_by_trace()[good_trace]) == 2
    else:
        assert rejected == 3
        await wait_for(lambda: set(downstream.spans_by_trace()) == {good_trace})
        assert len(downstream.spans_by_trace()[good_trace]) == 1
    assert (
        metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="rejected") == rejected
    )


async def test_kept_span_with_invalid_contents_is_left_out_not_forwarded(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    """Decoding reads only the fields the buffer needs; the rest of a span is checked when it is kept.

    A span whose name is not UTF-8 (invalid in proto3) must not reach the backend, where it would spoil
    the whole batch; the valid spans of the same trace and request still arrive.
    """
    gateway = await start_gateway(gateway_config(downstream))
    request = make_request(traces=2, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    bad_index = 1
    payloads = [span.SerializeToString() for span in spans]
    payloads[bad_index] += frame(0x2A, b"\xff\xfe")  # Span.name again, not UTF-8: the last one wins
    scope_spans = frame(TAG_SCOPE, request.resource_spans[0].scope_spans[0].scope.SerializeToString())
    scope_spans += b"".join(frame(TAG_SPANS, payload) for payload in payloads)
    resource_spans = frame(TAG_RESOURCE, request.resource_spans[0].resource.SerializeToString())
    resource_spans += frame(TAG_SCOPE_SPANS, scope_spans)
    status, _, _ = await post(receiver_url(gateway), frame(TAG_RESOURCE_SPANS, resource_spans), PROTOBUF)
    assert status == 200
    expected = {span.span_id for index, span in enumerate(spans) if index != bad_index}
    await wait_for(lambda: len(downstream.spans()) == 5)
    await wait_for(lambda: metric(gateway, "tailgate_invalid_spans_total") == 1)
    assert {span.span_id for _, _, span in downstream.spans()} == expected
    await wait_for(lambda: metric(gateway, "tailgate_exporter_sent_spans_total", exporter="otlp_http") == 5)


def _request_body(scope_payload: bytes, span_payloads: list[bytes], resource_payload: bytes = b"") -> bytes:
    scope_spans = frame(TAG_SCOPE, scope_payload) + b"".join(frame(TAG_SPANS, p) for p in span_payloads)
    resource_spans = frame(TAG_RESOURCE, resource_payload) + frame(TAG_SCOPE_SPANS, scope_spans)
    return frame(TAG_RESOURCE_SPANS, resource_spans)


async def test_invalid_resource_or_scope_rejected_other_batches_kept(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    good = make_request(traces=1, spans_per_trace=2)
    bad = make_request(traces=1, spans_per_trace=3)
    bad_spans = [span.SerializeToString() for span in bad.resource_spans[0].scope_spans[0].spans]
    bad_scope = frame(0x0A, b"\xff\xfe")  # InstrumentationScope.name, not UTF-8
    body = good.SerializeToString() + _request_body(bad_scope, bad_spans)  # two ResourceSpans
    status, _, reply = await post(receiver_url(gateway), body, PROTOBUF)
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(reply).partial_success
    assert partial.rejected_spans == 3
    assert "invalid resource or instrumentation scope" in partial.error_message
    good_trace = good.resource_spans[0].scope_spans[0].spans[0].trace_id
    await wait_for(lambda: set(downstream.spans_by_trace()) == {good_trace})
    bad_resource = frame(0x0A, frame(0x0A, b"\x80"))  # Resource.attributes[0], its key not UTF-8
    body = _request_body(b"", bad_spans, bad_resource)
    status, _, reply = await post(receiver_url(gateway), body, PROTOBUF)
    assert ExportTraceServiceResponse.FromString(reply).partial_success.rejected_spans == 3
    await assert_still_serving(receiver_url(gateway), downstream)
    assert metric(gateway, "tailgate_decision_errors_total") == 0


async def test_invalid_parent_id_rejected(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    request = make_request(traces=1, spans_per_trace=3)
    request.resource_spans[0].scope_spans[0].spans[1].parent_span_id = b"\x01\x02\x03\x04"
    status, _, reply = await post(receiver_url(gateway), request.SerializeToString(), PROTOBUF)
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(reply).partial_success
    assert partial.rejected_spans == 1
    assert "invalid parent span id" in partial.error_message
    document = json.loads(otlp_json(request))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][2]["parentSpanId"] = "xyz"
    status, _, reply = await post(receiver_url(gateway), json.dumps(document).encode(), JSON)
    assert int(json.loads(reply)["partialSuccess"]["rejectedSpans"]) == 2


async def test_kept_span_with_bad_link_ids_left_out(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    request = make_request(traces=1, spans_per_trace=3)
    link = request.resource_spans[0].scope_spans[0].spans[2].links.add()
    link.trace_id, link.span_id = b"\x01" * 16, b"\x02" * 3  # a span id must have 8 bytes
    status, _, _ = await post(receiver_url(gateway), request.SerializeToString(), PROTOBUF)
    assert status == 200
    await wait_for(lambda: metric(gateway, "tailgate_invalid_spans_total") == 1)
    await wait_for(lambda: len(downstream.spans()) == 2)
    assert all(not span.links for _, _, span in downstream.spans())


async def test_gzip_members_all_read_trailing_garbage_rejected(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    first, second = make_request(traces=2, spans_per_trace=2), make_request(traces=2, spans_per_trace=2)
    # Concatenated protobuf messages merge; concatenated gzip members are one body (RFC 1952).
    body = gzip.compress(first.SerializeToString()) + gzip.compress(second.SerializeToString())
    status, _, _ = await post(receiver_url(gateway), body, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert status == 200
    await wait_for(lambda: len(downstream.spans()) == 8)
    body = gzip.compress(first.SerializeToString()) + b"trailing"
    status, content_type, reply = await post(
        receiver_url(gateway), body, {**PROTOBUF, "Content-Encoding": "gzip"}
    )
    assert status == 400
    assert "unexpected data after the gzip stream" in status_message(content_type, reply)


async def test_large_json_body_accepted(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    request = make_request(traces=400, spans_per_trace=5)
    body = otlp_json(request)
    assert len(body) > 256 * 1024  # decoded off the event loop
    status, _, reply = await post(receiver_url(gateway), body, JSON)
    assert status == 200, reply
    await wait_for(lambda: len(downstream.spans()) == 2000)
