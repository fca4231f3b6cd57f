"""What the decider hands on: whole traces to exporters, and span counts that add up."""

from __future__ import annotations

import asyncio

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import PROTOBUF, make_request, post, send


def request_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


async def test_exporter_batches_hold_whole_traces_up_to_send_batch_size(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream)
    config["exporters"]["otlp_http"]["batch"] = {"timeout": "0.02s", "send_batch_size": 10}
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=50, spans_per_trace=4))
    await wait_for(lambda: len(downstream.spans()) == 200)
    # Decided together, handed over trace by trace: a batch closes at the trace that reaches 10 spans.
    assert max(request_spans(request) for request in downstream.requests) <= 12
    assert all(len(spans) == 4 for spans in downstream.spans_by_trace().values())


async def test_exporter_queue_bounds_traces_not_decision_batches(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream)
    config["exporters"]["otlp_http"]["batch"] = {"timeout": "0.02s", "queue_size": 100}
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=50, spans_per_trace=4))
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 50)
    await asyncio.sleep(0.3)
    # 25 whole traces fit the empty queue; the rest are refused and counted.
    assert len(downstream.spans()) == 100
    assert metric(gateway, "tailgate_exporter_dropped_spans_total", exporter="otlp_http") == 100


def _with_invalid_name(request: ExportTraceServiceRequest, index: int) -> bytes:
    request.resource_spans[0].scope_spans[0].spans[index].name = "PLACEHOLDER"
    return request.SerializeToString().replace(
        b"PLACEHOLDER", b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc\xff\xfe\xfd"
    )


async def test_span_counts_add_up_with_invalid_spans(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    url = receiver_url(gateway)
    request = make_request(traces=1, spans_per_trace=4)
    late = make_request(traces=1, spans_per_trace=1)
    late_span = late.resource_spans[0].scope_spans[0].spans[0]
    late_span.trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    late_span.parent_span_id = b"\x01" * 8
    assert (await post(url, _with_invalid_name(request, 2), PROTOBUF))[0] == 200
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 1)
    assert (await post(url, _with_invalid_name(late, 0), PROTOBUF))[0] == 200
    accepted = metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted")
    decided = metric(gateway, "tailgate_spans_decided_total", decision="kept")
    late_kept = metric(gateway, "tailgate_late_spans_total", decision="kept")
    assert (accepted, decided, late_kept) == (5, 4, 1)
    assert metric(gateway, "tailgate_invalid_spans_total") == 2  # of those, not forwarded
    await wait_for(lambda: len(downstream.spans()) == 3)
