"""The Zipkin receiver against real Zipkin clients and data: what arrives downstream as OTLP, bad input."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any, NamedTuple

import aiohttp
import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from opentelemetry.trace import Status as SDKStatus
from opentelemetry.trace import StatusCode as SDKStatusCode
from py_zipkin import Encoding, Kind
from py_zipkin.transport import SimpleHTTPTransport
from py_zipkin.zipkin import zipkin_span

from tests.conftest import Downstream, GatewayFactory, metric, receiver_url, wait_for
from tests.otlp_data import ERRORS_ONLY, make_request, post, send
from tests.zipkin_data import (
    DATA_FILES,
    JSON,
    PROTOBUF,
    data_body,
    data_spans,
    sdk_provider,
    sent_spans,
    trace_id,
    zipkin_config,
    zipkin_port,
    zipkin_url,
)

ACCEPTED = "tailgate_receiver_spans_total"
REJECTED_REQUESTS = "tailgate_receiver_rejected_requests_total"
SDK_KINDS = {
    SpanKind.SERVER: Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SPAN_KIND_CONSUMER,
    # The exporter writes no kind for INTERNAL; the Collector reads no kind as UNSPECIFIED.
    SpanKind.INTERNAL: Span.SPAN_KIND_UNSPECIFIED,
}
ZIPKIN_KINDS = {
    None: Span.SPAN_KIND_UNSPECIFIED,
    "SERVER": Span.SPAN_KIND_SERVER,
    "CLIENT": Span.SPAN_KIND_CLIENT,
    "PRODUCER": Span.SPAN_KIND_PRODUCER,
    "CONSUMER": Span.SPAN_KIND_CONSUMER,
}


def micros(nanos: int) -> int:
    """Nanoseconds as the OTel Zipkin exporter rounds them to microseconds."""
    return (nanos + 500) // 1000


def plain(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field == "array_value":
        return [plain(item) for item in value.array_value.values]
    return getattr(value, field) if field else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: plain(kv.value) for kv in pairs}


def accepted_spans(gateway: Any) -> float:
    return metric(gateway, ACCEPTED, protocol="zipkin", outcome="accepted")


def emit_sdk_trace(url: str, error: bool = True) -> list[ReadableSpan]:
    """One trace across two services, sent by the OTel SDK's Zipkin JSON exporter; the spans as sent."""
    frontend, frontend_copies = sdk_provider(url, "frontend")
    backend, backend_copies = sdk_provider(url, "backend")
    web = frontend.get_tracer("tests.frontend", "2.1")
    worker = backend.get_tracer("tests.backend")
    root_attributes = {
        "http.method": "GET",
        "http.status_code": 200,
        "ratio": 0.25,
        "retry": True,
        "labels": ["a", "b"],
        "codes": [1, 2],
    }
    with web.start_as_current_span("GET /checkout", kind=SpanKind.SERVER, attributes=root_attributes) as root:
        root.add_event("cache miss", {"key": "user:1", "size": 3, "hit": False})
        root.add_event("retrying")
        with web.start_as_current_span("call backend", kind=SpanKind.CLIENT):
            with worker.start_as_current_span("consume", kind=SpanKind.CONSUMER) as consume:
                if error:
                    consume.set_status(SDKStatus(SDKStatusCode.ERROR, "deadlock"))
            with worker.start_as_current_span("publish", kind=SpanKind.PRODUCER) as publish:
                publish.set_status(SDKStatus(SDKStatusCode.OK))
            with worker.start_as_current_span("compute"):
                pass
    frontend.shutdown()
    backend.shutdown()
    return sent_spans(frontend_copies) + sent_spans(backend_copies)


