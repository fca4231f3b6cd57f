"""Decision timing: late spans, size limits that force early decisions, root-triggered deadlines."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from policies.base import STATUS_ERROR, STATUS_OK, STATUS_UNSET, Decision
from policies.registry import build_policies
from sampler.buffer import DecisionCache, TraceBuffer
from sampler.config import TailSamplingConfig
from sampler.receivers.otlp_decode import decode_json, decode_protobuf
from tests.conftest import (
    Downstream,
    GatewayFactory,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import ERRORS_ONLY, make_request, otlp_json, send
from tests.policies.test_conditions import any_value


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_status_codes_come_from_spans_with_and_without_a_status(encoding: str) -> None:
    """A span without a status, or with a status that has a message and no code, is UNSET; codes set
    their own bits. Both decoders' spans (projected protobuf, full messages from JSON) read alike."""
    request = make_request(traces=3, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[1].status.message = "no code"  # trace 0: a status without a code, the others none
    spans[4].status.code = 1  # trace 1: OK and no status
    spans[7].status.code = 2  # trace 2: ERROR and a status message alone
    spans[7].status.message = "failed"
    spans[8].status.message = "only a message"
    if encoding == "protobuf":
        batches = decode_protobuf(request.SerializeToString())
    else:
        batches = decode_json(otlp_json(request))
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), DecisionCache(10, 10), lambda: 0.0)
    result = buffer.add_spans(batches)
    assert (result.accepted, result.rejected) == (9, 0)
    codes = [buffer.traces[span.trace_id].status_codes for span in spans[::3]]
    assert codes == [STATUS_UNSET, STATUS_OK | STATUS_UNSET, STATUS_ERROR | STATUS_UNSET]


def only_child(request: ExportTraceServiceRequest, index: int) -> ExportTraceServiceRequest:
    """A request holding just span `index` of `request` (same resource and scope)."""
    single = ExportTraceServiceRequest()
    single.CopyFrom(request)
    spans = single.resource_spans[0].scope_spans[0].spans
    keep = spans[index]
    del spans[:]
    spans.append(keep)
    return single


async def test_late_spans_follow_the_decision(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=ERRORS_ONLY))
    url = receiver_url(gateway)
    request = make_request(traces=2, spans_per_trace=4, error_every=2)  # trace 0 has an error
    spans = request.resource_spans[0].scope_spans[0].spans
    kept_id, dropped_id = spans[0].trace_id, spans[4].trace_id
    first_part = ExportTraceServiceRequest()
    first_part.CopyFrom(request)
    del first_part.resource_spans[0].scope_spans[0].spans[3]  # hold back the kept trace's last span
    del first_part.resource_spans[0].scope_spans[0].spans[6]  # and the dropped trace's last
    await send(url, first_part)
    await wait_for(lambda: len(downstream.spans_by_trace().get(kept_id, [])) == 3)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 1)

    await send(url, only_child(request, 3))
    await send(url, only_child(request, 7))
    await wait_for(lambda: len(downstream.spans_by_trace().get(kept_id, [])) == 4)
    await wait_for(lambda: metric(gateway, "tailgate_late_spans_total", decision="dropped") == 1)
    assert metric(gateway, "tailgate_late_spans_total", decision="kept") == 1
    assert dropped_id not in downstream.spans_by_trace()
    late = downstream.spans_by_trace()[kept_id][-1]
    assert late.span_id == spans[3].span_id
    assert downstream.kept_by()[kept_id] == {"errors"}  # recorded on the late span's scope too
    late_scope = next(scope for _, scope, span in downstream.spans() if span.span_id == late.span_id)
    assert [(kv.key, kv.value.string_value) for kv in late_scope.attributes] == [
        ("tailsampling.policy", "errors")
    ]
    assert metric(gateway, "tailgate_buffered_traces") == 0


