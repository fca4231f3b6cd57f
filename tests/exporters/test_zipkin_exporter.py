"""The Zipkin exporter against a real Zipkin v2 endpoint: round trips through the gateway, the OTLP → Zipkin
mapping of the specification, gzip, headers, retries and shutdown."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sampler.config import ZipkinExporterConfig
from sampler.exporters.zipkin import ZipkinExporter
from sampler.metrics import Metrics
from tests.conftest import GatewayFactory, receiver_url, wait_for
from tests.otlp_data import post, send, send_sdk_traces
from tests.zipkin_data import DATA_FILES, JSON, ZipkinServer, data_body, data_spans, zipkin_config, zipkin_url

from .helpers import Reply, eventually, make_group, make_scope, make_trace, sample

NAME = "zipkin/backend"
SENT = "tailgate_exporter_sent_spans_total"
FAILED = "tailgate_exporter_failed_spans_total"
RETRIES = "tailgate_exporter_retries_total"
START = 1_700_000_000_000_000_400  # ns: 1_700_000_000_000_000 µs once rounded
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
ROOT_ID = bytes.fromhex("00f067aa0ba902b7")


@pytest.fixture
async def zipkin_server() -> AsyncIterator[ZipkinServer]:
    async with ZipkinServer() as server:
        yield server


def gateway_to_zipkin(server: ZipkinServer, **exporter: Any) -> dict[str, Any]:
    """A gateway with the Zipkin receiver whose only exporter is Zipkin, to `server`."""
    config = zipkin_config(None)
    config["exporters"]["zipkin"] = {"endpoint": server.url, "batch": {"timeout": "0.02s"}, **exporter}
    return config


def by_id(spans: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    # Shared client and server halves have one id; the kind tells them apart.
    return {(span["id"], span.get("kind", "")): span for span in spans}


def without_lone_shared(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans less `shared` where the client half is not among them: OTLP has no shared flag, the
    exporter sets it on a server span that has the id of a client span of the batch."""
    clients = {span["id"] for span in spans if span.get("kind") == "CLIENT"}
    return [
        {key: value for key, value in span.items() if key != "shared" or span["id"] in clients}
        for span in spans
    ]


@pytest.mark.parametrize("name", DATA_FILES)
async def test_zipkin_in_zipkin_out_keeps_every_field(
    zipkin_server: ZipkinServer, start_gateway: GatewayFactory, name: str
) -> None:
    config = gateway_to_zipkin(zipkin_server, default_service_name="")
    config["tail_sampling"]["record_policy"] = False
    gateway = await start_gateway(config)
    status, _, _ = await post(zipkin_url(gateway), data_body(name), JSON)
    assert status == 202
    posted = data_spans(name)
    await wait_for(lambda: len(zipkin_server.spans()) == len(posted))
    assert by_id(zipkin_server.spans()) == by_id(without_lone_shared(posted))


def value(**field: Any) -> AnyValue:
    return AnyValue(**field)


def attribute(key: str, **field: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**field))


def otlp_request() -> ExportTraceServiceRequest:
    """One trace from two resources, with every field the mapping reads."""
    request = ExportTraceServiceRequest()
    checkout = request.resource_spans.add()
    checkout.resource.attributes.extend(
        [
            attribute("service.name", string_value="checkout"),
            attribute("service.namespace", string_value="shop"),
            attribute("host.name", string_value="node-1"),
        ]
    )
    scope_spans = checkout.scope_spans.add()
    scope_spans.scope.name = "io.checkout"
    scope_spans.scope.version = "1.2"
    scope_spans.scope.attributes.append(attribute("team", string_value="payments"))
    root = scope_spans.spans.add(
        trace_id=TRACE,
        span_id=ROOT_ID,
        name="POST /pay",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=START,
        end_time_unix_nano=START + 2_500_600,
        trace_state="vendor=1",
        dropped_attributes_count=3,
        status=Status(code=Status.STATUS_CODE_ERROR, message="card declined"),
    )
    root.attributes.extend(
        [
            attribute("http.method", string_value="POST"),
            attribute("http.status_code", int_value=500),
            attribute("ratio", double_value=0.5),
            attribute("retry", bool_value=True),
            attribute("labels", array_value={"values": [value(string_value="a"), value(string_value="b")]}),
            attribute("codes", array_value={"values": [value(int_value=1), value(int_value=2)]}),
            attribute("limits", kvlist_value={"values": [attribute("max", int_value=3)]}),
            attribute("digest", bytes_value=b"\x01\x02"),
        ]
    )
    root.events.add(time_unix_nano=START + 1_000, name="validated")
    retry = root.events.add(time_unix_nano=START + 2_000, name="retry", dropped_attributes_count=1)
    retry.attributes.append(attribute("attempt", int_value=2))
    root.links.add(trace_id=b"\xab" * 16, span_id=b"\xcd" * 8, trace_state="k=v").attributes.append(
        attribute("reason", string_value="batch")
    )
    for number, (kind, name, attributes) in enumerate(
        [
            (
                Span.SPAN_KIND_CLIENT,
                "charge card",
                [
                    attribute("server.address", string_value="payments.example"),
                    attribute("network.peer.address", string_value="10.0.0.7"),
                ],
            ),
            (
                Span.SPAN_KIND_PRODUCER,
                "publish",
                [
                    attribute("network.peer.address", string_value="10.0.0.9"),
                    attribute("network.peer.port", int_value=5672),
                ],
            ),
            (Span.SPAN_KIND_CLIENT, "post ledger", [attribute("peer.service", string_value="ledger")]),
            (Span.SPAN_KIND_INTERNAL, "compute", [attribute("error", string_value="false")]),
        ],
        start=1,
    ):
        child = scope_spans.spans.add(
            trace_id=TRACE,
            span_id=bytes([number]) * 8,
            parent_span_id=ROOT_ID,
            name=name,
            kind=kind,
            start_time_unix_nano=START + 100_000,
            end_time_unix_nano=START + 100_000,
        )
        child.attributes.extend(attributes)
    child.status.code = Status.STATUS_CODE_OK
    anonymous = request.resource_spans.add()
    anonymous.resource.attributes.append(attribute("host.name", string_value="node-2"))
    anonymous.scope_spans.add().spans.add(
        trace_id=TRACE,
        span_id=b"\x09" * 8,
        parent_span_id=ROOT_ID,
        name="cron",
        start_time_unix_nano=START,
        end_time_unix_nano=START + 300,
    )
    return request


