"""Randomized traffic through a real gateway: whatever the shape, kept traces arrive whole and once.

Each seed sends requests that mix several resources and scopes, split traces across requests, reach
max_spans_per_trace and the buffer limits, and send some spans again after their trace was decided.
Which traces are kept is computed independently (an error on the first span sent, or the FNV hash), so
the checks hold whatever the timing: every span of a kept trace arrives exactly once, no span of a
dropped trace arrives, and the span counters add up.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url
from tests.otlp_data import send
from tests.test_end_to_end import probabilistic_keeps

POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "half", "type": "probabilistic", "probabilistic": {"sampling_percentage": 50}},
]


def random_requests(rng: random.Random) -> tuple[list[ExportTraceServiceRequest], dict[bytes, list[Span]]]:
    """Requests carrying random traces in random order and grouping; per trace, its spans as sent."""
    traces: dict[bytes, list[Span]] = {}
    for _ in range(rng.randint(5, 25)):
        trace_id = rng.randbytes(16)
        root_id = rng.randbytes(8)
        spans = []
        for index in range(rng.randint(1, 9)):
            span = Span(
                trace_id=trace_id, span_id=root_id if index == 0 else rng.randbytes(8), name=f"op{index}"
            )
            if index:
                span.parent_span_id = root_id
            span.start_time_unix_nano = 1_700_000_000_000_000_000 + index
            span.end_time_unix_nano = span.start_time_unix_nano + 1000
            spans.append(span)
        rng.shuffle(spans)  # the root anywhere, often not first
        if rng.random() < 0.3:
            spans[0].status.code = 2  # an error on the first span sent: seen before any decision
        traces[trace_id] = spans
    # Interleave the traces, each keeping its own order.
    order: list[Span] = []
    cursors = {trace_id: 0 for trace_id in traces}
    while cursors:
        trace_id = rng.choice(list(cursors))
        order.append(traces[trace_id][cursors[trace_id]])
        cursors[trace_id] += 1
        if cursors[trace_id] == len(traces[trace_id]):
            del cursors[trace_id]
    requests = []
    position = 0
    while position < len(order):
        size = rng.randint(1, 10)
        request = ExportTraceServiceRequest()
        for span in order[position : position + size]:
            resource_spans = request.resource_spans.add()
            resource_spans.resource.attributes.append(
                KeyValue(key="service.name", value=AnyValue(string_value=f"svc{rng.randrange(3)}"))
            )
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.name = f"lib{rng.randrange(2)}"
            scope_spans.spans.append(span)
        requests.append(request)
        position += size
    return requests, traces


@pytest.mark.parametrize("seed", range(10))
async def test_random_traffic_kept_whole_and_once(
    start_gateway: GatewayFactory, downstream: Downstream, seed: int
) -> None:
    rng = random.Random(seed)
    config = gateway_config(
        downstream,
        policies=POLICIES,
        decision_wait=f"{rng.choice([0.05, 0.2, 5])}s",
        decision_wait_after_root_received=f"{rng.choice([0.02, 0.1, 5])}s",
        max_spans_per_trace=rng.choice([3, 5, 100]),
        num_traces=rng.choice([4, 8, 1000]),
        max_buffered_spans=rng.choice([15, 40, 10_000]),
    )
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    requests, traces = random_requests(rng)
    for request in requests:
        await send(url, request)
        await asyncio.sleep(rng.choice([0, 0, 0.02]))  # let some deadlines pass in between
    # Some spans again, now or after their trace's decision: late spans must follow it.
    resent = rng.sample([span for spans in traces.values() for span in spans], k=3)
    for span in resent:
        await asyncio.sleep(rng.choice([0, 0.1]))
        again = ExportTraceServiceRequest()
        again.resource_spans.add().scope_spans.add().spans.append(span)
        await send(url, again)
        traces[span.trace_id].append(span)
    await gateway.stop()

    kept = {
        trace_id
        for trace_id, spans in traces.items()
        if spans[0].status.code == 2 or probabilistic_keeps(trace_id, 50)
    }
    received = Counter((span.trace_id, span.span_id) for _, _, span in downstream.spans())
    expected = Counter((span.trace_id, span.span_id) for trace_id in kept for span in traces[trace_id])
    assert received == expected
    sent = sum(len(spans) for spans in traces.values())
    assert metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted") == sent
    decided = metric(gateway, "tailgate_spans_decided_total", decision="kept") + metric(
        gateway, "tailgate_spans_decided_total", decision="dropped"
    )
    late = metric(gateway, "tailgate_late_spans_total", decision="kept") + metric(
        gateway, "tailgate_late_spans_total", decision="dropped"
    )
    assert decided + late == sent
    assert metric(gateway, "tailgate_buffered_spans") == 0