def assert_sdk_span_mapped(sent: ReadableSpan, resource: Any, scope: Any, span: Span) -> None:
    """A span as the OTel SDK made it against what arrived downstream, field by field."""
    context = sent.context
    assert context is not None and sent.start_time is not None and sent.end_time is not None
    assert span.trace_id == context.trace_id.to_bytes(16, "big")
    assert span.span_id == context.span_id.to_bytes(8, "big")
    assert span.parent_span_id == (sent.parent.span_id.to_bytes(8, "big") if sent.parent else b"")
    assert span.name == sent.name
    assert span.kind == SDK_KINDS[sent.kind]
    start = micros(sent.start_time) * 1000
    assert span.start_time_unix_nano == start
    assert span.end_time_unix_nano == start + micros(sent.end_time - sent.start_time) * 1000
    # service.name from localEndpoint; the SDK's other resource attributes come back from their tags.
    assert attributes(resource.attributes) == {
        key: str(value) for key, value in sent.resource.attributes.items()
    }
    assert sent.instrumentation_scope is not None
    assert (scope.name, scope.version) == (
        sent.instrumentation_scope.name,
        sent.instrumentation_scope.version or "",
    )
    assert [(event.name, event.time_unix_nano, attributes(event.attributes)) for event in span.events] == [
        (event.name, micros(event.timestamp) * 1000, dict(event.attributes)) for event in sent.events
    ]
    expected_status = {
        SDKStatusCode.UNSET: Status.STATUS_CODE_UNSET,
        SDKStatusCode.OK: Status.STATUS_CODE_OK,
        SDKStatusCode.ERROR: Status.STATUS_CODE_ERROR,
    }[sent.status.status_code]
    assert (span.status.code, span.status.message) == (expected_status, sent.status.description or "")