CHECKOUT_TAGS = {
    "service.namespace": "shop",
    "host.name": "node-1",
    "otel.scope.name": "io.checkout",
    "otel.scope.version": "1.2",
    "otel.library.name": "io.checkout",
    "otel.library.version": "1.2",
    "team": "payments",
    # Scope attributes are tags: the keeping policy, recorded on the scope, is one.
    "tailsampling.policy": "all",
}
TRACE_HEX = TRACE.hex()
ROOT_HEX = ROOT_ID.hex()


def checkout_child(number: int, kind: str | None, name: str, **fields: Any) -> dict[str, Any]:
    """A child span of `otlp_request` as Zipkin JSON: the fields all children share, then `fields`."""
    span: dict[str, Any] = {"traceId": TRACE_HEX, "parentId": ROOT_HEX, "id": bytes([number] * 8).hex()}
    if kind is not None:
        span["kind"] = kind
    span.update(
        name=name,
        timestamp=1_700_000_000_000_100,
        localEndpoint={"serviceName": "checkout"},
        tags=CHECKOUT_TAGS,
    )
    return {**span, **fields}


EXPECTED_ZIPKIN = [
    {
        "traceId": TRACE_HEX,
        "id": ROOT_HEX,
        "kind": "SERVER",
        "name": "POST /pay",
        "timestamp": 1_700_000_000_000_000,
        "duration": 2501,
        "localEndpoint": {"serviceName": "checkout"},
        "annotations": [
            {"timestamp": 1_700_000_000_000_001, "value": "validated"},
            {
                "timestamp": 1_700_000_000_000_002,
                "value": '{"retry":{"attempt":2,"otel.dropped_attributes_count":1}}',
            },
        ],
        "tags": {
            **CHECKOUT_TAGS,
            "http.method": "POST",
            "http.status_code": "500",
            "ratio": "0.5",
            "retry": "true",
            "labels": '["a","b"]',
            "codes": "[1,2]",
            "limits": '{"max":3}',
            "digest": "AQI=",
            "otel.status_code": "ERROR",
            "error": "card declined",
            "otel.dropped_attributes_count": "3",
            "w3c.tracestate": "vendor=1",
            "otlp.link.0": f"{'ab' * 16}|{'cd' * 8}|k=v|" + '{"reason":"batch"}|0',
        },
    },
    # server.address ranks above network.peer.address.
    checkout_child(
        1,
        "CLIENT",
        "charge card",
        remoteEndpoint={"serviceName": "payments.example"},
        tags={**CHECKOUT_TAGS, "server.address": "payments.example", "network.peer.address": "10.0.0.7"},
    ),
    checkout_child(
        2,
        "PRODUCER",
        "publish",
        remoteEndpoint={"ipv4": "10.0.0.9", "port": 5672},
        tags={**CHECKOUT_TAGS, "network.peer.address": "10.0.0.9", "network.peer.port": "5672"},
    ),
    checkout_child(3, "CLIENT", "post ledger", remoteEndpoint={"serviceName": "ledger"}),
    # INTERNAL has no Zipkin kind; an `error` tag on a span that did not fail is dropped.
    checkout_child(4, None, "compute", tags={**CHECKOUT_TAGS, "otel.status_code": "OK"}),
    {
        # No service.name: the exporter's default_service_name; a duration under 1 µs rounds up.
        "traceId": TRACE_HEX,
        "parentId": ROOT_HEX,
        "id": "0909090909090909",
        "name": "cron",
        "timestamp": 1_700_000_000_000_000,
        "duration": 1,
        "localEndpoint": {"serviceName": "unknown_service"},
        "tags": {"host.name": "node-2", "tailsampling.policy": "all"},
    },
]