async def test_max_spans_per_trace_decides_at_once(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, decision_wait="60s", max_spans_per_trace=5)
    config["tail_sampling"]["decision_wait_after_root_received"] = "60s"
    gateway = await start_gateway(config)
    request = make_request(traces=1, spans_per_trace=7)
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    await send(receiver_url(gateway), request)
    # Decided at the 5th span; the 6th and 7th follow as late spans. Nothing waits for 60 s.
    await wait_for(lambda: len(downstream.spans_by_trace().get(trace_id, [])) == 7, timeout=5)
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="max_spans_per_trace") == 1
    assert metric(gateway, "tailgate_late_spans_total", decision="kept") == 2
    assert metric(gateway, "tailgate_buffered_spans") == 0


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"num_traces": 6, "max_buffered_spans": 1000}, "num_traces"),
        ({"num_traces": 1000, "max_buffered_spans": 24}, "max_buffered_spans"),
    ],
)
async def test_buffer_limits_decide_oldest_early(
    start_gateway: GatewayFactory, downstream: Downstream, limits: dict[str, int], reason: str
) -> None:
    config = gateway_config(downstream, decision_wait="60s", **limits)
    config["tail_sampling"]["decision_wait_after_root_received"] = "60s"
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    sent: list[bytes] = []
    for _ in range(5):  # 5 requests of 3 traces x 4 spans: the buffer holds 6 traces, 24 spans
        request = make_request(traces=3, spans_per_trace=4)
        sent.extend(dict.fromkeys(s.trace_id for s in request.resource_spans[0].scope_spans[0].spans))
        await send(url, request)
        assert metric(gateway, "tailgate_buffered_spans") <= 24
        assert metric(gateway, "tailgate_buffered_traces") <= 6
    early = int(metric(gateway, "tailgate_traces_decided_early_total", reason=reason))
    assert early == len(sent) - 6 == 9
    # The oldest went first, and none was lost: they arrive downstream complete, the rest at shutdown.
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(sent[:early]))
    await gateway.stop()
    assert set(downstream.spans_by_trace()) == set(sent)
    assert all(len(spans) == 4 for spans in downstream.spans_by_trace().values())
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="shutdown") == 6


async def test_root_span_moves_the_deadline_earlier(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, decision_wait="30s", decision_wait_after_root_received="0.2s")
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    request = make_request(traces=2, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    with_root, without_root = spans[0].trace_id, spans[3].trace_id
    del spans[3]  # the second trace's root never comes
    started = time.monotonic()
    await send(url, request)
    await wait_for(lambda: with_root in downstream.spans_by_trace(), timeout=5)
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.3)
    assert without_root not in downstream.spans_by_trace()
    assert metric(gateway, "tailgate_buffered_traces") == 1
    await gateway.stop()
    assert without_root in downstream.spans_by_trace()


async def test_all_zero_parent_id_marks_a_root(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = gateway_config(downstream, decision_wait="30s", decision_wait_after_root_received="0.2s")
    gateway = await start_gateway(config)
    request = make_request(traces=1, spans_per_trace=2)
    request.resource_spans[0].scope_spans[0].spans[0].parent_span_id = bytes(8)  # "no parent"
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(downstream.spans()) == 2, timeout=3)  # not after 30 s


def traced_with(values: list[object], policy_spec: dict[str, object]) -> Decision:
    """One trace whose spans carry these values of attribute `a`, buffered as a receiver buffers it, and
    the verdict of the policy built from `policy_spec`."""
    (policy,) = build_policies([policy_spec], "tail_sampling.policies")
    buffer = TraceBuffer(TailSamplingConfig(), policy.attribute_keys, DecisionCache(10, 10), time.monotonic)
    request = make_request(traces=1, spans_per_trace=len(values))
    for span, value in zip(request.resource_spans[0].scope_spans[0].spans, values, strict=True):
        span.attributes.add(key="a").value.CopyFrom(any_value(value))
    buffer.add_spans(decode_protobuf(request.SerializeToString()))
    (trace,) = buffer.traces.values()
    return policy.evaluate(trace, time.monotonic())


def test_attribute_values_of_a_trace_are_told_apart_by_type_and_none_is_forgotten() -> None:
    boolean = {"name": "b", "type": "boolean_attribute", "boolean_attribute": {"key": "a", "value": True}}
    numeric = {
        "name": "n",
        "type": "numeric_attribute",
        "numeric_attribute": {"key": "a", "min_value": 1, "max_value": 5},
    }
    # true and 1 are different values: the second is not taken for a repeat of the first.
    assert traced_with([1, True], boolean) is Decision.SAMPLED
    assert traced_with([True, 1], numeric) is Decision.SAMPLED
    assert traced_with([1.0, True], boolean) is Decision.SAMPLED
    # NaN equals nothing; many spans with it are one value, and a later number still counts.
    assert traced_with([math.nan] * 70 + [3.0], numeric) is Decision.SAMPLED
    # Every distinct value counts, however many: the 101st route is the excluded one.
    routes = [f"/api/{n}" for n in range(100)] + ["/health"]
    excluded = {
        "name": "s",
        "type": "string_attribute",
        "string_attribute": {"key": "a", "values": ["/health"], "invert_match": True},
    }
    assert traced_with(routes, excluded) is Decision.INVERT_NOT_SAMPLED
    assert traced_with(routes[:100], excluded) is Decision.INVERT_SAMPLED
