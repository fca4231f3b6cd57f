"""One trace whose spans arrive over OTLP/HTTP, OTLP/gRPC and Zipkin, on separate connections, is one
trace: decided once, delivered whole in one export, to an OTLP/HTTP and an OTLP/gRPC backend alike."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from sampler.app import Gateway
from tests.conftest import Downstream, GatewayFactory, free_port, gateway_config, metric, wait_for
from tests.grpc_downstream import GRPCDownstream
from tests.otlp_data import ERRORS_ONLY, post, send

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ZIPKIN_JSON = {"Content-Type": "application/json"}


def all_protocols_config(downstream: Downstream, grpc_downstream: GRPCDownstream) -> dict[str, Any]:
    config = gateway_config(
        downstream,
        policies=ERRORS_ONLY,
        decision_wait="5s",
        decision_wait_after_root_received="0.3s",
    )
    config["receivers"]["otlp"]["grpc"] = {"endpoint": f"127.0.0.1:{free_port()}"}
    config["receivers"]["zipkin"] = {"endpoint": f"127.0.0.1:{free_port()}"}
    config["exporters"]["otlp_grpc"] = {
        "endpoint": grpc_downstream.endpoint,
        "batch": {"timeout": "0.02s"},
        "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.2s"},
    }
    return config


def port_of(gateway: Gateway, protocol: str) -> int:
    (port,) = [r.port for r in gateway.receivers if r.protocol == protocol]
    assert port is not None
    return port


def otlp_span_request(service: str, trace_id: bytes, span_id: bytes, parent_id: bytes, name: str) -> bytes:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service))
    )
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.parent_span_id, span.name = trace_id, span_id, parent_id, name
    span.start_time_unix_nano = time.time_ns()
    span.end_time_unix_nano = span.start_time_unix_nano + 5_000_000
    return request.SerializeToString()


def zipkin_span(trace_id: bytes, span_id: bytes, parent_id: bytes, error: bool) -> dict[str, Any]:
    span: dict[str, Any] = {
        "traceId": trace_id.hex(),
        "id": span_id.hex(),
        "parentId": parent_id.hex(),
        "name": "charge card",
        "kind": "CLIENT",
        "timestamp": time.time_ns() // 1000,
        "duration": 2000,
        "localEndpoint": {"serviceName": "payments"},
        "tags": {"http.method": "POST"},
    }
    if error:
        span["tags"]["error"] = "card declined"
    return span


async def send_trace_over_three_protocols(gateway: Gateway, trace_id: bytes, error: bool) -> list[bytes]:
    """Children over gRPC and Zipkin first, the root over OTLP/HTTP last; returns the span ids."""
    root, grpc_child, zipkin_child = (random.randbytes(8) for _ in range(3))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of(gateway, 'otlp_grpc')}") as channel:
        body = otlp_span_request("inventory", trace_id, grpc_child, root, "reserve stock")
        reply = await channel.unary_unary(EXPORT)(body, timeout=5)
        assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
    status, _, reply = await post(
        f"http://127.0.0.1:{port_of(gateway, 'zipkin')}/api/v2/spans",
        json.dumps([zipkin_span(trace_id, zipkin_child, root, error)]).encode(),
        ZIPKIN_JSON,
    )
    assert status == 202, reply
    await send(
        f"http://127.0.0.1:{port_of(gateway, 'otlp_http')}/v1/traces",
        ExportTraceServiceRequest.FromString(otlp_span_request("checkout", trace_id, root, b"", "GET /cart")),
    )
    return [root, grpc_child, zipkin_child]


async def test_trace_over_three_protocols_is_decided_once_and_arrives_whole(
    start_gateway: GatewayFactory, downstream: Downstream, grpc_downstream: GRPCDownstream
) -> None:
    gateway = await start_gateway(all_protocols_config(downstream, grpc_downstream))
    kept_id, dropped_id = random.randbytes(16), random.randbytes(16)
    # Only the Zipkin span carries the error: the whole trace is kept because of it.
    kept_spans, _ = await asyncio.gather(
        send_trace_over_three_protocols(gateway, kept_id, error=True),
        send_trace_over_three_protocols(gateway, dropped_id, error=False),
    )
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 1)
    await wait_for(lambda: len(downstream.spans()) == 3 and len(grpc_downstream.spans()) == 3)

    assert metric(gateway, "tailgate_traces_decided_total", decision="kept") == 1
    for protocol in ("otlp_http", "otlp_grpc", "zipkin"):
        accepted = metric(gateway, "tailgate_receiver_spans_total", protocol=protocol, outcome="accepted")
        assert accepted == 2, protocol
    for backend in (downstream, grpc_downstream):
        assert backend.kept_by() == {kept_id: {"errors"}}
        # Delivered together: one export request holds every span of the trace.
        (request,) = backend.requests
        spans = [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
        assert sorted(span.span_id for span in spans) == sorted(kept_spans)
        services = {
            kv.value.string_value
            for rs in request.resource_spans
            for kv in rs.resource.attributes
            if kv.key == "service.name"
        }
        assert services == {"checkout", "inventory", "payments"}
        (errored,) = [span for span in spans if span.status.code == 2]
        assert errored.name == "charge card" and errored.status.message == "card declined"

    # Late spans follow the decision whichever protocol brings them.
    late_kept, late_dropped = random.randbytes(8), random.randbytes(8)
    status, _, _ = await post(
        f"http://127.0.0.1:{port_of(gateway, 'zipkin')}/api/v2/spans",
        json.dumps([zipkin_span(kept_id, late_kept, kept_spans[0], error=False)]).encode(),
        ZIPKIN_JSON,
    )
    assert status == 202
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of(gateway, 'otlp_grpc')}") as channel:
        body = otlp_span_request("inventory", dropped_id, late_dropped, random.randbytes(8), "late")
        await channel.unary_unary(EXPORT)(body, timeout=5)
    await wait_for(lambda: len(downstream.spans()) == 4 and len(grpc_downstream.spans()) == 4)
    assert metric(gateway, "tailgate_late_spans_total", decision="dropped") == 1
    for backend in (downstream, grpc_downstream):
        assert backend.spans_by_trace().keys() == {kept_id}
        assert late_kept in {span.span_id for span in backend.spans_by_trace()[kept_id]}
