"""OTLP test data and clients shared by the tests: requests built with opentelemetry-proto, the OTel SDK."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable

import aiohttp
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
ERRORS_ONLY = [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """POST a body; the reply's status, content type and body."""
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as reply:
        return reply.status, reply.content_type, await reply.read()


async def send(url: str, request: ExportTraceServiceRequest) -> None:
    """POST a protobuf request that must be accepted."""
    status, _, body = await post(url, request.SerializeToString(), PROTOBUF)
    assert status == 200, body


def _provider(url: str, service: str, exporter: Callable[..., SpanExporter]) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    processor = BatchSpanProcessor(
        exporter(endpoint=url, timeout=5),
        max_export_batch_size=128,
        schedule_delay_millis=50,
    )
    provider.add_span_processor(processor)
    return provider


def send_sdk_traces(
    url: str, plan: list[str], exporter: Callable[..., SpanExporter] = OTLPSpanExporter
) -> dict[bytes, tuple[str, int]]:
    """Emit one trace per plan entry ("error", "slow", "ok") from two services with the OTel SDK.

    The root span comes from `frontend`, three children from `backend`: each trace crosses two
    resources and two connections. Returns trace id → (kind, span count). `exporter` is the SDK's
    OTLP/HTTP exporter or its OTLP/gRPC one (which reads an http:// URL as a plaintext host:port).
    """
    frontend = _provider(url, "frontend", exporter)
    backend = _provider(url, "backend", exporter)
    root_tracer = frontend.get_tracer("tests.frontend")
    child_tracer = backend.get_tracer("tests.backend", "1.0")
    traces: dict[bytes, tuple[str, int]] = {}
    for kind in plan:
        start = time.time_ns()
        duration = 2_000_000_000 if kind == "slow" else 3_000_000
        root = root_tracer.start_span("GET /checkout", start_time=start, kind=trace.SpanKind.SERVER)
        context = trace.set_span_in_context(root)
        for index in range(3):
            child = child_tracer.start_span(
                f"query {index}", context=context, start_time=start + index * 1000
            )
            child.set_attribute("db.system", "postgresql")
            if kind == "error" and index == 1:
                child.set_status(Status(StatusCode.ERROR, "deadlock"))
            child.end(end_time=start + duration // 2)
        root.end(end_time=start + duration)
        traces[root.get_span_context().trace_id.to_bytes(16, "big")] = (kind, 4)
    backend.force_flush()
    frontend.force_flush()
    backend.shutdown()
    frontend.shutdown()
    return traces


def otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """The OTLP JSON mapping of a request: protobuf JSON with hex (not base64) ids."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex().upper()
    return json.dumps(document).encode()


def make_request(traces: int, spans_per_trace: int, error_every: int = 0) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="json-client"))
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "tests"
    now = time.time_ns()
    for number in range(traces):
        trace_id = random.randbytes(16)
        root_id = random.randbytes(8)
        for index in range(spans_per_trace):
            span = scope_spans.spans.add()
            span.trace_id = trace_id
            span.span_id = root_id if index == 0 else random.randbytes(8)
            if index:
                span.parent_span_id = root_id
            span.name = f"op{index}"
            span.start_time_unix_nano = now
            span.end_time_unix_nano = now + 1_000_000
            if error_every and number % error_every == 0 and index == 1:
                span.status.code = 2
    return request