async def test_otlp_in_zipkin_out_follows_the_specification(
    zipkin_server: ZipkinServer, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway(gateway_to_zipkin(zipkin_server))
    await send(receiver_url(gateway), otlp_request())
    await wait_for(lambda: len(zipkin_server.spans()) == len(EXPECTED_ZIPKIN))
    assert by_id(zipkin_server.spans()) == by_id(EXPECTED_ZIPKIN)


async def test_otel_sdk_over_otlp_out_as_zipkin(
    zipkin_server: ZipkinServer, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway(gateway_to_zipkin(zipkin_server))
    traces = await asyncio.to_thread(send_sdk_traces, receiver_url(gateway), ["error", "ok"])
    await wait_for(lambda: len(zipkin_server.spans()) == 8)
    spans = zipkin_server.spans()
    assert {span["traceId"] for span in spans} == {trace.hex() for trace in traces}
    roots = [span for span in spans if "parentId" not in span]
    assert {(span["kind"], span["localEndpoint"]["serviceName"]) for span in roots} == {
        ("SERVER", "frontend")
    }
    children = [span for span in spans if "parentId" in span]
    assert all(
        "kind" not in span and span["localEndpoint"] == {"serviceName": "backend"} for span in children
    )
    assert all(span["tags"]["db.system"] == "postgresql" for span in children)
    assert all(span["tags"]["otel.scope.name"] == "tests.backend" for span in children)
    (failed,) = [span for span in spans if "error" in span["tags"]]
    assert (failed["tags"]["error"], failed["tags"]["otel.status_code"]) == ("deadlock", "ERROR")


def exporter_for(url: str, metrics: Metrics, **options: Any) -> ZipkinExporter:
    config = ZipkinExporterConfig.model_validate(
        {
            "endpoint": url,
            "batch": {"send_batch_size": 1000, "timeout": 0.02},
            "retry_on_failure": {"initial_interval": 0.02, "max_interval": 0.05, "max_elapsed_time": 1.0},
            **options,
        }
    )
    return ZipkinExporter(NAME, config, metrics)


def export_traces(exporter: ZipkinExporter, count: int) -> set[str]:
    """Export `count` traces of three spans; their span ids in hex."""
    scope = make_scope("checkout")
    ids: set[str] = set()
    for number in range(1, count + 1):
        trace = make_trace(number, 3)
        exporter.export([make_group(scope, trace)], len(trace))
        ids.update(span.span_id.hex() for span in trace)
    return ids


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_body_and_headers_on_the_wire(
    zipkin_server: ZipkinServer, metrics: Metrics, compression: str
) -> None:
    exporter = exporter_for(zipkin_server.url, metrics, compression=compression, headers={"X-Tenant": "acme"})
    await exporter.start()
    sent = export_traces(exporter, 2)
    await exporter.shutdown(1)
    (post,) = zipkin_server.posts
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["X-Tenant"] == "acme"
    if compression == "gzip":
        assert post.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(post.raw_body)) == post.spans
    else:
        assert "Content-Encoding" not in post.headers
        assert json.loads(post.raw_body) == post.spans
    assert {span["id"] for span in post.spans} == sent
    assert sample(metrics, SENT, NAME) == 6


async def test_retry_after_503_is_honored(zipkin_server: ZipkinServer, metrics: Metrics) -> None:
    # A backoff of 5 s cannot fit in max_elapsed_time: only the server's Retry-After gets a second try.
    retry = {"initial_interval": 5, "max_interval": 5, "max_elapsed_time": 2}
    exporter = exporter_for(zipkin_server.url, metrics, retry_on_failure=retry)
    zipkin_server.replies = [Reply(503, headers={"Retry-After": "0"}, body=b"busy")]
    await exporter.start()
    sent = export_traces(exporter, 1)
    await eventually(lambda: sample(metrics, SENT, NAME) == 3)
    await exporter.shutdown(1)
    assert [post.accepted for post in zipkin_server.posts] == [False, True]
    assert {span["id"] for span in zipkin_server.spans()} == sent
    assert sample(metrics, RETRIES, NAME) == 1


async def test_400_is_not_retried(zipkin_server: ZipkinServer, metrics: Metrics) -> None:
    exporter = exporter_for(zipkin_server.url, metrics)
    zipkin_server.replies = [Reply(400, body=b"bad span")]
    await exporter.start()
    export_traces(exporter, 1)
    await eventually(lambda: sample(metrics, FAILED, NAME) == 3)
    await exporter.shutdown(1)
    assert len(zipkin_server.posts) == 1
    assert sample(metrics, RETRIES, NAME) == 0
    assert sample(metrics, SENT, NAME) == 0


async def test_shutdown_flushes_the_open_batch(zipkin_server: ZipkinServer, metrics: Metrics) -> None:
    exporter = exporter_for(zipkin_server.url, metrics, batch={"timeout": 60})
    await exporter.start()
    sent = export_traces(exporter, 3)
    assert zipkin_server.posts == []
    await exporter.shutdown(1)
    assert {span["id"] for span in zipkin_server.spans()} == sent
    assert sample(metrics, SENT, NAME) == 9
