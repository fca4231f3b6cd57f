"""The whole pipeline with the real OpenTelemetry SDK as client and a real OTLP/HTTP downstream."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
from fractions import Fraction
from math import floor
from pathlib import Path

import aiohttp
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from tests.conftest import (
    Downstream,
    GatewayFactory,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}},
    {"name": "sample10", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
]


def fnv1a_64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value ^= byte
        value = (value * 0x100000001B3) % (1 << 64)
    return value


def probabilistic_keeps(trace_id: bytes, percentage: float, salt: str = "default-hash-seed") -> bool:
    threshold = floor(Fraction(percentage) / 100 * ((1 << 64) - 1))
    return fnv1a_64(salt.encode() + trace_id) <= threshold


def _provider(url: str, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    processor = BatchSpanProcessor(
        OTLPSpanExporter(endpoint=url, timeout=5),
        max_export_batch_size=128,
        schedule_delay_millis=50,
    )
    provider.add_span_processor(processor)
    return provider


def send_sdk_traces(url: str, plan: list[str]) -> dict[bytes, tuple[str, int]]:
    """Emit one trace per plan entry ("error", "slow", "ok") from two services with the OTel SDK.

    The root span comes from `frontend`, three children from `backend`: each trace crosses two
    resources and two connections. Returns trace id → (kind, span count).
    """
    frontend = _provider(url, "frontend")
    backend = _provider(url, "backend")
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


def expected_keeps(traces: dict[bytes, tuple[str, int]]) -> set[bytes]:
    return {
        trace_id
        for trace_id, (kind, _) in traces.items()
        if kind in ("error", "slow") or probabilistic_keeps(trace_id, 10)
    }


async def drained(gateway: object, traces: int) -> None:
    await wait_for(
        lambda: (
            metric(gateway, "tailgate_traces_decided_total", decision="kept")  # type: ignore[arg-type]
            + metric(gateway, "tailgate_traces_decided_total", decision="dropped")  # type: ignore[arg-type]
            >= traces
        )
    )


async def test_sdk_traces_kept_exactly_by_policies(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=POLICIES))
    rng = random.Random(7)
    plan = [rng.choice(["error", "slow", "ok", "ok", "ok", "ok"]) for _ in range(240)]
    traces = await asyncio.to_thread(send_sdk_traces, receiver_url(gateway), plan)
    kept = expected_keeps(traces)
    kept_spans = sum(traces[t][1] for t in kept)
    await wait_for(lambda: len(downstream.spans()) >= kept_spans)
    await drained(gateway, len(traces))
    await asyncio.sleep(0.1)  # nothing more may arrive

    received = downstream.spans_by_trace()
    assert set(received) == kept
    assert any(traces[t][0] == "ok" for t in kept), "the probabilistic policy kept some plain traces"
    for trace_id, spans in received.items():
        span_ids = [span.span_id for span in spans]
        assert len(span_ids) == len(set(span_ids)) == 4, "complete, each span once"
        kind = traces[trace_id][0]
        expected = "errors" if kind == "error" else "slow" if kind == "slow" else "sample10"
        assert downstream.kept_by()[trace_id] == {expected}
    services = {
        kv.value.string_value
        for resource, _, _ in downstream.spans()
        for kv in resource.attributes
        if kv.key == "service.name"
    }
    assert services == {"frontend", "backend"}
    total = len(traces) * 4
    assert metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted") == total
    assert metric(gateway, "tailgate_spans_decided_total", decision="kept") == kept_spans
    assert metric(gateway, "tailgate_spans_decided_total", decision="dropped") == total - kept_spans
    assert metric(gateway, "tailgate_traces_decided_total", decision="kept") == len(kept)
    assert metric(gateway, "tailgate_exporter_sent_spans_total", exporter="otlp_http") == kept_spans
    errors = sum(1 for kind, _ in traces.values() if kind == "error")
    assert metric(gateway, "tailgate_policy_decisions_total", policy="errors", decision="sampled") == errors
    assert metric(gateway, "tailgate_buffered_spans") == 0


def otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """The OTLP JSON mapping of a request: protobuf JSON with hex (not base64) ids."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        import base64

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


async def test_json_and_gzip_bodies(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=POLICIES[:1]))
    request = make_request(traces=20, spans_per_trace=3, error_every=2)
    official = (TESTDATA / "otlp" / "trace.json").read_bytes()
    async with aiohttp.ClientSession() as session:
        json_body = otlp_json(request)
        async with session.post(
            receiver_url(gateway),
            data=gzip.compress(json_body),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as reply:
            assert reply.status == 200
            assert reply.content_type == "application/json"
            assert await reply.json() == {}
        async with session.post(
            receiver_url(gateway), data=official, headers={"Content-Type": "application/json"}
        ) as reply:
            assert reply.status == 200
    expected_errors = {
        s.trace_id for s in request.resource_spans[0].scope_spans[0].spans if s.status.code == 2
    }
    await wait_for(lambda: set(downstream.spans_by_trace()) == expected_errors)
    received = downstream.spans_by_trace()
    assert all(len(spans) == 3 for spans in received.values())
    await drained(gateway, 21)
    # The official example has no error span: decided and dropped, parsed with its upper-case hex ids.
    assert bytes.fromhex("5B8EFFF798038103D269B633813FC60C") in gateway.decisions.dropped  # type: ignore[operator]


async def test_shared_example_kept_field_by_field(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    official = (TESTDATA / "otlp" / "trace.json").read_bytes()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            receiver_url(gateway), data=official, headers={"Content-Type": "application/json"}
        ) as reply,
    ):
        assert reply.status == 200
    await wait_for(lambda: len(downstream.spans()) == 1)
    resource, scope, span = downstream.spans()[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.span_id.hex() == "eee19b7ec3c1b174"
    assert span.parent_span_id.hex() == "eee19b7ec3c1b173"
    assert span.name == "I'm a server span"
    assert span.kind == 2
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.end_time_unix_nano == 1544712661000000000
    attributes = {kv.key: kv.value.string_value for kv in span.attributes}
    assert attributes == {"my.span.attr": "some value"}
    assert resource.attributes[0].value.string_value == "my.service"
    assert (scope.name, scope.version) == ("my.library", "1.0.0")
    # The keeping policy is recorded where the OTel Collector puts it: on the instrumentation scope.
    assert {kv.key: kv.value.string_value for kv in scope.attributes} == {
        "my.scope.attribute": "some scope attribute",
        "tailsampling.policy": "all",
    }