async def test_otel_sdk_zipkin_exporter_spans_arrive_mapped(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    sent = await asyncio.to_thread(emit_sdk_trace, zipkin_url(gateway))
    await wait_for(lambda: len(downstream.spans()) == len(sent))
    received = {span.span_id: (resource, scope, span) for resource, scope, span in downstream.spans()}
    for sdk_span in sent:
        assert sdk_span.context is not None
        assert_sdk_span_mapped(sdk_span, *received[sdk_span.context.span_id.to_bytes(8, "big")])
    (root,) = [span for _, _, span in received.values() if span.name == "GET /checkout"]
    # Tags stay strings, written as the exporter writes them; status and scope tags are consumed.
    assert attributes(root.attributes) == {
        "http.method": "GET",
        "http.status_code": "200",
        "ratio": "0.25",
        "retry": "true",
        "labels": '["a","b"]',
        "codes": '["1","2"]',
    }
    assert accepted_spans(gateway) == len(sent)


async def test_status_code_policy_keeps_the_zipkin_error_trace(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(zipkin_config(downstream, policies=ERRORS_ONLY))
    failed = await asyncio.to_thread(emit_sdk_trace, zipkin_url(gateway), True)
    succeeded = await asyncio.to_thread(emit_sdk_trace, zipkin_url(gateway), False)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 1)
    await wait_for(lambda: len(downstream.spans()) == len(failed))
    (kept,) = downstream.spans_by_trace()
    assert failed[0].context is not None and succeeded[0].context is not None
    assert kept == failed[0].context.trace_id.to_bytes(16, "big")


@pytest.mark.parametrize("encoding", [Encoding.V2_JSON, Encoding.V2_PROTO3], ids=["json", "proto3"])
async def test_py_zipkin_spans_arrive_mapped(
    start_gateway: GatewayFactory, downstream: Downstream, encoding: Encoding
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    port = zipkin_port(gateway)

    def emit() -> tuple[str, str, str]:
        # SimpleHTTPTransport posts to /api/v2/spans with the content type of the encoding and asserts 202.
        with zipkin_span(
            service_name="billing",
            span_name="charge",
            transport_handler=SimpleHTTPTransport("127.0.0.1", port),
            sample_rate=100.0,
            encoding=encoding,
            kind=Kind.SERVER,
            host="10.1.2.3",
            port=8080,
            binary_annotations={"customer": "c-42"},
        ) as root:
            root.add_annotation("validated")
            with zipkin_span(service_name="billing", span_name="insert", kind=Kind.CLIENT) as child:
                child.add_sa_binary_annotation(port=5432, service_name="postgres", host="10.9.9.9")
                child.update_binary_annotations({"db.statement": "insert"})
            assert root.zipkin_attrs is not None and child.zipkin_attrs is not None
            return root.zipkin_attrs.trace_id, root.zipkin_attrs.span_id, child.zipkin_attrs.span_id

    trace_hex, root_hex, child_hex = await asyncio.to_thread(emit)
    assert len(trace_hex) == 16  # a 64-bit id, padded to OTLP's 16 bytes
    await wait_for(lambda: len(downstream.spans()) == 2)
    spans = {span.span_id: (resource, span) for resource, _, span in downstream.spans()}
    resource, root = spans[bytes.fromhex(root_hex)]
    _, child = spans[bytes.fromhex(child_hex)]
    assert attributes(resource.attributes) == {"service.name": "billing"}
    assert root.trace_id == child.trace_id == trace_id(trace_hex)
    assert (root.name, root.kind, root.parent_span_id) == ("charge", Span.SPAN_KIND_SERVER, b"")
    assert (child.name, child.kind, child.parent_span_id) == ("insert", Span.SPAN_KIND_CLIENT, root.span_id)
    assert root.start_time_unix_nano % 1000 == 0 and root.end_time_unix_nano >= root.start_time_unix_nano
    assert [event.name for event in root.events] == ["validated"]
    assert root.events[0].time_unix_nano % 1000 == 0
    assert attributes(root.attributes) == {
        "customer": "c-42",
        "net.host.ip": "10.1.2.3",
        "net.host.port": 8080,
    }
    assert attributes(child.attributes) == {
        "db.statement": "insert",
        "net.host.ip": "10.1.2.3",
        "net.host.port": 8080,
        "peer.service": "postgres",
        "net.peer.ip": "10.9.9.9",
        "net.peer.port": 5432,
    }


@pytest.mark.parametrize("name", DATA_FILES)
async def test_real_zipkin_data_arrives_mapped(
    start_gateway: GatewayFactory, downstream: Downstream, name: str
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    status, _, _ = await post(zipkin_url(gateway), data_body(name), JSON)
    assert status == 202
    posted = data_spans(name)
    await wait_for(lambda: len(downstream.spans()) == len(posted))
    received = {(span.span_id, span.kind): (resource, span) for resource, _, span in downstream.spans()}
    # Shared client/server halves keep their one span id: yelp has three such pairs.
    assert len(received) == len(posted)
    for zipkin in posted:
        resource, span = received[bytes.fromhex(zipkin["id"]), ZIPKIN_KINDS[zipkin.get("kind")]]
        assert span.trace_id == trace_id(zipkin["traceId"])
        assert span.parent_span_id == bytes.fromhex(zipkin.get("parentId", ""))
        assert span.name == zipkin["name"]
        assert span.start_time_unix_nano == zipkin["timestamp"] * 1000
        assert span.end_time_unix_nano == (zipkin["timestamp"] + zipkin["duration"]) * 1000
        service = zipkin["localEndpoint"].get("serviceName")
        assert attributes(resource.attributes) == ({"service.name": service} if service else {})
        span_attributes = attributes(span.attributes)
        assert zipkin.get("tags", {}).items() <= span_attributes.items()
        assert [(event.name, event.time_unix_nano) for event in span.events] == [
            (annotation["value"], annotation["timestamp"] * 1000)
            for annotation in zipkin.get("annotations", [])
        ]
    assert accepted_spans(gateway) == len(posted)


async def test_zipkin_endpoints_become_span_attributes(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    await post(zipkin_url(gateway), data_body("messaging"), JSON)
    await wait_for(lambda: len(downstream.spans()) == 4)
    spans = {span.name: span for _, _, span in downstream.spans()}
    assert attributes(spans["get /"].attributes) == {
        "http.method": "GET",
        "http.path": "/",
        "mvc.controller.class": "Frontend",
        "mvc.controller.method": "callBackend",
        "net.host.ip": "192.168.0.10",
        "net.peer.ip": "::1",
        "net.peer.port": 54602,
    }
    assert attributes(spans["publish"].attributes) == {
        "net.host.ip": "192.168.0.10",
        "peer.service": "rabbitmq",
    }


async def test_one_trace_over_zipkin_and_otlp_is_one_trace(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    yelp = data_spans("yelp")
    request = make_request(traces=1, spans_per_trace=1)
    otlp_span = request.resource_spans[0].scope_spans[0].spans[0]
    otlp_span.trace_id = trace_id(yelp[0]["traceId"])
    otlp_span.parent_span_id = bytes.fromhex(yelp[0]["id"])
    await send(receiver_url(gateway), request)
    status, _, _ = await post(zipkin_url(gateway), data_body("yelp"), JSON)
    assert status == 202
    await wait_for(lambda: len(downstream.spans()) == len(yelp) + 1)
    assert list(downstream.spans_by_trace()) == [trace_id(yelp[0]["traceId"])]
    assert metric(gateway, "tailgate_traces_decided_total", decision="kept") == 1


def zipkin_span_json(**fields: Any) -> dict[str, Any]:
    span = {
        "traceId": "5af7183fb1d4cf5f",
        "id": "6b221d5bc9e6496c",
        "name": "get /api",
        "timestamp": 1_700_000_000_000_000,
        "duration": 2500,
        "localEndpoint": {"serviceName": "api"},
    }
    span.update(fields)
    return span


async def test_tag_conventions_map_to_otlp_fields(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    link = f"{'ab' * 16}|{'cd' * 8}|k=v|{json.dumps({'reason': 'retry', 'attempt': 2})}|1"
    spans = [
        # 128-bit upper-case id, scope and status tags, trace state, a link, the OTel exporters' event form.
        zipkin_span_json(
            traceId="4BF92F3577B34DA6A3CE929D0E0E4736",
            id="00F067AA0BA902B7",
            kind="CLIENT",
            tags={
                "otel.scope.name": "io.checkout",
                "otel.scope.version": "1.2",
                "otel.library.name": "io.checkout",
                "otel.status_code": "ERROR",
                "error": "card declined",
                "w3c.tracestate": "vendor=1",
                "otlp.link.0": link,
                "telemetry.sdk.language": "java",
                "region": "eu",
            },
            annotations=[
                {"timestamp": 1_700_000_000_000_100, "value": '{"retry": {"attempt": 2, "fatal": false}}'}
            ],
        ),
        # No kind with span.kind=internal, the legacy scope tags, a Collector-form event, error "true".
        zipkin_span_json(
            id="1111111111111111",
            parentId="6b221d5bc9e6496c",
            tags={"span.kind": "internal", "otel.library.name": "legacy", "error": "true"},
            annotations=[{"timestamp": 1_700_000_000_000_200, "value": 'flush|{"bytes":10}|3'}],
        ),
        # No timestamp: starts at the epoch and says so; a zero parent id and a parent id equal to the
        # span's own are roots.
        zipkin_span_json(id="2222222222222222", parentId="0000000000000000", timestamp=None),
        zipkin_span_json(id="3333333333333333", parentId="3333333333333333", tags={"otel.status_code": "OK"}),
    ]
    gateway = await start_gateway(zipkin_config(downstream))
    status, _, _ = await post(zipkin_url(gateway), json.dumps(spans).encode(), JSON)
    assert status == 202
    await wait_for(lambda: len(downstream.spans()) == 4)
    received = {span.span_id.hex(): (resource, scope, span) for resource, scope, span in downstream.spans()}

    resource, scope, span = received["00f067aa0ba902b7"]
    assert span.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert attributes(resource.attributes) == {"service.name": "api", "telemetry.sdk.language": "java"}
    assert (scope.name, scope.version) == ("io.checkout", "1.2")
    assert (span.status.code, span.status.message) == (Status.STATUS_CODE_ERROR, "card declined")
    assert span.trace_state == "vendor=1"
    assert attributes(span.attributes) == {"region": "eu"}
    (otlp_link,) = span.links
    assert (otlp_link.trace_id, otlp_link.span_id, otlp_link.trace_state) == (
        b"\xab" * 16,
        b"\xcd" * 8,
        "k=v",
    )
    assert (attributes(otlp_link.attributes), otlp_link.dropped_attributes_count) == (
        {"reason": "retry", "attempt": 2},
        1,
    )
    (event,) = span.events
    assert (event.name, attributes(event.attributes)) == ("retry", {"attempt": 2, "fatal": False})

    _, scope, span = received["1111111111111111"]
    assert (scope.name, span.kind) == ("legacy", Span.SPAN_KIND_INTERNAL)
    assert (span.status.code, span.status.message) == (Status.STATUS_CODE_ERROR, "")
    assert attributes(span.attributes) == {}
    (event,) = span.events
    assert (event.name, attributes(event.attributes), event.dropped_attributes_count) == (
        "flush",
        {"bytes": 10},
        3,
    )

    _, _, span = received["2222222222222222"]
    assert (span.parent_span_id, span.start_time_unix_nano, span.end_time_unix_nano) == (b"", 0, 2_500_000)
    assert attributes(span.attributes) == {"otel.zipkin.absentField.startTime": True}
    _, _, span = received["3333333333333333"]
    assert (span.parent_span_id, span.status.code) == (b"", Status.STATUS_CODE_OK)


async def assert_still_serving(
    gateway: Any, downstream: Downstream, body: bytes, headers: dict[str, str]
) -> None:
    """A good request after a bad one is accepted, and its span arrives."""
    before = accepted_spans(gateway)
    status, _, _ = await post(zipkin_url(gateway), body, headers)
    assert status == 202
    assert accepted_spans(gateway) == before + 1
    await wait_for(lambda: len(downstream.spans()) == 1)


GOOD_SPAN = zipkin_span_json()
GOOD = json.dumps([GOOD_SPAN]).encode()


class BadRequest(NamedTuple):
    body: bytes
    message: str  # a part of the reply's text
    headers: dict[str, str] = JSON
    status: int = 400
    reason: str = "malformed"


def spans_body(*spans: Any) -> bytes:
    return json.dumps(list(spans)).encode()


BAD_REQUESTS = {
    "json-syntax": BadRequest(b"{not json", "malformed JSON"),
    "not-a-list": BadRequest(b'{"traceId": "5af7183fb1d4cf5f"}', "must be a JSON array"),
    "span-not-object": BadRequest(spans_body(GOOD_SPAN, 7), "span 1: must be an object"),
    "trace-id-missing": BadRequest(spans_body({"id": "6b221d5bc9e6496c"}), "span 0: traceId: is required"),
    "trace-id-length": BadRequest(
        spans_body(zipkin_span_json(traceId="5af7183fb1")), "traceId: must be 16 or 32"
    ),
    "trace-id-hex": BadRequest(
        spans_body(zipkin_span_json(traceId="zzf7183fb1d4cf5f")), "traceId: must be 16"
    ),
    "trace-id-zero": BadRequest(
        spans_body(zipkin_span_json(traceId="0" * 32)), "traceId: must not be all zeros"
    ),
    "span-id-missing": BadRequest(spans_body(zipkin_span_json(id=None)), "span 0: id: is required"),
    "span-id-zero": BadRequest(spans_body(zipkin_span_json(id="0" * 16)), "id: must not be all zeros"),
    "parent-id": BadRequest(
        spans_body(GOOD_SPAN, zipkin_span_json(parentId="12")), "span 1: parentId: must be 16"
    ),
    "timestamp-type": BadRequest(
        spans_body(zipkin_span_json(timestamp="now")), "timestamp: must be a number"
    ),
    "duration-negative": BadRequest(spans_body(zipkin_span_json(duration=-5)), "duration: must be a number"),
    "tags-type": BadRequest(spans_body(zipkin_span_json(tags=["a"])), "tags: must be an object"),
    "tag-value-type": BadRequest(
        spans_body(zipkin_span_json(tags={"retries": 3})), "tags.retries: must be a string"
    ),
    "kind": BadRequest(spans_body(zipkin_span_json(kind="SERVERS")), "kind: must be one of"),
    "port-type": BadRequest(
        spans_body(zipkin_span_json(remoteEndpoint={"port": "80"})), "remoteEndpoint.port: must be a number"
    ),
    "annotation": BadRequest(
        spans_body(zipkin_span_json(annotations=[{"value": "cs"}])), "annotations[0]: needs a timestamp"
    ),
    "protobuf": BadRequest(b"\x0a\x05\x0a\x03\xff", "malformed protobuf", PROTOBUF),
    "protobuf-trace-id": BadRequest(
        b"\x0a\x04\x0a\x02\x01\x02", "span 0: trace_id: must be 8 or 16 bytes", PROTOBUF
    ),
    "media-type": BadRequest(
        GOOD, "application/json", {"Content-Type": "application/x-thrift"}, 415, "unsupported_media_type"
    ),
    "encoding": BadRequest(GOOD, "br", {**JSON, "Content-Encoding": "br"}, 415, "unsupported_encoding"),
    "gzip-truncated": BadRequest(
        gzip.compress(GOOD)[:-12], "truncated gzip", {**JSON, "Content-Encoding": "gzip"}
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_request_rejected_with_message(
    start_gateway: GatewayFactory, downstream: Downstream, case: BadRequest
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    status, _, reply = await post(zipkin_url(gateway), case.body, case.headers)
    assert status == case.status
    assert case.message in reply.decode()
    assert metric(gateway, REJECTED_REQUESTS, protocol="zipkin", reason=case.reason) == 1
    assert accepted_spans(gateway) == 0
    # The good request is gzip-compressed: the receiver reads that too.
    await assert_still_serving(gateway, downstream, gzip.compress(GOOD), {**JSON, "Content-Encoding": "gzip"})


async def test_body_over_limit_is_413(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = zipkin_config(downstream)
    config["receivers"]["zipkin"]["max_request_bytes"] = 10_000
    gateway = await start_gateway(config)
    big = json.dumps([zipkin_span_json(id=f"{index + 1:016x}") for index in range(100)]).encode()
    assert len(big) > 10_000
    status, _, reply = await post(zipkin_url(gateway), big, JSON)
    assert status == 413
    assert "max_request_bytes" in reply.decode()
    # A gzip bomb: small on the wire, far over the limit once decompressed.
    bomb = gzip.compress(b" " * 5_000_000, 9)
    assert len(bomb) < 10_000
    status, _, reply = await post(zipkin_url(gateway), bomb, {**JSON, "Content-Encoding": "gzip"})
    assert status == 413
    assert "decompressed body exceeds" in reply.decode()
    assert metric(gateway, REJECTED_REQUESTS, protocol="zipkin", reason="too_large") == 2
    await assert_still_serving(gateway, downstream, GOOD, JSON)


async def test_large_body_decoded_in_full(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    root = zipkin_span_json(tags={"payload": "x" * 200})
    spans = [root] + [
        zipkin_span_json(id=f"{index + 1:016x}", parentId=root["id"], tags={"payload": "x" * 200})
        for index in range(2000)
    ]
    body = json.dumps(spans).encode()
    assert len(body) > 256 * 1024  # over the size decoded in a worker thread
    status, _, _ = await post(zipkin_url(gateway), body, JSON)
    assert status == 202
    assert accepted_spans(gateway) == len(spans)
    await wait_for(lambda: len(downstream.spans()) == len(spans))


async def test_json_without_content_type_is_read_as_json(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(zipkin_config(downstream))
    async with (
        aiohttp.ClientSession() as session,
        session.post(zipkin_url(gateway), data=GOOD, skip_auto_headers=["Content-Type"]) as reply,
    ):
        assert "Content-Type" not in reply.request_info.headers
        assert reply.status == 202
    await wait_for(lambda: len(downstream.spans()) == 1)
